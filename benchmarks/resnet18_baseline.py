"""
The calibration baseline of issue 5: a plain torchvision ResNet-18 (11.2 M parameters, no
attention, no context) trained from scratch at 64 px for 10 epochs, through ERN's own data
pipeline and training loop: the same cached crops, augmentation, AdamW + warm-up + cosine
schedule, label smoothing, bf16 autocast where the CPU has it, flip TTA and evaluation as
`--preset=cpu`, so only the network and the epoch count differ from the ERN preset run.

    python benchmarks/resnet18_baseline.py --data_dir=../shared/data/affectnet/YOLO_format --out=/tmp/resnet18 \
        [--epochs=10] [--image_size=64] [--seed=0] [--extra="--cache_dir=/tmp/erncache"]

Writes OUT/evaluation_results.json, metrics.jsonl and train.log (checkpoints too: keep OUT
outside the repository) and prints validation accuracy, macro-F1, accuracy per image source and
the training time.
"""

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--image_size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra", default="", help="more emotion_recognition.py overrides (e.g. --cache_dir=...)")
    args = ap.parse_args()
    cfg, _ = ern.parse_args(["--preset=cpu", f"--data_dir={args.data_dir}", f"--epochs={args.epochs}",
                             f"--image_size={args.image_size}", f"--seed={args.seed}", f"--output_dir={args.out}",
                             "--tsne_samples=0", *shlex.split(args.extra)])
    ern.validate_config(cfg)
    run_dir = ern.make_run_dir(cfg)
    log_file = run_dir / "train.log"
    device = ern.resolve_device(cfg.device)
    ern.seed_everything(cfg.seed, cfg.deterministic)
    class_names, splits, report = ern.load_dataset(cfg, log_file, ("train", "val"))
    mean, std = (t.to(device) for t in ern.dataset_normalization(splits["train"].images))
    model = ern.place_model(ResNet18(len(class_names)), cfg, device)
    n_params = ern.count_parameters(model)
    ern.log(f"torchvision ResNet-18: {n_params:,} parameters, {cfg.image_size}px, {cfg.epochs} epochs, device {device}, "
            f"autocast {ern.precision(cfg, device)['autocast'] or 'off (float32)'}", log_file)
    t0 = time.time()
    history, best, seconds = ern.train(model, splits, class_names, mean, std, cfg, run_dir, device, log_file)
    model.load_state_dict(ern.load_checkpoint(run_dir / "best_emotion_model.pth")["model"])
    results = ern.write_evaluation(model, splits["val"], class_names, mean, std, device, cfg, run_dir, {
        "model": "torchvision resnet18, from scratch", "evaluated_split": "val", "num_parameters": n_params,
        "best_epoch": best["epoch"], "training_seconds": round(seconds, 1), "wall_seconds": round(time.time() - t0, 1),
        "duplicates": report["duplicates"], "config": vars(args)}, set(splits["train"].hashes))
    by_format = {k: v["accuracy"] for k, v in results["accuracy_by_source_format"].items()}
    ern.log(f"ResNet-18 val accuracy {results['test_accuracy']:.2%} (macro-F1 {results['macro_f1']:.4f}, "
            f"w/o train duplicates {results['accuracy_excluding_train_duplicates']:.2%}, by source "
            f"{', '.join(f'{k} {v:.2%}' for k, v in by_format.items())}), best epoch {best['epoch']}, "
            f"training {seconds / 60:.1f} min; outputs in {run_dir}", log_file)


if __name__ == "__main__":
    main()
