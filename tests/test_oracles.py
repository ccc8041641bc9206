"""Checks against independent oracles (issue 23): the class order of data.yaml through a whole run, the decode cache's
rebuilds, the presets, the attention gates computed by hand from their weights, colour jitter from its formula, the
learning-rate schedule at points worked out by hand, and predict.py's probabilities recomputed from the crop."""
import csv
import dataclasses
import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import PREDICT, TINY, ern, pr, run_script
from test_predict import HOPPER, hand_face_region

# ---------------------------------------------------------------------------------------------
# The class order: data.yaml's, never sorted, into every report and the checkpoint
# ---------------------------------------------------------------------------------------------

NAMES = ["Surprise", "Happy", "Anger", "Sad"]  # not alphabetical
TEST_SUPPORT = [6, 1, 3, 5]  # unequal: a report keyed by sorted names would move these


@pytest.fixture(scope="module")
def ordered_run(tmp_path_factory):
    """One epoch on a dataset whose data.yaml names are not alphabetical and whose test classes have unequal support."""
    tmp = tmp_path_factory.mktemp("order")
    data = ern.make_synthetic_dataset(tmp / "data", per_class=(10, 4, 6), size=48, seed=3, names=NAMES)
    for k, keep in enumerate(TEST_SUPPORT):
        for image in sorted((data / "test" / "images").glob(f"{NAMES[k].lower()}_*"))[keep:]:
            image.unlink()
            (data / "test" / "labels" / f"{image.stem}.txt").unlink()
    run_script(*TINY, f"--data_dir={data}", "--epochs=1", "--amp=false", "--tsne_samples=0", "--attention_samples=0",
               f"--output_dir={tmp / 'run'}", f"--cache_dir={tmp / 'cache'}", cwd=tmp)
    return tmp / "run"


def test_the_class_order_is_data_yamls_in_every_report_and_the_checkpoint(ordered_run):
    results = json.loads((ordered_run / "evaluation_results.json").read_text())
    cm = np.array(results["confusion_matrix"])
    assert results["class_names"] == NAMES
    assert cm.sum(1).tolist() == TEST_SUPPORT  # rows in data.yaml's order
    report = results["classification_report"]
    assert list(report) == NAMES
    for k, name in enumerate(NAMES):
        assert report[name]["support"] == TEST_SUPPORT[k]
        assert report[name]["recall"] == pytest.approx(cm[k, k] / TEST_SUPPORT[k])
        assert report[name]["precision"] == pytest.approx(cm[k, k] / cm[:, k].sum() if cm[:, k].sum() else 0.0)
    ckpt = ern.load_checkpoint(ordered_run / "best_emotion_model.pth")
    assert ckpt["class_names"] == NAMES
    [face] = pr.EmotionPredictor(ordered_run, "cpu").describe([((0, 0, 1, 1), True, None)], np.eye(4)[[2]])
    assert face["emotion"] == "Anger" and list(face["probabilities"]) == NAMES  # class 2 of data.yaml's order
    assert face["probabilities"] == {"Surprise": 0.0, "Happy": 0.0, "Anger": 1.0, "Sad": 0.0}


# ---------------------------------------------------------------------------------------------
# The decode cache: a change that alters the crops rebuilds it
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change", ["label box", "image_size", "crop_margin"])
def test_the_decode_cache_is_rebuilt_by_what_changes_the_crops(tiny_dataset, tmp_path, change):
    """A second load decodes nothing; a moved label box, another image size or another margin decodes again, and
    the rebuilt crops are what crop_box cuts with the new setting."""
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    cfg = ern.Config(data_dir=str(data), image_size=32, cache_dir=str(tmp_path / "cache"), decode_threads=1)

    def load(cfg):
        split, _, *_ = ern.scan_split("train", data / "train" / "images", 8)
        ern.load_split_pixels(split, cfg)
        return split

    assert load(cfg).decode_seconds > 0
    assert load(cfg).decode_seconds == 0  # read from the cache
    if change == "label box":
        label = sorted((data / "train" / "labels").iterdir())[0]
        cls = label.read_text().split()[0]
        label.write_text(f"{cls} 0.4 0.4 0.5 0.5")
    else:
        cfg = dataclasses.replace(cfg, **{"image_size": 40} if change == "image_size" else {"crop_margin": 0.3})
    split = load(cfg)
    assert split.decode_seconds > 0
    i = 0 if change == "label box" else 5
    image = ern.decode_image(split.paths[i])[0]
    expected = ern.crop_box(image, split.boxes[i], cfg.crop_margin, cfg.image_size).transpose(2, 0, 1)
    assert np.array_equal(split.images[i], expected)
    if change == "label box":
        assert split.boxes[0].tolist() == pytest.approx([0.4, 0.4, 0.5, 0.5])


def test_a_box_moved_to_the_next_image_rebuilds_the_cache(tmp_path):
    """The last box of a.txt moved to the top of b.txt leaves the split's boxes and images as they were, in order:
    the cache was reused, and that face's crop was cut from a.jpg. Every crop is its own image's after the move."""
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for name in ("a", "b"):
        cv2.imwrite(str(tmp_path / "images" / f"{name}.png"), rng.integers(0, 256, (64, 64, 3), np.uint8))
    (tmp_path / "labels" / "a.txt").write_text("0 0.3 0.5 0.4 0.4\n1 0.7 0.5 0.4 0.4\n")
    (tmp_path / "labels" / "b.txt").write_text("0 0.5 0.5 0.6 0.6\n")
    cfg = ern.Config(image_size=32, cache_dir=str(tmp_path / "cache"), decode_threads=1)

    def load():
        split, problems, *_ = ern.scan_split("train", tmp_path / "images", 2)
        assert problems == []
        ern.load_split_pixels(split, cfg)
        return split

    load()
    (tmp_path / "labels" / "a.txt").write_text("0 0.3 0.5 0.4 0.4\n")
    (tmp_path / "labels" / "b.txt").write_text("1 0.7 0.5 0.4 0.4\n0 0.5 0.5 0.6 0.6\n")
    split = load()
    assert [Path(p).name for p in split.paths] == ["a.png", "b.png", "b.png"] and split.decode_seconds > 0
    for i, path in enumerate(split.paths):
        expected = ern.crop_box(ern.decode_image(path)[0], split.boxes[i], cfg.crop_margin, 32).transpose(2, 0, 1)
        assert np.array_equal(split.images[i], expected), i


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------

def test_presets_give_their_values_and_the_command_line_overrides_them():
    cfg = ern.parse_args(["--preset=cpu"])[0]
    # the CPU protocol as the README states it: 96 px faces through a stride-2 stem, 30 minutes, 2.8 M parameters
    # where bf16 is native and 1.2 M in float32 (one block a stage: preset_for_machine)
    assert (cfg.image_size, cfg.stem_stride, cfg.time_budget, cfg.preset) == (96, 2, 30.0, "cpu")
    assert 2.75e6 < ern.count_parameters(ern.build_model(cfg, 8)) < 2.85e6
    float32 = dataclasses.replace(cfg, **ern.PRESETS_FLOAT32_CPU["cpu"])
    assert 1.15e6 < ern.count_parameters(ern.build_model(float32, 8)) < 1.25e6
    assert all(getattr(cfg, k) == v for k, v in ern.PRESETS["cpu"].items())
    assert ern.parse_args(["--preset=cpu", "--image_size=64", "--time_budget=0"])[0].image_size == 64
    assert ern.parse_args(["--image_size=64", "--preset=cpu"])[0].image_size == 64  # the command line wins, in any order
    demo, action, _ = ern.parse_args(["--demo"])
    assert action.demo and demo.preset == "demo" and all(getattr(demo, k) == v for k, v in ern.PRESETS["demo"].items())
    assert ern.parse_args(["--demo", "--epochs=3"])[0].epochs == 3
    assert ern.parse_args(["--demo", "--preset=cpu"])[0].width == 0.4  # a named preset replaces the demo's (0.25)
    assert ern.parse_args([])[0] == ern.Config()
    with pytest.raises(ern.UserError, match="unknown preset 'gpu'; presets: cpu, demo"):
        ern.parse_args(["--preset=gpu"])


@pytest.mark.parametrize("bf16", [True, False])
def test_the_cpu_preset_trains_one_block_a_stage_in_float32_unless_told_otherwise(monkeypatch, capsys, bf16):
    """main() trains the preset's faces, stem and width on every CPU; two blocks a stage where bf16 is native and
    --amp is on, one where the run is float32. The command line's --blocks wins, and other presets keep theirs."""
    monkeypatch.setattr(ern, "cpu_has_bf16", lambda: bf16)
    monkeypatch.setattr(ern, "run_training", lambda cfg, **_: cfg)  # what main() trains

    def trained(*argv):
        return ern.main(["--device=cpu", *argv])

    cfg = trained("--preset=cpu")
    assert (cfg.image_size, cfg.stem_stride, cfg.width) == (96, 2, 0.4)
    assert cfg.blocks == ("2,2,2,2" if bf16 else "1,1,1,1")
    assert ern.autocast_dtype(cfg, torch.device("cpu")) == (torch.bfloat16 if bf16 else None)
    assert ("--preset=cpu in float32 on this CPU: --blocks=1,1,1,1" in capsys.readouterr().out) == (not bf16)
    assert trained("--preset=cpu", "--amp=false").blocks == "1,1,1,1"  # float32 asked for
    assert trained("--preset=cpu", "--blocks=2,2,2,2").blocks == "2,2,2,2"
    assert trained("--preset=cpu", "--blocks=1,2,2,1", "--amp=false").blocks == "1,2,2,1"
    assert trained("--preset=cpu", "--image_size=64", "--stem_stride=1").image_size == 64
    assert trained("--amp=false").blocks == ern.Config().blocks  # no preset: the defaults
    assert trained("--preset=demo", "--amp=false").blocks == ern.PRESETS["demo"]["blocks"]
    monkeypatch.setattr(ern, "resolve_device", lambda _: torch.device("cuda"))  # a GPU: the preset as written
    assert ern.preset_for_machine(ern.parse_args(["--preset=cpu", "--amp=false"])[0], {}).blocks == "2,2,2,2"


# ---------------------------------------------------------------------------------------------
# The attention gates, by hand from the weights
# ---------------------------------------------------------------------------------------------

def sigmoid(v):
    return 1 / (1 + np.exp(-v))


def test_the_channel_gate_is_cbams_formula_on_the_layer_weights():
    torch.manual_seed(0)
    layer = ern.ChannelAttention(32, reduction=4)
    x = torch.randn(2, 32, 5, 6)
    w1 = layer.fc1.weight.detach().numpy()[:, :, 0, 0]  # (hidden, C)
    w2 = layer.fc2.weight.detach().numpy()[:, :, 0, 0]  # (C, hidden)
    xs = x.numpy()
    mlp = lambda v: w2 @ np.maximum(w1 @ v, 0)
    gate = np.stack([sigmoid(mlp(xs[n].mean((1, 2))) + mlp(xs[n].max((1, 2)))) for n in range(2)])
    with torch.no_grad():
        assert layer(x).numpy() == pytest.approx(xs * gate[:, :, None, None], abs=1e-5)


def test_the_spatial_gate_is_cbams_formula_on_the_layer_weights():
    """sigmoid(BN(conv7x7([mean over channels, max over channels]))), the convolution as explicit sums over a
    zero-padded map, BatchNorm with its running statistics (evaluation mode)."""
    torch.manual_seed(1)
    layer = ern.SpatialAttention()
    with torch.no_grad():
        layer.bn.running_mean.fill_(0.3)
        layer.bn.running_var.fill_(2.0)
        layer.bn.weight.fill_(1.5)
        layer.bn.bias.fill_(-0.2)
    layer.eval()
    x = torch.randn(2, 6, 5, 7)
    xs = x.numpy()
    w = layer.conv.weight.detach().numpy()[0]  # (2, 7, 7)
    gate = np.zeros((2, 5, 7))
    for n in range(2):
        maps = np.pad(np.stack([xs[n].mean(0), xs[n].max(0)]), ((0, 0), (3, 3), (3, 3)))
        for i in range(5):
            for j in range(7):
                conv = (maps[:, i:i + 7, j:j + 7] * w).sum()
                gate[n, i, j] = sigmoid((conv - 0.3) / math.sqrt(2.0 + layer.bn.eps) * 1.5 - 0.2)
    with torch.no_grad():
        assert layer(x).numpy() == pytest.approx(xs * gate[:, None], abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Colour jitter, from its formula
# ---------------------------------------------------------------------------------------------

def test_brightness_and_contrast_are_the_formula_with_the_drawn_factors():
    """((x - mean of the image) * c + mean) * b, clamped to [0, 1], with c and b uniform in [1 - a, 1 + a], one pair
    per image, drawn contrast first (re-drawn here from the same seed)."""
    cfg = ern.Config(aug_scale=0.0, aug_translate=0.0, aug_rotate=0.0, aug_flip=0.0, aug_erase=0.0,
                     aug_brightness=0.3, aug_contrast=0.4)
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(5)
    out = ern.augment_batch(x, torch.zeros(3), torch.ones(3), cfg).numpy()
    torch.manual_seed(5)
    c = 1 + (torch.rand(6, 1, 1, 1) * 2 - 1).numpy() * 0.4
    b = 1 + (torch.rand(6, 1, 1, 1) * 2 - 1).numpy() * 0.3
    xs = x.numpy().astype(np.float64) / 255
    m = xs.mean((1, 2, 3), keepdims=True)
    assert out == pytest.approx(np.clip(((xs - m) * c + m) * b, 0, 1), abs=1e-5)
    assert (np.abs(c - 1) <= 0.4).all() and (np.abs(b - 1) <= 0.3).all() and len(np.unique(c)) == 6


# ---------------------------------------------------------------------------------------------
# The learning-rate schedule at points worked out by hand
# ---------------------------------------------------------------------------------------------

def test_the_warm_up_is_linear_and_the_cosine_has_its_quarter_point():
    """10 epochs of 8 steps, 2 warm-up epochs: lr rises by equal steps from 1 % of lr to lr over 16 steps, then at a
    quarter of the cosine (step 16 + 16) it is floor + (peak - floor) (1 + cos(pi / 4)) / 2, which a linear
    annealing (floor + (peak - floor) * 3 / 4) misses."""
    cfg = ern.Config(epochs=10, lr=2e-3, min_lr_ratio=0.1, warmup_epochs=2.0)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = ern.make_scheduler(optimizer, cfg, 8)
    lrs = [scheduler.get_last_lr()[0]]
    for _ in range(80):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    rises = np.diff(lrs[:17])
    assert lrs[0] == pytest.approx(2e-5) and lrs[16] == pytest.approx(2e-3)
    assert rises == pytest.approx(np.full(16, (2e-3 - 2e-5) / 16))
    floor = 2e-4
    quarter = floor + (2e-3 - floor) * (1 + math.cos(math.pi / 4)) / 2
    assert lrs[32] == pytest.approx(quarter) and abs(quarter - (floor + (2e-3 - floor) * 0.75)) > 1e-5
    assert lrs[80] == pytest.approx(floor)


# ---------------------------------------------------------------------------------------------
# predict.py's probabilities, recomputed from the crop
# ---------------------------------------------------------------------------------------------

def test_csv_probabilities_are_the_models_softmax_on_that_faces_crop(tmp_path):
    """On a photo larger than predict.py's detection width (2.5x the portrait: 1280 px wide): the row's box is in the
    photo's own pixels (2.5x the box found on the portrait), and its probabilities are the softmax of the mean of
    the network's logits on the crop and on its mirror, computed here from the box with crop_box (the region written
    out by hand: 1.25 of the box's longer side, centred on it; not predict.py's face_crop_box), the checkpoint's
    normalization and the model itself."""
    torch.manual_seed(0)
    cfg = ern.Config(image_size=32, width=0.125, blocks="1,1,1,1", amp=False, channels_last=False)
    model = ern.build_model(cfg, len(ern.DEMO_CLASSES))
    with torch.no_grad():
        model.classifier.weight.mul_(20)  # probabilities that differ from face to face
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    ckpt = tmp_path / "m.pth"
    torch.save(ern.checkpoint_dict(model, cfg, ern.DEMO_CLASSES, mean, std, 1, {}), ckpt)
    portrait = cv2.imread(str(HOPPER))
    big = cv2.resize(portrait, None, fx=2.5, fy=2.5, interpolation=cv2.INTER_CUBIC)
    assert big.shape[1] > pr.DETECT_WIDTH
    cv2.imwrite(str(tmp_path / "big.png"), big)
    run_script(str(tmp_path / "big.png"), f"--checkpoint={ckpt}", f"--output_dir={tmp_path / 'out'}", cwd=tmp_path,
               script=PREDICT)
    with open(tmp_path / "out" / "predictions.csv", newline="") as f:
        [row] = list(csv.DictReader(f))
    box = [float(row[k]) for k in ("x1", "y1", "x2", "y2")]
    [small] = pr.FaceDetector()(cv2.cvtColor(portrait, cv2.COLOR_BGR2RGB))
    assert box == pytest.approx([2.5 * v for v in small], abs=0.05 * (small[2] - small[0]) * 2.5)
    rgb = cv2.cvtColor(big, cv2.COLOR_BGR2RGB)
    crop = ern.crop_box(rgb, hand_face_region(box, rgb.shape, 1.25, 0.0), 0.0, 32).transpose(2, 0, 1)
    x = (torch.from_numpy(crop.copy()).float()[None] / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    model.eval()
    with torch.no_grad():
        logits = (model(x)[0] + model(x.flip(3))[0]) / 2
    expected = logits.softmax(1)[0].numpy()
    assert [float(row[c]) for c in ern.DEMO_CLASSES] == pytest.approx(expected, abs=2e-4)


def test_demo_writes_its_dataset_and_trains_with_its_preset_under_the_command_line(tmp_path, monkeypatch):
    """--demo: the synthetic dataset of drawn faces (8 classes, 150 training and 50 validation faces each), then a run
    with the demo preset's values, the command line's over them (here one epoch). --data_dir=~/demo, which the shell
    leaves as it is, is the home folder's (before: the faces went to a folder named ~ in the working folder, and
    training looked for them in the home folder). A --data_dir it cannot write (here: under a file) is one line
    (before: a NotADirectoryError traceback)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    (tmp_path / "file").write_text("")
    with pytest.raises(ern.UserError, match="^cannot write the demo's dataset in .*file/demo: Not a directory; choose"):
        ern.main(["--demo", f"--data_dir={tmp_path / 'file' / 'demo'}"])
    run_dir, results = ern.main(["--demo", "--epochs=1", "--data_dir=~/demo", "--tsne_samples=0",
                                 "--attention_samples=0", f"--output_dir={tmp_path / 'run'}",
                                 f"--cache_dir={tmp_path / 'cache'}"])
    assert list((tmp_path / "cwd").iterdir()) == []
    names, folders, _, _ = ern.read_data_yaml(tmp_path / "demo")
    assert names == ern.DEMO_CLASSES and set(folders) == {"train", "val"}
    assert len(list(folders["train"].iterdir())) == 8 * 150 and len(list(folders["val"].iterdir())) == 8 * 50
    cfg = json.loads((run_dir / "config.json").read_text())
    given = ("epochs", "tsne_samples")  # the command line's, over the preset's
    assert all(cfg[k] == v for k, v in ern.PRESETS["demo"].items() if k not in given) and cfg["epochs"] == 1
    assert cfg["preset"] == "demo" and results["evaluated_samples"] == 8 * 50
