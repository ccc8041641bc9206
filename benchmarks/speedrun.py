"""
The CPU preset's speedrun table (issue 24), airbench style: the preset's protocol in float32 with named changes
added one at a time, in a fixed order, each row one run of emotion_recognition.py under the same time budget.

    python benchmarks/speedrun.py --data_dir=../shared/data/affectnet/YOLO_format --out=/tmp/speedrun \
        [--budget=30] [--seeds=0] [--isa=AVX2] [--rows=all | --rows=old,+val subset,...] [--extra="--cache_dir=..."]

Each row is `--preset=cpu --amp=false --time_budget=BUDGET` (`--bf16`: --amp=true; in float32 the preset trains one
block a stage) plus the changes of every row run above it (a row named with a leading "=" replaces them instead: a
standalone comparison). --isa sets ONEDNN_MAX_CPU_ISA, so that a wider CPU runs the kernels of a narrower one (AVX2
stands in for a 2-core AVX2 CPU: relative figures only). Prints the cumulative table (the epochs planned, a fraction
where the last pass was cut; seconds per epoch; minutes from process start to exit; the final epoch's and the best
epoch's validation accuracy and macro-F1, each on the whole split with the preset's test-time views: where the best
epoch was not the last, final_emotion_model.pth is evaluated after the run, outside its budget), with several seeds
the mean and spread, and writes it with every command to OUT/speedrun.json. Finished runs are reused by folder name:
give a new OUT for a new budget, machine or preset.

    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/speedrun.py --step_time [--rows=...]

times training steps of each row's model in this process instead (no data: random faces; float32, or bf16 autocast
with --bf16; after two warm-up steps), the quick screen of lever 2 (where the FLOPs go); set ONEDNN_MAX_CPU_ISA in
the environment.
"""

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from emotion_recognition import cpu_flags, cpu_model  # noqa: E402

# the preset before issue 24 (commit 4442bd2) over --preset=cpu: 64 px, width 0.5, batch 128, at most 18 epochs, lr 2e-3,
# the whole split validated with the mirror each epoch (the preset's lr, test-time views and, in float32, blocks pinned
# back: it has changed them)
OLD = ("--image_size=64 --stem_stride=1 --width=0.5 --batch_size=128 --epochs=18 --val_faces=0 --tsne_samples=1500 "
       "--attention_samples=2000 --lr=2e-3 --tta_shift=0 --tta_zoom=0 --blocks=2,2,2,2")
# name: overrides added to every row above it (the order is the order of issue 24's levers)
ROWS = {
    "old": OLD,
    "+val subset": "--val_faces=1024",  # lever 1: per-epoch validation on 1,024 faces without TTA
    "+48 px": "--image_size=48 --stem_stride=1",  # lever 3
    "+batch 64": "--batch_size=64",  # lever 4: more steps in a short schedule
    "+label smoothing 0.2": "--label_smoothing=0.2",
    "=new preset": "",  # --preset=cpu as it is now (in float32 one block a stage, with --bf16 two)
    "=new preset at 48 px": "--image_size=48 --stem_stride=1 --width=0.5 --blocks=2,2,2,2",  # the preset of 2026-11-30 to 12-02
    "=new preset at 64 px": "--image_size=64 --stem_stride=1 --width=0.5 --blocks=2,2,2,2",  # where bf16 is native, a 64 px step costs 1.6x a 48 px one, not 2x
    "+batch 128": "--batch_size=128",
    "=48 px alone": f"{OLD} --image_size=48",  # the old preset with only its faces at 48 px (a later --name wins)
    "=no attention": "--channel_attention=false --spatial_attention=false",
    "=compile": "--compile=true",  # lever 6: torch.compile (inductor) on the new preset
    "=batch 32": "--batch_size=32",  # lever 4: twice the steps again
    "=widths 32-256": "--width=0.4",  # lever 2: channels 32, 64, 128, 256 (multiples of 16), the preset's since 12-02
    "=widths 48-384": "--width=0.6",  # lever 2: channels 48, 96, 192, 384
    "=96 px stride-2 stem": "--image_size=96 --stem_stride=2",  # lever 2/3: the 48 px network's cost on 96 px faces (the preset's since 12-02)
    "=64 px stride-1 stem": "--image_size=64 --stem_stride=1",  # the preset's faces where bf16 was native, 12-02
    "=width 0.5": "--width=0.5",  # channels 40-320 (in float32 with one block a stage; the preset of 12-02 before width 0.4 had two)
    "=width 0.3": "--width=0.3",  # lever 2: channels 24, 48, 96, 192 (multiples of 8, AVX2's lanes), more epochs
    "=one block a stage": "--blocks=1,1,1,1",  # lever 2: half the stages' work, more epochs (the float32 preset's since 12-05)
    "=two blocks a stage": "--blocks=2,2,2,2",  # the preset's where bf16 is native; in float32 until 12-05
    "=a second block in stage 4": "--blocks=1,1,1,2",  # lever 2: capacity where the map is 6x6 (float32, Zen 3: -0.72, one seed)
    "=a second block in stages 3-4": "--blocks=1,1,2,2",  # lever 2: likewise at 12x12 and 6x6 (1.37x a step: not run)
    "=80 px stride-2 stem": "--image_size=80 --stem_stride=2",  # lever 3: stages of 40 px, 1.3x the epochs (float32, Zen 3: -0.89, three seeds)
    "=112 px stride-2 stem": "--image_size=112 --stem_stride=2",  # lever 3: stages of 56 px, 1.33x a step (bf16, Zen 5: +0.12 paired, six seeds, not a gain)
}


def cumulative(names):
    """(name, overrides) of each row named, in ROWS' order: a row's changes added to those of the rows run above it,
    or, for a row named with a leading "=", in their place."""
    changes = ""
    for name in [n for n in ROWS if n in names]:
        changes = ROWS[name] if name.startswith("=") else f"{changes} {ROWS[name]}".strip()
        yield name, changes


def run(name, overrides, seed, args):
    out = Path(args.out) / f"{name.strip('+= ').replace(' ', '_')}__{seed}"
    done = out / "evaluation_results.json"
    cmd = [sys.executable, str(ROOT / "emotion_recognition.py"), f"--data_dir={args.data_dir}", "--preset=cpu",
           f"--amp={str(args.bf16).lower()}", f"--time_budget={args.budget}", f"--seed={seed}", f"--output_dir={out}", "--overwrite=true",
           *shlex.split(overrides), *shlex.split(args.extra)]
    env = dict(os.environ, **({"ONEDNN_MAX_CPU_ISA": args.isa} if args.isa else {}))
    if not done.exists():
        shutil.rmtree(out / "final_epoch", ignore_errors=True)
        t0 = time.time()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        (out / "wall_seconds.txt").write_text(f"{time.time() - t0:.1f}\n")
    results = json.loads(done.read_text())
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = results
    if results["best_epoch"] != results["final_epoch"]:  # the final epoch's weights on the whole split, after the budget
        final_dir, config = out / "final_epoch", json.loads((out / "config.json").read_text())
        if not (final_dir / "evaluation_results.json").exists():
            subprocess.run([sys.executable, str(ROOT / "emotion_recognition.py"),
                            f"--evaluate={out / 'final_emotion_model.pth'}", f"--split={results['evaluated_split']}",
                            *[f"--{k}={config[k]}" for k in ("data_dir", "cache_dir", "strict", "drop_duplicates")],
                            f"--output_dir={final_dir}", "--overwrite=true"], check=True, env=env, stdout=subprocess.DEVNULL)
        final = json.loads((final_dir / "evaluation_results.json").read_text())
    return {"row": name, "seed": seed, "epochs": results["config"]["epochs"],
            "epoch_seconds": statistics.median(h["epoch_seconds"] for h in history),
            "minutes": float((out / "wall_seconds.txt").read_text()) / 60,
            "final_val_accuracy": final["accuracy"], "final_macro_f1": final["macro_f1"],
            "best_val_accuracy": results["accuracy"], "macro_f1": results["macro_f1"], "command": shlex.join(cmd)}


def step_time(name, overrides, args, steps=20):
    """Seconds per training step of the row's model and batch, in this process, compiled as the trainer compiles it
    (--compile); the two warm-up steps before them (which pay the compilation) timed apart."""
    import torch
    import emotion_recognition as ern
    cfg, _, given = ern.parse_args(["--preset=cpu", "--device=cpu", f"--amp={str(args.bf16).lower()}",
                                    *shlex.split(overrides)])
    cfg = ern.preset_for_machine(cfg, given)
    ern.validate_config(cfg)
    device = torch.device("cpu")
    model = ern.build_model(cfg, 8)
    cfg, _ = ern.channels_last_checked(model, cfg, device)
    model = ern.place_model(model, cfg, device)
    optimizer, scheduler, scaler = ern.optimization_parts(model, cfg, device, 1000)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, ((steps + 2) * cfg.batch_size, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8,
                      generator=gen)
    y = torch.randint(0, 8, (len(x),), generator=gen)
    mean, std = torch.full((3,), 128.0), torch.full((3,), 64.0)
    net = torch.compile(model) if cfg.compile else model
    run = lambda a, b: ern.train_one_epoch(net, x[a:b], y[a:b], mean, std, optimizer, scheduler, scaler, cfg, 1,
                                           num_classes=8)
    t0 = time.perf_counter()
    run(0, 2 * cfg.batch_size)
    t1 = time.perf_counter()
    run(2 * cfg.batch_size, len(x))
    seconds = (time.perf_counter() - t1) / steps
    return {"row": name, "image_size": cfg.image_size, "stem_stride": cfg.stem_stride, "blocks": cfg.blocks,
            "batch": cfg.batch_size, "channels_last": cfg.channels_last, "compile": cfg.compile,
            "warmup_seconds": t1 - t0, "step_seconds": seconds, "ms_per_face": 1000 * seconds / cfg.batch_size}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="")
    p.add_argument("--out", default="")
    p.add_argument("--budget", type=float, default=30.0, help="minutes")
    p.add_argument("--seeds", default="0")
    p.add_argument("--isa", default="", help="ONEDNN_MAX_CPU_ISA for every run, e.g. AVX2")
    p.add_argument("--rows", default="all")
    p.add_argument("--extra", default="", help="more overrides for every row, e.g. --cache_dir=...")
    p.add_argument("--step_time", action="store_true", help="time training steps of each row's model, no data")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast where the CPU has it (default: float32)")
    args = p.parse_args([a for a in sys.argv[1:]])
    names = list(ROWS) if args.rows == "all" else [r.strip() for r in args.rows.split(",")]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown} (a row removed since runs at the commit its BENCHMARKS.md section "
                         f"names); known: {list(ROWS)}")
    if args.step_time:
        print(f"{cpu_model()}, ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', 'unset')}, "
              f"{'bf16 autocast' if args.bf16 else 'float32'}")
        print("| change | px | stem stride | blocks | batch | channels_last | compile | two warm-up steps, s | s/step | "
              "ms/face |\n|---|---|---|---|---|---|---|---|---|---|")
        for name, changes in cumulative(names):
            r = step_time(name, changes, args)
            print(f"| {name} | {r['image_size']} | {r['stem_stride']} | {r['blocks']} | {r['batch']} | "
                  f"{r['channels_last']} | {r['compile']} | {r['warmup_seconds']:.1f} | {r['step_seconds']:.3f} | "
                  f"{r['ms_per_face']:.2f} |", flush=True)
        return
    table = [run(name, changes, int(s), args) for name, changes in cumulative(names) for s in args.seeds.split(",")]
    machine = f"{cpu_model()} ({'bf16' if 'avx512_bf16' in cpu_flags() else 'no bf16'}" + \
        (f", ONEDNN_MAX_CPU_ISA={args.isa}" if args.isa else "") + f"), {os.cpu_count()} cores"
    print(f"\n{machine}, {'bf16 autocast' if args.bf16 else 'float32'}, --time_budget={args.budget:g}\n")
    print("| change | seeds | epochs | s/epoch | minutes | final val acc | final macro-F1 | best val acc | macro-F1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        rows = [r for r in table if r["row"] == name]
        final = [r["final_val_accuracy"] * 100 for r in rows]
        spread = f" ± {statistics.stdev(final):.2f}" if len(final) > 1 else ""
        print(f"| {name} | {len(rows)} | {statistics.mean(r['epochs'] for r in rows):.1f} | "
              f"{statistics.mean(r['epoch_seconds'] for r in rows):.0f} | {statistics.mean(r['minutes'] for r in rows):.1f} | "
              f"{statistics.mean(final):.2f}{spread} | {statistics.mean(r['final_macro_f1'] for r in rows):.4f} | "
              f"{statistics.mean(r['best_val_accuracy'] * 100 for r in rows):.2f} | "
              f"{statistics.mean(r['macro_f1'] for r in rows):.4f} |")
    (Path(args.out) / "speedrun.json").write_text(json.dumps({"machine": machine, "budget": args.budget, "runs": table},
                                                             indent=1))


if __name__ == "__main__":
    main()
