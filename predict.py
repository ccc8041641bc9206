"""
Emotions of the faces in photos, folders, videos and cameras, with a model trained by emotion_recognition.py.

    python predict.py --checkpoint=outputs/RUN photo.jpg                # a run folder: its best_emotion_model.pth
    python predict.py --checkpoint=outputs/RUN photos/ clip.mp4 camera:0 # folders (recursive), videos, cameras
    python predict.py --checkpoint=outputs/RUN @inputs.txt               # a list file, one input per line
    python predict.py --checkpoint=outputs/RUN --explain photo.jpg       # + explain/: attention and Grad-CAM per face

Writes one folder (default outputs/predict__{time}): predictions.csv (a row per face, or per image or frame
without one), annotated/ copies, timelines/ of videos, summary.json, and with --explain a picture per face.
Faces are found with OpenCV's Haar cascades; an image without a face gets a row with face_detected false and no
emotion (--detect_faces=false classifies whole images: pre-cropped faces). In Python: EmotionPredictor (README).
"""

import contextlib
import csv
import dataclasses
import errno
import json
import math
import os
import re
import shutil
import stat
import sys
import threading
import time
import unicodedata
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from tqdm import tqdm

from emotion_recognition import (IMAGE_EXTS, INFERENCE_SETTINGS, Terminated, UserError, arithmetic, checkpoint_in,
                                 console_escapes, cpu_threads, ctrl_c_deferred, decode_image, explain_faces,
                                 fit_threads_to_cpu, folder_files, inference_config, inference_model, list_file_lines,
                                 load_checkpoint, network_crop, opencv_message, ordered_prefetch, out_of_memory_named,
                                 overlay, pyplot, read_overrides, resolve_device, run_inference, save_figure,
                                 stop_on_ctrl_c_and_sigterm, unique_folder, user_path, validate_device, write_image,
                                 write_json)


@dataclass
class Prediction:
    """prediction settings"""
    checkpoint: str = ""  # a run folder (its best_emotion_model.pth) or a .pth file
    output_dir: str = ""  # empty = outputs/predict__{time}
    overwrite: bool = False  # allow writing into a folder that already holds predictions
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    detect_faces: bool = True  # find faces (OpenCV's Haar cascades); false: each image is one face (pre-cropped)
    every: int = 1  # videos and cameras: classify one frame in N
    max_frames: int = 0  # videos and cameras: stop after N classified frames; 0 = all (camera: Ctrl-C)
    smoothing: float = 0.0  # videos: in [0, 1), a track's past's weight per 1/30 s (SMOOTHING_STEP) in the video, timeline and summary; 0 = raw
    batch: int = 64  # faces classified together, gathered across images and frames
    jsonl: bool = False  # also print one JSON line per face on stdout (for piping)
    show: bool = False  # videos, cameras: show the annotated frames (a display, and opencv-python, not -headless)
    explain: bool = False  # also write explain/: crop, attention, Grad-CAM, probabilities and q per face
    # inference: empty = as the checkpoint was trained
    tta_flip: bool | None = None  # average each view and its mirror; empty = the checkpoint's
    tta_shift: int | None = None  # views moved N pixels each way too (5x the work); empty = the checkpoint's
    tta_zoom: float | None = None  # zoomed views: central crop, this fraction of a side (2x); empty = the checkpoint's
    amp: bool | None = None  # autocast: bf16 (CUDA; CPUs with native bf16); empty = the checkpoint's
    channels_last: bool | None = None  # NHWC (CPU: where the model's probe passes); empty = the checkpoint's


def validate_prediction(args, sources):
    checks = [(args.checkpoint, "give the model: --checkpoint=RUN_FOLDER or a .pth"),
              (sources, "name at least one input: photos, folders, videos, camera:N or @list.txt"),
              (args.every >= 1, f"--every must be >= 1, got {args.every}"),
              (args.max_frames >= 0, f"--max_frames must be >= 0, got {args.max_frames}"),
              (0 <= args.smoothing < 1, f"--smoothing must be in [0, 1), got {args.smoothing}"),
              (args.batch >= 1, f"--batch must be >= 1, got {args.batch}"),
              ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    validate_device(args.device)


# Detection and the crop: OpenCV's defaults where they serve, the rest measured (BENCHMARKS.md)
DETECT_WIDTH = 640  # detection runs on a copy resized to at most this width (pixels): the cascades' cost grows with them
DETECT_SHORT_SIDE = 300  # and at least this short a side: the cascades' 24 px window is FACE_MIN_SIZE of it (panoramas)
FACE_SCALE_FACTOR = 1.1  # Haar image-pyramid step
FACE_MIN_NEIGHBORS = 5  # Haar: overlapping hits a face needs
FACE_MIN_SIZE = 0.08  # smallest face side, fraction of the image's shorter side
PROFILE_OVERLAP = 0.3  # a profile hit overlapping a kept face by this IoU is that face
FACE_CROP_SCALE = 1.25  # crop side / Haar box side: the framing most like the training crops' (benchmarks/crop_calibration.py)
FACE_CROP_SHIFT = 0.0  # the crop's centre below the Haar box's, in Haar sides (likewise)
# Videos
VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".3gp", ".flv", ".ts", ".mts",
              ".m2ts", ".ogv", ".gif"}  # what OpenCV's FFmpeg backend opens; a GIF, animated or still, is a video: its
# frames at their own delays
ESTIMATED_COUNTS = {".mkv", ".webm", ".ts", ".mts", ".m2ts", ".mpg", ".mpeg", ".flv", ".ogv"}  # containers whose frame
# count OpenCV works out as duration x fps (no count in the header), a duration the audio may lengthen
UNCHECKED_COUNTS = {".gif"}  # never called cut short: the duration its count comes from ends with the last frame's
# delay, of any length
TRACK_IOU = 0.3  # a face continues a track if its box overlaps the track's last box this much
TRACK_MAX_GAP = 1.0  # seconds a track may go without its face before it ends, and at least TRACK_MIN_MISSED
TRACK_MIN_MISSED = 3  # classified frames (a camera classifying 3 frames a second, --every=30: a missed detection or
# two is no end)
SMOOTHING_STEP = 1 / 30  # seconds: --smoothing is the weight a track's past keeps over each (a frame at 30 fps), so a
# track is smoothed alike whatever the frame rate, --every, or a variable frame rate's gaps
TIMELINE_TRACKS = 6  # tracks drawn in a video's timeline (the longest ones)
TIMELINE_POINTS = 4096  # points a track's timeline holds at most, even (its figure is 1,100 pixels wide): then each two
# are averaged into one, and the frames that follow in groups as large (the last unfinished group is not drawn)
FALLBACK_FPS = 30.0  # a container or camera that gives no frame rate
CAMERA_PATIENCE = 2.0  # seconds a camera may deliver no frame (warming up after it opens, a dropped USB frame) before
# it counts as stopped
STILL_SECONDS = 10.0  # the longest pause of a video file its annotated copy holds as a still
ANNOTATED_FPS = 60.0  # at most, for an annotated video: WebM files that claim 1000 fps would repeat each frame 33 times
# Memory
BUFFER_PIXELS = 2 ** 25  # pixels of the decoded images (or frames) one batch may hold: about 100 MB of RGB
# Outputs
CSV_COLUMNS = ["source", "frame", "time_s", "face", "x1", "y1", "x2", "y2", "face_detected", "emotion", "confidence"]
WHOLE_IMAGE = (0.5, 0.5, 1.0, 1.0)  # normalized cx, cy, w, h
WHOLE_FRAME = -1  # the face number of whole-image rows (no face found; --detect_faces=false: the image classified)
PICTURE_FOLDERS = ("annotated", "explain", "timelines")  # predict.py's pictures beside its predictions.csv


# ---------------------------------------------------------------------------------------------
# Faces: detection, and the crop that training saw
# ---------------------------------------------------------------------------------------------

def box_iou(a, b):
    """Intersection over union of two pixel boxes (x1, y1, x2, y2)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def cascade(path):
    """A Haar cascade read from its file's text: OpenCV's own reader fails in a folder of a non-ASCII name on Windows,
    and crashes in one whose name is not UTF-8 (opencv_path). None where the file is missing or unreadable."""
    try:
        storage = cv2.FileStorage(path.read_text(encoding="utf-8"), cv2.FILE_STORAGE_READ | cv2.FILE_STORAGE_MEMORY)
        classifier = cv2.CascadeClassifier()
        return classifier if classifier.read(storage.getFirstTopLevelNode()) else None
    except (OSError, UnicodeDecodeError, cv2.error):
        return None


class FaceDetector:
    """OpenCV's Haar cascades, from inside the installed wheel (Viola and Jones, CVPR 2001): frontal faces, then
    profile faces, looking either way, that no kept face overlaps. detector(rgb) -> pixel boxes (x1, y1, x2, y2),
    left to right, in the image's coordinates. still=False (a video frame): the profile pass runs only where the
    frontal one found no face, for speed. Safe to call from several threads."""

    def __init__(self):
        self.local = threading.local()  # a CascadeClassifier is not re-entrant: one set per thread
        self.cascades()  # a broken installation is reported before any input is read

    def cascades(self):
        if not hasattr(self.local, "cascades"):
            folder = Path(cv2.data.haarcascades) if hasattr(cv2, "data") else None  # conda's builds leave it out
            names = ("frontalface_default", "profileface")
            cascades = [cascade(folder / f"haarcascade_{n}.xml") for n in names] if folder else []
            if not cascades or any(c is None or c.empty() for c in cascades):
                missing = (f"OpenCV's Haar cascades are missing from {folder}" if folder else
                           "this OpenCV build has no Haar cascades (no cv2.data)")
                raise UserError(f"{missing}: install requirements.txt's OpenCV in a virtual environment "
                                f"(pip install -r requirements.txt)")
            self.local.cascades = cascades
        return self.local.cascades

    def __call__(self, image, still=True):
        h, w = image.shape[:2]
        scale = min(1.0, max(DETECT_WIDTH / w, DETECT_SHORT_SIDE / min(h, w)))
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        if scale < 1:
            gray = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)

        def hits(cascade, img):
            side = max(max(cascade.getOriginalWindowSize()), round(FACE_MIN_SIZE * min(img.shape)))
            found = cascade.detectMultiScale(img, scaleFactor=FACE_SCALE_FACTOR, minNeighbors=FACE_MIN_NEIGHBORS,
                                             minSize=(side, side))
            return [(x, y, x + bw, y + bh) for x, y, bw, bh in found]

        frontal, profile = self.cascades()
        boxes = hits(frontal, gray)
        if still or not boxes:  # the profile pass costs 2.3x the frontal one: BENCHMARKS.md
            # the profile cascade finds faces turned one way: the mirror image finds the others
            gw = gray.shape[1]
            turned = hits(profile, gray) + [(gw - x2, y1, gw - x1, y2) for x1, y1, x2, y2 in hits(profile, cv2.flip(gray, 1))]
            for box in turned:
                if all(box_iou(box, kept) < PROFILE_OVERLAP for kept in boxes):
                    boxes.append(box)
        return sorted(tuple(float(v) / scale for v in box) for box in boxes)


def normalized_box(box, image_shape):
    """A pixel box (x1, y1, x2, y2) as the normalized cx, cy, w, h of YOLO labels and crop_box."""
    (x1, y1, x2, y2), (h, w) = box, image_shape[:2]
    return ((x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h)


def given_box(box, image_shape):
    """A caller's pixel box (x1, y1, x2, y2) as floats; refused in one line unless it is four finite numbers, x1 < x2
    and y1 < y2, that overlap the image (a box outside it would be classified as a face of padding)."""
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise UserError(f"box {box!r}: give four numbers, x1, y1, x2, y2, in pixels") from None
    h, w = image_shape[:2]
    if not all(map(math.isfinite, (x1, y1, x2, y2))) or x1 >= x2 or y1 >= y2:
        raise UserError(f"box {box!r}: x1, y1, x2, y2 in pixels, finite, x1 < x2 and y1 < y2")
    if x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h:
        raise UserError(f"box {box!r} lies outside the {w}x{h} image")
    return x1, y1, x2, y2


def face_crop_box(box, image_shape, scale=FACE_CROP_SCALE, shift=FACE_CROP_SHIFT):
    """A detected pixel box -> the normalized cx, cy, w, h of the square region that frames the face as the
    training crops did: `scale` Haar sides wide, its centre `shift` sides below the box's."""
    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1)
    h, w = image_shape[:2]
    return ((x1 + x2) / 2 / w, ((y1 + y2) / 2 + shift * side) / h, side * scale / w, side * scale / h)


def detected_face_crop(image, box, size):
    """network_crop of a detected pixel box, framed as the training crops are (the scale holds the margin)."""
    return network_crop(image, face_crop_box(box, image.shape), 0.0, size)


def rgb_array(image):
    """The notebook API's image as the (H, W, 3) uint8 RGB array prediction reads: a grayscale one (H, W) or (H, W, 1)
    as three equal channels, an RGBA one without its alpha; anything else is refused, not guessed at."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)) \
            or not min(image.shape[:2]):  # an empty crop of a frame, say
        raise UserError(f"expected an image as a uint8 array, RGB (H, W, 3), grayscale (H, W) or RGBA (H, W, 4); got "
                        f"{image.dtype} {tuple(image.shape)}")
    if image.ndim == 2:
        image = image[:, :, None]
    return np.ascontiguousarray(np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[:, :, :3])


# ---------------------------------------------------------------------------------------------
# The model: EmotionPredictor, the notebook API
# ---------------------------------------------------------------------------------------------

class Face(NamedTuple):
    """One face of an image, as EmotionPredictor.faces finds it."""
    box: tuple  # pixels (x1, y1, x2, y2); the whole image where no face was found
    detected: bool  # False: the whole image (no face found, or --detect_faces=false)
    crop: np.ndarray  # uint8 (3, S, S) as the network sees it; None: nothing to classify (no face found)


class EmotionPredictor:
    """A trained model, loaded once and reused: predictor(rgb) -> one dict per face (box, face_detected, emotion,
    confidence, probabilities by class name; rgb as rgb_array takes it); an image without a detected face: one dict
    with face_detected false and emotion, confidence and probabilities None. detect_faces=False: the whole image is
    the face. checkpoint: a .pth file or a run folder (its best_emotion_model.pth).
    settings: the inference fields (INFERENCE_SETTINGS) replacing the checkpoint's.

        predictor = EmotionPredictor("outputs/RUN/best_emotion_model.pth")
        faces = predictor(rgb)                             # one dict per face: box, emotion, probabilities
        faces = predictor(rgb, boxes=[(x1, y1, x2, y2)])   # your own face boxes, in pixels

    Crops are cut by the trainer's crop_box and classified by its run_inference: the functions that made the
    training crops and that evaluate the model."""

    def __init__(self, checkpoint, device="auto", detect_faces=True, **settings):
        unknown = sorted(set(settings) - set(INFERENCE_SETTINGS))
        if unknown:
            raise UserError(f"prediction takes {', '.join('--' + k for k in unknown)} from the checkpoint; drop "
                            f"{'it' if len(unknown) == 1 else 'them'} (only {', '.join(INFERENCE_SETTINGS)} can be set)")
        checkpoint = checkpoint_in(checkpoint, "best_emotion_model.pth")  # a run folder: its best model
        ckpt = load_checkpoint(checkpoint)
        self.device = resolve_device(str(device))
        cfg = inference_config(ckpt, self.device, **settings)
        self.model, self.cfg, self.mean, self.std = inference_model(ckpt, cfg, self.device)
        self.class_names, self.image_size, self.checkpoint = ckpt["class_names"], ckpt["image_size"], str(checkpoint)
        self.detector = FaceDetector() if detect_faces else None

    def crop(self, image, box, margin):
        return network_crop(image, box, margin, self.image_size)

    def faces(self, image, boxes=None, still=True):
        """[Face] of an RGB image (still=False: a video frame): the given boxes (cropped as the dataset's label
        boxes are, with the checkpoint's crop_margin), else the detected faces, else the whole image with
        face_detected false and no crop (nothing to classify); without the detector, the whole image cropped as a
        label box covering it."""
        image = rgb_array(image)
        h, w = image.shape[:2]
        margin = self.cfg.crop_margin
        if boxes is not None:
            boxes = [given_box(b, image.shape) for b in boxes]
            return [Face(b, True, self.crop(image, normalized_box(b, image.shape), margin)) for b in boxes]
        whole = (0.0, 0.0, float(w), float(h))
        if self.detector is None:
            return [Face(whole, False, self.crop(image, WHOLE_IMAGE, margin))]
        found = [Face(b, True, detected_face_crop(image, b, self.image_size)) for b in self.detector(image, still)]
        return found or [Face(whole, False, None)]

    def classify(self, crops):
        """Class probabilities (N, K) of uint8 crops (N, 3, S, S), as evaluation computes them."""
        if not len(crops):
            return np.zeros((0, len(self.class_names)), np.float32)
        return run_inference(self.model, crops, self.mean, self.std, self.device, self.cfg)["logits"].softmax(1).numpy()

    def describe(self, faces, probs):
        """One dict per face; a row of NaN probabilities (no face, nothing classified) has no emotion."""
        return [{"box": [round(v, 1) for v in box], "face_detected": detected,
                 **({"emotion": None, "confidence": None, "probabilities": None} if np.isnan(p).any() else
                    {"emotion": self.class_names[int(p.argmax())], "confidence": float(p.max()),
                     "probabilities": dict(zip(self.class_names, map(float, p)))})}
                for (box, detected, _), p in zip(faces, probs)]

    def face_probabilities(self, faces):
        """Class probabilities (N, K) of faces() entries in one pass; a row of NaN where there is no crop (no face
        found)."""
        probs = np.full((len(faces), len(self.class_names)), np.nan, np.float32)
        found = [i for i, face in enumerate(faces) if face.crop is not None]
        if found:
            probs[found] = self.classify(np.stack([faces[i].crop for i in found]))
        return probs

    def __call__(self, image, boxes=None):
        faces = self.faces(image, boxes)
        return self.describe(faces, self.face_probabilities(faces))


# ---------------------------------------------------------------------------------------------
# Inputs: photos, folders, videos, cameras and list files
# ---------------------------------------------------------------------------------------------

CAMERA = r"camera:\d{1,4}"  # a camera input: OpenCV's device index N


@dataclass
class MediaSource:
    """One input of predict.py: an image, a video, a camera, or what a folder holds."""
    kind: str  # image | video | camera | ignored (in a folder, neither image nor video) | error
    path: str
    name: str = ""  # its annotated copy's path under annotated/
    error: str = ""


def read_list_files(specs):
    """The command line's inputs with each @list.txt replaced by its entries (list_file_lines), one input a line: a
    relative path is taken from the list's folder where it is there, else from the current folder where it is there;
    one in neither is named as beside the list."""
    parts = []
    for spec in specs:
        if not spec.startswith("@"):
            parts.append(spec)
            continue
        listing = user_path(spec[1:])
        try:
            lines = list_file_lines(listing)
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{spec}: cannot read the list file {listing}: {e}") from None
        for _, line in lines:
            beside = listing.parent / user_path(line)
            try:  # a missing input is named where it was looked for: beside the list
                from_list_folder = beside.exists() or not (user_path(line).exists() or re.fullmatch(CAMERA, line))
                parts.append(os.path.normpath(beside) if from_list_folder else line)
            except OSError:  # a name too long, a folder this user may not enter: the input fails on its own
                parts.append(line)
    if not parts:
        raise UserError(f"{' '.join(specs)!r} names no input")
    return parts


def folder_sources(path):
    """The MediaSources of a folder, searched recursively (hidden files and folders skipped), without the pictures of
    predict.py's own output folders inside it (annotated/, explain/ and timelines/ beside a predictions.csv: the
    default outputs/ under the current folder); a folder that is both (--output_dir=photos) keeps its photos."""
    passed_over = []
    try:
        files = folder_files(path, passed_over)
    except OSError as e:
        return [MediaSource("error", str(path), error=f"cannot list the folder: {e.strerror or e}")]
    ours = {f.parent for f in files if f.name == "predictions.csv"}  # a killed run's has no summary.json
    pictures = {folder / sub for folder in ours for sub in PICTURE_FOLDERS}
    files = [f for f in files if not pictures & set(f.parents) and
             not (f.parent in ours and f.name in ("predictions.csv", "summary.json"))]
    kinds = ["image" if f.suffix.lower() in IMAGE_EXTS else "video" if f.suffix.lower() in VIDEO_EXTS else
             "ignored" for f in files]
    found = [MediaSource(k, str(f), str(Path(path.resolve().name) / f.relative_to(path))) for k, f in zip(kinds, files)]
    found += [MediaSource("error", str(f), error=why) for f, why in passed_over]
    if not {"image", "video"} & set(kinds):
        found.append(MediaSource("error", str(path), error="no images or videos in this folder"))
    return found


def prediction_inputs(specs):
    """The MediaSources of the command line's inputs: paths, camera:N, or @list.txt; folders as folder_sources
    finds them; a file named on its own with an unknown extension is tried as an image."""
    found = []
    for part in read_list_files(specs):
        if re.fullmatch(CAMERA, part):
            found.append(MediaSource("camera", part, part.replace(":", "_")) if int(part[7:]) < 100 else
                         MediaSource("error", part, error="a camera's index is below 100 (OpenCV reads N from 100 up "
                                                          "as another backend's camera N % 100)"))
            continue
        path = user_path(part)
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            found.append(MediaSource("error", str(path), error="no such file or folder"))
            continue
        except OSError as e:  # a name too long, a folder this user may not enter
            found.append(MediaSource("error", str(path), error=f"cannot read it: {e.strerror or e}"))
            continue
        if stat.S_ISDIR(mode):
            found += folder_sources(path)
        elif stat.S_ISREG(mode):
            found.append(MediaSource("video" if path.suffix.lower() in VIDEO_EXTS else "image", str(path), path.name))
        else:  # a device or a pipe, whose reading may never end
            found.append(MediaSource("error", str(path), error="not a file or folder (a camera is camera:N)"))
    return found


# ---------------------------------------------------------------------------------------------
# Batches: images decoded ahead, faces gathered across images and frames
# ---------------------------------------------------------------------------------------------

def image_pixels(image):
    """Pixels of a decoded image (0: none, an input that failed)."""
    return 0 if image is None else image.shape[0] * image.shape[1]


def in_batches(prepared, max_faces, max_items):
    """Group prepared items (tuples ending in image, faces) into lists of about max_faces faces, at most
    max_items items and BUFFER_PIXELS pixels: one forward pass each."""
    ready, faces, pixels = [], 0, 0
    for item in prepared:
        ready.append(item)
        faces += len(item[-1])
        pixels += image_pixels(item[-2])
        if faces >= max_faces or len(ready) >= max_items or pixels >= BUFFER_PIXELS:
            yield ready
            ready, faces, pixels = [], 0, 0
    if ready:
        yield ready


def classify_batch(predictor, ready):
    """face_probabilities of every face of a batch of prepared items (tuples ending in faces) in one pass, split
    back per item."""
    probs = predictor.face_probabilities([face for *_, item_faces in ready for face in item_faces])
    return np.split(probs, np.cumsum([len(item[-1]) for item in ready])[:-1])


# ---------------------------------------------------------------------------------------------
# Outputs: predictions.csv, summary.json, annotated copies, explanations
# ---------------------------------------------------------------------------------------------

def say(line, stream=None):
    """Print a line for the user. A reader that has gone (head, less then q: a closed pipe) ends the printing, not
    the run: the stream's descriptor then points at /dev/null (Python's recipe: no flush at exit fails either)."""
    stream = stream or sys.stdout
    try:
        tqdm.write(line, file=stream)
        stream.flush()
    except OSError as e:
        if not isinstance(e, BrokenPipeError) and not (os.name == "nt" and e.errno == errno.EINVAL):  # Windows' way
            raise
        with contextlib.suppress(OSError, ValueError):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, stream.fileno())
            os.close(null)


class EmotionTally:
    """A running count of the rows each emotion tops and their summed probabilities: a video's emotion_shares in
    constant memory."""

    def __init__(self, classes):
        self.rows, self.tops, self.sums = 0, np.zeros(classes, np.int64), np.zeros(classes)

    def add(self, probs):
        if not np.isnan(probs).any():
            self.rows += 1
            self.tops[np.argmax(probs)] += 1
            self.sums += probs

    def shares(self, class_names):
        """{emotion: share of the rows it tops}, and the dominant emotion: the largest share; between equal shares,
        the larger mean probability (not the class listed first)."""
        if not self.rows:
            return {}, None
        dominant = np.lexsort((self.sums, self.tops))[-1]  # sorted by share, then by mean probability
        return dict(zip(class_names, map(float, self.tops / self.rows))), class_names[int(dominant)]


def emotion_shares(probs, class_names):
    """EmotionTally.shares of a list of (smoothed) probabilities; rows without a face (NaN) are not counted."""
    tally = EmotionTally(len(class_names))
    for p in probs:
        tally.add(np.asarray(p))
    return tally.shares(class_names)


def source_line(entry):
    """The console's line for one input: what was found and classified, and the top emotion."""
    if entry.get("error"):
        return f"{entry['source']}: error: {entry['error']}"
    warnings = "".join(f"; warning: {w}" for w in entry.get("warnings", []))
    image = entry["kind"] == "image"
    if image and entry["no_face"]:
        return f"{entry['source']}: no face{warnings}"
    dominant, classified = entry["dominant_emotion"], entry["rows"] - entry["no_face"]
    whole = entry["whole"] > 0  # --detect_faces=false: each image or frame is the face
    top = entry["emotion_share"].get(dominant, 0.0)  # counts for a photo: "100%" of one face read as a confidence
    tied = [k for k, v in entry["emotion_share"].items() if v == top and k != dominant]
    if not dominant:
        share = ""
    elif image:
        share = f"; emotion {dominant}" if whole else f"; top emotion {dominant} ({round(top * classified)} of " \
                                                      f"{classified} face(s))"
    else:
        share = f"; top emotion {dominant} ({top:.0%} of the {'frames' if whole else 'faces'})"
    if dominant and tied:  # EmotionTally.shares: between equal shares, the larger mean probability
        share += f", as many as {', '.join(tied)} (the higher mean probability decided)"
    frames = "" if image else f"{entry['frames']} frames, " + ("" if whole else f"{entry['tracks']} face track(s), ")
    found = f"whole {'image' if image else 'frames'} classified" if whole else \
        f"{entry['faces']} face(s) detected" if image else f"{entry['faces']} face detection(s)"
    no_face = f", {entry['no_face']} frame(s) without a face" if entry["no_face"] else ""
    return f"{entry['source']}: {frames}{found}{no_face}, {entry['rows']} row(s){share}{warnings}"


class PredictionOutputs:
    """One prediction folder: predictions.csv written and flushed row by row (an interrupted run keeps what was
    done), annotated copies, timelines, and summary.json; JSON lines on stdout when asked."""

    def __init__(self, out_dir, class_names, jsonl):
        self.dir, self.class_names, self.jsonl = Path(out_dir), class_names, jsonl
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file = open(self.dir / "predictions.csv", "w", newline="", encoding="utf-8", errors="surrogateescape")
        self.csv = csv.writer(self.file)
        self.csv.writerow(CSV_COLUMNS + list(class_names))
        self.sources, self.claimed = [], set()

    def rows(self, source, frame, time_s, faces, rows, face_ids):
        for (box, detected, _), row, face in zip(faces, rows, face_ids):
            self.csv.writerow([source, "" if frame is None else frame, "" if time_s is None else f"{time_s:.3f}", face,
                               *(f"{v:.1f}" for v in box), str(detected).lower(), row["emotion"] or "",
                               *(["", *[""] * len(self.class_names)] if row["emotion"] is None else
                                 [f"{row['confidence']:.4f}", *(f"{v:.4f}" for v in row["probabilities"].values())])])
            if self.jsonl:
                say(json.dumps({"source": source, "frame": frame, "time_s": time_s, "face": face, **row}))
        self.file.flush()

    def claim(self, name, suffix=None):
        """A path (under annotated/, explain/ or timelines/) that nothing else of this call has (name_2, name_3, ...)."""
        path = Path(name).with_suffix(suffix) if suffix else Path(name)
        stem, n = path.with_suffix(""), 1
        while path in self.claimed:
            n += 1
            path = Path(f"{stem}_{n}{path.suffix}")
        self.claimed.add(path)
        return path

    def path(self, name, folder="annotated"):
        path = self.dir / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def source(self, entry):
        """Record one source's summary and print its line (errors, and everything when stdout carries JSON
        lines, to stderr)."""
        self.sources.append(entry)
        say(source_line(entry), sys.stderr if self.jsonl or entry.get("error") else sys.stdout)

    def close(self, extra):
        try:
            self.file.close()  # its buffered rows written: a full disk refuses them here too
        except OSError as e:
            raise UserError(f"could not write {self.dir / 'predictions.csv'}: {e.strerror or e}; free some space or "
                            f"choose another --output_dir") from None
        errors = [{"source": s["source"], "error": s["error"]} for s in self.sources if s.get("error")]
        write_json({**extra, "sources": self.sources, "errors": errors}, self.dir / "summary.json")
        return errors


def drawable(row):
    """A row's emotion as OpenCV's Hershey font can draw it (printable ASCII; it draws anything else as "?"): accents
    dropped (Überraschung: Uberraschung); a name with any other letter (生气, złość) or none as its class id ("class
    3": its number in the YOLO labels, and the order of predictions.csv's probability columns)."""
    letters = "".join(c for c in unicodedata.normalize("NFKD", row["emotion"]) if not unicodedata.combining(c))
    if letters and all(" " <= c <= "~" for c in letters):
        return letters
    return f"class {list(row['probabilities']).index(row['emotion'])}"


def annotate(image, faces, rows, tracks=None):
    """A BGR copy of an RGB image with each face's box, emotion and confidence (and track number)."""
    out = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    thick = max(1, round(min(image.shape[:2]) / 300))  # lines and letters grow with the image: 1 px up to 450 px
    font_scale = 0.4 * thick  # 0.4: about 9 px tall letters per unit of thickness
    for j, ((box, detected, _), row) in enumerate(zip(faces, rows)):
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        color = (60, 200, 60) if detected else (0, 165, 255)  # green: a face; orange: the whole image
        label = "no face" if row["emotion"] is None else f"{drawable(row)} {row['confidence']:.2f}"
        if tracks is not None and tracks[j] != WHOLE_FRAME:
            label = f"#{tracks[j]} " + label
        cv2.rectangle(out, (x1, y1), (x2 - 1, y2 - 1), color, thick)
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thick)
        ty = y1 - 2 if y1 - th - base - 2 >= 0 else min(y2, out.shape[0]) - base - 2  # above the box, else inside
        cv2.rectangle(out, (x1, ty - th - base), (x1 + tw + 2, ty + base), color, -1)
        cv2.putText(out, label, (x1 + 1, ty), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), thick, cv2.LINE_AA)
    return out


def plot_explanation(face, explanation, probs, class_names, title, path):
    """One face: the crop as the network saw it, each stage's spatial-attention gate, Grad-CAM of the predicted
    class, the class probabilities and the context distribution q over the emotion prototypes."""
    plt = pyplot()
    gates, cam, q = explanation["gates"], explanation["gradcam"], explanation["q"]
    stages = 0 if gates is None else gates.shape[0]
    fig, axes = plt.subplots(1, 4 + max(stages, 1), figsize=(2.2 * (4 + max(stages, 1)) + 1.5, 2.8),
                             gridspec_kw={"width_ratios": [1] * (2 + max(stages, 1)) + [1.6, 1.6]})
    axes[0].imshow(face.transpose(1, 2, 0))
    axes[0].set_title("crop (network input)", fontsize=8)
    axes[0].axis("off")
    for j in range(stages):
        overlay(axes[1 + j], face, gates[j], f"stage {j + 1} spatial attention\n(gate {gates[j].min():.2f}-{gates[j].max():.2f})",
                gates[j].min(), max(gates[j].max(), gates[j].min() + 1e-6))
    if not stages:
        axes[1].text(0.5, 0.5, "no spatial attention\n(--spatial_attention=false)", ha="center", va="center", fontsize=8)
        axes[1].axis("off")
    k = int(probs.argmax())
    overlay(axes[1 + max(stages, 1)], face, cam, f"Grad-CAM: {class_names[k]}")
    for ax, values, name in ((axes[-2], probs, "probabilities"), (axes[-1], q, "context q (prototypes)")):
        if values is None:
            ax.text(0.5, 0.5, "no context module\n(--context=false)", ha="center", va="center", fontsize=8)
            ax.axis("off")
            continue
        ax.barh(range(len(class_names)), values, color=["tab:red" if i == k else "tab:gray" for i in range(len(class_names))])
        ax.set_yticks(range(len(class_names)), class_names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_title(name, fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path, dpi=100)


def write_explanations(predictor, out, stem, faces, probs, face_ids):
    """--explain: explain/STEM_face{id}.png for every face (STEM keeps the source's subfolder, as annotated/ does);
    the probabilities and the class whose Grad-CAM is drawn are those of the CSV (with the checkpoint's test-time
    views), the maps and q those of the crop itself. Returns the problem, if a picture could not be written (the
    source's warning: the rows stand)."""
    kept = [(face, p, i) for face, p, i in zip(faces, probs, face_ids) if face.crop is not None]
    if not kept:
        return None
    maps = explain_faces(predictor.model, np.stack([face.crop for face, _, _ in kept]), predictor.mean, predictor.std,
                         predictor.device, target=np.array([p.argmax() for _, p, _ in kept]))
    shown = stem.encode(errors="backslashreplace").decode()  # a name that is not UTF-8: matplotlib refuses it
    for j, (face, p, face_id) in enumerate(kept):
        title = f"{shown}, {f'face {face_id}' if face.detected else 'whole image'}: " \
                f"{predictor.class_names[int(p.argmax())]} {p.max():.2f}"
        name = out.claim(f"{stem}_{'whole' if face_id == WHOLE_FRAME else f'face{face_id}'}.png")  # unique, as annotated/'s
        try:
            plot_explanation(face.crop, {k: None if v is None else v[j] for k, v in maps.items()}, p,
                             predictor.class_names, title, out.path(name, "explain"))
        except (UserError, OSError) as e:  # a name too long for the disk, a full disk
            return f"--explain: {e}"
    return None


# ---------------------------------------------------------------------------------------------
# Photos
# ---------------------------------------------------------------------------------------------

def predict_images(predictor, sources, out, progress, args):
    """Images, decoded and searched for faces in threads, classified args.batch faces at a time."""
    def prepare(source):
        try:
            image, _ = decode_image(source.path)
            return source, None, image, predictor.faces(image)
        except (ValueError, OSError, cv2.error) as e:
            return source, opencv_message(e) if isinstance(e, cv2.error) else str(e), None, []

    threads = cpu_threads()
    with ThreadPoolExecutor(threads) as pool:  # cv2 releases the GIL: decoding overlaps classification
        prepared = ordered_prefetch(prepare, sources, pool, 2 * threads,
                                    lambda item: image_pixels(item[-2]))
        for ready in in_batches(prepared, args.batch, args.batch):
            for (source, error, image, faces), probs in zip(ready, classify_batch(predictor, ready)):
                progress.update()
                if error:
                    out.source({"source": source.path, "kind": "image", "error": error})
                    continue
                rows = predictor.describe(faces, probs)
                ids = [i if face.detected else WHOLE_FRAME for i, face in enumerate(faces)]
                suffix = Path(source.name).suffix.lower()  # OpenCV writes no .jfif: its JPEG is a .jpg
                name = out.claim(source.name, ".jpg" if suffix == ".jfif" else None if suffix in IMAGE_EXTS else ".png")
                annotated = out.path(name)
                warnings = []
                if args.explain:
                    warnings.append(write_explanations(predictor, out, str(name.with_suffix("")), faces, probs, ids))
                try:
                    write_image(annotated, annotate(image, faces, rows))
                except OSError as e:
                    warnings.append(f"could not write {annotated}: {e.strerror or e}")
                    annotated = None
                share, dominant = emotion_shares(probs, predictor.class_names)
                detected, no_face = sum(face.detected for face in faces), sum(face.crop is None for face in faces)
                with ctrl_c_deferred():  # the image's rows and its summary entry are written together
                    out.rows(source.path, None, None, faces, rows, ids)
                    out.source({"source": source.path, "kind": "image", "frames": 1,
                                "faces": detected, "whole": len(faces) - detected - no_face, "no_face": no_face,
                                "rows": len(faces), "dominant_emotion": dominant, "emotion_share": share,
                                "annotated": None if annotated is None else str(annotated), "error": None,
                                "warnings": [w for w in warnings if w]})


# ---------------------------------------------------------------------------------------------
# Videos and cameras
# ---------------------------------------------------------------------------------------------

def opencv_path(path):
    """path as OpenCV's file calls (videos) must have it: they encode a str in UTF-8 and crash (SIGSEGV) on one that
    cannot be, which is what Python makes of a name whose bytes are not UTF-8 (Latin-1, from an old archive), and of
    any non-ASCII name under an ASCII locale without Python's UTF-8 mode. The name's bytes read as UTF-8 are what
    OpenCV opens; a name that is not UTF-8 is a ValueError."""
    name = os.fsencode(path).decode("utf-8", "surrogateescape")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"OpenCV cannot open a file whose name is not UTF-8: {ascii(str(path))}; rename it") from None
    return name


def video_frames(capture, every, max_frames, fps):
    """(frame index, time in seconds, RGB frame) of every `every`-th frame (the others are grabbed, neither
    converted nor classified). A file's time is the frame's own timestamp, right for variable-frame-rate video
    (phones, browsers, screen recorders), where index / fps drifts; where the container gives none, it is
    counted on from the last one at fps. fps 0 (a camera): the wall clock since the first frame; a camera's failed
    read or grab is tried again for CAMERA_PATIENCE seconds before the camera counts as stopped."""
    start, index, classified, last = None, 0, 0, (0, -1.0)  # last: (index, time) of the last stamped frame
    while not max_frames or classified < max_frames:
        skipped = index % every
        read = (lambda: (capture.grab(), None)) if skipped else capture.read
        ok, frame = read()
        deadline = time.monotonic() + CAMERA_PATIENCE
        while not ok and not fps and time.monotonic() < deadline:
            time.sleep(0.05)
            ok, frame = read()
        if not ok:
            return
        if not skipped:
            classified += 1
            start = start or time.monotonic()  # a camera's clock starts at its first frame, not at its opening
            if fps:
                stamp = capture.get(cv2.CAP_PROP_POS_MSEC) / 1000
                last = (index, stamp if stamp > last[1] else max(0.0, last[1]) + (index - last[0]) / fps)
            yield index, last[1] if fps else time.monotonic() - start, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        index += 1


class FaceTracker:
    """A video's faces across frames: each face continues the live track whose last box it overlaps most
    (IoU >= min_iou, best pairs first) or starts a new one; a track ends once its face has gone unseen for more than
    max_gap seconds and at least min_missed classified frames. Each track's probabilities are smoothed
    exponentially in time: its past keeps smoothing ** (elapsed / SMOOTHING_STEP) of the weight (0 = raw). Where the
    frames change size (a WebRTC stream rescales to its bandwidth) the tracks' boxes are rescaled with them."""

    def __init__(self, smoothing, min_iou=TRACK_IOU, max_gap=TRACK_MAX_GAP, min_missed=TRACK_MIN_MISSED):
        self.min_iou, self.max_gap, self.min_missed, self.smoothing = min_iou, max_gap, min_missed, smoothing
        self.tracks, self.next_id = {}, 0  # id -> {"box", "seen" (s), "missed", "probs"}
        self.size = None  # the last frame's (width, height)

    def update(self, faces, probs, now, size=None):
        """Track numbers and smoothed probabilities of one frame's faces at time now (s; whole-frame rows share
        WHOLE_FRAME); size: the frame's (width, height) (None: as the last frame's)."""
        if size is not None and self.size is not None and size != self.size:
            sx, sy = size[0] / self.size[0], size[1] / self.size[1]
            for track in self.tracks.values():
                x1, y1, x2, y2 = track["box"]
                track["box"] = (x1 * sx, y1 * sy, x2 * sx, y2 * sy)
        self.size = size or self.size
        pairs = sorted(((box_iou(t["box"], box), tid, j) for tid, t in self.tracks.items() if tid != WHOLE_FRAME
                        for j, (box, detected, _) in enumerate(faces) if detected), reverse=True)
        match = {}
        for iou, tid, j in pairs:
            if iou >= self.min_iou and j not in match and tid not in match.values():
                match[j] = tid
        ids, smoothed = [], []
        for j, ((box, detected, _), p) in enumerate(zip(faces, probs)):
            tid = match.get(j, WHOLE_FRAME if not detected else None)
            if tid is None:
                tid, self.next_id = self.next_id, self.next_id + 1
            ids.append(tid)
            if np.isnan(p).any():  # no face: nothing to smooth or keep
                smoothed.append(p)
                continue
            track = self.tracks.get(tid)
            if track is not None:
                steps = (now - track["seen"]) / SMOOTHING_STEP  # a frame of no later time counts one step
                keep = self.smoothing ** (steps if steps > 0 else 1)
                p = keep * track["probs"] + (1 - keep) * p
            self.tracks[tid] = {"box": box, "seen": now, "missed": 0, "probs": p}
            smoothed.append(p)
        for tid in [t for t in self.tracks if t not in ids]:
            track = self.tracks[tid]
            track["missed"] += 1
            if track["missed"] >= self.min_missed and now - track["seen"] > self.max_gap:
                del self.tracks[tid]
        return ids, smoothed


def open_video(source):
    """(capture, frames per second (0: a camera, timed by its clock), frame count (0: unknown), warnings) of a video
    file or a camera; ValueError saying why it cannot be opened."""
    camera = source.kind == "camera"
    try:
        capture = cv2.VideoCapture(int(source.path.split(":")[1]) if camera else opencv_path(source.path))
    except cv2.error as e:
        raise ValueError(f"OpenCV cannot open it: {opencv_message(e)}") from None
    if not capture.isOpened():
        raise ValueError("cannot open the camera" if camera else
                         "cannot open the video (unreadable, or a format this OpenCV cannot decode)")
    if camera:
        return capture, 0.0, 0, []
    fps, total = frame_rate(capture), int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    if fps:
        return capture, fps, total, []
    return capture, FALLBACK_FPS, total, [f"the container gives no frame rate; times assume {FALLBACK_FPS:g} frames "
                                          f"per second"]


def frame_rate(capture):
    """The frames per second a capture gives, or None where it gives none to use: a camera's driver may say -1, and
    a header 0, NaN or infinity."""
    rate = capture.get(cv2.CAP_PROP_FPS)
    return rate if math.isfinite(rate) and rate > 0 else None


def codec_name(capture):
    """The video's codec as its container names it (FourCC: 'codec avc1'), for a message."""
    code = int(capture.get(cv2.CAP_PROP_FOURCC))
    text = "".join(chr((code >> 8 * i) & 0xFF) for i in range(4)).strip("\x00 ")
    return f"codec {text}" if code > 0 and text.isprintable() and text else "codec unknown"


def ended_early(last_time, total, fps, every, estimated=False):
    """Whether a video file (fps > 0) whose last classified frame came at last_time (s) stopped short of the total
    frames its header announces: its time ends more than a slack after that frame. The slack is 2.5 strides (the
    frames grabbed after the last classified one are not timed; a variable frame rate's count is an estimate), and
    where the count is estimated (ESTIMATED_COUNTS: the duration, which the audio may lengthen, times fps) up to a
    second, a tenth of the video."""
    slack = max(2.5 * every / fps, min(1.0, 0.1 * total / fps) if estimated else 0.0)
    return last_time + slack < total / fps


class AnnotatedVideo:
    """A video's annotated copy, opened at its first frame at nominal_rate() (at most ANNOTATED_FPS); a failure is a
    warning, not an error. A file's copy keeps the file's time: a frame is repeated through a gap (a variable frame
    rate; at most STILL_SECONDS of still) and left out where frames crowd. A camera's holds one frame per classified
    frame: repeating frames to keep the wall clock's time would slow the capture loop, which would lengthen the next
    gap."""

    def __init__(self, path, nominal_rate, camera, warnings):
        self.path, self.nominal_rate, self.camera, self.warnings = path, nominal_rate, camera, warnings
        self.writer, self.rate, self.written = None, None, 0  # writer: False where it could not be opened
        self.size, self.resized = None, False  # the first frame's (width, height): the writer drops frames of another
        # size unheard

    def write(self, frame, t):
        if self.writer is None:
            self.rate = min(self.nominal_rate(), ANNOTATED_FPS)
            try:  # three decimals: OpenCV asks MPEG-4 for 1000 ticks a frame of an uneven rate, and MPEG-4 takes at
                # most 65535 a second (119.767 fps, a slow-motion clip's: no video before)
                self.size = frame.shape[1::-1]
                self.writer = cv2.VideoWriter(opencv_path(self.path), cv2.VideoWriter_fourcc(*"mp4v"),
                                              max(round(self.rate, 3), 0.001), self.size)
                problem = None if self.writer.isOpened() else "this OpenCV cannot write mp4v video"
            except ValueError as e:  # an --output_dir whose name is not UTF-8
                problem = str(e)
            if problem:
                self.writer = False
                self.warnings.append(f"{problem}: no annotated video")
        if self.writer and frame.shape[1::-1] != self.size:  # a stream that changes resolution (WebRTC, screens)
            if not self.resized:
                self.warnings.append(f"the frames changed size from {self.size[0]}x{self.size[1]} to "
                                     f"{frame.shape[1]}x{frame.shape[0]}; the annotated video shows them scaled "
                                     f"into the first size, with black bars")
                self.resized = True
            frame = letterboxed(frame, self.size)
        if self.writer and self.camera:
            self.writer.write(frame)
        elif self.writer:
            slot = round(t * self.rate)
            self.written = max(self.written, slot - round(STILL_SECONDS * self.rate))
            for _ in range(slot + 1 - self.written):
                self.writer.write(frame)
            self.written = max(self.written, slot + 1)

    def close(self):
        if self.writer:
            self.writer.release()


def letterboxed(frame, size):
    """frame scaled to fit size (width, height) whole, its shape kept, on black bars."""
    scale = min(size[0] / frame.shape[1], size[1] / frame.shape[0])
    w, h = max(1, round(frame.shape[1] * scale)), max(1, round(frame.shape[0] * scale))
    out = np.zeros((size[1], size[0], 3), np.uint8)
    x, y = (size[0] - w) // 2, (size[1] - h) // 2
    out[y:y + h, x:x + w] = cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA)
    return out


class Timeline:
    """Each face track's (smoothed) probabilities over a video's time, for plot_timeline, in memory bounded however
    long the video or camera runs: a track's points are averaged in pairs once it holds TIMELINE_POINTS (and its
    later frames in groups as large, so each point is the mean of equally many frames; the last unfinished group's
    frames are not drawn), and the points of ended tracks it will not draw (all but the TIMELINE_TRACKS longest) are
    dropped once it holds 4x that many tracks."""

    def __init__(self):
        self.times, self.probs, self.frames = {}, {}, Counter()
        self.group = defaultdict(lambda: 1)  # frames averaged into one point
        self.pending = {}  # (frames, sum of times, sum of probabilities) of the group begun

    def add(self, tid, t, probs):
        self.frames[tid] += 1
        n, t_sum, p_sum = self.pending.pop(tid, (0, 0.0, 0.0))
        n, t_sum, p_sum = n + 1, t_sum + t, p_sum + np.asarray(probs, dtype=float)
        if n < self.group[tid]:
            self.pending[tid] = n, t_sum, p_sum
            return
        times, track_probs = self.times.setdefault(tid, []), self.probs.setdefault(tid, [])
        times.append(t_sum / n)
        track_probs.append(p_sum / n)
        if len(times) == TIMELINE_POINTS:
            times[:] = np.reshape(times, (-1, 2)).mean(1).tolist()
            track_probs[:] = list(np.reshape(track_probs, (-1, 2, len(track_probs[0]))).mean(1))
            self.group[tid] *= 2

    def forget(self, live):
        """Drop the ended tracks it will not draw (live: the tracker's tracks). Done once it holds 4x the tracks
        drawn, not at every frame (a sort)."""
        if len(self.frames) > 4 * TIMELINE_TRACKS:
            kept = set(live) | set(self.longest())
            for tid in set(self.frames) - kept:
                for held in (self.times, self.probs, self.frames, self.group, self.pending):
                    held.pop(tid, None)

    def longest(self):
        """The TIMELINE_TRACKS tracks of the most frames, in the order of their numbers."""
        return sorted(sorted(self.times, key=lambda k: -self.frames[k])[:TIMELINE_TRACKS])


def plot_timeline(timeline, class_names, title, path):
    """Probability of each emotion over a video's time, one panel per track (the longest TIMELINE_TRACKS)."""
    plt = pyplot()
    shown = timeline.longest()
    fig, axes = plt.subplots(max(1, len(shown)), 1, figsize=(11, 2.6 * max(1, len(shown))), squeeze=False)
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for ax, tid in zip(axes[:, 0], shown):
        t, p = np.array(timeline.times[tid], dtype=float), np.array(timeline.probs[tid], dtype=float)
        if len(t) > 2:  # a line only where the face was seen: a gap of frames without it is left blank, not bridged
            gaps = np.flatnonzero(np.diff(t) > 2 * np.median(np.diff(t))) + 1
            t, p = np.insert(t, gaps, np.nan), np.insert(p, gaps, np.nan, axis=0)
        for k, name in enumerate(class_names):  # a track of one frame: dots, which a line of one point is not
            ax.plot(t, p[:, k], "-" if len(t) > 1 else "o", lw=1.3, ms=4, color=cmap(k % cmap.N), label=name)
        ax.set_ylim(0, 1)
        ax.set_ylabel("probability")
        ax.set_title("whole frames (--detect_faces=false)" if tid == WHOLE_FRAME else f"face track #{tid}", fontsize=9)
        ax.grid(alpha=0.3)
    if not shown:
        axes[0, 0].set_title("no faces")
    else:
        axes[0, 0].legend(ncol=min(8, len(class_names)), fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("time (s)")
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path, dpi=100)


def predict_video(predictor, source, out, args):
    """A video file or a camera, frame by frame: faces tracked, classified args.batch faces at a time (a camera
    one frame at a time, for latency), rows written as they come; an annotated video at the source's frame rate
    divided by --every (at most ANNOTATED_FPS), as long as a file is (a camera's at its nominal rate), and a
    timeline."""
    entry = {"source": source.path, "kind": source.kind, "error": None, "warnings": []}
    camera = source.kind == "camera"
    try:
        capture, fps, total, entry["warnings"] = open_video(source)
    except ValueError as e:
        return {**entry, "error": str(e)}
    expected = -(-total // args.every) if total > 0 else None
    if expected and args.max_frames:
        expected = min(expected, args.max_frames)
    tracker, window, interrupted, ctrl_c, last_time = FaceTracker(args.smoothing), None, False, False, 0.0
    explaining = args.explain
    timeline, counts = Timeline(), Counter()
    tallies = {True: EmotionTally(len(predictor.class_names)), False: EmotionTally(len(predictor.class_names))}  # of
    # the face rows (True) and the whole frames
    try:
        name = out.claim(source.name, ".mp4")
        annotated, timeline_path = out.path(name), out.path(name.with_suffix(".png"), "timelines")
        video = AnnotatedVideo(annotated, lambda: (fps or frame_rate(capture) or FALLBACK_FPS) / args.every,
                               camera, entry["warnings"])  # a camera's rate is read at its first frame
    except BaseException:  # an output folder that cannot be made: the camera is not held until the process ends
        capture.release()
        raise

    def prepare(frame):
        return (*frame, predictor.faces(frame[2], still=False))

    def show(frame):
        nonlocal window
        try:
            cv2.imshow(str(name), frame)
            cv2.waitKey(1)
            window = True
        except cv2.error:
            window = False
            entry["warnings"].append("--show needs OpenCV with a GUI (opencv-python, not opencv-python-headless) and "
                                     "a display: nothing shown")

    frame_pixels = max(1.0, capture.get(cv2.CAP_PROP_FRAME_WIDTH) * capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    codec = codec_name(capture)
    frames_per_batch = 1 if camera else int(min(args.batch, max(1, BUFFER_PIXELS // frame_pixels)))
    bar = tqdm(total=expected, desc=source.name, unit="frame", leave=False, disable=None)
    try:
        with ThreadPoolExecutor(cpu_threads()) as pool:  # detection of the next frames overlaps classification
            prepared = ordered_prefetch(prepare, video_frames(capture, args.every, args.max_frames, fps), pool,
                                       frames_per_batch)
            for batch in in_batches(prepared, args.batch, frames_per_batch):
                for (index, t, image, faces), probs in zip(batch, classify_batch(predictor, batch)):
                    with ctrl_c_deferred():  # the summary stays in step with the CSV
                        ids, smoothed = tracker.update(faces, probs, t, image.shape[1::-1])
                        out.rows(source.path, index, t, faces, predictor.describe(faces, probs), ids)
                        for tid, track_p, (_, detected, crop) in zip(ids, smoothed, faces):
                            if crop is None:
                                counts["no_face"] += 1
                                continue
                            timeline.add(tid, t, track_p)
                            tallies[detected].add(track_p)
                        counts["frames"] += 1
                        last_time = t
                        timeline.forget(tracker.tracks)
                    if explaining:
                        problem = write_explanations(predictor, out, f"{name.with_suffix('')}_frame{index:06d}",
                                                     faces, probs, ids)
                        if problem:  # the next frames' pictures would fail alike
                            entry["warnings"].append(f"{problem}; no more pictures of this source")
                            explaining = False
                    frame = annotate(image, faces, predictor.describe(faces, smoothed), ids)  # the smoothed track
                    video.write(frame, t)
                    if args.show and window is not False:
                        show(frame)
                    bar.update()
    except KeyboardInterrupt as e:  # Ctrl-C: a camera's normal end; a video's, or SIGTERM, recorded, stops the run
        entry["warnings"].append(f"stopped by {'SIGTERM' if isinstance(e, Terminated) else 'Ctrl-C'}")
        interrupted, ctrl_c = not camera or isinstance(e, Terminated), True
    except cv2.error as e:
        entry["error"] = f"OpenCV failed after {counts['frames']} frames: {opencv_message(e)}"
    finally:
        try:
            with ctrl_c_deferred():  # a second Ctrl-C (people press it twice) leaves the annotated video whole
                bar.close()
                video.close()  # before the capture, whose release can wait on a camera
                capture.release()
                if window:
                    cv2.destroyAllWindows()
        except KeyboardInterrupt:  # then stops the run, once this source's entry is recorded
            interrupted = True
    if not counts["frames"] and not entry["error"]:
        count = f"{total} frames" if total > 0 else "no frame count"
        entry["error"] = "no frame could be decoded" + ("" if camera else f" ({codec}, {count} in its header): a "
                                                        f"codec this OpenCV lacks, or a damaged file")
    suffix = Path(source.path).suffix.lower()
    cut = not ctrl_c and not entry["error"] and counts["frames"]  # Ctrl-C or OpenCV's failure: said already
    if cut and expected and counts["frames"] < expected and suffix not in UNCHECKED_COUNTS and \
            ended_early(last_time, total, fps, args.every, suffix in ESTIMATED_COUNTS):
        entry["warnings"].append(f"the video ended after {counts['frames']} of the {expected} frames its header announces")
    if cut and camera and counts["frames"] != args.max_frames:  # a camera ends at Ctrl-C or --max_frames, else it failed
        entry["warnings"].append(f"the camera stopped delivering frames after {counts['frames']} (unplugged, or taken "
                                 f"by another program)")
    tally = tallies[True] if tallies[True].rows else tallies[False]  # faces; if none, whole frames
    share, dominant = tally.shares(predictor.class_names)
    faces, whole, no_face = tallies[True].rows, tallies[False].rows, counts["no_face"]
    entry.update(frames=counts["frames"], fps=fps or None, faces=faces, whole=whole, no_face=no_face,
                 tracks=tracker.next_id, rows=faces + whole + no_face, dominant_emotion=dominant,
                 emotion_share=share, annotated=str(annotated) if video.writer else None)
    if counts["frames"]:
        try:
            plot_timeline(timeline, predictor.class_names, f"{source.path} (smoothing {args.smoothing})", timeline_path)
            entry["timeline"] = str(timeline_path)
        except UserError as e:  # the rows stand, as where an annotated copy cannot be written
            entry["warnings"].append(str(e))
    if interrupted:
        out.source(entry)
        raise KeyboardInterrupt
    return entry


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def run_prediction(args, specs):
    """Every input into one output folder. Returns the exit status: 0 when every input was read, 1 when some
    were not (each named, with its reason, on stderr and in summary.json), 130 after Ctrl-C (but a camera's,
    which ends that camera) or SIGTERM."""
    settings = {k: getattr(args, k) for k in INFERENCE_SETTINGS if hasattr(args, k)}  # None: the checkpoint's
    quiet = contextlib.redirect_stdout(sys.stderr) if args.jsonl else contextlib.nullcontext()
    with quiet:  # stdout carries the JSON lines alone: the model's loading notes (channels_last off) go to stderr
        predictor = EmotionPredictor(args.checkpoint, args.device, args.detect_faces, **settings)
    inputs = prediction_inputs(specs)
    out_dir = user_path(args.output_dir) if args.output_dir else unique_folder(
        Path("outputs") / f"predict__{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        held = (out_dir / "predictions.csv").exists()
    except OSError as e:  # a name too long, a folder this user may not enter
        raise UserError(f"cannot write the predictions into {out_dir}: {e.strerror or e}") from None
    if held and not args.overwrite:
        raise UserError(f"{out_dir} already holds predictions; choose another --output_dir, or --overwrite=true")
    for folder in PICTURE_FOLDERS if held else ():  # the earlier run's pictures go with its rows
        shutil.rmtree(out_dir / folder, ignore_errors=True)
    try:
        out = PredictionOutputs(out_dir, predictor.class_names, args.jsonl)
    except OSError as e:
        raise UserError(f"cannot write the predictions into {out_dir}: {e.strerror or e}") from None
    left_out = [s.path for s in inputs if s.kind == "ignored"]
    images = [s for s in inputs if s.kind == "image"]
    interrupted, stopped = False, None
    try:  # from here on, however it ends, summary.json is written and predictions.csv closed
        for source in inputs:
            if source.kind == "error":
                out.source({"source": source.path, "kind": "input", "error": source.error})
        if predictor.cfg.preset == "demo":
            say("note: this is a --demo model, which knows drawn faces only; train on real faces before predicting "
                "on photos", sys.stderr)
        if left_out:
            say(f"note: left out {len(left_out)} file(s) that are neither images nor videos (listed in summary.json): "
                f"{', '.join(left_out[:3])}{' ...' if len(left_out) > 3 else ''}", sys.stderr)
        if args.explain and any(s.kind in ("video", "camera") for s in inputs):
            say("note: --explain writes a picture for each face of every classified video frame"
                f"{'' if args.max_frames or args.every > 1 else '; --every=N or --max_frames=N write fewer'}",
                sys.stderr)
        with out_of_memory_named(predictor.device, f"--batch={args.batch}"):
            with tqdm(total=len(images), desc="images", unit="image", leave=False,
                      disable=None if len(images) > 1 else True) as bar:
                predict_images(predictor, images, out, bar, args)
            for source in inputs:
                if source.kind in ("video", "camera"):
                    out.source(predict_video(predictor, source, out, args))
    except KeyboardInterrupt:
        interrupted = True
    except OSError as e:
        raise UserError(f"writing into {out_dir} failed: {e}") from None
    except UserError as e:  # out of memory: the rows so far are kept, as after Ctrl-C, and the summary says why
        stopped = e
        raise
    finally:
        errors = out.close({
            "checkpoint": predictor.checkpoint, "class_names": predictor.class_names, "inputs": list(specs),
            "interrupted": interrupted, "stopped": None if stopped is None else str(stopped), "ignored": left_out,
            "settings": {**dataclasses.asdict(args), **{k: getattr(predictor.cfg, k) for k in INFERENCE_SETTINGS}},
            "arithmetic": arithmetic(predictor.cfg, predictor.device)})
    beside = ["summary.json", *(f"{name}/" for name in PICTURE_FOLDERS if (out_dir / name).is_dir())]
    say(f"{sum(s.get('rows', 0) for s in out.sources)} rows from {len(out.sources)} source(s) in "
        f"{out_dir / 'predictions.csv'}; {', '.join(beside)} beside it"
        + (f"; {len(errors)} input(s) could not be read" if errors else ""), sys.stderr if args.jsonl else sys.stdout)
    if interrupted:
        say("interrupted: the rows written so far are in predictions.csv", sys.stderr)
        return 130
    return 1 if errors else 0


def main(argv):
    """Parse and predict. Returns the exit status: 0 when every input was read, 1 when some were not, 130 after
    Ctrl-C or SIGTERM."""
    console_escapes()
    (given,), sources = read_overrides(argv, (Prediction,), __doc__, positional=True)
    args = Prediction(**given)
    validate_prediction(args, sources)
    fit_threads_to_cpu()
    try:
        return run_prediction(args, sources)
    except KeyboardInterrupt:  # before the first input (loading the model, probing, listing folders) or in the summary
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    stop_on_ctrl_c_and_sigterm()  # Ctrl-C or SIGTERM keeps the rows written
    try:
        sys.exit(main(sys.argv[1:]))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
