"""Pack a YOLO dataset's train and valid splits small enough to travel with the repository to a GPU machine that
receives the repository alone (AffectNet's 22,507 crops: 58.5 MiB): each sample's crop, as the trainer cuts
it at --size px (crop_box: its box widened by --crop_margin), re-encoded as JPEG at --quality, with a label box
that the trainer's crop turns back into the whole packed image. The test split is left out (kept aside).

    python benchmarks/pack_data.py --src=../shared/data/affectnet/YOLO_format --out=packed/affectnet96

The packed set is lossy (JPEG of every image, the PNG source's too: per-source figures on it mean nothing) and its
images are named by split and index. BENCHMARKS.md has how far its accuracy lies from the full set's.
"""
import argparse
import sys
from pathlib import Path

import cv2
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import emotion_recognition as ern  # noqa: E402


def pack(src, out, size, margin, quality):
    class_names, folders, _, keypoint_values = ern.read_data_yaml(src)
    out.mkdir(parents=True, exist_ok=True)
    inner = 1 / (1 + 2 * margin)  # crop_region widens this centred box to exactly the whole image
    total, counts = 0, {}
    for split, folder in (("train", "train"), ("val", "valid")):
        if split not in folders:
            continue
        samples, problems, *_ = ern.scan_split(split, folders[split], len(class_names), keypoint_values)
        if problems:
            raise SystemExit(f"{len(problems)} problems in {folders[split]}, e.g. {problems[0]}")
        (out / folder / "images").mkdir(parents=True, exist_ok=True)
        (out / folder / "labels").mkdir(parents=True, exist_ok=True)
        decoded = {}
        for i, (path, label, box) in enumerate(zip(samples.paths, samples.labels, samples.boxes)):
            if path not in decoded:
                decoded = {path: ern.decode_image(path)[0]}  # a photo's faces are consecutive
            crop = ern.crop_box(decoded[path], box, margin, size)
            ok, data = cv2.imencode(".jpg", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
            if not ok:
                raise SystemExit(f"{path}: OpenCV could not encode its crop as JPEG")
            name = f"{folder}_{i:06d}"
            (out / folder / "images" / f"{name}.jpg").write_bytes(data.tobytes())
            (out / folder / "labels" / f"{name}.txt").write_text(f"{label} 0.5 0.5 {inner:.6f} {inner:.6f}\n")
            total += len(data)
        counts[folder] = len(samples)
    (out / "data.yaml").write_text(yaml.safe_dump({"train": "train/images", "val": "valid/images",
                                                   "nc": len(class_names), "names": class_names}, sort_keys=False))
    return counts, total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default="../shared/data/affectnet/YOLO_format")
    parser.add_argument("--out", default="packed/affectnet96")
    parser.add_argument("--size", type=int, default=96, help="pixels: the default protocol's image_size")
    parser.add_argument("--crop_margin", type=float, default=ern.Config.crop_margin)
    parser.add_argument("--quality", type=int, default=70, help="JPEG quality: 70 keeps AffectNet's 22,507 crops at 58.5 MiB")
    args = parser.parse_args()
    counts, total = pack(args.src, Path(args.out), args.size, args.crop_margin, args.quality)
    print(f"packed {counts} into {args.out}: {total / 2 ** 20:.1f} MiB of JPEG at quality {args.quality}")


if __name__ == "__main__":
    main()
