"""
Train low, test high (issue 24, lever 3): a finished run's model evaluated on the validation split at its training
resolution and at higher ones, as the final evaluation does (the checkpoint's test-time views), with the BatchNorm
statistics as trained and re-estimated at the test size from augmented training faces (Touvron et al., "Fixing the
train-test resolution discrepancy", NeurIPS 2019). No training: it answers whether a model trained at 48 px gains from being tested larger.

    python benchmarks/train_low_test_high.py --run=outputs/ern__0__... [--sizes=48,56,64] \
        [--checkpoint=final_emotion_model.pth] [--bn_faces=2048]

--sizes: the test sizes (default: the trained size and 8 and 16 px above it).

The data, cache and inference settings are the checkpoint's; set ONEDNN_MAX_CPU_ISA as the run was trained. Prints
one row per size and writes them to RUN/train_low_test_high.json.
"""

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import emotion_recognition as ern  # noqa: E402


def bn_reestimated(model, images, mean, std, cfg, device, faces, seed=0):
    """A copy of model whose BatchNorm running statistics are the plain averages over `faces` training faces,
    augmented as in training, in batches of the training batch size."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average
    torch.manual_seed(seed)
    pick = np.random.default_rng(seed).permutation(len(images))[:faces]
    amp_dtype = ern.autocast_dtype(cfg, device)
    model.train()
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        for i in range(0, len(pick), cfg.batch_size):
            x = ern.augment_batch(torch.from_numpy(images[np.sort(pick[i:i + cfg.batch_size])]).to(device), mean, std, cfg)
            model(x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x)
    return model.eval()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--checkpoint", default="final_emotion_model.pth", help="in the run folder: the final epoch's weights")
    p.add_argument("--sizes", default="", help="test sizes, e.g. 48,56,64; default: the trained size, +8 and +16 px")
    p.add_argument("--bn_faces", type=int, default=2048)
    args = p.parse_args()
    device = torch.device("cpu")
    ckpt = ern.load_checkpoint(Path(args.run) / args.checkpoint)
    cfg = ern.config_from_checkpoint(ckpt)
    model, cfg, mean, std = ern.inference_model(ckpt, cfg, device)
    k = len(ckpt["class_names"])
    print(f"{ern.cpu_model()}, autocast {ern.arithmetic(cfg, device)['autocast']}, trained at {ckpt['image_size']} px "
          f"(stem stride {cfg.stem_stride}), epoch {ckpt['epoch']}, {args.checkpoint}")
    print("| test px | BatchNorm | val accuracy | macro-F1 | seconds |\n|---|---|---|---|---|")
    rows = []
    trained = ckpt["image_size"]
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [trained, trained + 8, trained + 16]
    for size in sizes:  # checked before any is tested: a size the network cannot take stops the run before its work
        ern.validate_config(dataclasses.replace(cfg, image_size=size))
    for size in sizes:
        trained_size = size == trained
        _, splits, _ = ern.load_dataset(dataclasses.replace(cfg, image_size=size),
                                        splits_wanted=("val",) if trained_size else ("train", "val"))
        variants = [("as trained", model)] + ([] if trained_size else [(
            f"re-estimated ({args.bn_faces} faces)", bn_reestimated(model, splits["train"].images, mean, std, cfg,
                                                                     device, args.bn_faces))])
        for name, m in variants:
            t0 = time.perf_counter()
            r = ern.validation_metrics(m, splits["val"], mean, std, device, cfg, k)
            rows.append({"test_px": size, "batchnorm": name, **r, "seconds": round(time.perf_counter() - t0, 1)})
            print(f"| {size} | {name} | {100 * r['val_accuracy']:.2f} % | {r['val_macro_f1']:.4f} | "
                  f"{rows[-1]['seconds']} |", flush=True)
    (Path(args.run) / "train_low_test_high.json").write_text(json.dumps(
        {"machine": ern.cpu_model(), "checkpoint": args.checkpoint, "epoch": ckpt["epoch"], "rows": rows}, indent=1))


if __name__ == "__main__":
    try:
        main()
    except ern.UserError as e:  # a size the network cannot take, a checkpoint of a removed option
        sys.exit(f"error: {e}")
