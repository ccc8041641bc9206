"""What the shortcut's own weight gradient (emotion_recognition.Projection) costs a training step, against oneDNN's 1x1
convolution backward that it replaces in channels_last (BENCHMARKS.md, "Never crash on a machine it has not met").

The CPU preset's model (PRESETS["cpu"]: two blocks a stage, as where bf16 is native; batch 64, channels_last) takes
train_one_epoch's steps with each shortcut in turn, in one process, the two interleaved round by round so that the
machine's load hits both; fastest and median round per step, and their ratio. bf16 autocast only where the CPU has
it natively (emotion_recognition.cpu_has_bf16).

    python benchmarks/shortcut_cost.py --json=shortcut_cost.json [--rounds=14] [--steps=8]
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import emotion_recognition as ern  # noqa: E402

VARIANTS = {"Projection": ern.Projection.forward, "oneDNN 1x1 backward": nn.Conv2d.forward}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=14)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--json", default="shortcut_cost.json")
    args = parser.parse_args()
    print(f"CPU: {ern.cpu_model()}; bf16 native: {ern.cpu_has_bf16()}; threads {torch.get_num_threads()}; torch {torch.__version__}")
    rows = []
    print("| autocast | Projection ms (fastest, median) | oneDNN 1x1 backward ms | ratio (fastest, median) |\n|---|---|---|---|")
    for amp in [True, False] if ern.cpu_has_bf16() else [False]:
        run = ern.Config(**{**ern.PRESETS["cpu"], "amp": amp})
        torch.manual_seed(0)
        model = ern.place_model(ern.build_model(run, 8), run, torch.device("cpu"))
        optimizer, scheduler, scaler = ern.optimization_parts(model, run, torch.device("cpu"), args.steps)
        x = torch.randint(0, 256, (run.batch_size * args.steps, 3, run.image_size, run.image_size), dtype=torch.uint8)
        y = torch.arange(len(x)) % 8
        mean, std = torch.full((3,), 128.0), torch.full((3,), 64.0)

        def steps(n):  # the trainer's own steps: augmentation, the hybrid loss, AdamW
            ern.train_one_epoch(model, x, y, mean, std, optimizer, scheduler, scaler, run, 1, num_classes=8, max_steps=n)

        seconds = {name: [] for name in VARIANTS}
        for r in range(args.rounds):
            for name in list(VARIANTS)[:: 1 if r % 2 == 0 else -1]:
                ern.Projection.forward = VARIANTS[name]
                steps(1)  # one untimed step after each switch
                t0 = time.perf_counter()
                steps(args.steps)
                seconds[name].append((time.perf_counter() - t0) / args.steps)
        ern.Projection.forward = VARIANTS["Projection"]
        ours, base = seconds["Projection"], seconds["oneDNN 1x1 backward"]
        row = {"autocast": "bf16" if amp else "float32", "ours_ms": [1e3 * min(ours), 1e3 * statistics.median(ours)],
               "baseline_ms": [1e3 * min(base), 1e3 * statistics.median(base)]}
        row["ratio"] = [a / b for a, b in zip(row["ours_ms"], row["baseline_ms"])]
        rows.append(row)
        print(f"| {row['autocast']} | {row['ours_ms'][0]:.0f}, {row['ours_ms'][1]:.0f} | {row['baseline_ms'][0]:.0f}, "
              f"{row['baseline_ms'][1]:.0f} | {row['ratio'][0]:.3f}, {row['ratio'][1]:.3f} |", flush=True)
    Path(args.json).write_text(json.dumps({"cpu": ern.cpu_model(), "bf16_native": ern.cpu_has_bf16(),
                                           "threads": torch.get_num_threads(), "torch": torch.__version__,
                                           "rounds": args.rounds, "steps": args.steps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
