"""
ERN: an Emotion Recognition Network for faces, in one file.

A residual CNN with dual attention (channel + spatial, after every stage), an emotion context module (one
learnable prototype per emotion; each face's cosine similarity to the prototypes gives a context distribution q
whose expected prototype refines the prediction), and a hybrid loss (label-smoothed cross-entropy + lambda *
KL(target || q)). Reads YOLO-format datasets (data.yaml + train/valid/test, each images/ + labels/), trains with
AdamW and a warm-up + cosine schedule, and writes checkpoints, evaluation_results.json and plots into one run
folder. Beside it, predict.py uses a trained model on photos, videos and cameras, and export.py writes ONNX.

    python emotion_recognition.py --demo                         # synthetic faces: 22 s on a 2-core CPU with bf16
    python emotion_recognition.py --data_dir=path/to/YOLO_format # the full protocol (GPU: 96 px, 50 epochs)
    python emotion_recognition.py --data_dir=... --preset=cpu    # the CPU protocol: 30 minutes (--time_budget)
    python emotion_recognition.py --evaluate=outputs/RUN         # a run folder or a checkpoint, on its own data
    python emotion_recognition.py --resume=outputs/RUN           # continue an interrupted run
    torchrun --nproc_per_node=4 emotion_recognition.py --data_dir=...  # DistributedDataParallel; --batch_size is global
    python emotion_recognition.py --help                         # every field

Measured (2-core AMD EPYCs, no GPU; BENCHMARKS.md): --preset=cpu trains on the AffectNet YOLO export's 17,101
training faces in 30 minutes and reaches 74.26 % validation accuracy (eleven seeds; 2.8 M parameters, 55-62 epochs) on
a Zen 5 EPYC with native bf16 (2026-12-04 to 06), and 72.30 % (four seeds) in float32 on a Zen 3 EPYC with AVX2 only
(2026-12-05), where it trains one block a stage (1.2 M parameters, 33-34 epochs; two blocks fit 17.5-18 epochs there
and reach 70.03 %, three seeds). On a Zen 4 EPYC with native bf16, which steps at 0.6x the Zen 5's speed, it
fits 28-35 epochs and reaches 72.97 % (three seeds, 2026-12-07).
How many epochs fit, and so the figure, depends on the machine's speed that day. The 96 px, 27.7 M-parameter,
50-epoch default is the GPU protocol. Every field of Config can be overridden as --name=value.
"""

import collections
import contextlib
import copy
import csv
import dataclasses
import datetime
import difflib
import errno
import functools
import hashlib
import inspect
import itertools
import json
import math
import os
import pickle
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
from collections import Counter, defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# the budget's start where the process's own is unknown (process_start_time): here, before torch's seconds of import
IMPORTING_SINCE = time.time()

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from tqdm import tqdm


@dataclass
class Config:
    """Experiment fields (saved with the model)"""
    # data
    data_dir: str = "data/affectnet/YOLO_format"  # folder holding data.yaml (or the data.yaml itself)
    image_size: int = 96  # pixels, square; the box crop is resized to this (>= 32; >= 64 with --stem_stride=2)
    crop_margin: float = 0.1  # fraction of the box size added on each side before cropping
    cache_dir: str = "outputs/cache"  # decoded uint8 arrays, one per split, rebuilt when files change
    strict: bool = True  # stop on any dataset problem; false: skip bad samples and list them
    drop_duplicates: bool = False  # drop valid/test images that duplicate a training image
    val_fraction: float = 0.1  # held out of train, stratified (never a class's only image), if no val split of its own
    decode_threads: int = 0  # threads decoding images into the cache; 0 = one per core
    # augmentation (on the device, per-sample randomness)
    aug_scale: float = 0.1  # random zoom in [1 - a, 1 + a]
    aug_translate: float = 0.1  # random shift, fraction of the image side
    aug_rotate: float = 10.0  # random rotation, degrees in [-a, a]
    aug_flip: float = 0.5  # probability of a horizontal flip
    aug_brightness: float = 0.2  # brightness factor in [1 - a, 1 + a]
    aug_contrast: float = 0.2  # contrast factor in [1 - a, 1 + a]
    aug_erase: float = 0.25  # probability of erasing one random rectangle
    # model
    width: float = 1.0  # channel multiplier; 1.0 = the 27.7 M-parameter network (the original's 27.5 M + 0.5 %)
    blocks: str = "2,4,7,2"  # residual blocks per stage
    stem_stride: int = 1  # 1 | 2: the stem convolution's stride (2: faces of twice the side at the same network cost)
    channel_attention: bool = True  # CBAM channel gate after every stage
    spatial_attention: bool = True  # CBAM spatial gate after every stage
    attention_reduction: int = 16  # channel-attention bottleneck ratio
    attention_residual: bool = True  # x * (1 + gate), keeping the identity path; false: x * gate (CBAM's)
    context: bool = True  # emotion context module (prototypes); false: the classifier sees f only
    dropout: float = 0.3  # before the classifier
    # loss
    label_smoothing: float = 0.1  # epsilon of the smoothed target t
    context_weight: float = 0.5  # lambda of the KL term; 0 = cross-entropy only
    context_temperature: float = 0.1  # tau: s_k = cos(f, P_k) / tau
    class_weights: bool = False  # weight the cross-entropy by inverse class frequency
    # optimization
    epochs: float = 50  # passes over the training set; a fraction ends the last one early (time_budget: at most this many)
    val_faces: int = 0  # per-epoch validation on this many faces of the validation split (a fixed random sample), one view each (no test-time views); 0 = all, as evaluated. The final evaluation is always the whole split
    time_budget: float = 0.0  # minutes from the process's start to the last file written (a first decode aside); 0 = off. Times a few steps, plans and re-plans the epochs to fit
    batch_size: int = 128  # images per optimizer step (under torchrun: the global batch, split across processes)
    lr: float = 1e-3  # AdamW peak learning rate
    weight_decay: float = 0.05  # AdamW decoupled weight decay
    warmup_epochs: float = 2.0  # linear warm-up, then cosine annealing per step
    min_lr_ratio: float = 0.01  # cosine floor, fraction of lr
    grad_clip: float = 5.0  # max gradient norm; 0 = off
    # system
    seed: int = 0  # seeds torch and numpy (data order, augmentation, initialization)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # autocast: CUDA bf16 (fp16 + GradScaler before Ampere); CPU bf16 where the CPU has it natively
    channels_last: bool = True  # NHWC memory format for convolutions (CUDA; CPU: where the probe of the model passed; faster in float32 and bf16, BENCHMARKS.md)
    compile: bool = False  # torch.compile the model
    deterministic: bool = False  # deterministic algorithms (bit-exact resume; slower on CUDA)
    sync_bn: bool = False  # under torchrun: BatchNorm statistics of the global batch (every process's share together)
    dist_timeout: float = 10.0  # under torchrun: minutes a collective waits for the other processes before failing
    eval_batch_size: int = 512  # images per forward pass in evaluation
    tta_flip: bool = True  # evaluation averages each view and its mirror
    tta_shift: int = 0  # evaluation also averages the image moved this many pixels left, right, up and down; 0 = off
    tta_zoom: float = 0.0  # evaluation also averages the views of the image's central crop of this fraction of its side, enlarged back; 0 = off
    # output
    output_dir: str = ""  # run folder; empty = outputs/{name}__{seed}__{time}
    run_name: str = "ern"  # first part of the default run folder's name
    overwrite: bool = False  # allow writing into a folder that already holds a run's results
    tsne_samples: int = 2000  # points in feature_space.png (t-SNE's time grows with them)
    attention_samples: int = 2000  # faces in attention_maps.png (a forward and a backward pass each); 0 = no figure
    # preset
    preset: str = ""  # named overrides applied before the command line: cpu | demo


@dataclass
class Action:
    """What a call does besides training a new model: at most one. Kept apart from Config, which is saved in
    every checkpoint and holds only what shapes a model and its training."""
    demo: bool = False  # write a synthetic dataset of drawn faces and train on it briefly
    evaluate: str = ""  # checkpoint (or run folder: its best_emotion_model.pth) to evaluate, no training
    resume: str = ""  # last.pth (or run folder) of an interrupted run
    split: str = ""  # split for --evaluate: train | val | test; empty = test if present, else val


# Named sets of overrides, applied before the command line; the runs behind each value: BENCHMARKS.md, issue 24.
# cpu: the best model a 30-minute budget buys on a 2-core CPU (--time_budget plans the epochs that fit): 96 px faces
# through a stride-2 stem, so the stages work at 48 px's cost; channels 32-256 (width 0.4: more epochs than 0.5, and
# better in float32); at most 100 epochs, so that the budget decides; lr 3e-3; no random erasing (no gain on so short
# a schedule); twenty test-time views (the face and its central 86 px enlarged, each moved 2 px each way and
# mirrored: above the ten without the zoom). demo: --demo's.
PRESETS = {
    "cpu": dict(image_size=96, stem_stride=2, width=0.4, blocks="2,2,2,2", epochs=100, time_budget=30.0, batch_size=64,
                lr=3e-3, warmup_epochs=1.0, aug_erase=0.0, val_faces=1024, tsne_samples=1000, attention_samples=512,
                tta_shift=2, tta_zoom=0.9),
    "demo": dict(image_size=48, width=0.25, blocks="1,1,1,1", epochs=12, batch_size=64, lr=3e-3,
                 warmup_epochs=1.0, tsne_samples=800, run_name="demo"),
}
# A preset's fields where it trains in float32 on a CPU (no native bf16, or --amp=false) and the command line gives
# none of them (preset_for_machine). cpu: one block a stage, whose step costs 0.56x: on a 2-core AVX2 CPU it fits
# twice the epochs in 30 minutes and reaches 2.3 points more; where bf16 is native two blocks fit 55-62 epochs and
# do better than one block does even at 100 (on a Zen 4, 35 epochs of two: 0.33 above 54 of one, one seed).
PRESETS_FLOAT32_CPU = {"cpu": dict(blocks="1,1,1,1")}


# ---------------------------------------------------------------------------------------------
# Configuration: --name=value overrides, presets, validation
# ---------------------------------------------------------------------------------------------

class UserError(Exception):
    """A problem the user can fix (arguments, data, checkpoint): printed as one message, no traceback."""


TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")  # what --flag=... takes


def parse_value(name, text, kind):
    if kind is bool:
        if text.lower() in TRUE_WORDS:
            return True
        if text.lower() in FALSE_WORDS:
            return False
        raise UserError(f"--{name} expects true or false, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise UserError(f"--{name} expects {kind.__name__}, got {text!r}") from None


def field_kinds(cls):
    """name -> the type that --name=value parses into (an optional field's, `bool | None`: bool)."""
    names = {"str": str, "int": int, "float": float, "bool": bool}
    return {f.name: f.type if isinstance(f.type, type) else names[str(f.type).split("|")[0].strip()]
            for f in dataclasses.fields(cls)}


def print_help(doc, sections):
    """doc, then each (dataclass, title)'s fields with their defaults and comments."""
    print(doc.strip())
    helps = dict(re.findall(r"^\s+(\w+): [\w |]+ = .*?#\s*(.*)$",  # the fields' trailing comments
                            "".join(inspect.getsource(cls) for cls, _ in sections), re.M))
    for cls, title in sections:
        print(f"\n{title}, as --name=value:")
        for f in dataclasses.fields(cls):
            default = "" if f.default is None else str(f.default)
            default = default.lower() if isinstance(f.default, bool) else default
            print(f"  {f'--{f.name}=' + default:<36} {helps.get(f.name, '')}")  # bools as the parser reads them


# Options that live in the sibling scripts now: the trainer names the script instead of "unknown field"
MOVED = {"predict": "python predict.py --checkpoint=RUN photo.jpg clip.mp4 camera:0",
         "explain": "python predict.py --checkpoint=RUN --explain photo.jpg",
         "export": "python export.py --checkpoint=RUN", "checkpoint": "python predict.py or export.py --checkpoint=RUN"}


def read_overrides(argv, classes, doc, positional=False):
    """({name: value} per dataclass in classes, the other words) from --name=value arguments (a bare --flag means
    true; --name= with nothing after it, None where that is the field's default); unknown names are refused with the
    closest known one. -h/--help prints doc and the fields, and exits."""
    kinds = [field_kinds(c) for c in classes]
    optional = {f.name for c in classes for f in dataclasses.fields(c) if f.default is None}  # --name= : None
    found, words, bare_flag = [{} for _ in classes], [], None
    for arg in argv:
        if arg in ("-h", "--help"):
            print_help(doc, [(c, c.__doc__.splitlines()[0]) for c in classes])
            sys.exit(0)
        if not arg.startswith("--"):
            if not positional:
                raise UserError(f"unexpected argument {arg!r}: use --name=value")
            if bare_flag and arg.lower() in TRUE_WORDS + FALSE_WORDS:  # `--detect_faces false`: a value, not an input
                raise UserError(f"{bare_flag} {arg}: a setting's value follows '=': {bare_flag}={arg}")
            words.append(arg)
            bare_flag = None
            continue
        name, eq, text = arg[2:].partition("=")
        owner = next((i for i, k in enumerate(kinds) if name in k), None)
        if owner is None:
            if name in MOVED and Config in classes:
                raise UserError(f"--{name} is not the trainer's: {MOVED[name]}")
            close = difflib.get_close_matches(name, [n for k in kinds for n in k], n=1)
            if name in field_kinds(Config) and Config not in classes and not close:
                raise UserError(f"--{name} is a training setting: the checkpoint's model is used as it was trained")
            raise UserError(f"unknown field --{name}" + (f"; did you mean --{close[0]}?" if close else ""))
        kind = kinds[owner][name]
        bare_flag = None if eq else f"--{name}"
        if not eq:
            if kind is not bool:
                raise UserError(f"--{name} needs a value: --{name}=...")
            text = "true"
        found[owner][name] = None if eq and not text and name in optional else parse_value(name, text, kind)
    return found, words


def parse_args(argv):
    """(Config, Action, Config overrides) from --name=value arguments. The Config is built over a preset (--preset,
    or --demo's) over the defaults."""
    (overrides, action_fields), _ = read_overrides(argv, (Config, Action), __doc__)
    action = Action(**action_fields)
    cfg = Config()
    preset = overrides.get("preset", "")
    if action.demo and not preset:
        preset = "demo"
    if preset:
        if preset not in PRESETS:
            raise UserError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        cfg = dataclasses.replace(cfg, **PRESETS[preset], preset=preset)
    return dataclasses.replace(cfg, **overrides), action, overrides


def validate_action(action):
    """At most one action, and --split only with --evaluate."""
    chosen = [f"--{n}" for n in ("demo", "evaluate", "resume") if getattr(action, n)]
    if len(chosen) > 1:
        raise UserError(f"{' and '.join(chosen)} are separate actions: give one per call")
    if action.split and not action.evaluate:
        raise UserError("--split only applies with --evaluate")
    if action.split not in ("", "train", "val", "test"):
        raise UserError(f"--split must be train, val or test, got {action.split!r}")


def parse_blocks(text):
    """--blocks: comma-separated integers >= 1."""
    try:
        blocks = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise UserError(f"--blocks expects comma-separated integers, got {text!r}") from None
    if not blocks or min(blocks) < 1:
        raise UserError(f"--blocks needs at least one integer, each >= 1, got {text!r}")
    return blocks


def validate_config(cfg):
    """Refuse impossible values before any work starts (the image size first: the test-time views' checks
    depend on it)."""
    min_size = max(32, 2 ** (len(parse_blocks(cfg.blocks)) + 1) * cfg.stem_stride)
    stem = f" and a stride-{cfg.stem_stride} stem (--stem_stride=1 for smaller faces)" if cfg.stem_stride > 1 else ""
    checks = [
        (cfg.stem_stride in (1, 2), f"--stem_stride must be 1 or 2, got {cfg.stem_stride}"),
        (cfg.image_size >= min_size, f"--image_size must be >= {min_size} for {cfg.blocks!r} stages{stem}, got "
                                     f"{cfg.image_size}"),
        (cfg.epochs > 0, f"--epochs must be > 0, got {cfg.epochs}"),
        (cfg.batch_size >= 1, f"--batch_size must be >= 1, got {cfg.batch_size}"),
        (cfg.eval_batch_size >= 1, f"--eval_batch_size must be >= 1, got {cfg.eval_batch_size}"),
        (0 <= cfg.tta_shift < cfg.image_size // 2, f"--tta_shift must be in [0, image_size / 2), got {cfg.tta_shift}"),
        (cfg.tta_zoom == 0 or 0.5 <= cfg.tta_zoom < 1 and zoom_margin(cfg.image_size, cfg.tta_zoom) >= 1,
         f"--tta_zoom must be 0 (off), or in [0.5, 1) and crop a pixel or more from each side, got {cfg.tta_zoom}"),
        (cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}"),
        (cfg.width > 0, f"--width must be > 0, got {cfg.width}"),
        (cfg.context_temperature > 0, f"--context_temperature must be > 0, got {cfg.context_temperature}"),
        (0 <= cfg.label_smoothing < 1, f"--label_smoothing must be in [0, 1), got {cfg.label_smoothing}"),
        (0 <= cfg.dropout < 1, f"--dropout must be in [0, 1), got {cfg.dropout}"),
        (0 < cfg.min_lr_ratio <= 1, f"--min_lr_ratio must be in (0, 1], got {cfg.min_lr_ratio}"),
        (0 < cfg.val_fraction < 1, f"--val_fraction must be in (0, 1), got {cfg.val_fraction}"),
        (0 <= cfg.crop_margin <= 1, f"--crop_margin must be in [0, 1], got {cfg.crop_margin}"),
        (cfg.attention_reduction >= 1, f"--attention_reduction must be >= 1, got {cfg.attention_reduction}"),
        (cfg.tsne_samples >= 0, f"--tsne_samples must be >= 0, got {cfg.tsne_samples}"),
        (cfg.val_faces >= 0, f"--val_faces must be >= 0, got {cfg.val_faces}"),
        (cfg.attention_samples >= 0, f"--attention_samples must be >= 0, got {cfg.attention_samples}"),
    ]
    for name in ("context_weight", "weight_decay", "warmup_epochs", "grad_clip", "time_budget",
                 "aug_scale", "aug_translate", "aug_rotate", "aug_brightness", "aug_contrast", "decode_threads"):
        checks.append((getattr(cfg, name) >= 0, f"--{name} must be >= 0, got {getattr(cfg, name)}"))
    for name in ("aug_flip", "aug_erase"):
        checks.append((0 <= getattr(cfg, name) <= 1, f"--{name} is a probability, got {getattr(cfg, name)}"))
    checks.append((cfg.aug_scale < 1, f"--aug_scale must be < 1, got {cfg.aug_scale}"))
    checks.append((0 <= cfg.seed < 2 ** 32, f"--seed must be in [0, 2**32), got {cfg.seed}"))  # numpy's and the data order's
    checks.append((cfg.dist_timeout > 0, f"--dist_timeout must be > 0 (minutes), got {cfg.dist_timeout}"))
    checks += [(math.isfinite(getattr(cfg, f.name)), f"--{f.name} must be a finite number, got {getattr(cfg, f.name)}")
               for f in dataclasses.fields(cfg) if f.type is float]  # inf and nan parse as floats
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    validate_device(cfg.device)


def validate_device(name):
    """--device: auto, cpu, or a CUDA device this machine has."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device={name} but CUDA is not available; use --device=cpu or auto")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise UserError(f"--device={name} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    why = gpu_unsupported(int(name[5:] or 0)) if name.startswith("cuda") else None
    if why:
        raise UserError(f"--device={name}: {why}; install a torch built for this GPU (pytorch.org lists which CUDA "
                        f"builds carry it) or use --device=cpu")


# ---------------------------------------------------------------------------------------------
# Utilities
# ---------------------------------------------------------------------------------------------

def append_text(path, text):
    """Append to an append-only run file (train.log, metrics.jsonl) in any locale, names escaped. A disk that fills
    during the run is one line: the checkpoints written so far stay."""
    try:
        with open(path, "a", encoding="utf-8", errors="backslashreplace") as f:
            f.write(text)
    except OSError as e:
        raise UserError(f"could not write {path}: {e.strerror or e}; free some space or choose another "
                        f"--output_dir") from None


def log(message, log_file=None):
    """Print, and append to the run's log file: the log of a run is its console output (rank 0's, under torchrun)."""
    if rank_and_world()[0] != 0:
        return
    try:
        tqdm.write(message)
    except UnicodeEncodeError:  # a console in a narrower encoding than a class name's letters
        tqdm.write(message.encode("ascii", "backslashreplace").decode())
    if log_file is not None:
        append_text(log_file, message + "\n")


def console_escapes():
    """The scripts' stdout and stderr write what their encoding cannot as escapes (\\xdc) instead of dying with
    UnicodeEncodeError on a file or class name: a Windows console redirected to a file writes cp1252, a server's
    locale may be narrower still. A stream the process started without (`cmd >&-`, Windows' pythonw) is a sink:
    Python leaves it None, and the first progress line died with AttributeError."""
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))
        with contextlib.suppress(AttributeError, ValueError):  # a stream of a notebook's or a test's own
            getattr(sys, name).reconfigure(errors="backslashreplace")


def seed_everything(seed, deterministic):
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


@functools.lru_cache(maxsize=None)
def gpu_unsupported(index=0):
    """Why this torch build cannot compute on CUDA device `index`, None where it can: the default wheels of recent
    torch carry no kernels for older GPUs (GTX 10xx and before), yet torch.cuda.is_available() is true there and the
    first kernel fails ("no kernel image is available"). A build runs its own sm_XY binaries on a GPU of the same
    major version and at least that minor, and compiles its compute_XY code for any GPU of XY or later; an sm_XYa or
    compute_XYa target (the architecture's own instructions) serves that architecture alone."""
    archs = torch.cuda.get_arch_list()
    if not archs or torch.version.hip:  # a build that does not say; ROCm's gfx targets are its own business
        return None
    major, minor = torch.cuda.get_device_capability(index)
    for arch in archs:
        kind, _, number = arch.partition("_")
        built, specific = int(re.match(r"\d*", number).group() or 0), not number.isdigit()
        if specific:
            runs = built == major * 10 + minor
        else:
            runs = (built // 10 == major and built % 10 <= minor) if kind == "sm" else built <= major * 10 + minor
        if runs and kind in ("sm", "compute"):
            return None
    return (f"{torch.cuda.get_device_name(index)} (compute capability {major}.{minor}) has no kernels in this torch "
            f"build ({' '.join(archs)})")


@functools.lru_cache(maxsize=None)
def auto_device():
    """--device=auto: CUDA where this torch build can compute on the first GPU (the one checked), else the CPU, said
    once where a GPU is there but the build cannot use it."""
    if not torch.cuda.is_available():
        return "cpu"
    why = gpu_unsupported(0)
    if why:
        print(f"note: {why}: computing on the CPU; a torch built for this GPU would use it", file=sys.stderr)
        return "cpu"
    return "cuda"


def resolve_device(name):
    device = torch.device(auto_device() if name == "auto" else name)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:  # torchrun: a GPU per process
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


@contextlib.contextmanager
def out_of_memory_named(device, sizes, advice=""):
    """Memory that runs out inside (a GPU's, or an allocation the system refused: DefaultCPUAllocator, numpy's
    MemoryError) as one UserError naming the sizes to lower, and advice; any other error is left as it is."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        if not (isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "DefaultCPUAllocator" in str(e)):
            raise
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"out of memory on {device} ({first}) at {sizes}: start again with "
                        f"{'smaller ones' if ',' in sizes else 'a smaller one'}{advice}") from None


def rank_and_world():
    """(rank, world size) of this process: (0, 1) outside torchrun."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def cpuinfo(*keys):
    """The value on /proc/cpuinfo's first line that starts with one of keys; "" without one (or the file)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(keys):
                return line.split(":", 1)[1].strip()
    return ""


def cpu_model():
    """The CPU's model name, as /proc/cpuinfo gives it (elsewhere, what the platform module knows)."""
    return cpuinfo("model name") or platform.processor()


def user_path(path):
    """path with a leading ~ or ~user expanded, as a shell would have (it leaves --name=~/... as typed); left as typed
    where ~name names no user (a file called ~draft.jpg). UserError where ~ names no home folder (no $HOME and no passwd
    entry: some containers). pathlib's expanduser raises RuntimeError for both."""
    path = Path(path)
    try:
        return path.expanduser()
    except RuntimeError:
        if path.parts[0] == "~":
            raise UserError(f"{path}: ~ names no home folder here (no $HOME, no passwd entry); give the folder "
                            f"itself") from None
        return path


def user_cache_dir():
    """Where verdicts about this machine are kept across runs and datasets: $XDG_CACHE_HOME/ern or ~/.cache/ern;
    without a home directory (no $HOME and no passwd entry: some containers) the user's own in the temporary folder."""
    try:
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ern"
    except (RuntimeError, KeyError):
        return Path(tempfile.gettempdir()) / f"ern-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def cpu_flags():
    """The CPU's feature flags (avx2, avx512f, avx512_bf16, ...), as /proc/cpuinfo lists them."""
    return cpuinfo("flags", "Features").split()


def cpu_quota(root=Path("/sys/fs/cgroup"), membership=Path("/proc/self/cgroup")):
    """The cores a CPU quota allows this process (docker --cpus, a Kubernetes limit, a systemd CPUQuota), to the
    nearest whole core, at least 1; None where there is none. A quota is CPU time, not cores: every host core stays
    visible, so OpenMP would start a thread per host core and the kernel would throttle them all in turn (a 1-core
    quota on 2 cores: 1 thread trains 1.27-1.48x as fast as 2; 1.25 cores: 1 thread, 1.09-1.16x; 1.5 cores: 2
    threads, 1.07-1.19x; benchmarks/cpu_quota.py). The smallest of cgroup v2's cpu.max and v1's cfs quota over this
    process's group and the groups above it."""
    cores = []
    with contextlib.suppress(OSError, ValueError):
        for line in membership.read_text().splitlines():
            _, controllers, own = line.split(":", 2)
            if controllers and "cpu" not in controllers.split(","):
                continue
            for mount in {root / "cpu", root / controllers} if controllers else {root}:
                group = mount / own.strip("/")  # a container's own namespace: "/", the group mounted at the root
                for folder in (group, *group.parents[:len(group.relative_to(mount).parts)]):
                    with contextlib.suppress(OSError, ValueError):
                        if controllers:  # v1
                            quota = int((folder / "cpu.cfs_quota_us").read_text())
                            period = int((folder / "cpu.cfs_period_us").read_text())
                        else:
                            limit, period = (folder / "cpu.max").read_text().split()
                            quota, period = -1 if limit == "max" else int(limit), int(period)
                        if quota > 0:
                            cores.append(quota / period)
    return max(1, int(min(cores) + 0.5)) if cores else None


def cpu_threads():
    """Threads for this process's work: one per core it may run on (its affinity mask), capped by a CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, cpu_quota() or cores)


def fit_threads_to_cpu():
    """torch's threads capped at cpu_threads(): under a quota torch starts one per core it sees, and each step waits
    on throttled ones; OMP_NUM_THREADS, where set, is the user's choice and kept."""
    threads = cpu_threads()
    if "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > threads:
        torch.set_num_threads(threads)


# oneDNN's instruction-set levels below AVX512_CORE_BF16, where bf16 is emulated: ONEDNN_MAX_CPU_ISA=NAME caps its
# kernels at one of them (a wider CPU then runs the narrower kernels)
BF16_EMULATED_ISAS = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def cpu_has_bf16():
    """AVX512-BF16 or AMX, and oneDNN not capped below them (ONEDNN_MAX_CPU_ISA): the CPU multiplies bf16 itself;
    elsewhere oneDNN emulates it, slowly. The probes are private torch functions: a torch without them gets float32."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    if cap in BF16_EMULATED_ISAS:
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def autocast_dtype(cfg, device):
    """CUDA: bf16 on Ampere and newer, fp16 (with a GradScaler) before, where bf16 is only emulated.
    CPU: bf16 where native (with channels_last: the CPU preset, two blocks a stage, fits 55-62 epochs in 30 minutes on
    a Zen 5 EPYC, against 41 in float32 on its AVX-512 kernels and 29-32 on its AVX2 ones: BENCHMARKS.md)."""
    if not cfg.amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else None


def arithmetic(cfg, device):
    """What the run computes in, as resolved on this machine (amp=true means bf16 on one CPU, float32 on another)."""
    dtype = autocast_dtype(cfg, device)
    return {"autocast": None if dtype is None else str(dtype).removeprefix("torch."),
            "channels_last": cfg.channels_last}


def preset_for_machine(cfg, overrides):
    """cfg as it trains on this machine: its preset's PRESETS_FLOAT32_CPU fields in float32 on a CPU."""
    fields = PRESETS_FLOAT32_CPU.get(cfg.preset, {})
    if not fields or any(k in overrides for k in fields):
        return cfg
    device = resolve_device(cfg.device)
    if device.type != "cpu" or autocast_dtype(cfg, device) is not None:
        return cfg
    if int(os.environ.get("RANK", "0")) == 0:  # on one machine every torchrun rank resolves it alike; one says so
        print(f"--preset={cfg.preset} in float32 on this CPU: " + " ".join(f"--{k}={v}" for k, v in fields.items()))
    return dataclasses.replace(cfg, **fields)


WINDOWS_FILE_IN_USE = (5, 32)  # the winerror of a file another program has open: access denied, sharing violation


def replace_file(src, dst):
    """os.replace(src, dst), tried again for a few seconds while Windows refuses it because another program holds one
    of them for a moment (a virus scanner, an indexer, a reader). Returns nothing; raises the last refusal."""
    for wait in (0.1, 0.3, 1.0, 2.0, None):
        try:
            return os.replace(src, dst)
        except PermissionError as e:
            if getattr(e, "winerror", None) not in WINDOWS_FILE_IN_USE or wait is None:
                raise
            time.sleep(wait)


def atomic_write(path, write):
    """write(temporary path) beside path, then rename: a crash mid-write never breaks a good file. A write the
    system refuses (a full disk, a read-only folder) is one UserError naming the file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: runs may share a cache folder
    renaming = False  # Windows' access denied while writing is a read-only folder; while renaming, a file held open
    try:
        write(tmp)
        renaming = True
        replace_file(tmp, path)
    except BaseException as e:  # Ctrl-C or a full disk mid-write: leave no half-written file beside the good one
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        # torch.save reports a failed write as RuntimeError("[enforce fail at inline_container.cc...] ... write failed")
        if isinstance(e, OSError) or (isinstance(e, RuntimeError) and "inline_container" in str(e)):
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:200]
            held = renaming and getattr(e, "winerror", None) in WINDOWS_FILE_IN_USE
            advice = "close the program that holds it open" if held else "free some space or choose a writable folder"
            raise UserError(f"could not write {path}: {reason}; {advice} (nothing half-written is left)") from None
        raise


def abandoned(tmp, idle=3600):
    """atomic_write's NAME.PID.tmp whose writer was killed outright (SIGKILL, the out-of-memory killer: no cleanup
    ran; a decode cache's is gigabytes): unchanged for `idle` seconds and, where the system can say, its process not
    running here (a build on another machine sharing the folder keeps its file changing)."""
    try:
        pid, age = int(tmp.name.split(".")[-2]), time.time() - tmp.stat().st_mtime
    except (ValueError, IndexError, OSError):
        return False
    if age < idle:
        return False
    if os.name != "posix":  # Windows' os.kill(pid, 0) would send Ctrl-C: the age alone
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: another user's, running
        pass
    return False


def atomic_save(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_json(obj, path):
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2)))


def write_csv(path, header, rows):
    """A CSV of header and rows, UTF-8 (file names that are not: as the file system gave them), written whole."""
    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            out = csv.writer(f)
            out.writerow(header)
            out.writerows(rows)

    atomic_write(path, write)


def write_image(path, bgr):
    """cv2.imwrite for any file name: encoded by OpenCV, written by Python (OpenCV's own writer fails on a non-ASCII
    name on Windows and crashes, SIGSEGV, on one that is not UTF-8). OSError, with the reason, where it cannot."""
    try:
        ok, data = cv2.imencode(Path(path).suffix, bgr)
    except cv2.error:
        ok = False
    if not ok:
        raise OSError(f"this OpenCV cannot encode {Path(path).suffix} images")
    Path(path).write_bytes(data.tobytes())


class Terminated(KeyboardInterrupt):
    """SIGTERM, routed to Ctrl-C (stop_on_ctrl_c_and_sigterm): it stops the script as Ctrl-C does, and is told apart
    where Ctrl-C means less (predict.py: a camera's Ctrl-C ends that camera, and the next input starts)."""


def raise_terminated(*_):
    raise Terminated


def stop_exception(signals):
    """Terminated if a SIGTERM is among the signals received, else KeyboardInterrupt."""
    return Terminated() if signal.SIGTERM in signals else KeyboardInterrupt()


def stop_on_ctrl_c_and_sigterm():
    """A script's SIGINT and SIGTERM (SLURM's scancel and preemption, docker stop, kill) both stop it as Ctrl-C does:
    what is being recorded is finished, and a run prints its resume command. SIGINT too where the launching shell
    ignored it (`cmd &`)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, raise_terminated)


@contextlib.contextmanager
def ctrl_c_deferred():
    """Ctrl-C inside the block takes effect when the block ends, so that what the block records (an epoch's
    checkpoint and metrics, a video frame's rows and counts) is recorded whole; an error inside the block goes
    first, and a second Ctrl-C acts at once (a block stuck on a stalled disk can still be left). A SIGTERM that the
    scripts route to Ctrl-C (stop_on_ctrl_c_and_sigterm) is deferred alike. Only the main thread may set signal
    handlers; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = []

    def deferred(signum, _):
        pressed.append(signum)
        if len(pressed) > 1:
            raise stop_exception(pressed)

    routed = [signal.SIGTERM] if signal.getsignal(signal.SIGTERM) is raise_terminated else []
    previous = {s: signal.signal(s, deferred) for s in [signal.SIGINT, *routed]}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: a handler set in C
    if pressed:
        raise stop_exception(pressed)


PREFETCH_PIXELS = 2 ** 27  # images decoded ahead of their use: at most this many pixels, 400 MB of RGB


def ordered_prefetch(fn, items, pool, depth, pixels=None):
    """fn(item) for each item, computed up to `depth` items ahead in the pool, yielded in order. pixels(result):
    an image's size, which holds the lead to what PREFETCH_PIXELS fits of the largest so far (one ahead until one
    is known: on 32 cores, 65 decoded 48-megapixel photos were 9.5 GB)."""
    pending, ahead, largest = deque(), depth if pixels is None else 1, 1
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) > ahead:
            result = pending.popleft().result()
            if pixels is not None:
                largest = max(largest, pixels(result))
                ahead = max(1, min(depth, PREFETCH_PIXELS // largest))
            yield result
    for future in pending:
        yield future.result()


def list_file_lines(path):
    """The entries of a list file (a split's image list, predict.py's @list.txt): (line number, text) of each line
    that is not blank or a # comment, without the quotes that Explorer's "Copy as path" puts around it; UTF-8, or
    UTF-16 with its byte-order mark (Windows PowerShell's >) or without (some editors, cmd /u). Raises OSError or
    UnicodeDecodeError."""
    data = Path(path).read_bytes()
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        encoding = "utf-16"
    elif b"\x00" in data:  # no path holds a NUL: UTF-16 without its mark; ASCII's zero bytes come first in big-endian
        encoding = "utf-16-be" if data[0::2].count(0) > data[1::2].count(0) else "utf-16-le"
    else:
        encoding = "utf-8-sig"
    text = data.decode(encoding)
    entries = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if len(line) > 1 and line[0] == line[-1] and line[0] in "\"'":
            line = line[1:-1]
        if line and not line.startswith("#"):
            entries.append((n, line))
    return entries


# ---------------------------------------------------------------------------------------------
# Data: data.yaml -> split folders or image lists -> labelled samples (parsing and checks) -> decoded uint8 cache
# ---------------------------------------------------------------------------------------------

CACHE_VERSION = 2  # raised when the same files and settings decode differently: older caches are rebuilt
MIN_BOX_PIXELS = 4  # a label box narrower or lower than this in its image is a problem, not a face
IMAGE_EXTS = {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff"}  # .jfif: a JPEG as browsers save it
SYSTEM_FILES = {"thumbs.db", "desktop.ini"}  # what Windows leaves in a folder of images: skipped, as dot-files are


@dataclass
class Split:
    """One split's samples (one per labelled box) and, once decoded, its pixels."""
    name: str
    paths: list  # image file of each sample
    labels: np.ndarray  # (N,) int64 class ids
    boxes: np.ndarray  # (N, 4) float32 cx, cy, w, h, normalized
    images: np.ndarray = None  # (N, 3, S, S) uint8 RGB, memory-mapped from the cache
    hashes: list = None  # hash of each sample's decoded source image
    formats: list = None  # decoded format of each sample's source image (jpeg, png, ...)
    sizes: list = None  # (height, width) of each sample's source image
    decode_seconds: float = 0.0  # spent decoding into the cache in this process (0: read from the cache)

    def __len__(self):
        return len(self.labels)

    def subset(self, keep):
        keep = np.asarray(keep, dtype=bool)
        kept = lambda xs: None if xs is None else [x for x, k in zip(xs, keep) if k]
        return Split(self.name, kept(self.paths), self.labels[keep], self.boxes[keep],
                     None if self.images is None else self.images[keep],
                     kept(self.hashes), kept(self.formats), kept(self.sizes))


def read_data_yaml(data_dir, problems=None):
    """Class names (in data.yaml's order), {split: its images (split_sources)}, notes, and the keypoint values that
    follow each box in a pose export's label rows (yaml_keypoint_values), as Ultralytics reads them.

    An nc that disagrees with names, or a class list file (LabelImg's classes.txt, Darknet's obj.names) that puts a
    class of names at another place (compared in any case), is raised, or appended to `problems` if a list is given
    (so that it is reported together with the label and image problems).
    """
    data_dir = user_path(data_dir)
    yaml_path = data_dir if data_dir.suffix.lower() in (".yaml", ".yml") else data_dir / "data.yaml"
    if not yaml_path.is_file():
        others = sorted(p.name for p in data_dir.glob("*.y*ml")) if data_dir.is_dir() else []
        archive = data_dir.is_file() and data_dir.name.lower().endswith((".zip", ".tar", ".tgz", ".gz", ".bz2", ".xz",
                                                                          ".7z", ".rar"))
        hint = (f"{data_dir} is an archive: unpack it, and pass the folder holding data.yaml" if archive else
                f"{data_dir} is a file, not a folder: pass the folder holding data.yaml, or data.yaml itself"
                if data_dir.is_file() else
                f"the folder holds {', '.join(others)}: pass that file as --data_dir" if others else
                "pass --data_dir=FOLDER_WITH_DATA_YAML, or run --demo")
        raise UserError(f"no data.yaml at {yaml_path}: {hint}")
    try:
        doc = yaml.safe_load(yaml_path.read_bytes())  # bytes: UTF-8 (or a BOM's UTF-16) whatever the locale
    except OSError as e:
        raise UserError(f"{yaml_path}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        hint = " (save it as UTF-8)" if isinstance(e, yaml.reader.ReaderError) else ""
        raise UserError(f"{yaml_path}: not valid YAML{hint}: {e}") from None
    if not isinstance(doc, dict) or "names" not in doc:
        raise UserError(f"{yaml_path}: expected a mapping with 'names' (and 'nc', 'train', 'val')")
    names = yaml_class_names(doc, yaml_path, problems)
    folders, notes = split_sources(doc, yaml_path)
    for listing in class_list_files(yaml_path.parent, folders):
        try:
            listed = [line for _, line in list_file_lines(listing)]
        except (OSError, UnicodeDecodeError) as e:
            notes.append(f"{listing} cannot be read ({getattr(e, 'strerror', None) or e}); data.yaml's names are used")
            continue
        at = {n.casefold(): i for i, n in enumerate(listed)}  # the label files count in the list's order
        moved = [n for i, n in enumerate(names) if at.get(n.casefold(), i) != i]
        if moved:
            problem = (f"{listing} lists the classes as {listed}, data.yaml as {names}: the labels were written in "
                       f"the list's order, so the faces of {', '.join(moved)} would be named as another class. Give "
                       f"data.yaml's names the list's order (or delete the list, if it is stale)")
            if problems is None:
                raise UserError(problem)
            problems.append(problem)
        elif [n.casefold() for n in listed] != [n.casefold() for n in names]:
            notes.append(f"{listing} lists other classes than data.yaml ({listed}); data.yaml's are used")
    return names, folders, notes, yaml_keypoint_values(doc, yaml_path)


def yaml_class_names(doc, yaml_path, problems):
    """data.yaml's names as a list of strings, checked against its nc (see read_data_yaml)."""
    names = doc["names"]
    if isinstance(names, dict):  # Ultralytics also writes {0: name, 1: name, ...}; JSON-made yamls {"0": name}
        ids = {str(k).strip(): v for k, v in names.items()}
        if sorted(ids) != sorted(map(str, range(len(names)))):
            raise UserError(f"{yaml_path}: names keys must be 0..{len(names) - 1}, got {list(names)}")
        names = [ids[str(i)] for i in range(len(names))]
    if not isinstance(names, list) or not names:
        raise UserError(f"{yaml_path}: 'names' must be a non-empty list of class names")
    if len(names) < 2:  # every face would be that class: accuracy 100 %, a model that learned nothing
        raise UserError(f"{yaml_path}: names lists one class ({names[0]!r}); a classifier needs two or more")
    misread = [n for n in names if n is None or isinstance(n, bool)]  # YAML 1.1's unquoted yes, no, on, off, null
    if misread:
        raise UserError(f"{yaml_path}: names holds {misread}: YAML reads unquoted Yes, No, On, Off and null as these; "
                        f"quote the class names")
    names = [str(n) for n in names]
    nc = doc.get("nc")
    if isinstance(nc, str) and nc.strip().isdigit():  # nc: "8", quoted
        nc = int(nc)
    if isinstance(nc, float) and nc.is_integer():  # nc: 8.0
        nc = int(nc)
    if "nc" in doc and nc != len(names):
        problem = (f"{yaml_path}: nc is {doc['nc']!r}, not a whole number" if not isinstance(nc, int) else
                   f"{yaml_path}: nc is {nc} but names lists {len(names)} classes: {names}")
        if problems is None:
            raise UserError(problem)
        problems.append(problem)
    if len(set(names)) != len(names):
        raise UserError(f"{yaml_path}: duplicate class names: {names}")
    return names


def yaml_keypoint_values(doc, yaml_path):
    """How many values follow the box in each label row: kpt_shape [K, 2 or 3] (an Ultralytics pose export, e.g. five
    face landmarks with their visibility) gives K*D, read past; 0 without it."""
    shape = doc.get("kpt_shape")
    if shape is None:
        return 0
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(v) is int for v in shape) and shape[0] > 0
            and shape[1] in (2, 3)):
        raise UserError(f"{yaml_path}: kpt_shape must be two whole numbers [keypoints, 2 or 3] (x y, or x y "
                        f"visibility), got {shape!r}")
    return shape[0] * shape[1]


def yaml_paths(doc, key, yaml_path):
    """The paths data.yaml gives under key, as strings: none, one, or a list (a number is a folder's name)."""
    value = doc.get(key)
    if value is None or value is False or value == "":
        return []
    values = value if isinstance(value, list) else [value]
    if not values or any(isinstance(v, (dict, list, bool)) or v is None or v == "" for v in values):
        raise UserError(f"{yaml_path}: '{key}' must be a folder, an image list file or a list of these; got {value!r}")
    return [str(v) for v in values]


def split_sources(doc, yaml_path):
    """{split: images folder, image list file (Ultralytics' train.txt), or a list of these} and notes.

    Paths are relative to `path` if given (the yaml's folder where it does not exist: an export made on another
    machine), else to the yaml's folder. A split folder holding images/ and labels/ means its images/. If a path the
    yaml names does not exist (an export moved from its machine), the standard folder beside the yaml (train/,
    valid/ or val/, test/) is used, with a note; a split the yaml does not name is not read, whatever folders lie
    beside it (a note says so).
    """
    base = Path(os.path.abspath(yaml_path.parent))
    root, notes, absent = base, [], ""
    paths = yaml_paths(doc, "path", yaml_path)
    if len(paths) > 1:
        raise UserError(f"{yaml_path}: 'path' must be one folder, got {doc['path']!r}")
    if "val" in doc and "validation" in doc:
        notes.append("data.yaml gives both val and validation: val is read")
    for path in paths:
        root = base / user_path(path)  # ~ as --data_dir's
        if not root.is_dir():
            notes.append(f"data.yaml's path {path!r} does not exist here; its splits are read from {base}")
            absent = f"; its path {path!r} does not exist ({os.path.abspath(root)}: a relative path is taken from " \
                     f"the yaml's folder)"
            root = base
    folders = {}
    for split, standard in (("train", ["train"]), ("val", ["valid", "val"]), ("test", ["test"])):
        key = "validation" if split == "val" and "val" not in doc and "validation" in doc else split  # Ultralytics
        entries = yaml_paths(doc, key, yaml_path)  # reads either key
        raw = doc.get(key) if isinstance(doc.get(key), list) else [doc.get(key)]
        number = " (YAML read the name as a number: quote it)" if entries and not all(isinstance(v, str) for v in raw) \
            else ""
        # not resolved: labels lie beside a link
        given = [Path(os.path.abspath(root / user_path(e))) for e in entries]
        given = [g / "images" if (g / "images").is_dir() and (g / "labels").is_dir() else g for g in given]
        fallback = next((base / s / "images" for s in standard if (base / s / "images").is_dir()), None)
        if given and all(g.exists() for g in given):
            for g, entry in zip(given, entries):  # Roboflow's ../train/images, from an export unpacked in another
                if (root == base and not user_path(entry).is_absolute() and g.is_dir() and fallback is not None
                        and base not in g.parents and not os.path.samefile(g, fallback)):
                    raise UserError(f"{yaml_path}: '{key}: {entry}' is {g}, outside the yaml's folder, and {fallback} "
                                    f"lies beside the yaml too (an export unpacked inside another): point '{key}' at "
                                    f"the folder you mean")
            folders[split] = given[0] if len(given) == 1 else given
            continue
        if len(given) > 1:
            raise UserError(f"{yaml_path}: '{key}' lists {', '.join(str(g) for g in given if not g.exists())}, "
                            f"which does not exist{number}")
        if not entries and split != "train":  # never read a split the yaml leaves out (a test split kept aside)
            if fallback is not None:
                notes.append(f"data.yaml names no {split} split: {fallback} is not read")
            continue
        if fallback is not None:
            folders[split] = fallback
            if entries:
                notes.append(f"data.yaml's {key} path {entries[0]!r} does not exist{number}; using {fallback}")
        elif entries and split != "test":
            notes.append(f"data.yaml's {key} path {entries[0]!r} does not exist{number} and there is no "
                         f"{standard[0]}/images")
        if split == "train" and split not in folders:
            tried = f" ({', '.join(str(g) for g in given)}{number})" if given else ""
            raise UserError(f"{yaml_path}: no training images: neither the yaml's train path{tried} nor "
                            f"{base}/train/images exists{absent}")
    return folders, notes


CLASS_LISTS = ("classes.txt", "obj.names", "_darknet.labels")  # LabelImg's and Label Studio's, Darknet's, Roboflow's


def is_label_file(path):
    """A YOLO label file by its name: a .txt, but not a class list (LabelImg's classes.txt labels no face)."""
    return path.suffix.lower() == ".txt" and path.name not in CLASS_LISTS


def class_list_files(yaml_folder, folders):
    """The class lists that labelling tools leave beside the labels (LabelImg's classes.txt, Roboflow's Darknet export's
    _darknet.labels) or the export (Label Studio's classes.txt, Darknet's obj.names)."""
    places = [Path(yaml_folder)] + [labels_folder(f) for f in flat_sources(folders) if f.is_dir()]
    found = [p / name for p in dict.fromkeys(places) for name in CLASS_LISTS]
    return [p for p in found if p.is_file()]


def flat_sources(folders):
    """Every folder or list file of split_sources' {split: source or [sources]}."""
    return [s for source in folders.values() for s in (source if isinstance(source, list) else [source])]


def source_text(source):
    """A split's folder or list file, or its list of these, for a message."""
    return ", ".join(map(str, source)) if isinstance(source, list) else str(source)


def labels_folder(images_dir):
    """Ultralytics convention: the last 'images' component of the path becomes 'labels' (but below a folder that
    happens to be named images, /data/images/fer/train, label files beside the images where /data/labels/fer/train
    does not exist: Darknet's layout, which Ultralytics does not find there). A path without one: a labels folder
    beside it, else the images' own folder (Darknet's layout, which Ultralytics reads too)."""
    parts = list(images_dir.parts)
    if "images" in parts:
        i = len(parts) - 1 - parts[::-1].index("images")
        labels = Path(*parts[:i], "labels", *parts[i + 1:])
        beside = (p for p in images_dir.glob("*.txt") if is_label_file(p))
        if i == len(parts) - 1 or labels.is_dir() or next(beside, None) is None:
            return labels
    return images_dir.parent / "labels" if (images_dir.parent / "labels").is_dir() else images_dir


def parse_label_file(path, num_classes, keypoint_values=0, tally=None, face_rows=False):
    """Boxes of one YOLO label file: ([(class, cx, cy, w, h)], [problems with line numbers], [notes]).

    As Ultralytics reads them: a polygon row (class x1 y1 x2 y2 ...: a segmentation export) gives the box around its
    points, and a pose export's row (keypoint_values after the box: yaml_keypoint_values) its box; values within 1 %
    outside [0, 1] (converters' rounding) are clamped; a repeated box and class is dropped with a note (one face,
    counted once). An empty file (YOLO's image without objects) gives no box, problem or note. The same box again
    with another class is a problem. Without keypoint_values, tally (a Counter) counts the 15-field rows ("15
    fields") and those of them that read as YOLOv5-face's ("face landmarks": reads_as_face_landmarks); face_rows:
    read them as its box and landmarks, not as 7-point polygons."""
    boxes, problems, notes, rows = [], [], [], {}
    try:
        text = path.read_text(encoding="utf-8-sig", errors="replace")  # -sig: the byte-order mark Windows editors add
    except OSError as e:
        return boxes, [f"{path}: cannot read the label file ({e.strerror or e})"], notes
    if not text.strip():  # how YOLO marks an image without objects: nothing to train on, and no mistake
        return boxes, problems, notes
    if "\x00" in text:  # PowerShell's > writes UTF-16
        return boxes, [f"{path}: not UTF-8 text (UTF-16?): save it as UTF-8"], notes
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where, shown = f"{path}:{n}", repr(line.strip()[:80] + ("..." if len(line.strip()) > 80 else ""))
        if keypoint_values and len(fields) != 5 + keypoint_values:
            problems.append(f"{where}: expected {5 + keypoint_values} fields 'class cx cy w h' and the "
                            f"{keypoint_values} keypoint values of data.yaml's kpt_shape, got {len(fields)}: {shown}")
            continue
        if not keypoint_values and len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
            problems.append(f"{where}: expected 5 fields 'class cx cy w h' (or a polygon 'class x1 y1 x2 y2 x3 y3 "
                            f"...'; a pose export's data.yaml gives kpt_shape), got {len(fields)}: {shown}")
            continue
        try:
            values = [float(v) for v in fields]
        except ValueError:
            problems.append(f"{where}: non-numeric field in {shown}")
            continue
        if tally is not None and not keypoint_values and len(values) == 15:
            tally["15 fields"] += 1
            tally["face landmarks"] += reads_as_face_landmarks(values)
        if keypoint_values or (face_rows and len(values) == 15):
            values = values[:5]  # the landmarks are not read
        cls = values[0]
        if not 0 <= cls < num_classes:  # NaN fails here too
            problems.append(f"{where}: class id {fields[0]} outside 0..{num_classes - 1}")
            continue
        if cls != int(cls):
            problems.append(f"{where}: class id {fields[0]} is not an integer")
            continue
        if not all(-0.01 <= v <= 1.01 for v in values[1:]):  # NaN fails here too
            problems.append(f"{where}: coordinates outside [0, 1] (normalized to the image's width and height "
                            f"expected): {shown}")
            continue
        values = [min(max(v, 0.0), 1.0) for v in values[1:]]
        if len(values) > 4:  # a polygon: the box around its points
            xs, ys = values[0::2], values[1::2]
            values = [(min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)]
        cx, cy, w, h = values
        if w <= 0 or h <= 0:
            problems.append(f"{where}: box {cx} {cy} {w} {h} has no width or height")
            continue
        first = rows.setdefault((cx, cy, w, h), (n, int(cls)))
        if first[0] != n and first[1] == int(cls):
            notes.append(f"{where}: the box and class of line {first[0]} again, dropped (one face counted once)")
        elif first[0] != n:
            problems.append(f"{where}: the box of line {first[0]} again, with class {int(cls)} (line {first[0]}: "
                            f"{first[1]})")
        else:
            boxes.append((int(cls), cx, cy, w, h))
    return boxes, problems, notes


LANDMARK_SLACK = 0.1  # a face landmark may lie this fraction of its box's width or height outside it (annotators')


def reads_as_face_landmarks(values):
    """Whether a label row's 15 values read as YOLOv5-face's (class, box, then eyes, nose tip and mouth corners, all -1
    where not marked): the points in the box (LANDMARK_SLACK), the nose below the eyes and above the mouth, the eyes
    and the mouth corners in one order from left to right. A 7-point polygon's outline does not: its points go
    around."""
    cx, cy, w, h, *points = values[1:]
    if all(v == -1 for v in points):
        return True
    xs, ys = points[0::2], points[1::2]
    reach = 0.5 + LANDMARK_SLACK
    inside = all(abs(x - cx) <= reach * w and abs(y - cy) <= reach * h for x, y in zip(xs, ys))
    return (inside and (ys[0] + ys[1]) / 2 < ys[2] < (ys[3] + ys[4]) / 2
            and (xs[1] - xs[0]) * (xs[4] - xs[3]) > 0)


def folder_files(folder, passed_over=None):
    """The files under folder that a dataset or a prediction reads: none hidden (a dot-name, or in a dot-folder such
    as .ipynb_checkpoints) and none of what Windows leaves beside images (SYSTEM_FILES). A linked folder is read
    where it leads outside folder (an album on another disk), each real folder once (a link loop ends); one that
    leads inside is not (its files keep their own names). A subfolder this user may not list, a link that leads
    nowhere (a dataset fetched in part: git-annex, DVC) and what is no regular file (a pipe, a socket, a device) are
    added to the list passed_over as (path, why); folder itself raises OSError."""
    top = os.path.realpath(folder)

    def followed(root, name):
        path = os.path.join(root, name)
        if name.startswith("."):
            return False
        try:
            return not os.path.islink(path) or os.path.commonpath([top, os.path.realpath(path)]) != top
        except ValueError:  # Windows: a link to another drive, which is outside
            return True

    def unlisted(error):
        if os.path.realpath(error.filename) == top:
            raise error
        if passed_over is not None:
            passed_over.append((Path(error.filename), f"cannot list this folder ({error.strerror or error}), so its "
                                                      f"files are left out"))

    found, seen = [], set()
    for root, dirs, files in os.walk(folder, onerror=unlisted, followlinks=True):
        real = os.path.realpath(root)
        dirs[:] = [] if real in seen else sorted(d for d in dirs if followed(root, d))  # the same order each time
        if real not in seen:
            seen.add(real)
            found += [Path(root) / f for f in files if not f.startswith(".") and f.lower() not in SYSTEM_FILES]
    files = []
    for f in sorted(found):  # one stat a file: a dataset's tens of thousands, on a network disk
        if f.is_file():
            files.append(f)
        elif passed_over is not None:
            passed_over.append((f, f"a link to {os.readlink(f)}, which does not exist, so it is left out"
                                if f.is_symlink() and not f.exists() else
                                "not a regular file (a pipe, a socket or a device), so it is left out"))
    return files


def scan_split(name, source, num_classes, keypoint_values=0, tally=None):
    """Pair the images of a split (split_sources' folder, image list file, or a list of these) with their label files
    and parse them: (Split of the valid boxes, problems, notes, the images whose label file is empty). Without
    kpt_shape (keypoint_values 0), the 15-field rows are read as YOLOv5-face's where most of the split's read so (as
    7-point polygons, Ultralytics' reading, every such box would be wrong); tally (a Counter) gets parse_label_file's
    counts."""
    pairs, problems = {}, []
    for part in source if isinstance(source, list) else [source]:
        found, bad = listed_pairs(part) if part.is_file() else folder_pairs(name, part)
        for image, pair in found.items():  # an image listed twice is read once
            pairs.setdefault(image, pair)
        problems += bad
    tally = collections.Counter() if tally is None else tally
    split, bad, notes, no_face = read_label_files(name, pairs, num_classes, keypoint_values, tally)
    if face_rows_read(tally):
        split, bad, notes, no_face = read_label_files(name, pairs, num_classes, keypoint_values, face_rows=True)
    return split, problems + bad, notes, no_face


def face_rows_read(tally):
    """Whether scan_split read a split's 15-field rows as YOLOv5-face's: most of them read so (its tally)."""
    return tally["face landmarks"] > tally["15 fields"] / 2


def read_label_files(name, pairs, num_classes, keypoint_values, tally=None, face_rows=False):
    """scan_split's pairs parsed (parse_label_file): (Split, problems, notes, the images whose label file is empty)."""
    paths, labels, boxes, problems, notes, no_face = [], [], [], [], [], []
    for image, (label, expected) in pairs.items():
        if label is None:
            problems.append(f"{image}: no label file (expected {expected})")
            continue
        found, bad, repeated = parse_label_file(label, num_classes, keypoint_values, tally, face_rows)
        problems += bad
        notes += repeated
        if not found and not bad:  # nothing but blank lines
            no_face.append(str(image))
        for cls, *box in found:
            paths.append(str(image))
            labels.append(cls)
            boxes.append(box)
    split = Split(name, paths, np.array(labels, dtype=np.int64), np.array(boxes, dtype=np.float32).reshape(-1, 4))
    return split, problems, notes, no_face


def folder_pairs(name, images_dir):
    """{image: (its label file or None, the label file expected)} of an images folder, and the problems: files that
    are no images, label files without an image, what folder_files passed over."""
    labels_dir = labels_folder(images_dir)
    beside = labels_dir == images_dir  # Darknet's layout: a.jpg and a.txt in one folder, listed once
    passed_over, labelled = [], labels_dir.is_dir()
    try:
        image_files = folder_files(images_dir, passed_over)
        label_files = image_files if beside else folder_files(labels_dir, passed_over) if labelled else []
    except OSError as e:
        raise UserError(f"{name} split: cannot list {e.filename} ({e.strerror})") from None
    problems = [f"{path}: {why}" for path, why in passed_over]

    def key(path, folder):  # a Mac writes names decomposed (NFD), most tools composed (NFC): one name either way
        return Path(unicodedata.normalize("NFC", str(path.relative_to(folder).with_suffix(""))))

    def label_key(stem):  # Ultralytics' rule below the folder too: part1/images/a.jpg -> part1/labels/a.txt
        folders = stem.parts[:-1]
        if not beside or "images" not in folders:
            return stem
        i = len(folders) - 1 - folders[::-1].index("images")
        ultralytics = Path(*folders[:i], "labels", *stem.parts[i + 1:])
        return stem if ultralytics not in label_files and stem in label_files else ultralytics  # else Darknet's

    images, others = {}, []
    for p in image_files:
        stem = key(p, images_dir)
        if p.suffix.lower() in IMAGE_EXTS and stem in images:
            problems.append(f"{p}: shares its label file {stem}.txt with {images[stem]}")
        elif p.suffix.lower() in IMAGE_EXTS:
            images[stem] = p
        elif not (beside and p.suffix.lower() == ".txt"):
            others.append(p)
    # an empty folder is an empty split, labels or not (zip tools drop empty folders)
    if images and not (labelled and (not beside or any(is_label_file(p) for p in label_files))):
        if beside:
            missing = f"no labels folder {images_dir.parent / 'labels'} and no label files beside them"
        else:
            missing = f"no labels folder {labels_dir}"
            if stray := sum(map(is_label_file, image_files)):
                missing += (f" ({stray} .txt files lie among the images: an images folder's label files are read "
                            f"from labels/, as Ultralytics reads them; move them there)")
        if name == "train":
            raise UserError(f"{name} split: images in {images_dir} but {missing}")
        return {}, problems + [f"{images_dir}: {len(images)} images but {missing}: add the labels, or take the split "
                               f"out of data.yaml (--strict=false leaves it out)"]
    not_data = {p for p in others if p.suffix == ".npy" and key(p, images_dir) in images  # Ultralytics' cache=disk
                or beside and p.name in CLASS_LISTS}  # writes each image's pixels beside it as .npy
    problems += [f"{p}: not an image file (extension {p.suffix or 'none'})" for p in others if p not in not_data]
    label_files = {key(p, labels_dir): p for p in label_files if p.suffix.lower() == ".txt"}
    if Path("classes") not in images:  # LabelImg's list of class names beside the labels, not a label file
        label_files.pop(Path("classes"), None)
    label_keys = {stem: label_key(stem) for stem in images}
    problems += [f"{p}: label file without an image in {images_dir}" for s, p in label_files.items()
                 if s not in label_keys.values()]
    return {image: (label_files.get(label_keys[stem]), labels_dir / f"{label_keys[stem]}.txt")
            for stem, image in images.items()}, problems


def listed_pairs(list_file):
    """{image: (its label file or None, the label file expected)} of an image list (Ultralytics' and CVAT's
    train.txt: one image a line, relative to the list's folder; CVAT's YOLO 1.1 export writes data/ before each:
    Darknet's data/ folder, where the export is meant to sit), each label file where labels_folder puts it, and the
    problems: lines that name no image."""
    try:
        lines = list_file_lines(list_file)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{list_file}: cannot read the image list ({getattr(e, 'strerror', None) or e})") from None
    pairs, problems, label_folders = {}, [], {}
    for n, line in lines:
        image = Path(os.path.abspath(list_file.parent / line))
        parts = Path(line).parts
        darknet = list_file.parent.joinpath(*parts[1:]) if parts[:1] == ("data",) and len(parts) > 1 else None
        if darknet and not os.path.lexists(image) and os.path.lexists(darknet):
            image = Path(os.path.abspath(darknet))
        try:
            found, exists = image.is_file(), image.exists()
        except OSError as e:  # a name too long, a folder this user may not enter
            problems.append(f"{list_file}:{n}: {image}: {e.strerror or e}")
            continue
        if image.suffix.lower() not in IMAGE_EXTS or not found:
            problems.append(f"{list_file}:{n}: {image} " + ("does not exist" if not exists else
                                                             f"is not an image file (extension {image.suffix or 'none'})"))
            continue
        labels_dir = label_folders.setdefault(image.parent, labels_folder(image.parent))
        expected = labels_dir / f"{image.stem}.txt"
        pairs[image] = (expected if expected.is_file() else None, expected)
    return pairs, problems


def image_format(data):
    """Format from the file's magic bytes, never from its name."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def jpeg_complete(data):
    """Whether the scan data, after the headers, reaches an end-of-image marker. Bytes after it (phone
    cameras append trailers) are allowed; an EXIF thumbnail's own end marker is skipped with its header segment,
    and inside the entropy-coded data 0xFF is always followed by 0x00 or a restart marker, never by 0xD9."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:  # stray bytes between segments (libjpeg skips them): look for the end marker from here
            return data.find(b"\xff\xd9", i) >= 0
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0xDA:  # start of scan
            return data.find(b"\xff\xd9", i) >= 0
        elif marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return False


def png_complete(data):
    """Whether the chunks, each stepped over by its length from the signature on, reach IEND. Bytes after it are
    allowed, as after a JPEG's end."""
    i = 8
    while i + 12 <= len(data):
        if data[i + 4:i + 8] == b"IEND":
            return True
        i += 12 + int.from_bytes(data[i:i + 4], "big")  # length, type, data, CRC
    return False


def truncated(data, fmt):
    """JPEG must reach its end-of-image marker, PNG its IEND chunk (decoders accept partial files)."""
    if fmt == "jpeg":
        return not jpeg_complete(data)
    if fmt == "png":
        return not png_complete(data)
    return False


def crop_region(shape, box, margin):
    """Pixel rows and columns (x0, y0, x1, y1) that crop_box cuts: a normalized cx, cy, w, h box widened by
    margin on each side, clamped to the image."""
    h, w = shape[:2]
    cx, cy, bw, bh = box
    x0, x1 = (cx - bw * (0.5 + margin)) * w, (cx + bw * (0.5 + margin)) * w
    y0, y1 = (cy - bh * (0.5 + margin)) * h, (cy + bh * (0.5 + margin)) * h
    x0, y0 = min(max(0, int(round(x0))), w - 1), min(max(0, int(round(y0))), h - 1)  # a box on the edge keeps a pixel
    x1, y1 = min(w, max(x0 + 1, int(round(x1)))), min(h, max(y0 + 1, int(round(y1))))
    return x0, y0, x1, y1


def crop_box(image, box, margin, size):
    """Crop a normalized cx, cy, w, h box, widened by margin on each side and clamped, resized to size."""
    x0, y0, x1, y1 = crop_region(image.shape, box, margin)
    crop = image[y0:y1, x0:x1]
    interp = cv2.INTER_AREA if crop.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(crop, (size, size), interpolation=interp)


def network_crop(image, box, margin, size):
    """The uint8 (3, S, S) crop of a normalized box as the network sees it: crop_box, channels first."""
    return crop_box(image, box, margin, size).transpose(2, 0, 1)


def opencv_message(error):
    """The last line of a cv2.error (its first lines are OpenCV's source location)."""
    return str(error).strip().splitlines()[-1][:200]


def decode_image(path):
    """RGB uint8 array of one file and its format, or raise ValueError saying what is wrong."""
    data = Path(path).read_bytes()
    if not data:
        raise ValueError("zero-size file")
    fmt = image_format(data)
    if fmt is None:
        raise ValueError("not an image (unknown file signature)")
    if truncated(data, fmt):
        raise ValueError(f"truncated {fmt} file")
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as e:  # a header claiming more than OpenCV's 2**30 pixels: a corrupt one, or a gigapixel scan
        raise ValueError(f"unreadable {fmt} file ({opencv_message(e)})") from None
    if image is None:
        raise ValueError(f"unreadable {fmt} file")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), fmt


def decode_split(split, out, size, margin, threads):
    """Decode each image once (in parallel), crop its boxes into out[i]. Returns (per sample: (hash, format, [h, w]),
    or None where its image failed; the problems)."""
    by_image = defaultdict(list)
    for i, p in enumerate(split.paths):
        by_image[p].append(i)
    meta = [None] * len(split)
    problems = []

    def work(item):
        path, idx = item
        try:
            image, fmt = decode_image(path)
        except (ValueError, OSError) as e:
            return path, idx, None, str(e)
        digest = hashlib.blake2b(image.tobytes(), digest_size=12)
        digest.update(str(image.shape).encode())
        for i in idx:
            out[i] = network_crop(image, split.boxes[i], margin, size)
        return path, idx, (digest.hexdigest(), fmt, list(image.shape[:2])), None

    threads = threads or cpu_threads()
    pool = ThreadPoolExecutor(threads)  # cv2 releases the GIL
    try:  # 64 images a thread ahead (as fast as all at once), not a future for each of a million images
        for path, idx, info, error in ordered_prefetch(work, by_image.items(), pool, 64 * threads):
            if error:
                problems.append(f"{path}: {error}")
            for i in idx:
                meta[i] = info
    finally:  # Ctrl-C: drop the queued images instead of decoding the whole split first (the running ones finish)
        pool.shutdown(wait=True, cancel_futures=True)
    return meta, problems


def cache_key(split, size, margin):
    """What the split's crops depend on: each face's image (its name as bytes: any name; size and time) and box."""
    h = hashlib.sha1(f"{CACHE_VERSION}|{size}|{margin}".encode())
    stats = {p: os.stat(p) for p in dict.fromkeys(split.paths)}  # an image of many faces once
    for p, box in zip(split.paths, split.boxes):
        h.update(os.fsencode(p) + f"|{stats[p].st_size}|{stats[p].st_mtime_ns}|".encode() + box.tobytes())
    return h.hexdigest()[:20]


def load_split_pixels(split, cfg, log_file=None, rebuilt=False):
    """Fill split.images from the cache (memory-mapped), decoding into it first if the files changed.

    Returns (ok, problems): ok, a mask over the samples, False where the image failed (they stay in the split);
    the problems found while decoding (unreadable, truncated, not an image).
    """
    size, margin = cfg.image_size, cfg.crop_margin
    cache_dir = user_path(cfg.cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the decode cache folder {cache_dir}: {e.strerror}; choose a writable "
                        f"--cache_dir") from None
    folder = Path(split.paths[0]).parent if split.paths else Path(".")
    prefix = f"{hashlib.sha1(os.fsencode(folder.resolve())).hexdigest()[:10]}_{split.name}_{size}px_m{round(margin * 1000)}"
    name = f"{prefix}_{cache_key(split, size, margin)}"  # no dots: the suffix is ours alone
    array_path, meta_path = cache_dir / f"{name}.npy", cache_dir / f"{name}.json"
    if not (array_path.exists() and meta_path.exists()):
        for tmp in cache_dir.glob(f"{prefix}_*.tmp"):
            if abandoned(tmp):
                with contextlib.suppress(OSError):  # still open on Windows, another user's in a shared folder
                    tmp.unlink(missing_ok=True)
        # the cache is a sparse memory-mapped file: a disk filling under it would kill the process (SIGBUS) unheard
        need, usage = len(split) * 3 * size * size, None
        with contextlib.suppress(OSError):  # a mount that cannot say: decode, as before the check
            usage = shutil.disk_usage(cache_dir)
        if usage and usage.total and need > usage.free:
            raise UserError(f"the {split.name} split's decode cache needs {need / 2**20:.1f} MiB in {cache_dir} and "
                            f"{usage.free / 2**20:.1f} MiB are free: free some space or choose another --cache_dir")
        t0 = time.time()
        decoded = {}

        def decode_into(tmp):  # a temporary file per process: two runs may build the same cache at once
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(split), 3, size, size))
            decoded["meta"], decoded["problems"] = decode_split(split, out, size, margin, cfg.decode_threads)
            out.flush()

        atomic_write(array_path, decode_into)  # Ctrl-C or a full disk: no half-built cache left behind
        write_json(decoded, meta_path)
        for old in cache_dir.glob(f"{prefix}_*"):  # a changed dataset leaves its old cache behind
            if old.name.split(".")[0] != name and not old.name.endswith(".tmp"):  # not another run's build
                with contextlib.suppress(OSError):  # still mapped by a run on Windows, or a colleague's: it stays
                    old.unlink(missing_ok=True)
        split.decode_seconds = time.time() - t0
        log(f"{split.name}: decoded {len(set(split.paths))} images into {array_path} in {split.decode_seconds:.1f}s", log_file)
    try:
        cached = json.loads(meta_path.read_text())
        meta, problems = cached["meta"], cached["problems"]
        split.images = np.load(array_path, mmap_mode="c")  # copy-on-write: torch wants writable arrays
        if split.images.shape != (len(split), 3, size, size):
            raise ValueError(f"shape {split.images.shape}")
    except (ValueError, OSError, KeyError) as e:  # a damaged cache (a disk that filled, a copy cut short): rebuild it
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        if rebuilt:
            raise UserError(f"the decode cache {array_path} cannot be read even after a rebuild ({reason}); choose "
                            f"another --cache_dir") from None
        log(f"{split.name}: the decode cache {array_path} is damaged ({reason}); rebuilding it", log_file)
        split.images = None
        with contextlib.suppress(OSError):  # held (Windows): the rebuild's own write then says so
            array_path.unlink(missing_ok=True)
            meta_path.unlink(missing_ok=True)
        return load_split_pixels(split, cfg, log_file, rebuilt=True)
    ok = np.array([m is not None for m in meta], dtype=bool)
    split.hashes = [m[0] if m else None for m in meta]
    split.formats = [m[1] if m else None for m in meta]
    split.sizes = [tuple(m[2]) if m else None for m in meta]
    return ok, problems


def stratified_holdout(labels, images, fraction, seed):
    """Boolean mask of the samples (boxes) of a random fraction of the images, stratified by each image's first
    label: the faces of one photo stay on one side; at least one image of each class, never its only one."""
    rng = np.random.default_rng(seed)
    names, first, group = np.unique(np.asarray(images, dtype=object).astype(str), return_index=True, return_inverse=True)
    held_images = np.zeros(len(names), dtype=bool)
    for c in np.unique(labels[first]):
        idx = rng.permutation(np.flatnonzero(labels[first] == c))
        held_images[idx[:min(len(idx) - 1, max(1, round(fraction * len(idx))))]] = True  # a class keeps one image
    return held_images[group]


def file_list_fingerprint(paths):
    """sha256 of the sorted image paths relative to their common folder: the same files give the same hash
    wherever the dataset lies."""
    files = sorted(set(map(str, paths)))
    root = os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0]) if files else ""
    relative = (os.path.relpath(f, root).replace(os.sep, "/") for f in files)  # as on POSIX: the same on Windows
    return hashlib.sha256(b"\n".join(os.fsencode(r) for r in relative)).hexdigest()


def split_report(split, class_names):
    """A split's part of data_report.json: its samples (faces) per class; its images, their formats and sizes, each
    image once however many faces it holds."""
    images = dict(zip(split.paths, zip(split.formats, split.sizes)))
    return {
        "samples": len(split),
        "images": len(images),
        "file_list_sha256": file_list_fingerprint(split.paths),
        "per_class": {n: int((split.labels == i).sum()) for i, n in enumerate(class_names)},
        "formats": dict(Counter(f for f, _ in images.values())),
        "image_sizes": {f"{w}x{h}": n for (h, w), n in Counter(s for _, s in images.values()).most_common(10)},  # w x h
    }


def find_duplicates(splits):
    """Exact duplicates (same decoded pixels) within each split and of training images in the others, counted
    and listed by file: each group within a split, and each valid/test image with the training files it repeats."""
    report = {}
    owners = defaultdict(lambda: defaultdict(set))  # hash -> split -> labels
    first_path = {}
    for s in splits.values():
        seen, faces = defaultdict(set), defaultdict(list)  # hash -> paths; path -> its faces (centre, label)
        for p, h, y, box in zip(s.paths, s.hashes, s.labels, s.boxes.tolist()):
            seen[h].add(p)
            faces[p].append((box[:2], int(y)))
            owners[h][s.name].add(int(y))
            first_path.setdefault((h, s.name), p)
        groups = [ps for ps in seen.values() if len(ps) > 1]
        labels_left_to_right = lambda p: tuple(y for _, y in sorted(faces[p]))  # a box drawn a little off is the face
        conflicts = sum(1 for ps in groups if len({labels_left_to_right(p) for p in ps}) > 1)
        report[f"{s.name}_within"] = {"groups": len(groups), "extra_images": sum(len(g) - 1 for g in groups),
                                      "label_conflicts": conflicts, "files": sorted(sorted(map(str, g)) for g in groups)}
    train_hashes = set(splits["train"].hashes)
    train_files = defaultdict(set)
    for p, h in zip(splits["train"].paths, splits["train"].hashes):
        train_files[h].add(str(p))
    for s in splits.values():
        if s.name == "train":
            continue
        dup = [h in train_hashes for h in s.hashes]
        images = {p for p, d in zip(s.paths, dup) if d}
        conflicts = sorted({first_path[(h, s.name)] for h in set(s.hashes) & train_hashes
                            if owners[h][s.name] != owners[h]["train"]})
        repeats = {(str(p), h) for p, h, d in zip(s.paths, s.hashes, dup) if d}
        report[f"{s.name}_in_train"] = {"samples": int(sum(dup)), "images": len(images),
                                        "label_conflicts": len(conflicts), "conflict_examples": conflicts[:10],
                                        "files": [{"image": p, "train_images": sorted(train_files[h])}
                                                  for p, h in sorted(repeats)]}
    if "test" in splits and "val" in splits:  # the validation split chose the epoch: test images it holds are seen
        val_hashes = set(splits["val"].hashes)
        report["test_in_val"] = {"samples": int(sum(h in val_hashes for h in splits["test"].hashes))}
    return report


def load_dataset(cfg, log_file=None, splits_wanted=("train", "val", "test")):
    """Class names, decoded splits and the data report; every problem is collected before deciding.

    Strict (default): any problem stops the run with the full list. Otherwise the offending
    samples are skipped and listed in the report. Unreadable images are never replaced.
    """
    yaml_problems = []  # nc or a class list against names: no sample to skip, so these stop the run even with
    # --strict=false
    try:
        class_names, folders, notes, keypoint_values = read_data_yaml(cfg.data_dir, yaml_problems)
        for note in notes:
            log(f"note: {note}", log_file)
        splits, problems, row_notes, no_face = scan_splits(folders, splits_wanted, len(class_names), keypoint_values,
                                                           log_file)
    except OSError as e:  # pathlib's checks raise for a folder this user may not enter, or a name too long
        raise UserError(f"cannot read the dataset: {e.filename or cfg.data_dir}: {e.strerror or e}") from None
    problems = yaml_problems + problems
    named_val = "val" in splits  # read (not the training images again, which scan_splits drops with a note)
    ok = {}
    for name, split in splits.items():
        if len(split):
            ok[name], found = load_split_pixels(split, cfg, log_file)
            problems += found + too_small_boxes(split, ok[name], class_names)
    decode_seconds = sum(split.decode_seconds for split in splits.values())  # before subset() makes new splits
    if problems and (cfg.strict or yaml_problems):
        stop_on_problems(problems, yaml_problems, cfg, log_file)
    for name in list(splits):
        if name in ok and not ok[name].all():  # subset() copies: keep the memory map when nothing is dropped
            splits[name] = splits[name].subset(ok[name])
        if not len(splits[name]):
            if name == "train":
                raise UserError(f"the training split in {source_text(folders['train'])} has no usable samples")
            del splits[name]
    if problems:
        log(f"warning: skipped the samples of {len(problems)} dataset problem(s) (--strict=false); see data_report.json", log_file)
    if "val" not in splits and "train" in splits_wanted:
        hold_out_validation(splits, cfg, log_file, named_val)
    if "train" in splits:
        counts = np.bincount(splits["train"].labels, minlength=len(class_names))
        for c in np.flatnonzero(counts == 0):
            elsewhere = ", ".join(f"{n}: {int((s.labels == c).sum())}" for n, s in splits.items() if n != "train")
            log(f"warning: class {class_names[c]!r} has no training samples ({elsewhere})", log_file)
    duplicates = find_duplicates(splits) if "train" in splits else {}
    warn_of_duplicates(splits, duplicates, cfg, log_file)
    report = {"data_dir": str(cfg.data_dir), "class_names": class_names, "notes": notes + row_notes,
              "images_without_faces": no_face,
              "decode_seconds": round(decode_seconds, 2),
              "problems": problems, "skipped_problems": len(problems),
              "splits": {n: split_report(s, class_names) for n, s in splits.items()},
              "duplicates": duplicates}
    return class_names, splits, report


SPLIT_WORDS = {"train": "training", "val": "validation", "test": "test"}


def scan_splits(folders, splits_wanted, num_classes, keypoint_values, log_file):
    """scan_split of each split wanted that data.yaml names, but one that holds exactly another's images: ({split:
    Split}, problems, notes (of repeated rows, then of YOLOv5-face's rows), images without faces)."""
    splits, problems, row_notes, no_face, counts, face_notes = {}, [], [], [], {}, []
    for name in splits_wanted:
        if name in folders:
            tally = collections.Counter()
            splits[name], found, repeated, empty = scan_split(name, folders[name], num_classes, keypoint_values, tally)
            if face_rows_read(tally):
                face_notes.append(f"{tally['face landmarks']} of the {name} split's {tally['15 fields']} label rows "
                                  f"of 15 fields read as YOLOv5-face's (a box, then five landmarks in it): they are "
                                  f"read so, not as 7-point polygons (kpt_shape: [5, 2] in data.yaml would say so)")
                log(f"note: {face_notes[-1]}", log_file)
            problems += found
            counts[name] = len(empty)
            if empty and not len(splits[name]):  # not one face: an export that lost its labels, not a background set
                problems.append(f"{source_text(folders[name])}: all {len(empty)} label files of the {name} split are "
                                f"empty (no face labelled): an export without its labels?")
            row_notes += repeated
            no_face += empty
    if no_face:
        log(f"note: images with an empty label file (YOLO's image without faces) are not used: "
            f"{', '.join(f'{n} {k}' for n, k in counts.items() if k)}, e.g. {no_face[0]} (a run's data_report.json "
            f"lists them)", log_file)
    if row_notes:
        log(f"note: dropped {len(row_notes)} label row(s) that repeat a box of their file, e.g. {row_notes[0]} "
            f"(a run's data_report.json lists them)", log_file)
    # a split that names another's images: val or test the training folder (Ultralytics' coco128.yaml has
    # val: images/train2017), or test the validation folder (exports without a test split write that)
    for name, other in (("val", "train"), ("test", "train"), ("test", "val")):
        if name in splits and other in splits and splits[name].paths and set(splits[name].paths) == set(splits[other].paths):
            log(f"note: data.yaml's {SPLIT_WORDS[name]} split ({source_text(folders[name])}) holds exactly the "
                f"{SPLIT_WORDS[other]} split's images{' (which choose the best epoch)' if other == 'val' else ''}, so "
                f"it is no {SPLIT_WORDS[name]} split; " + ("validation images are held out of training instead"
                                                           if name == "val" else
                                                           "the final evaluation is on the validation split"), log_file)
            del splits[name]
    return splits, problems, row_notes + face_notes, no_face


def too_small_boxes(split, ok, class_names):
    """The problems of boxes under MIN_BOX_PIXELS on a side (a misclick: its crop would be one blurred colour), whose
    samples ok then marks False."""
    problems = []
    for i, size in enumerate(split.sizes):
        if size is None:  # its image did not decode: a problem already
            continue
        w, h = split.boxes[i, 2:] * size[::-1]
        if min(w, h) < MIN_BOX_PIXELS:
            ok[i] = False
            problems.append(f"{split.paths[i]}: a box of {w:.1f} x {h:.1f} pixels (class "
                            f"{class_names[split.labels[i]]}) is too small for a face (under {MIN_BOX_PIXELS})")
    return problems


def stop_on_problems(problems, yaml_problems, cfg, log_file):
    """Raise the problems, the first 50 in the message; past 50 the whole list goes to data_problems.txt (beside the
    log; a resume, whose folder changes only once the data fit, has none: in the cache folder)."""
    shown = "\n  ".join(problems[:50])
    if len(problems) > 50:  # the first 50 can all be of one kind
        listing = (Path(log_file).parent if log_file else user_path(cfg.cache_dir)) / "data_problems.txt"
        try:
            listing.parent.mkdir(parents=True, exist_ok=True)
            listing.write_text("".join(f"{p}\n" for p in problems), encoding="utf-8", errors="backslashreplace")
            where = f", all listed in {listing}"
        except OSError:  # a folder that cannot be written: the first 50 are still shown
            where = ""
        shown += f"\n  ... and {len(problems) - 50} more{where}"
    advice = ("data.yaml's names must agree with its nc and with the labels' class list (--strict=false cannot skip "
              "that)." if yaml_problems else
              "Fix them, or pass --strict=false to skip the offending samples (a run then lists them in "
              "data_report.json).")
    raise UserError(f"{len(problems)} dataset problem(s) in {cfg.data_dir}:\n  {shown}\n{advice}")


def hold_out_validation(splits, cfg, log_file, named):
    """Without a validation split (or, named: data.yaml's has no usable sample): --val_fraction of the training
    images, whole and stratified, become one."""
    held = stratified_holdout(splits["train"].labels, splits["train"].paths, cfg.val_fraction, cfg.seed)
    splits["val"] = dataclasses.replace(splits["train"].subset(held), name="val")
    splits["train"] = splits["train"].subset(~held)
    if not held.any():
        raise UserError(f"{len(set(splits['train'].paths))} training images are too few to hold out a validation "
                        f"split (a class's only image stays in training): add a validation split to data.yaml")
    log(f"note: {'the validation split has no usable sample' if named else 'no validation split'}; holding out "
        f"{held.sum()} training samples, the faces of {len(set(splits['val'].paths))} whole images "
        f"(--val_fraction={cfg.val_fraction})", log_file)


def warn_of_duplicates(splits, duplicates, cfg, log_file):
    """Say which evaluated samples duplicate training (or, for test, validation) images; --drop_duplicates drops the
    ones that duplicate training images."""
    if duplicates.get("test_in_val", {}).get("samples"):
        log(f"warning: {duplicates['test_in_val']['samples']} test samples duplicate validation images pixel for pixel; "
            f"the validation split chose the best epoch, so the test accuracy is not independent of them", log_file)
    for key, d in duplicates.items():
        if not (key.endswith("_in_train") and d["samples"]):
            continue
        name = key.split("_")[0]
        log(f"warning: {d['samples']} {name} samples duplicate training images pixel for pixel "
            f"({d['label_conflicts']} with other labels)" + ("; dropping them" if cfg.drop_duplicates else
                                                             "; --drop_duplicates=true drops them"), log_file)
        if not cfg.drop_duplicates:
            continue
        train_hashes = set(splits["train"].hashes)
        splits[name] = splits[name].subset([h not in train_hashes for h in splits[name].hashes])
        if not len(splits[name]) and name == "val":
            raise UserError("every validation sample duplicates a training image, so --drop_duplicates=true "
                            "leaves none: give data.yaml a validation split of other images (or none, for a "
                            "hold-out), or keep them")
        if not len(splits[name]):
            log("note: every test sample duplicates a training image and is dropped; the final evaluation is "
                "on the validation split", log_file)
            del splits[name]


STATISTICS_SAMPLE = 4096  # every (N // 4096)-th training image behind the normalization: 4096-8191 (all, where fewer)


def dataset_normalization(images):
    """Per-channel mean and std of the training pixels (a strided subsample), in [0, 1] units.

    Summed 256 images at a time: float copies of the whole subsample raised the peak memory by
    1.3 GB at 96 px (benchmarks/bench_pipeline.py).
    """
    sample = images[::max(1, len(images) // STATISTICS_SAMPLE)]
    sums, squares = np.zeros(3), np.zeros(3)
    for i in range(0, len(sample), 256):
        x = np.asarray(sample[i:i + 256], dtype=np.float64) / 255
        sums += x.sum((0, 2, 3))
        squares += (x * x).sum((0, 2, 3))
    n = len(sample) * sample.shape[2] * sample.shape[3]
    mean = sums / n
    std = np.sqrt(np.maximum(squares / n - mean ** 2, 0))
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std + 1e-3, dtype=torch.float32)


# The demo data: drawn faces in YOLO format

DEMO_CLASSES = ["Anger", "Contempt", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise"]
# Per expression: brow tilt (inner end down > 0), brow lift, eye openness, mouth curve (smile > 0),
# mouth opening, mouth asymmetry. They differ only in small strokes, so raw pixels don't separate them.
DEMO_FACES = {
    "Anger": (0.9, -0.05, 0.7, -0.3, 0.0, 0.0), "Contempt": (0.0, 0.0, 0.8, 0.0, 0.0, 1.0),
    "Disgust": (0.5, -0.05, 0.5, -0.6, 0.25, 0.0), "Fear": (-0.7, 0.12, 1.4, -0.2, 0.5, 0.0),
    "Happy": (0.0, 0.0, 0.8, 1.0, 0.2, 0.0), "Neutral": (0.0, 0.0, 1.0, 0.0, 0.0, 0.0),
    "Sad": (-0.8, 0.03, 0.8, -1.0, 0.0, 0.0), "Surprise": (0.0, 0.18, 1.5, 0.0, 1.0, 0.0),
}


def draw_face(rng, expression, size):
    """One synthetic photo (size x size RGB) with a face of the given expression; returns it and the face box."""
    brow_tilt, brow_lift, eye_open, curve, opening, asym = DEMO_FACES[expression]
    bg = rng.integers(0, 256, 3)
    img = np.empty((size, size, 3), np.float32)
    img[:] = bg
    img += np.linspace(0, 1, size)[None, :, None] * rng.normal(0, 60, 3)  # background gradient
    face = 256  # draw large, then warp down: antialiased strokes at any scale
    canvas = np.zeros((face, face, 3), np.uint8)
    mask = np.zeros((face, face), np.uint8)
    skin = tuple(int(v) for v in rng.integers(60, 250, 3))
    ink = tuple(int(v) for v in np.clip(np.array(skin) - rng.integers(90, 160), 0, 255))
    c = face // 2
    axes = (int(face * rng.uniform(0.33, 0.4)), int(face * rng.uniform(0.42, 0.47)))
    cv2.ellipse(canvas, (c, c), axes, 0, 0, 360, skin, -1, cv2.LINE_AA)
    cv2.ellipse(mask, (c, c), axes, 0, 0, 360, 255, -1, cv2.LINE_AA)
    j = lambda s: rng.normal(0, s)
    eye_y, eye_dx = int(c - face * 0.08 + j(3)), int(face * 0.15 + j(3))
    thick = max(2, int(face * 0.025))
    for side in (-1, 1):
        ex = c + side * eye_dx
        eh = max(2, int(face * 0.04 * eye_open + j(1)))
        cv2.ellipse(canvas, (ex, eye_y), (int(face * 0.06), eh), 0, 0, 360, (250, 250, 250), -1, cv2.LINE_AA)
        cv2.circle(canvas, (ex, eye_y), max(2, int(face * 0.025)), ink, -1, cv2.LINE_AA)
        by = eye_y - face * (0.1 + brow_lift) + j(2)
        inner, outer = ex - side * face * 0.07, ex + side * face * 0.08
        tilt = brow_tilt * face * 0.04
        cv2.line(canvas, (int(inner), int(by + tilt)), (int(outer), int(by - tilt)), ink, thick, cv2.LINE_AA)
    mouth_y, half = c + face * 0.2 + j(3), face * rng.uniform(0.11, 0.15)
    xs = np.linspace(-1, 1, 24)
    corners = face * 0.06 * (curve * xs ** 2 + asym * np.maximum(xs, 0) ** 2)  # smile: corners up
    upper = np.stack([c + xs * half, mouth_y - corners], 1)
    if opening > 0:
        lower = upper.copy()
        lower[:, 1] += opening * face * 0.12 * (1 - xs ** 2)
        poly = np.concatenate([upper, lower[::-1]]).astype(np.int32)
        cv2.fillPoly(canvas, [poly], (40, 20, 20), cv2.LINE_AA)
    cv2.polylines(canvas, [upper.astype(np.int32)], False, ink, thick, cv2.LINE_AA)
    # place the face: random scale, rotation and position inside the photo
    scale = rng.uniform(0.45, 0.8) * size / face
    angle = rng.uniform(-20, 20)
    fw = face * scale
    cx, cy = rng.uniform(fw / 2, size - fw / 2, 2)
    m = cv2.getRotationMatrix2D((c, c), angle, scale)
    m[:, 2] += (cx - c, cy - c)
    warped = cv2.warpAffine(canvas, m, (size, size), flags=cv2.INTER_AREA)
    alpha = cv2.warpAffine(mask, m, (size, size), flags=cv2.INTER_LINEAR)[..., None] / 255.0
    img = img * (1 - alpha) + warped * alpha + rng.normal(0, rng.uniform(3, 15), img.shape)
    box = ((cx) / size, (cy) / size, min(1.0, 2 * axes[0] * scale * 1.1 / size), min(1.0, 2 * axes[1] * scale * 1.05 / size))
    return np.clip(img, 0, 255).astype(np.uint8), box


def make_synthetic_dataset(root, per_class=(150, 50, 0), size=64, seed=0, names=DEMO_CLASSES):
    """A YOLO-format dataset of drawn faces: data.yaml and train/valid/test with images/ and labels/.

    per_class gives the images per class in train, valid and test (0 = no such split; the defaults: --demo's). JPEG and
    PNG are mixed, and every label ends without a trailing newline, as in the AffectNet export.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in zip(("train", "valid", "test"), per_class):
        if not n:
            continue
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "labels").mkdir(parents=True, exist_ok=True)
        for cls, name in enumerate(names):
            for i in range(n):
                img, (cx, cy, w, h) = draw_face(rng, DEMO_CLASSES[cls % len(DEMO_CLASSES)], size)
                stem = f"{name.lower()}_{i:04d}"
                ext = ".png" if rng.random() < 0.3 else ".jpg"
                write_image(root / split / "images" / (stem + ext), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
                (root / split / "labels" / (stem + ".txt")).write_text(f"{cls} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
        splits[split] = f"{split}/images"
    doc = {"path": ".", "train": splits.get("train"), "val": splits.get("valid"), "test": splits.get("test"),
           "nc": len(names), "names": list(names)}
    (root / "data.yaml").write_text(yaml.safe_dump({k: v for k, v in doc.items() if v is not None}, sort_keys=False))
    return root


# ---------------------------------------------------------------------------------------------
# Augmentation: whole batches on the device, per-sample randomness
# ---------------------------------------------------------------------------------------------

# Random erasing (Zhong et al., AAAI 2020): the erased rectangle's area, fraction of the image, and its aspect ratio
ERASE_AREA = (0.02, 0.25)
ERASE_ASPECT = (0.3, 3.3)  # height / width, drawn log-uniformly
AUGMENT_CHUNK = 32  # images per piece on the CPU: pieces that stay in the cache were 1.8x faster at 96 px


def affine_theta(angle, zoom, shift, flip):
    """(B, 2, 3) matrices for F.affine_grid (align_corners=False) that mirror each image left-right where flip,
    then rotate it by angle (degrees, counter-clockwise as shown: cv2.getRotationMatrix2D's sense) and magnify it
    by zoom about its centre, then move it by shift (B, 2): (right, down), fractions of the image side.
    The grid maps each output position back to the input position it samples: the inverse of that map."""
    a = torch.deg2rad(angle)
    cos, sin = torch.cos(a) / zoom, torch.sin(a) / zoom
    mirror = torch.where(flip, -1.0, 1.0)
    dx, dy = shift[:, 0] * 2, shift[:, 1] * 2  # grid coordinates span 2 per image side
    # input = M^-1 (output - d) with M = zoom * R_ccw(angle) * mirror; in y-down coordinates R_ccw^-1 = [[c, -s], [s, c]]
    row_x = torch.stack([cos * mirror, -sin * mirror, -(cos * dx - sin * dy) * mirror], 1)
    row_y = torch.stack([sin, cos, -(sin * dx + cos * dy)], 1)
    return torch.stack([row_x, row_y], 1)


def sampling_grid(theta, size):
    """F.affine_grid(theta, (B, C, size, size), align_corners=False) as a column term plus a row term: its
    (S*S, 3) batched matmul was 6x slower on the CPU (benchmarks/bench_pipeline.py)."""
    b = theta.shape[0]
    r = (torch.arange(size, device=theta.device, dtype=theta.dtype) * 2 + 1) / size - 1  # pixel centres
    return theta[:, :, 0].view(b, 1, 1, 2) * r.view(1, 1, size, 1) + \
        (theta[:, :, 1].view(b, 1, 1, 2) * r.view(1, size, 1, 1) + theta[:, :, 2].view(b, 1, 1, 2))


def erase_mask(b, size, device):
    """(B, 1, S, S) masks of one random rectangle each: area ERASE_AREA of the image, aspect ERASE_ASPECT, any centre
    (clipped at the border)."""
    area = torch.empty(b, device=device).uniform_(*ERASE_AREA)
    aspect = torch.exp(torch.empty(b, device=device).uniform_(math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1])))
    eh, ew = (area * aspect).sqrt() * size, (area / aspect).sqrt() * size
    cy, cx = torch.rand(b, device=device) * size, torch.rand(b, device=device) * size
    r = torch.arange(size, device=device, dtype=torch.float32) + 0.5  # pixel centres
    rows = (r.view(1, size) - cy.view(b, 1)).abs() < eh.view(b, 1) / 2
    cols = (r.view(1, size) - cx.view(b, 1)).abs() < ew.view(b, 1) / 2
    return rows.view(b, 1, size, 1) & cols.view(b, 1, 1, size)


def augment_batch(x, mean, std, cfg):
    """uint8 (B, 3, S, S) -> normalized float: affine (zoom, shift, rotation, flip), jitter, erasing.

    The flip and the affine share one sampling grid and grid_sample; every sample draws its own.
    """
    if x.device.type == "cpu" and x.shape[0] > AUGMENT_CHUNK:
        return torch.cat([augment_batch(part, mean, std, cfg) for part in x.split(AUGMENT_CHUNK)])
    b, dev, s = x.shape[0], x.device, x.shape[-1]
    x = x.float().div_(255)  # in place from here on: on the CPU every fresh batch-sized tensor costs page faults
    uniform = lambda *shape: torch.rand(*shape, device=dev) * 2 - 1  # in [-1, 1]
    if cfg.aug_scale or cfg.aug_translate or cfg.aug_rotate or cfg.aug_flip:
        theta = affine_theta(uniform(b) * cfg.aug_rotate, 1 + uniform(b) * cfg.aug_scale, uniform(b, 2) * cfg.aug_translate,
                             torch.rand(b, device=dev) < cfg.aug_flip)
        x = F.grid_sample(x, sampling_grid(theta, s), mode="bilinear", padding_mode="reflection", align_corners=False)
    if cfg.aug_brightness or cfg.aug_contrast:
        mean_px = x.mean((1, 2, 3), keepdim=True)
        contrast = 1 + uniform(b, 1, 1, 1) * cfg.aug_contrast
        bright = 1 + uniform(b, 1, 1, 1) * cfg.aug_brightness
        x = x.mul_(contrast * bright).add_(mean_px * (1 - contrast) * bright).clamp_(0, 1)  # ((x - m) c + m) b
    x = x.sub_(mean.view(1, 3, 1, 1)).div_(std.view(1, 3, 1, 1))
    if cfg.aug_erase:
        x = x.masked_fill_(erase_mask(b, s, dev) & (torch.rand(b, 1, 1, 1, device=dev) < cfg.aug_erase), 0.0)  # 0 = the mean
    return x


# ---------------------------------------------------------------------------------------------
# Model: dual attention (channel + spatial), residual backbone, emotion context module
# ---------------------------------------------------------------------------------------------

class ChannelAttention(nn.Module):
    """CBAM channel attention (Woo et al., ECCV 2018): avg- and max-pooled descriptors through one
    shared bottleneck MLP, summed, one sigmoid gate per channel."""

    def __init__(self, channels: int, reduction: int = 16, min_hidden: int = 8):
        super().__init__()
        hidden = max(channels // reduction, min_hidden)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x):
        avg = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        mx = self.fc2(self.act(self.fc1(x.amax((2, 3), keepdim=True))))
        return x * torch.sigmoid(avg + mx)


class SpatialAttention(nn.Module):
    """CBAM spatial attention: the channel-wise mean and max maps through a 7x7 convolution,
    one sigmoid gate per position."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1)

    def forward(self, x):
        maps = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        return x * torch.sigmoid(self.bn(self.conv(maps)))


class DualAttention(nn.Module):
    """Channel attention, then spatial attention (CBAM's order); either can be switched off.

    residual: x * (1 + g) instead of x * g, attention residual learning (Wang et al., CVPR 2017).
    CBAM's x * g on the main path after every stage shrinks the features by about 4x per stage at
    initialization; in our short AffectNet runs it cost dual attention 3.2 points, which x * (1 + g)
    recovered (BENCHMARKS.md).
    """

    def __init__(self, channels: int, channel: bool = True, spatial: bool = True, reduction: int = 16,
                 residual: bool = True):
        super().__init__()
        self.channel = ChannelAttention(channels, reduction) if channel else nn.Identity()
        self.spatial = SpatialAttention() if spatial else nn.Identity()
        self.residual = residual and (channel or spatial)

    def forward(self, x):
        gated = self.spatial(self.channel(x))
        return x + gated if self.residual else gated


class Conv1x1OwnWeightGrad(torch.autograd.Function):
    """y = the 1x1 convolution of x by w at stride s. Forward pass and input gradient by oneDNN; the weight gradient is
    the output gradient times the subsampled input, a matrix product."""

    @staticmethod
    def forward(ctx, x, w, s):
        ctx.save_for_backward(x, w)
        ctx.stride = s
        return F.conv2d(x, w, stride=s)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        s = ctx.stride
        gx = torch.nn.grad.conv2d_input(x.shape, w, g, stride=s) if ctx.needs_input_grad[0] else None
        gw = torch.einsum("nohw,nchw->oc", g, x[:, :, ::s, ::s]).view_as(w) if ctx.needs_input_grad[1] else None
        return gx, gw, None


class Projection(nn.Conv2d):
    """The shortcut's 1x1 convolution (stride s, no bias). On the CPU in channels_last its weight gradient is
    Conv1x1OwnWeightGrad's: oneDNN 3.12's 1x1 backward kernels corrupt the heap there under AVX2, AVX512_CORE and
    AVX512_CORE_BF16, which the probe caught only by chance (BENCHMARKS.md, "Never crash on a machine it has not met").
    Same weight and state_dict as nn.Conv2d, which it stays elsewhere (CUDA, contiguous inputs, export)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        if x.device.type != "cpu" or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x)
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        with torch.autocast("cpu", enabled=False):  # a custom Function is not autocast: cast as conv2d would be
            return Conv1x1OwnWeightGrad.apply(x.to(dtype), self.weight.to(dtype), self.stride[0])


class BasicBlock(nn.Module):
    """ResNet basic block (He et al., 2016): two 3x3 convolutions and a projection shortcut when shapes change."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            Projection(cin, cout, stride), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x), inplace=True)


class EmotionContext(nn.Module):
    """Learnable emotion prototypes P (K x D) and each face's similarity to them.

    s_k = cos(f, P_k) / tau (the context logits), q = softmax(s) (the context distribution),
    c = q^T P (the context vector, the expected prototype) refines the prediction.
    """

    def __init__(self, dim: int, num_classes: int, temperature: float = 0.1):
        super().__init__()
        self.prototypes = nn.Parameter(torch.randn(num_classes, dim) / math.sqrt(dim))
        self.temperature = temperature

    def context_similarity(self, f):
        return F.normalize(f, dim=1) @ F.normalize(self.prototypes, dim=1).t() / self.temperature

    def forward(self, f):
        s = self.context_similarity(f)
        c = s.softmax(1).to(self.prototypes.dtype) @ self.prototypes
        return c, s


class ERN(nn.Module):
    """Emotion Recognition Network: stem, residual stages each followed by dual attention,
    global average pooling to the feature vector f, emotion context, and a linear classifier on [f, c].

    forward(x) -> (logits, context logits s or None, features f).
    """

    def __init__(self, num_classes: int, width: float = 1.0, blocks=(2, 4, 7, 2), channel_attention=True,
                 spatial_attention=True, context=True, reduction=16, temperature=0.1, dropout=0.3,
                 attention_residual=True, stem_stride=1):
        super().__init__()
        widths = [max(8, int(round(80 * 2 ** i * width / 8)) * 8) for i in range(len(blocks))]  # 80, 160, 320, 640, ...
        # at least 8: oneDNN 3.12's AVX2 backward of a 1x1 stride-2 convolution with 2-7 input channels (the first
        # shortcut) corrupts the heap in channels_last (benchmarks/onednn_1x1_repro.py); only widths < 0.15 are concerned.
        # Projection no longer reaches that kernel; the rule stays so that those widths' checkpoints still load.
        stem = max(8, widths[0] // 2)
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True))
        stages, cin = [], stem
        for cout, n in zip(widths, blocks):  # every stage halves the resolution: 96 -> 48, 24, 12, 6
            # (after a stride-2 stem, 96 -> 48 -> 24, 12, 6, 3: the network of 48 px on four times the pixels)
            stages.append(nn.Sequential(*[BasicBlock(cin if i == 0 else cout, cout, 2 if i == 0 else 1) for i in range(n)],
                                        DualAttention(cout, channel_attention, spatial_attention, reduction, attention_residual)))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.context = EmotionContext(cin, num_classes, temperature) if context else None
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(cin * (2 if context else 1), num_classes)

    def forward(self, x):
        f = self.stages(self.stem(x)).mean((2, 3))
        if self.context is None:
            return self.classifier(self.dropout(f)), None, f
        c, s = self.context(f)
        return self.classifier(self.dropout(torch.cat([f, c], 1))), s, f


def build_model(cfg, num_classes):
    return ERN(num_classes, cfg.width, parse_blocks(cfg.blocks), cfg.channel_attention, cfg.spatial_attention,
               cfg.context, cfg.attention_reduction, cfg.context_temperature, cfg.dropout, cfg.attention_residual, cfg.stem_stride)


def place_model(model, cfg, device):
    """On the device, and in channels_last where the run's inputs are (train_one_epoch, run_inference)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------

def smooth_targets(labels, num_classes, smoothing):
    """t = (1 - eps) * onehot(y) + eps / K, the label-smoothed target distribution."""
    return F.one_hot(labels, num_classes).float() * (1 - smoothing) + smoothing / num_classes


def hybrid_loss(logits, context_logits, target, context_weight, class_weights=None):
    """L = CE(z, t) + lambda * KL(t || q), returned as (L, CE, KL).

    CE(z, t) = -sum_k t_k log softmax(z)_k        (cross-entropy with label smoothing via t)
    KL(t || q) = sum_k t_k (log t_k - log q_k),   q = softmax(s), s_k = cos(f, P_k) / tau
    t is the label-smoothed target distribution; with class_weights w, each sample's cross-entropy
    is weighted by t . w (w_y without smoothing) and the weighted mean is taken. Without the
    context module the KL term is 0.
    """
    ce = -(target * F.log_softmax(logits.float(), 1)).sum(1)
    if class_weights is not None:
        w = target @ class_weights
        ce = (ce * w).sum() / w.sum()
    else:
        ce = ce.mean()
    if context_logits is None:
        return ce, ce, torch.zeros_like(ce)
    kl = (torch.xlogy(target, target) - target * F.log_softmax(context_logits.float(), 1)).sum(1).mean()
    return ce + context_weight * kl, ce, kl


def inverse_frequency_weights(cfg, train_y, num_classes):
    """--class_weights: inverse class frequency of the training split (a mean of 1 over its samples where every class
    has some; hybrid_loss divides by the batch's sum of weights, so only their ratios count); else None."""
    if not cfg.class_weights:
        return None
    counts = torch.bincount(train_y, minlength=num_classes).float().clamp(min=1)  # an absent class: as if once
    return len(train_y) / (num_classes * counts)


# ---------------------------------------------------------------------------------------------
# Inference: the one forward pass that validation, evaluation and predict.py share; what the network looks at
# (spatial-attention gates, Grad-CAM); the metrics
# ---------------------------------------------------------------------------------------------

def standardize(x_uint8, mean, std):
    """uint8 (or 0-255 float) images -> the network's input: the dataset's per-channel normalization."""
    return (x_uint8.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


TTA_SHIFTS = ((1, 0), (-1, 0), (0, 1), (0, -1))  # --tta_shift's moves (x, y), in units of its pixels


def zoom_margin(size, zoom):
    """--tta_zoom's crop: the pixels cut from each side of a size-pixel image, so that the crop stays centred."""
    return round(size * (1 - zoom) / 2)


def tta_views(x, flip, shift, zoom):
    """The views of a batch that evaluation averages: the images; with zoom, also their central crops of zoom times
    the side, enlarged back (bilinear); with shift, each of these also moved shift pixels left, right, up and down
    (the edge pixels repeated into the gap); with flip, each of these mirrored too."""
    size, views = x.shape[-1], [x]
    if zoom:
        cut = zoom_margin(size, zoom)
        views.append(F.interpolate(x[..., cut:size - cut, cut:size - cut], size=(size, size), mode="bilinear",
                                   align_corners=False))
    if shift:
        padded = [F.pad(v, (shift, shift, shift, shift), mode="replicate") for v in views]
        views += [p[..., shift * (1 + dy):shift * (1 + dy) + size, shift * (1 + dx):shift * (1 + dx) + size]
                  for p in padded for dx, dy in TTA_SHIFTS]
    return views + [v.flip(3) for v in views] if flip else views


def tta_view_count(cfg):
    """The views tta_views makes of each face under cfg."""
    return (2 if cfg.tta_flip else 1) * (2 if cfg.tta_zoom else 1) * (1 + len(TTA_SHIFTS) if cfg.tta_shift else 1)


TTA_IMAGES_PER_CALL = 64  # a few faces' test-time views go through the model together, up to this many images a
# call: one face's twenty views 7-10x faster than a call each where bf16 is native (4-6x in float32); 64 faces'
# twenty at once were 2.2-3.1x slower than a view a call (BENCHMARKS.md, "Test-time views stacked")


def mean_over_views(model, views, channels_last=False, per_call=None):
    """The model's outputs (logits, context logits, features) for each view, averaged in float32; None for what the
    model does not give (view_outputs calls it). per_call: the views that go through the model together; None: as
    many of a small batch's as make TTA_IMAGES_PER_CALL images, a view a call for a large batch; an ONNX graph, whose
    batch is not known when it is traced, gives len(views): every view in one call (in onnxruntime 1.7-1.8x faster
    at one face, 0.91x at 64: BENCHMARKS.md)."""
    # given per_call, the batch's size is never read: reading it would fix the batch of a graph being traced
    per_call = per_call or max(1, TTA_IMAGES_PER_CALL // max(1, len(views[0])))
    sums = None
    for i in range(0, len(views), per_call):
        group = views[i:i + per_call]
        x = torch.cat(group) if len(group) > 1 else group[0]
        outs = model(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
        part = [None if t is None else t.float().reshape(len(group), -1, *t.shape[1:]).sum(0) for t in outs]
        sums = part if sums is None else [None if a is None else a + b for a, b in zip(sums, part)]
    return tuple(None if t is None else t / len(views) for t in sums)


def view_outputs(model, images, mean, std, cfg, tta=True, per_call=None):
    """The outputs (logits, context logits, features; mean_over_views) of one batch of 0-255 images (N, 3, S, S) on
    their device, each averaged over cfg's test-time views (tta_views; tta=False: the image alone), with cfg's
    autocast and layout: what evaluation, prediction (both by run_inference) and an exported model compute."""
    x = standardize(images, mean, std)
    views = tta_views(x, cfg.tta_flip, cfg.tta_shift, cfg.tta_zoom) if tta else [x]
    amp_dtype = autocast_dtype(cfg, images.device)
    with torch.autocast(images.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
        return mean_over_views(model, views, cfg.channels_last, per_call)


@torch.inference_mode()
def run_inference(model, images, mean, std, device, cfg, tta=True):
    """Logits, context logits and features of a uint8 (N, 3, S, S) array, in large batches (view_outputs); None for
    what the model does not give (context logits without the context module)."""
    model.eval()
    outs = defaultdict(list)
    for i in range(0, len(images), cfg.eval_batch_size):
        x = torch.from_numpy(np.asarray(images[i:i + cfg.eval_batch_size])).to(device)
        logits, s, f = view_outputs(model, x, mean, std, cfg, tta)
        for name, t in (("logits", logits), ("context_logits", s), ("features", f)):
            if t is not None:
                outs[name].append(t.cpu())
    return {name: torch.cat(outs[name]) if outs[name] else None for name in ("logits", "context_logits", "features")}


EXPLAIN_BATCH = 64  # faces per forward and backward pass: the backward keeps every activation of the batch


def explain_faces(model, images, mean, std, device, target=None):
    """Per uint8 crop (N, 3, S, S), in float32 without TTA: "gates", each stage's spatial-attention gate
    upsampled to S x S, (N, stages, S, S), or None without spatial attention; "gradcam", Grad-CAM (Selvaraju et
    al., ICCV 2017) of the target class (default: the predicted one) on the last stage's output, (N, S, S),
    scaled by its maximum; both in [0, 1]. Also "probabilities" (N, K) and the context distribution "q"
    (N, K, or None without the context module). Evaluation mode: dropout off, BatchNorm's running statistics."""
    model.eval()
    size = images.shape[-1]
    gates, stage_out = [], []
    hooks = [m.bn.register_forward_hook(lambda module, inputs, out: gates.append(torch.sigmoid(out.float())))
             for m in model.modules() if isinstance(m, SpatialAttention)]
    hooks.append(model.stages[-1].register_forward_hook(lambda module, inputs, out: stage_out.append(out)))
    outs = defaultdict(list)
    try:
        for i in range(0, len(images), EXPLAIN_BATCH):
            gates.clear()
            stage_out.clear()
            x = standardize(torch.from_numpy(np.asarray(images[i:i + EXPLAIN_BATCH])).to(device), mean, std)
            with torch.enable_grad():
                logits, s, _ = model(x)
                t = logits.argmax(1) if target is None else torch.as_tensor(target[i:i + len(x)], device=device)
                [grad] = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), stage_out[0])
            a = stage_out[0].detach()
            cam = F.relu((grad.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True))  # Selvaraju et al.'s eq. 1-2
            cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
            outs["gradcam"].append((cam / cam.amax((2, 3), keepdim=True).clamp_min(1e-12))[:, 0].cpu())
            if gates:  # bilinear upsampling mixes values in [0, 1] convexly: they stay there
                outs["gates"].append(torch.cat([F.interpolate(g.detach(), size=size, mode="bilinear", align_corners=False)
                                                for g in gates], 1).cpu())
            outs["probabilities"].append(logits.detach().float().softmax(1).cpu())
            if s is not None:
                outs["q"].append(s.detach().float().softmax(1).cpu())
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(outs[k]).numpy() if outs[k] else None for k in ("gates", "gradcam", "probabilities", "q")}


def mean_q_by_class(q, labels, k):
    """(K, K): the mean context distribution q of each true class's faces (NaN for a class the split lacks)."""
    return np.stack([q[labels == i].mean(0) if (labels == i).any() else np.full(k, np.nan) for i in range(k)])


def macro_f1(y_true, y_pred):
    """Unweighted mean of the per-class F1 over the classes present in y_true or y_pred (scikit-learn's default set):
    a class that the split lacks and the model never predicts is left out of the mean, not counted as 0; one the model
    predicts but the split lacks counts 0."""
    from sklearn.metrics import f1_score
    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def evaluation_results(split, out, class_names, train_hashes=None):
    """Accuracy, macro-F1, per-class report keyed by class name, confusion matrix, and the accuracy without the
    faces whose image is also in the training split."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
    k = len(class_names)
    y, pred = split.labels, out["logits"].argmax(1).numpy()
    cm = confusion_matrix(y, pred, labels=np.arange(k))  # rows true, columns predicted; an absent class: a zero row
    p, r, f1, support = precision_recall_fscore_support(y, pred, labels=np.arange(k), zero_division=0)
    report = {name: {"precision": float(p[i]), "recall": float(r[i]), "f1-score": float(f1[i]), "support": int(support[i])}
              for i, name in enumerate(class_names)}  # every class; an absent one: support 0, the rest 0
    correct = pred == y
    results = {"accuracy": float(correct.mean()), "macro_f1": macro_f1(y, pred), "class_names": list(class_names),
               "classification_report": report, "confusion_matrix": cm.tolist(), "evaluated_samples": int(len(y))}
    if split.name == "test":  # the name says which split: never "test" for a validation figure
        results["test_accuracy"] = results["accuracy"]
    if train_hashes is not None:
        unseen = np.array([h not in train_hashes for h in split.hashes], dtype=bool)  # no copy in the training split
        results["accuracy_excluding_train_duplicates"] = float(correct[unseen].mean()) if unseen.any() else None
        results["samples_duplicating_train"] = int((~unseen).sum())
    return results


# ---------------------------------------------------------------------------------------------
# channels_last on the CPU: a probe of the run's own model in a child process
# ---------------------------------------------------------------------------------------------

# Only where this machine has shown it works. oneDNN picks its convolution kernels by the
# CPU's instruction set, the thread count, the dtype and each layer's shape, and some of them crash or hang in the
# NHWC layout (benchmarks/onednn_*_repro.py: an AVX2 hang at 2-7 input channels, an AVX-512 segfault at 8). No rule
# about channel counts covers CPUs nobody here has, so a child process runs the run's own model first.
PROBE_BATCH = 2  # faces in the probe's gradient comparison (eval mode; the AVX-512 crash happens at batch 1)
PROBE_STEPS = 20  # training steps in channels_last, each on a heap laid out anew: an overflow does not abort every
# time (AVX512_CORE_BF16's 1x1 backward, width 0.25, batch 8: 5 steps caught it in 8 of 10 probes, 20 on a shifted
# heap in 10 of 10); the first at the run's batch (kernels differ by batch), the rest at most PROBE_STEP_FACES
PROBE_STEP_FACES = 8
PROBE_START_TIMEOUT = 300  # seconds for the child to start and time its contiguous passes (imports, a loaded machine)
PROBE_HANG_FACTOR = 10  # the channels_last steps may take this many times their contiguous estimate (run_probe's minimum)
PROBE_SLACK = {None: 1e-3, torch.bfloat16: 2e-2}  # channels_last may miss the float64 gradients by twice what the
# contiguous layout misses, plus this (per autocast dtype; a wrong kernel misses by O(1))
PROBE_DEFINITE = ("SIGSEGV", "SIGABRT", "SIGBUS", "SIGILL", "SIGFPE")  # deaths that are the kernels', cached as such
WINDOWS_CRASHES = {0xC0000005: "SIGSEGV", 0xC000001D: "SIGILL", 0xC0000094: "SIGFPE", 0xC0000409: "SIGABRT",
                   3: "SIGABRT"}  # the exit codes Windows gives the same deaths (3: abort())


def probe_channels_last(model, image_size, batch, amp_dtype, threads, report):
    """The probe's work, in the child: the gradients of both layouts in eval mode (BatchNorm's running statistics:
    well conditioned at batch 2) against a float64 contiguous oracle, the contiguous ones first (their time is
    reported, to time the rest out), then PROBE_STEPS training steps' forward and backward passes in channels_last
    (the kernels that crashed), some at the run's batch. Returns the relative errors (channels_last, contiguous)."""
    torch.set_num_threads(threads)
    x = torch.randn(max(batch, PROBE_BATCH), 3, image_size, image_size, generator=torch.Generator().manual_seed(0))

    def gradients(fmt, dtype, amp, train, faces=PROBE_BATCH):
        net = copy.deepcopy(model).to(dtype).to(memory_format=fmt).train(train)
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            outputs = net(x[:faces].to(dtype).contiguous(memory_format=fmt))
        sum(t.float().square().mean() for t in outputs if t is not None).backward()
        return torch.cat([p.grad.double().flatten() for p in net.parameters() if p.grad is not None])

    truth = gradients(torch.contiguous_format, torch.float64, None, train=False)
    t0 = time.perf_counter()
    nchw = gradients(torch.contiguous_format, torch.float32, amp_dtype, train=False)
    faces = [batch] + [min(batch, PROBE_STEP_FACES)] * (PROBE_STEPS - 1)
    report((time.perf_counter() - t0) * sum(faces) / PROBE_BATCH)  # what the steps should take
    ballast = []  # the heap laid out anew before each step: an overflow then meets a chunk header sooner
    for step, n in enumerate(faces):
        ballast.append(torch.empty(4096 * (1 + 37 * step % 97), dtype=torch.uint8))
        gradients(torch.channels_last, torch.float32, amp_dtype, train=True, faces=n)
    nhwc = gradients(torch.channels_last, torch.float32, amp_dtype, train=False)
    return tuple(((g - truth).norm() / truth.norm()).item() for g in (nhwc, nchw))


def _probe_child(model_bytes, image_size, batch, amp_dtype, threads, conn):
    try:
        model = pickle.loads(model_bytes)
        errors = probe_channels_last(model, image_size, batch, amp_dtype, threads, lambda s: conn.send(("contiguous", s)))
        conn.send(("errors", errors))
    except Exception as e:  # a kernel that raises instead of crashing: a verdict too
        conn.send(("error", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))


SPAWN_LOCK = threading.Lock()  # callers_script_hidden: two threads may build predictors at once


@contextlib.contextmanager
def callers_script_hidden(model):
    """A spawned child runs the main script again (as __mp_main__) wherever it can find it. Where this file is
    imported (a user's script calling main() or EmotionPredictor at its top level, without a __main__ guard) the
    child needs this module alone: the caller's script is hidden from it while it starts, unless the model is built
    of the script's own classes (benchmarks/resnet18_baseline.py's network), which the child unpickles from it."""
    main = sys.modules.get("__main__")
    own = any(type(m).__module__ == "__main__" for m in model.modules())
    if __name__ == "__main__" or main is None or own:  # run as the script: the child finds _probe_child in it
        yield
        return
    with SPAWN_LOCK:
        saved = {k: getattr(main, k) for k in ("__file__", "__spec__") if hasattr(main, k)}
        main.__spec__ = None
        with contextlib.suppress(AttributeError):
            del main.__file__
        try:
            yield
        finally:
            for k, v in saved.items():
                setattr(main, k, v)


def run_probe(model, image_size, batch, amp_dtype, threads, min_timeout=30.0):
    """Run probe_channels_last in a spawned child; returns (safe, reason, definite): definite is False where the
    outcome may be the machine's rather than the kernels' (a child that could not start, was killed, or raised)."""
    import multiprocessing
    if multiprocessing.current_process().daemon:  # a Pool or DataLoader worker may start no process of its own
        return False, "no probe process can start inside a daemonic process (a Pool or DataLoader worker)", False
    ctx = multiprocessing.get_context("spawn")  # a fork would inherit this process's OpenMP and oneDNN state
    receive, send = ctx.Pipe(duplex=False)
    # the model as pickled bytes: a tensor handed to a child goes through /dev/shm, which Docker sizes 64 MB (the
    # default model's 105 MiB: the start failed with "unable to allocate shared memory")
    child = ctx.Process(target=_probe_child, args=(pickle.dumps(model), image_size, batch, amp_dtype, threads, send),
                        daemon=True)
    # The child starts with Ctrl-C ignored (exec keeps a signal ignored, and Python then sets no handler): the terminal
    # sends it to the whole process group, and the child's traceback would follow the parent's one line; the parent
    # handles it and kills the child. The parent ignores it too while it starts the child: 35 ms for the CPU preset's
    # model here. Only the main thread may set a handler (spawn resets a blocked signal: blocking would not do).
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None
    try:
        with callers_script_hidden(model):
            child.start()
    except OSError as e:  # no memory or process slot left for it: the contiguous layout, and nothing cached
        send.close()
        receive.close()
        return False, f"the probe process could not start ({e.strerror or e})", False
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)  # None: a handler set in C
    send.close()
    answer, timeout = None, PROBE_START_TIMEOUT
    try:
        while answer is None or answer[0] == "contiguous":
            if not receive.poll(timeout):
                answer = ("hung", f"no answer within {timeout:.0f} s")
                break
            answer = receive.recv()
            if answer[0] == "contiguous":
                timeout = max(min_timeout, PROBE_HANG_FACTOR * answer[1])
    except (EOFError, OSError):  # the child died before it answered (Windows' poll: BrokenPipeError)
        answer = None
    finally:
        receive.close()
        if child.is_alive():
            child.kill()
        child.join()
    if answer is None:
        code = child.exitcode
        name = (signal.Signals(-code).name if code is not None and code < 0 and -code in signal.valid_signals() else
                WINDOWS_CRASHES.get(code) if os.name == "nt" else None)
        return False, f"the probe process died ({name or f'exit {code}'})", name in PROBE_DEFINITE
    kind, value = answer
    if kind != "errors":
        return False, f"the probe {kind if kind == 'hung' else 'failed'}: {value}", kind == "hung"
    nhwc, nchw = value
    if not nhwc <= 2 * nchw + PROBE_SLACK[amp_dtype]:  # NaN fails too
        return False, f"its gradients miss float64's by {nhwc:.2g} (the contiguous layout's by {nchw:.2g})", True
    return True, f"gradients within {nhwc:.2g} of float64's (the contiguous layout's: {nchw:.2g})", True


def channels_last_checked(model, cfg, device, log_file=None, batch=None):
    """(cfg, verdict): cfg with channels_last kept only where a probe of this model (run_probe) passed on this
    machine, as cached under everything that picks the kernels (an outcome that may be the machine's, not the
    kernels', is not cached); verdict is None off the CPU or without channels_last. batch: the faces of this
    process's training steps (default cfg.batch_size)."""
    if not cfg.channels_last or device.type != "cpu":
        return cfg, None
    amp_dtype = autocast_dtype(cfg, device)
    key = {"cpu": cpu_model(), "flags": " ".join(sorted(cpu_flags())), "torch": torch.__version__,
           "isa": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),  # where there is no cpuinfo
           "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA"),
           "threads": torch.get_num_threads(), "dtype": str(amp_dtype), "image_size": cfg.image_size,
           "batch": batch or cfg.batch_size, "model": hashlib.sha256(repr(model).encode()).hexdigest()}
    path = user_cache_dir() / f"channels_last_{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]}.json"
    verdict = None
    with contextlib.suppress(OSError, ValueError, KeyError):
        cached = json.loads(path.read_text())
        if cached["key"] == key:
            verdict = {**cached["verdict"], "cached": str(path)}
    if verdict is None:
        log("channels_last: trying this model's kernels on this CPU in a child process (once; the verdict is kept "
            f"in {path.parent})", log_file)
        t0 = time.perf_counter()
        safe, reason, definite = run_probe(model, cfg.image_size, key["batch"], amp_dtype, key["threads"])
        verdict = {"channels_last": safe, "reason": reason, "seconds": round(time.perf_counter() - t0, 2)}
        if definite:
            with contextlib.suppress(OSError, UserError):  # an unwritable cache costs a probe next time, nothing else
                path.parent.mkdir(parents=True, exist_ok=True)
                write_json({"key": key, "verdict": verdict}, path)
        verdict["cached"] = None
    if not verdict["channels_last"]:
        log(f"channels_last off: {verdict['reason']} in the probe of this model on this CPU; computing in the "
            f"contiguous layout (slower, same results)", log_file)
    return dataclasses.replace(cfg, channels_last=verdict["channels_last"]), verdict


# ---------------------------------------------------------------------------------------------
# Checkpoints: one self-contained dict (weights, config, class names, normalization, metrics)
# ---------------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "ern-checkpoint-v1"
# EmotionPredictor's settings: those given, else the checkpoint's (predict.py's command line gives all but
# eval_batch_size; export.py takes the tta_* ones; --evaluate's, all of them)
INFERENCE_SETTINGS = ("amp", "channels_last", "tta_flip", "tta_shift", "tta_zoom", "eval_batch_size")


# what checkpoint_dict writes into every checkpoint: load_checkpoint refuses a file without one of them
CHECKPOINT_KEYS = ("model", "config", "class_names", "normalization", "image_size", "epoch", "metrics")


def checkpoint_dict(model, cfg, class_names, mean, std, epoch, metrics, **state):
    """One self-contained dict: enough to evaluate or predict without the dataset or this file's defaults."""
    return {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": dataclasses.asdict(cfg),
            "class_names": list(class_names), "normalization": {"mean": mean.tolist(), "std": std.tolist()},
            "image_size": cfg.image_size, "epoch": epoch, "metrics": metrics, **state}


def training_state(optimizer, scheduler, scaler, history, best, steps):
    """What --resume continues from beside the weights: the optimizer's, schedule's and GradScaler's states, the
    history, the best epoch so far, the random state, and steps: the optimizer steps taken (a fractional last pass
    took fewer than a pass's)."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "history": history, "best": best, "steps": steps, "rng": rng}


def checkpoint_in(path, name):
    """path, or the checkpoint `name` of the run folder that path names (best_emotion_model.pth, last.pth)."""
    path = user_path(path)
    try:
        if not path.is_dir():
            return str(path)
        try:
            (path / name).stat()  # not is_file(): Python 3.14's says False where the folder may not be entered
        except FileNotFoundError:
            held = sorted(p.name for p in path.iterdir() if p.suffix == ".pth")
            raise UserError(f"{path} is a folder without {name}; its checkpoints: "
                            f"{', '.join(held) or 'none'}") from None
    except OSError as e:  # a name too long, a folder this user may not enter
        raise UserError(f"cannot read the checkpoint {path}: {e.strerror or e}") from None
    return str(path / name)


def load_checkpoint(path):
    """A checkpoint dict, loaded with weights_only=True (a checkpoint can never run code)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    if path.suffix.lower() == ".onnx":
        raise UserError(f"{path} is an export, which runs in onnxruntime (README); give the .pth it was exported from")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:  # a file this user may not read (another's run on a shared machine)
        raise UserError(f"cannot read the checkpoint {path}: {e.strerror or e}") from None
    except Exception as e:  # torch raises several types for foreign or damaged files
        with open(path, "rb") as f:
            head = f.read(2)
        reason = ("not a file that torch.save wrote" if head not in (b"PK", b"\x80\x02") else  # zip; old pickle
                  "it holds Python objects, not only tensors and values (a model saved whole: torch.save(model)?)"
                  if "Weights only load failed" in str(e) else
                  "it is cut short or damaged (a copy or download that did not finish?)"
                  if "central directory" in str(e) else  # a zip without its end
                  f"{type(e).__name__}: {str(e).splitlines()[0].split('. ')[0][:200]}")  # torch's first sentence
        raise UserError(f"{path} is not a readable checkpoint: {reason}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not an ERN checkpoint (no '{CHECKPOINT_FORMAT}' format tag; a bare state_dict?)")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"{path} is an ERN checkpoint without its {', '.join(missing)}: edited, or written by other "
                        f"code")
    return ckpt


def checkpoint_normalization(ckpt, device):
    """The (mean, std) the checkpoint's model was trained with, as tensors on the device."""
    return tuple(torch.tensor(ckpt["normalization"][k], device=device) for k in ("mean", "std"))


# Options removed after they measured nothing (BENCHMARKS.md, "Removed options"), with the value that is now the only
# behaviour and the last commit that has them: a checkpoint trained with another value is refused (it is evaluated or
# resumed with that commit)
REMOVED = {"context_fusion": ("concat", "da10df0"), "prototype_init": ("random", "da10df0"),
           "context_target": ("label", "da10df0"), "affinity_weight": (0.0, "da10df0"),
           "logit_adjustment": (0.0, "da10df0"), "low_res": (0, "e43f7a9"),
           "mixup": (0.0, "bfdced2"), "cutmix": (0.0, "bfdced2"),
           "optimizer": ("adamw", "1bd07fe"), "ema_decay": (0.0, "8e63f05"),
           "attention_stages": ("", "27e2a2f")}
# Fields added later whose default is not what the code did before them: the value a checkpoint without the field
# was trained with (515d170: before it, attention gated x * g)
ADDED = {"attention_residual": False}


def config_from_checkpoint(ckpt):
    """The checkpoint's Config; fields this file does not know are ignored, unless they are removed options that the
    checkpoint used (then: one line naming them and the commit that still has them); fields it lacks are ADDED's,
    else today's defaults."""
    config = ckpt["config"]
    used = [(f"--{k}={config[k]}", commit) for k, (value, commit) in REMOVED.items() if k in config and config[k] != value]
    if used:  # REMOVED is in the order of removal: the first one's commit has every later one too
        raise UserError(f"the checkpoint was trained with {', '.join(u for u, _ in used)} (removed after commit "
                        f"{used[0][1]}): evaluate or resume it with that commit's emotion_recognition.py")
    known = {f.name for f in dataclasses.fields(Config)}
    return Config(**{**ADDED, **{k: v for k, v in config.items() if k in known}})


# The Config fields that shape the network's weights and how they are applied: a checkpoint's must be the run's
ARCHITECTURE = ("width", "blocks", "stem_stride", "channel_attention", "spatial_attention", "attention_reduction",
                "attention_residual", "context")


def refuse_other_classes(ckpt, class_names):
    """A checkpoint is used only on data of its classes, in its order (--evaluate's, a resume's)."""
    if list(class_names) != ckpt["class_names"]:
        raise UserError(f"checkpoint classes {ckpt['class_names']} differ from the dataset's {list(class_names)}")


def load_weights(model, ckpt):
    """The checkpoint's weights into the network its config describes; one line where they do not fit it."""
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # torch's message: a heading, then a tab-indented line per kind of mismatch
        lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()] or [str(e)]
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        raise UserError(f"checkpoint weights do not fit the architecture its config describes: {lines[0][:200]}"
                        f"{more}") from None


def model_from_checkpoint(ckpt, class_names=None):
    """Rebuild the network a checkpoint describes; refuse one whose classes differ from class_names (where given)."""
    if class_names is not None:
        refuse_other_classes(ckpt, class_names)
    cfg = config_from_checkpoint(ckpt)  # a key older files lack: ADDED's value, else its default
    model = build_model(cfg, len(ckpt["class_names"]))
    load_weights(model, ckpt)
    return model, cfg


def inference_config(ckpt, device, **settings):
    """The checkpoint's config as --evaluate, predict.py and export.py compute with it: the settings given (their
    INFERENCE_SETTINGS, --evaluate's EVALUATED_WITH; None: the checkpoint's) in place of its own, and the device
    given (a model trained with --device=cuda predicts on a laptop); validated (--tta_shift=-1 is refused)."""
    given = {k: v for k, v in settings.items() if v is not None}
    cfg = dataclasses.replace(config_from_checkpoint(ckpt), **given, device=str(device))
    validate_config(cfg)
    return cfg


def inference_model(ckpt, cfg, device, log_file=None, class_names=None):
    """The checkpoint's network ready for run_inference with cfg's inference settings: (model on the device, in
    channels_last where this machine's probe passed; cfg as it computes; the checkpoint's mean and std). Refused
    where its classes differ from class_names (--evaluate's data)."""
    model, _ = model_from_checkpoint(ckpt, class_names)
    cfg, _ = channels_last_checked(model, cfg, device, log_file)
    return place_model(model, cfg, device), cfg, *checkpoint_normalization(ckpt, device)


# ---------------------------------------------------------------------------------------------
# Run folder: claimed for one run at a time; what a run writes, and where it came from
# ---------------------------------------------------------------------------------------------

RUN_FILES = ("config.json", "provenance.json", "train.log", "metrics.jsonl", "data_report.json", "best_emotion_model.pth",
             "final_emotion_model.pth", "last.pth", "evaluation_results.json", "evaluation_predictions.csv",
             "training_history.png", "confusion_matrix.png", "context_similarities.png", "feature_space.png",
             "feature_space.csv", "attention_maps.png", "data_problems.txt")


def claim_folder(run_dir):
    """Hold an exclusive lock on run_dir/.lock for as long as the returned file is open (a context manager: `with` it
    to end the claim with the work): the operating system releases it when the process ends however it ends, so a
    killed run never blocks the next. Windows, which has no flock: a lock on the file's first byte, released alike."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    lock = open(run_dir / ".lock", "a")
    try:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            import msvcrt
            lock.seek(0)
            msvcrt.locking(lock.fileno(), msvcrt.LK_NBLCK, 1)
    except OSError as e:
        lock.close()
        held = ((errno.EAGAIN, errno.EWOULDBLOCK) if fcntl else
                (errno.EACCES, getattr(errno, "EDEADLOCK", errno.EDEADLK)))
        if e.errno in held:
            raise UserError(f"{run_dir} is in use by another run that is still running; wait for it to end, or choose "
                            f"another --output_dir") from None
        return contextlib.nullcontext()  # a filesystem without locks (NFS without lockd, Lustre without -o flock)
    return lock


def unique_folder(base):
    """base, else base__2, base__3, ...: the first that this call creates (mkdir is exclusive: two runs started in the
    same second, whose default folders share a name, get two)."""
    for n in range(1, 1000):
        folder = base if n == 1 else base.with_name(f"{base.name}__{n}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
        except OSError as e:
            raise UserError(f"cannot create the folder {folder}: {e.strerror}; choose a writable --output_dir") from None
    raise UserError(f"{base} and 998 folders named after it exist; choose an --output_dir")


def make_run_dir(cfg, resuming=False):
    """The run's folder, created and claimed (claim_folder) before anything is written: (folder, lock). A default
    folder is outputs/{run_name}__{seed}__{time}, with __2, __3, ... where a run started in the same second has it.
    A folder that holds a run takes --overwrite=true (its files removed) or a resume; one that holds what a refused
    run left has its train.log emptied and its data_problems.txt removed."""
    if cfg.output_dir:
        run_dir = user_path(cfg.output_dir)
        try:
            if run_dir.exists() and not run_dir.is_dir():
                raise UserError(f"--output_dir={run_dir} is a file, not a folder; choose another --output_dir")
        except OSError as e:  # a name too long, a folder this user may not enter
            raise UserError(f"cannot write in --output_dir={run_dir}: {e.strerror or e}") from None
    else:
        run_dir = unique_folder(Path("outputs") / f"{cfg.run_name}__{cfg.seed}__{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = claim_folder(run_dir)
    except OSError as e:
        raise UserError(f"cannot write in the run folder {run_dir}: {e.strerror}; choose a writable --output_dir") from None
    held = [n for n in ("evaluation_results.json", "last.pth", "best_emotion_model.pth", "final_emotion_model.pth")
            if (run_dir / n).exists()]
    if held and not (resuming or cfg.overwrite):
        with lock:  # given back
            raise UserError(f"{run_dir} already holds a run ({', '.join(held)}); choose another --output_dir, "
                            f"--resume={os.path.abspath(run_dir / 'last.pth')}, or --overwrite=true")
    if cfg.overwrite and not resuming:  # one folder, one run: nothing of the old one may stay
        for n in RUN_FILES:
            try:
                (run_dir / n).unlink(missing_ok=True)
            except OSError as e:  # open in another program (Windows), a folder of that name
                with lock:
                    raise UserError(f"cannot remove the earlier run's {run_dir / n}: {e.strerror or e}") from None
    elif not resuming:  # what a refused run left (the folder holds no run) is not this run's: its log starts afresh
        try:
            (run_dir / "data_problems.txt").unlink(missing_ok=True)
        except OSError as e:
            with lock:
                raise UserError(f"cannot remove the refused run's {run_dir / 'data_problems.txt'}: "
                                f"{e.strerror or e}") from None
        if (run_dir / "train.log").is_file():
            with contextlib.suppress(OSError):  # an unwritable log is said at the first line written
                open(run_dir / "train.log", "w").close()
    return run_dir, lock


def script_command(*args):
    """This script's command line with args, as this interpreter runs it (a virtual environment's python)."""
    words = [sys.executable, str(Path(__file__).resolve()), *args]
    return subprocess.list2cmdline(words) if os.name == "nt" else shlex.join(words)  # Windows' C runtime quoting


def provenance(argv, device, data_dir, data_report):
    """What repeating a run needs beyond its config: the command, the software, the machine, the code's version
    and the dataset's fingerprint."""
    script = Path(__file__).resolve()

    def git(*args):  # None outside a git checkout, or without git
        try:
            done = subprocess.run(["git", "-C", str(script.parent), *args, "--", script.name], capture_output=True,
                                  encoding="utf-8", errors="replace", timeout=10)  # git's, whatever the locale
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("log", "-1", "--format=%H")
    return {
        "time": time.strftime("%Y-%m-%d %H:%M:%S %z"), "cwd": os.getcwd(),
        "command": script_command(*argv),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                     "opencv": cv2.__version__, "cuda": torch.version.cuda,
                     "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None},
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": cpu_model(), "cpu_bf16_native": cpu_has_bf16(), "threads": torch.get_num_threads(),
        "script_sha256": hashlib.sha256(script.read_bytes()).hexdigest(),
        "git_commit": commit or None,  # the last commit that changed the script
        "git_uncommitted_changes": bool(git("status", "--porcelain")) if commit else None,
        "data_dir": str(Path(data_dir).resolve()),
        "dataset": {name: {"images": r["images"], "samples": r["samples"], "file_list_sha256": r["file_list_sha256"]}
                    for name, r in data_report["splits"].items()},
    }


def record_start(run_dir, resuming, log_file, entry):
    """Append this start's provenance entry to the run's provenance.json (a resume's to the earlier starts)."""
    starts = []
    if resuming and (run_dir / "provenance.json").exists():
        try:
            starts = json.loads((run_dir / "provenance.json").read_text())
            if not isinstance(starts, list):
                raise ValueError(f"a list was expected, not {type(starts).__name__}")
        except (OSError, ValueError) as e:  # cut short or edited by hand: the checkpoint, not this record, resumes
            starts = []
            log(f"note: {run_dir / 'provenance.json'} is unreadable ({e}); it starts again with this resume", log_file)
    write_json(starts + [entry], run_dir / "provenance.json")


# ---------------------------------------------------------------------------------------------
# Distributed: under torchrun every process (rank) trains on its share of each global batch, DDP averages
# the gradients, and rank 0 alone logs and writes
# ---------------------------------------------------------------------------------------------

def init_distributed(cfg):
    """Join torchrun's process group when it launched several processes (WORLD_SIZE > 1): NCCL on CUDA, gloo on
    the CPU, every collective failing after cfg.dist_timeout minutes. Returns this process's device."""
    device = resolve_device(cfg.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(minutes=cfg.dist_timeout))
    return device


@contextlib.contextmanager
def local_rank_zero_first():
    """Each machine's first process (LOCAL_RANK 0) runs the block first (and builds the decode cache in its
    --cache_dir); the other processes wait, then run it (and read that cache)."""
    first, world = int(os.environ.get("LOCAL_RANK", "0")) == 0, rank_and_world()[1]
    if world > 1 and not first:
        torch.distributed.barrier()
    yield
    if world > 1 and first:
        torch.distributed.barrier()


def from_rank_zero(obj):
    """Rank 0's obj, on every rank (a run folder named by the time, a time-budget plan)."""
    if rank_and_world()[1] == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def same_as_rank_zero(module):
    """Rank 0's parameters and buffers in every rank's copy of the module: the initialization (each rank draws its
    own from seed + rank), and the BatchNorm statistics, which each rank updates from its own share."""
    if rank_and_world()[1] > 1:
        for t in module.state_dict().values():
            torch.distributed.broadcast(t, 0)


class AllReduceSum(torch.autograd.Function):
    """The sum over the ranks, with the gradient summed over the ranks in turn (each rank's loss depends on every
    share through it)."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        torch.distributed.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """--sync_bn: in training, the statistics of the global batch (the sum and sum of squares of every rank's share,
    all-reduced with gradients flowing back to each share), as one process with the whole batch computes them; in
    evaluation, or in one process, BatchNorm2d itself. torch's SyncBatchNorm runs on GPUs only; this one runs on gloo
    too. The same parameters and buffers as BatchNorm2d: checkpoints do not know the difference."""

    def forward(self, x):
        if not (self.training and rank_and_world()[1] > 1):
            return super().forward(x)
        c, xf = x.shape[1], x.float()
        count = torch.full((1,), xf.numel() / c, device=x.device)
        stats = AllReduceSum.apply(torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count]))
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp(min=0)  # E[x^2] - E[x]^2 may round below 0
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)  # the unbiased variance, as BatchNorm2d keeps
        shape = (1, c, 1, 1)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps) * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def global_batch_norm(model):
    """Every BatchNorm2d of model as a GlobalBatchNorm2d (same parameters and buffers), in place."""
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = GlobalBatchNorm2d
    return model


def run_inference_sharded(model, images, mean, std, device, cfg, tta=True):
    """run_inference over all of images, each rank its contiguous share, gathered in order on every rank: the
    outputs one process gives (BatchNorm in evaluation treats every face alone), to rounding (a rank's last batch may
    stack its views where one process's does not: mean_over_views)."""
    rank, world = rank_and_world()
    if world == 1:
        return run_inference(model, images, mean, std, device, cfg, tta)
    bounds = np.linspace(0, len(images), world + 1).astype(int)
    part = run_inference(model, images[bounds[rank]:bounds[rank + 1]], mean, std, device, cfg, tta)
    parts = [None] * world
    torch.distributed.all_gather_object(parts, part)
    return {name: None if all(p[name] is None for p in parts) else torch.cat([p[name] for p in parts if p[name] is not None])
            for name in part}  # a rank with no faces (a split smaller than the world) gives None


def agree_on_layout(cfg, log_file):
    """One memory layout in every process (machines may differ): channels_last if every machine's probe passed."""
    every = torch.tensor([int(cfg.channels_last)])
    torch.distributed.all_reduce(every, torch.distributed.ReduceOp.MIN)
    if cfg.channels_last and not every.item():
        log("channels_last off: another machine's probe failed", log_file)
    return dataclasses.replace(cfg, channels_last=bool(every.item()))


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def make_optimizer(model, cfg):
    """AdamW; no weight decay on biases and norms (1-d) nor on the prototypes: the similarities s use only their
    directions, while the expected prototype c, which the classifier reads, has their length (decay would shrink it;
    not measured against decaying them)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith("prototypes") else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.999))


WARMUP_START = 0.01  # the warm-up's first learning rate, fraction of lr


def make_scheduler(optimizer, cfg, steps_per_epoch):
    """Per step: linear warm-up from 1 % of lr, then cosine annealing to min_lr_ratio * lr."""
    total = total_steps(cfg, steps_per_epoch)
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total // 2)  # short runs still anneal

    def factor(step):
        if step < warmup:
            return WARMUP_START + (1 - WARMUP_START) * step / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def relaid_schedule(scheduler, optimizer, cfg, steps_per_epoch):
    """The schedule of make_scheduler laid out for cfg.epochs, at the step `scheduler` has reached (--time_budget's
    re-plan); the optimizer keeps its learning rate until the next step."""
    lrs = [g["lr"] for g in optimizer.param_groups]
    relaid = make_scheduler(optimizer, cfg, steps_per_epoch)
    relaid.load_state_dict(scheduler.state_dict())  # the step count; the lambda stays the new one
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    return relaid


def optimization_parts(model, cfg, device, steps_per_epoch):
    """What trains a model besides the data: optimizer, schedule and GradScaler (enabled for fp16 only)."""
    optimizer = make_optimizer(model, cfg)
    return (optimizer, make_scheduler(optimizer, cfg, steps_per_epoch),
            torch.amp.GradScaler(device.type, enabled=autocast_dtype(cfg, device) == torch.float16))


class NonFiniteLoss(Exception):
    pass


def epoch_steps(n, cfg):
    """Optimizer steps in one pass over n training faces: full batches only (BatchNorm dislikes a tiny last one)."""
    return n // min(cfg.batch_size, n)


def total_steps(cfg, steps_per_epoch):
    """Optimizer steps of the whole run: cfg.epochs passes, the last one possibly a fraction (at least one step)."""
    return max(1, round(cfg.epochs * steps_per_epoch))


def epochs_run(cfg, steps_per_epoch, epoch=0, done=0):
    """The number of the run's last pass, given `epoch` passes that took `done` steps: the steps left fill whole
    passes, the last one cut short where cfg.epochs has a fraction (so a run resumed after such a pass, to train on,
    makes one pass more than its epochs)."""
    return epoch + -(-(total_steps(cfg, steps_per_epoch) - done) // steps_per_epoch)


def epoch_seed(cfg, epoch):
    """The seed of an epoch's permutation (and, per rank, of its augmentation): from the run's seed and the epoch alone,
    so that a resume continues it."""
    return cfg.seed * 1_000_003 + epoch


def train_one_epoch(model, images, labels, mean, std, optimizer, scheduler, scaler, cfg, epoch, *, num_classes,
                    class_weights=None, max_steps=None):
    """One pass over a fresh permutation of the on-device training set; returns mean loss terms and accuracy.

    Index slices of the permutation are the batches (no DataLoader); losses accumulate on the
    device and are read only at log points, which is also where a non-finite loss is caught.
    A step that fp16's GradScaler skips (gradients overflowed) does not move the schedule.
    max_steps: fewer steps than a full pass (the last epoch of a fractional --epochs).
    """
    model.train()
    dev = images.device
    rank, world = rank_and_world()
    batch = min(cfg.batch_size, images.shape[0])
    share = batch // world  # this rank's part of each global batch
    steps = min(epoch_steps(images.shape[0], cfg), max_steps or math.inf)
    # one permutation per epoch, the same on every rank (from the seed), whatever the number of ranks
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(epoch_seed(cfg, epoch))).to(dev)
    sums = torch.zeros(4, device=dev)  # loss, ce, kl, correct
    first_bad = torch.full((), -1, device=dev, dtype=torch.long)
    amp_dtype = autocast_dtype(cfg, dev)
    log_every = max(1, steps // 10)
    bar = tqdm(range(steps), desc=f"epoch {epoch}", leave=False, disable=None if rank == 0 else True, dynamic_ncols=True)
    for step in bar:
        idx = perm[step * batch + rank * share:step * batch + (rank + 1) * share]
        y = labels[idx]
        x = augment_batch(images.index_select(0, idx), mean, std, cfg)  # whole rows: 30x faster than images[idx] on the CPU
        target = smooth_targets(y, num_classes, cfg.label_smoothing)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits, context_logits, _ = model(x)
        loss, ce, kl = hybrid_loss(logits, context_logits, target, cfg.context_weight, class_weights)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scale = scaler.get_scale() if scaler.is_enabled() else None  # fp16 only, which syncs in scaler.step anyway
        scaler.step(optimizer)
        scaler.update()
        if scale is None or scaler.get_scale() >= scale:  # the scaler lowers its scale exactly when it skipped the step
            scheduler.step()
        with torch.no_grad():
            terms = torch.stack([loss, ce, kl]).detach()
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(terms).all(), step, first_bad)
            right = logits.argmax(1) == y
            sums += torch.cat([terms * len(idx), right.sum().view(1)])
        if (step + 1) % log_every == 0 or step == steps - 1:  # the loop's only host syncs (but fp16's GradScaler)
            if world > 1:  # every rank stops together
                torch.distributed.all_reduce(first_bad, torch.distributed.ReduceOp.MAX)
            if first_bad.item() >= 0:
                raise NonFiniteLoss(f"non-finite loss at epoch {epoch}, step {first_bad.item() + 1} of {steps}")
            seen = (step + 1) * share
            bar.set_postfix(loss=f"{sums[0].item() / seen:.3f}", acc=f"{sums[3].item() / seen:.3f}")
    loss, ce, kl, correct = ((AllReduceSum.apply(sums) if world > 1 else sums) / (steps * share * world)).tolist()
    return {"train_loss": loss, "train_ce": ce, "train_kl": kl, "train_accuracy": correct}


def epoch_validation(val, cfg):
    """The split and the TTA of the per-epoch validation: all of val with cfg's test-time views, or --val_faces of it (a
    fixed random sample, the same in every epoch and after a resume; all of a split that small) without: a fifth of
    a short CPU epoch saved."""
    if not cfg.val_faces:
        return val, True
    if cfg.val_faces >= len(val):
        return val, False
    keep = np.zeros(len(val), bool)
    keep[np.random.default_rng(cfg.seed).permutation(len(val))[:cfg.val_faces]] = True
    return val.subset(keep), False


def validation_metrics(model, val, mean, std, device, cfg, num_classes, tta=True):
    """The per-epoch validation: loss (the hybrid loss on smoothed targets), accuracy and macro-F1 of the split."""
    out = run_inference_sharded(model, val.images, mean, std, device, cfg, tta)
    target = smooth_targets(torch.from_numpy(val.labels), num_classes, cfg.label_smoothing)
    loss = hybrid_loss(out["logits"], out["context_logits"], target, cfg.context_weight)[0].item()
    pred = out["logits"].argmax(1).numpy()
    return {"val_loss": loss, "val_accuracy": float((pred == val.labels).mean()), "val_macro_f1": macro_f1(val.labels, pred)}


# --time_budget: what it measures, and the share of the budget it keeps free. The budget runs from the process's
# start to the last file written; only decoding a dataset into the cache the first time is outside it.
BUDGET_TIMED_STEPS = 3  # training steps timed, after one warm-up step (which also pays torch.compile's compilation)
BUDGET_VAL_FACES = 1024  # validation faces timed; the pass is scaled to the split's size
BUDGET_MARGIN = 0.03  # of the budget, kept free for the machine's drift (epochs are re-planned as they are timed)
BUDGET_FIGURES_SECONDS = 4.0  # the figures but t-SNE (matplotlib's import, five PNGs): 3 s on a 2-core CPU
TSNE_SECONDS_PER_POINT = 0.006  # sklearn's t-SNE: 3.8 ms a point measured at 2,000 points on a 2-core AVX-512 CPU,
# and room for slower ones


def process_start_time():
    """time.time() when this process started (Linux: /proc), so that the budget includes the imports; elsewhere, or
    where the answer is implausible (a container's clocks), when this file began importing torch and the rest."""
    now = time.time()
    with contextlib.suppress(OSError, ValueError, IndexError, AttributeError):
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22: since boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        if 0 <= age < 600:
            return now - age
    return IMPORTING_SINCE


def final_seconds(eval_faces, face_s, step_s, batch, cfg, tta):
    """The final evaluation's time: a pass over eval_faces faces with cfg's test-time views (face_s: a face's seconds
    in the per-epoch validation, with those views or one, as tta says), the attention maps (a forward and a backward
    pass per face, about a training step's cost per batch), t-SNE and the figures."""
    attention_s = min(cfg.attention_samples, eval_faces) / batch * step_s
    tsne_s = min(cfg.tsne_samples, eval_faces) * TSNE_SECONDS_PER_POINT
    views = 1 if tta else tta_view_count(cfg)
    return eval_faces * face_s * views + attention_s + tsne_s + BUDGET_FIGURES_SECONDS


MIN_LAST_EPOCH = 0.1  # the shortest fraction of an epoch worth its validation pass
REPLAN_MORE = 0.25  # epochs a re-plan must add before the schedule is re-laid for them


def epochs_before(deadline, now, epoch_s, final_s, margin_s, max_epochs, done=0, val_s=0.0, steps=1):
    """The epochs a run that has trained `done` should end with: as many more of epoch_s seconds (val_s of them its
    validation) as end, with the final evaluation and the margin, by the deadline, the last one a fraction in whole
    steps of the epoch's `steps` where a whole one does not fit (at most max_epochs in all; never fewer than done)."""
    left = deadline - now - final_s - margin_s
    more = max(0, math.floor(left / epoch_s))
    part = math.floor(max(0.0, left - more * epoch_s - val_s) / max(epoch_s - val_s, 1e-9) * steps) / steps
    return max(done, min(max_epochs, done + more + (part if part >= MIN_LAST_EPOCH else 0)))


def plan_epochs(model, train_x, train_y, val, eval_faces, mean, std, cfg, device, num_classes, deadline, clock=time.time,
                tta=True):
    """--time_budget: time a warm-up and BUDGET_TIMED_STEPS training steps (on a copy of the model, with the random
    state put back afterwards: measuring draws none of the run's random numbers) and a pass of the per-epoch
    validation (val, with cfg's test-time views or none, as tta says; epoch_validation), then
    return the plan: the number of epochs (at most cfg.epochs, the last possibly a fraction; 0 if not even a tenth of
    one fits) whose training and per-epoch validation, followed by the final evaluation of eval_faces faces, end by
    the deadline (a clock() time)."""
    t_start = clock()
    batch, spe = min(cfg.batch_size, len(train_y)), epoch_steps(len(train_y), cfg)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        trial = copy.deepcopy(model)
        optimizer, scheduler, scaler = optimization_parts(trial, cfg, device, spe)
        compiled = torch.compile(trial) if cfg.compile else trial
        weights = inverse_frequency_weights(cfg, train_y, num_classes)
        seconds, steps = [], []
        for n in (1, BUDGET_TIMED_STEPS):
            idx = torch.randperm(len(train_y), device=device)[:n * batch]
            t0 = clock()
            try:
                train_one_epoch(compiled, train_x[idx], train_y[idx], mean, std, optimizer, scheduler, scaler, cfg, 0,
                                num_classes=num_classes, class_weights=weights)
            except NonFiniteLoss as e:
                raise UserError(f"{e} while timing the steps that plan --time_budget: the run would diverge from its "
                                f"first steps; a lower --lr, or --amp=false") from None
            seconds.append(clock() - t0)
            steps.append(epoch_steps(len(idx), cfg))  # fewer than n where the training set is that small
        faces = min(BUDGET_VAL_FACES, len(val))
        t0 = clock()
        run_inference(trial, val.images[:faces], mean, std, device, cfg, tta)
        face_s = (clock() - t0) / faces
    step_s, val_s = seconds[1] / steps[1], len(val) * face_s
    epoch_s = spe * step_s + val_s
    final_s = final_seconds(eval_faces, face_s, step_s, batch, cfg, tta)
    budget_s = cfg.time_budget * 60
    first_s = epoch_s + max(0.0, seconds[0] - step_s)  # the first epoch pays the warm-up again (compilation)
    now = clock()
    epochs = epochs_before(deadline, now + first_s - epoch_s, epoch_s, final_s, BUDGET_MARGIN * budget_s, cfg.epochs,
                           val_s=val_s, steps=spe)
    spent_s = budget_s - (deadline - now)  # of the budget, before training
    whole, part = divmod(epochs, 1)
    training_s = first_s - epoch_s + whole * epoch_s + (part * (epoch_s - val_s) + val_s if part else 0)
    return {"budget_minutes": cfg.time_budget, "max_epochs": cfg.epochs, "epochs": epochs, "step_seconds": step_s,
            "first_step_seconds": seconds[0], "epoch_seconds": epoch_s, "first_epoch_seconds": first_s,
            "final_evaluation_seconds": final_s, "measuring_seconds": now - t_start, "spent_seconds": spent_s,
            "validation_seconds": val_s, "deadline": deadline, "eval_faces": eval_faces, "batch": batch,
            "expected_minutes": (spent_s + training_s + final_s) / 60}


def apply_plan(cfg, plan, log_file=None):
    """cfg with the epochs that plan_epochs fitted, said in the log; a budget too short for a tenth of an epoch
    (MIN_LAST_EPOCH) is refused, naming one that fits a whole epoch."""
    if not plan["epochs"]:
        need = (plan["spent_seconds"] + plan["first_epoch_seconds"] + plan["final_evaluation_seconds"]) \
            / (1 - BUDGET_MARGIN) / 60
        raise UserError(f"--time_budget={cfg.time_budget:g} min cannot be kept: starting and measuring took "
                        f"{plan['spent_seconds']:.0f} s, one epoch takes "
                        f"{plan['epoch_seconds']:.0f} s and the final evaluation {plan['final_evaluation_seconds']:.0f} s; "
                        f"give at least --time_budget={math.ceil(need * 10) / 10:g}, or --time_budget=0 and --epochs")
    log(f"time budget {cfg.time_budget:g} min: a training step {plan['step_seconds']:.2f} s, an epoch with its "
        f"validation {plan['epoch_seconds']:.0f} s, the final evaluation about {plan['final_evaluation_seconds']:.0f} s, "
        f"{plan['spent_seconds']:.0f} s spent before training -> {plan['epochs']:.4g} of at "
        f"most {plan['max_epochs']:g} epochs (expected {plan['expected_minutes']:.1f} min)", log_file)
    return dataclasses.replace(cfg, epochs=plan["epochs"])


def replan(plan, walls, val_walls, epoch, cfg, steps_per_epoch, val_faces, tta, log_file):
    """cfg with the epochs that end by the plan's deadline, re-planned from the medians of the last three epochs and
    validations as timed (the first pays the warm-up again; rank 0's under torchrun), and the plan's final-evaluation
    estimate updated from them (each rank validated its share of val_faces); or None where the epochs stay: fewer
    whenever needed; more by REPLAN_MORE or more while a pass is left (a small step of the cosine: adding half an
    epoch to 16 moves its position by 3 %)."""
    epoch_s, val_s = statistics.median(walls[1:][-3:]), statistics.median(val_walls[1:][-3:])
    plan["final_evaluation_seconds"] = final_seconds(plan["eval_faces"], val_s * rank_and_world()[1] / val_faces,
                                                     (epoch_s - val_s) / steps_per_epoch, plan["batch"], cfg, tta)
    epochs = from_rank_zero(epochs_before(plan["deadline"], time.time(), epoch_s, plan["final_evaluation_seconds"],
                                          BUDGET_MARGIN * cfg.time_budget * 60, plan["max_epochs"], epoch, val_s,
                                          steps_per_epoch))
    if not (epochs < cfg.epochs - 1 / steps_per_epoch or (epochs >= cfg.epochs + REPLAN_MORE and
                                                         epoch < epochs_run(cfg, steps_per_epoch))):
        return None
    log(f"time budget: {epochs:.4g} epochs in all, re-planned from {epoch_s:.1f} s an epoch and "
        f"{plan['final_evaluation_seconds']:.0f} s for the final evaluation", log_file)
    return dataclasses.replace(cfg, epochs=epochs)


def epoch_line(epoch, epochs, stats, improved):
    """An epoch's line of the log: the losses, accuracies, learning rate and seconds; * where it is the best yet."""
    return (f"epoch {epoch:3d}/{epochs} | train loss {stats['train_loss']:.4f} (ce {stats['train_ce']:.4f} "
            f"kl {stats['train_kl']:.4f}) acc {stats['train_accuracy']:6.2%} | val loss {stats['val_loss']:.4f} "
            f"acc {stats['val_accuracy']:6.2%} f1 {stats['val_macro_f1']:.4f} | lr {stats['lr']:.2e} | "
            f"{stats['epoch_seconds']:6.1f}s{' *' if improved else ''}")


def restore_training_state(resume, optimizer, scheduler, scaler):
    """Load a last.pth's optimizer, schedule, GradScaler and random state (its weights: train_in_folder, before the
    run's folder changes); returns (history, best, first epoch)."""
    optimizer.load_state_dict(resume["optimizer"])
    scheduler.load_state_dict(resume["scheduler"])
    if resume["scaler"]:  # empty when saved without fp16 (another GPU, or the CPU): a fresh scaler then
        scaler.load_state_dict(resume["scaler"])
    if rank_and_world()[0] == 0:  # the random state saved is rank 0's; the other ranks keep their own seeds
        torch.set_rng_state(resume["rng"]["torch"])
        if "cuda" in resume["rng"] and torch.cuda.is_available():  # saved per visible GPU: as many as are here now
            torch.cuda.set_rng_state_all(resume["rng"]["cuda"][:torch.cuda.device_count()])
    return resume["history"], resume["best"], resume["epoch"] + 1


def steps_taken(resume, steps_per_epoch):
    """The optimizer steps a last.pth has taken; one from before they were saved took whole passes, the last one as
    its config cut it."""
    if resume.get("steps") is not None:
        return resume["steps"]
    return min(resume["epoch"] * steps_per_epoch, total_steps(config_from_checkpoint(resume), steps_per_epoch))


def train(model, train_x, train_y, val, class_names, mean, std, cfg, run_dir, device, log_file, resume, plan, tta):
    """The training loop on the on-device training set: per-epoch validation of val (cfg's test-time views or none,
    as tta says; epoch_validation), best and last checkpoints, metrics.jsonl, Ctrl-C safety. With a time-budget
    plan, the number of epochs is re-planned after each one from its measured time (the schedule re-laid for it)
    and the final evaluation's time from its validation's (updated in the plan), so that the run ends by the
    deadline. Returns the history, the best epoch ({"epoch", "val_accuracy"}), the seconds trained and the config
    (its epochs, as trained)."""
    k = len(class_names)
    steps_per_epoch = epoch_steps(len(train_y), cfg)
    optimizer, scheduler, scaler = optimization_parts(model, cfg, device, steps_per_epoch)
    weights = inverse_frequency_weights(cfg, train_y, k)
    history, best, start, done = [], {"val_accuracy": -1.0, "epoch": 0}, 1, 0  # done: the training steps taken
    if resume is not None:
        history, best, start = restore_training_state(resume, optimizer, scheduler, scaler)
        done = steps_taken(resume, steps_per_epoch)
    rank, world = rank_and_world()
    writes, ddp = rank == 0, world > 1  # under torchrun, rank 0 alone writes
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if ddp else model  # averages the gradients of the ranks' shares
    compiled = torch.compile(net) if cfg.compile else net
    last_path = run_dir / "last.pth"
    resume_cmd = script_command(f"--resume={os.path.abspath(last_path)}")  # from any folder
    if ddp:
        resume_cmd += "  (or under torchrun, with any number of processes)"

    def save_last(epoch, metrics):
        if writes:
            atomic_save(checkpoint_dict(model, cfg, class_names, mean, std, epoch, metrics,
                                        **training_state(optimizer, scheduler, scaler, history, best, done)), last_path)

    if resume is None:
        save_last(0, {})  # an interrupt in the first epoch still has a state to resume from
    elif writes:  # the checkpoint's history is the truth: drop lines of a half-finished epoch
        lines = "".join(json.dumps(h) + "\n" for h in history)
        atomic_write(run_dir / "metrics.jsonl", lambda tmp: tmp.write_text(lines))
    t_start = time.time() - sum(h["epoch_seconds"] for h in history)
    epoch = saved = start - 1  # saved: the epoch last.pth holds (a Ctrl-C can land inside its save)
    if resume is not None and done >= total_steps(cfg, steps_per_epoch):
        log(f"the run had finished (epoch {epoch}); the final evaluation is repeated (--epochs=N trains on)", log_file)
    walls, val_walls = [], []  # seconds of each epoch from its start to its last write; of its validation
    try:
        while done < total_steps(cfg, steps_per_epoch):
            epoch += 1
            t0 = time.time()
            if ddp:  # each rank's augmentation, from (seed, epoch, rank): a resume continues it
                torch.manual_seed(epoch_seed(cfg, epoch) * 1_009 + rank)
            stats = train_one_epoch(compiled, train_x, train_y, mean, std, optimizer, scheduler, scaler, cfg, epoch,
                                    num_classes=k, class_weights=weights,
                                    max_steps=total_steps(cfg, steps_per_epoch) - done)
            done += min(steps_per_epoch, total_steps(cfg, steps_per_epoch) - done)
            same_as_rank_zero(model)  # one model on every rank
            t_val = time.time()
            stats.update(epoch=epoch, **validation_metrics(model, val, mean, std, device, cfg, k, tta), lr=scheduler.get_last_lr()[0],
                         epoch_seconds=time.time() - t0, epochs_trained=round(done / steps_per_epoch, 4))
            val_walls.append(time.time() - t_val)
            history.append(stats)
            improved = stats["val_accuracy"] > best["val_accuracy"]
            with ctrl_c_deferred():  # the best and last checkpoints, the message after Ctrl-C and metrics.jsonl agree
                if improved:
                    best = {"val_accuracy": stats["val_accuracy"], "epoch": epoch}
                    if writes:
                        atomic_save(checkpoint_dict(model, cfg, class_names, mean, std, epoch, stats, best=best),
                                    run_dir / "best_emotion_model.pth")
                save_last(epoch, stats)
                saved = epoch
                if writes:
                    append_text(run_dir / "metrics.jsonl", json.dumps(stats) + "\n")
            walls.append(time.time() - t0)
            if plan is not None and epoch > 1:  # re-plan from the epochs as timed, the final evaluation's time too
                replanned = replan(plan, walls, val_walls, epoch, cfg, steps_per_epoch, len(val), tta, log_file)
                if replanned is not None:
                    cfg = replanned
                    scheduler = relaid_schedule(scheduler, optimizer, cfg, steps_per_epoch)
                    if writes:
                        with ctrl_c_deferred():  # config.json and last.pth agree on the schedule
                            write_json(dataclasses.asdict(cfg), run_dir / "config.json")
                            save_last(epoch, stats)  # last.pth resumes with the schedule as now laid
            log(epoch_line(epoch, epochs_run(cfg, steps_per_epoch, epoch, done), stats, improved), log_file)
    except KeyboardInterrupt:
        log(f"\ninterrupted during epoch {saved + 1}; {last_path} holds the end of epoch {saved}. Resume with:\n  {resume_cmd}", log_file)
        raise SystemExit(130)
    except NonFiniteLoss as e:
        raise UserError(f"{e}; stopping. {last_path} holds the last good state (end of epoch {saved}).") from None
    if writes:
        atomic_save(checkpoint_dict(model, cfg, class_names, mean, std, epoch, history[-1], best=best),
                    run_dir / "final_emotion_model.pth")
    return history, best, time.time() - t_start, cfg


# ---------------------------------------------------------------------------------------------
# Evaluation: a split's results and figures (the end of training, and --evaluate)
# ---------------------------------------------------------------------------------------------

def write_evaluation(model, split, class_names, mean, std, device, cfg, run_dir, extra, train_hashes=None):
    """Evaluate one split and write evaluation_results.json, evaluation_predictions.csv and the confusion, context,
    t-SNE (with its points: feature_space.csv) and attention plots."""
    out = run_inference(model, split.images, mean, std, device, cfg)
    results = evaluation_results(split, out, class_names, train_hashes)
    results.update(extra)
    prototypes = model.context.prototypes.detach().cpu() if isinstance(model, ERN) and model.context is not None else None
    if prototypes is not None:  # the right panel of context_similarities.png, as numbers
        mean_q = mean_q_by_class(out["context_logits"].softmax(1).numpy(), split.labels, len(class_names))
        # None (JSON has no NaN) for a class the split lacks
        results["context_mean_q"] = [[None if np.isnan(v) else float(v) for v in row] for row in mean_q]
    write_json(results, run_dir / "evaluation_results.json")  # before the plots: a failing plot loses no number
    write_predictions(split, out["logits"], class_names, train_hashes, run_dir / "evaluation_predictions.csv")
    drawn = {"context_similarities.png": prototypes is not None, "feature_space.png": cfg.tsne_samples > 0,
             "feature_space.csv": cfg.tsne_samples > 0,
             "attention_maps.png": cfg.attention_samples > 0 and isinstance(model, ERN)}
    for name in (n for n, yes in drawn.items() if not yes):  # a resume's earlier figure would not match these numbers
        with contextlib.suppress(OSError):
            (run_dir / name).unlink(missing_ok=True)
    plot_confusion(results["confusion_matrix"], class_names, run_dir / "confusion_matrix.png", split.name)
    if prototypes is not None:
        plot_context(prototypes, mean_q, class_names, run_dir / "context_similarities.png", split.name)
    if cfg.tsne_samples:
        plot_feature_space(out["features"], split.labels, prototypes, class_names, run_dir / "feature_space.png",
                           cfg.tsne_samples, cfg.seed, split.name)
    if drawn["attention_maps.png"]:  # the hooks need ERN's stages (a baseline has others)
        results["attention_maps"] = plot_attention_maps(model, split, out["logits"].argmax(1).numpy(), class_names,
                                                        mean, std, device, cfg, run_dir / "attention_maps.png")
        write_json(results, run_dir / "evaluation_results.json")
    return results


def write_predictions(split, logits, class_names, train_hashes, path):
    """evaluation_predictions.csv: a row per evaluated face (its image and label row's box, its true and predicted
    class by name, the confidence and each class's probability, of the views' mean logits as the accuracy counts
    them; whether its image is also in the training split, where known), to study the errors or compare two models
    face by face."""
    probs, pred = logits.float().softmax(1).numpy(), logits.argmax(1).tolist()
    in_train = [""] * len(split) if train_hashes is None else [int(h in train_hashes) for h in split.hashes]
    rows = ([image, *(f"{v:.6g}" for v in box), class_names[y], class_names[k], f"{p[k]:.4f}", dup,
             *(f"{v:.4f}" for v in p)]
            for image, box, y, k, p, dup in zip(split.paths, split.boxes.tolist(), split.labels.tolist(), pred, probs,
                                                in_train))
    write_csv(path, ["image", "cx", "cy", "w", "h", "true", "predicted", "confidence", "image_in_train", *class_names],
              rows)


def final_evaluation(model, splits, eval_split, class_names, mean, std, device, cfg, run_dir, log_file, record,
                     history):
    """The end of a run: the best epoch's weights evaluated on eval_split (write_evaluation, with record), the
    training history plotted, the result line. Ctrl-C here names the --evaluate command that does it later."""
    best_path = run_dir / "best_emotion_model.pth"
    try:
        model.load_state_dict(load_checkpoint(best_path)["model"])
        results = write_evaluation(model, splits[eval_split], class_names, mean, std, device, cfg, run_dir,
                                   {**record, "checkpoint": str(best_path)}, set(splits["train"].hashes))
        plot_history(history, run_dir / "training_history.png")
    except KeyboardInterrupt:
        log(f"\ninterrupted during the final evaluation; training is complete ({best_path}). Evaluate with:\n  "
            f"{script_command(f'--evaluate={os.path.abspath(best_path)}')}", log_file)
        raise SystemExit(130)
    subset = f" on {min(cfg.val_faces, len(splits['val'])):,} faces, one view" if cfg.val_faces else ""
    final = history[-1]
    chosen_on_it = "" if eval_split == "test" else " (the best epoch was chosen on this split, so this is optimistic" + \
        ("" if final["epoch"] == record["best_epoch"] else
         f"; the final epoch {final['epoch']} reached {final['val_accuracy']:.2%} in its validation{subset}") + ")"
    log(f"{eval_split} accuracy {results['accuracy']:.2%} (macro-F1 {results['macro_f1']:.4f}) with the best "
        f"epoch {record['best_epoch']} ({record['best_val_accuracy']:.2%} in its validation{subset}){chosen_on_it}; "
        f"outputs in {run_dir}", log_file)
    return results


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

def pyplot():
    """matplotlib's pyplot on its file-only backend (Agg): a server has no display, and no figure is shown. Each plot
    imports it itself, after the numbers are written, so a matplotlib that fails loses none of them. No figure writes
    mathematics: a $ in a class or file name is a dollar sign (two of them would start TeX, and a bad one fail)."""
    import matplotlib
    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi=110, rect=None):
    """Lay out, write and close a figure; a disk that fills under it is one line (the numbers are written first)."""
    plt = pyplot()
    try:
        fig.tight_layout(**({} if rect is None else {"rect": rect}))
        fig.savefig(path, dpi=dpi)
    except OSError as e:
        full = e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
        raise UserError(f"could not write {path}: {e.strerror or e}" + ("; free some space or choose another "
                        "--output_dir" if full else "")) from None
    finally:
        plt.close(fig)


def plot_history(history, path):
    """Per pass over the training set, at the epochs trained by its end (a pass cut short by --epochs=N.5 or a
    budget is part of one; metrics.jsonl from before epochs_trained: the pass's number)."""
    plt = pyplot()
    ep = [h.get("epochs_trained", h["epoch"]) for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(ep, [h["train_loss"] for h in history], "o-", label="train (total)")
    axes[0].plot(ep, [h["train_ce"] for h in history], ".--", label="train CE")  # a marker: one pass is one point
    axes[0].plot(ep, [h["train_kl"] for h in history], ".:", label="train KL")
    axes[0].plot(ep, [h["val_loss"] for h in history], "o-", label="validation")
    axes[1].plot(ep, [h["train_accuracy"] for h in history], "o-", label="train (augmented)")
    axes[1].plot(ep, [h["val_accuracy"] for h in history], "o-", label="validation")
    axes[2].plot(ep, [h["lr"] for h in history], "o-")
    for ax, title in zip(axes, ("loss", "accuracy", "learning rate (end of epoch)")):
        ax.set_title(title)
        ax.set_xlabel("epochs trained")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    save_figure(fig, path)


def heatmap(ax, matrix, row_names, col_names, title, fmt, cmap="Blues", vmin=None, vmax=None):
    im = ax.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(col_names)), col_names, rotation=45, ha="right")
    ax.set_yticks(range(len(row_names)), row_names)
    ax.set_title(title)
    # the text's colour against the colour scale (a fixed 0-1 one included), not the data's largest value
    hi = vmax if vmax is not None else np.nanmax(np.abs(matrix)) if np.isfinite(matrix).any() else 1
    for (i, j), v in np.ndenumerate(matrix):
        if not np.isfinite(v):  # left blank
            continue
        ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=7,
                color="white" if abs(v) > 0.6 * hi else "black")
    ax.figure.colorbar(im, ax=ax, fraction=0.046)


def plot_confusion(cm, class_names, path, split):
    plt = pyplot()
    cm = np.asarray(cm)
    support = cm.sum(1, keepdims=True)
    rows = np.where(support > 0, cm / np.maximum(support, 1), np.nan)  # a class the split lacks: blank, not recall 0
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5))
    fig.suptitle(f"the {split} split, {int(cm.sum()):,} faces")
    heatmap(axes[0], cm, class_names, class_names, "confusion matrix (counts)", "d")
    heatmap(axes[1], rows, class_names, class_names, "row-normalized (recall on the diagonal)", ".2f", vmin=0, vmax=1)
    for ax in axes:
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    save_figure(fig, path)


def plot_context(prototypes, mean_q, class_names, path, split):
    """Prototype-to-prototype cosine similarity, and the mean context distribution q per true class."""
    plt = pyplot()
    p = F.normalize(prototypes.float(), dim=1)
    sim = (p @ p.t()).numpy()
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5))
    fig.suptitle(f"the {split} split")
    heatmap(axes[0], sim, class_names, class_names, "prototype cosine similarity", ".2f", cmap="RdBu_r", vmin=-1, vmax=1)
    heatmap(axes[1], mean_q, class_names, class_names, "mean context distribution q by true class", ".2f", vmin=0, vmax=1)
    axes[1].set_xlabel("prototype")
    axes[1].set_ylabel("true class")
    save_figure(fig, path)


def plot_feature_space(features, labels, prototypes, class_names, path, max_points, seed, split):
    """t-SNE of a random sample of the features, prototypes embedded alongside and marked; its points in a CSV beside
    it (write_points)."""
    plt = pyplot()
    from sklearn.manifold import TSNE
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(labels))[:max_points]
    pts = F.normalize(features[idx].float(), dim=1).numpy()  # the context module compares directions
    if prototypes is not None:
        pts = np.concatenate([pts, F.normalize(prototypes.float(), dim=1).numpy()])
    fig, ax = plt.subplots(figsize=(9, 8))
    points = path.with_suffix(".csv")  # the figure's points, to draw it again another way
    with contextlib.suppress(OSError):
        points.unlink(missing_ok=True)  # an earlier evaluation's
    if len(pts) >= 5:
        emb = TSNE(2, perplexity=min(30.0, (len(pts) - 1) / 3), init="pca", random_state=seed).fit_transform(pts)
        write_points(points, idx, labels[idx], emb, class_names)
        cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
        for i, name in enumerate(class_names):
            m = labels[idx] == i
            ax.scatter(emb[:len(idx)][m, 0], emb[:len(idx)][m, 1], s=6, alpha=0.6, color=cmap(i % cmap.N), label=name)
            if prototypes is not None:
                ax.scatter(*emb[len(idx) + i], marker="*", s=400, color=cmap(i % cmap.N), edgecolors="black", linewidths=1.2)
        ax.legend(markerscale=3, fontsize=8, loc="best")
    stars = " (stars: emotion prototypes)" if prototypes is not None else ""
    ax.set_title(f"t-SNE of {len(idx)} feature vectors of the {split} split{stars}" if len(pts) >= 5 else
                 f"{len(idx)} feature vectors of the {split} split: too few for t-SNE")
    ax.set_xticks([])
    ax.set_yticks([])
    save_figure(fig, path)


def write_points(path, idx, labels, emb, class_names):
    """feature_space.csv: each point of feature_space.png, a face (its row in evaluation_predictions.csv, 0 the first
    after the header, and its true class) or a class's prototype (emb's rows after the faces'), and its t-SNE
    coordinates."""
    face_points = (["face", face, class_names[label], f"{x:.4f}", f"{y:.4f}"]
                   for face, label, (x, y) in zip(idx.tolist(), labels.tolist(), emb[:len(idx)].tolist()))
    prototype_points = (["prototype", "", name, f"{x:.4f}", f"{y:.4f}"]
                        for name, (x, y) in zip(class_names, emb[len(idx):].tolist()))
    write_csv(path, ["point", "face", "class", "x", "y"], itertools.chain(face_points, prototype_points))


def overlay(ax, face, heat, title, vmin=0.0, vmax=1.0):
    """A heat map in [vmin, vmax] over a uint8 (3, S, S) face."""
    ax.imshow(face.transpose(1, 2, 0))
    ax.imshow(heat, cmap="jet", alpha=0.45, vmin=vmin, vmax=vmax)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def plot_attention_maps(model, split, pred, class_names, mean, std, device, cfg, path):
    """attention_maps.png: per true class, the mean face of (at most attention_samples) evaluated faces, and the
    mean spatial attention (over stages) and mean Grad-CAM of the predicted class, correctly and incorrectly
    classified faces side by side. Returns what it shows, as numbers, for evaluation_results.json."""
    plt = pyplot()
    rng = np.random.default_rng(cfg.seed)
    idx = np.sort(rng.permutation(len(split))[:cfg.attention_samples])
    faces, labels, pred = np.asarray(split.images[idx]), split.labels[idx], pred[idx]
    maps = explain_faces(model, faces, mean, std, device, target=pred)
    attention = None if maps["gates"] is None else maps["gates"].mean(1)
    columns = [("attention", attention), ("Grad-CAM", maps["gradcam"])]
    groups = [(c, name, m) for name, m in columns for c in (True, False)]
    shown = {}
    for i, name in enumerate(class_names):
        for correct, title, m in groups:
            chosen = (labels == i) & ((pred == labels) == correct)
            shown[(i, title, correct)] = (m[chosen].mean(0) if m is not None and chosen.any() else None, int(chosen.sum()))
    gate_values = [v for (_, title, _), (v, _) in shown.items() if title == "attention" and v is not None]
    gate_range = (min(v.min() for v in gate_values), max(v.max() for v in gate_values)) if gate_values else None
    k = len(class_names)
    fig, axes = plt.subplots(k, 5, figsize=(10, 2.1 * k + 0.6), squeeze=False)
    for i, name in enumerate(class_names):
        of_class = labels == i
        mean_face = faces[of_class].mean(0).round().astype(np.uint8) if of_class.any() else np.zeros_like(faces[0])
        axes[i, 0].imshow(mean_face.transpose(1, 2, 0))
        axes[i, 0].set_title(f"{name}: mean face (n={int(of_class.sum())})", fontsize=8)
        axes[i, 0].axis("off")
        for j, (correct, title, m) in enumerate(groups):
            ax = axes[i, 1 + j]
            heat, n = shown[(i, title, correct)]
            label = f"{title}, {'correct' if correct else 'wrong'} (n={n})"
            if heat is None:
                ax.text(0.5, 0.5, "no spatial attention" if m is None else "no faces", ha="center", va="center", fontsize=8)
                ax.set_title(label, fontsize=8)
                ax.axis("off")
            else:
                overlay(ax, mean_face, heat, label, *(gate_range if title == "attention" else (0, 1)))
    shown_range = "no spatial attention" if gate_range is None else \
        f"attention: mean spatial gate over stages, colour range {gate_range[0]:.2f}-{gate_range[1]:.2f}"
    fig.suptitle(f"{len(idx)} faces of the {split.name} split; {shown_range}; Grad-CAM of the predicted class, 0-1",
                 fontsize=9)
    save_figure(fig, path, dpi=90, rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the title
    return {"faces": int(len(idx)), "gate_range": None if gate_range is None else [float(v) for v in gate_range],
            "faces_per_class": {name: {"correct": shown[(i, "Grad-CAM", True)][1],  # the figure's n, per class
                                       "wrong": shown[(i, "Grad-CAM", False)][1]}
                                for i, name in enumerate(class_names)}}


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

# What --evaluate takes from this machine rather than from the checkpoint: where the decode cache and the outputs go,
# what computes, and whether a data problem stops it (the data is the checkpoint's, unless --data_dir is given)
EVALUATION_MACHINE = ("cache_dir", "decode_threads", "device", "output_dir", "overwrite", "strict")
# What --evaluate's command line may give: the above, the inference settings, the data and the figures' sizes; the
# rest (the preprocessing, the network, what rebuilds a held-out split, the training) is the checkpoint's, refused
EVALUATED_WITH = (*EVALUATION_MACHINE, *INFERENCE_SETTINGS, "data_dir", "drop_duplicates", "tsne_samples",
                  "attention_samples")


def run_evaluation(cfg, action, overrides):
    """--evaluate: the checkpoint's settings (as predict.py takes them: its inference settings unless the command line
    gives others), this machine's EVALUATION_MACHINE; the results and figures in a folder of their own. Its config in
    evaluation_results.json is the checkpoint's run with what the command line gave: what evaluated."""
    ckpt = load_checkpoint(action.evaluate)
    clash = [k for k in overrides if k not in EVALUATED_WITH]
    if clash:
        raise UserError(f"--evaluate does not take {', '.join('--' + k for k in clash)}: it evaluates with the "
                        f"checkpoint's preprocessing, network and settings; drop {'it' if len(clash) == 1 else 'them'}")
    own_data = "data_dir" not in overrides  # the data it was trained on (from the folder that training ran in)
    given = {**{k: getattr(cfg, k) for k in EVALUATION_MACHINE}, **overrides}
    cfg = inference_config(ckpt, given.pop("device"), **given)
    made = not cfg.output_dir  # an evaluation folder of its own: removed again where it holds no results
    own_folder = Path(action.evaluate).parent  # never the output: --overwrite would delete the model (or a link's)
    if made:
        folder = unique_folder(own_folder / f"eval__{time.strftime('%Y%m%d-%H%M%S')}")
        cfg = dataclasses.replace(cfg, output_dir=str(folder))
    elif user_path(cfg.output_dir).resolve() in (own_folder.resolve(), Path(action.evaluate).resolve().parent):
        raise UserError(f"--output_dir={cfg.output_dir} holds the checkpoint evaluated: an evaluation writes into a "
                        f"folder of its own (without --output_dir, {own_folder / 'eval__TIME'})")
    run_dir, lock = make_run_dir(cfg)
    # the claim ends here, also where a caller keeps the traceback; the cleanup after it (Windows cannot remove a
    # folder whose .lock is open)
    with contextlib.ExitStack() as cleanup, lock:
        if made:
            kept = ("evaluation_results.json", "data_problems.txt")  # results, or the problems that refused them
            cleanup.callback(lambda: any((run_dir / n).exists() for n in kept) or shutil.rmtree(run_dir, True))
        if own_data:
            log(f"data: {cfg.data_dir}, the checkpoint's (--data_dir= for another)", run_dir / "train.log")
        device = resolve_device(cfg.device)
        class_names, splits, report = load_dataset(cfg, run_dir / "train.log")
        write_json(report, run_dir / "data_report.json")
        split = action.split or ("test" if "test" in splits else "val")
        if split not in splits:
            raise UserError(f"--split={split}: the dataset in {cfg.data_dir} has no such split")
        sizes = f"--eval_batch_size={cfg.eval_batch_size}, --attention_samples={cfg.attention_samples}, " \
            f"--tsne_samples={cfg.tsne_samples}"  # the figures' too
        with out_of_memory_named(device, sizes):
            model, cfg, mean, std = inference_model(ckpt, cfg, device, run_dir / "train.log", class_names)
            results = write_evaluation(model, splits[split], class_names, mean, std, device, cfg, run_dir, {
                "evaluated_split": split, "arithmetic": arithmetic(cfg, device),
                "num_parameters": count_parameters(model),
                "checkpoint_epoch": ckpt["epoch"],  # best, final and last checkpoints record the run's best epoch as of then
                "best_epoch": ckpt.get("best", {}).get("epoch"), "best_val_accuracy": ckpt.get("best", {}).get("val_accuracy"),
                "training_seconds": None,
                "checkpoint": str(action.evaluate), "duplicates": report["duplicates"], "config": dataclasses.asdict(cfg)},
                set(splits["train"].hashes) if split != "train" else None)
        log(f"{split} accuracy {results['accuracy']:.2%} (macro-F1 {results['macro_f1']:.4f}) of {action.evaluate}; "
            f"outputs in {run_dir}", run_dir / "train.log")
        return run_dir, results


def run_training(cfg, resume_ckpt=None, build=build_model, argv=(), started=None):
    """Train and evaluate one run; build(cfg, num_classes) makes the network (benchmarks pass a baseline's); argv:
    the command line, for provenance.json (one entry per start and resume); started: the time.time() that
    --time_budget counts from (the script: its process's start; a caller such as a notebook: now)."""
    started = started or time.time()
    # absolute data and cache folders in the config and checkpoints: --resume works from any folder
    cfg = dataclasses.replace(cfg, data_dir=str(user_path(cfg.data_dir).resolve()),
                              cache_dir=str(user_path(cfg.cache_dir).resolve()),
                              output_dir=cfg.output_dir and str(user_path(cfg.output_dir)))
    device = init_distributed(cfg)
    rank, world = rank_and_world()
    if cfg.batch_size % world:
        raise UserError(f"--batch_size={cfg.batch_size} (the global batch) does not divide among {world} processes")
    if world > 1 and cfg.class_weights:  # each process would normalize its loss by its own share's weights
        raise UserError("--class_weights is not supported under torchrun yet; train it with python")
    if world > 1 and cfg.sync_bn and cfg.compile:
        raise UserError("--sync_bn with --compile is not supported under torchrun; drop one of them")
    run_dir, lock = make_run_dir(cfg, resuming=resume_ckpt is not None) if rank == 0 else (None, contextlib.nullcontext())
    # the claim ends with the run, also where a caller keeps its traceback; the cleanup after it (Windows cannot
    # remove a folder whose .lock is open)
    with contextlib.ExitStack() as cleanup, lock:
        try:
            with out_of_memory_named(device, f"--batch_size={cfg.batch_size}, --eval_batch_size={cfg.eval_batch_size}",
                                     " (a resume keeps the batch size), or a smaller --image_size or --width"):
                return train_in_folder(Path(from_rank_zero(str(run_dir))), cfg, device, resume_ckpt, build, argv,
                                       started)
        except UserError as e:  # the log of a refused run says why (a refused resume leaves its folder as it was);
            # a folder named for this run, which holds no checkpoint nor the dataset's problems, is removed again
            if rank == 0 and resume_ckpt is None and not cfg.output_dir and not any(
                    (run_dir / n).exists() for n in ("last.pth", "data_problems.txt")):
                cleanup.callback(shutil.rmtree, run_dir, True)
            elif rank == 0 and resume_ckpt is None:
                with contextlib.suppress(UserError):  # a log that cannot be written either: the first error is said
                    append_text(run_dir / "train.log", f"error: {e}\n")
            raise
        except RuntimeError as e:
            if not (cfg.compile and isinstance(e, torch._dynamo.exc.BackendCompilerFailed)):  # no C++ compiler, or a bug
                raise
            compiler = " on the CPU it needs a working C++ compiler (g++ or clang; MSVC on Windows): install one, or" \
                if device.type == "cpu" else ""
            inner = e.inner_exception  # e's own first line can be "backend='inductor' raised:", which says nothing
            reason = f"{type(inner).__name__}: {str(inner).strip()}".splitlines()[0][:200]
            raise UserError(f"--compile=true failed: {reason};{compiler} pass --compile=false (a resume may too)") from None


def train_in_folder(run_dir, cfg, device, resume_ckpt, build, argv, started):
    """run_training's run in its claimed folder: data, model, plan, training, the final evaluation."""
    rank, world = rank_and_world()
    # a resumed run's folder changes only once the data and the checkpoint are known to fit: log to the console until then
    log_file = run_dir / "train.log" if resume_ckpt is None else None
    seed_everything(cfg.seed + rank, cfg.deterministic)  # rank 0's is the model's initialization, which DDP copies
    with local_rank_zero_first():  # one decode, then the others read the cache
        class_names, splits, report = load_dataset(cfg, log_file)
    faces = len(splits["train"])
    model = build(cfg, len(class_names))
    if min(cfg.batch_size, faces) % world:  # a training set smaller than the batch is each step's batch
        raise UserError(f"{faces} training faces, fewer than --batch_size={cfg.batch_size}: each step takes them "
                        f"all, and {faces} does not divide among {world} processes; train them with python")
    if resume_ckpt is not None:
        mean, std = checkpoint_normalization(resume_ckpt, "cpu")
        refuse_other_classes(resume_ckpt, class_names)
        load_weights(model, resume_ckpt)  # before the folder changes: weights of another network are refused
        steps_per_epoch = epoch_steps(faces, cfg)
        trained = steps_taken(resume_ckpt, steps_per_epoch)
        if trained > total_steps(cfg, steps_per_epoch):
            raise UserError(f"--epochs={cfg.epochs:g} is fewer than the {trained / steps_per_epoch:.4g} epochs "
                            f"{run_dir / 'last.pth'} has trained; give more, or none to repeat the final evaluation")
        log_file = run_dir / "train.log"
    else:
        mean, std = dataset_normalization(splits["train"].images)
    if rank == 0:  # the run goes ahead: its config and data report (a resume's replace the old ones whole)
        write_json(dataclasses.asdict(cfg), run_dir / "config.json")
        write_json(report, run_dir / "data_report.json")
    if world > 1:
        log(f"distributed: world size {world} ({torch.distributed.get_backend()}), batch {cfg.batch_size} = "
            f"{world} x {cfg.batch_size // world}{', BatchNorm over the global batch' if cfg.sync_bn else ''}", log_file)
    eval_split = "test" if "test" in splits else "val"
    log(f"classes (data.yaml order): {', '.join(f'{i}={n}' for i, n in enumerate(class_names))}", log_file)
    log("splits: " + ", ".join(f"{n} {len(s)}" for n, s in splits.items()) +
        ("" if eval_split == "test" else " | no test split: the final evaluation is on the validation split"), log_file)
    mean, std = mean.to(device), std.to(device)
    with local_rank_zero_first():  # one probe per machine: the other processes read its verdict
        cfg, layout_verdict = channels_last_checked(model, cfg, device, log_file, cfg.batch_size // world)
    if world > 1 and layout_verdict is not None:
        cfg = agree_on_layout(cfg, log_file)
    model = place_model(model, cfg, device)
    same_as_rank_zero(model)
    if cfg.sync_bn and world > 1:  # CUDA: PyTorch's; gloo on CPUs: ours (nn.SyncBatchNorm is CUDA-only)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model) if device.type == "cuda" else global_batch_norm(model)
    n_params = count_parameters(model)
    computes = arithmetic(cfg, device)
    stem = f" (stride-{cfg.stem_stride} stem: stages of {-(-cfg.image_size // cfg.stem_stride)}px)" if cfg.stem_stride > 1 else ""
    threads = f" (threads: {torch.get_num_threads()})" if device.type == "cpu" else ""
    log(f"{type(model).__name__}: {n_params:,} parameters, width {cfg.width}, blocks {cfg.blocks}, {cfg.image_size}px{stem}, device {device}"
        f"{threads}, autocast {computes['autocast'] or 'off (float32)'} | run folder {run_dir}", log_file)
    train_x = torch.from_numpy(np.ascontiguousarray(splits["train"].images)).to(device)
    train_y = torch.from_numpy(splits["train"].labels).to(device)
    val_epoch, tta = epoch_validation(splits["val"], cfg)  # what each epoch validates, and with cfg's views or not
    plan = None
    if cfg.time_budget and resume_ckpt is None:  # a resume keeps the planned epochs of its config
        deadline = started + cfg.time_budget * 60 + report["decode_seconds"]  # a first decode is outside the budget
        plan = from_rank_zero(plan_epochs(model, train_x, train_y, val_epoch, len(splits[eval_split]), mean, std,
                                          cfg, device, len(class_names), deadline, tta=tta))  # every rank measures, rank 0's plan
        cfg = apply_plan(cfg, plan, log_file)
    if rank == 0 and (plan is not None or layout_verdict is not None):  # as run: epochs planned, the layout probed
        write_json(dataclasses.asdict(cfg), run_dir / "config.json")
    if rank == 0:
        record_start(run_dir, resume_ckpt is not None, log_file, {
            **provenance(argv, device, cfg.data_dir, report), "time_budget_plan": plan,
            "channels_last_probe": layout_verdict, "world_size": world,
            "backend": torch.distributed.get_backend() if world > 1 else None})
    history, best, seconds, cfg = train(model, train_x, train_y, val_epoch, class_names, mean, std, cfg, run_dir,
                                        device, log_file, resume_ckpt, plan, tta)
    del train_x, train_y
    if rank > 0:  # rank 0 evaluates alone: the whole test split, as one process
        return run_dir, None
    t_final = time.time()
    results = final_evaluation(model, splits, eval_split, class_names, mean, std, device, cfg, run_dir, log_file, {
        "evaluated_split": eval_split, "num_parameters": n_params, "arithmetic": computes, "best_epoch": best["epoch"],
        "best_val_accuracy": best["val_accuracy"], "final_epoch": history[-1]["epoch"],
        "final_epoch_val_accuracy": history[-1]["val_accuracy"], "training_seconds": round(seconds, 1),
        "duplicates": report["duplicates"], "duplicates_dropped": cfg.drop_duplicates,
        "config": dataclasses.asdict(cfg)}, history)
    if plan is not None:
        log(f"time budget: the final evaluation and figures took {time.time() - t_final:.0f} s (estimated "
            f"{plan['final_evaluation_seconds']:.0f} s); {(time.time() - started) / 60:.2f} of {cfg.time_budget:g} "
            f"minutes used", log_file)
    return run_dir, results


# What a resumed run keeps from its checkpoint, and why
RESUME_FIXED = {"output_dir": "a run continues in its own folder (copy the folder to branch it)",
                "batch_size": "the learning-rate schedule is laid out in steps of the original batch size",
                "lr": "the optimizer resumes with its saved learning rate", "weight_decay": "the optimizer resumes "
                "with its saved weight decay", "preset": "a run keeps the settings it started with",
                "time_budget": "a budget plans a run's epochs at its start (--epochs changes them)",
                "seed": "the validation split held out of train, and each epoch's order, are drawn from it",
                **dict.fromkeys(("val_fraction", "drop_duplicates", "crop_margin"), "the faces trained and validated on "
                                "would change"),
                **dict.fromkeys(("val_faces", "tta_flip", "tta_shift", "tta_zoom"), "the best epoch so far was "
                                "chosen by validating so (--evaluate evaluates with others)"),
                **dict.fromkeys(("image_size", *ARCHITECTURE), "the checkpoint's weights are of its own network and "
                                "image size")}


def resumed(last, overrides):
    """(the config, the checkpoint) that --resume=last continues: the run's config with the overrides it can honour,
    in the run's folder; one line, before any work, for an override RESUME_FIXED keeps or a best model gone missing."""
    ckpt = load_checkpoint(last)
    if "optimizer" not in ckpt:
        raise UserError(f"{last} holds weights but no training state; resume from the run's last.pth")
    folder = Path(last).parent
    if user_path(overrides.get("output_dir", folder)).resolve() == folder.resolve():
        overrides.pop("output_dir", None)  # naming the run's own folder is no change
    saved = config_from_checkpoint(ckpt)
    unresumable = [k for k in RESUME_FIXED if k in overrides and overrides[k] != getattr(saved, k)]
    if unresumable:
        changes = ", ".join(f"--{k}={overrides[k]} (the run's: {getattr(saved, k)})" for k in unresumable)
        raise UserError(f"--resume cannot change {changes}: "
                        f"{'; '.join(dict.fromkeys(RESUME_FIXED[k] for k in unresumable))}")
    best = folder / "best_emotion_model.pth"
    if ckpt.get("best", {}).get("epoch", 0) > 0 and not best.exists():  # else found missing after the training
        raise UserError(f"{best} (epoch {ckpt['best']['epoch']}, the run's best so far) is missing, and the final "
                        f"evaluation is of it: copy it back beside {Path(last).name}")
    cfg = dataclasses.replace(saved, **overrides, output_dir=str(folder))
    validate_config(cfg)
    return cfg, ckpt


def main(argv, started=None):
    """Parse, validate, and do the one action asked for (none: train). Returns (run folder, results).
    started: the time.time() a --time_budget counts from (default: now)."""
    console_escapes()
    cfg, action, overrides = parse_args(argv)
    validate_config(cfg)
    validate_action(action)
    fit_threads_to_cpu()
    action = dataclasses.replace(action, **{field: checkpoint_in(getattr(action, field), name) for field, name in (
        ("evaluate", "best_emotion_model.pth"), ("resume", "last.pth")) if getattr(action, field)})  # a run folder
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and (action.evaluate or action.demo):
        raise UserError("under torchrun the script trains and resumes; run --evaluate and --demo with python")
    if action.evaluate:
        return run_evaluation(cfg, action, overrides)
    if action.resume:
        return run_training(*resumed(action.resume, overrides), argv=argv, started=started)
    cfg = preset_for_machine(cfg, overrides)  # the same stages as the preset's: validated above
    if action.demo:
        data = user_path(cfg.data_dir if "data_dir" in overrides else "outputs/demo_data")  # as run_training's
        try:
            if not (data / "data.yaml").exists():
                print(f"writing a synthetic dataset of drawn faces to {data} ...")
                make_synthetic_dataset(data, seed=cfg.seed)
        except OSError as e:  # a read-only checkout, a full disk, a --data_dir under a file or in another's folder
            raise UserError(f"cannot write the demo's dataset in {data}: {e.strerror or e}; choose a writable "
                            f"--data_dir") from None
        cfg = dataclasses.replace(cfg, data_dir=str(data))
    return run_training(cfg, argv=argv, started=started)


if __name__ == "__main__":
    stop_on_ctrl_c_and_sigterm()
    try:
        main(sys.argv[1:], started=process_start_time())
        if rank_and_world()[1] > 1:
            torch.distributed.destroy_process_group()
    except UserError as e:
        rank, world = rank_and_world()
        print(f"error{f' (rank {rank} of {world})' if world > 1 else ''}: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # outside training (which saves and prints its resume command): decoding, evaluating
        print("interrupted (nothing half-written is left: a decode cache is kept only when complete)", file=sys.stderr)
        sys.exit(130)
