"""Export speed and accuracy: the network in PyTorch eager against the exported model.onnx in onnxruntime.

For the CPU-preset model (PRESETS["cpu"]) and the default model (96 px, 27.7 M), in float32
on the CPU, with the same inputs (normalization and softmax included on both sides, the image alone; --tta: the
model's test-time views inside both, as export.py writes them, every view in one pass, so PyTorch eager stacks them
all too, unlike predict.py's TTA_IMAGES_PER_CALL; and the graph export.py wrote before 2026-12-07, a pass a view,
beside them):

  batch 1     milliseconds per face, one face per call (a camera, a notebook)
  batch 64    milliseconds per face at 64 faces per call (a folder, a video)

onnxruntime runs at each graph-optimization level (basic, extended, all); with --data_dir and --checkpoint (a
trained CPU-preset checkpoint), int8 quantizations of the export (dynamic: weights int8, activations quantized
on the fly; static: QDQ with activation ranges calibrated on training faces) are timed too, and every variant's
accuracy on the validation split is set against the float32 export's. Rounds alternate between the runtimes.
Speed does not depend on the weights: without --checkpoint, both models are untrained.

    python benchmarks/bench_export.py --rounds=5 --out=outputs/bench_export.json
    python benchmarks/bench_export.py --checkpoint=outputs/RUN/best_emotion_model.pth --data_dir=path/to/YOLO_format
"""
import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import emotion_recognition as ern  # noqa: E402
import export as ex  # noqa: E402

MODELS = {"cpu preset": ern.PRESETS["cpu"], "default": {}}
LEVELS = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


class PassAView(ex.ExportedERN):
    """The graph export.py wrote before 2026-12-07: the same views, the network once a view."""

    def __init__(self, *args):
        super().__init__(*args)
        self.views_per_call = 1


def export_seconds(module, path, size):
    """Seconds to export module to path as export.py does."""
    t0 = time.perf_counter()
    ex.trace_to_onnx(module, path, size)
    return time.perf_counter() - t0


def session(path, level="all", threads=0):
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ms_per_face(run, x, calls):
    run(x)  # warm-up: first-call allocations and kernel choices
    t0 = time.perf_counter()
    for _ in range(calls):
        run(x)
    return (time.perf_counter() - t0) / calls / len(x) * 1000


def quantize(path, kind, calibration, out, method="MinMax", ops=""):
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process
    prepared = out.with_name(out.stem + "_prepared.onnx")
    quant_pre_process(str(path), str(prepared), skip_symbolic_shape=True)  # ONNX shape inference and fusions
    if kind == "int8 dynamic":
        quantize_dynamic(str(prepared), str(out), weight_type=QuantType.QInt8)
        return out

    class Faces(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(np.array_split(calibration, max(1, len(calibration) // 32)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    quantize_static(str(prepared), str(out), Faces(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, method),
                    op_types_to_quantize=ops.split(",") if ops else None)
    return out


def accuracy(run, images, labels, batch=64):  # README: at most 64 faces a call (their views go through together)
    pred = np.concatenate([run(images[i:i + batch]).argmax(1) for i in range(0, len(images), batch)])
    return float((pred == labels).mean()), pred


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=200, help="batch-1 calls per round (batch 64: a tenth)")
    ap.add_argument("--threads", type=int, default=0, help="threads of both runtimes; 0 = one per core")
    ap.add_argument("--models", default="cpu preset,default", help="which of: " + ", ".join(MODELS))
    ap.add_argument("--tta", action="store_true", help="both sides with the model's test-time views, as export.py "
                    "writes it by default (the CPU preset's twenty), not the image alone")
    ap.add_argument("--checkpoint", default="", help="a trained CPU-preset checkpoint: accuracy and int8 variants")
    ap.add_argument("--data_dir", default="", help="the dataset of --checkpoint (validation split: accuracy)")
    ap.add_argument("--cache_dir", default="outputs/cache")
    ap.add_argument("--calibration", type=int, default=512, help="training faces that calibrate static int8")
    ap.add_argument("--calibrate_method", default="MinMax", choices=["MinMax", "Entropy", "Percentile"],
                    help="how static int8 sets activation ranges from the calibration faces")
    ap.add_argument("--int8_ops", default="", help="operator types static int8 quantizes, e.g. Conv; empty = all it can")
    ap.add_argument("--out", default="outputs/bench_export.json")
    args = ap.parse_args()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_export_"))
    cpu = ern.cpu_model()
    results = {"cpu": cpu, "bf16_native": ern.cpu_has_bf16(), "threads": threads, "torch": torch.__version__,
               "onnxruntime": ort.__version__, "calibrate_method": args.calibrate_method, "int8_ops": args.int8_ops or "all", "precision": "float32 (PyTorch eager and onnxruntime)", "models": {}}
    print(f"{cpu} | native bf16: {results['bf16_native']} | {threads} threads | torch {torch.__version__} | "
          f"onnxruntime {ort.__version__} | float32\n")
    for name in args.models.split(","):
        cfg = dataclasses.replace(ern.Config(), **MODELS[name])
        ckpt_path = Path(args.checkpoint) if args.checkpoint and name == "cpu preset" else tmp / f"{name.replace(' ', '_')}.pth"
        if not ckpt_path.exists():
            torch.manual_seed(0)
            torch.save(ern.checkpoint_dict(ern.build_model(cfg, 8), cfg, ern.DEMO_CLASSES, torch.full((3,), 0.5),
                                           torch.full((3,), 0.25), 0, {}), ckpt_path)
        ckpt = ern.load_checkpoint(ckpt_path)
        model, cfg = ern.model_from_checkpoint(ckpt)
        if not args.tta:  # the image alone
            cfg = dataclasses.replace(cfg, tta_flip=False, tta_shift=0, tta_zoom=0.0)
        views = (cfg.tta_flip, cfg.tta_shift, cfg.tta_zoom)
        eager = ex.ExportedERN(model, *ern.checkpoint_normalization(ckpt, "cpu"), cfg).eval()
        onnx_path = tmp / f"{name.replace(' ', '_')}.onnx"
        differences = ex.export_onnx(ckpt_path, onnx_path, *views)
        size = ckpt["image_size"]

        def torch_run(x):
            with torch.inference_mode():
                return eager(torch.from_numpy(x)).numpy()

        runs = {"PyTorch eager": torch_run}
        for level in LEVELS:
            s = session(onnx_path, level, threads)
            runs[f"onnxruntime {level}"] = lambda x, s=s: s.run(["probabilities"], {"images": x})[0]
        exports = {}
        if args.tta:  # the same views a pass each, against every view in one pass (export.py's)
            exports = {"every view in one pass": export_seconds(eager, tmp / "together.onnx", ckpt["image_size"]),
                       "a pass a view": export_seconds(PassAView(model, *ern.checkpoint_normalization(ckpt, "cpu"),
                                                                 cfg).eval(), tmp / "each.onnx", ckpt["image_size"])}
            s = session(tmp / "each.onnx", "all", threads)
            runs["onnxruntime all, a pass a view"] = lambda x, s=s: s.run(["probabilities"], {"images": x})[0]
        val = None
        if args.checkpoint and args.data_dir and name == "cpu preset":
            data_cfg = dataclasses.replace(cfg, data_dir=args.data_dir, cache_dir=args.cache_dir)
            _, splits, _ = ern.load_dataset(data_cfg, None, ("train", "val"))
            val = (np.asarray(splits["val"].images, np.float32) / 255, splits["val"].labels)
            pick = np.random.default_rng(0).permutation(len(splits["train"]))[:args.calibration]
            calibration = np.asarray(splits["train"].images[np.sort(pick)], np.float32) / 255
            for kind in ("int8 dynamic", "int8 static"):
                s = session(quantize(onnx_path, kind, calibration, tmp / f"{kind.replace(' ', '_')}.onnx", args.calibrate_method, args.int8_ops), "all", threads)
                runs[f"onnxruntime {kind}"] = lambda x, s=s: s.run(["probabilities"], {"images": x})[0]
        rng = np.random.default_rng(0)
        x1, x64 = (rng.random((n, 3, size, size), dtype=np.float32) for n in (1, 64))
        times = {k: {"batch 1": [], "batch 64": []} for k in runs}
        for _ in range(args.rounds):
            for k, run in runs.items():
                times[k]["batch 1"].append(ms_per_face(run, x1, args.calls))
                times[k]["batch 64"].append(ms_per_face(run, x64, max(1, args.calls // 10)))
        best = {k: {b: min(v) for b, v in t.items()} for k, t in times.items()}
        row = {"parameters": ern.count_parameters(model), "image_size": size, "stem_stride": cfg.stem_stride,
               "views": len(ern.tta_views(torch.zeros(1, 3, size, size), *views)), "export_check": differences,
               "export_seconds": exports,
               "ms_per_face": best, "rounds": times,
               "speedup_vs_eager": {k: {b: best["PyTorch eager"][b] / v for b, v in t.items()} for k, t in best.items()}}
        print(f"{name} ({row['parameters'] / 1e6:.1f} M parameters, {size} px, {row['views']} view(s); export check "
              f"{max(differences.values()):.1e})" + "".join(f"; export {k}: {v:.1f} s" for k, v in exports.items()))
        print(f"  {'runtime':<28} {'batch 1 ms/face':>16} {'x eager':>8} {'batch 64 ms/face':>17} {'x eager':>8}")
        for k, t in best.items():
            up = row["speedup_vs_eager"][k]
            print(f"  {k:<28} {t['batch 1']:16.3f} {up['batch 1']:7.2f}x {t['batch 64']:17.3f} {up['batch 64']:7.2f}x")
        if val is not None:
            row["val_accuracy"], agree = {}, {}
            reference = None
            for k, run in runs.items():
                if k in ("onnxruntime basic", "onnxruntime extended"):
                    continue
                row["val_accuracy"][k], pred = accuracy(run, *val)
                reference = pred if reference is None else reference
                agree[k] = float((pred == reference).mean())
            row["prediction_agreement_with_eager"] = agree
            print(f"  validation accuracy ({len(val[1])} faces, no TTA): " + ", ".join(
                f"{k} {v:.2%} (agrees {agree[k]:.2%})" for k, v in row["val_accuracy"].items()))
        print()
        results["models"][name] = row
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    shutil.rmtree(tmp)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
