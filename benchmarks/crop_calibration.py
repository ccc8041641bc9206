"""Does --predict give the network the crops it was trained on? Measure it, and fit the Haar-box framing.

A Haar box is a tight square around eyes, nose and mouth; a training crop is the dataset's own box
(in the AffectNet export, the whole 96 px image, with the hair, chin and some background). This
script puts validation faces into larger photos (each face upscaled 1.5-3.5x at a random place on a
640x480 noisy gradient), finds them with --predict's FaceDetector, and fits the crop that frames
them as in training: the side of the training crop in Haar sides (face_crop_scale) and its centre's
offset below the Haar box's centre (face_crop_shift), as medians over the first half of the faces.
On the second half it compares, against the model's prediction on the training crop itself:

  placed exactly    the embedded image cut back out of the photo (resampling alone)
  Haar box + margin the tight Haar box widened by the checkpoint's crop_margin (what a plain loop does)
  calibrated        the fitted framing (--face_crop_scale / --face_crop_shift), what --predict does

    python benchmarks/crop_calibration.py --checkpoint=outputs/RUN/best_emotion_model.pth \
        --data_dir=../shared/data/affectnet/YOLO_format --images=2000 --out=outputs/crop_calibration.json
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import emotion_recognition as ern  # noqa: E402


def place(face, rng, canvas=(480, 640)):
    """The face image upscaled at a random place in a noisy gradient photo; returns the photo and its box."""
    h, w = canvas
    side = int(face.shape[0] * rng.uniform(1.5, 3.5))
    x, y = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
    photo = np.linspace(rng.uniform(40, 200, 3), rng.uniform(40, 200, 3), w)[None].repeat(h, 0)
    photo = np.clip(photo + rng.normal(0, 8, photo.shape), 0, 255).astype(np.uint8)
    photo[y:y + side, x:x + side] = cv2.resize(face, (side, side), interpolation=cv2.INTER_LINEAR)
    return photo, (x, y, x + side, y + side)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data_dir", required=True)
    ap.add_argument("--images", type=int, default=2000, help="validation images, evenly spaced")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="outputs/crop_calibration.json")
    args = ap.parse_args()
    names, folders, _ = ern.read_data_yaml(args.data_dir)
    split, _ = ern.scan_split("val", folders["val"], len(names))
    pick = np.linspace(0, len(split) - 1, min(args.images, len(split))).astype(int)
    rng = np.random.default_rng(args.seed)
    predictor = ern.EmotionPredictor(args.checkpoint)
    margin = predictor.cfg.crop_margin
    samples = []  # (label, training crop, photo, placed box, Haar box)
    for i in pick:
        image = ern.decode_image(split.paths[i])[0]
        photo, placed = place(image, rng)
        found = [b for b in predictor.detector(photo) if ern.box_iou(b, placed) > 0.1]
        haar = max(found, key=lambda b: ern.box_iou(b, placed)) if found else None
        box = ern.crop_box(image, split.boxes[i], margin, predictor.image_size).transpose(2, 0, 1)  # as in training
        samples.append((int(split.labels[i]), box, photo, placed, haar))
    detected = [s for s in samples if s[4] is not None]
    fit, test = detected[: len(detected) // 2], detected[len(detected) // 2:]

    def framing(placed, haar):
        side = haar[2] - haar[0]
        return ((placed[2] - placed[0]) / side, ((placed[1] + placed[3]) - (haar[1] + haar[3])) / 2 / side,
                ((placed[0] + placed[2]) - (haar[0] + haar[2])) / 2 / side)

    measured = np.array([framing(s[3], s[4]) for s in fit])
    scale, shift, shift_x = np.median(measured, 0)
    reference = predictor.classify(np.stack([s[1] for s in test]))
    labels = np.array([s[0] for s in test])

    def crops_with(scale_, shift_):
        return np.stack([ern.crop_box(s[2], ern.face_crop_box(s[4], s[2].shape, scale_, shift_), 0.0,
                                      predictor.image_size).transpose(2, 0, 1) for s in test])

    exact = np.stack([ern.crop_box(s[2], ((s[3][0] + s[3][2]) / 2 / 640, (s[3][1] + s[3][3]) / 2 / 480,
                                          (s[3][2] - s[3][0]) / 640, (s[3][3] - s[3][1]) / 480), 0.0,
                                   predictor.image_size).transpose(2, 0, 1) for s in test])
    rows = {"training crop (reference)": reference,
            "placed exactly": predictor.classify(exact),
            f"Haar box + margin (scale {1 + 2 * margin:.2f})": predictor.classify(crops_with(1 + 2 * margin, 0.0)),
            f"calibrated (scale {scale:.2f}, shift {shift:+.3f})": predictor.classify(crops_with(scale, shift))}
    results = {"checkpoint": args.checkpoint, "faces": len(samples), "detected": len(detected),
               "detection_rate": len(detected) / len(samples), "fitted_on": len(fit), "evaluated_on": len(test),
               "face_crop_scale": float(scale), "face_crop_shift": float(shift), "horizontal_shift": float(shift_x),
               "scale_quartiles": np.percentile(measured[:, 0], [25, 75]).tolist(),
               "shift_quartiles": np.percentile(measured[:, 1], [25, 75]).tolist(),
               "detector": {k: v for k, v in dataclasses.asdict(predictor.action).items() if k.startswith(("face_", "detect"))},
               "rows": {}}
    print(f"{len(detected)} of {len(samples)} faces detected ({results['detection_rate']:.1%}); "
          f"fitted on {len(fit)}: face_crop_scale {scale:.3f} (quartiles {results['scale_quartiles'][0]:.2f}-"
          f"{results['scale_quartiles'][1]:.2f}), face_crop_shift {shift:+.3f}, horizontal {shift_x:+.3f}")
    print(f"\nevaluated on {len(test)} faces | {'crop':<38} | agrees with training crop | accuracy | mean |dp|")
    for name, probs in rows.items():
        agree = float((probs.argmax(1) == reference.argmax(1)).mean())
        acc = float((probs.argmax(1) == labels).mean())
        dp = float(np.abs(probs - reference).mean())
        results["rows"][name] = {"agreement": agree, "accuracy": acc, "mean_abs_prob_diff": dp}
        print(f"{'':<{len(f'evaluated on {len(test)} faces')}} | {name:<38} | {agree:24.2%} | {acc:8.2%} | {dp:.4f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
