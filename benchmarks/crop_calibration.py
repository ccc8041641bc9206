"""Does predict.py give the network the crops it was trained on? Measure it, and fit the Haar-box framing.

A Haar box is a tight square around eyes, nose and mouth; a training crop is the dataset's own box
(in the AffectNet export, the whole 96 px image, with the hair, chin and some background). This
script puts validation images into larger photos (each enlarged 1.5-3.5x at a random place on a
640x480 noisy gradient), finds their faces with predict.py's FaceDetector, and fits the crop that
frames them as training did (the label box widened by crop_margin, clamped: crop_region): the side
of the training crop in Haar sides (face_crop_scale) and its centre's offset below the Haar box's
centre (face_crop_shift), as medians over the first half of the faces.
On the second half it compares, against the model's prediction on the training crop itself:

  placed exactly    the training crop's region cut back out of the photo (resampling alone)
  Haar box + margin the tight Haar box widened by the checkpoint's crop_margin (what a plain loop does)
  fitted            the fitted framing (what predict.py's FACE_CROP_SCALE and FACE_CROP_SHIFT would be set to)
  scale S           other framings, the fitted shift kept (--scales)

    python benchmarks/crop_calibration.py --checkpoint=outputs/RUN/best_emotion_model.pth \
        --data_dir=../shared/data/affectnet/YOLO_format --images=2000 --out=outputs/crop_calibration.json
"""
import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import emotion_recognition as ern  # noqa: E402
import predict as pr  # noqa: E402


def place(image, rng, background, canvas=(480, 640)):
    """The image enlarged 1.5-3.5x (at most 90 % of the photo's shorter side) at a random place in a photo;
    returns the photo, the enlargement and the image's top-left corner in the photo. background: gradient
    (a noisy colour gradient: a crop wider than the image shows what no training image had) or reflect
    (the image mirrored outwards: a wider crop shows hair and background, as a real photo would)."""
    h, w = canvas
    zoom = min(rng.uniform(1.5, 3.5), 0.9 * min(h, w) / max(image.shape[:2]))
    ih, iw = round(image.shape[0] * zoom), round(image.shape[1] * zoom)
    x, y = int(rng.integers(0, w - iw + 1)), int(rng.integers(0, h - ih + 1))
    big = cv2.resize(image, (iw, ih), interpolation=cv2.INTER_LINEAR)
    if background == "reflect":
        return cv2.copyMakeBorder(big, y, h - ih - y, x, w - iw - x, cv2.BORDER_REFLECT_101), zoom, (x, y)
    photo = np.linspace(rng.uniform(40, 200, 3), rng.uniform(40, 200, 3), w)[None].repeat(h, 0)
    photo = np.clip(photo + rng.normal(0, 8, photo.shape), 0, 255).astype(np.uint8)
    photo[y:y + ih, x:x + iw] = big
    return photo, zoom, (x, y)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data_dir", required=True)
    ap.add_argument("--images", type=int, default=2000, help="validation images, evenly spaced")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--background", default="reflect", choices=["reflect", "gradient"])
    ap.add_argument("--scales", default="1.0,1.1,1.2,1.3,1.4,1.5", help="more framings to compare (face_crop_scale)")
    ap.add_argument("--shift", type=float, default=None, help="face_crop_shift of those rows (default: the fitted one)")
    ap.add_argument("--out", default="outputs/crop_calibration.json")
    args = ap.parse_args()
    names, folders, _, keypoint_values = ern.read_data_yaml(args.data_dir)
    split, _, *_ = ern.scan_split("val", folders["val"], len(names), keypoint_values)
    pick = np.linspace(0, len(split) - 1, min(args.images, len(split))).astype(int)
    rng = np.random.default_rng(args.seed)
    predictor = pr.EmotionPredictor(args.checkpoint)
    margin = predictor.cfg.crop_margin
    samples = []  # (label, training crop, photo, training crop region in the photo, Haar box)
    for i in pick:
        image, fmt = ern.decode_image(split.paths[i])
        photo, zoom, (ox, oy) = place(image, rng, args.background)
        x0, y0, x1, y1 = ern.crop_region(image.shape, split.boxes[i], margin)  # what training cut, in the photo:
        region = (x0 * zoom + ox, y0 * zoom + oy, x1 * zoom + ox, y1 * zoom + oy)
        found = [b for b in predictor.detector(photo) if pr.box_iou(b, region) > 0.1]
        haar = max(found, key=lambda b: pr.box_iou(b, region)) if found else None
        crop = ern.network_crop(image, split.boxes[i], margin, predictor.image_size)  # as in training
        samples.append((int(split.labels[i]), crop, photo, region, haar, fmt))
    detected = [s for s in samples if s[4] is not None]
    fit, test = detected[: len(detected) // 2], detected[len(detected) // 2:]

    def framing(region, haar):
        side = haar[2] - haar[0]
        return ((region[2] - region[0]) / side, ((region[1] + region[3]) - (haar[1] + haar[3])) / 2 / side,
                ((region[0] + region[2]) - (haar[0] + haar[2])) / 2 / side)

    measured = np.array([framing(s[3], s[4]) for s in fit])
    formats = np.array([s[5] for s in fit])
    by_source = {f: float(np.median(measured[formats == f, 0])) for f in sorted(set(formats))}
    scale, shift, shift_x = np.median(measured, 0)
    reference = predictor.classify(np.stack([s[1] for s in test]))
    test_formats = np.array([s[5] for s in test])
    labels = np.array([s[0] for s in test])

    def crops_with(scale_, shift_):
        return np.stack([predictor.crop(s[2], pr.face_crop_box(s[4], s[2].shape, scale_, shift_), 0.0) for s in test])

    exact = np.stack([predictor.crop(s[2], pr.normalized_box(s[3], s[2].shape), 0.0) for s in test])
    rows = {"training crop (reference)": reference,
            "placed exactly": predictor.classify(exact),
            f"Haar box + margin (scale {1 + 2 * margin:.2f})": predictor.classify(crops_with(1 + 2 * margin, 0.0)),
            f"fitted (scale {scale:.2f}, shift {shift:+.3f})": predictor.classify(crops_with(scale, shift))}
    other_shift = shift if args.shift is None else args.shift
    for other in (float(v) for v in args.scales.split(",")):
        rows[f"scale {other:.2f}, shift {other_shift:+.3f}"] = predictor.classify(crops_with(other, other_shift))
    results = {"checkpoint": args.checkpoint, "background": args.background, "faces": len(samples), "detected": len(detected),
               "detection_rate": len(detected) / len(samples), "fitted_on": len(fit), "evaluated_on": len(test),
               "face_crop_scale": float(scale), "face_crop_shift": float(shift), "horizontal_shift": float(shift_x),
               "scale_quartiles": np.percentile(measured[:, 0], [25, 75]).tolist(), "scale_by_source_format": by_source,
               "shift_quartiles": np.percentile(measured[:, 1], [25, 75]).tolist(),
               "detector": {k: getattr(pr, k) for k in ("DETECT_WIDTH", "FACE_SCALE_FACTOR", "FACE_MIN_NEIGHBORS", "FACE_MIN_SIZE")},
               "rows": {}}
    print(f"{len(detected)} of {len(samples)} faces detected ({results['detection_rate']:.1%}); "
          f"fitted on {len(fit)}: face_crop_scale {scale:.3f} (quartiles {results['scale_quartiles'][0]:.2f}-"
          f"{results['scale_quartiles'][1]:.2f}; by source format: "
          + ", ".join(f"{f} {v:.3f}" for f, v in by_source.items()) + f"), face_crop_shift {shift:+.3f}, horizontal {shift_x:+.3f}")
    print(f"\nevaluated on {len(test)} faces | {'crop':<38} | agrees with training crop | accuracy | mean |dp| | agreement by format")
    for name, probs in rows.items():
        agree = float((probs.argmax(1) == reference.argmax(1)).mean())
        acc = float((probs.argmax(1) == labels).mean())
        dp = float(np.abs(probs - reference).mean())
        per_format = {f: float((probs.argmax(1) == reference.argmax(1))[test_formats == f].mean()) for f in by_source}
        results["rows"][name] = {"agreement": agree, "accuracy": acc, "mean_abs_prob_diff": dp,
                                 "agreement_by_source_format": per_format}
        print(f"{'':<{len(f'evaluated on {len(test)} faces')}} | {name:<38} | {agree:24.2%} | {acc:8.2%} | {dp:.4f} | "
              + " ".join(f"{f} {a:.1%}" for f, a in per_format.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
