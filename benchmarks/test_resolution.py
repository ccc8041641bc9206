"""
Train low, test high (issue 24, lever 3): a finished run's model evaluated on the validation split at its training
resolution and at higher ones, as the final evaluation does (flip TTA), with the BatchNorm statistics as trained and
re-estimated at the test size from training faces (Touvron et al., "Fixing the train-test resolution discrepancy",
NeurIPS 2019). No training: it answers whether a model trained at 48 px gains from being tested at 56 or 64.

    python benchmarks/test_resolution.py --run=outputs/ern__0__... --sizes=48,56,64 \
        --data_dir=../shared/data/affectnet/YOLO_format [--checkpoint=last.pth] [--bn_faces=2048]

Set ONEDNN_MAX_CPU_ISA (and --amp=false) as the run was trained. Prints one row per size.
"""

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import emotion_recognition as ern  # noqa: E402


def recalibrated(model, images, mean, std, cfg, device, faces, seed=0):
    """A copy of model whose BatchNorm running statistics are the plain averages over `faces` training faces
    (mirrored at random, as trained), in batches of the training batch size."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(images), min(faces, len(images)), replace=False))
    amp_dtype = ern.autocast_dtype(cfg, device)
    model.train()
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        for i in range(0, len(pick), cfg.batch_size):
            x = ern.normalize(torch.from_numpy(np.asarray(images[pick[i:i + cfg.batch_size]])).to(device), mean, std)
            flip = torch.from_numpy(rng.random(len(x)) < 0.5).to(device)
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
            model(x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x)
    return model.eval()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--checkpoint", default="best_emotion_model.pth")
    p.add_argument("--sizes", default="48,56,64")
    p.add_argument("--data_dir", default="")
    p.add_argument("--cache_dir", default="outputs/cache")
    p.add_argument("--bn_faces", type=int, default=2048)
    p.add_argument("--amp", default="true")
    args = p.parse_args()
    device = torch.device("cpu")
    ckpt = ern.load_checkpoint(Path(args.run) / args.checkpoint)
    cfg = dataclasses.replace(ern.config_from_checkpoint(ckpt), data_dir=args.data_dir or ern.Config.data_dir,
                              cache_dir=args.cache_dir, amp=args.amp == "true")
    model, cfg, mean, std = ern.inference_model(ckpt, cfg, device)
    print(f"{ern.cpu_model()}, autocast {ern.arithmetic(cfg, device)['autocast']}, trained at {ckpt['image_size']} px, "
          f"epoch {ckpt['epoch']}, {args.checkpoint}")
    print("| test px | BatchNorm | val accuracy | macro-F1 | seconds |\n|---|---|---|---|---|")
    for size in [int(s) for s in args.sizes.split(",")]:
        _, splits, _ = ern.load_dataset(dataclasses.replace(cfg, image_size=size), splits_wanted=("train", "val"))
        val, train = splits["val"], splits["train"]
        variants = [("as trained", model)]
        if size != ckpt["image_size"]:
            variants.append((f"re-estimated ({args.bn_faces} faces)",
                             recalibrated(model, train.images, mean, std, cfg, device, args.bn_faces)))
        for name, m in variants:
            t0 = time.perf_counter()
            pred = ern.run_inference(m, val.images, mean, std, device, cfg)["logits"].argmax(1).numpy()
            seconds = time.perf_counter() - t0
            acc = float((pred == val.labels).mean())
            print(f"| {size} | {name} | {100 * acc:.2f} % | {ern.macro_f1(val.labels, pred):.4f} | {seconds:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
