"""Prediction speed: predict.py's batched, overlapped video path against a plain one-at-a-time loop.

On a generated 640x480 video with one face (Grace Hopper's head, from matplotlib's sample data, moving
across a grey background), for the CPU-preset model (PRESETS["cpu"]: its size, stem and width) with the mirror alone
("cpu preset") and with its twenty test-time views ("cpu preset 20 views", as it ships), and the default model
(96 px, 27.7 M), untrained (speed does not depend on the weights):

  end to end    frames per second from the video file to predictions.csv, the annotated video and the
                timeline (predict.py's predict_video), against a plain loop that reads a frame, finds the
                faces, and classifies each face alone (no outputs written)
  classify      milliseconds per face for the network alone: prediction_batch faces per forward pass,
                against one face per pass

Both paths use the same detector settings, crops and inference settings (flip TTA as the checkpoint
says, float32 or bf16 as the CPU allows); rounds alternate between the two.

    python benchmarks/bench_predict.py --frames=150 --rounds=3 --out=outputs/bench_predict.json
"""
import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from matplotlib import cbook

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import emotion_recognition as ern  # noqa: E402
import predict as pr  # noqa: E402

MODELS = {"cpu preset": {**ern.PRESETS["cpu"], "tta_shift": 0, "tta_zoom": 0.0},  # the mirror alone, as before 12-04
          "cpu preset 20 views": ern.PRESETS["cpu"],  # as it is trained and evaluated: the face, its zoom, shifts, mirrors
          "default": {}}


def write_video(path, frames, fps=25.0):
    face = cv2.resize(cv2.imread(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))[60:400, 110:420], (180, 200))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (640, 480))
    for i in range(frames):
        frame = np.full((480, 640, 3), 90, np.uint8)
        x = int(100 + 300 * (0.5 - 0.5 * np.cos(i / frames * 2 * np.pi)))
        frame[140:340, x:x + 180] = face
        writer.write(frame)
    writer.release()


def plain_loop(predictor, video):
    """Read a frame, find its faces, classify each face on its own: the loop one writes first."""
    capture, faces = cv2.VideoCapture(str(video)), 0
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        for _, _, crop in predictor.faces(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), still=False):  # as predict.py's frames
            if crop is not None:  # a frame without a face: nothing to classify
                predictor.classify(crop[None])
                faces += 1
    capture.release()
    return faces


def ours(predictor, video, out_dir):
    """predict.py's path for one video: predictions.csv, the annotated video, the timeline, summary.json."""
    out = pr.PredictionOutputs(out_dir, predictor.class_names, jsonl=False)
    entry = pr.predict_video(predictor, pr.MediaSource("video", str(video), "clip.mp4"), out, pr.Prediction())
    out.close({})
    return entry["faces"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--faces", type=int, default=512, help="crops for the classification-only timing")
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    ap.add_argument("--tta_flip", choices=["checkpoint", "true", "false"], default="checkpoint",
                    help="flip test-time augmentation, as predict.py's --tta_flip (checkpoint: as trained, on)")
    ap.add_argument("--models", default="cpu preset,default", help="which of: " + ", ".join(MODELS))
    ap.add_argument("--out", default="outputs/bench_predict.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    video = tmp / "clip.mp4"
    write_video(video, args.frames)
    cpu = ern.cpu_model()
    results = {"cpu": cpu, "bf16_native": ern.cpu_has_bf16(), "torch_threads": torch.get_num_threads(),
               "tta_flip": args.tta_flip,
               "frames": args.frames, "video": "640x480, 25 fps, one face", "models": {}}
    print(f"{cpu} | native bf16: {results['bf16_native']} | torch threads {torch.get_num_threads()} | "
          f"{args.frames} frames 640x480 | tta_flip {args.tta_flip}\n")
    print(f"{'model':<12} {'path':<28} {'frames/s':>9} {'ms/frame':>9} {'faces':>6}")
    for name in args.models.split(","):
        preset = MODELS[name]
        torch.manual_seed(0)
        cfg = dataclasses.replace(ern.Config(), **preset)
        ckpt = tmp / f"{name.replace(' ', '_')}.pth"
        torch.save(ern.checkpoint_dict(ern.build_model(cfg, 8), cfg, ern.DEMO_CLASSES, torch.full((3,), 0.5),
                                       torch.full((3,), 0.25), 0, {}), ckpt)
        settings = {} if args.tta_flip == "checkpoint" else {"tta_flip": args.tta_flip == "true"}
        predictor = pr.EmotionPredictor(ckpt, "cpu", **settings)
        plain_loop(predictor, video)  # warm-up: first-call allocations, oneDNN primitive caches, imports
        ours(predictor, video, tmp / "warm-up")
        times = {"ours": [], "plain": []}
        for r in range(args.rounds):
            t0 = time.perf_counter()
            faces_plain = plain_loop(predictor, video)
            times["plain"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            faces_ours = ours(predictor, video, tmp / f"out_{name.replace(' ', '_')}_{r}")
            times["ours"].append(time.perf_counter() - t0)
        crops = np.stack([ern.crop_box(np.random.default_rng(i).integers(0, 256, (120, 120, 3), dtype=np.uint8),
                                       (0.5, 0.5, 1.0, 1.0), 0.0, cfg.image_size).transpose(2, 0, 1)
                          for i in range(args.faces)])
        batch = pr.Prediction().batch
        classify = {"batched": [], "one at a time": []}
        predictor.classify(crops[:batch])
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            for i in range(0, len(crops), batch):
                predictor.classify(crops[i:i + batch])
            classify["batched"].append((time.perf_counter() - t0) / len(crops) * 1000)
            t0 = time.perf_counter()
            for i in range(len(crops) // 4):
                predictor.classify(crops[i:i + 1])
            classify["one at a time"].append((time.perf_counter() - t0) / (len(crops) // 4) * 1000)
        best = {k: min(v) for k, v in times.items()}
        row = {"parameters": ern.count_parameters(predictor.model), "image_size": cfg.image_size,
               "stem_stride": predictor.cfg.stem_stride, "tta_flip": predictor.cfg.tta_flip,
               "tta_shift": predictor.cfg.tta_shift, "tta_zoom": predictor.cfg.tta_zoom,
               "arithmetic": ern.arithmetic(predictor.cfg, predictor.device),
               "faces": {"ours": faces_ours, "plain": faces_plain},
               "end_to_end_fps": {k: args.frames / v for k, v in best.items()},
               "end_to_end_speedup": best["plain"] / best["ours"],
               "classify_ms_per_face": {k: min(v) for k, v in classify.items()}, "prediction_batch": batch,
               "classify_speedup": min(classify["one at a time"]) / min(classify["batched"]),
               "seconds": times, "classify_ms_rounds": classify}
        results["models"][name] = row
        for path, key in ((f"predict.py (batch {batch})", "ours"), ("plain loop", "plain")):
            fps = row["end_to_end_fps"][key]
            print(f"{name:<12} {path:<28} {fps:9.1f} {1000 / fps:9.1f} {row['faces'][key]:6d}")
        print(f"{name:<12} {'speed-up':<28} {row['end_to_end_speedup']:8.2f}x")
        for key, ms in row["classify_ms_per_face"].items():
            print(f"{name:<12} {'classify ' + key:<28} {'':>9} {ms:8.2f}  ms/face")
        print(f"{name:<12} {'classify speed-up':<28} {row['classify_speedup']:8.2f}x\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    shutil.rmtree(tmp)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
