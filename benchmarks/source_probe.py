"""
Does a trained ERN read the face or the file's source? The AffectNet YOLO export mixes AffectNet
JPEGs and FFHQ PNGs in very different proportions per class (Happy is mostly FFHQ, Fear mostly
AffectNet), so a model can score by the source. This probe re-encodes the validation PNGs as JPEG
the way the AffectNet files are encoded (quality 95, 4:2:0 chroma: the same quantization tables),
and compares the model's predictions on the same faces before and after: accuracy, recall per
class, the share of predictions per class, and how many predictions changed. A model that keyed on
compression would move its PNG predictions toward the classes the AffectNet JPEGs carry.
It cannot rule out the other differences between the sources (alignment, lighting, people).

    python benchmarks/source_probe.py --checkpoint=outputs/RUN/best_emotion_model.pth \
        --data_dir=../shared/data/affectnet/YOLO_format [--quality=95] [--json=probe.json]
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import emotion_recognition as ern  # noqa: E402


def jpeg_roundtrip(rgb, quality):
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {rgb.shape} image as JPEG quality {quality}")
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def recall_by_class(y, pred, class_names):
    """{class name: recall} over the classes present in y."""
    return {name: float((pred[y == i] == i).mean()) for i, name in enumerate(class_names) if (y == i).any()}


def summary(pred, labels, class_names):
    recall = recall_by_class(labels, pred, class_names)
    share = {n: float((pred == i).mean()) for i, n in enumerate(class_names)}
    return {"accuracy": float((pred == labels).mean()), "balanced_accuracy": float(np.mean(list(recall.values()))),
            "recall": recall, "predicted_share": share}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data_dir", required=True)
    ap.add_argument("--cache_dir", default="outputs/cache")
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality of the re-encoding (AffectNet's files: 95)")
    ap.add_argument("--json", default="", help="where to write the figures")
    args = ap.parse_args()
    ckpt = ern.load_checkpoint(args.checkpoint)
    cfg = dataclasses.replace(ern.config_from_checkpoint(ckpt), data_dir=args.data_dir, cache_dir=args.cache_dir)
    class_names, splits, _ = ern.load_dataset(cfg, splits_wanted=("val",))
    val = splits["val"]
    device = torch.device("cpu")
    model = ern.place_model(ern.model_from_checkpoint(ckpt, class_names)[0], cfg, device)
    mean, std = (torch.tensor(ckpt["normalization"][k]) for k in ("mean", "std"))

    png = np.flatnonzero(np.array(val.formats) == "png")
    as_decoded = np.asarray(val.images[png])
    reencoded = np.empty_like(as_decoded)
    crop = lambda image, i: ern.network_crop(image, val.boxes[i], cfg.crop_margin, cfg.image_size)
    for j, i in enumerate(png):
        rgb, _ = ern.decode_image(val.paths[i])
        if not np.array_equal(crop(rgb, i), as_decoded[j]):
            raise RuntimeError(f"{val.paths[i]}: the probe's crop differs from the script's cached one")
        reencoded[j] = crop(jpeg_roundtrip(rgb, args.quality), i)

    predict = lambda images: ern.run_inference(model, images, mean, std, device, cfg)["logits"].argmax(1).numpy()
    labels = val.labels[png]
    before, after = predict(as_decoded), predict(reencoded)
    jpeg = np.flatnonzero(np.array(val.formats) == "jpeg")
    out = {"checkpoint": args.checkpoint, "arithmetic": ern.arithmetic(cfg, device), "quality": args.quality, "png_samples": int(len(png)),
           "mean_abs_pixel_change": float(np.abs(reencoded.astype(np.int16) - as_decoded).mean()),
           "predictions_changed": float((before != after).mean()),
           "png_as_decoded": summary(before, labels, class_names),
           f"png_as_jpeg_q{args.quality}": summary(after, labels, class_names),
           "jpeg_as_decoded": summary(predict(np.asarray(val.images[jpeg])), val.labels[jpeg], class_names)}
    rows = [("png as decoded", out["png_as_decoded"]), (f"png as JPEG q{args.quality}", out[f"png_as_jpeg_q{args.quality}"]),
            ("jpeg (AffectNet) as decoded", out["jpeg_as_decoded"])]
    print(f"{len(png)} validation PNGs; JPEG q{args.quality} changes pixels by {out['mean_abs_pixel_change']:.2f} "
          f"on average and {out['predictions_changed']:.2%} of the predictions\n")
    print("| images | acc | balanced acc | " + " | ".join(f"recall {n}" for n in class_names) + " | "
          + " | ".join(f"pred {n}" for n in class_names) + " |")
    print("|" + "---|" * (3 + 2 * len(class_names)))
    for name, s in rows:
        print(f"| {name} | {s['accuracy']:.2%} | {s['balanced_accuracy']:.2%} | "
              + " | ".join(f"{s['recall'][n]:.3f}" if n in s["recall"] else "-" for n in class_names) + " | "
              + " | ".join(f"{s['predicted_share'][n]:.3f}" for n in class_names) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
