"""Sanity checks of the explanations on real faces (Adebayo et al., "Sanity Checks for Saliency Maps", 2018).

For a trained checkpoint and the validation split of its dataset, on --faces faces (a fixed random sample):

  randomization   Spearman rank correlation between each face's Grad-CAM map from the trained network and
                  from a freshly initialized one of the same architecture (same faces, same target classes):
                  a map that explains the trained model must change when its weights are gone
  mirror          per stage, the Pearson correlation between the spatial-attention gate of the mirrored face,
                  mirrored back, and the face's own gate (1 = mirror-consistent), against the correlation
                  between the gates of two different faces (how much of a gate is the same for every face);
                  the same for Grad-CAM

Medians over the faces; prints a table and writes JSON.

    python benchmarks/explain_checks.py --checkpoint=outputs/RUN/best_emotion_model.pth --data_dir=path/to/YOLO_format
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import emotion_recognition as ern  # noqa: E402


def median_correlation(a, b, rank=False):
    """Median over faces of the correlation of a[i] with b[i] (faces whose maps are constant left out)."""
    values = [spearmanr(x.ravel(), y.ravel())[0] if rank else np.corrcoef(x.ravel(), y.ravel())[0, 1]
              for x, y in zip(a, b) if x.std() > 0 and y.std() > 0]
    return float(np.median(values)), len(values)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data_dir", required=True)
    ap.add_argument("--cache_dir", default="outputs/cache")
    ap.add_argument("--faces", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="outputs/explain_checks.json")
    args = ap.parse_args()
    ckpt = ern.load_checkpoint(args.checkpoint)
    model, cfg = ern.model_from_checkpoint(ckpt)
    mean, std = ern.checkpoint_normalization(ckpt, "cpu")
    data_cfg = dataclasses.replace(cfg, data_dir=args.data_dir, cache_dir=args.cache_dir)
    _, splits, _ = ern.load_dataset(data_cfg, None, ("train", "val"))
    val = splits["val"]
    pick = np.sort(np.random.default_rng(args.seed).permutation(len(val))[:args.faces])
    faces = np.asarray(val.images[pick])
    cpu = torch.device("cpu")
    maps = ern.explain_faces(model, faces, mean, std, cpu)
    mirrored = ern.explain_faces(model, faces[..., ::-1].copy(), mean, std, cpu)
    torch.manual_seed(args.seed)
    random = ern.explain_faces(ern.build_model(cfg, len(ckpt["class_names"])), faces, mean, std, cpu,
                               target=maps["probabilities"].argmax(1))
    other = np.roll(np.arange(len(faces)), 1)  # each face against the next one of the sample
    results = {"cpu": ern.cpu_model(),
               "checkpoint": args.checkpoint, "checkpoint_metrics": ckpt["metrics"], "epoch": ckpt["epoch"],
               "faces": len(faces), "stages": {}}
    rho, n = median_correlation(maps["gradcam"], random["gradcam"], rank=True)
    results["randomization_spearman"] = {"median": rho, "faces": n}
    print(f"{len(faces)} validation faces, checkpoint epoch {ckpt['epoch']} (val accuracy "
          f"{ckpt['metrics'].get('val_accuracy', float('nan')):.2%})\n")
    print(f"Grad-CAM, trained vs randomized weights: median Spearman {rho:.3f} ({n} faces)\n")
    print(f"{'map':<18} {'mirror corr':>12} {'other-face corr':>16}")
    rows = [(f"stage {j + 1} gate", maps["gates"][:, j], mirrored["gates"][:, j]) for j in range(maps["gates"].shape[1])] \
        if maps["gates"] is not None else []
    rows.append(("Grad-CAM", maps["gradcam"], mirrored["gradcam"]))
    for name, own, flip in rows:
        mirror, _ = median_correlation(own, flip[..., ::-1])
        across, _ = median_correlation(own, own[other])
        results["stages"][name] = {"mirror": mirror, "other_face": across}
        print(f"{name:<18} {mirror:12.3f} {across:16.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
