"""
The CPU preset's speedrun table (issue 24), airbench style: the preset's protocol in float32 with named changes
added one at a time, in a fixed order, each row one run of emotion_recognition.py under the same time budget.

    python benchmarks/speedrun.py --data_dir=../shared/data/affectnet/YOLO_format --out=/tmp/speedrun \
        [--budget=30] [--seeds=0] [--isa=AVX2] [--rows=all | --rows=old,+val subset,...] [--extra="--cache_dir=..."]

Each row is `--preset=cpu --amp=false --time_budget=BUDGET` plus every change above it (a row named with a leading
"=" replaces the changes instead: a standalone comparison). --isa sets ONEDNN_MAX_CPU_ISA, so that a wider CPU runs
the kernels of a narrower one (AVX2 stands in for a 2-core AVX2 CPU: relative figures only). Prints the cumulative
table (epochs that fit, seconds per epoch, minutes from process start to exit, final and best validation accuracy,
macro-F1), with several seeds the mean and spread, and writes it with every command to OUT/speedrun.json. Finished
runs are reused by folder name: give a new OUT for a new budget or machine.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from emotion_recognition import cpu_flags, cpu_model  # noqa: E402

# name: overrides added to every row above it (the order is the order of issue 24's levers)
ROWS = {
    "old": "",  # the preset as it was (64 px, per-epoch validation of the whole split with flip TTA)
    "+48 px": "--image_size=48",
}


def run(name, overrides, seed, args):
    out = Path(args.out) / f"{name.strip('+= ').replace(' ', '_')}__{seed}"
    done = out / "evaluation_results.json"
    cmd = [sys.executable, str(ROOT / "emotion_recognition.py"), f"--data_dir={args.data_dir}", "--preset=cpu",
           "--amp=false", f"--time_budget={args.budget}", f"--seed={seed}", f"--output_dir={out}", "--overwrite=true",
           *shlex.split(overrides), *shlex.split(args.extra)]
    if not done.exists():
        env = dict(os.environ, **({"ONEDNN_MAX_CPU_ISA": args.isa} if args.isa else {}))
        t0 = time.time()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        (out / "wall_seconds.txt").write_text(f"{time.time() - t0:.1f}\n")
    results = json.loads(done.read_text())
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = history[-1]
    return {"row": name, "seed": seed, "epochs": len(history),
            "epoch_seconds": statistics.median(h["epoch_seconds"] for h in history),
            "minutes": float((out / "wall_seconds.txt").read_text()) / 60,
            "final_val_accuracy": results.get("final_model_accuracy", final["val_accuracy"]),
            "best_val_accuracy": results["accuracy"], "macro_f1": results["macro_f1"], "command": shlex.join(cmd)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--budget", type=float, default=30.0, help="minutes")
    p.add_argument("--seeds", default="0")
    p.add_argument("--isa", default="", help="ONEDNN_MAX_CPU_ISA for every run, e.g. AVX2")
    p.add_argument("--rows", default="all")
    p.add_argument("--extra", default="", help="more overrides for every row, e.g. --cache_dir=...")
    args = p.parse_args()
    names = list(ROWS) if args.rows == "all" else [r.strip() for r in args.rows.split(",")]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {list(ROWS)}")
    table, changes = [], ""
    for name in ROWS:  # cumulative in ROWS' order, whichever rows are run
        changes = ROWS[name] if name.startswith("=") else f"{changes} {ROWS[name]}".strip()
        if name in names:
            table += [run(name, changes, int(s), args) for s in args.seeds.split(",")]
    machine = f"{cpu_model()} ({'bf16' if 'avx512_bf16' in cpu_flags() else 'no bf16'}" + \
        (f", ONEDNN_MAX_CPU_ISA={args.isa}" if args.isa else "") + f"), {os.cpu_count()} cores"
    print(f"\n{machine}, float32, --time_budget={args.budget:g}\n")
    print("| change | seeds | epochs | s/epoch | minutes | final val acc | best val acc | macro-F1 |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        rows = [r for r in table if r["row"] == name]
        final = [r["final_val_accuracy"] * 100 for r in rows]
        spread = f" ± {statistics.stdev(final):.2f}" if len(final) > 1 else ""
        print(f"| {name} | {len(rows)} | {statistics.mean(r['epochs'] for r in rows):.1f} | "
              f"{statistics.mean(r['epoch_seconds'] for r in rows):.0f} | {statistics.mean(r['minutes'] for r in rows):.1f} | "
              f"{statistics.mean(final):.2f}{spread} | {statistics.mean(r['best_val_accuracy'] * 100 for r in rows):.2f} | "
              f"{statistics.mean(r['macro_f1'] for r in rows):.4f} |")
    (Path(args.out) / "speedrun.json").write_text(json.dumps({"machine": machine, "budget": args.budget, "runs": table},
                                                             indent=1))


if __name__ == "__main__":
    main()
