"""
The ERN ablation table: each row is one run of emotion_recognition.py with one more component on.

    python benchmarks/ablation.py --data_dir=../shared/data/affectnet/YOLO_format --out=/tmp/ablation \
        [--protocol="--preset=cpu --image_size=48 --stem_stride=1 --width=0.5 --blocks=2,2,2,2 --epochs=5 --time_budget=0"] \
        [--seeds=0,1] [--parallel=2] [--threads=1] \
        [--rows="plain,full ERN" | --rows=all] [--extra="--cache_dir=..."]

Every row shares the protocol and seed; rows run `--parallel` at a time, each with `--threads`
OpenMP threads (default 1: two one-thread runs use a 2-core machine better than one two-thread run). Prints a
markdown table (validation accuracy, macro-F1, per-class F1 by the dataset's class names,
accuracy without the validation images that duplicate training images, training seconds), with several seeds also their mean per row, and writes it,
with every command, to OUT/ablation.json. ROWS add one component at a time (the default
--rows), in CBAM's gating and in the shipped residual gating; RECIPE rows change one training
choice of full ERN, CONTEXT rows its temperature and KL weight. With several seeds it also prints each row's mean, spread (max - min) and
training time against plain's. Finished rows are reused by folder name: give a new OUT for a new protocol.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ROWS = {  # name: overrides, one component added at a time: with CBAM's gating x * gate, then the shipped x * (1 + gate)
    "plain": "--channel_attention=false --spatial_attention=false --context=false",
    "+channel": "--spatial_attention=false --context=false --attention_residual=false",
    "+spatial": "--channel_attention=false --context=false --attention_residual=false",
    "+dual": "--context=false --attention_residual=false",
    "+context (lambda=0)": "--context_weight=0 --attention_residual=false",
    "full ERN CBAM gating": "--attention_residual=false",
    "+channel residual": "--spatial_attention=false --context=false",
    "+spatial residual": "--channel_attention=false --context=false",
    "+dual residual": "--context=false",
    "+context residual (lambda=0)": "--context_weight=0",
    "full ERN": "",
}
RECIPE = {  # full ERN with one training-recipe choice changed (issue 5: defaults that earn their place)
    "erasing 0.25": "--aug_erase=0.25",
    "no label smoothing": "--label_smoothing=0",
    "class weights": "--class_weights=true",
}
CONTEXT = {  # full ERN with the context module's tau or lambda (defaults 0.1, 0.5) changed
    "tau 0.05": "--context_temperature=0.05",
    "tau 0.2": "--context_temperature=0.2",
    "lambda 0.25": "--context_weight=0.25",
    "lambda 1.0": "--context_weight=1.0",
}
# Rows of options removed since (context in the logits, imprinted prototypes, M distributions, the EMA teacher, the
# affinity loss, logit adjustment; mixup and cutmix; the EMA of the weights): BENCHMARKS.md, "Removed options", and
# commits da10df0, bfdced2 and 8e63f05, which still run them.
LADDER = list(ROWS)
ROWS.update(RECIPE)
ROWS.update(CONTEXT)

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_dir", required=True)
    ap.add_argument("--out", required=True)
    # the blocks given: --preset=cpu trains one block a stage in float32 (PRESETS_FLOAT32_CPU), so a protocol without
    # them is another model on such a CPU
    ap.add_argument("--protocol", default="--preset=cpu --image_size=48 --stem_stride=1 --width=0.5 --blocks=2,2,2,2 "
                                          "--epochs=5 --time_budget=0")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--rows", default=",".join(LADDER),
                    help="comma-separated row names, or all")
    ap.add_argument("--threads", type=int, default=1, help="OpenMP threads per run")
    ap.add_argument("--extra", default="", help="overrides added to every row (e.g. --cache_dir=...)")
    args = ap.parse_args()
    if args.parallel < 1 or args.threads < 1:
        ap.error("--parallel and --threads must be >= 1")
    rows = list(ROWS) if args.rows == "all" else list(dict.fromkeys(r.strip() for r in args.rows.split(",")))
    unknown = [r for r in rows if r not in ROWS]
    if unknown:  # a row of an option removed since runs at the commit its BENCHMARKS.md section names
        ap.error(f"unknown rows {unknown} (removed options: BENCHMARKS.md, \"Removed options\"); known: {list(ROWS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for seed in args.seeds.split(","):
        for row in rows:
            run_dir = out / f"{row.replace(' ', '_').replace('(', '').replace(')', '').replace('=', '')}__seed{seed}"
            cmd = [sys.executable, str(ROOT / "emotion_recognition.py"), f"--data_dir={args.data_dir}",
                   *shlex.split(args.protocol), *shlex.split(ROWS[row]), *shlex.split(args.extra),
                   f"--seed={seed}", f"--output_dir={run_dir}", "--tsne_samples=0", "--attention_samples=0"]
            jobs.append((row, seed, run_dir, cmd))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    pending, running, results = list(jobs), [], []
    while pending or running:
        while pending and len(running) < args.parallel:
            row, seed, run_dir, cmd = pending.pop(0)
            if (run_dir / "evaluation_results.json").exists():  # finished earlier: reuse
                results.append((row, seed, run_dir, cmd, None))
                continue
            log = open(out / f"{run_dir.name}.log", "w")
            print(f"start {row} seed {seed}: {shlex.join(cmd)}", flush=True)
            running.append((row, seed, run_dir, cmd, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env),
                            time.time()))
        for job in list(running):
            row, seed, run_dir, cmd, proc, t0 = job
            if proc.poll() is not None:
                running.remove(job)
                print(f"done  {row} seed {seed}: exit {proc.returncode}, {time.time() - t0:.0f} s", flush=True)
                results.append((row, seed, run_dir, cmd, time.time() - t0))
        time.sleep(2)
    failed = [f"{row} seed {seed} ({out / run_dir.name}.log)" for row, seed, run_dir, *_ in results
              if not (run_dir / "evaluation_results.json").exists()]
    finished = [r for r in results if (r[2] / "evaluation_results.json").exists()]
    if not finished:
        sys.exit(f"no row finished: {', '.join(failed)}")
    table = []
    for row, seed, run_dir, cmd, wall in sorted(finished, key=lambda r: (list(ROWS).index(r[0]), r[1])):
        res = json.loads((run_dir / "evaluation_results.json").read_text())
        table.append({"row": row, "seed": int(seed), "command": shlex.join(cmd[1:]), "wall_seconds": wall,
                      "val_accuracy": res["accuracy"], "macro_f1": res["macro_f1"],
                      "accuracy_excluding_train_duplicates": res.get("accuracy_excluding_train_duplicates"),
                      "f1": {k: v["f1-score"] for k, v in res["classification_report"].items()},
                      "training_seconds": res["training_seconds"], "num_parameters": res["num_parameters"]})
    (out / "ablation.json").write_text(json.dumps(table, indent=2))
    names = list(table[0]["f1"])
    print("\n| row | seed | params | val acc | macro-F1 | acc w/o train dups | " +
          " | ".join(f"F1 {n}" for n in names) + " | train s |")
    print("|" + "---|" * (7 + len(names)))
    for t in table:
        print(f"| {t['row']} | {t['seed']} | {t['num_parameters'] / 1e6:.2f} M | {t['val_accuracy']:.2%} | {t['macro_f1']:.4f} | "
              f"{t['accuracy_excluding_train_duplicates']:.2%} | " +
              " | ".join(f"{t['f1'][n]:.3f}" for n in names) + f" | {t['training_seconds']:.0f} |")
    by_row = {}
    for t in table:
        by_row.setdefault(t["row"], []).append(t)
    if any(len(runs) > 1 for runs in by_row.values()):  # several seeds: mean, spread (max - min), cost against plain
        def stat(runs, get):
            v = [get(t) for t in runs]
            return np.mean(v), max(v) - min(v)

        plain_s = np.mean([t["training_seconds"] for t in by_row["plain"]]) if "plain" in by_row else None
        print("\n| row | seeds | val acc, mean (spread) | per seed | w/o train dups | macro-F1, mean (spread) | "
              "train s | vs plain |\n|" + "---|" * 8)
        for row, runs in by_row.items():
            acc, macro = stat(runs, lambda t: t["val_accuracy"]), stat(runs, lambda t: t["macro_f1"])
            secs = np.mean([t["training_seconds"] for t in runs])
            print(f"| {row} | {len(runs)} | {acc[0]:.2%} ({acc[1]:.2%}) | "
                  + ", ".join(f"{t['val_accuracy']:.2%}" for t in runs)
                  + f" | {stat(runs, lambda t: t['accuracy_excluding_train_duplicates'])[0]:.2%} | {macro[0]:.4f} ({macro[1]:.4f})"
                  + f" | {secs:.0f} | " + (f"{secs / plain_s:.2f}x" if plain_s else "") + " |")
        print("\n| row | " + " | ".join(f"F1 {n}, mean" for n in names) + " |\n|" + "---|" * (1 + len(names)))
        for row, runs in by_row.items():
            print(f"| {row} | " + " | ".join(f"{stat(runs, lambda t: t['f1'][n])[0]:.3f}" for n in names) + " |")
    if failed:  # the finished rows' table stands; these are said, and the exit status says so
        sys.exit(f"rows that did not finish: {', '.join(failed)}")


if __name__ == "__main__":
    main()
