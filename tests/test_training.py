"""Training mechanics against independent oracles: the augmentation's geometry (F.affine_grid, OpenCV), random
erasing's area, fp16's GradScaler (skipped steps, resuming without its state), --time_budget, and Ctrl-C
outside the epochs (decoding, the final evaluation)."""
import json
import os
import signal
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, ern, run_script

FAST = [*TINY, "--tsne_samples=0", "--attention_samples=0"]


# ---------------------------------------------------------------------------------------------
# Augmentation geometry
# ---------------------------------------------------------------------------------------------

def test_sampling_grid_is_affine_grid():
    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    want = F.affine_grid(theta, (5, 3, 17, 17), align_corners=False)
    torch.testing.assert_close(ern.sampling_grid(theta, 17), want, rtol=0, atol=1e-6)


def cv2_warp(image, angle, zoom, shift, flip):
    """The same transformation told to OpenCV in pixels: mirror, rotate (cv2's counter-clockwise degrees) and magnify
    about the centre, then move by shift * side; bilinear, mirrored borders."""
    s = image.shape[0]
    c = (s - 1) / 2  # pixel centres at integers
    mirror = np.array([[-1, 0, 2 * c], [0, 1, 0], [0, 0, 1]], np.float64) if flip else np.eye(3)
    rotate = np.vstack([cv2.getRotationMatrix2D((c, c), angle, zoom), [0, 0, 1]])
    move = np.array([[1, 0, shift[0] * s], [0, 1, shift[1] * s], [0, 0, 1]], np.float64)
    m = (move @ rotate @ mirror)[:2]
    return cv2.warpAffine(image, m, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


@pytest.mark.parametrize("angle, zoom, shift, flip", [
    (0.0, 1.0, (0.0, 0.0), True), (30.0, 1.0, (0.0, 0.0), False), (-10.0, 1.0, (0.0, 0.0), True),
    (0.0, 1.2, (0.0, 0.0), False), (0.0, 0.85, (0.0, 0.0), False), (0.0, 1.0, (0.1, 0.0), False),
    (0.0, 1.0, (0.0, -0.15), False), (20.0, 1.1, (0.05, 0.1), True)])
def test_affine_theta_is_the_rotation_zoom_shift_and_flip_opencv_makes(angle, zoom, shift, flip):
    """Degrees (not radians), magnification for zoom > 1, shift (right, down) in fractions of the side, a left-right
    mirror: checked on an asymmetric smooth picture against cv2.warpAffine, away from the borders."""
    s = 64
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    blob = lambda x0, y0, r: np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * r ** 2))
    image = blob(22, 26, 5) + 0.6 * blob(40, 30, 3) + 0.8 * blob(30, 42, 4)  # three blobs: no symmetry
    theta = ern.affine_theta(torch.tensor([angle]), torch.tensor([zoom]), torch.tensor([shift]), torch.tensor([flip]))
    ours = F.grid_sample(torch.from_numpy(image)[None, None], ern.sampling_grid(theta, s), mode="bilinear",
                         padding_mode="reflection", align_corners=False)[0, 0].numpy()
    want = cv2_warp(image, angle, zoom, shift, flip)
    inner = (slice(8, -8), slice(8, -8))
    assert np.abs(ours[inner] - want[inner]).max() < 0.02
    assert np.abs(image[inner] - want[inner]).max() > 0.1 or (angle, zoom, shift, flip) == (0.0, 1.0, (0.0, 0.0), False)


def test_augment_batch_draws_each_geometry_within_its_range(monkeypatch):
    """The extreme draws (uniform at +-1) give exactly the configured rotation, zoom and shift."""
    cfg = ern.Config(aug_rotate=12.0, aug_scale=0.2, aug_translate=0.1, aug_flip=0.5, aug_brightness=0.0,
                     aug_contrast=0.0, aug_erase=0.0)
    seen = []
    real = ern.affine_theta
    monkeypatch.setattr(ern, "affine_theta", lambda *a: seen.append(a) or real(*a))
    torch.manual_seed(0)
    ern.augment_batch(torch.zeros(4000, 3, 8, 8, dtype=torch.uint8), torch.zeros(3), torch.ones(3), cfg)
    angle, zoom, shift, flip = (torch.cat(t) for t in zip(*seen))
    for values, low, high in ((angle, -12, 12), (zoom, 0.8, 1.2), (shift, -0.1, 0.1)):
        assert values.min() >= low - 1e-6 and values.max() <= high + 1e-6
        assert values.min() < low + 0.05 * (high - low) and values.max() > high - 0.05 * (high - low)
    assert 0.45 < flip.float().mean() < 0.55


def test_erased_rectangles_cover_the_configured_area_and_aspect():
    torch.manual_seed(0)
    s = 400
    masks = ern.erase_mask(1500, s, torch.device("cpu"))[:, 0]
    rows, cols = masks.any(2).sum(1).float(), masks.any(1).sum(1).float()
    area = masks.sum((1, 2)).float() / s ** 2
    inside = ~(masks[:, 0].any(1) | masks[:, -1].any(1) | masks[:, :, 0].any(1) | masks[:, :, -1].any(1))
    assert torch.equal(area, rows * cols / s ** 2)  # one solid rectangle each
    a, aspect = area[inside], (rows / cols)[inside]
    low, high = ern.ERASE_AREA
    assert a.min() >= low * 0.93 and a.max() <= high * 1.07  # whole pixels around a real-valued rectangle
    assert a.min() < low * 1.2 and a.max() > high * 0.9
    assert aspect.min() >= ern.ERASE_ASPECT[0] * 0.9 and aspect.max() <= ern.ERASE_ASPECT[1] * 1.1
    assert (area <= high * 1.07).all()  # clipped ones are smaller


# ---------------------------------------------------------------------------------------------
# fp16's GradScaler: skipped steps, resuming without its state
# ---------------------------------------------------------------------------------------------

def test_a_step_the_scaler_skips_moves_neither_the_schedule_nor_the_ema():
    """A scale so large that the first scaled loss overflows: the scaler skips steps (AdamW's own step count is the
    oracle); the schedule and the EMA count only the steps taken."""
    cfg = ern.Config(batch_size=8, epochs=2, width=0.125, blocks="1,1,1,1", aug_erase=0.0, ema_decay=0.99,
                     channels_last=False)
    torch.manual_seed(0)
    model = ern.build_model(cfg, 8)
    optimizer = ern.make_optimizer(model, cfg)
    scheduler = ern.make_scheduler(optimizer, cfg, 6)
    scaler = torch.amp.GradScaler("cpu", init_scale=3e38)  # the loss is about 2: the first scaled losses overflow
    ema = ern.EMA(model, cfg.ema_decay)
    updates = []
    real_update = ema.update
    ema.update = lambda step: updates.append(step) or real_update(step)
    images = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8)
    ern.train_one_epoch(model, images, torch.arange(48) % 8, torch.full((3,), 0.5), torch.full((3,), 0.25), optimizer,
                        scheduler, scaler, cfg, 1, num_classes=8, ema=ema)
    taken = int(optimizer.state[next(model.parameters())]["step"])
    assert 0 < taken < 6, "no step skipped: make the initial scale larger"
    assert scheduler.last_epoch == taken
    assert updates == list(range(taken))


def test_resuming_a_run_saved_without_fp16_into_an_fp16_scaler(tmp_path):
    """A last.pth from a bf16 GPU or a CPU holds an empty scaler state; an fp16 GPU resumes it with a fresh scaler."""
    cfg = ern.Config(width=0.125, blocks="1,1,1,1", image_size=32)
    model = ern.build_model(cfg, 8)
    optimizer = ern.make_optimizer(model, cfg)
    scheduler = ern.make_scheduler(optimizer, cfg, 4)
    saved_scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = ern.training_state(optimizer, scheduler, saved_scaler, None, [{"epoch": 1}], {"val_accuracy": 0.5, "epoch": 1})
    ckpt = ern.checkpoint_dict(model, cfg, [str(i) for i in range(8)], torch.zeros(3), torch.ones(3), 1, {}, **state)
    ern.atomic_save(ckpt, tmp_path / "last.pth")
    ckpt = ern.load_checkpoint(tmp_path / "last.pth")
    assert ckpt["scaler"] == {}
    fp16_scaler = torch.amp.GradScaler("cpu", enabled=True)
    history, best, start = ern.restore_training_state(ckpt, model, optimizer, scheduler, fp16_scaler, None)
    assert (history, best["epoch"], start) == ([{"epoch": 1}], 1, 2)
    assert fp16_scaler.get_scale() == 2.0 ** 16  # a fresh scaler's


# ---------------------------------------------------------------------------------------------
# --time_budget
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget, fixed, epoch, most, want", [
    (1800, 300, 100, 18, 15), (1800, 300, 60, 18, 18), (1800, 1700, 300, 18, 1), (1800, 0, 450, 18, 4),
    (1800, 200, 400, 18, 4)])
def test_epochs_within_the_budget(budget, fixed, epoch, most, want):
    assert ern.epochs_within(budget, fixed, epoch, most) == want


def test_time_budget_plans_the_epochs_saves_them_and_trains_as_that_many_epochs(tiny_dataset, tmp_path, monkeypatch):
    """A budget too small for more than one epoch: the run trains 1 epoch (config, provenance, log), with the weights of
    a plain --epochs=1 run (the measurement leaves the random state as it found it); a resume does not measure again."""
    common = [*FAST, f"--data_dir={tiny_dataset}", f"--cache_dir={tmp_path / 'cache'}", "--deterministic=true", "--seed=3"]
    run_script(*common, "--epochs=3", "--time_budget=0.001", f"--output_dir={tmp_path / 'budget'}", cwd=tmp_path)
    run_script(*common, "--epochs=1", f"--output_dir={tmp_path / 'plain'}", cwd=tmp_path)
    budget = tmp_path / "budget"
    assert json.loads((budget / "config.json").read_text())["epochs"] == 1
    plan = json.loads((budget / "provenance.json").read_text())[0]["time_budget_plan"]
    assert plan["epochs"] == 1 and plan["max_epochs"] == 3 and plan["step_seconds"] > 0
    assert "time budget 0.001 min" in (budget / "train.log").read_text()
    assert len((budget / "metrics.jsonl").read_text().splitlines()) == 1
    want = torch.load(tmp_path / "plain" / "final_emotion_model.pth", weights_only=True)["model"]
    got = torch.load(budget / "final_emotion_model.pth", weights_only=True)["model"]
    assert all(torch.equal(want[k], got[k]) for k in want)

    monkeypatch.setattr(ern, "plan_epochs", lambda *a, **k: pytest.fail("a resume measured again"))
    monkeypatch.chdir(tmp_path)
    ern.main([f"--resume={budget / 'last.pth'}"])
    assert json.loads((budget / "config.json").read_text())["epochs"] == 1



def test_plan_epochs_from_timings_by_hand(monkeypatch):
    """Training and inference replaced by sleeps of known length (20 ms a step, 1 ms a face): the plan's step, epoch and
    final-evaluation times and its epoch count, computed by hand, within the clock's jitter."""
    cfg = ern.Config(batch_size=100, epochs=1000, time_budget=0.5, attention_samples=2000, width=0.125,
                     blocks="1,1,1,1", image_size=32)
    monkeypatch.setattr(ern, "train_one_epoch",
                        lambda model, images, *a, **k: time.sleep(0.02 * (len(images) // 100)) or {})
    monkeypatch.setattr(ern, "run_inference", lambda model, images, *a, **k: time.sleep(0.001 * len(images)))
    train_x, train_y = torch.zeros(1000, 3, 32, 32, dtype=torch.uint8), torch.zeros(1000, dtype=torch.long)
    val = ern.Split("val", ["v.jpg"] * 500, np.zeros(500, np.int64), np.zeros((500, 4), np.float32),
                    images=np.zeros((500, 3, 32, 32), np.uint8))
    plan = ern.plan_epochs(ern.build_model(cfg, 8), train_x, train_y, val, 200, torch.zeros(3), torch.ones(3), cfg,
                           torch.device("cpu"), 8)
    epoch_s = 10 * 0.02 + 500 * 0.001  # 10 steps of 100 faces, a validation pass over 500
    final_s = 200 * 0.001 + 200 / 100 * 0.02  # a pass over the 200 evaluated faces, attention maps for the 200
    measuring_s = 0.02 + 3 * 0.02 + 500 * 0.001  # a warm-up step, 3 timed steps, 500 validation faces
    assert plan["step_seconds"] == pytest.approx(0.02, rel=0.25)
    assert plan["epoch_seconds"] == pytest.approx(epoch_s, rel=0.1)
    assert plan["final_evaluation_seconds"] == pytest.approx(final_s, rel=0.1)
    want = (30 * 0.95 - measuring_s - final_s) / epoch_s  # 95 % of 30 s
    assert abs(plan["epochs"] - want) <= 3, (plan, want)
    assert plan["expected_minutes"] <= 0.5


# ---------------------------------------------------------------------------------------------
# Ctrl-C outside the epochs
# ---------------------------------------------------------------------------------------------

def test_ctrl_c_while_decoding_stops_soon_and_leaves_no_partial_cache(tmp_path, monkeypatch):
    data = ern.make_synthetic_dataset(tmp_path / "data", per_class=(40, 0, 0), size=32, seed=0)
    cfg = ern.Config(data_dir=str(data), cache_dir=str(tmp_path / "cache"), image_size=32, decode_threads=1)
    _, folders, _ = ern.read_data_yaml(data)
    split, _ = ern.scan_split("train", folders["train"], 8)
    calls = []
    real = ern.decode_image

    def decode(path):
        calls.append(path)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: delivered to the main thread, which waits on the pool
        time.sleep(0.005)  # a real photo's decode time, GIL released (as cv2 does): the main thread gets to run
        return real(path)

    monkeypatch.setattr(ern, "decode_image", decode)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            ern.load_split_pixels(split, cfg)
    finally:
        signal.signal(signal.SIGINT, old)
    assert len(calls) <= 3 + 4 < len(split), f"{len(calls)} of {len(split)} images decoded after Ctrl-C"
    assert list(Path(cfg.cache_dir).iterdir()) == []


def test_ctrl_c_during_the_final_evaluation_is_one_message_with_the_evaluate_command(tiny_dataset, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ern, "write_evaluation", interrupted)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        ern.main([*FAST, f"--data_dir={tiny_dataset}", "--epochs=1", f"--output_dir={tmp_path / 'run'}"])
    assert stop.value.code == 130
    log = (tmp_path / "run" / "train.log").read_text()
    assert "interrupted during the final evaluation" in log
    command = log.strip().splitlines()[-1].split()
    assert command[-1] == f"--evaluate={tmp_path / 'run' / 'best_emotion_model.pth'}"
    assert (tmp_path / "run" / "best_emotion_model.pth").exists()
