"""
Where do a trained ERN's emotion prototypes sit? For each checkpoint, on the validation split
(features without flip TTA): the cosine of each prototype P_k with its class's mean unit feature,
the mean pairwise cosine of the prototypes and of the class means, and the accuracy of the
classifier, of the nearest prototype (argmax of the context logits s) and of the nearest class mean.

    python benchmarks/prototype_probe.py --data_dir=../shared/data/affectnet/YOLO_format \
        RUN/best_emotion_model.pth [RUN2/best_emotion_model.pth ...] [--cache_dir=/tmp/erncache]
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import emotion_recognition as ern  # noqa: E402


def off_diagonal_mean(unit_rows):
    k = len(unit_rows)
    return float(((unit_rows @ unit_rows.t()).sum() - k) / (k * k - k))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--data_dir", required=True)
    ap.add_argument("--cache_dir", default="")
    args = ap.parse_args()
    device = torch.device("cpu")
    for path in args.checkpoints:
        ckpt = ern.load_checkpoint(path)
        cfg = dataclasses.replace(ern.config_from_checkpoint(ckpt), data_dir=args.data_dir, cache_dir=args.cache_dir)
        names, splits, _ = ern.load_dataset(cfg, None, ("train", "val"))
        model, _ = ern.model_from_checkpoint(ckpt, names)
        if model.context is None:
            raise SystemExit(f"{path}: no context module, no prototypes")
        mean, std = (torch.tensor(ckpt["normalization"][k]) for k in ("mean", "std"))
        model = ern.place_model(model, cfg, device)
        out = ern.run_inference(model, splits["val"].images, mean, std, device, cfg, tta=False)
        f, y = F.normalize(out["features"], dim=1), torch.from_numpy(splits["val"].labels)
        prototypes = F.normalize(model.context.prototypes.detach().float().cpu(), dim=1)
        class_means = F.normalize(torch.stack([f[y == k].mean(0) for k in range(len(names))]), dim=1)
        accuracy = {"classifier": out["logits"].argmax(1), "nearest prototype": out["context_logits"].argmax(1),
                    "nearest class mean": (f @ class_means.t()).argmax(1)}
        print(f"{path} (epoch {ckpt['epoch']})")
        print("  accuracy: " + ", ".join(f"{k} {(p == y).float().mean():.2%}" for k, p in accuracy.items()))
        print("  cos(P_k, class mean): " + ", ".join(
            f"{n} {c:.3f}" for n, c in zip(names, (prototypes * class_means).sum(1).tolist())))
        print(f"  mean pairwise cosine: prototypes {off_diagonal_mean(prototypes):.3f}, "
              f"class means {off_diagonal_mean(class_means):.3f}")


if __name__ == "__main__":
    main()
