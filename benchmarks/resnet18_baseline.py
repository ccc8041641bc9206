"""
The calibration baseline of issue 5: a plain torchvision ResNet-18 (11.2 M parameters, no
attention, no context) trained from scratch at 64 px for 10 epochs through ERN's own run_training:
the same cached crops, augmentation, AdamW + warm-up + cosine schedule, label smoothing, bf16
autocast where the CPU has it, test-time views and evaluation as `--preset=cpu` (its time budget off),
so only the network and the epoch count differ from an ERN preset run. With --ern, prints the two side
by side. BENCHMARKS.md's figure (2026-11-24) was made with the scripts of 27d1acd, whose preset
validated the whole split each epoch with the mirror alone.

    python benchmarks/resnet18_baseline.py --data_dir=../shared/data/affectnet/YOLO_format --out=/tmp/resnet18 \
        [--epochs=10] [--image_size=64] [--seed=0] [--extra="--cache_dir=/tmp/erncache"] \
        [--ern=outputs/RUN/evaluation_results.json]

OUT is an ordinary run folder (evaluation_results.json, metrics.jsonl, train.log, plots; keep it
outside the repository). Its checkpoints hold ResNet-18 weights under ERN's format tag and config,
so --evaluate and predict.py refuse them ("weights do not fit the architecture").

Needs torchvision, which the scripts and tests do not use (not in requirements.txt): install the build that matches
your torch, from the index your torch came from.
"""

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch.nn as nn
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import emotion_recognition as ern  # noqa: E402


class ResNet18(nn.Module):
    """torchvision's ResNet-18 behind ERN's interface: forward(x) -> (logits, None, features)."""

    context = None  # no emotion context module: the KL term is 0

    def __init__(self, num_classes):
        super().__init__()
        self.body = torchvision.models.resnet18(weights=None)  # from scratch; nothing is downloaded
        self.body.fc = nn.Identity()
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        f = self.body(x)
        return self.classifier(f), None, f


def row(name, r):
    return (f"| {name} | {r['num_parameters'] / 1e6:.2f} M | {r['config']['epochs']} | {r['accuracy']:.2%} | "
            f"{r['macro_f1']:.4f} | {r['accuracy_excluding_train_duplicates']:.2%} | {r['training_seconds']:.0f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--image_size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra", default="", help="more emotion_recognition.py overrides (e.g. --cache_dir=...)")
    ap.add_argument("--ern", default="", help="an ERN run's evaluation_results.json to compare with")
    args = ap.parse_args()
    cfg, _, _ = ern.parse_args(["--preset=cpu", "--stem_stride=1", "--time_budget=0", f"--data_dir={args.data_dir}",
                                f"--epochs={args.epochs}",
                                f"--image_size={args.image_size}", f"--seed={args.seed}", f"--output_dir={args.out}",
                                "--tsne_samples=0", *shlex.split(args.extra)])
    ern.validate_config(cfg)
    _, results = ern.run_training(cfg, build=lambda cfg, k: ResNet18(k))
    lines = ["| model | params | epochs | val acc | macro-F1 | acc w/o train dups | train s |",
             "|---|---|---|---|---|---|---|", row("torchvision ResNet-18", results)]
    if args.ern:
        ours = json.loads(Path(args.ern).read_text())
        lines.append(row("ERN", ours))
        lines.append(f"\nERN - ResNet-18: {100 * (ours['accuracy'] - results['accuracy']):+.2f} points of "
                     f"accuracy; training time ratio ERN / ResNet-18 {ours['training_seconds'] / results['training_seconds']:.2f}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
