"""Explanations (attention gates, Grad-CAM, predict.py --explain, attention_maps.png) and the ONNX export
(export.py, and the .onnx file run as the README runs it).

The explanation checks follow Adebayo et al., "Sanity Checks for Saliency Maps" (2018): maps of the input's size
in [0, 1], Grad-CAM that changes when the trained weights are randomized, and mirrored faces; Grad-CAM is also
compared with CAM (Zhou et al., 2016), which it equals for a network ending in pooling and a linear layer.
"""
import csv
import dataclasses
import json
import re
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import spearmanr

from conftest import EXPORT, PREDICT, TINY, ern, ex, pr, run_script
from test_ern import views_oracle
from test_predict import HOPPER


@pytest.fixture(scope="module")
def run(tiny_dataset, tmp_path_factory):
    """Six epochs with flips (the default aug_flip) on the tiny dataset, in float32 (the .onnx file computes in float32;
    amp is bf16 on a CPU with native bf16): the run folder."""
    tmp = tmp_path_factory.mktemp("run")
    run_script(*TINY, f"--data_dir={tiny_dataset}", "--epochs=6", "--amp=false", f"--output_dir={tmp / 'run'}",
               f"--cache_dir={tmp / 'cache'}", cwd=tmp)
    return tmp / "run"


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """model.onnx of the run's best checkpoint, written to a folder whose name an ASCII console cannot print (it
    prints it escaped): (path, finished process)."""
    out = tmp_path_factory.mktemp("export") / "模型"
    out.mkdir()
    proc = run_script(f"--checkpoint={run}", f"--output={out / 'model.onnx'}", cwd=out, script=EXPORT,
                      env={"PYTHONIOENCODING": "ascii"})
    assert "\\u6a21\\u578b" in proc.stdout
    return out / "model.onnx", proc


@pytest.fixture(scope="module")
def trained(run):
    ckpt = ern.load_checkpoint(run / "best_emotion_model.pth")
    model, cfg = ern.model_from_checkpoint(ckpt)
    return model, cfg, *ern.checkpoint_normalization(ckpt, "cpu")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def faces_of(tiny_dataset, cache, split="test"):
    cfg = ern.Config(data_dir=str(tiny_dataset), image_size=32, cache_dir=str(cache), decode_threads=1)
    _, splits, _ = ern.load_dataset(cfg, None, (split,))
    return np.asarray(splits[split].images)


def read_probabilities(folder):
    with open(folder / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    classes = list(rows[0])[len(pr.CSV_COLUMNS):]
    return rows, np.array([[float(r[c]) if r[c] else np.nan for c in classes] for r in rows])  # empty: no face


# ---------------------------------------------------------------------------------------------
# Explanations
# ---------------------------------------------------------------------------------------------

def test_maps_have_the_input_size_and_lie_in_the_unit_interval(trained, tiny_dataset, cache):
    model, cfg, mean, std = trained
    faces = faces_of(tiny_dataset, cache)
    maps = ern.explain_faces(model, faces, mean, std, torch.device("cpu"))
    n, k = len(faces), trained[0].classifier.out_features
    assert maps["gates"].shape == (n, 4, 32, 32) and maps["gradcam"].shape == (n, 32, 32)
    for m in (maps["gates"], maps["gradcam"]):
        assert m.min() >= 0 and m.max() <= 1
    lit = maps["gradcam"].reshape(n, -1).max(1)
    assert np.all(np.isclose(lit, 1.0) | (lit == 0)) and np.isclose(lit, 1.0).any()  # scaled by its maximum
    assert maps["probabilities"].shape == maps["q"].shape == (n, k)
    expected = ern.run_inference(model, faces, mean, std, torch.device("cpu"), ern.dataclasses.replace(cfg, amp=False),
                                 tta=False)  # explain_faces computes in float32
    assert maps["probabilities"] == pytest.approx(expected["logits"].softmax(1).numpy(), abs=1e-5)
    assert maps["q"] == pytest.approx(expected["context_logits"].softmax(1).numpy(), abs=1e-5)
    inputs = []  # each spatial gate's input, in the stages' order; its gate by CBAM's formula, upsampled
    hooks = [m.register_forward_pre_hook(lambda m, args: inputs.append((m, args[0])))
             for m in model.modules() if isinstance(m, ern.SpatialAttention)]
    try:
        with torch.no_grad():
            model(ern.standardize(torch.from_numpy(faces), mean, std))
    finally:
        for h in hooks:
            h.remove()
    gates = [torch.sigmoid(F.batch_norm(F.conv2d(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1),
                                                 m.conv.weight, padding=3), m.bn.running_mean, m.bn.running_var,
                                        m.bn.weight, m.bn.bias, eps=m.bn.eps)).detach() for m, x in inputs]
    want = torch.cat([F.interpolate(g, size=32, mode="bilinear", align_corners=False) for g in gates], 1)
    assert maps["gates"] == pytest.approx(want.numpy(), abs=1e-5)


def test_gradcam_is_cam_for_a_network_ending_in_pooling_and_a_linear_layer(tiny_dataset, cache):
    """Without the context module, logit_c = W_c . mean(A) + b: Grad-CAM's weights are W_c / (H W), so its map is
    ReLU(sum_k W_ck A_k), CAM, up to the scale its maximum removes."""
    torch.manual_seed(0)
    model = ern.ERN(8, width=0.125, blocks=(1, 1, 1, 1), context=False).eval()
    faces = faces_of(tiny_dataset, cache)[:6]
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    target = np.arange(6) % 8
    maps = ern.explain_faces(model, faces, mean, std, torch.device("cpu"), target=target)
    with torch.no_grad():
        a = model.stages(model.stem(ern.standardize(torch.from_numpy(faces), mean, std)))
        cam = F.relu(torch.einsum("nkhw,nk->nhw", a, model.classifier.weight[target]))[:, None]
        cam = F.interpolate(cam, size=32, mode="bilinear", align_corners=False)[:, 0]
        cam = cam / cam.amax((1, 2), keepdim=True).clamp_min(1e-12)
    assert maps["gradcam"] == pytest.approx(cam.numpy(), abs=1e-4)


@pytest.mark.filterwarnings("ignore:An input array is constant")  # a map with nothing positive: rho undefined, left out
def test_gradcam_changes_when_the_trained_weights_are_randomized(trained, tiny_dataset, cache):
    """Adebayo et al.'s model-randomization test: the same faces and target classes through a freshly initialized
    network of the same architecture give Grad-CAM maps of low rank correlation with the trained network's."""
    model, cfg, mean, std = trained
    faces = faces_of(tiny_dataset, cache)
    maps = ern.explain_faces(model, faces, mean, std, torch.device("cpu"))
    torch.manual_seed(123)
    random = ern.build_model(cfg, model.classifier.out_features)
    shuffled = ern.explain_faces(random, faces, mean, std, torch.device("cpu"), target=maps["probabilities"].argmax(1))
    rho = [spearmanr(a.ravel(), b.ravel())[0] for a, b in zip(maps["gradcam"], shuffled["gradcam"])]
    assert np.nanmedian(rho) < 0.5, rho
    again = ern.explain_faces(model, faces, mean, std, torch.device("cpu"))  # not noise: the same weights, the same map
    assert again["gradcam"] == pytest.approx(maps["gradcam"], abs=1e-6)


def mirror_symmetric(model):
    """Every convolution kernel made mirror-symmetric: on inputs whose side stays odd through every stride-2 stage
    (33 -> 17 -> 9 -> 5 -> 3, so that each stride keeps the centre column), the network is then exactly equivariant
    to a horizontal flip (zero padding, pooling, per-channel gates and the 7x7 spatial convolution commute with it)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_((m.weight + m.weight.flip(-1)) / 2)
    return model


def test_maps_of_a_mirrored_face_are_the_mirrored_maps_for_a_mirror_symmetric_network(trained, tiny_dataset, cache):
    model, cfg, mean, std = trained
    model = mirror_symmetric(ern.build_model(cfg, model.classifier.out_features).eval())
    faces = np.stack([cv2.resize(f.transpose(1, 2, 0), (33, 33)).transpose(2, 0, 1) for f in faces_of(tiny_dataset, cache)])
    maps = ern.explain_faces(model, faces, mean, std, torch.device("cpu"))
    mirrored = ern.explain_faces(model, faces[..., ::-1].copy(), mean, std, torch.device("cpu"))
    assert mirrored["gates"][..., ::-1] == pytest.approx(maps["gates"], abs=1e-4)
    assert mirrored["gradcam"][..., ::-1] == pytest.approx(maps["gradcam"], abs=1e-3)
    assert np.abs(maps["gates"] - maps["gates"][..., ::-1]).max() > 0.01  # the faces themselves are not symmetric


def test_without_spatial_attention_gradcam_still_works_and_the_panel_says_so(tiny_dataset, cache, tmp_path,
                                                                             monkeypatch):
    import matplotlib.axes
    written, text = [], matplotlib.axes.Axes.text
    monkeypatch.setattr(matplotlib.axes.Axes, "text", lambda ax, x, y, s, *a, **k: written.append(s) or text(
        ax, x, y, s, *a, **k))
    torch.manual_seed(0)
    model = ern.ERN(8, width=0.125, blocks=(1, 1, 1, 1), spatial_attention=False).eval()
    faces = faces_of(tiny_dataset, cache)[:2]
    maps = ern.explain_faces(model, faces, torch.full((3,), 0.5), torch.full((3,), 0.25), torch.device("cpu"))
    assert maps["gates"] is None and maps["gradcam"].shape == (2, 32, 32) and maps["gradcam"].max() > 0
    one = {k: None if v is None else v[0] for k, v in maps.items()}
    pr.plot_explanation(faces[0], one, maps["probabilities"][0], ern.DEMO_CLASSES, "no attention", tmp_path / "e.png")
    assert (tmp_path / "e.png").stat().st_size > 5000
    assert any("no spatial attention" in s for s in written), written


def test_evaluation_results_say_none_for_a_class_the_split_lacks(trained, tiny_dataset, cache, tmp_path):
    """context_mean_q of a split without one class: that row is null (NaN is not JSON; strict readers refuse it),
    the others the mean context distribution q = softmax(s) of each class's faces, s averaged over the face and its
    mirror (the run's test-time views), recounted here: not the mean of the classifier's probabilities."""
    model, cfg, mean, std = trained
    names, splits, _ = ern.load_dataset(ern.Config(data_dir=str(tiny_dataset), image_size=32, cache_dir=str(cache),
                                                   decode_threads=1), None, ("test",))
    split = splits["test"].subset(splits["test"].labels != 0)
    ern.write_evaluation(model, split, names, mean, std, torch.device("cpu"),
                         dataclasses.replace(cfg, tsne_samples=0, attention_samples=0), tmp_path, {})
    written = json.loads((tmp_path / "evaluation_results.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"{c} in evaluation_results.json"))
    assert written["context_mean_q"][0] == [None] * len(names)
    x = ern.standardize(torch.from_numpy(np.asarray(split.images)), mean, std)
    with torch.no_grad():
        (z, s, _), (z_mirror, s_mirror, _) = model.eval()(x), model(x.flip(3))
    q, p = ((s + s_mirror) / 2).softmax(1).numpy(), ((z + z_mirror) / 2).softmax(1).numpy()
    want = np.stack([q[split.labels == k].mean(0) for k in range(1, len(names))])
    assert np.array(written["context_mean_q"][1:]) == pytest.approx(want, abs=1e-5)
    assert np.abs(want - np.stack([p[split.labels == k].mean(0) for k in range(1, len(names))])).max() > 1e-3


def test_explain_writes_one_picture_per_face(run, tiny_dataset, tmp_path, monkeypatch):
    """One picture per classified face, under its source's subfolder as annotated/ has it (two photos of one name
    in two folders stay apart), its Grad-CAM that of the class the CSV gives (the test-time views' average), not the
    class of the crop alone."""
    photos = tmp_path / "photos"
    for sub in ("a", "b"):
        (photos / sub).mkdir(parents=True)
        shutil.copy(HOPPER, photos / sub)
    shutil.copy(sorted((tiny_dataset / "test" / "images").iterdir())[0], photos / "a")
    targets = []

    def explain_faces(*args, target=None):
        targets.extend(target)
        return ern.explain_faces(*args, target=target)

    monkeypatch.setattr(pr, "explain_faces", explain_faces)
    assert pr.main([str(photos), f"--checkpoint={run / 'best_emotion_model.pth'}", "--explain",
                    f"--output_dir={tmp_path / 'out'}"]) == 0
    rows, probs = read_probabilities(tmp_path / "out")
    classified = [(r, p) for r, p in zip(rows, probs) if r["emotion"]]  # a row without a face has nothing to explain
    expected = {Path("photos") / Path(r["source"]).relative_to(photos).parent /
                f"{Path(r['source']).stem}_{'whole' if r['face'] == '-1' else 'face' + r['face']}.png"
                for r, _ in classified}
    assert len(rows) == 3 and len(expected) == len(classified) == 3
    explain = tmp_path / "out" / "explain"
    assert {p.relative_to(explain) for p in explain.rglob("*.png")} == expected
    assert [int(t) for t in targets] == [int(p.argmax()) for _, p in classified]  # in the CSV's order


def test_training_and_evaluation_draw_attention_maps(run):
    results = json.loads((run / "evaluation_results.json").read_text())
    assert (run / "attention_maps.png").stat().st_size > 20000
    assert results["attention_maps"]["faces"] == results["evaluated_samples"]  # fewer than attention_samples
    lo, hi = results["attention_maps"]["gate_range"]
    assert 0 <= lo < hi <= 1
    cm, names = np.array(results["confusion_matrix"]), results["class_names"]  # every face drawn: the matrix's counts
    assert [[results["attention_maps"]["faces_per_class"][n][k] for k in ("correct", "wrong")] for n in names] == \
        [[int(cm[i, i]), int(cm[i].sum() - cm[i, i])] for i in range(len(names))]
    mean_q = np.array(results["context_mean_q"], dtype=float)  # a mean of distributions over the prototypes
    assert mean_q.shape == (len(names), len(names)) and np.allclose(mean_q.sum(1), 1, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# ONNX export
# ---------------------------------------------------------------------------------------------

def single_and_mirrored(model, x, mean, std):
    """An independent oracle: softmax of the network's logits on the normalized input, alone and averaged with
    those of its mirror image."""
    with torch.no_grad():
        xn = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
        logits, mirrored = model.eval()(xn)[0], model(xn.flip(3))[0]
    return logits.softmax(1).numpy(), ((logits + mirrored) / 2).softmax(1).numpy()


def test_export_agrees_with_pytorch_and_says_by_how_much(exported, trained):
    path, proc = exported
    differences = [float(v) for v in re.findall(r"([\d.]+e[-+]\d+) on (?:random|real) inputs", proc.stdout)]
    assert len(differences) == 2 and max(differences) < 1e-5, proc.stdout
    model, cfg, mean, std = trained
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    [inp], [out] = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name, inp.shape[1:]) == ("images", "probabilities", [3, 32, 32])
    assert isinstance(inp.shape[0], str)  # a dynamic batch
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert cfg.tta_flip  # the checkpoint's flip TTA travels into the graph
    single, averaged = single_and_mirrored(model, x, mean, std)
    assert np.abs(single - averaged).max() > 1e-3  # the two oracles differ on these inputs, so the check below tells
    for batch in (x[:1], x):
        got = session.run(["probabilities"], {"images": batch.numpy()})[0]
        assert got == pytest.approx(averaged[:len(batch)], abs=1e-5)


def test_export_without_flip_tta_is_one_pass(run, trained, tmp_path):
    """--tta_flip=false --tta_shift=0: one view in the graph; --tta_shift= (empty) is the checkpoint's, as the help
    says (a copy of the checkpoint whose run evaluated 2 px shifts: its five views); an --output naming a folder still
    to be made (a trailing /) gets its model.onnx."""
    model, _, mean, std = trained
    ckpt = torch.load(run / "best_emotion_model.pth", map_location="cpu", weights_only=True)
    ckpt["config"]["tta_shift"] = 2
    torch.save(ckpt, tmp_path / "shift2.pth")
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    single, averaged = single_and_mirrored(model, x, mean, std)
    assert np.abs(single - averaged).max() > 1e-3  # the two oracles differ on these inputs, so the check below tells
    views = [torch.from_numpy(np.ascontiguousarray(v)) for v in views_oracle(x.numpy(), 2, False)]
    with torch.no_grad():
        logits = [model.eval()((v - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))[0] for v in views]
    shifted = (sum(logits) / len(logits)).softmax(1).numpy()
    assert np.abs(shifted - single).max() > 1e-4
    for shift, want in (("", shifted), ("0", single)):
        out = tmp_path / f"exports{shift}"
        assert ex.main([f"--checkpoint={tmp_path / 'shift2.pth'}", f"--output={out}/", "--tta_flip=false",
                        f"--tta_shift={shift}"]) == 0
        assert [p.name for p in out.iterdir()] == ["model.onnx"]
        session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        assert (json.loads(meta["tta_flip"]), json.loads(meta["tta_shift"])) == (False, int(shift or 2))
        assert session.run(["probabilities"], {"images": x.numpy()})[0] == pytest.approx(want, abs=1e-5)


def test_export_with_zoom_and_shift_tta_averages_twenty_views(run, trained, tmp_path):
    model, _, mean, std = trained
    assert ex.main([f"--checkpoint={run}", f"--output={tmp_path / 'twenty.onnx'}", "--tta_shift=2",
                    "--tta_zoom=0.9"]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "twenty.onnx"), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert (json.loads(meta["tta_shift"]), json.loads(meta["tta_zoom"])) == (2, 0.9)
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    views = [torch.from_numpy(np.ascontiguousarray(v)) for v in views_oracle(x.numpy(), 2, True, 0.9)]
    with torch.no_grad():
        logits = [model.eval()((v - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))[0] for v in views]
    want = (sum(logits) / len(logits)).softmax(1).numpy()
    assert np.abs(want - single_and_mirrored(model, x, mean, std)[1]).max() > 1e-4  # the other views count
    assert session.run(["probabilities"], {"images": x.numpy()})[0] == pytest.approx(want, abs=1e-5)
    alone = ern.Config(tta_flip=False)  # the image alone
    ex.trace_to_onnx(ex.ExportedERN(model, mean, std, alone).eval(), tmp_path / "one.onnx", 32)

    def convolutions(path):
        graph = onnx.load(str(path))
        return sum(n.op_type == "Conv" for g in (graph.graph, *graph.functions) for n in g.node)

    assert convolutions(tmp_path / "twenty.onnx") == convolutions(tmp_path / "one.onnx") > 20  # the views in one pass


def test_export_carries_the_metadata(exported, run):
    path, _ = exported
    meta = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    ckpt = torch.load(run / "best_emotion_model.pth", map_location="cpu", weights_only=True)
    assert meta["format"] == ex.ONNX_FORMAT
    assert json.loads(meta["class_names"]) == ckpt["class_names"] == ern.DEMO_CLASSES
    assert json.loads(meta["image_size"]) == 32 and json.loads(meta["crop_margin"]) == ckpt["config"]["crop_margin"]
    assert json.loads(meta["tta_flip"]) is ckpt["config"]["tta_flip"] is True
    assert json.loads(meta["metrics"]) == pytest.approx(ckpt["metrics"])
    assert json.loads(meta["normalization"]) == ckpt["normalization"]
    machine = ("data_dir", "cache_dir", "decode_threads", "device", "output_dir", "overwrite", "strict")
    shared = {k: v for k, v in ckpt["config"].items() if k not in machine}
    assert json.loads(meta["config"]) == shared  # the architecture and recipe, not the training machine's folders


def test_the_readme_recipe_gives_predict_pys_probabilities(exported, run, tiny_dataset, tmp_path):
    """The export run as the README runs it without this repository (onnxruntime on the crop, resized as training
    resized: area when shrinking, linear when enlarging; in [0, 1]) gives predict.py's probabilities for the same
    face boxes: the crop and the normalization travel in the file's metadata, not in this code. Half the photos are
    smaller than the model's input (the recipe's INTER_AREA for every crop missed those by up to 0.15)."""
    path, _ = exported
    photos = tmp_path / "photos"
    shutil.copytree(tiny_dataset / "valid" / "images", photos)
    for photo in sorted(photos.iterdir())[::2]:
        cv2.imwrite(str(photo), cv2.resize(cv2.imread(str(photo)), (20, 20), interpolation=cv2.INTER_AREA))
    run_script(str(photos), f"--checkpoint={run}", "--detect_faces=false", f"--output_dir={tmp_path / 'out'}",
               cwd=tmp_path, script=PREDICT)  # the checkpoint's flip TTA, in predict.py and in the export
    rows, expected = read_probabilities(tmp_path / "out")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    size = json.loads(meta["image_size"])
    got = []
    for row in rows:
        # the whole image is the face box: with crop_margin on each side, clamped to the image, it is the crop
        image = cv2.cvtColor(cv2.imread(row["source"]), cv2.COLOR_BGR2RGB)
        shrink = image.shape[0] > size
        x = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        x = x.transpose(2, 0, 1)[None].astype(np.float32) / 255
        got.append(session.run(["probabilities"], {"images": x})[0][0])
    assert len(rows) == 32 and np.abs(np.array(got) - expected).max() <= 1e-4  # the CSV keeps 4 decimals


def test_an_export_is_refused_where_a_checkpoint_is_expected(exported, tiny_dataset, tmp_path):
    for main, args in ((pr.main, [str(HOPPER), f"--checkpoint={exported[0]}"]),
                       (ern.main, [f"--evaluate={exported[0]}", f"--data_dir={tiny_dataset}"])):
        with pytest.raises(ern.UserError, match="is an export, which runs in onnxruntime"):
            main(args)


def test_export_refuses_what_is_not_an_ern_checkpoint(tmp_path):
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "bare.pth")
    proc = run_script(f"--checkpoint={tmp_path / 'bare.pth'}", cwd=tmp_path, check=False, script=EXPORT)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not an ERN checkpoint" in proc.stderr
    assert not (tmp_path / "model.onnx").exists()


def test_export_reads_the_checkpoint_first_and_writes_only_an_onnx_file(run, tmp_path):
    """A checkpoint that does not exist is refused before its folder is made (for the model.onnx beside it); the
    user's own export given as the checkpoint is named as one (not "model.onnx exists"); an --output that is not
    .onnx is refused (a .pth, with --overwrite=true, was replaced by the export)."""
    with pytest.raises(ern.UserError, match="does not exist"):
        ex.main([f"--checkpoint={tmp_path / 'RUNX' / 'best_emotion_model.pth'}"])
    assert not (tmp_path / "RUNX").exists()
    (tmp_path / "model.onnx").write_bytes(b"an export")
    with pytest.raises(ern.UserError, match="is an export, which runs in onnxruntime"):
        ex.main([f"--checkpoint={tmp_path / 'model.onnx'}"])
    shutil.copy(run / "best_emotion_model.pth", tmp_path / "copy.pth")
    with pytest.raises(ern.UserError, match="name the .onnx file to write, or a folder for its model.onnx"):
        ex.main([f"--checkpoint={run}", f"--output={tmp_path / 'copy.pth'}", "--overwrite=true"])
    assert (tmp_path / "copy.pth").read_bytes() == (run / "best_emotion_model.pth").read_bytes()


@pytest.mark.parametrize("args, message", [
    ([], "give the model: --checkpoint"),
    (["--checkpoint=x.pth", "--format=tflite"], "unknown field --format"),
    (["--checkpoint=x.pth", "--image_size=64"], "--image_size is a training setting"),
])
def test_export_arguments_are_checked(args, message, tmp_path):
    with pytest.raises(ern.UserError, match=message):
        ex.main(args)


def test_explain_on_a_video_writes_one_picture_per_row(run, tmp_path):
    from test_predict import write_video
    video = write_video(tmp_path / "clip.mp4", 6)
    run_script(str(video), f"--checkpoint={run / 'best_emotion_model.pth'}", "--explain", "--every=2",
               f"--output_dir={tmp_path / 'out'}", cwd=tmp_path, script=PREDICT)
    rows, _ = read_probabilities(tmp_path / "out")
    expected = {f"clip_frame{int(r['frame']):06d}_{'whole' if r['face'] == '-1' else 'face' + r['face']}.png"
                for r in rows if r["emotion"]}
    assert len(rows) >= 3 and {p.name for p in (tmp_path / "out" / "explain").iterdir()} == expected


def test_a_failed_export_check_leaves_no_file(run, tmp_path, monkeypatch):
    monkeypatch.setattr(ex, "EXPORT_TOLERANCE", 0.0)  # every real export differs by more than nothing
    status = ex.main([f"--checkpoint={run / 'best_emotion_model.pth'}", f"--output={tmp_path / 'm.onnx'}"])
    assert status == 1 and list(tmp_path.iterdir()) == []


def test_an_export_whose_file_windows_holds_for_a_moment_is_written(run, tmp_path, monkeypatch):
    """A model.onnx that a viewer or a virus scanner holds open when the export renames onto it (PermissionError,
    WinError 32 on Windows): the export tries again for a few seconds, as the trainer's files do, and writes it."""
    target, real, refusals = tmp_path / "m.onnx", ex.os.replace, [2]

    def replace(src, dst):
        if Path(dst) == target and refusals[0]:
            refusals[0] -= 1
            error = PermissionError(13, "The process cannot access the file because it is being used by another process")
            error.winerror = 32
            raise error
        real(src, dst)

    monkeypatch.setattr(ex.os, "replace", replace)
    monkeypatch.setattr(ern.time, "sleep", lambda s: None)
    assert ex.main([f"--checkpoint={run / 'best_emotion_model.pth'}", f"--output={target}"]) == 0
    assert refusals == [0] and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    assert onnx.load(target).metadata_props  # the whole export, not a partial file


def test_an_onnx_package_too_old_or_missing_is_one_line_and_leaves_no_file(run, tmp_path, monkeypatch):
    """The export stamped with an opset this onnxruntime does not know (as an older onnxruntime meets today's
    exporter; a real load failure): one line with the versions and onnxruntime's own limit. An onnxscript older than
    torch's exporter (the part it imports lazily missing: a ModuleNotFoundError traceback before), a package that is
    not installed, and one whose binary part does not load (built against another numpy): one line naming it.
    Nothing written in any case."""
    import onnx
    save = onnx.save

    def stamped_99(graph, *args, **kwargs):
        for opset in graph.opset_import:
            opset.version = 99 if opset.domain == "" else opset.version
        save(graph, *args, **kwargs)

    args = [f"--checkpoint={run / 'best_emotion_model.pth'}", f"--output={tmp_path / 'm.onnx'}"]
    monkeypatch.setattr(onnx, "save", stamped_99)
    with pytest.raises(ern.UserError, match=rf"onnxruntime {re.escape(onnxruntime.__version__)} cannot load the "
                                            r"export \(ONNX opset 99, IR version \d+\): Current official support for "
                                            r"domain ai.onnx is till opset \d+; upgrade it"):
        ex.main(args)
    monkeypatch.setattr(onnx, "save", save)
    from torch.onnx._internal import _lazy_import
    apis = _lazy_import.onnxscript_apis  # the part of onnxscript that torch's exporter imports when it first runs
    monkeypatch.setattr(apis, "_name", "onnxscript._framework_apis.torch_99_99")  # as an older onnxscript lacks it
    monkeypatch.setattr(apis, "_module", None)
    with pytest.raises(ern.UserError, match=rf"^torch {re.escape(torch.__version__)}'s ONNX exporter needs a newer "
                                            r"onnxscript \(No module named "
                                            r"'onnxscript\._framework_apis\.torch_99_99'\): "
                                            r"pip install --upgrade onnxscript onnx$"):
        ex.main(args)
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # what `import onnxscript` meets where it is not installed
    with pytest.raises(ern.UserError, match="export needs onnxscript, which is not installed: pip install -r"):
        ex.main(args)
    monkeypatch.undo()
    real_import = ex.importlib.import_module

    def built_for_numpy_1(name, *args):  # what importing onnxruntime 1.18 under numpy 2 raises (numpy prints the rest)
        if name == "onnxruntime":
            raise ImportError()
        return real_import(name, *args)

    monkeypatch.setattr(ex.importlib, "import_module", built_for_numpy_1)
    with pytest.raises(ern.UserError, match=r"^export could not import onnxruntime \(a binary part did not load\): "
                                            r"pip install --upgrade -r requirements.txt$"):
        ex.main(args)
    assert list(tmp_path.iterdir()) == []
