"""Core features of emotion_recognition.py: the end-to-end run, the data path, every block and formula.

The end-to-end tests run the script in a subprocess on a tiny synthetic dataset (see conftest.py)
and check the files and numbers it wrote; the unit tests import the script and call its functions.
Failure modes and bad data are in test_reliability.py.
"""
import csv
import dataclasses
import itertools
import json
import math
import os
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from PIL import Image

from conftest import TINY, ern, hybrid_loss_terms, pr, run_script

RUN_FILES = ["best_emotion_model.pth", "final_emotion_model.pth", "last.pth", "config.json", "provenance.json",
             "train.log", "metrics.jsonl", "data_report.json", "evaluation_results.json", "evaluation_predictions.csv",
             "training_history.png", "confusion_matrix.png", "context_similarities.png", "feature_space.png",
             "feature_space.csv", "attention_maps.png"]
EVAL_FILES = ["evaluation_results.json", "evaluation_predictions.csv", "data_report.json", "confusion_matrix.png",
              "context_similarities.png", "attention_maps.png", "feature_space.png", "feature_space.csv"]
PLOTS = [n for n in RUN_FILES if n.endswith(".png")]
RESULT_KEYS = ["accuracy", "test_accuracy", "macro_f1", "class_names", "classification_report", "confusion_matrix",
               "evaluated_split", "num_parameters", "best_epoch", "best_val_accuracy", "training_seconds", "config"]
NO_AUGMENTATION = dict(aug_scale=0.0, aug_translate=0.0, aug_rotate=0.0, aug_flip=0.0, aug_brightness=0.0,
                       aug_contrast=0.0, aug_erase=0.0)


# ---------------------------------------------------------------------------------------------
# End to end: one training run, shared by the assertions below
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    """Two epochs on the tiny dataset (which has a test split), in float32 (the recount below is float32; amp is bf16 on
    a CPU with native bf16): (run folder, finished process)."""
    tmp = tmp_path_factory.mktemp("run")
    proc = run_script(*TINY, f"--data_dir={tiny_dataset}", "--epochs=2", "--amp=false", f"--output_dir={tmp / 'run'}",
                      f"--cache_dir={tmp / 'cache'}", cwd=tmp)
    return tmp / "run", proc


@pytest.fixture(scope="module")
def evaluated(trained, tiny_dataset, tmp_path_factory):
    """--evaluate of the trained run's best checkpoint into a new folder: (folder, finished process)."""
    run_dir, _ = trained
    tmp = tmp_path_factory.mktemp("eval")
    proc = run_script(f"--evaluate={run_dir / 'best_emotion_model.pth'}", f"--data_dir={tiny_dataset}",
                      f"--output_dir={tmp / 'eval'}", f"--cache_dir={tmp / 'cache'}", cwd=tmp)
    return tmp / "eval", proc


def read_results(folder):
    return json.loads((folder / "evaluation_results.json").read_text())


def check_consistent_with_confusion(results):
    """Every number of evaluation_results.json recomputed from its confusion matrix."""
    cm = np.array(results["confusion_matrix"])
    k = len(results["class_names"])
    assert cm.shape == (k, k)
    assert cm.sum() == results["evaluated_samples"]
    assert results["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    f1s = []
    for i, name in enumerate(results["class_names"]):
        row = results["classification_report"][name]
        support, predicted = cm[i].sum(), cm[:, i].sum()
        precision = cm[i, i] / predicted if predicted else 0.0
        recall = cm[i, i] / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        assert row["support"] == support, name
        assert row["recall"] == pytest.approx(recall), name
        assert row["precision"] == pytest.approx(precision), name
        assert row["f1-score"] == pytest.approx(f1), name
        if support or predicted:  # a class neither in the split nor predicted stays out of the mean
            f1s.append(row["f1-score"])
    assert results["macro_f1"] == pytest.approx(np.mean(f1s))


def test_run_writes_every_output(trained):
    run_dir, proc = trained
    missing = [n for n in RUN_FILES if not (run_dir / n).is_file()]
    assert not missing, f"missing outputs: {missing}\nstdout:\n{proc.stdout[-2000:]}"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 2
    report = json.loads((run_dir / "data_report.json").read_text())
    assert {n: s["samples"] for n, s in report["splits"].items()} == {"train": 96, "val": 32, "test": 32}


@pytest.mark.parametrize("name", PLOTS)
def test_run_plots_open(trained, name):
    with Image.open(trained[0] / name) as im:
        im.load()
        assert im.width > 100 and im.height > 100


def test_run_evaluation_results(trained, tiny_dataset):
    run_dir, proc = trained
    results = read_results(run_dir)
    assert not [k for k in RESULT_KEYS if k not in results]
    yaml_names = yaml.safe_load((tiny_dataset / "data.yaml").read_text())["names"]
    assert results["class_names"] == yaml_names
    assert list(results["classification_report"]) == yaml_names
    assert results["evaluated_split"] == "test"
    cm = np.array(results["confusion_matrix"])
    assert cm.sum(1).tolist() == [4] * 8  # the test split: 4 faces per class
    check_consistent_with_confusion(results)
    assert results["config"]["epochs"] == 2 and results["config"]["width"] == 0.125
    cfg = ern.Config(**results["config"])
    assert results["num_parameters"] == ern.count_parameters(ern.build_model(cfg, 8))
    assert results["training_seconds"] > 0
    assert "test accuracy" in proc.stdout


def test_run_feature_space_points_name_their_faces(trained):
    """feature_space.csv, the points of feature_space.png: each sampled face once (--tsne_samples=60 of the test
    split's 32: all), as its row in evaluation_predictions.csv and its true class there, then each class's prototype."""
    run_dir, _ = trained
    with open(run_dir / "evaluation_predictions.csv", newline="", encoding="utf-8") as f:
        faces = list(csv.DictReader(f))
    with open(run_dir / "feature_space.csv", newline="", encoding="utf-8") as f:
        points = list(csv.DictReader(f))
    sampled = [p for p in points if p["point"] == "face"]
    assert sorted(int(p["face"]) for p in sampled) == list(range(len(faces))) and len(faces) == 32
    assert all(p["class"] == faces[int(p["face"])]["true"] for p in sampled)
    assert [p["class"] for p in points[len(sampled):]] == read_results(run_dir)["class_names"]
    assert {p["point"] for p in points[len(sampled):]} == {"prototype"}
    xy = np.array([[float(p["x"]), float(p["y"])] for p in points])
    assert np.isfinite(xy).all() and len(np.unique(xy.round(3), axis=0)) == len(points)  # a point each


def test_a_feature_space_too_small_for_t_sne_leaves_no_points(tmp_path):
    """Four faces and no prototypes: the figure says too few, and an earlier evaluation's feature_space.csv is
    removed, not left to disagree with it; with the prototypes the points are written: a sample of 3 of 6 faces, each
    with its own class, then the prototypes."""
    path, points = tmp_path / "feature_space.png", tmp_path / "feature_space.csv"
    points.write_text("an earlier evaluation's")
    names, labels = ["a", "b", "c"], np.array([0, 1, 2, 0, 2, 1])
    ern.plot_feature_space(torch.randn(4, 16), labels[:4], None, names, path, 100, 0, "val")
    assert path.stat().st_size > 10_000 and not points.exists()
    ern.plot_feature_space(torch.randn(6, 16), labels, torch.randn(3, 16), names, path, 3, 0, "val")
    with open(points, newline="", encoding="utf-8") as f:
        header, *rows = list(csv.reader(f))
    assert header == ["point", "face", "class", "x", "y"] and len(rows) == 6
    faces = [int(r[1]) for r in rows[:3]]
    assert len(set(faces)) == 3 and [r[:3] for r in rows[:3]] == [["face", str(i), names[labels[i]]] for i in faces]
    assert [r[:3] for r in rows[3:]] == [["prototype", "", "a"], ["prototype", "", "b"], ["prototype", "", "c"]]


def test_run_best_epoch_is_the_best_validation_epoch(trained):
    run_dir, _ = trained
    results = read_results(run_dir)
    val = [json.loads(line)["val_accuracy"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert results["best_val_accuracy"] == pytest.approx(max(val))
    assert results["best_epoch"] == 1 + int(np.argmax(val))  # the first epoch that reached the maximum
    best = ern.load_checkpoint(run_dir / "best_emotion_model.pth")
    assert best["epoch"] == results["best_epoch"]
    assert best["class_names"] == results["class_names"]
    assert {"model", "config", "normalization", "metrics", "image_size"} <= set(best)


def label_crops(split_dir, margin, size):
    """Each face of a split of one face an image, read here: (uint8 crops (N, 3, S, S), labels, boxes, file names)."""
    crops, labels, boxes, names = [], [], [], []
    for label_file in sorted((split_dir / "labels").glob("*.txt")):
        image_file = next((split_dir / "images").glob(label_file.stem + ".*"))
        image = cv2.cvtColor(cv2.imread(str(image_file)), cv2.COLOR_BGR2RGB)
        cls, *box = (float(v) for v in label_file.read_text().split())
        crops.append(ern.crop_box(image, box, margin, size).transpose(2, 0, 1))
        labels.append(int(cls))
        boxes.append(box)
        names.append(image_file.name)
    return np.stack(crops), np.array(labels), boxes, names


def test_run_confusion_matrix_matches_an_independent_evaluation(trained, tiny_dataset):
    """Rebuild the best model from its checkpoint, crop the test faces here, and recount the confusion matrix; each
    face's row of evaluation_predictions.csv holds its box, classes and probabilities as computed here."""
    run_dir, _ = trained
    results = read_results(run_dir)
    ckpt = ern.load_checkpoint(run_dir / "best_emotion_model.pth")
    model, cfg = ern.model_from_checkpoint(ckpt)
    model.eval()
    crops, labels, boxes, names = label_crops(tiny_dataset / "test", cfg.crop_margin, ckpt["image_size"])
    mean, std = (torch.tensor(ckpt["normalization"][k]) for k in ("mean", "std"))
    x = ern.standardize(torch.from_numpy(crops), mean, std)
    with torch.no_grad():
        logits = (model(x)[0] + model(x.flip(3))[0]) / 2  # flip TTA, as the evaluation does
    cm = np.bincount(labels * 8 + logits.argmax(1).numpy(), minlength=64).reshape(8, 8)  # rows true
    assert cm.tolist() == results["confusion_matrix"]

    classes = results["class_names"]
    with open(run_dir / "evaluation_predictions.csv", newline="", encoding="utf-8") as f:
        rows = {Path(row["image"]).name: row for row in csv.DictReader(f)}
    assert sorted(rows) == sorted(names)
    for name, label, box, p in zip(names, labels, boxes, logits.softmax(1).numpy()):
        row = rows[name]
        assert [float(row[k]) for k in ("cx", "cy", "w", "h")] == pytest.approx(box, abs=1e-6)
        assert (row["true"], row["predicted"]) == (classes[label], classes[p.argmax()])
        np.testing.assert_allclose([float(row[c]) for c in classes], p, atol=2e-4)
        assert float(row["confidence"]) == pytest.approx(p.max(), abs=2e-4)
    assert sum(int(row["image_in_train"]) for row in rows.values()) == results["samples_duplicating_train"]


def test_run_validates_on_the_validation_split_with_the_training_splits_normalization(trained, tiny_dataset):
    """The best checkpoint's validation figures recounted here: accuracy and hybrid loss (smoothed targets, the KL
    term at its weight) of the valid split's crops with the mirror, the per-epoch validation of --val_faces=0,
    against numpy; the test split's loss differs, so the check tells the splits apart. Its normalization is the
    per-channel mean and std of every training crop (fewer than STATISTICS_SAMPLE)."""
    run_dir, _ = trained
    ckpt = ern.load_checkpoint(run_dir / "best_emotion_model.pth")
    model, cfg = ern.model_from_checkpoint(ckpt)
    model.eval()
    pixels = label_crops(tiny_dataset / "train", cfg.crop_margin, ckpt["image_size"])[0] / 255
    np.testing.assert_allclose(ckpt["normalization"]["mean"], pixels.mean((0, 2, 3)), atol=1e-6)
    np.testing.assert_allclose(ckpt["normalization"]["std"], pixels.std((0, 2, 3)) + 1e-3, atol=1e-6)
    mean, std = (torch.tensor(ckpt["normalization"][k]) for k in ("mean", "std"))

    def accuracy_and_loss(split):
        faces, labels, _, _ = label_crops(tiny_dataset / split, cfg.crop_margin, ckpt["image_size"])
        x = ern.standardize(torch.from_numpy(faces), mean, std)
        with torch.no_grad():
            (z, s, _), (z_mirror, s_mirror, _) = model(x), model(x.flip(3))
        z, s = ((z + z_mirror) / 2).double().numpy(), ((s + s_mirror) / 2).double().numpy()
        ce, kl = hybrid_loss_terms(z, s, labels, cfg.label_smoothing)
        return (z.argmax(1) == labels).mean(), ce + cfg.context_weight * kl

    accuracy, loss = accuracy_and_loss("valid")
    assert ckpt["metrics"]["val_accuracy"] == pytest.approx(accuracy)
    assert ckpt["metrics"]["val_loss"] == pytest.approx(loss, rel=1e-4)
    assert accuracy_and_loss("test")[1] != pytest.approx(loss, rel=1e-3)


def test_evaluation_predictions_name_the_classes_and_the_faces_in_the_training_split(tmp_path):
    """A row per face in the split's order, class names with a comma and an accent kept whole, the probabilities of
    the logits, image_in_train 1 where the image's hash is the training split's (empty where that is not known)."""
    names = ["a,b", "é", "c"]
    split = ern.Split("val", ["x.jpg", "y, z.png", "x.jpg"], np.array([0, 1, 2]),
                      np.array([[0.5, 0.5, 1, 1], [0.25, 0.5, 0.5, 0.25], [0.75, 0.5, 0.5, 1]], np.float32),
                      hashes=["h1", "h2", "h1"])
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 1.0, 0.0]])
    for train_hashes, flags in (({"h1", "h9"}, ["1", "0", "1"]), (None, ["", "", ""])):
        ern.write_predictions(split, logits, names, train_hashes, tmp_path / "p.csv")
        with open(tmp_path / "p.csv", newline="", encoding="utf-8") as f:
            header, *rows = list(csv.reader(f))
        assert header == ["image", "cx", "cy", "w", "h", "true", "predicted", "confidence", "image_in_train", *names]
        assert [r[:5] for r in rows] == [["x.jpg", "0.5", "0.5", "1", "1"], ["y, z.png", "0.25", "0.5", "0.5", "0.25"],
                                         ["x.jpg", "0.75", "0.5", "0.5", "1"]]
        assert [r[5:7] for r in rows] == [["a,b", "a,b"], ["é", "c"], ["c", "é"]]
        assert [r[8] for r in rows] == flags
        e = math.e
        want = [[e**2 / (e**2 + 2), 1 / (e**2 + 2), 1 / (e**2 + 2)], [1 / (e**3 + 2), 1 / (e**3 + 2), e**3 / (e**3 + 2)],
                [1 / (e + 2), e / (e + 2), 1 / (e + 2)]]
        np.testing.assert_allclose([[float(v) for v in r[9:]] for r in rows], want, atol=5e-5)
        assert [float(r[7]) for r in rows] == pytest.approx([max(w) for w in want], abs=5e-5)


def test_run_without_test_split_evaluates_on_val(tiny_dataset, tmp_path):
    """No test folder and no test key: the final evaluation is on the validation split, and says so.
    The class names are written in a non-alphabetical order to show that the yaml's order is kept."""
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data, ignore=shutil.ignore_patterns("test"))
    doc = yaml.safe_load((data / "data.yaml").read_text())
    del doc["test"]
    doc["names"] = doc["names"][::-1]
    (data / "data.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    proc = run_script(*TINY, f"--data_dir={data}", "--epochs=1", f"--output_dir={tmp_path / 'run'}",
                      f"--cache_dir={tmp_path / 'cache'}", "--tsne_samples=0", "--val_faces=8", cwd=tmp_path)
    results = read_results(tmp_path / "run")
    assert results["evaluated_split"] == "val"
    assert results["evaluated_samples"] == 32
    assert results["class_names"] == doc["names"]
    check_consistent_with_confusion(results)
    assert "no test split" in proc.stdout
    assert "val accuracy" in proc.stdout.splitlines()[-1]
    assert "test_accuracy" not in results  # a validation figure is never called a test accuracy
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert (results["final_epoch"], results["final_epoch_val_accuracy"]) == (1, metrics[-1]["val_accuracy"])
    assert (f"with the best epoch 1 ({metrics[-1]['val_accuracy']:.2%} in its validation on 8 faces, one view) (the "
            f"best epoch was chosen on this split, so this is optimistic)" in proc.stdout.splitlines()[-1])


def test_the_confusion_figure_leaves_a_class_the_split_lacks_blank(tmp_path, monkeypatch):
    """Row-normalized, a class with no face in the split is blank (it read as recall 0.00 of a class never tested);
    the others are their row's shares."""
    drawn = []
    monkeypatch.setattr(ern, "heatmap", lambda ax, matrix, *args, **kwargs: drawn.append(np.asarray(matrix, float)))
    ern.plot_confusion([[3, 1, 0], [0, 0, 0], [1, 0, 4]], ["a", "b", "c"], tmp_path / "c.png", "val")
    counts, rows = drawn
    assert counts.sum() == 9 and np.isnan(rows[1]).all()
    assert rows[[0, 2]].tolist() == [[0.75, 0.25, 0.0], [0.2, 0.0, 0.8]]


def test_evaluate_without_data_dir_uses_the_checkpoints_data_and_a_refused_one_leaves_no_folder(evaluated, trained,
                                                                                                tiny_dataset, tmp_path,
                                                                                                capsys):
    """The checkpoint records its data: `--evaluate=RUN` alone evaluated nothing (no data.yaml at Config's default)
    and left an eval__ folder in the run folder, as did every refused evaluation. --split=val evaluates the
    validation split."""
    run_dir, _ = trained
    (tmp_path / "run").mkdir()
    shutil.copy(run_dir / "best_emotion_model.pth", tmp_path / "run")
    folder, results = ern.main([f"--evaluate={tmp_path / 'run'}", f"--cache_dir={tmp_path / 'cache'}"])
    assert f"data: {tiny_dataset}, the checkpoint's" in capsys.readouterr().out
    assert folder.parent == tmp_path / "run" and folder.name.startswith("eval__")
    assert results["confusion_matrix"] == read_results(evaluated[0])["confusion_matrix"]  # with --data_dir given
    shutil.rmtree(folder)
    folder, results = ern.main([f"--evaluate={tmp_path / 'run'}", "--split=val", f"--cache_dir={tmp_path / 'cache'}"])
    labels = [int(line.split()[0]) for f in (tiny_dataset / "valid" / "labels").iterdir() for line in
              f.read_text().splitlines()]  # the oracle: the validation split's own label files
    assert results["evaluated_split"] == "val" and len(labels) == 32
    assert [sum(row) for row in results["confusion_matrix"]] == np.bincount(labels, minlength=8).tolist()
    shutil.rmtree(folder)
    no_test = tmp_path / "no_test"
    shutil.copytree(tiny_dataset, no_test, ignore=shutil.ignore_patterns("test"))
    (no_test / "data.yaml").write_text((tiny_dataset / "data.yaml").read_text().replace("test:", "# test:"))
    with pytest.raises(ern.UserError, match="no such split"):
        ern.main([f"--evaluate={tmp_path / 'run'}", f"--data_dir={no_test}", "--split=test",
                  f"--cache_dir={tmp_path / 'cache'}"])
    # what the checkpoint fixes: its settings, its preprocessing, its training (which evaluation_results.json's
    # config recorded as given before, though nothing used them)
    for given in ("--preset=cpu", "--image_size=64", "--epochs=5", "--lr=0.5", "--aug_flip=0"):
        with pytest.raises(ern.UserError, match=f"--evaluate does not take {given.split('=')[0]}:"):
            ern.main([f"--evaluate={tmp_path / 'run'}", given])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["best_emotion_model.pth"]


def test_evaluate_writes_results_without_training(evaluated, trained):
    eval_dir, proc = evaluated
    config, trained_config = read_results(eval_dir)["config"], json.loads((trained[0] / "config.json").read_text())
    assert config["tsne_samples"] == 60 and config["amp"] is False  # the run's (it recorded today's defaults)
    assert {k for k in config if config[k] != trained_config[k]} == {"output_dir", "cache_dir"}  # this command's
    missing = [n for n in EVAL_FILES if not (eval_dir / n).is_file()]
    assert not missing, f"missing outputs: {missing}\nstdout:\n{proc.stdout[-2000:]}"
    for n in ("last.pth", "final_emotion_model.pth", "metrics.jsonl", "training_history.png"):
        assert not (eval_dir / n).exists(), f"--evaluate trained: it wrote {n}"
    assert "epoch " not in proc.stdout
    for n in EVAL_FILES:
        if n.endswith(".png"):
            with Image.open(eval_dir / n) as im:
                assert im.width > 100 and im.height > 100
    results, trained_results = read_results(eval_dir), read_results(trained[0])
    assert not [k for k in RESULT_KEYS if k not in results]
    assert results["evaluated_split"] == "test"
    check_consistent_with_confusion(results)
    # the same checkpoint on the same split: the same predictions as the run's own evaluation
    for k in ("confusion_matrix", "test_accuracy", "macro_f1", "class_names", "best_epoch", "num_parameters"):
        assert results[k] == trained_results[k], k


def test_a_matplotlib_that_fails_to_import_loses_no_number(evaluated, trained, tiny_dataset, tmp_path):
    """A matplotlib that cannot be imported (built against another numpy, half installed) fails the figures only:
    evaluation_results.json, the same as with the figures, is written before any of them imports it."""
    fake = tmp_path / "broken" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('matplotlib was built against another numpy')\n")
    proc = run_script(f"--evaluate={trained[0] / 'best_emotion_model.pth'}", f"--data_dir={tiny_dataset}",
                      f"--output_dir={tmp_path / 'eval'}", f"--cache_dir={tmp_path / 'cache'}", cwd=tmp_path,
                      check=False, env={"PYTHONPATH": str(tmp_path / "broken")})
    assert proc.returncode != 0 and "matplotlib was built against another numpy" in proc.stderr, proc.stderr[-2000:]
    results, whole = read_results(tmp_path / "eval"), read_results(evaluated[0])
    for k in ("confusion_matrix", "test_accuracy", "macro_f1", "class_names"):
        assert results[k] == whole[k], k
    assert not list((tmp_path / "eval").glob("*.png"))


def test_class_names_with_dollar_signs_are_drawn_as_text(tiny_dataset, tmp_path):
    """matplotlib reads the text between two $ as TeX: a class named "a$_$b" made every figure's savefig raise
    (after evaluation_results.json), one named "$x$" was drawn as math. No figure writes mathematics."""
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    doc = yaml.safe_load((data / "data.yaml").read_text())
    doc["names"] = ["a$_$b", "$x$", *doc["names"][2:]]
    (data / "data.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    run_script(*TINY, f"--data_dir={data}", "--epochs=1", "--attention_samples=16", f"--output_dir={tmp_path / 'run'}",
               f"--cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "run").glob("*.png")) == sorted(PLOTS)
    assert read_results(tmp_path / "run")["class_names"] == doc["names"]


@pytest.mark.parametrize("name", ["last.pth", "final_emotion_model.pth"])
def test_evaluate_of_the_last_or_final_checkpoint_reports_the_runs_best_epoch(trained, tiny_dataset, tmp_path, name):
    """Its own epoch as checkpoint_epoch; best_epoch and best_val_accuracy are the run's (metrics.jsonl's best),
    not the evaluated checkpoint's epoch."""
    run_dir, _ = trained
    run_script(f"--evaluate={run_dir / name}", f"--data_dir={tiny_dataset}", f"--output_dir={tmp_path / 'eval'}",
               f"--cache_dir={tmp_path / 'cache'}", "--tsne_samples=0", "--attention_samples=0", cwd=tmp_path)
    results = read_results(tmp_path / "eval")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    best = max(metrics, key=lambda m: m["val_accuracy"])  # the first of equals, as training keeps it
    assert results["checkpoint_epoch"] == 2
    assert (results["best_epoch"], results["best_val_accuracy"]) == (best["epoch"], best["val_accuracy"])


def test_evaluate_and_predict_take_inference_settings_by_one_rule(tiny_dataset, tmp_path):
    """Both compute as the checkpoint was trained (here without flip TTA and with another eval batch size),
    unless the command line says otherwise."""
    cfg = ern.Config(image_size=32, width=0.125, blocks="1,1,1,1", tta_flip=False, eval_batch_size=7)
    ckpt = tmp_path / "model.pth"
    torch.save(ern.checkpoint_dict(ern.build_model(cfg, 8), cfg, ern.DEMO_CLASSES, torch.full((3,), 0.5),
                                   torch.full((3,), 0.25), 1, {}), ckpt)
    for name, extra in (("saved", []), ("given", ["--tta_flip=true"])):
        run_script(f"--evaluate={ckpt}", f"--data_dir={tiny_dataset}", f"--output_dir={tmp_path / name}",
                   f"--cache_dir={tmp_path / 'cache'}", "--tsne_samples=0", "--attention_samples=0", *extra, cwd=tmp_path)
    saved, given = (read_results(tmp_path / n)["config"] for n in ("saved", "given"))
    assert (saved["tta_flip"], saved["eval_batch_size"]) == (False, 7)
    assert (given["tta_flip"], given["eval_batch_size"]) == (True, 7)
    assert pr.EmotionPredictor(ckpt).cfg.tta_flip is False and pr.EmotionPredictor(ckpt, tta_flip=True).cfg.tta_flip
    assert pr.EmotionPredictor(ckpt, tta_shift=2).cfg.tta_shift == 2
    with pytest.raises(ern.UserError, match="--tta_shift must be in"):  # a given setting is validated as --evaluate's
        pr.EmotionPredictor(ckpt, tta_shift=-1)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")  # sklearn: class d is predicted, never true
def test_evaluation_results_on_hand_made_predictions():
    """One class never right and one with no support; the confusion matrix written out by hand, every other number
    recomputed from it by hand (check_consistent_with_confusion)."""
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 1])
    pred = np.array([0, 1, 0, 1, 2, 2, 2, 0, 3, 1])
    split = ern.Split("test", [f"{i}.jpg" for i in range(10)], y, np.zeros((10, 4), np.float32),
                      formats=["jpeg"] * 6 + ["png"] * 4, hashes=[str(i) for i in range(10)])
    out = {"logits": F.one_hot(torch.from_numpy(pred), 4).float()}
    results = ern.evaluation_results(split, out, list("abcd"))
    assert results["confusion_matrix"] == [[2, 1, 0, 0], [0, 2, 1, 0], [1, 0, 2, 1], [0, 0, 0, 0]]
    assert results["accuracy"] == results["test_accuracy"] == pytest.approx(6 / 10)
    check_consistent_with_confusion(results)
    assert "accuracy_excluding_train_duplicates" not in results  # no training hashes given: no leakage figure
    # right at 0, 2, 3, 5, 6 and 9: faces 1 and 7 (both wrong) in training leave 6 right of 8; faces 0 and 1 (one
    # right, one wrong) leave 5 of 8; a mask the wrong way round would give 0 / 2 and 1 / 2
    r = ern.evaluation_results(split, out, list("abcd"), train_hashes={"1", "7"})
    assert r["samples_duplicating_train"] == 2 and r["accuracy_excluding_train_duplicates"] == pytest.approx(6 / 8)
    assert r["accuracy"] == pytest.approx(6 / 10)  # the plain accuracy still counts every face
    r = ern.evaluation_results(split, out, list("abcd"), train_hashes={"0", "1", "not in the split"})
    assert r["samples_duplicating_train"] == 2 and r["accuracy_excluding_train_duplicates"] == pytest.approx(5 / 8)
    r = ern.evaluation_results(split, out, list("abcd"), train_hashes=set(map(str, range(10))))
    assert r["samples_duplicating_train"] == 10 and r["accuracy_excluding_train_duplicates"] is None  # none left


def test_macro_f1_leaves_out_a_class_the_split_lacks_and_nobody_predicts():
    """By hand: classes 0-2 of four; class 3 neither in the labels nor predicted."""
    y, pred = np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 1, 1, 2, 0])
    f1 = [2 * 0.5 * 0.5 / (0.5 + 0.5), 2 * (2 / 3) * 1 / (2 / 3 + 1), 2 * 1 * 0.5 / (1 + 0.5)]  # (p, r) per class
    assert ern.macro_f1(y, pred) == pytest.approx(np.mean(f1))
    split = ern.Split("val", [f"{i}.jpg" for i in range(6)], y, np.zeros((6, 4), np.float32), formats=["jpeg"] * 6,
                      hashes=[str(i) for i in range(6)])
    results = ern.evaluation_results(split, {"logits": F.one_hot(torch.from_numpy(pred), 4).float()}, list("abcd"))
    assert results["classification_report"]["d"] == {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 0}
    assert results["macro_f1"] == pytest.approx(np.mean(f1))
    assert np.array(results["confusion_matrix"]).shape == (4, 4)


# ---------------------------------------------------------------------------------------------
# Data: label files, data.yaml resolution, box crops
# ---------------------------------------------------------------------------------------------

def test_parse_label_file_valid_lines(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("3 0.5 0.4 0.25 0.75\n")
    assert ern.parse_label_file(f, 8) == ([(3, 0.5, 0.4, 0.25, 0.75)], [], [])


def test_parse_label_file_multiple_boxes_and_blank_lines(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("0 0.1 0.2 0.1 0.2\n\n7 0.9 0.8 0.2 0.1\n1 0.5 0.5 1 1\n")
    boxes, problems, _ = ern.parse_label_file(f, 8)
    assert problems == []
    assert boxes == [(0, 0.1, 0.2, 0.1, 0.2), (7, 0.9, 0.8, 0.2, 0.1), (1, 0.5, 0.5, 1.0, 1.0)]
    assert all(isinstance(b[0], int) for b in boxes)


def test_parse_label_file_without_trailing_newline(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("2 0.5 0.5 0.3 0.4\n5 0.25 0.75 0.5 0.5")  # as the AffectNet export writes them
    assert ern.parse_label_file(f, 8) == ([(2, 0.5, 0.5, 0.3, 0.4), (5, 0.25, 0.75, 0.5, 0.5)], [], [])


@pytest.mark.parametrize("dims", [2, 3])
def test_a_pose_export_gives_each_face_its_box(tmp_path, dims):
    """An Ultralytics pose export (data.yaml's kpt_shape: five face landmarks after each box) was read as a polygon
    over the box's numbers and the landmarks (with x y: a wrong box, silently), or refused (with visibility)."""
    make_split_folders(tmp_path, ("train",))
    write_yaml(tmp_path / "data.yaml", train="train/images", names=["a", "b"], kpt_shape=[5, dims])
    landmarks = {2: "0.42 0.35 0.58 0.35 0.5 0.45 0.44 0.55 0.56 0.55",
                 3: "0.42 0.35 2 0.58 0.35 2 0.5 0.45 1 0 0 0 0.56 0.55 2"}[dims]  # one landmark not labelled
    label = tmp_path / "train" / "labels" / "face.txt"
    label.write_text(f"1 0.5 0.45 0.3 0.4 {landmarks}\n0 0.2 0.2 0.1 0.1\n")
    (tmp_path / "train" / "images" / "face.png").write_bytes(b"")
    names, folders, _, keypoints = ern.read_data_yaml(tmp_path)
    assert keypoints == 5 * dims
    split, problems, *_ = ern.scan_split("train", folders["train"], len(names), keypoints)
    assert split.labels.tolist() == [1]
    np.testing.assert_allclose(split.boxes, [[0.5, 0.45, 0.3, 0.4]])  # the row's own box
    assert problems == [f"{label}:2: expected {5 + 5 * dims} fields 'class cx cy w h' and the {5 * dims} keypoint "
                        f"values of data.yaml's kpt_shape, got 5: '0 0.2 0.2 0.1 0.1'"]
    for shape in ([5, 4], [5, 3.0], [5, True], [0, 3], 5):
        write_yaml(tmp_path / "data.yaml", train="train/images", names=["a", "b"], kpt_shape=shape)
        with pytest.raises(ern.UserError, match=re.escape(f"kpt_shape must be two whole numbers [keypoints, 2 or 3] "
                                                          f"(x y, or x y visibility), got {shape!r}")):
            ern.read_data_yaml(tmp_path)


def test_yolov5_face_rows_give_each_face_its_box_and_7_point_polygons_stay_polygons(tmp_path, capsys):
    """YOLOv5-face's rows (a box, then eyes, nose tip and mouth corners, -1 where not marked; its data.yaml has no
    kpt_shape) were read as 7-point polygons: a box around the box's own numbers and the landmarks, every one wrong
    (refused with -1). A split most of whose 15-field rows read so is read as box and landmarks, with a note, the
    odd face too (mouth corners swapped), and its rows of 5 fields as ever; a segmentation export's 7-point outlines
    stay polygons, in every rotation, direction and size, even where the points lie inside the box their first
    numbers would give."""
    make_split_folders(tmp_path, ("train", "valid"))
    write_yaml(tmp_path / "data.yaml", train="train/images", val="valid/images", names=["a", "b"])
    faces = ["1 0.5 0.45 0.3 0.4 0.42 0.35 0.58 0.35 0.5 0.45 0.44 0.55 0.56 0.55",
             "0 0.3 0.6 0.2 0.3 " + " ".join(["-1"] * 10),
             "1 0.7 0.3 0.2 0.2 0.68 0.25 0.74 0.26 0.73 0.3 0.69 0.35 0.73 0.36",  # a face turned a little
             "0 0.5 0.5 0.4 0.4 0.45 0.4 0.55 0.4 0.5 0.5 0.55 0.6 0.45 0.6",  # mouth corners swapped
             "1 0.4 0.6 0.3 0.2"]  # a face without landmarks
    for i, row in enumerate(faces):
        (tmp_path / "train" / "labels" / f"f{i}.txt").write_text(row + "\n")
        (tmp_path / "train" / "images" / f"f{i}.png").write_bytes(b"")
    outlines = []
    for i, (start, turn, r, stretch) in enumerate(itertools.product(range(0, 360, 15), (1, -1), (0.05, 0.2), (1, 2))):
        angles = [math.radians(start + turn * 360 * k / 7) for k in range(7)]
        points = [(0.5 + r * stretch * math.cos(a), 0.5 + r * math.sin(a)) for a in angles]
        outlines.append(points)
        (tmp_path / "valid" / "labels" / f"p{i}.txt").write_text(
            f"{i % 2} " + " ".join(f"{v:.6f}" for p in points for v in p) + "\n")
        (tmp_path / "valid" / "images" / f"p{i}.png").write_bytes(b"")
    names, folders, _, keypoints = ern.read_data_yaml(tmp_path)
    assert keypoints == 0
    splits, problems, notes, _ = ern.scan_splits(folders, ("train", "val"), len(names), keypoints, None)
    assert problems == []
    order = np.argsort(splits["train"].paths)
    assert splits["train"].labels[order].tolist() == [int(row.split()[0]) for row in faces]
    np.testing.assert_allclose(splits["train"].boxes[order], [[float(v) for v in row.split()[1:5]] for row in faces])
    [note] = notes  # into data_report.json
    assert note.startswith("3 of the train split's 4 label rows of 15 fields read as YOLOv5-face's")
    assert f"note: {note}" in capsys.readouterr().out
    order = np.argsort([int(Path(p).stem[1:]) for p in splits["val"].paths])
    want = [[(min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)]
            for xs, ys in (zip(*points) for points in outlines)]
    np.testing.assert_allclose(splits["val"].boxes[order], want, atol=2e-6)  # the box around each outline


def test_the_data_report_gives_image_sizes_width_first_an_image_once():
    """As a video's 640x480: width x height (it gave height first, unsaid). An image with two faces is one image of
    its size and format (it counted once per face)."""
    split = ern.Split("train", ["a.png", "a.png", "b.png", "c.jpg"], np.array([0, 1, 1, 0]),
                      np.zeros((4, 4), np.float32), formats=["png", "png", "png", "jpeg"],
                      sizes=[(128, 160), (128, 160), (128, 160), (480, 640)])
    report = ern.split_report(split, ["x", "y"])
    assert (report["samples"], report["images"], report["per_class"]) == (4, 3, {"x": 2, "y": 2})
    assert report["image_sizes"] == {"160x128": 2, "640x480": 1} and report["formats"] == {"png": 2, "jpeg": 1}


def make_split_folders(root, splits=("train", "valid", "test")):
    for s in splits:
        (root / s / "images").mkdir(parents=True)
        (root / s / "labels").mkdir(parents=True)


def write_yaml(yaml_path, **doc):
    yaml_path.parent.mkdir(parents=True, exist_ok=True)
    yaml_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return yaml_path


def test_read_data_yaml_paths_relative_to_path_key(tmp_path):
    make_split_folders(tmp_path / "elsewhere")
    write_yaml(tmp_path / "cfg" / "data.yaml", path="../elsewhere", train="train/images", val="valid/images",
               test="test/images", nc=2, names=["b", "a"])
    names, folders, notes, _ = ern.read_data_yaml(tmp_path / "cfg")
    assert names == ["b", "a"]  # the yaml's order, not sorted
    assert folders == {s: (tmp_path / "elsewhere" / d / "images").resolve()
                       for s, d in (("train", "train"), ("val", "valid"), ("test", "test"))}
    assert notes == []


def test_read_data_yaml_paths_relative_to_yaml_folder(tmp_path):
    make_split_folders(tmp_path / "ds" / "sub", ("tr", "va"))
    yaml_path = write_yaml(tmp_path / "ds" / "my.yaml", train="sub/tr/images", val="sub/va/images", names=["x", "y"])
    names, folders, notes, _ = ern.read_data_yaml(yaml_path)  # a .yaml file may be passed directly
    assert folders == {"train": (tmp_path / "ds" / "sub" / "tr" / "images").resolve(),
                       "val": (tmp_path / "ds" / "sub" / "va" / "images").resolve()}
    assert notes == []


def test_read_data_yaml_ultralytics_parent_style(tmp_path):
    """The AffectNet export: data.yaml inside YOLO_format says train: "../YOLO_format/train/images", and the
    test folder it names does not exist (there is no test split)."""
    base = tmp_path / "affectnet" / "YOLO_format"
    make_split_folders(base, ("train", "valid"))
    (base / "data.yaml").write_text('data: "../YOLO_format"\n\ntrain: "../YOLO_format/train/images"\n'
                                    'val: "../YOLO_format/valid/images"\ntest: "../YOLO_format/test/images"\n\n'
                                    'nc: 8\n\nnames:\n  [\n    "Anger",\n    "Contempt",\n    "Disgust",\n    "Fear",\n'
                                    '    "Happy",\n    "Neutral",\n    "Sad",\n    "Surprise",\n  ]\n')
    names, folders, notes, _ = ern.read_data_yaml(base)
    assert names == ern.DEMO_CLASSES
    assert folders == {"train": (base / "train" / "images").resolve(), "val": (base / "valid" / "images").resolve()}
    assert notes == []


def test_read_data_yaml_falls_back_to_standard_folders(tmp_path):
    base = tmp_path / "moved"
    make_split_folders(base, ("train", "val"))
    write_yaml(base / "data.yaml", train="/old/machine/train/images", val="../gone/valid/images", names=["a", "b"])
    names, folders, notes, _ = ern.read_data_yaml(base)
    assert folders == {"train": (base / "train" / "images").resolve(), "val": (base / "val" / "images").resolve()}
    assert len(notes) == 2
    assert "/old/machine/train/images" in notes[0] and "does not exist" in notes[0]
    assert "../gone/valid/images" in notes[1] and "does not exist" in notes[1]


def test_read_data_yaml_reads_the_layouts_exporters_write(tmp_path):
    """CVAT's Ultralytics export (path: ./, train: train.txt), merged datasets (train: [a, b]), a split named by its
    folder (train: train), a Colab machine's path (path: /content/...), Ultralytics' validation key, a number as a
    folder name: each read as Ultralytics reads it, where the script stopped or trained on a hold-out."""
    cvat = tmp_path / "cvat"
    for split in ("train", "val"):
        (cvat / "images" / split).mkdir(parents=True)
    write_yaml(cvat / "data.yaml", path="./", train="train.txt", val="images/val", names=["a", "b"])
    (cvat / "train.txt").write_text("images/train/x.jpg\n")
    assert ern.read_data_yaml(cvat)[1] == {"train": cvat / "train.txt", "val": cvat / "images" / "val"}
    merged = tmp_path / "merged"
    make_split_folders(merged / "one", ("train",))
    make_split_folders(merged / "two", ("train", "valid"))
    write_yaml(merged / "data.yaml", train=["one/train", "two/train/images"], validation="two/valid",
               names=["a", "b"])
    names, folders, notes, _ = ern.read_data_yaml(merged)
    assert folders == {"train": [merged / "one" / "train" / "images", merged / "two" / "train" / "images"],
                       "val": merged / "two" / "valid" / "images"} and notes == []
    write_yaml(merged / "data.yaml", train=["one/train", "three/train"], names=["a", "b"])
    with pytest.raises(ern.UserError, match=f"'train' lists {merged / 'three' / 'train'}, which does not exist"):
        ern.read_data_yaml(merged)
    colab = tmp_path / "colab"
    (colab / "images" / "2024").mkdir(parents=True)
    write_yaml(colab / "data.yaml", path="/content/datasets/faces", train=2024, names=["a", "b"])
    (colab / "data.yaml").write_text((colab / "data.yaml").read_text().replace("2024", "images/2024"))
    names, folders, notes, _ = ern.read_data_yaml(colab)
    assert folders == {"train": colab / "images" / "2024"}
    assert notes == [f"data.yaml's path '/content/datasets/faces' does not exist here; its splits are read from {colab}"]
    (colab / "2024").mkdir()
    write_yaml(colab / "data.yaml", train=2024, names=["a", "b"])  # YAML reads the folder's name as a number
    assert ern.read_data_yaml(colab)[1] == {"train": colab / "2024"}
    write_yaml(colab / "data.yaml", train={"images": "x"}, names=["a", "b"])
    with pytest.raises(ern.UserError, match="'train' must be a folder, an image list file or a list of these"):
        ern.read_data_yaml(colab)
    write_yaml(colab / "data.yaml", path=["a", "b"], train="2024", names=["a", "b"])
    with pytest.raises(ern.UserError, match=re.escape("'path' must be one folder, got ['a', 'b']")):
        ern.read_data_yaml(colab)
    (colab / "data.yaml").write_text("train: 2023.10\nnames: [a, b]\n")  # YAML reads 2023.1
    with pytest.raises(ern.UserError, match=re.escape(f"train path ({colab / '2023.1'} (YAML read the name as a "
                                                      f"number: quote it)) nor {colab}/train/images exists")):
        ern.read_data_yaml(colab)
    write_yaml(colab / "data.yaml", train=["gone/images"], names=["a", "b"])  # a list: a TypeError traceback
    with pytest.raises(ern.UserError, match=re.escape(f"train path ({colab / 'gone' / 'images'}) nor")):
        ern.read_data_yaml(colab)
    write_yaml(colab / "data.yaml", train="2024", val="2024", validation="other", names=["a", "b"])
    assert ern.read_data_yaml(colab)[1:3] == ({"train": colab / "2024", "val": colab / "2024"},
                                             ["data.yaml gives both val and validation: val is read"])


def test_a_data_dir_without_data_yaml_says_what_it_holds(tmp_path):
    write_yaml(tmp_path / "faces" / "dataset.yml", train="train", names=["a", "b"])
    with pytest.raises(ern.UserError, match="the folder holds dataset.yml: pass that file as --data_dir"):
        ern.read_data_yaml(tmp_path / "faces")
    (tmp_path / "faces.zip").write_bytes(b"PK\x03\x04")
    with pytest.raises(ern.UserError, match="faces.zip is an archive: unpack it, and pass the folder holding data.yaml"):
        ern.read_data_yaml(tmp_path / "faces.zip")
    (tmp_path / "train.txt").write_text("train/images/a.jpg\n")  # an image list, where data.yaml was meant
    with pytest.raises(ern.UserError, match="train.txt is a file, not a folder: pass the folder holding data.yaml, or "
                                            "data.yaml itself"):
        ern.read_data_yaml(tmp_path / "train.txt")
    make_split_folders(tmp_path / "faces", ("train",))
    (tmp_path / "faces" / "dataset.yml").rename(tmp_path / "faces" / "DATASET.YML")  # an upper-case suffix is YAML
    assert ern.read_data_yaml(tmp_path / "faces" / "DATASET.YML")[1]["train"] == tmp_path / "faces" / "train" / "images"


def test_a_class_list_in_another_order_than_data_yaml_stops_the_run(tmp_path):
    """LabelImg writes label ids in the order of labels/classes.txt; a data.yaml written by hand in another order
    named every face with another emotion, silently."""
    make_split_folders(tmp_path, ("train",))
    write_yaml(tmp_path / "data.yaml", train="train/images", names=["anger", "happy", "sad"])
    listing = tmp_path / "train" / "labels" / "classes.txt"
    listing.write_text("anger\nhappy\nsad\n")
    assert ern.read_data_yaml(tmp_path)[2] == []
    listing.write_text("happy\r\nsad\r\nanger\r\n")
    with pytest.raises(ern.UserError, match=re.escape(f"{listing} lists the classes as ['happy', 'sad', 'anger'], "
                                                      f"data.yaml as ['anger', 'happy', 'sad']")):
        ern.read_data_yaml(tmp_path)
    problems = []
    assert ern.read_data_yaml(tmp_path, problems)[0] == ["anger", "happy", "sad"] and len(problems) == 1
    roboflow = listing.rename(listing.with_name("_darknet.labels"))  # Roboflow's Darknet export's, in every split
    with pytest.raises(ern.UserError, match=re.escape(f"{roboflow} lists the classes as ['happy', 'sad', 'anger']")):
        ern.read_data_yaml(tmp_path)
    roboflow.unlink()
    listing.write_text("Happy\nAnger\nSad\nNeutral\n")  # another case, and a class data.yaml does not name
    with pytest.raises(ern.UserError, match=re.escape("so the faces of anger, happy would be named as another class")):
        ern.read_data_yaml(tmp_path)
    listing.write_text("Anger\nHappy\nSad\n")  # the same classes in the same order, capitalized: nothing to say
    assert ern.read_data_yaml(tmp_path)[2] == []
    listing.write_text("anger\nhappy\nsad\nneutral\n")  # one class more at the end: the ids agree
    assert ern.read_data_yaml(tmp_path)[2] == [f"{listing} lists other classes than data.yaml "
                                              f"(['anger', 'happy', 'sad', 'neutral']); data.yaml's are used"]
    listing.unlink()
    (tmp_path / "obj.names").write_text("dog\ncat\n")  # Darknet's, of another project: named, not refused
    assert ern.read_data_yaml(tmp_path)[2] == [f"{tmp_path / 'obj.names'} lists other classes than data.yaml "
                                              f"(['dog', 'cat']); data.yaml's are used"]


def test_read_data_yaml_names_as_dict(tmp_path):
    make_split_folders(tmp_path, ("train",))
    write_yaml(tmp_path / "data.yaml", train="train/images", nc=3, names={2: "c", 0: "z", 1: "b"})
    assert ern.read_data_yaml(tmp_path)[0] == ["z", "b", "c"]


def test_read_data_yaml_nc_names_mismatch(tmp_path):
    make_split_folders(tmp_path, ("train",))
    write_yaml(tmp_path / "data.yaml", train="train/images", nc=3, names=["a", "b"])
    with pytest.raises(ern.UserError, match="nc is 3"):
        ern.read_data_yaml(tmp_path)


def test_parse_label_file_reads_polygons_tolerates_rounding_and_counts_a_repeated_row_once(tmp_path):
    """Ultralytics' reading: a segmentation row gives the box around its points, coordinates within 1 % outside
    [0, 1] are clamped; a row written twice is one face (a note), the same box with another class a problem."""
    label = tmp_path / "a.txt"
    label.write_text("4 0.2 0.3 0.6 0.3 0.6 0.9 0.2 0.9\n"  # a rectangle's corners: box centre (0.4, 0.6), 0.4 x 0.6
                     "1 1.004 0.5 0.4 -0.003\n"  # clamped: 1.0 and 0.0 -> no height
                     "1 1.005 0.5 0.4 0.4\n"  # clamped: cx 1.0
                     "1 1.02 0.5 0.4 0.4\n"  # beyond the tolerance
                     "2 0.5 0.5 0 0.3\n"
                     "4 0.2 0.3 0.6 0.3 0.6\n"  # six fields: neither a box nor a polygon (2.5 points)
                     "1 1.0 0.5 0.4 0.4\n"  # line 3's box after clamping, same class: one face
                     "6 1.0 0.5 0.4 0.4\n")  # line 3's box, another class
    boxes, problems, notes = ern.parse_label_file(label, 8)
    assert boxes == [(4, pytest.approx(0.4), pytest.approx(0.6), pytest.approx(0.4), pytest.approx(0.6)),
                     (1, 1.0, 0.5, 0.4, 0.4)]
    assert [p.split(": ", 1)[0] for p in problems] == [f"{label}:{n}" for n in (2, 4, 5, 6, 8)]
    assert "no width or height" in problems[0] and "outside [0, 1]" in problems[1] and "no width" in problems[2]
    assert "polygon" in problems[3] and "line 3" in problems[4] and "class 6" in problems[4]
    assert notes == [f"{label}:7: the box and class of line 3 again, dropped (one face counted once)"]


def test_parse_label_file_says_what_cannot_be_read(tmp_path):
    utf16 = tmp_path / "utf16.txt"
    utf16.write_text("3 0.5 0.5 0.4 0.4\n", encoding="utf-16")  # what PowerShell's > writes
    assert ern.parse_label_file(utf16, 8) == ([], [f"{utf16}: not UTF-8 text (UTF-16?): save it as UTF-8"], [])
    folder = tmp_path / "folder.txt"
    folder.mkdir()  # reading it raises a real OSError (root reads files whatever their permissions)
    boxes, problems, _ = ern.parse_label_file(folder, 8)
    assert boxes == [] and len(problems) == 1 and problems[0].startswith(f"{folder}: cannot read the label file (")


def test_a_list_file_in_utf16_without_its_byte_order_mark_reads_as_with_it(tmp_path):
    """An editor's UTF-16 without the mark PowerShell writes: read as UTF-8, its NULs went into the paths (a
    ValueError traceback where the path was opened)."""
    text = '\u5199\u771f/b.jpg\r\n# faces\r\nimg/a.jpg\r\n"img/\u00e9t\u00e9.jpg"\r\n'  # a first path of no ASCII
    want = [(1, "\u5199\u771f/b.jpg"), (3, "img/a.jpg"), (4, "img/\u00e9t\u00e9.jpg")]
    for encoding in ("utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be"):
        (tmp_path / "list.txt").write_bytes(text.encode(encoding))
        assert ern.list_file_lines(tmp_path / "list.txt") == want, encoding


def test_upper_case_label_suffixes_are_label_files(tmp_path):
    make_split_folders(tmp_path, ("train",))
    cv2.imwrite(str(tmp_path / "train" / "images" / "a.jpg"), np.full((16, 16, 3), 99, np.uint8))
    (tmp_path / "train" / "labels" / "a.TXT").write_text("1 0.5 0.5 1 1")
    split, problems, *_ = ern.scan_split("train", tmp_path / "train" / "images", 2)
    assert problems == [] and split.labels.tolist() == [1]


def test_an_empty_label_file_is_an_image_without_faces_and_a_pixel_cache_is_no_stray_file(tmp_path):
    """YOLO marks an image without objects with an empty label file (Roboflow's null images), and Ultralytics'
    cache=disk writes a.npy beside a.jpg: neither is a mistake in the dataset. A .npy without its image still is."""
    make_split_folders(tmp_path, ("train",))
    images, labels = tmp_path / "train" / "images", tmp_path / "train" / "labels"
    for stem in "abc":
        cv2.imwrite(str(images / f"{stem}.jpg"), np.full((16, 16, 3), 99, np.uint8))
    (labels / "a.txt").write_text("1 0.5 0.5 1 1")
    (labels / "b.txt").write_text("")
    (labels / "c.txt").write_text(" \n\n")
    np.save(images / "a.npy", np.zeros((16, 16, 3), np.uint8))
    np.save(images / "stray.npy", np.zeros(3))
    split, problems, notes, no_face = ern.scan_split("train", images, 2)
    assert split.labels.tolist() == [1] and split.paths == [str(images / "a.jpg")]
    assert problems == [f"{images / 'stray.npy'}: not an image file (extension .npy)"]
    assert notes == [] and no_face == [str(images / "b.jpg"), str(images / "c.jpg")]


def test_a_subfolder_that_cannot_be_listed_is_a_problem_not_a_silent_gap(tmp_path, monkeypatch):
    """Root lists any folder, so the refusal is os.scandir's, as a folder copied with another owner's mode 700 gives."""
    make_split_folders(tmp_path, ("train",))
    images, labels = tmp_path / "train" / "images", tmp_path / "train" / "labels"
    for sub in ("", "locked/"):
        (images / sub).mkdir(exist_ok=True)
        (labels / sub).mkdir(exist_ok=True)
        cv2.imwrite(str(images / f"{sub}a.jpg"), np.full((16, 16, 3), 99, np.uint8))
        (labels / f"{sub}a.txt").write_text("1 0.5 0.5 1 1")
    scandir = os.scandir

    def refusing(path="."):
        if os.fspath(path) == str(images / "locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    split, problems, *_ = ern.scan_split("train", images, 2)
    assert split.paths == [str(images / "a.jpg")]
    assert problems[0] == f"{images / 'locked'}: cannot list this folder (Permission denied), so its files are left out"
    assert problems[1:] == [f"{labels / 'locked' / 'a.txt'}: label file without an image in {images}"]
    sources = pr.folder_sources(images)
    assert [(m.kind, m.path) for m in sources] == [("image", str(images / "a.jpg")), ("error", str(images / "locked"))]
    assert sources[1].error == "cannot list this folder (Permission denied), so its files are left out"


def test_a_link_that_leads_nowhere_is_a_problem_in_training_and_prediction(tmp_path):
    """A dataset fetched in part (git-annex, DVC) or on an unmounted disk: its links were dropped without a word."""
    make_split_folders(tmp_path, ("train",))
    images, labels = tmp_path / "train" / "images", tmp_path / "train" / "labels"
    cv2.imwrite(str(images / "a.jpg"), np.full((16, 16, 3), 99, np.uint8))
    (labels / "a.txt").write_text("1 0.5 0.5 1 1")
    (images / "b.jpg").symlink_to(tmp_path / "annex" / "b.jpg")
    (labels / "b.txt").symlink_to(tmp_path / "annex" / "b.txt")
    split, problems, *_ = ern.scan_split("train", images, 2)
    assert split.paths == [str(images / "a.jpg")]
    assert problems == [f"{images / 'b.jpg'}: a link to {tmp_path / 'annex' / 'b.jpg'}, which does not exist, so it "
                        f"is left out", f"{labels / 'b.txt'}: a link to {tmp_path / 'annex' / 'b.txt'}, which does not "
                        f"exist, so it is left out"]
    assert [(m.kind, m.path) for m in pr.folder_sources(images)] == [("image", str(images / "a.jpg")),
                                                                    ("error", str(images / "b.jpg"))]


def test_an_image_named_on_a_mac_pairs_with_its_label(tmp_path):
    """macOS writes names decomposed (e + combining accent), most labelling tools composed (é): the same name, which
    was an image without a label file and a label file without an image."""
    make_split_folders(tmp_path, ("train",))
    images, labels = tmp_path / "train" / "images", tmp_path / "train" / "labels"
    cv2.imwrite(str(images / "cafe\u0301.jpg"), np.full((16, 16, 3), 99, np.uint8))
    (labels / "caf\u00e9.txt").write_text("1 0.5 0.5 1 1")
    split, problems, *_ = ern.scan_split("train", images, 2)
    assert problems == [] and split.paths == [str(images / "cafe\u0301.jpg")] and split.labels.tolist() == [1]


@pytest.mark.parametrize("above", ["", "images/fer"])
def test_label_files_beside_the_images_are_read_where_no_labels_folder_is_named(tmp_path, above):
    """Darknet's layout, which Ultralytics reads: train/a.jpg beside train/a.txt, no images/ in the path; or one far
    above it (/data/images/fer/train, where Ultralytics would look for /data/labels/fer/train: "no labels folder")."""
    tmp_path = tmp_path / above
    (tmp_path / "train").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "train" / "a.jpg"), np.full((16, 16, 3), 99, np.uint8))
    (tmp_path / "train" / "a.txt").write_text("1 0.5 0.5 1 1")
    split, problems, *_ = ern.scan_split("train", tmp_path / "train", 2)
    assert problems == [] and split.labels.tolist() == [1] and split.paths == [str(tmp_path / "train" / "a.jpg")]
    (tmp_path / "train" / "obj.names").write_text("a\nb\n")  # Darknet's class list: no stray file
    (tmp_path / "train" / "_darknet.labels").write_text("a\nb\n")  # nor Roboflow's, in each split of its Darknet export
    assert ern.scan_split("train", tmp_path / "train", 2)[1] == []
    (tmp_path / "train" / "a.txt").unlink()  # no labels at all: the folder Ultralytics looks in is named
    (tmp_path / "train" / "classes.txt").write_text("a\nb\n")  # LabelImg's class list, not a label file
    missing = "no label files beside them" if not above else \
        f"no labels folder {tmp_path.parent.parent / 'labels' / 'fer' / 'train'}"
    with pytest.raises(ern.UserError, match=re.escape(missing)):
        ern.scan_split("train", tmp_path / "train", 2)


def test_images_and_labels_folders_below_a_split_folder_are_paired(tmp_path):
    """train/part1/images and train/part1/labels under data.yaml's 'train: train' (a dataset gathered in parts):
    Ultralytics pairs each image with the labels folder beside its own images folder (its last images/ becomes
    labels/), and so does ERN; each image was "without a label file" before, each label file "without an image"."""
    for part, cls in (("part1", 1), ("part2", 0)):
        (tmp_path / "train" / part / "images").mkdir(parents=True)
        (tmp_path / "train" / part / "labels").mkdir()
        cv2.imwrite(str(tmp_path / "train" / part / "images" / "a.jpg"), np.full((16, 16, 3), 99, np.uint8))
        (tmp_path / "train" / part / "labels" / "a.txt").write_text(f"{cls} 0.5 0.5 1 1")
    split, problems, *_ = ern.scan_split("train", tmp_path / "train", 2)
    assert problems == []
    assert dict(zip(split.paths, split.labels.tolist())) == {str(tmp_path / "train" / "part1" / "images" / "a.jpg"): 1,
                                                             str(tmp_path / "train" / "part2" / "images" / "a.jpg"): 0}
    (tmp_path / "train" / "part2" / "labels" / "a.txt").rename(tmp_path / "train" / "part2" / "labels" / "b.txt")
    problems = ern.scan_split("train", tmp_path / "train", 2)[1]
    assert sorted(problems) == [f"{tmp_path / 'train' / 'part2' / 'images' / 'a.jpg'}: no label file (expected "
                                f"{tmp_path / 'train' / 'part2' / 'labels' / 'a.txt'})",
                                f"{tmp_path / 'train' / 'part2' / 'labels' / 'b.txt'}: label file without an image in "
                                f"{tmp_path / 'train'}"]
    (tmp_path / "train" / "part3" / "images").mkdir(parents=True)  # Darknet's layout in a folder named images
    cv2.imwrite(str(tmp_path / "train" / "part3" / "images" / "c.jpg"), np.full((16, 16, 3), 99, np.uint8))
    (tmp_path / "train" / "part3" / "images" / "c.txt").write_text("1 0.5 0.5 1 1")
    split, problems, *_ = ern.scan_split("train", tmp_path / "train", 2)
    assert str(tmp_path / "train" / "part3" / "images" / "c.jpg") in split.paths and len(problems) == 2


def test_read_data_yaml_names_with_string_or_mixed_keys(tmp_path):
    make_split_folders(tmp_path, ("train",))
    write_yaml(tmp_path / "data.yaml", train="train/images", names={"1": "b", "0": "a", 2: "c"})  # JSON-made yamls
    assert ern.read_data_yaml(tmp_path)[0] == ["a", "b", "c"]
    write_yaml(tmp_path / "data.yaml", train="train/images", names={"0": "a", "2": "c"})
    with pytest.raises(ern.UserError, match="names keys must be 0..1"):
        ern.read_data_yaml(tmp_path)


@pytest.mark.parametrize("left_out", ["''", "false", "null", ""])
def test_read_data_yaml_reads_no_split_it_leaves_out_however_written(tmp_path, left_out):
    make_split_folders(tmp_path)
    (tmp_path / "data.yaml").write_text(f"train: train/images\nval: valid/images\ntest: {left_out}\nnames: [a, b]\n")
    _, folders, notes, _ = ern.read_data_yaml(tmp_path)
    assert sorted(folders) == ["train", "val"] and notes == [f"data.yaml names no test split: "
                                                             f"{tmp_path / 'test' / 'images'} is not read"]


def test_read_data_yaml_refuses_a_path_into_another_export_beside_its_own(tmp_path, monkeypatch):
    """Roboflow writes train: ../train/images; a second export unpacked inside the first resolves that to the first
    export's folders, while its own lie beside its yaml."""
    make_split_folders(tmp_path / "v1", ("train", "valid"))
    make_split_folders(tmp_path / "v1" / "v2", ("train", "valid"))
    write_yaml(tmp_path / "v1" / "v2" / "data.yaml", train="../train/images", val="../valid/images", names=["a", "b"])
    with pytest.raises(ern.UserError, match=re.escape(f"{tmp_path / 'v1' / 'train' / 'images'}, outside")):
        ern.read_data_yaml(tmp_path / "v1" / "v2")
    write_yaml(tmp_path / "v1" / "v2" / "data.yaml", path="/content/faces", train="../train/images", names=["a", "b"])
    with pytest.raises(ern.UserError, match="outside"):  # a path: of another machine: the yaml's folder, as above
        ern.read_data_yaml(tmp_path / "v1" / "v2")
    write_yaml(tmp_path / "v1" / "data.yaml", train="../train/images", val="../valid/images", names=["a", "b"])
    assert ern.read_data_yaml(tmp_path / "v1")[1]["train"] == tmp_path / "v1" / "train" / "images"  # the usual case
    # meant, not an accident: an absolute path, a path: of its own (a copy on scratch), a list (a merge), and ~
    outer = tmp_path / "v1" / "train" / "images"
    write_yaml(tmp_path / "v1" / "v2" / "data.yaml", train=str(outer), val="valid/images", names=["a", "b"])
    assert ern.read_data_yaml(tmp_path / "v1" / "v2")[1]["train"] == outer
    write_yaml(tmp_path / "v1" / "v2" / "data.yaml", path=str(tmp_path / "v1"), train="train/images",
               val="valid/images", names=["a", "b"])
    assert ern.read_data_yaml(tmp_path / "v1" / "v2")[1]["train"] == outer
    write_yaml(tmp_path / "v1" / "v2" / "data.yaml", train=["train/images", str(outer)], names=["a", "b"])
    assert ern.read_data_yaml(tmp_path / "v1" / "v2")[1]["train"] == [tmp_path / "v1" / "v2" / "train" / "images",
                                                                       outer]
    monkeypatch.setenv("HOME", str(tmp_path))
    write_yaml(tmp_path / "v1" / "v2" / "data.yaml", path="~/v1", train="train/images", names=["a", "b"])
    assert ern.read_data_yaml(tmp_path / "v1" / "v2")[1]["train"] == outer


def test_a_dataset_path_the_system_refuses_is_one_line(tmp_path):
    """A name too long for the system, or (for a user other than root) a folder this user may not enter: pathlib's
    checks raise these, not "no such file", and they came out as a traceback."""
    long = "x" * 300
    try:
        Path(long).is_dir()
    except OSError:
        pass
    else:
        pytest.skip("this Python's pathlib says False for a name too long, as for one that does not exist")
    with pytest.raises(ern.UserError, match=f"cannot read the dataset: .*{long}.*: File name too long"):
        ern.load_dataset(ern.Config(data_dir=str(tmp_path / long)))
    make_split_folders(tmp_path / "ds", ("train",))
    write_yaml(tmp_path / "ds" / "data.yaml", path=long, train="train/images", names=["a", "b"])
    with pytest.raises(ern.UserError, match=f"cannot read the dataset: .*{long}: File name too long"):
        ern.load_dataset(ern.Config(data_dir=str(tmp_path / "ds")))


def test_a_linked_images_folder_takes_the_labels_beside_the_link(tmp_path):
    """A cluster's images on a big disk, linked into a dataset whose labels were edited locally."""
    big = tmp_path / "big" / "faces"
    big.mkdir(parents=True)
    cv2.imwrite(str(big / "a.png"), np.full((16, 16, 3), 99, np.uint8))
    (tmp_path / "big" / "labels").mkdir()
    (tmp_path / "big" / "labels" / "faces.txt").write_text("0 0.5 0.5 1 1")  # not the labels of this dataset
    (tmp_path / "ds" / "train" / "labels").mkdir(parents=True)
    (tmp_path / "ds" / "train" / "images").symlink_to(big)
    (tmp_path / "ds" / "train" / "labels" / "a.txt").write_text("1 0.5 0.5 1 1")
    write_yaml(tmp_path / "ds" / "data.yaml", train="train/images", names=["a", "b"])
    _, folders, _, _ = ern.read_data_yaml(tmp_path / "ds")
    split, problems, *_ = ern.scan_split("train", folders["train"], 2)
    assert problems == [] and split.labels.tolist() == [1]


def test_read_data_yaml_refuses_a_single_class(tmp_path):
    """One class trained to 100 % accuracy on every split: a face detector's export (names: [face]), not emotions."""
    make_split_folders(tmp_path, ("train",))
    write_yaml(tmp_path / "data.yaml", train="train/images", nc=1, names=["face"])
    with pytest.raises(ern.UserError, match="names lists one class \\('face'\\); a classifier needs two or more"):
        ern.read_data_yaml(tmp_path)


def test_read_data_yaml_refuses_class_names_yaml_read_as_booleans(tmp_path):
    make_split_folders(tmp_path, ("train",))
    (tmp_path / "data.yaml").write_text("train: train/images\nnames: [No, Yes, Maybe]\n")
    with pytest.raises(ern.UserError, match=r"names holds \[False, True\].*quote"):
        ern.read_data_yaml(tmp_path)
    (tmp_path / "data.yaml").write_text("train: train/images\nnames: ['No', 'Yes', Maybe]\n")
    assert ern.read_data_yaml(tmp_path)[0] == ["No", "Yes", "Maybe"]


def test_read_data_yaml_names_the_train_path_it_tried(tmp_path):
    """A relative `path:` is taken from the yaml's folder (Ultralytics takes it from the current folder)."""
    write_yaml(tmp_path / "configs" / "faces.yaml", path="datasets/faces", train="train/images", names=["a", "b"])
    with pytest.raises(ern.UserError) as error:
        ern.read_data_yaml(tmp_path / "configs" / "faces.yaml")
    assert f"its path 'datasets/faces' does not exist ({tmp_path / 'configs' / 'datasets' / 'faces'}: a relative " \
           f"path is taken from the yaml's folder)" in str(error.value)
    assert f"({tmp_path / 'configs' / 'train' / 'images'})" in str(error.value)  # the train path then tried


def test_crop_box_whole_image_is_a_plain_resize():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    for margin in (0.0, 0.1):  # the margin is clamped at the image border
        assert np.array_equal(ern.crop_box(image, (0.5, 0.5, 1.0, 1.0), margin, 32), cv2.resize(image, (32, 32),
                              interpolation=cv2.INTER_AREA))
    square = image[:, :40]
    assert np.array_equal(ern.crop_box(square, (0.5, 0.5, 1.0, 1.0), 0.1, 40), square)


def test_crop_box_sub_box_crops_the_right_region():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (80, 120, 3), dtype=np.uint8)
    # x 60..120, y 20..60 of a 120 x 80 image; at size 40 the rows are kept 1:1
    crop = ern.crop_box(image, (0.75, 0.5, 0.5, 0.5), 0.0, 40)
    assert np.array_equal(crop, cv2.resize(image[20:60, 60:120], (40, 40), interpolation=cv2.INTER_LINEAR))
    # a 40 x 20 box at x 40..80, y 20..40; a margin of 0.25 widens it by a quarter of its size on each side
    crop = ern.crop_box(image, (60 / 120, 30 / 80, 40 / 120, 20 / 80), 0.25, 20)
    assert np.array_equal(crop, cv2.resize(image[15:45, 30:90], (20, 20), interpolation=cv2.INTER_AREA))


def test_pipeline_crops_each_label_box(tmp_path):
    """One image, left half red and right half blue, with a box on each half: each sample holds its half."""
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, :40] = (255, 0, 0)
    image[:, 40:] = (0, 0, 255)
    make_split_folders(tmp_path / "data", ("train",))
    cv2.imwrite(str(tmp_path / "data" / "train" / "images" / "two.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    (tmp_path / "data" / "train" / "labels" / "two.txt").write_text("1 0.75 0.5 0.4 0.8\n0 0.25 0.5 0.4 0.8")
    split, problems, *_ = ern.scan_split("train", tmp_path / "data" / "train" / "images", 2)
    assert problems == []
    cfg = ern.Config(cache_dir=str(tmp_path / "cache"), image_size=32, crop_margin=0.1)
    ok, problems = ern.load_split_pixels(split, cfg)
    assert ok.all() and problems == []
    assert split.labels.tolist() == [1, 0]
    assert split.images.shape == (2, 3, 32, 32)
    blue, red = split.images[0], split.images[1]
    assert (blue[2] == 255).all() and (blue[:2] == 0).all()
    assert (red[0] == 255).all() and (red[1:] == 0).all()


# ---------------------------------------------------------------------------------------------
# Model: attention blocks, emotion context, parameter count, ablations
# ---------------------------------------------------------------------------------------------

def positive_input(shape=(2, 32, 6, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) + 0.1


@pytest.mark.parametrize("make", [lambda: ern.ChannelAttention(32, reduction=4), ern.SpatialAttention,
                                  lambda: ern.DualAttention(32, reduction=4, residual=False)],
                         ids=["ChannelAttention", "SpatialAttention", "DualAttention"])
def test_attention_preserves_shape_and_gates_in_unit_interval(make):
    block = make().eval()  # built in the test, from torch_seeded's state, not at collection
    x = positive_input()
    with torch.no_grad():
        out = block(x)
    assert out.shape == x.shape
    gate = out / x
    assert (gate > 0).all() and (gate < 1).all()
    assert gate.std() > 1e-4  # a gate that depends on the input, not a constant


def test_channel_attention_gates_channels_spatial_attention_gates_positions():
    x = positive_input()
    with torch.no_grad():
        channel_gate = ern.ChannelAttention(32, reduction=4)(x) / x
        spatial_gate = ern.SpatialAttention().eval()(x) / x
    # one gate per (sample, channel), the same at every position; one per (sample, position) for all channels
    assert torch.allclose(channel_gate, channel_gate[:, :, :1, :1].expand_as(x), atol=1e-6)
    assert torch.allclose(spatial_gate, spatial_gate[:, :1].expand_as(x), atol=1e-6)
    assert not torch.allclose(channel_gate, channel_gate[:, :1].expand_as(x), atol=1e-6)
    assert not torch.allclose(spatial_gate, spatial_gate[:, :, :1, :1].expand_as(x), atol=1e-6)


def test_dual_attention_switches():
    x = positive_input()
    off = ern.DualAttention(32, channel=False, spatial=False)
    assert isinstance(off.channel, nn.Identity) and isinstance(off.spatial, nn.Identity)
    assert torch.equal(off(x), x)
    assert ern.count_parameters(off) == 0
    only_spatial = ern.DualAttention(32, channel=False)
    assert isinstance(only_spatial.channel, nn.Identity) and isinstance(only_spatial.spatial, ern.SpatialAttention)
    only_channel = ern.DualAttention(32, spatial=False)
    assert isinstance(only_channel.channel, ern.ChannelAttention) and isinstance(only_channel.spatial, nn.Identity)


def test_residual_dual_attention_scales_by_one_plus_the_gate():
    dual = ern.DualAttention(32, reduction=4).eval()  # residual by default
    x = positive_input()
    with torch.no_grad():
        scale = dual(x) / x
        assert torch.allclose(dual(x), x + dual.spatial(dual.channel(x)))
    assert (scale > 1).all() and (scale < 2).all() and scale.std() > 1e-4
    assert not ern.DualAttention(32, channel=False, spatial=False).residual  # nothing on: the identity, not 2x


def test_dual_attention_is_channel_then_spatial():
    dual = ern.DualAttention(32, reduction=4, residual=False).eval()
    x = positive_input()
    with torch.no_grad():
        out = dual(x)
        assert torch.allclose(out, dual.spatial(dual.channel(x)))
        assert not torch.allclose(out, dual.channel(x), atol=1e-4)
        assert not torch.allclose(out, dual.channel(dual.spatial(x)), atol=1e-6)


def test_context_similarity_is_cosine_over_temperature():
    torch.manual_seed(0)
    ctx = ern.EmotionContext(dim=6, num_classes=4, temperature=0.2)
    f = torch.randn(3, 6)
    s = ctx.context_similarity(f).detach().numpy()
    fn, pn = f.numpy().astype(np.float64), ctx.prototypes.detach().numpy().astype(np.float64)
    for i in range(3):
        for k in range(4):
            cos = sum(fn[i, d] * pn[k, d] for d in range(6)) / (math.sqrt((fn[i] ** 2).sum()) * math.sqrt((pn[k] ** 2).sum()))
            assert s[i, k] == pytest.approx(cos / 0.2, rel=1e-5, abs=1e-5)


def test_context_vector_is_expected_prototype():
    """forward's s is the cosine over tau and its c the prototypes weighted by softmax(s), both recomputed in numpy."""
    torch.manual_seed(1)
    ctx = ern.EmotionContext(dim=5, num_classes=3, temperature=0.5)
    f = torch.randn(4, 5)
    c, s = ctx(f)
    fn, p = f.numpy().astype(np.float64), ctx.prototypes.detach().numpy().astype(np.float64)
    # s and q from numpy, not from the module: cosine of f and each prototype over tau, then its softmax
    s_np = (fn / np.linalg.norm(fn, axis=1, keepdims=True)) @ (p / np.linalg.norm(p, axis=1, keepdims=True)).T / 0.5
    assert np.allclose(s.detach().numpy(), s_np, atol=1e-5)
    for i in range(4):
        q = np.exp(s_np[i] - s_np[i].max())
        q /= q.sum()
        expected = sum(q[k] * p[k] for k in range(3))
        assert np.allclose(c[i].detach().numpy(), expected, atol=1e-6)


def test_classifier_sees_features_and_context_vector():
    """ERN's context logits are cos(f, P) / tau of its own features (numpy), and its logits the classifier on [f, c]:
    other prototypes, the same features, other logits."""
    torch.manual_seed(2)
    model = ern.build_model(ern.Config(width=0.125, blocks="1,1,1,1"), 8).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits, s, f = model(x)
        c, _ = model.context(f)
        fn, p = f.numpy().astype(np.float64), model.context.prototypes.detach().numpy().astype(np.float64)
        cosine = (fn / np.linalg.norm(fn, axis=1, keepdims=True)) @ (p / np.linalg.norm(p, axis=1, keepdims=True)).T
        assert np.allclose(s.numpy(), cosine / model.context.temperature, atol=1e-4)  # the context logits: cos / tau
        assert torch.allclose(logits, model.classifier(torch.cat([f, c], 1)), atol=1e-6)
        model.context.prototypes.mul_(-1)  # the same features, another context vector: other logits
        logits_flipped, _, f_again = model(x)
        assert torch.allclose(f_again, f)
        assert not torch.allclose(logits_flipped, logits, atol=1e-4)


def test_a_checkpoint_of_a_removed_option_is_refused_naming_it_and_the_commit():
    """Options removed because they measured nothing: a checkpoint that used one is refused in one line naming the
    option and the last commit that had it; one that left them at the surviving value (or predates them) loads."""
    cfg = ern.Config(width=0.125, blocks="1,1,1,1")
    model = ern.build_model(cfg, 8)
    ckpt = {"config": {**dataclasses.asdict(cfg), "context_fusion": "concat", "affinity_weight": 0.0,
                       "optimizer": "adamw"},
            "class_names": [str(k) for k in range(8)], "image_size": cfg.image_size, "model": model.state_dict()}
    ern.model_from_checkpoint(ckpt)
    for option, value, commit in (("context_fusion", "logits", "da10df0"), ("prototype_init", "imprint", "da10df0"),
                                  ("context_target", "teacher", "da10df0"), ("affinity_weight", 0.1, "da10df0"),
                                  ("logit_adjustment", 1.0, "da10df0"), ("mixup", 0.2, "bfdced2"), ("cutmix", 1.0, "bfdced2"),
                                  ("optimizer", "muon", "1bd07fe"), ("ema_decay", 0.999, "8e63f05"),
                                  ("attention_stages", "3,4", "27e2a2f"), ("low_res", 32, "e43f7a9")):
        bad = {**ckpt, "config": {**ckpt["config"], option: value}}
        with pytest.raises(ern.UserError, match=rf"trained with --{option}={value} \(removed after commit {commit}\)"):
            ern.model_from_checkpoint(bad)
    both = {**ckpt, "config": {**ckpt["config"], "cutmix": 1.0, "logit_adjustment": 1.0}}  # the older commit has both
    with pytest.raises(ern.UserError, match=r"--logit_adjustment=1.0, --cutmix=1.0 \(removed after commit da10df0\)"):
        ern.model_from_checkpoint(both)


def test_a_checkpoint_from_before_attention_residual_gates_as_it_was_trained():
    """Commit 515d170 added attention_residual, default x * (1 + g); the checkpoints before it gated x * g and lack
    the field: they load as x * g (they loaded as x * (1 + g) before, the same weights computing another network)."""
    cfg = ern.Config(width=0.125, blocks="1,1,1,1")
    config = dataclasses.asdict(cfg)
    assert ern.config_from_checkpoint({"config": config}).attention_residual is True
    weights = ern.build_model(cfg, 8).state_dict()  # the gating adds no weights: one state_dict fits both networks
    current = {"config": dict(config), "class_names": [str(k) for k in range(8)], "image_size": 32, "model": weights}
    del config["attention_residual"]
    assert ern.config_from_checkpoint({"config": config}).attention_residual is False
    old = {**current, "config": config}
    x = positive_input((2, 8, 6, 6))  # the first stage's 8 channels at width 0.125
    for ckpt, residual in ((old, False), (current, True)):  # what the network built from the checkpoint computes
        model, _ = ern.model_from_checkpoint(ckpt)
        duals = [m for m in model.modules() if isinstance(m, ern.DualAttention)]
        assert len(duals) == 4 and all(d.residual is residual for d in duals)
        d = duals[0].eval()
        with torch.no_grad():
            gated = d.spatial(d.channel(x))
            assert torch.allclose(d(x), x + gated if residual else gated)  # x * (1 + g), or x * g
            assert not torch.allclose(d(x), gated if residual else x + gated)


def test_default_model_has_27_5_million_parameters():
    """The exact count from the architecture on paper: a 40-channel 3x3 stem; stages of 80, 160, 320, 640 channels
    with 2, 4, 7, 2 basic blocks (two 3x3 convolutions with BatchNorm; a 1x1 projection where the shape changes);
    after each stage CBAM attention (a bottleneck MLP of max(c / 16, 8) hidden units, no biases; a 7x7 convolution
    over 2 maps with a BatchNorm); 8 prototypes of 640; a linear classifier on [f, c]."""
    def bn(c):
        return 2 * c  # weight and bias (running statistics are buffers)

    total, cin = 3 * 40 * 9 + bn(40), 40
    for cout, blocks in zip((80, 160, 320, 640), (2, 4, 7, 2)):
        for i in range(blocks):
            c_in = cin if i == 0 else cout
            total += c_in * cout * 9 + bn(cout) + cout * cout * 9 + bn(cout)
            if i == 0:
                total += c_in * cout + bn(cout)
        hidden = max(cout // 16, 8)
        total += 2 * cout * hidden + 2 * 49 + bn(1)
        cin = cout
    total += 8 * 640 + (2 * 640) * 8 + 8
    n = ern.count_parameters(ern.build_model(ern.Config(), 8))
    assert n == total, f"{n:,} parameters, {total:,} on paper"
    assert abs(n - 27.5e6) <= 0.01 * 27.5e6


@pytest.mark.parametrize("switch", ["none", "channel_attention", "spatial_attention", "context", "all"])
def test_ablations_build_and_run(switch):
    off = {"none": {}, "all": dict(channel_attention=False, spatial_attention=False, context=False)}.get(
        switch, {switch: False})
    cfg = ern.Config(width=0.125, blocks="1,1,1,1", **off)
    full = ern.build_model(ern.Config(width=0.125, blocks="1,1,1,1"), 8)
    model = ern.build_model(cfg, 8).eval()
    kinds = {type(m) for m in model.modules()}
    assert (ern.ChannelAttention in kinds) == cfg.channel_attention
    assert (ern.SpatialAttention in kinds) == cfg.spatial_attention
    assert (model.context is not None) == cfg.context
    assert (ern.count_parameters(model) < ern.count_parameters(full)) == bool(off)
    with torch.no_grad():
        logits, s, f = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 8) and f.shape == (2, 80)  # the last stage's 640 channels x 0.125
    assert (s is None) == (not cfg.context)
    if s is not None:
        assert s.shape == (2, 8)


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------

def random_distribution(b, k, gen):
    return torch.softmax(torch.randn(b, k, generator=gen) * 2, 1)


def test_kl_is_nonnegative():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        target = random_distribution(16, 7, gen)
        _, _, kl = ern.hybrid_loss(torch.randn(16, 7, generator=gen), torch.randn(16, 7, generator=gen) * 5, target, 0.5)
        assert kl.item() >= -1e-6
    target = ern.smooth_targets(torch.arange(7), 7, 0.1)
    _, _, kl = ern.hybrid_loss(torch.randn(7, 7, generator=gen), torch.randn(7, 7, generator=gen), target, 0.5)
    assert kl.item() > 0.01  # and strictly positive when q differs from t


def test_kl_is_zero_when_q_equals_target():
    gen = torch.Generator().manual_seed(1)
    for target in (random_distribution(8, 5, gen), ern.smooth_targets(torch.tensor([0, 4, 2]), 5, 0.1)):
        total, ce, kl = ern.hybrid_loss(torch.randn(len(target), 5, generator=gen), target.log(), target, 0.5)
        assert abs(kl.item()) < 1e-6
        assert total.item() == pytest.approx(ce.item(), abs=1e-6)


def test_hybrid_loss_matches_hand_computation():
    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    context = np.array([[1.0, -1.0, 0.0], [3.0, 0.0, -2.0]])
    labels, eps, lam, k = [0, 2], 0.1, 0.7, 3
    ce_terms, kl_terms = [], []
    for i, y in enumerate(labels):
        t = [(1 - eps) * (j == y) + eps / k for j in range(k)]
        log_p = [logits[i, j] - math.log(sum(math.exp(v) for v in logits[i])) for j in range(k)]
        log_q = [context[i, j] - math.log(sum(math.exp(v) for v in context[i])) for j in range(k)]
        ce_terms.append(-sum(t[j] * log_p[j] for j in range(k)))
        kl_terms.append(sum(t[j] * (math.log(t[j]) - log_q[j]) for j in range(k)))
    ce, kl = np.mean(ce_terms), np.mean(kl_terms)
    target = ern.smooth_targets(torch.tensor(labels), k, eps)
    total_t, ce_t, kl_t = ern.hybrid_loss(torch.tensor(logits, dtype=torch.float32),
                                          torch.tensor(context, dtype=torch.float32), target, lam)
    assert ce_t.item() == pytest.approx(ce, rel=1e-5)
    assert kl_t.item() == pytest.approx(kl, rel=1e-5)
    assert total_t.item() == pytest.approx(ce + lam * kl, rel=1e-5)


def test_kl_term_is_pytorchs_kl_div_of_target_and_context_and_not_symmetric():
    """KL(t || q) with q = softmax(s): F.kl_div(log q, t, reduction="batchmean"); swapping the roles changes it."""
    gen = torch.Generator().manual_seed(2)
    target = ern.smooth_targets(torch.tensor([0, 3, 5, 1]), 6, 0.1)
    context = torch.randn(4, 6, generator=gen) * 3
    _, _, kl = ern.hybrid_loss(torch.randn(4, 6, generator=gen), context, target, 0.5)
    assert kl.item() == pytest.approx(F.kl_div(context.log_softmax(1), target, reduction="batchmean").item(), rel=1e-5)
    reverse = F.kl_div(target.log(), context.softmax(1), reduction="batchmean").item()  # KL(q || t)
    assert abs(kl.item() - reverse) > 0.1


@pytest.mark.parametrize("warmup_epochs", [2.0, 100.0])
def test_scheduler_warms_up_peaks_and_anneals_to_the_floor(warmup_epochs):
    """Start at 1 % of lr, peak lr at the end of warm-up, lr * min_lr_ratio after the last step (cosine between);
    a warm-up longer than half the run is clamped to half of it."""
    cfg = ern.Config(epochs=10, lr=1e-3, min_lr_ratio=0.05, warmup_epochs=warmup_epochs)
    steps, total = 7, 70
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = ern.make_scheduler(optimizer, cfg, steps)
    lrs = [scheduler.get_last_lr()[0]]
    for _ in range(total):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    warmup = 14 if warmup_epochs == 2.0 else 35
    assert lrs[0] == pytest.approx(1e-5)
    assert lrs[warmup] == pytest.approx(1e-3) and max(lrs) == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup + 1]))  # rising through the warm-up
    assert lrs[total] == pytest.approx(5e-5)
    middle = warmup + (total - warmup) // 2 if (total - warmup) % 2 == 0 else None
    if middle is not None:  # halfway through the cosine: half way between peak and floor
        assert lrs[middle] == pytest.approx((1e-3 + 5e-5) / 2)
    # step 50, inside the cosine for both warm-ups: (50 - 14) / 56 and (50 - 35) / 35 of the way from peak to floor
    cosine = 0.05 + 0.95 * (1 + math.cos(math.pi * (50 - warmup) / (total - warmup))) / 2
    assert lrs[50] == pytest.approx(1e-3 * cosine)
    assert abs(lrs[50] - 1e-3 * (1 - 0.95 * (50 - warmup) / (total - warmup))) > 1e-5  # a linear decay would miss it


def test_class_weighted_cross_entropy():
    """Each sample's weight is its target's expected class weight t . w: w_y for a one-hot target."""
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [1.0, 1.0, -3.0]])
    labels, w = [0, 2, 1], [0.5, 1.0, 3.0]
    ce = [F.cross_entropy(logits[i:i + 1], torch.tensor([y])).item() for i, y in enumerate(labels)]
    _, ce_w, _ = ern.hybrid_loss(logits, None, ern.smooth_targets(torch.tensor(labels), 3, 0.0), 0.5,
                                 class_weights=torch.tensor(w))
    assert ce_w.item() == pytest.approx(sum(w[y] * c for y, c in zip(labels, ce)) / sum(w[y] for y in labels), rel=1e-5)
    assert ce_w.item() != pytest.approx(np.mean(ce), rel=1e-3)
    target = ern.smooth_targets(torch.tensor(labels), 3, 0.3)
    sample_w = [sum(target[i, j].item() * w[j] for j in range(3)) for i in range(3)]
    ce_s = [-(target[i] * F.log_softmax(logits[i], 0)).sum().item() for i in range(3)]
    _, ce_w, _ = ern.hybrid_loss(logits, None, target, 0.5, class_weights=torch.tensor(w))
    assert ce_w.item() == pytest.approx(sum(a * b for a, b in zip(sample_w, ce_s)) / sum(sample_w), rel=1e-5)


def test_hybrid_loss_without_context_is_cross_entropy():
    gen = torch.Generator().manual_seed(2)
    logits, target = torch.randn(6, 4, generator=gen), random_distribution(6, 4, gen)
    total, ce, kl = ern.hybrid_loss(logits, None, target, 0.5)
    assert kl.item() == 0.0
    assert total.item() == ce.item()
    assert ce.item() == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-6)  # PyTorch's, on soft targets


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_matches_pytorch(eps):
    gen = torch.Generator().manual_seed(3)
    logits, labels = torch.randn(10, 8, generator=gen), torch.randint(0, 8, (10,), generator=gen)
    target = ern.smooth_targets(labels, 8, eps)
    assert torch.allclose(target.sum(1), torch.ones(10))
    _, ce, _ = ern.hybrid_loss(logits, torch.randn(10, 8, generator=gen), target, 0.5)
    assert ce.item() == pytest.approx(F.cross_entropy(logits, labels, label_smoothing=eps).item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Training: a tiny model memorizes a small batch
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def one_thread():
    """Tiny tensors: a second thread only adds synchronization, and on a busy 2-core machine it waits for a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cpu_autocasts_only_where_bf16_is_native(monkeypatch):
    cpu, on, off = torch.device("cpu"), ern.Config(), ern.Config(amp=False)
    monkeypatch.setattr(ern, "cpu_has_bf16", lambda: True)
    assert ern.autocast_dtype(on, cpu) is torch.bfloat16 and ern.autocast_dtype(off, cpu) is None
    monkeypatch.setattr(ern, "cpu_has_bf16", lambda: False)  # bf16 only emulated: the script stays in float32
    assert ern.autocast_dtype(on, cpu) is None
    assert ern.arithmetic(on, cpu) == {"autocast": None, "channels_last": True}  # the layout: channels_last either way


def test_bf16_counts_as_native_only_where_onednn_may_use_it(monkeypatch):
    """ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16 (each level oneDNN names) makes bf16 emulated, whatever the CPU;
    at or above it (or unset), the CPU's own answer, here forced both ways through torch's probes."""
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)  # oneDNN's older name, read where the new one is empty
    for native in (False, True):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        for cap, expected in (("avx2", False), ("AVX512_CORE_VNNI", False), ("AVX2_VNNI_2", False),
                              ("AVX512_CORE_BF16", native), ("AVX512_CORE_AMX", native), ("", native)):
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
            assert ern.cpu_has_bf16() is expected, (cap, native)


@pytest.mark.parametrize("amp", [False, True])
def test_tiny_model_overfits_a_small_batch(tiny_dataset, tmp_path, one_thread, amp, monkeypatch):
    """In float32, and in the CPU's bf16 autocast (forced where bf16 is only emulated: slower, not wrong), channels_last."""
    monkeypatch.setattr(ern, "cpu_has_bf16", lambda: amp)
    cfg = ern.Config(data_dir=str(tiny_dataset), cache_dir=str(tmp_path / "cache"), image_size=32, width=0.125,
                     blocks="1,1,1,1", batch_size=16, epochs=80, lr=3e-3, warmup_epochs=0, dropout=0.0,
                     label_smoothing=0.0, amp=amp, **NO_AUGMENTATION)
    _, splits, _ = ern.load_dataset(cfg, splits_wanted=("train",))
    train = splits["train"]
    pick = np.concatenate([np.flatnonzero(train.labels == c)[:2] for c in range(8)])  # 2 faces per class
    x, y = torch.from_numpy(np.ascontiguousarray(train.images[pick])), torch.from_numpy(train.labels[pick])
    mean, std = ern.dataset_normalization(x.numpy())
    torch.manual_seed(0)
    model = ern.place_model(ern.build_model(cfg, 8), cfg, torch.device("cpu"))
    assert ern.arithmetic(cfg, torch.device("cpu")) == {"autocast": "bfloat16" if amp else None, "channels_last": True}
    optimizer = ern.make_optimizer(model, cfg)
    scheduler = ern.make_scheduler(optimizer, cfg, steps_per_epoch=1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    history = [ern.train_one_epoch(model, x, y, mean, std, optimizer, scheduler, scaler, cfg, epoch, num_classes=8)
               for epoch in range(1, cfg.epochs + 1)]  # one full-batch step per epoch
    assert history[-1]["train_loss"] < 0.1 * history[0]["train_loss"], (history[0], history[-1])
    out = ern.run_inference(model, x.numpy(), mean, std, torch.device("cpu"), cfg, tta=False)
    assert out["logits"].dtype == torch.float32 and (out["logits"].argmax(1) == y).all()


def views_oracle(x, shift, flip, zoom=0.0):
    """An independent oracle of the test-time views of float32 images: with zoom, OpenCV's bilinear enlargement of
    the central crop; with shift, numpy's edge padding of each view, each shift cut out of it; then mirrors."""
    size = x.shape[-1]
    views = [x]
    if zoom:
        cut = {(16, 0.75): 2, (32, 0.9): 2}[size, zoom]  # by hand: the crop 12 px of 16, 28 of 32, centred
        crops = [np.ascontiguousarray(im[:, cut:size - cut, cut:size - cut].transpose(1, 2, 0)) for im in x]
        views.append(np.stack([cv2.resize(c, (size, size), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)
                               for c in crops]))
    if shift:
        padded = [np.pad(v, ((0, 0), (0, 0), (shift, shift), (shift, shift)), mode="edge") for v in views]
        views += [p[:, :, shift + dy:shift + dy + size, shift + dx:shift + dx + size]
                  for p in padded for dx, dy in ((shift, 0), (-shift, 0), (0, shift), (0, -shift))]
        assert (views[len(padded)][..., :-shift] == x[..., shift:]).all()  # the first shift: the content moved left
    return views + [v[..., ::-1] for v in views] if flip else views


@pytest.mark.parametrize("flip, shift, zoom, count", [(False, 2, 0.0, 5), (True, 2, 0.0, 10), (True, 0, 0.75, 4),
                                                      (True, 2, 0.75, 20)])
def test_test_time_views_average_the_logits_of_the_zoomed_shifted_and_mirrored_faces(one_thread, flip, shift, zoom,
                                                                                       count):
    cfg = ern.Config(image_size=16, width=0.125, blocks="1,1", tta_flip=flip, tta_shift=shift, tta_zoom=zoom,
                     amp=False, channels_last=False, eval_batch_size=3)
    torch.manual_seed(0)
    model = ern.build_model(cfg, 4).eval()
    x = np.random.default_rng(0).integers(0, 256, (5, 3, 16, 16), dtype=np.uint8)
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    views = views_oracle(x.astype(np.float32), shift, flip, zoom)
    assert ern.tta_view_count(cfg) == len(views) == count
    with torch.no_grad():
        each = [model(ern.standardize(torch.from_numpy(np.ascontiguousarray(v)), mean, std))[0] for v in views]
    got = ern.run_inference(model, x, mean, std, torch.device("cpu"), cfg)["logits"]
    assert got == pytest.approx((sum(each) / len(each)).numpy(), abs=1e-5)
    assert (got - each[0]).abs().max() > 1e-3  # the views differ, so the check above tells
    assert ern.run_inference(model, x, mean, std, torch.device("cpu"), cfg, tta=False)["logits"] == pytest.approx(
        each[0].numpy(), abs=1e-5)


def test_a_few_faces_views_go_through_the_model_together(one_thread):
    """mean_over_views: a batch's test-time views in calls of at most TTA_IMAGES_PER_CALL images (one face's twenty
    views: one call, 7x faster than twenty), a large batch's a view a call, and with per_call (an ONNX graph: every
    view) that many views a call whatever the batch; each output the mean of what one call a view gives."""
    calls = []
    for context in (True, False):  # without the context module: no context logits (None) across two calls
        torch.manual_seed(0)
        model = ern.build_model(ern.Config(image_size=16, width=0.125, blocks="1,1", context=context), 4).eval()
        model.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
        for n, per_call, sizes in ((1, None, [20]), (3, None, [60]), (4, None, [64, 16]), (40, None, [40] * 20),
                                   (100, None, [100] * 20), (1, 20, [20]), (100, 20, [2000]), (5, 8, [40, 40, 20])):
            views = ern.tta_views(torch.randn(n, 3, 16, 16), True, 2, 0.75)
            for channels_last in (False, True):
                calls.clear()
                with torch.no_grad():
                    got = ern.mean_over_views(model, views, channels_last, per_call)
                    assert calls == sizes
                    each = [model(v) for v in views]
                assert (got[0] - each[0][0]).abs().max() > 1e-3  # the views differ, so the checks below tell
                assert (got[1] is None) == (each[0][1] is None) == (not context)  # the context logits
                for mean, outs in zip(got, zip(*each)):
                    if mean is not None:
                        assert mean.numpy() == pytest.approx((sum(outs) / len(outs)).numpy(), abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

def test_parse_args_overrides():
    cfg, action, overrides = ern.parse_args(["--epochs=3", "--lr=0.01", "--context=false", "--blocks=1,1"])
    assert action == ern.Action()
    assert overrides == {"epochs": 3, "lr": 0.01, "context": False, "blocks": "1,1"}
    assert (cfg.epochs, cfg.lr, cfg.context, cfg.blocks) == (3, 0.01, False, "1,1")
    assert type(cfg.batch_size) is int and type(cfg.epochs) is float  # epochs: a fraction ends the last pass early
    assert cfg.batch_size == ern.Config().batch_size
    assert ern.parse_args(["--tta_flip"])[0].tta_flip is True  # a bare flag means true


def test_parse_args_unknown_field_suggests_closest():
    with pytest.raises(ern.UserError, match=r"unknown field --epoch\b.*did you mean --epochs\?"):
        ern.parse_args(["--epoch=3"])
    with pytest.raises(ern.UserError, match="did you mean --context_weight"):
        ern.parse_args(["--context_wieght=0.1"])


@pytest.mark.parametrize("arg, message", [("--epochs=three", "--epochs expects float, got 'three'"),
                                          ("--batch_size=2.5", "--batch_size expects int, got '2.5'"),
                                          ("--lr=fast", "--lr expects float, got 'fast'"),
                                          ("--context=maybe", "--context expects true or false, got 'maybe'"),
                                          ("--epochs", "--epochs needs a value: --epochs=...")])
def test_parse_args_wrong_type(arg, message):
    """Each bad value is named with its own field, the type it needs and what was typed."""
    with pytest.raises(ern.UserError, match=re.escape(message)):
        ern.parse_args([arg])


@pytest.mark.parametrize("bad, message", [(dict(epochs=0), "--epochs must be > 0"),
                                          (dict(context_weight=-0.1), "--context_weight must be >= 0"),
                                          (dict(image_size=16), "--image_size must be >= 32"),
                                          (dict(image_size=1), "--image_size must be >= 32"),  # not --tta_shift's
                                          (dict(stem_stride=3), "--stem_stride must be 1 or 2"),
                                          (dict(blocks="1,1,1,1,1"), "--image_size must be >= 64"),
                                          (dict(tta_shift=-1), "--tta_shift must be in"),
                                          (dict(tta_shift=16), "--tta_shift must be in"),
                                          (dict(tta_zoom=1.0), "--tta_zoom must be"),
                                          (dict(tta_zoom=0.3), "--tta_zoom must be"),
                                          (dict(tta_zoom=0.99), "--tta_zoom must be")])
def test_validate_config_refuses(bad, message):
    base = dict(image_size=32, blocks="1,1,1,1")
    ern.validate_config(ern.Config(**base))  # the same config without the bad value passes
    with pytest.raises(ern.UserError, match=message):
        ern.validate_config(ern.Config(**{**base, **bad}))


def test_bad_argument_exits_with_one_error_line(tmp_path):
    proc = run_script("--epoch=3", cwd=tmp_path, check=False, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error:") and "--epochs" in errors[0], proc.stderr
    assert not (tmp_path / "outputs").exists()


# ---------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------

MEAN, STD = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.25, 0.2, 0.3])


def asymmetric_batch(n=2, size=16):
    """n copies of one image that differs from its mirror and its rotations."""
    g = torch.Generator().manual_seed(0)
    one = torch.randint(0, 256, (1, 3, size, size), generator=g, dtype=torch.uint8)
    return one.expand(n, -1, -1, -1).contiguous()


def test_augment_batch_keeps_shape_and_is_float():
    x = torch.randint(0, 256, (5, 3, 24, 24), dtype=torch.uint8)
    out = ern.augment_batch(x, MEAN, STD, ern.Config())
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, ern.standardize(x, MEAN, STD))


def test_augment_batch_off_is_normalize():
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    out = ern.augment_batch(x, MEAN, STD, ern.Config(**NO_AUGMENTATION))
    assert torch.equal(out, ern.standardize(x, MEAN, STD))


def test_augment_batch_flip_is_per_sample():
    """With only flips on, each sample comes out as itself or its exact mirror, drawn independently."""
    x = asymmetric_batch(n=8)
    plain = ern.standardize(x, MEAN, STD)
    cfg = ern.Config(**{**NO_AUGMENTATION, "aug_flip": 0.5})
    torch.manual_seed(0)
    flips = []
    for _ in range(5):
        out = ern.augment_batch(x, MEAN, STD, cfg)
        for i in range(len(x)):
            if torch.allclose(out[i], plain[i], atol=1e-5):
                flips.append(False)
            else:
                assert torch.allclose(out[i], plain[i].flip(2), atol=1e-5)
                flips.append(True)
    assert 0.2 < np.mean(flips) < 0.8
    assert any(len(set(flips[j:j + 8])) == 2 for j in range(0, len(flips), 8))  # mixed within one batch


@pytest.mark.parametrize("field", ["aug_rotate", "aug_scale", "aug_translate", "aug_brightness", "aug_contrast"])
def test_augment_batch_randomness_is_per_sample(field):
    x = asymmetric_batch(n=2)
    cfg = ern.Config(**{**NO_AUGMENTATION, field: 30.0 if field == "aug_rotate" else 0.3})
    torch.manual_seed(0)
    out = ern.augment_batch(x, MEAN, STD, cfg)
    assert not torch.allclose(out[0], out[1], atol=1e-3)
    assert not torch.allclose(out[0], ern.standardize(x, MEAN, STD)[0], atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Regressions from review: label and box edge cases, --evaluate's configuration, predict
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", ["nan", "inf", "-inf", "2.5"])
def test_parse_label_file_reports_non_integer_class_ids(tmp_path, cls):
    label = tmp_path / "a.txt"
    label.write_text(f"{cls} 0.5 0.5 1 1\n3 0.5 0.5 1 1")
    boxes, problems, _ = ern.parse_label_file(label, 8)
    assert boxes == [(3, 0.5, 0.5, 1.0, 1.0)]
    assert len(problems) == 1 and f"{label}:1" in problems[0] and "class id" in problems[0]


def test_crop_box_on_the_image_edge_keeps_a_pixel():
    image = np.zeros((20, 30, 3), np.uint8)
    image[:, -1] = 200  # last column
    crop = ern.crop_box(image, (1.0, 0.5, 0.001, 0.5), 0.0, 8)
    assert crop.shape == (8, 8, 3) and (crop == 200).all()


def test_images_sharing_a_label_stem_are_reported(tiny_dataset, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(tiny_dataset / "train" / "images", images)
    shutil.copytree(tiny_dataset / "train" / "labels", tmp_path / "labels")
    first = sorted(images.iterdir())[0]
    twin = first.with_suffix(".bmp")
    cv2.imwrite(str(twin), cv2.imread(str(first)))
    split, problems, *_ = ern.scan_split("train", images, 8)
    assert len(split) == len(list(images.iterdir())) - 1
    shared = [p for p in problems if "shares its label file" in p]
    assert len(shared) == 1 and str(twin) in shared[0] and str(first) in shared[0]


def test_evaluate_refuses_architecture_overrides(trained, tiny_dataset, tmp_path):
    run_dir, _ = trained
    proc = run_script(f"--evaluate={run_dir / 'best_emotion_model.pth'}", f"--data_dir={tiny_dataset}", "--width=0.5",
                      f"--output_dir={tmp_path / 'eval'}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "--width" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("settings", [{}, {"tta_flip": False, "tta_shift": 1}])
def test_predict_agrees_with_evaluation_on_the_box_crops(trained, tiny_dataset, settings):
    """EmotionPredictor on whole images equals run_inference on the same whole-image crops (same TTA, precision,
    weights); settings given to it (as predict.py takes them from the command line) replace the checkpoint's: the
    checkpoint's are a mirror and no shifts, and these views change the probabilities by more than the tolerance."""
    run_dir, _ = trained
    ckpt = ern.load_checkpoint(run_dir / "best_emotion_model.pth")
    model, saved = ern.model_from_checkpoint(ckpt)
    assert (saved.tta_flip, saved.tta_shift) == (True, 0)  # settings differ from the checkpoint's
    cfg = dataclasses.replace(saved, **settings)
    files = sorted((tiny_dataset / "test" / "images").iterdir())[:6]
    predictor = pr.EmotionPredictor(run_dir / "best_emotion_model.pth", "cpu", detect_faces=False, **settings)
    crops = np.stack([ern.crop_box(ern.decode_image(f)[0], (0.5, 0.5, 1.0, 1.0), cfg.crop_margin, cfg.image_size)
                      .transpose(2, 0, 1) for f in files])
    mean, std = (torch.tensor(ckpt["normalization"][k]) for k in ("mean", "std"))
    probs = ern.run_inference(model, crops, mean, std, torch.device("cpu"), cfg)["logits"].softmax(1)
    if settings:  # a predictor that ignored them would give the checkpoint's views' numbers, this far off
        own = ern.run_inference(model, crops, mean, std, torch.device("cpu"), saved)["logits"].softmax(1)
        assert (own - probs).abs().max() > 1e-4
    for f, p in zip(files, probs):
        [face] = predictor(ern.decode_image(f)[0])
        assert face["emotion"] == ckpt["class_names"][int(p.argmax())] and face["face_detected"] is False
        assert list(face["probabilities"].values()) == pytest.approx(p.tolist(), abs=1e-5)


def test_cache_is_rebuilt_when_a_file_changes_and_reused_when_none_does(tiny_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    cfg = ern.Config(data_dir=str(data), image_size=32, cache_dir=str(tmp_path / "cache"))
    images = data / "train" / "images"

    def load():
        split, problems, *_ = ern.scan_split("train", images, 8)
        ok, decode_problems = ern.load_split_pixels(split, cfg)
        assert ok.all() and not problems and not decode_problems
        return split

    first = load()
    cached = sorted((tmp_path / "cache").glob("*.npy"))
    assert len(cached) == 1
    again = load()
    assert sorted((tmp_path / "cache").glob("*.npy")) == cached and np.array_equal(again.images, first.images)
    target = sorted(images.iterdir())[0]
    i = first.paths.index(str(target))
    cv2.imwrite(str(target), np.full((48, 48, 3), 255, np.uint8))  # same name, new pixels
    changed = load()
    assert sorted((tmp_path / "cache").glob("*.npy")) != cached  # rebuilt under a new key, the old one removed
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    assert (changed.images[i] == 255).all() and not (first.images[i] == 255).all()
    target.unlink()
    (data / "train" / "labels" / (target.stem + ".txt")).unlink()
    assert len(load()) == len(first) - 1  # a removed file rebuilds too


def test_a_stride_2_stem_reads_twice_the_size_through_the_same_network(tmp_path):
    """--stem_stride=2: the same weights (the parameter count and shapes do not change), an input twice the side, and
    every stage's feature map the size the stride-1 network has at half that side; other strides are refused."""
    base = ern.Config(width=0.125, blocks="1,1,1,1")
    one, two = ern.build_model(base, 8).eval(), ern.build_model(dataclasses.replace(base, stem_stride=2), 8).eval()
    two.load_state_dict(one.state_dict())
    shapes = lambda model, side: [tuple(m(torch.zeros(1, 3, side, side)).shape) for m in
                                  [model.stem, nn.Sequential(model.stem, *model.stages)]]
    with torch.no_grad():
        assert shapes(two, 64) == shapes(one, 32) == [(1, 8, 32, 32), (1, 80, 2, 2)]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # the stride-2 stem samples the stride-1 stem's output at every other pixel
        assert torch.allclose(two.stem[0](x), one.stem[0](x)[:, :, ::2, ::2], atol=1e-6)
    with pytest.raises(ern.UserError, match="--image_size must be >= 64 for '1,1,1,1' stages and a stride-2 stem"):
        ern.validate_config(dataclasses.replace(base, stem_stride=2, image_size=48))
    # the same weights fit either stride, so only the config can tell a checkpoint's stem (--resume, --evaluate)
    last = tmp_path / "last.pth"
    torch.save({**ern.checkpoint_dict(one, base, ern.DEMO_CLASSES, torch.zeros(3), torch.ones(3), 1, {}),
                "optimizer": {}}, last)
    with pytest.raises(ern.UserError, match=r"--resume cannot change --stem_stride=2 \(the run's: 1\)"):
        ern.resumed(last, {"stem_stride": 2})
    with pytest.raises(ern.UserError, match="--evaluate does not take --stem_stride:"):
        ern.main([f"--evaluate={last}", "--stem_stride=2"])
    with pytest.raises(ern.UserError, match="--stem_stride must be 1 or 2"):
        ern.validate_config(dataclasses.replace(base, stem_stride=3))
