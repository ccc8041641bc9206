"""
Float32 training on the CPU, the case of CPUs without native bf16: the CPU preset's model (PRESETS["cpu"],
--amp=false; two blocks a stage, the float32 preset's until 2026-12-05) trained by train_one_epoch in four ways,
side by side in one run, and its validation-style inference (run_inference) in both memory formats.

    python benchmarks/bench_cpu_float32.py --json=bench_cpu_float32.json
    python benchmarks/bench_cpu_float32.py --json=... --rounds=1 --steps=2   # a quick look

Variants: eager or torch.compile (inductor, which compiles C++ for the CPU), each in the contiguous
(NCHW) and the channels_last (NHWC) memory format. Every variant trains its own copy of the same model
(same seed) on the same random uint8 faces through the script's own augmentation; after one untimed warm-up
step (for torch.compile: the compilation, timed apart), rounds of `steps` steps per variant, the order
reversed from round to round so that a change in the machine's load hits every variant. Images/s over the
timed steps; the ratio is against eager contiguous, the script's float32 default before issue 13.
"""

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import emotion_recognition as ern  # noqa: E402
from bench_pipeline import code_version, machine_info  # noqa: E402

VARIANTS = {"eager contiguous": dict(compile=False, channels_last=False),
            "eager channels_last": dict(compile=False, channels_last=True),
            "compile contiguous": dict(compile=True, channels_last=False),
            "compile channels_last": dict(compile=True, channels_last=True)}


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="training steps per variant and round")
    parser.add_argument("--eval_images", type=int, default=2048)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    base = dataclasses.replace(ern.Config(), **ern.PRESETS["cpu"], amp=False, tta_shift=0,
                               tta_zoom=0.0)  # eval: image and mirror
    k, b, s = 8, base.batch_size, base.image_size
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (b * args.steps, 3, s, s), dtype=np.uint8))
    labels = torch.from_numpy(rng.integers(0, k, b * args.steps)).long()
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    states, compile_seconds = {}, {}
    for name in args.variants.split(","):
        cfg = dataclasses.replace(base, **VARIANTS[name])
        torch.manual_seed(0)
        model = ern.place_model(ern.build_model(cfg, k), cfg, device)
        optimizer = ern.make_optimizer(model, cfg)
        scheduler = ern.make_scheduler(optimizer, cfg, args.steps)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        fwd = torch.compile(model) if cfg.compile else model
        states[name] = (cfg, model, fwd, optimizer, scheduler, scaler)
        t0 = time.perf_counter()
        ern.train_one_epoch(fwd, images[:b], labels[:b], mean, std, optimizer, scheduler, scaler, cfg, 0, num_classes=k)
        compile_seconds[name] = time.perf_counter() - t0
        print(f"{name}: first step (warm-up{', compilation' if cfg.compile else ''}) {compile_seconds[name]:.1f} s", flush=True)
    seconds = dict.fromkeys(states, 0.0)
    for r in range(args.rounds):
        for name in list(states)[::1 if r % 2 == 0 else -1]:
            cfg, model, fwd, optimizer, scheduler, scaler = states[name]
            t0 = time.perf_counter()
            ern.train_one_epoch(fwd, images, labels, mean, std, optimizer, scheduler, scaler, cfg, r + 1, num_classes=k)
            seconds[name] += time.perf_counter() - t0
    train_rate = {name: args.rounds * args.steps * b / t for name, t in seconds.items()}
    eval_x = rng.integers(0, 256, (args.eval_images, 3, s, s), dtype=np.uint8)
    eager = [n for n in states if not VARIANTS[n]["compile"]]  # run_inference takes the model itself, never compiled
    eval_seconds = dict.fromkeys(eager, 0.0)
    for name in eager:
        cfg, model = states[name][:2]
        ern.run_inference(model, eval_x[:cfg.eval_batch_size], mean, std, device, cfg)  # warm-up
    for r in range(args.rounds):
        for name in eager[::1 if r % 2 == 0 else -1]:
            cfg, model = states[name][:2]
            t0 = time.perf_counter()
            ern.run_inference(model, eval_x, mean, std, device, cfg)
            eval_seconds[name] += time.perf_counter() - t0
    eval_rate = {name: args.rounds * len(eval_x) / t for name, t in eval_seconds.items()}
    ref = "eager contiguous"
    out = {"command": "python " + shlex.join([os.path.relpath(sys.argv[0])] + argv),
           "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "machine": {**machine_info(device), "cpu_flags": sorted(f for f in ern.cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c"))), "cpu_bf16_native": ern.cpu_has_bf16()},
           "code": code_version(), "model": {k_: getattr(base, k_) for k_ in ("image_size", "stem_stride", "width", "blocks", "batch_size")},
           "rounds": args.rounds, "steps": args.steps, "first_step_seconds": compile_seconds,
           "train_images_per_s": train_rate, "eval_images_per_s_tta": eval_rate,
           "train_ratio_vs_eager_contiguous": {n: v / train_rate[ref] for n, v in train_rate.items()} if ref in train_rate else None}
    Path(args.json).write_text(json.dumps(out, indent=2))
    for name, v in train_rate.items():
        print(f"train {name:24s} {v:7.1f} images/s" + (f"  {v / train_rate[ref]:.2f}x" if ref in train_rate else ""))
    for name, v in eval_rate.items():
        print(f"eval  {name:24s} {v:7.1f} images/s (flip TTA)")


if __name__ == "__main__":
    main(sys.argv[1:])
