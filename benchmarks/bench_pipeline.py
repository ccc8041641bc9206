"""
ERN's data path on the real dataset, measured in one run on one machine: input pipeline, decode
cache, training feed, memory. Every comparison measures both sides in the same run and quotes the ratio.

    python benchmarks/bench_pipeline.py --data_dir=data/affectnet/YOLO_format --json=bench_pipeline.json
    python benchmarks/bench_pipeline.py --data_dir=... --json=... --quick   # a subset, under a minute

1. Input pipeline, images/s to augmented, normalized float batches. Ours: the script's cached uint8
   array on the device and augment_batch on index slices of a permutation (as train_one_epoch does).
   Baseline: the per-sample way, PIL decode + torchvision transforms.v2 with the same augmentations
   (RandomAffine with the same zoom, shift and rotation, bilinear; RandomHorizontalFlip; ColorJitter
   brightness and contrast; ToDtype + Normalize; RandomErasing) in a DataLoader with 2 workers. Every
   box of this dataset covers its whole 96 px image, so the baseline needs no crop.
2. Decode cache: seconds to build it for train + valid in a fresh cache folder (scan_split +
   load_split_pixels), and seconds to reload it, which is what every later run does (scan the
   labels, stat the files for the cache key, memory-map the array).
3. Training images/s of the default model (96 px, width 1.0: a few steps, slow on a CPU) and of
   the CPU preset's model (PRESETS["cpu"]), through train_one_epoch fed by our pipeline, and by
   pre-made random tensors of the same shape (augment_batch swapped out: the compute bound). Where
   the script autocasts (CUDA; a CPU with native bf16), the preset's model also trains in float32,
   rounds alternating, for the speedup of autocast.
4. Peak resident memory (ru_maxrss) after each phase, beside the decoded dataset's and the model's size.

Times are time.perf_counter over the measured steps only; warm-up steps are excluded. A benchmark,
not a test: it prints a table and writes JSON, and asserts nothing about time. The targets in the
table are the ones the project set for a 2-core CPU machine.

The baseline needs torchvision, which the scripts and tests do not use (not in requirements.txt): install the build
that matches your torch, from the index your torch came from.
"""

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import itertools
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import emotion_recognition as ern  # noqa: E402

# How much each phase measures. quick: a subset, under a minute on 2 cores.
PLANS = {
    "full": dict(
        cache_samples=0,  # per split; 0 = all (the 22,507 images of train + valid)
        pipeline_rounds=3,  # rounds of (ours, baseline), alternating
        pipeline_batches=44,  # batches of ours per round (3 x 44: about one epoch of train)
        baseline_batches=14,  # DataLoader batches timed per round, after one warm-up batch per worker
        small_samples=4096,  # train samples decoded at the CPU preset's size
        small_rounds=3, small_steps=2, small_batch=128,  # rounds of (steps with our pipeline, with random tensors)
        default_rounds=2, default_steps=1, default_batch=128,
    ),
    "quick": dict(
        cache_samples=1000, pipeline_rounds=2, pipeline_batches=4, baseline_batches=3, small_samples=1000,
        small_rounds=1, small_steps=1, small_batch=32, default_rounds=1, default_steps=1, default_batch=8,
    ),
}
WARMUP_BATCHES = 3  # of augment_batch: first-call allocations
BASELINE_WORKERS = 2
TARGETS = {"pipeline_speedup": 10.0, "compute_bound_fraction": 0.9, "cache_reload_seconds": 3.0}


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------

def peak_rss_mb(who=resource.RUSAGE_SELF):
    kb = resource.getrusage(who).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return kb / 2**20 if sys.platform == "darwin" else kb / 2**10


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(device):
    cpu = ern.cpu_model()
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "numpy": np.__version__, "pillow": PIL.__version__, "platform": platform.platform(),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")},
    }


def code_version():
    """The commit and the hash of emotion_recognition.py as measured (it may differ from the commit)."""
    script = Path(ern.__file__)
    git = subprocess.run(["git", "-C", str(script.parent), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {"git_commit": git.stdout.strip() or None, "emotion_recognition_sha1": hashlib.sha1(script.read_bytes()).hexdigest()[:12]}


# ---------------------------------------------------------------------------------------------
# 2. Decode cache: build and reload, through the script's own functions
# ---------------------------------------------------------------------------------------------

def load_splits(cfg, folders, num_classes, keypoint_values, limit):
    """scan_split + load_split_pixels for train and val (an evenly spaced `limit` samples of each
    if limit > 0): ({name: Split with images}, samples scanned, seconds scanning, seconds in load_split_pixels)."""
    splits, scanned, t_scan, t_pixels = {}, 0, 0.0, 0.0
    for name in ("train", "val"):
        t0 = time.perf_counter()
        split, problems, *_ = ern.scan_split(name, folders[name], num_classes, keypoint_values)
        t1 = time.perf_counter()
        scanned += len(split)
        if limit and limit < len(split):
            split = split.subset(np.arange(len(split)) % (len(split) // limit) == 0)  # both formats, every class
        ok, found = ern.load_split_pixels(split, cfg)
        t2 = time.perf_counter()
        if problems or found or not ok.all():
            raise ern.UserError(f"{name}: {len(problems) + len(found)} dataset problem(s), e.g. {(problems + found)[:3]}")
        splits[name] = split
        t_scan, t_pixels = t_scan + t1 - t0, t_pixels + t2 - t1
    return splits, scanned, t_scan, t_pixels


# ---------------------------------------------------------------------------------------------
# 1. Input pipeline: ours against the per-sample baseline
# ---------------------------------------------------------------------------------------------

def time_augment(images, mean, std, cfg, batches, device):
    """(images, seconds) of augment_batch on index slices of a permutation, after WARMUP_BATCHES."""
    n, b = images.shape[0], cfg.batch_size
    steps = n // b
    perm = torch.randperm(n, device=device)
    for step in range(WARMUP_BATCHES + batches):
        if step == WARMUP_BATCHES:
            sync(device)
            t0 = time.perf_counter()
        s = step % steps
        if s == 0 and step:
            perm = torch.randperm(n, device=device)
        x = ern.augment_batch(images.index_select(0, perm[s * b:(s + 1) * b]), mean, std, cfg)  # as train_one_epoch
    sync(device)
    assert x.dtype == torch.float32 and x.shape == (b, 3, cfg.image_size, cfg.image_size)
    return batches * b, time.perf_counter() - t0


def per_sample_transform(cfg, mean, std):
    """torchvision transforms.v2 with augment_batch's augmentations, on PIL images (faster than on tensors here)."""
    return v2.Compose([
        v2.RandomAffine(degrees=cfg.aug_rotate, translate=(cfg.aug_translate, cfg.aug_translate),
                        scale=(1 - cfg.aug_scale, 1 + cfg.aug_scale), interpolation=v2.InterpolationMode.BILINEAR),
        v2.RandomHorizontalFlip(cfg.aug_flip),
        v2.ColorJitter(brightness=cfg.aug_brightness, contrast=cfg.aug_contrast),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean.tolist(), std.tolist()),
        v2.RandomErasing(p=cfg.aug_erase, scale=(0.02, 0.25), ratio=(0.3, 3.3), value=0.0),
    ])


class PerSampleDataset(torch.utils.data.Dataset):
    """The per-sample way: decode one file with PIL, augment it, every time it is drawn."""

    def __init__(self, paths, labels, transform):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB")), int(self.labels[i])


def time_decode(paths):
    """images/s of PIL decoding alone, in this process: the part of the baseline no augmentation can speed up."""
    t0 = time.perf_counter()
    for p in paths:
        with Image.open(p) as image:
            image.convert("RGB")
    return len(paths) / (time.perf_counter() - t0)


def time_baseline(split, transform, batches, batch_size, seed):
    """(images, seconds) of the DataLoader over a random subset, after one warm-up batch per worker (start-up)."""
    pick = np.random.default_rng(seed).choice(len(split), (batches + BASELINE_WORKERS) * batch_size, replace=False)
    dataset = PerSampleDataset([split.paths[i] for i in pick], split.labels[pick], transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=BASELINE_WORKERS,
                                         drop_last=True)
    seen = 0
    for step, (x, y) in enumerate(loader):
        if step == BASELINE_WORKERS - 1:
            t0 = time.perf_counter()
        elif step >= BASELINE_WORKERS:
            seen += x.shape[0]
    assert x.dtype == torch.float32 and x.shape[0] == batch_size
    return seen, time.perf_counter() - t0


def rate(runs):
    """images/s over (images, seconds) runs pooled."""
    return sum(n for n, _ in runs) / sum(t for _, t in runs)


# ---------------------------------------------------------------------------------------------
# 3. Training throughput: train_one_epoch fed by our pipeline, and by pre-made random tensors
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def augment_replaced_by(batches):
    """train_one_epoch with augment_batch swapped for pre-made tensors: the same loop without the input pipeline."""
    original, feed = ern.augment_batch, itertools.cycle(batches)
    ern.augment_batch = lambda x, mean, std, cfg: next(feed)
    try:
        yield
    finally:
        ern.augment_batch = original


def time_training(cfg, images, labels, mean, std, device, num_classes, rounds, steps, variants=None):
    """Training images/s per variant {name: (feed, config)}, feed "pipeline" (ours) or "random" (pre-made
    tensors); default: both feeds with cfg. One model per variant, built alike (seed, channels_last as the
    script does); one warm-up step each, then rounds of `steps` steps per variant, the order reversed
    from round to round so that a change in the machine's load hits all of them."""
    variants = variants or {"pipeline": ("pipeline", cfg), "random": ("random", cfg)}
    b, s = cfg.batch_size, cfg.image_size
    premade = [torch.randn(b, 3, s, s, device=device) for _ in range(2)]
    states = {}
    for name, (feed, c) in variants.items():
        torch.manual_seed(c.seed)
        model = ern.place_model(ern.build_model(c, num_classes), c, device)
        optimizer = ern.make_optimizer(model, c)
        scheduler = ern.make_scheduler(optimizer, c, max(1, len(labels) // b))
        scaler = torch.amp.GradScaler(device.type, enabled=ern.autocast_dtype(c, device) == torch.float16)
        states[name] = (feed, c, model, optimizer, scheduler, scaler)

    def run(name, n_steps, epoch):
        feed, c, model, optimizer, scheduler, scaler = states[name]
        pick = torch.randperm(len(labels), device=device)[:n_steps * b]
        x, y = images[pick], labels[pick]
        with augment_replaced_by(premade) if feed == "random" else contextlib.nullcontext():
            sync(device)
            t0 = time.perf_counter()
            ern.train_one_epoch(model, x, y, mean, std, optimizer, scheduler, scaler, c, epoch, num_classes=num_classes)
            sync(device)
        return time.perf_counter() - t0

    for name in states:
        run(name, 1, 0)
    seconds = dict.fromkeys(states, 0.0)
    for r in range(rounds):
        for name in list(states)[::1 if r % 2 == 0 else -1]:
            seconds[name] += run(name, steps, r + 1)
    return {name: rounds * steps * b / t for name, t in seconds.items()}, ern.count_parameters(model)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def table(rows):
    head = ("measurement", "ours", "compared with", "ratio", "target", "met")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(str(v).ljust(w) if i in (0, 2, 5) else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
    return "\n".join([line(head), "  ".join("-" * w for w in widths), *map(line, rows)])


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="folder holding data.yaml (the AffectNet YOLO export)")
    parser.add_argument("--json", required=True, help="where to write the figures")
    parser.add_argument("--quick", action="store_true", help="a subset of everything, under a minute")
    parser.add_argument("--tmp_dir", default=tempfile.gettempdir(), help="parent of the fresh cache folders (removed at the end)")
    args = parser.parse_args(argv)
    plan = PLANS["quick" if args.quick else "full"]
    t_run = time.perf_counter()
    device = ern.resolve_device("auto")
    load_start = os.getloadavg()
    cache_root = Path(tempfile.mkdtemp(prefix="ern_bench_", dir=args.tmp_dir))
    phase_rss = {"import": peak_rss_mb()}  # torch and torchvision alone
    out = {"command": "python " + shlex.join([os.path.relpath(sys.argv[0])] + argv),
           "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "mode": "quick" if args.quick else "full", "machine": machine_info(device), "code": code_version(), "plan": plan}
    # train() wraps the read-only memory-mapped cache the same way; torch warns once about it
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    try:
        cfg = ern.Config(data_dir=args.data_dir, cache_dir=str(cache_root / "cache96"))  # the defaults: 96 px
        class_names, folders, _, keypoint_values = ern.read_data_yaml(cfg.data_dir)
        k = len(class_names)

        # 2. the decode cache, built in a fresh folder, then reloaded as a later run does
        splits, scanned, scan_s, build_s = load_splits(cfg, folders, k, keypoint_values, plan["cache_samples"])
        _, _, reload_scan_s, reload_pixels_s = load_splits(cfg, folders, k, keypoint_values, plan["cache_samples"])
        cached = sum(len(s) for s in splits.values())
        out.update(cache_images=cached, cache_build_seconds=scan_s + build_s, cache_build_decode_seconds=build_s,
                   cache_reload_seconds=reload_scan_s + reload_pixels_s, cache_reload_scan_seconds=reload_scan_s,
                   cache_reload_key_and_mmap_seconds=reload_pixels_s)
        if not plan["cache_samples"]:  # the whole of what a later run does: also duplicates and the data report
            t0 = time.perf_counter()
            ern.load_dataset(cfg, splits_wanted=("train", "val"))
            out["cache_reload_load_dataset_seconds"] = time.perf_counter() - t0
        per_image = 3 * cfg.image_size ** 2
        out.update(decoded_dataset_bytes=scanned * per_image, decoded_dataset_images=scanned,
                   decoded_bytes_this_run=cached * per_image)
        phase_rss["cache"] = peak_rss_mb()

        # 1. input pipeline at 96 px: ours (the array as train() puts it on the device) against the baseline,
        #    in alternating rounds so that a change in the machine's load hits both
        train = splits["train"]
        mean, std = (t.to(device) for t in ern.dataset_normalization(train.images))
        t0 = time.perf_counter()
        train_x = torch.from_numpy(np.ascontiguousarray(train.images)).to(device)
        train_y = torch.from_numpy(train.labels).to(device)
        out["dataset_to_device_seconds"] = time.perf_counter() - t0
        transform = per_sample_transform(cfg, mean.cpu(), std.cpu())
        torch.manual_seed(cfg.seed)
        ours_runs, base_runs = [], []
        for r in range(plan["pipeline_rounds"]):
            ours_runs.append(time_augment(train_x, mean, std, cfg, plan["pipeline_batches"], device))
            base_runs.append(time_baseline(train, transform, plan["baseline_batches"], cfg.batch_size, cfg.seed + r))
        ours, baseline = rate(ours_runs), rate(base_runs)
        phase_rss["pipeline"] = peak_rss_mb()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        ours_1t = rate([time_augment(train_x, mean, std, cfg, plan["pipeline_batches"], device)])
        torch.set_num_threads(threads)
        decode = time_decode(train.paths[::max(1, len(train) // 1000)])
        ours_rounds, base_rounds = [n / t for n, t in ours_runs], [n / t for n, t in base_runs]
        out.update(ours_images_per_s=ours, baseline_images_per_s=baseline, pipeline_speedup=ours / baseline,
                   ours_images_per_s_per_round=ours_rounds, baseline_images_per_s_per_round=base_rounds,
                   ours_1_thread_images_per_s=ours_1t, baseline_decode_only_1_process_images_per_s=decode,
                   pipeline_batch_size=cfg.batch_size, pipeline_image_size=cfg.image_size)

        # 3a. PRESETS['cpu']'s model (two blocks a stage, as where bf16 is native) at its size, fed from its own cache of
        # a train subset
        small = dataclasses.replace(cfg, **{**ern.PRESETS["cpu"], "batch_size": plan["small_batch"]},
                                    cache_dir=str(cache_root / "cache_preset"))
        sub, *_ = ern.scan_split("train", folders["train"], k, keypoint_values)
        sub = sub.subset(np.arange(len(sub)) % (len(sub) // plan["small_samples"]) == 0)
        ok, found = ern.load_split_pixels(sub, small)
        if found or not ok.all():
            raise ern.UserError(f"train at {small.image_size} px: {len(found)} dataset problem(s), e.g. {found[:3]}")
        small_x = torch.from_numpy(np.ascontiguousarray(sub.images)).to(device)
        small_y = torch.from_numpy(sub.labels).to(device)
        small_mean, small_std = (t.to(device) for t in ern.dataset_normalization(sub.images))
        out["ours_preset_images_per_s"] = rate([time_augment(small_x, small_mean, small_std, small, 10 if args.quick else 30, device)])
        ips, small_params = time_training(small, small_x, small_y, small_mean, small_std, device, k,
                                          plan["small_rounds"], plan["small_steps"])
        out.update(small_model={"preset": "cpu", "width": small.width, "blocks": small.blocks, "image_size": small.image_size,
                                "stem_stride": small.stem_stride, "batch_size": small.batch_size, "parameters": small_params, "samples_cached": len(sub),
                                "steps_per_feed": plan["small_rounds"] * plan["small_steps"]},
                   train_small_pipeline_images_per_s=ips["pipeline"], train_small_random_images_per_s=ips["random"],
                   compute_bound_fraction=ips["pipeline"] / ips["random"])
        amp_dtype = ern.autocast_dtype(small, device)
        if amp_dtype is not None:  # the same model in float32, in the same layout
            ips, _ = time_training(small, small_x, small_y, small_mean, small_std, device, k, plan["small_rounds"],
                                   plan["small_steps"], {"fp32": ("pipeline", dataclasses.replace(small, amp=False)),
                                                         "autocast": ("pipeline", small)})
            out.update(autocast_dtype=str(amp_dtype), channels_last=small.channels_last,
                       train_small_fp32_images_per_s=ips["fp32"], train_small_autocast_images_per_s=ips["autocast"],
                       autocast_speedup=ips["autocast"] / ips["fp32"])
        del small_x, small_y
        phase_rss["small_model"] = peak_rss_mb()

        # 3b. the default model at 96 px: a few steps
        default = dataclasses.replace(cfg, batch_size=plan["default_batch"])
        ips, default_params = time_training(default, train_x, train_y, mean, std, device, k,
                                            plan["default_rounds"], plan["default_steps"])
        out.update(default_model={"width": default.width, "blocks": default.blocks, "image_size": default.image_size,
                                  "batch_size": default.batch_size, "parameters": default_params,
                                  "steps_per_feed": plan["default_rounds"] * plan["default_steps"]},
                   train_default_pipeline_images_per_s=ips["pipeline"], train_default_random_images_per_s=ips["random"],
                   compute_bound_fraction_default=ips["pipeline"] / ips["random"])
        phase_rss["default_model"] = peak_rss_mb()
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)

    # 4. memory: the high-water mark after each phase, against the decoded dataset and the model
    model_bytes = default_params * 4  # float32 weights of the default model
    out.update(peak_rss_mb=peak_rss_mb(), peak_rss_mb_data_path=phase_rss["pipeline"], peak_rss_mb_after_phase=phase_rss,
               peak_rss_mb_dataloader_worker=peak_rss_mb(resource.RUSAGE_CHILDREN), model_bytes=model_bytes,
               small_model_bytes=small_params * 4, memory_target_mb=(2 * out["decoded_dataset_bytes"] + model_bytes) / 2**20,
               loadavg_start=load_start, loadavg_end=os.getloadavg(), wall_seconds=time.perf_counter() - t_run)
    mem_target = out["memory_target_mb"]
    out["targets"] = {
        "pipeline_speedup >= 10": out["pipeline_speedup"] >= TARGETS["pipeline_speedup"],
        "compute_bound_fraction >= 0.9": out["compute_bound_fraction"] >= TARGETS["compute_bound_fraction"],
        "cache_reload_seconds < 3 (22,507 images)": None if args.quick else out["cache_reload_seconds"] < TARGETS["cache_reload_seconds"],
        "peak_rss_mb < 2 x dataset + model": out["peak_rss_mb"] < mem_target,
        "peak_rss_mb_data_path < 2 x dataset + model": out["peak_rss_mb_data_path"] < mem_target,
    }

    yes = lambda ok: "n/a" if ok is None else "yes" if ok else "NO"
    size = f"{cfg.image_size}px b{cfg.batch_size}"
    rows = [
        (f"input pipeline, img/s ({size})", f"{ours:,.0f}", f"per-sample DataLoader x{BASELINE_WORKERS}: {baseline:,.0f}",
         f"{out['pipeline_speedup']:.1f}x", ">= 10x", yes(out["pipeline_speedup"] >= 10)),
        ("  per round: ours | baseline", f"{min(ours_rounds):,.0f}..{max(ours_rounds):,.0f}",
         f"{min(base_rounds):,.0f}..{max(base_rounds):,.0f}",
         f"{min(o / b for o, b in zip(ours_rounds, base_rounds)):.1f}..{max(o / b for o, b in zip(ours_rounds, base_rounds)):.1f}x", "", ""),
        ("  ours, 1 torch thread", f"{ours_1t:,.0f}", "", "", "", ""),
        (f"  ours at {small.image_size}px", f"{out['ours_preset_images_per_s']:,.0f}", "", "", "", ""),
        ("  baseline: PIL decode alone, 1 process", "", f"{out['baseline_decode_only_1_process_images_per_s']:,.0f}", "", "", ""),
        (f"train img/s, cpu preset ({small.image_size}px w{small.width})", f"{out['train_small_pipeline_images_per_s']:,.1f}",
         f"random tensors: {out['train_small_random_images_per_s']:,.1f}", f"{out['compute_bound_fraction']:.1%}", ">= 90%",
         yes(out["compute_bound_fraction"] >= 0.9)),
    ]
    if "autocast_speedup" in out:
        rows.append((f"  autocast {out['autocast_dtype'].split('.')[-1]}{' + channels_last' if out['channels_last'] else ''}",
                     f"{out['train_small_autocast_images_per_s']:,.1f}", f"float32: {out['train_small_fp32_images_per_s']:,.1f}",
                     f"{out['autocast_speedup']:.2f}x", "", ""))
    rows += [
        (f"train img/s, default ({cfg.image_size}px w{default.width} b{default.batch_size})",
         f"{out['train_default_pipeline_images_per_s']:,.2f}", f"random tensors: {out['train_default_random_images_per_s']:,.2f}",
         f"{out['compute_bound_fraction_default']:.1%}", "", ""),
        (f"cache build, s ({cached:,} images)", f"{out['cache_build_seconds']:.1f}", f"decode {build_s:.1f} + scan {scan_s:.1f}", "", "", ""),
        (f"cache reload, s ({cached:,} images)", f"{out['cache_reload_seconds']:.2f}",
         f"scan {reload_scan_s:.2f} + key/mmap {reload_pixels_s:.2f}", "", "< 3 s", yes(out["targets"]["cache_reload_seconds < 3 (22,507 images)"])),
    ]
    if "cache_reload_load_dataset_seconds" in out:
        rows.append(("  reload via load_dataset, s", f"{out['cache_reload_load_dataset_seconds']:.2f}", "", "", "", ""))
    rows += [
        ("peak RSS, MB (whole run)", f"{out['peak_rss_mb']:,.0f}", f"2 x dataset {out['decoded_dataset_bytes'] / 2**20:,.0f} + model "
         f"{model_bytes / 2**20:,.0f} = {mem_target:,.0f}", f"{out['peak_rss_mb'] / mem_target:.2f}", "< 1.00",
         yes(out["peak_rss_mb"] < mem_target)),
        ("peak RSS, MB (data path, before any model)", f"{out['peak_rss_mb_data_path']:,.0f}", f"{mem_target:,.0f}",
         f"{out['peak_rss_mb_data_path'] / mem_target:.2f}", "< 1.00", yes(out["peak_rss_mb_data_path"] < mem_target)),
        *[(f"  peak after {name}", f"{mb:,.0f}", "", "", "", "") for name, mb in phase_rss.items()],
        ("  DataLoader worker peak", f"{out['peak_rss_mb_dataloader_worker']:,.0f}", "", "", "", ""),
    ]
    print(table(rows))
    print(f"\n{out['machine']['cpu']} x{out['machine']['cpus_usable']}, {device}, torch {torch.__version__} "
          f"({out['machine']['torch_threads']} threads), load average {load_start[0]:.1f} -> {out['loadavg_end'][0]:.1f}; "
          f"{out['wall_seconds']:.0f} s; {out['mode']} run")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main(sys.argv[1:])
