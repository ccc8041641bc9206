"""
Export a model trained by emotion_recognition.py to ONNX, and check the export against PyTorch.

    python export.py --checkpoint=outputs/RUN          # a run folder: its best_emotion_model.pth -> RUN/model.onnx
    python export.py --checkpoint=RUN/last.pth --output=model.onnx

model.onnx takes RGB face crops in [0, 1], (N, 3, S, S) float32, and gives class probabilities (N, K), as evaluation
and predict.py compute them in float32: the checkpoint's normalization, its test-time views (the crop, its zoom,
shifts and mirrors, averaged: tta_views; all of a call's views through the network as one batch) and the softmax are
inside the graph, and its metadata holds the class names (in data.yaml's order), the image size and the crop margin.
It runs in onnxruntime without PyTorch or these scripts (README). Before model.onnx is written, onnxruntime and
PyTorch are compared on noise and on real face crops.
"""

import dataclasses
import importlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from emotion_recognition import (EVALUATION_MACHINE, UserError, checkpoint_in, checkpoint_normalization,
                                 console_escapes, count_parameters, decode_image, fit_threads_to_cpu, inference_config,
                                 load_checkpoint, model_from_checkpoint, network_crop, read_overrides,
                                 replace_file, stop_on_ctrl_c_and_sigterm, tta_view_count, user_path, view_outputs)
from predict import WHOLE_IMAGE, FaceDetector, detected_face_crop

ONNX_FORMAT = "ern-onnx-v1"  # the model metadata tag of an exported .onnx file
LOCAL_FIELDS = ("data_dir", *EVALUATION_MACHINE)  # the training machine's: left out of a file to share
EXPORT_TOLERANCE = 1e-4  # largest probability difference between the export and PyTorch that is accepted


@dataclass
class Export:
    """export settings"""
    checkpoint: str = ""  # a run folder (its best_emotion_model.pth) or a .pth file
    output: str = ""  # the .onnx file (a folder, or a name ending in /: its model.onnx); empty = beside the checkpoint
    overwrite: bool = False  # replace an existing file
    tta_flip: bool | None = None  # average each view and its mirror in the graph (2x); empty = the checkpoint's
    tta_shift: int | None = None  # views moved N pixels each way too (5x the work); empty = the checkpoint's
    tta_zoom: float | None = None  # zoomed views: central crop, this fraction of a side (2x); empty = the checkpoint's


class ExportedERN(nn.Module):
    """What model.onnx computes: RGB images in [0, 1], (N, 3, S, S) -> class probabilities (N, K): evaluation's
    view_outputs (the checkpoint's normalization; cfg's test-time views, the logits of the image, its zoom, shifts and
    mirrors averaged), in float32 and the contiguous layout, and the softmax, inside the graph."""

    def __init__(self, model, mean, std, cfg):
        super().__init__()
        self.model, self.cfg = model, dataclasses.replace(cfg, amp=False, channels_last=False)
        self.views_per_call = tta_view_count(cfg)  # all in one pass: the graph's batch is not known when it is traced
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, images):
        logits = view_outputs(self.model, images * 255, self.mean, self.std, self.cfg, per_call=self.views_per_call)[0]
        return logits.softmax(1)


def export_inputs(image_size):
    """Inputs in [0, 1] to compare an export with PyTorch on: uniform noise, and the real face of the portrait
    matplotlib ships (cropped as predict.py crops a detected face, and the whole image), each also mirrored."""
    from matplotlib import cbook
    image, _ = decode_image(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    real = np.stack([detected_face_crop(image, b, image_size) for b in FaceDetector()(image)]
                    + [network_crop(image, WHOLE_IMAGE, 0.0, image_size)])
    real = torch.from_numpy(np.concatenate([real, real[..., ::-1]])).float() / 255
    noise = torch.rand(8, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    return {"random": noise, "real": real}


def trace_to_onnx(module, path, size):
    """Write module (images (N, 3, size, size) -> probabilities (N, K), N any) to path as an ONNX graph."""
    torch.onnx.export(module, (torch.rand(2, 3, size, size),), str(path), input_names=["images"],
                      output_names=["probabilities"], dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
                      dynamo=True, external_data=False, verbose=False)


def export_onnx(checkpoint, path, tta_flip=None, tta_shift=None, tta_zoom=None, ckpt=None):
    """Write model.onnx from an ERN checkpoint (ckpt: that file already loaded; the metadata names the file), its
    metadata (class names, image size, crop margin, test-time views, metrics, config) inside; then run it with
    onnxruntime against PyTorch.
    tta_flip, tta_shift, tta_zoom: None = the checkpoint's. Returns the largest probability difference per input
    kind."""
    # onnx for the metadata, onnxruntime for onnx_session, onnxscript for torch.onnx.export (which fails deep in torch)
    for package in ("onnx", "onnxruntime", "onnxscript"):
        try:
            importlib.import_module(package)
        except ModuleNotFoundError as e:  # not installed
            raise UserError(f"export needs {e.name or package}, which is not installed: pip install -r "
                            f"requirements.txt") from None
        except ImportError as e:  # a binary part that does not load (onnxruntime 1.18 under numpy 2)
            raise UserError(f"export could not import {package} ({str(e) or 'a binary part did not load'}): pip "
                            f"install --upgrade -r requirements.txt") from None
    import onnx
    if ckpt is None:
        ckpt = load_checkpoint(checkpoint)
    model, _ = model_from_checkpoint(ckpt)
    cfg = inference_config(ckpt, "cpu", tta_flip=tta_flip, tta_shift=tta_shift, tta_zoom=tta_zoom)
    exported = ExportedERN(model, *checkpoint_normalization(ckpt, "cpu"), cfg).eval()
    size = ckpt["image_size"]
    try:
        trace_to_onnx(exported, path, size)
    except ImportError as e:  # an onnxscript or onnx older than this torch, whose exporter imports their parts lazily
        package = (e.name or "").split(".")[0]
        if package not in ("onnx", "onnxscript", "onnx_ir"):
            raise
        raise UserError(f"torch {torch.__version__}'s ONNX exporter needs a newer {package} ({e}): pip install "
                        f"--upgrade onnxscript onnx") from None
    graph = onnx.load(str(path))
    views = tta_view_count(cfg)
    views_note = f" (and its {views - 1} other test-time views, averaged)" if views > 1 else ""
    graph.doc_string = (f"ERN emotion classifier: images (N, 3, {size}, {size}) float32 RGB in [0, 1], face crops with "
                        f"crop_margin {cfg.crop_margin} around the face box{views_note} -> probabilities "
                        f"(N, {len(ckpt['class_names'])}) over the metadata's class_names")
    meta = {"format": ONNX_FORMAT, "class_names": ckpt["class_names"], "image_size": size, "crop_margin": cfg.crop_margin,
            "tta_flip": cfg.tta_flip, "tta_shift": cfg.tta_shift, "tta_zoom": cfg.tta_zoom,
            "normalization": ckpt["normalization"], "epoch": ckpt["epoch"], "metrics": ckpt["metrics"],
            "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in LOCAL_FIELDS},
            "num_parameters": count_parameters(model), "best": ckpt.get("best"),
            "checkpoint": Path(checkpoint).name}
    for key, value in meta.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.save(graph, str(path))
    session = onnx_session(path, graph)
    differences = {}
    with torch.inference_mode():
        for kind, x in export_inputs(size).items():
            got = session.run(["probabilities"], {"images": x.numpy()})[0]
            differences[kind] = float(np.abs(got - exported(x).numpy()).max())
    return differences


def onnx_session(path, onnx_model):
    """An onnxruntime CPU session of the written file; an onnxruntime too old for its opset is one line naming both
    versions and onnxruntime's own limit."""
    import onnxruntime
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors
    try:
        return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except (ort_errors.Fail, ort_errors.InvalidGraph, ort_errors.InvalidProtobuf, ort_errors.NotImplemented) as e:
        # an onnxruntime older than the exporter names its limit in the message's last sentence
        message = str(e).strip()
        opset = max(o.version for o in onnx_model.opset_import if o.domain in ("", "ai.onnx"))
        if "opset" in message or "IR version" in message:
            reason = message.rsplit(") ", 1)[-1].rstrip(".").split(". ")[-1]
            raise UserError(f"onnxruntime {onnxruntime.__version__} cannot load the export (ONNX opset {opset}, IR "
                            f"version {onnx_model.ir_version}): {reason}; upgrade it: pip install -U onnxruntime") \
                from None
        raise UserError(f"onnxruntime {onnxruntime.__version__} could not load the export: {message[:300]}") from None


def run_export(args):
    """model.onnx at args.output, or beside the checkpoint; exit status 1 when onnxruntime disagrees with PyTorch by
    more than EXPORT_TOLERANCE (nothing written then). The checkpoint is read before anything is written."""
    ckpt = load_checkpoint(args.checkpoint)
    path = user_path(args.output) if args.output else Path(args.checkpoint).parent / "model.onnx"
    try:
        folder = path.is_dir() or args.output.endswith(("/", os.sep))  # model.onnx in it, as --checkpoint's
        path = path / "model.onnx" if folder else path
        exists = path.exists()
    except OSError as e:  # a name too long, a folder this user may not enter
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    if path.suffix.lower() != ".onnx":  # a .pth given by mistake would be overwritten by the export
        raise UserError(f"--output={args.output}: name the .onnx file to write, or a folder for its model.onnx")
    if exists and not args.overwrite:
        raise UserError(f"{path} exists; choose another --output, or --overwrite=true")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {path.parent}: {e.strerror or e}") from None
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.onnx")  # the file appears only once it passed the check
    try:
        differences = export_onnx(args.checkpoint, tmp, args.tta_flip, args.tta_shift, args.tta_zoom, ckpt)
        worst = max(differences.values())
        report = ", ".join(f"{v:.2e} on {k} inputs" for k, v in differences.items())
        if worst > EXPORT_TOLERANCE:
            print(f"error: onnxruntime differs from PyTorch by up to {worst:.2e} > {EXPORT_TOLERANCE:g} ({report}); "
                  f"nothing written", file=sys.stderr)
            return 1
        replace_file(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); onnxruntime vs PyTorch, largest probability "
          f"difference: {report}")
    return 0


def main(argv):
    """Parse, export and check. Returns the exit status: 0, or 1 when onnxruntime disagrees with PyTorch."""
    console_escapes()
    (given,), _ = read_overrides(argv, (Export,), __doc__)
    args = Export(**given)
    if not args.checkpoint:
        raise UserError("give the model: --checkpoint=RUN_FOLDER or a .pth")
    fit_threads_to_cpu()
    return run_export(dataclasses.replace(args, checkpoint=checkpoint_in(args.checkpoint, "best_emotion_model.pth")))


if __name__ == "__main__":
    stop_on_ctrl_c_and_sigterm()
    try:
        sys.exit(main(sys.argv[1:]))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: nothing written", file=sys.stderr)
        sys.exit(130)
