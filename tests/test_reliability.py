"""Reliability of emotion_recognition.py: bad data, duplicates, checkpoints, interruptions.

Every test builds its own broken copy of the tiny dataset (or its own checkpoint file) in tmp_path,
runs the script in a subprocess where the behaviour is the command line's, and checks what it
printed and wrote. Core features are in test_ern.py.
"""
import dataclasses
import errno
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
import types
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml

from conftest import ROOT, SCRIPT, TINY, ern, ex, pr, run_script

FAST = [*TINY, "--tsne_samples=0", "--attention_samples=0"]  # the plots are test_ern.py's business: they only cost time here
EPOCHS = 3  # of the deterministic reference run that the interrupted-and-resumed run must reproduce
SPLIT_FOLDERS = {"train": "train", "val": "valid", "test": "test"}


def args_for(data, tmp, *extra, run="run"):
    return [*FAST, f"--data_dir={data}", f"--output_dir={tmp / run}", f"--cache_dir={tmp / 'cache'}", *extra]


def assert_clean_error(proc):
    """Non-zero exit, an 'error:' message, no traceback."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "error:" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# A copy of the tiny dataset with one of every fault
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Broken:
    root: Path
    expected: list  # (text that must start a reported line: "path: " or "path:line: ", keyword of the fault)
    counts: dict  # split -> Counter(class id -> samples that must survive a lenient load)
    dropped: set  # image paths none of whose samples may survive
    multiplicity: dict  # image path -> samples it must still contribute (files with one bad line among good)
    no_face: list  # images whose label file is empty (no face): dropped, and no problem


def broken_copy(tiny_dataset, tmp_path, nc_mismatch=False):
    root = Path(shutil.copytree(tiny_dataset, tmp_path / "data")).resolve()
    rng = np.random.default_rng(0)
    pool, counts = {}, {}
    for split, folder in SPLIT_FOLDERS.items():
        pool[split] = sorted((root / folder / "images").iterdir())
        counts[split] = Counter(int(p.read_text().split()[0]) for p in (root / folder / "labels").glob("*.txt"))
    b = Broken(root, [], counts, set(), {}, [])

    def take(split, ext=None):
        """An untouched image of the split (with that extension), its label file and class id."""
        img = next(p for p in pool[split] if ext is None or p.suffix == ext)
        pool[split].remove(img)
        label = root / SPLIT_FOLDERS[split] / "labels" / (img.stem + ".txt")
        return img, label, int(label.read_text().split()[0])

    def fault(where, keyword, split=None, img=None, cls=None):
        """Expect `where` reported with `keyword`; if split is given, img's samples must not survive."""
        b.expected.append((where, keyword))
        if split is not None:
            b.counts[split][cls] -= 1
            b.dropped.add(str(img))

    # images
    img, _, c = take("train", ".jpg")
    img.write_bytes(img.read_bytes()[: img.stat().st_size // 2])
    fault(f"{img}: ", "truncat", "train", img, c)
    img, _, c = take("train", ".png")
    data = img.read_bytes()
    img.write_bytes(data[:100] + rng.bytes(200) + data[300:])  # IDAT damaged, IEND intact: only decoding can tell
    fault(f"{img}: ", "unreadable", "train", img, c)
    img, _, c = take("train", ".png")
    img.write_bytes(rng.bytes(3000))
    fault(f"{img}: ", "not an image", "train", img, c)
    img, _, c = take("train")
    img.write_bytes(b"")
    fault(f"{img}: ", "zero", "train", img, c)
    notes = root / "train" / "images" / "notes.txt"
    notes.write_text("not a picture")
    fault(f"{notes}: ", "not an image")
    # pairing of images and label files
    img, label, c = take("train")
    label.unlink()
    fault(f"{img}: ", "label", "train", img, c)
    orphan = root / "train" / "labels" / "orphan_0000.txt"
    orphan.write_text("0 0.5 0.5 0.4 0.4")
    fault(f"{orphan}: ", "image")
    # label files
    img, label, c = take("train")
    label.write_text("")  # YOLO's image without objects: not used, and no problem
    b.counts["train"][c] -= 1
    b.dropped.add(str(img))
    b.no_face.append(str(img))
    img, label, c = take("train")
    label.write_text(label.read_text().strip() + "\n3 0.5 0.5 0.4\n")  # line 1 good, line 2 four fields
    b.multiplicity[str(img)] = 1
    fault(f"{label}:2: ", "field")
    img, label, c = take("train")
    label.write_text(f"{c} 0.5 abc 0.4 0.4")
    fault(f"{label}:1: ", "numeric", "train", img, c)
    img, label, c = take("train")
    label.write_text(f"{c} 1.5 0.5 0.4 0.4")
    fault(f"{label}:1: ", "outside", "train", img, c)
    img, label, c = take("train")
    good = label.read_text().strip()
    label.write_text(f"{good}\n{c} 0.5 0.5 0.3 0.3\n8 0.5 0.5 0.4 0.4")  # two good boxes, then class 8 of nc=8
    b.counts["train"][c] += 1
    b.multiplicity[str(img)] = 2
    fault(f"{label}:3: ", "class")
    # the other splits are checked as well
    img, _, c = take("val", ".jpg")
    img.write_bytes(img.read_bytes()[:-300])
    fault(f"{img}: ", "truncat", "val", img, c)
    img, label, c = take("test")
    label.write_text("-1 0.5 0.5 0.4 0.4")
    fault(f"{label}:1: ", "class", "test", img, c)
    if nc_mismatch:
        doc = yaml.safe_load((root / "data.yaml").read_text())
        (root / "data.yaml").write_text(yaml.safe_dump({**doc, "nc": 9}, sort_keys=False))
        fault(f"{root / 'data.yaml'}: ", "nc")
    return b


def test_strict_run_reports_every_problem_and_stops_before_training(tiny_dataset, tmp_path):
    b = broken_copy(tiny_dataset, tmp_path, nc_mismatch=True)
    proc = run_script(*args_for(b.root, tmp_path, "--epochs=1"), cwd=tmp_path, check=False)
    assert_clean_error(proc)
    lines = proc.stderr.splitlines()
    for where, keyword in b.expected:
        hits = [line.split(where, 1)[1] for line in lines if where in line]
        assert hits, f"not reported: {where!r}\n{proc.stderr}"
        assert any(keyword in hit.lower() for hit in hits), f"{where!r} reported without {keyword!r}: {hits}"
    assert not re.search(r"^epoch\s+\d", proc.stdout, re.M), "training started"
    assert not (tmp_path / "run" / "last.pth").exists()
    error = next(line for line in proc.stderr.splitlines() if line.startswith("error: "))
    assert error in (tmp_path / "run" / "train.log").read_text()  # the log says why


def test_lenient_run_skips_lists_and_counts_the_bad_samples(tiny_dataset, tmp_path):
    b = broken_copy(tiny_dataset, tmp_path)
    run_script(*args_for(b.root, tmp_path, "--strict=false", "--epochs=1"), cwd=tmp_path)
    run = tmp_path / "run"
    report = json.loads((run / "data_report.json").read_text())
    assert len(report["problems"]) == len(b.expected), report["problems"]  # and nothing clean was flagged
    assert report["images_without_faces"] == b.no_face and report["notes"] == []
    for where, keyword in b.expected:
        assert any(p.startswith(where) and keyword in p[len(where):].lower() for p in report["problems"]), where
    names = report["class_names"]
    for split, counts in b.counts.items():
        assert report["splits"][split]["per_class"] == {n: counts[i] for i, n in enumerate(names)}, split
        assert report["splits"][split]["samples"] == sum(counts.values()), split
    log = (run / "train.log").read_text().replace(str(tmp_path), "")  # the folder's name holds "skip"
    count = re.compile(rf"\b{len(b.expected)}\b")
    assert f"note: images with an empty label file (YOLO's image without faces) are not used: train 1, e.g. " \
           f"{b.no_face[0]} (a run's data_report.json lists them)" in (run / "train.log").read_text()
    assert any("skip" in line.lower() and count.search(line) for line in log.splitlines()), log
    assert (run / "evaluation_results.json").exists()


def test_lenient_load_keeps_no_bad_sample_and_never_a_blank_image(tiny_dataset, tmp_path):
    b = broken_copy(tiny_dataset, tmp_path)
    cfg = ern.Config(data_dir=str(b.root), cache_dir=str(tmp_path / "cache"), image_size=32, strict=False)
    _, splits, _ = ern.load_dataset(cfg)
    paths = [p for s in splits.values() for p in s.paths]
    assert not b.dropped & set(paths)
    for path, n in b.multiplicity.items():
        assert paths.count(path) == n, path
    for s in splits.values():
        pixels = np.asarray(s.images).reshape(len(s), -1).astype(np.float32)
        assert (pixels.std(1) > 1).all(), f"{s.name}: a constant (substituted) image"


def test_a_pose_export_trains_on_the_boxes_of_its_rows(tiny_dataset, tmp_path):
    """load_dataset reads data.yaml's kpt_shape through to every label row: the same samples and boxes as the export
    without its landmarks (read as polygons, each box would be the landmarks' hull)."""
    data = Path(shutil.copytree(tiny_dataset, tmp_path / "pose")).resolve()
    doc = yaml.safe_load((data / "data.yaml").read_text())
    (data / "data.yaml").write_text(yaml.safe_dump({**doc, "kpt_shape": [5, 2]}, sort_keys=False))
    for label in data.glob("*/labels/*.txt"):
        label.write_text("".join(f"{row} 0.1 0.1 0.9 0.1 0.5 0.5 0.2 0.9 0.8 0.9\n"
                                 for row in label.read_text().splitlines() if row.strip()))
    plain, pose = (ern.load_dataset(ern.Config(data_dir=str(d), cache_dir=str(tmp_path / "cache"), image_size=32))
                   for d in (tiny_dataset, data))
    assert pose[0] == plain[0] and pose[1].keys() == plain[1].keys() and pose[2]["problems"] == []
    for name, split in plain[1].items():
        assert [Path(p).name for p in pose[1][name].paths] == [Path(p).name for p in split.paths]
        np.testing.assert_array_equal(pose[1][name].labels, split.labels)
        np.testing.assert_array_equal(pose[1][name].boxes, split.boxes)


NOT_UTF8_NAMES = pytest.mark.skipif(sys.platform != "linux", reason="macOS and Windows keep names in Unicode")


@NOT_UTF8_NAMES
def test_file_names_that_are_not_utf8_are_read_fingerprinted_and_logged(tiny_dataset, tmp_path):
    """Latin-1 names from an old archive reach Python as surrogates, which str.encode() refused: the decode cache's key
    raised UnicodeEncodeError before any image was read. Their samples load (from the cache the second time), a broken
    one of them is listed, and a log line naming the folder is written as valid UTF-8."""
    data = Path(shutil.copytree(tiny_dataset, tmp_path / os.fsdecode(b"daten_\xe4"))).resolve()
    for image in sorted((data / "train" / "images").iterdir())[:3]:
        name = os.fsdecode(os.fsencode(image.stem) + b"_caf\xe9")
        image.rename(image.with_name(name + image.suffix))
        (data / "train" / "labels" / f"{image.stem}.txt").rename(data / "train" / "labels" / f"{name}.txt")
    (data / "train" / "images" / os.fsdecode(b"kaputt_\xe9.jpg")).write_bytes(b"\xff\xd8\xff\xe0 cut short")
    (data / "train" / "labels" / os.fsdecode(b"kaputt_\xe9.txt")).write_text("0 0.5 0.5 0.5 0.5")
    cfg = ern.Config(data_dir=str(data), cache_dir=str(tmp_path / "cache"), image_size=32, strict=False)
    for n in (1, 2):
        _, splits, report = ern.load_dataset(cfg, tmp_path / f"load{n}.log")
        assert ("train: decoded" in (tmp_path / f"load{n}.log").read_text()) == (n == 1)  # then read from the cache
        assert sum(os.fsencode(p).endswith((b"_caf\xe9.jpg", b"_caf\xe9.png")) for p in splits["train"].paths) == 3
        assert len(splits["train"]) == len(os.listdir(tiny_dataset / "train" / "images"))
        assert [p for p in report["problems"] if "kaputt_\udce9.jpg: truncated jpeg" in p] == report["problems"]
    ern.log(f"data in {data}", tmp_path / "train.log")
    assert (tmp_path / "train.log").read_text(encoding="utf-8") == f"data in {tmp_path}/daten_\\udce4\n"


def test_nc_names_mismatch_stops_even_when_lenient_and_is_reported_with_the_rest(tiny_dataset, tmp_path):
    data = Path(shutil.copytree(tiny_dataset, tmp_path / "data")).resolve()
    doc = yaml.safe_load((data / "data.yaml").read_text())
    (data / "data.yaml").write_text(yaml.safe_dump({**doc, "nc": 7}, sort_keys=False))
    empty = sorted((data / "train" / "images").iterdir())[0]
    empty.write_bytes(b"")
    cfg = ern.Config(data_dir=str(data), cache_dir=str(tmp_path / "cache"), image_size=32, strict=False)
    with pytest.raises(ern.UserError) as error:
        ern.load_dataset(cfg)
    message = str(error.value)
    assert f"{data / 'data.yaml'}: " in message and f"{empty}: " in message  # not only the first problem
    yaml_line = message.split(f"{data / 'data.yaml'}: ", 1)[1].splitlines()[0]
    assert all(w in yaml_line for w in ("nc", "7", "8")), yaml_line


def test_an_image_whose_header_claims_too_many_pixels_is_a_listed_problem(tiny_dataset, tmp_path):
    """OpenCV refuses headers over 2**30 pixels with cv2.error (a corrupt header, or a gigapixel scan), which is no
    ValueError: it left the load as a traceback that named no file, with --strict=false too."""
    data = Path(shutil.copytree(tiny_dataset, tmp_path / "data")).resolve()
    image = sorted((data / "train" / "images").glob("*.jpg"))[0]
    jpeg = bytearray(image.read_bytes())
    sof = jpeg.index(b"\xff\xc0")  # baseline frame header: marker, length, precision, height, width
    struct.pack_into(">HH", jpeg, sof + 5, 30000, 40000)
    image.write_bytes(bytes(jpeg))
    with pytest.raises(ValueError, match="unreadable jpeg file"):
        ern.decode_image(image)
    cfg = ern.Config(data_dir=str(data), cache_dir=str(tmp_path / "cache"), image_size=32, strict=False)
    _, splits, report = ern.load_dataset(cfg)
    assert [p.split(": ", 1)[0] for p in report["problems"]] == [str(image)]
    assert str(image) not in splits["train"].paths


def test_a_box_too_small_for_a_face_is_a_problem(tiny_dataset, tmp_path):
    """A misclick's box (a pixel of a 48 px image) was cropped to one blurred colour and trained on."""
    data = Path(shutil.copytree(tiny_dataset, tmp_path / "data")).resolve()
    image = sorted((data / "train" / "images").iterdir())[0]
    label = data / "train" / "labels" / f"{image.stem}.txt"
    cls = int(label.read_text().split()[0])
    label.write_text(f"{cls} 0.5 0.5 0.5 0.5\n{cls} 0.5 0.5 0.02 0.5\n")  # 24 x 24 and 0.96 x 24 pixels
    cfg = ern.Config(data_dir=str(data), cache_dir=str(tmp_path / "cache"), image_size=32, strict=False)
    _, splits, report = ern.load_dataset(cfg)
    assert report["problems"] == [f"{image}: a box of 1.0 x 24.0 pixels (class {ern.DEMO_CLASSES[cls]}) is too small "
                                  f"for a face (under 4)"]
    assert splits["train"].paths.count(str(image)) == 1 and splits["train"].boxes[
        splits["train"].paths.index(str(image))].tolist() == [0.5, 0.5, 0.5, 0.5]


def test_more_problems_than_are_shown_are_all_listed_in_a_file(tiny_dataset, tmp_path):
    data = Path(shutil.copytree(tiny_dataset, tmp_path / "data")).resolve()
    orphans = [data / "train" / "labels" / f"orphan_{i:02d}.txt" for i in range(60)]
    for orphan in orphans:
        orphan.write_text("0 0.5 0.5 0.4 0.4")
    cfg = ern.Config(data_dir=str(data), cache_dir=str(tmp_path / "cache"), image_size=32)
    (tmp_path / "run").mkdir()
    with pytest.raises(ern.UserError) as error:
        ern.load_dataset(cfg, tmp_path / "run" / "train.log")
    listing = tmp_path / "run" / "data_problems.txt"
    assert f"... and 10 more, all listed in {listing}" in str(error.value)
    assert listing.read_text().splitlines() == [f"{p}: label file without an image in {data / 'train' / 'images'}"
                                                for p in orphans]


def test_an_evaluation_refused_by_many_problems_keeps_their_list(finished, tiny_dataset, tmp_path):
    """--evaluate writes the list into its own eval__ folder, which a refused evaluation takes away again: the
    folder stays where it holds the list the message names."""
    data = Path(shutil.copytree(tiny_dataset, tmp_path / "data")).resolve()
    for i in range(60):
        (data / "train" / "labels" / f"orphan_{i:02d}.txt").write_text("0 0.5 0.5 0.4 0.4")
    (tmp_path / "run").mkdir()
    shutil.copy(finished / "best_emotion_model.pth", tmp_path / "run")
    with pytest.raises(ern.UserError) as error:
        ern.main([f"--evaluate={tmp_path / 'run'}", f"--data_dir={data}", f"--cache_dir={tmp_path / 'cache'}"])
    listing = Path(re.search(r"all listed in (\S+data_problems\.txt)", str(error.value)).group(1))
    assert listing.parent.parent == tmp_path / "run" and len(listing.read_text().splitlines()) == 60


def test_a_class_without_training_samples_is_warned_of(tiny_dataset, tmp_path):
    data = Path(shutil.copytree(tiny_dataset, tmp_path / "data")).resolve()
    others = {}
    for folder, split in (("train", "train"), ("valid", "val"), ("test", "test")):
        labels = [p for p in (data / folder / "labels").glob("*.txt") if p.read_text().startswith("7 ")]
        others[split] = len(labels)
        if split == "train":
            for p in labels:
                p.write_text("0" + p.read_text()[1:])
    assert others["train"] and others["val"] + others["test"]  # the fixture has Surprise faces everywhere
    cfg = ern.Config(data_dir=str(data), cache_dir=str(tmp_path / "cache"), image_size=32)
    ern.load_dataset(cfg, tmp_path / "load.log")
    warnings = [line for line in (tmp_path / "load.log").read_text().splitlines() if "no training samples" in line]
    assert warnings == [f"warning: class 'Surprise' has no training samples (val: {others['val']}, "
                        f"test: {others['test']})"]


# ---------------------------------------------------------------------------------------------
# Duplicates and leakage
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def duplicated(tiny_dataset, tmp_path_factory):
    """The tiny dataset plus exact duplicates of training images in valid (one re-encoded, one relabelled),
    in test, and within train (relabelled); one strict 1-epoch run on it: (tmp, data, {name: path}, process)."""
    tmp = tmp_path_factory.mktemp("dup")
    data = Path(shutil.copytree(tiny_dataset, tmp / "data")).resolve()
    train = sorted((data / "train" / "images").glob("*.png"))
    label = lambda img: data / "train" / "labels" / (img.stem + ".txt")

    def relabelled(img):
        cls, *box = label(img).read_text().split()
        return " ".join([str((int(cls) + 1) % 8), *box])

    dups = {"val_same": data / "valid" / "images" / "dup_same.bmp",
            "val_conflict": data / "valid" / "images" / "dup_conflict.png",
            "test_same": data / "test" / "images" / "dup_test.png",
            "train_conflict": data / "train" / "images" / "dup_within.png"}
    # a lossless re-encode: other bytes, the same decoded pixels
    cv2.imwrite(str(dups["val_same"]), cv2.imread(str(train[0]), cv2.IMREAD_COLOR))
    shutil.copy(label(train[0]), data / "valid" / "labels" / "dup_same.txt")
    shutil.copy(train[1], dups["val_conflict"])
    (data / "valid" / "labels" / "dup_conflict.txt").write_text(relabelled(train[1]))
    shutil.copy(train[2], dups["test_same"])
    shutil.copy(label(train[2]), data / "test" / "labels" / "dup_test.txt")
    shutil.copy(train[3], dups["train_conflict"])
    (data / "train" / "labels" / "dup_within.txt").write_text(relabelled(train[3]))
    proc = run_script(*args_for(data, tmp, "--epochs=1"), cwd=tmp)
    return tmp, data, dups, proc


def test_duplicates_are_reported_with_conflicts_and_leakage_is_counted_in_results(duplicated):
    tmp, data, dups, proc = duplicated
    assert re.search(r"warning.*\b2\b.*val.*duplicate", proc.stdout, re.I), proc.stdout
    assert re.search(r"warning.*\b1\b.*test.*duplicate", proc.stdout, re.I), proc.stdout
    report = json.loads((tmp / "run" / "data_report.json").read_text())
    d = report["duplicates"]
    assert (d["val_in_train"]["samples"], d["val_in_train"]["label_conflicts"]) == (2, 1)
    assert str(dups["val_conflict"]) in d["val_in_train"]["conflict_examples"]
    assert (d["test_in_train"]["samples"], d["test_in_train"]["label_conflicts"]) == (1, 0)
    assert (d["train_within"]["groups"], d["train_within"]["label_conflicts"]) == (1, 1)
    assert d["val_within"]["groups"] == 0 and d["test_within"]["groups"] == 0
    train = sorted(p for p in (data / "train" / "images").glob("*.png") if p != dups["train_conflict"])  # as the fixture saw them
    assert d["val_in_train"]["files"] == sorted([{"image": str(dups["val_same"]), "train_images": [str(train[0])]},
                                                 {"image": str(dups["val_conflict"]), "train_images": [str(train[1])]}],
                                                key=lambda e: e["image"])
    assert d["test_in_train"]["files"] == [{"image": str(dups["test_same"]), "train_images": [str(train[2])]}]
    assert d["train_within"]["files"] == [sorted([str(dups["train_conflict"]), str(train[3])])]
    results = json.loads((tmp / "run" / "evaluation_results.json").read_text())
    assert results["duplicates"]["val_in_train"]["samples"] == 2
    assert results["duplicates"]["test_in_train"]["samples"] == 1
    assert results["samples_duplicating_train"] == 1  # the evaluated split is test
    # the accuracy without that face: k / (n - 1), k the faces right less that face (if it is right); a mask the wrong
    # way round would give 0 or 1, which fits this check only where 0, 1, n - 1 or n faces are right
    n = results["evaluated_samples"]
    right, unseen = round(results["accuracy"] * n), results["accuracy_excluding_train_duplicates"]
    right_unseen = round(unseen * (n - 1))
    assert unseen == pytest.approx(right_unseen / (n - 1)) and right - right_unseen in (0, 1)
    assert 2 <= right <= n - 2  # so the check above tells a wrong mask (one epoch: far from all or none right)


def test_copies_of_a_photo_of_two_faces_conflict_only_where_a_face_is_labelled_otherwise(tiny_dataset, tmp_path):
    """Each face's label is compared, not the union of a group's labels (two faces, two classes: a conflict
    before, in copies labelled alike)."""
    data = Path(shutil.copytree(tiny_dataset, tmp_path / "data")).resolve()
    images, labels = data / "train" / "images", data / "train" / "labels"
    photo = sorted(images.glob("*.png"))[0]
    (labels / f"{photo.stem}.txt").write_text("0 0.25 0.5 0.4 0.8\n1 0.75 0.5 0.4 0.8")
    shutil.copy(photo, images / "copy_alike.png")
    (labels / "copy_alike.txt").write_text("1 0.75 0.5 0.4 0.8\n0 0.25 0.5 0.4 0.8")  # the same faces, reordered
    cfg = ern.Config(data_dir=str(data), cache_dir=str(tmp_path / "cache"), image_size=32)
    within = lambda: ern.load_dataset(cfg)[2]["duplicates"]["train_within"]
    assert (within()["groups"], within()["label_conflicts"]) == (1, 0)
    shutil.copy(photo, images / "copy_swapped.png")
    (labels / "copy_swapped.txt").write_text("1 0.25 0.5 0.4 0.8\n0 0.75 0.5 0.4 0.8")
    assert (within()["groups"], within()["label_conflicts"]) == (1, 1)


def test_data_report_has_per_class_counts_sizes_and_formats(duplicated):
    tmp, data, _, _ = duplicated
    report = json.loads((tmp / "run" / "data_report.json").read_text())
    names = report["class_names"]
    for split, folder in SPLIT_FOLDERS.items():
        files = sorted((data / folder / "images").iterdir())
        classes = Counter(int((data / folder / "labels" / (p.stem + ".txt")).read_text().split()[0]) for p in files)
        suffix = {".jpg": "jpeg", ".png": "png", ".bmp": "bmp"}
        r = report["splits"][split]
        assert r["per_class"] == {n: classes[i] for i, n in enumerate(names)}, split
        assert r["formats"] == dict(Counter(suffix[p.suffix] for p in files)), split
        assert r["image_sizes"] == {"48x48": len(files)}, split


def test_drop_duplicates_removes_exactly_the_val_and_test_copies_of_training_images(duplicated):
    tmp, data, dups, _ = duplicated
    cfg = ern.Config(data_dir=str(data), cache_dir=str(tmp / "cache"), image_size=32)
    _, kept, _ = ern.load_dataset(cfg)
    _, dropped, report = ern.load_dataset(dataclasses.replace(cfg, drop_duplicates=True))
    for split, key in (("val", "val_same"), ("val", "val_conflict"), ("test", "test_same")):
        assert str(dups[key]) in kept[split].paths
        assert str(dups[key]) not in dropped[split].paths
    assert len(dropped["val"]) == len(kept["val"]) - 2 and len(dropped["test"]) == len(kept["test"]) - 1
    assert dropped["train"].paths == kept["train"].paths  # training images are never dropped
    assert report["splits"]["val"]["samples"] == len(dropped["val"])


# ---------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, last.pth, exact resume after Ctrl-C, non-finite loss, run folders
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("failure", [OSError, KeyboardInterrupt])
def test_atomic_save_keeps_the_good_file_when_the_write_fails(tmp_path, monkeypatch, failure):
    """A write the system refuses is one UserError naming the file; Ctrl-C stays Ctrl-C. Either way the good file stays."""
    path = tmp_path / "last.pth"
    ern.atomic_save({"w": torch.arange(5.0)}, path)
    targets = []

    def partial_save(obj, f, *args, **kwargs):
        if hasattr(f, "write"):
            targets.append(Path(f.name))
            f.write(b"PK\x03\x04 half a checkpoint")
        else:
            targets.append(Path(f))
            Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise failure("interrupted mid-write")

    monkeypatch.setattr(torch, "save", partial_save)
    with pytest.raises(ern.UserError if failure is OSError else failure, match=None if failure is KeyboardInterrupt else
                       f"could not write {re.escape(str(path))}"):
        ern.atomic_save({"w": torch.zeros(5)}, path)
    monkeypatch.undo()
    assert targets and targets[0] != path, "torch.save wrote the final path directly"
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(5.0))
    assert sorted(tmp_path.iterdir()) == [path], "a temporary file was left behind"


@pytest.fixture(scope="module")
def finished(tiny_dataset, tmp_path_factory):
    """An uninterrupted deterministic run of EPOCHS epochs: its run folder."""
    tmp = tmp_path_factory.mktemp("finished")
    run_script(*args_for(tiny_dataset, tmp, f"--epochs={EPOCHS}", "--deterministic=true", "--seed=3"), cwd=tmp)
    return tmp / "run"


def test_a_resume_of_a_finished_run_says_so(finished, tmp_path, capsys):
    """It repeats the final evaluation, rewriting the run's results: it did so without a word. A figure it does not
    draw again (--tsne_samples=0, --attention_samples=0) is removed, not left to disagree with the new numbers."""
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    for earlier in ("feature_space.png", "feature_space.csv", "attention_maps.png", "confusion_matrix.png"):
        (run / earlier).write_bytes(b"an earlier evaluation's figure")
    ern.main([f"--resume={run}", f"--cache_dir={tmp_path / 'cache'}", "--tsne_samples=0", "--attention_samples=0"])
    assert f"the run had finished (epoch {EPOCHS}); the final evaluation is repeated" in capsys.readouterr().out
    assert not [n for n in ("feature_space.png", "feature_space.csv", "attention_maps.png") if (run / n).exists()]
    assert (run / "confusion_matrix.png").stat().st_size > 10_000  # drawn again


def test_a_folder_a_refused_run_left_is_taken_afresh_and_one_holding_a_model_is_not(tmp_path):
    """What a refused run left (its log, its list of data problems) is not the next run's; a folder that holds a
    final model alone (its user kept only that) holds a run."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").write_text("error: refused\n")
    (run / "data_problems.txt").write_text("a.txt:1: class id 9 outside 0..7\n")
    with ern.make_run_dir(ern.Config(output_dir=str(run)))[1]:
        assert (run / "train.log").read_text() == "" and not (run / "data_problems.txt").exists()
    (run / "final_emotion_model.pth").write_bytes(b"weights")
    with pytest.raises(ern.UserError, match=r"already holds a run \(final_emotion_model.pth\)"):
        ern.make_run_dir(ern.Config(output_dir=str(run)))


def test_a_refused_runs_folder_is_removed_once_its_lock_is_released(tiny_dataset, tmp_path, monkeypatch):
    """A run refused before training, in a folder named for it: the folder goes, after the claim on it ends (Windows
    cannot remove a folder whose .lock is open; here: no other open file can take the lock while it is held)."""
    fcntl = pytest.importorskip("fcntl")
    removed, rmtree = [], shutil.rmtree

    def after_the_claim(path, *args, **kwargs):
        if (Path(path) / ".lock").exists():
            with open(Path(path) / ".lock", "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while the run holds it
            removed.append(Path(path))
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ern.shutil, "rmtree", after_the_claim)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ern.UserError, match="cannot be kept"):
        ern.main([*FAST, f"--data_dir={tiny_dataset}", f"--cache_dir={tmp_path / 'cache'}", "--time_budget=0.01"])
    assert len(removed) == 1 and removed[0].parent.name == "outputs" and not removed[0].exists()


def test_last_checkpoint_holds_the_whole_training_state(finished):
    """last.pth of the finished run: weights' epoch, optimizer moments, schedule position, scaler and random state,
    and what train() resumes its bookkeeping from: the history, line for line metrics.jsonl's, and the best epoch,
    the first that reached the highest validation accuracy (improvement is strictly greater)."""
    ckpt = torch.load(finished / "last.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == EPOCHS
    assert ckpt["optimizer"]["state"], "optimizer moments missing"
    steps = 96 // 16  # the tiny train split, TINY's batch size
    assert ckpt["scheduler"]["last_epoch"] == EPOCHS * steps
    assert "scaler" in ckpt and isinstance(ckpt["rng"]["torch"], torch.Tensor)
    assert ckpt["config"]["epochs"] == EPOCHS and len(ckpt["class_names"]) == 8
    metrics = [json.loads(line) for line in (finished / "metrics.jsonl").read_text().splitlines()]
    assert ckpt["history"] == metrics and [m["epoch"] for m in metrics] == list(range(1, EPOCHS + 1))
    best = max(metrics, key=lambda m: m["val_accuracy"])  # max keeps the first of equal values
    assert ckpt["best"] == {"val_accuracy": best["val_accuracy"], "epoch": best["epoch"]}
    assert ern.load_checkpoint(finished / "best_emotion_model.pth")["epoch"] == best["epoch"]
    assert not list(finished.glob("*.tmp"))


def test_ctrl_c_inside_a_deferred_block_waits_for_its_end_an_error_goes_first_and_a_second_one_acts_at_once():
    """ctrl_c_deferred (an epoch's checkpoint and metrics line, a video frame's rows and counts): a SIGINT inside the
    block lets it finish, then raises KeyboardInterrupt, and the handler is put back; an error raised in the block
    after the SIGINT is the one that propagates; a second SIGINT interrupts the block."""
    done, handler = [], signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with ern.ctrl_c_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs here, between bytecodes
            done.append("rows and counts")
    assert done == ["rows and counts"] and signal.getsignal(signal.SIGINT) is handler
    with pytest.raises(OSError, match="disk full"):
        with ern.ctrl_c_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            raise OSError("disk full")
    with pytest.raises(KeyboardInterrupt):
        with ern.ctrl_c_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            done.append("after the second Ctrl-C")
    assert done == ["rows and counts"] and signal.getsignal(signal.SIGINT) is handler
    with ern.ctrl_c_deferred():  # no Ctrl-C: nothing raised
        done.append("next frame")
    assert done[-1] == "next frame"


def test_on_windows_a_run_folder_is_claimed_with_a_byte_lock(tmp_path, monkeypatch):
    """Windows has no fcntl: the claim is msvcrt.locking on the first byte (a non-blocking lock that the system
    releases when the process ends), which raises EACCES or EDEADLOCK where another process holds it. This machine
    has no msvcrt: a stand-in with its documented behaviour takes its place."""
    held, calls = set(), []

    def locking(fd, mode, nbytes):
        calls.append((mode, nbytes, os.lseek(fd, 0, os.SEEK_CUR)))
        if os.fstat(fd).st_ino in held:
            raise OSError(getattr(errno, "EDEADLOCK", errno.EDEADLK), "Resource deadlock avoided")
        held.add(os.fstat(fd).st_ino)

    monkeypatch.setitem(sys.modules, "fcntl", None)  # import fcntl: ImportError, as on Windows
    monkeypatch.setitem(sys.modules, "msvcrt", types.SimpleNamespace(locking=locking, LK_NBLCK=2))
    with ern.claim_folder(tmp_path):
        with pytest.raises(ern.UserError, match="in use by another run that is still running"):
            ern.claim_folder(tmp_path)
    assert calls == [(2, 1, 0), (2, 1, 0)]


def test_on_windows_a_file_held_for_a_moment_is_replaced_and_one_held_longer_is_named(tmp_path, monkeypatch):
    """Windows refuses to replace a file that a virus scanner, an indexer or a reader holds (PermissionError,
    WinError 32): atomic_write tries again for a few seconds, then says what holds it, not "free some space" (which
    it says where the write itself is refused)."""
    real, refusals = os.replace, [2]

    def replace(src, dst):
        if refusals[0]:
            refusals[0] -= 1
            error = PermissionError(13, "The process cannot access the file because it is being used by another process")
            error.winerror = 32
            raise error
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    ern.atomic_write(tmp_path / "a.json", lambda p: p.write_text("{}"))
    assert (tmp_path / "a.json").read_text() == "{}" and refusals == [0]
    refusals[0] = 99
    with pytest.raises(ern.UserError, match="close the program that holds it open"):
        ern.atomic_write(tmp_path / "b.json", lambda p: p.write_text("{}"))

    def write_refused(path):  # Windows' answer to a write in a read-only folder: access denied, the same winerror 5
        error = PermissionError(13, "Access is denied")
        error.winerror = 5
        raise error

    with pytest.raises(ern.UserError, match="Access is denied; free some space or choose a writable folder"):
        ern.atomic_write(tmp_path / "c.json", write_refused)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # nothing half-written is left


def test_overwrite_that_cannot_remove_an_old_file_says_which_and_gives_the_folder_back(tmp_path):
    run = tmp_path / "run"
    (run / "train.log").mkdir(parents=True)  # unlink refuses a folder (Windows: a file another program holds open)
    (run / "last.pth").write_bytes(b"old")
    cfg = ern.Config(output_dir=str(run), overwrite=True)
    with pytest.raises(ern.UserError, match=re.escape(f"cannot remove the earlier run's {run / 'train.log'}")):
        ern.make_run_dir(cfg)
    ern.claim_folder(run).close()  # given back: a second claim is not refused


def test_a_file_that_is_no_checkpoint_is_named_for_what_it_is(tmp_path):
    """torch's own words for these were "Weights only load failed. In PyTorch 2.6, we changed the default...", a
    message about torch's versions where the file was the problem. A checkpoint without one of its keys (a KeyError
    before), or cut short (torch's words cut off mid-sentence)."""
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    torch.save(nn.Linear(2, 2), tmp_path / "whole.pth")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "state_dict.pth")
    cfg = ern.Config(image_size=32, width=0.125, blocks="1,1,1,1")
    ckpt = ern.checkpoint_dict(ern.build_model(cfg, 8), cfg, ern.DEMO_CLASSES, torch.zeros(3), torch.ones(3), 0, {})
    torch.save({k: v for k, v in ckpt.items() if k != "class_names"}, tmp_path / "nameless.pth")  # a KeyError before
    torch.save(ckpt, tmp_path / "full.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "full.pth").read_bytes()[:-100])  # torch's words: cut mid-sentence
    for name, reason in (("junk", "not a file that torch.save wrote"), ("whole", "a model saved whole"),
                         ("state_dict", "not an ERN checkpoint"), ("cut", "it is cut short or damaged"),
                         ("nameless", "an ERN checkpoint without its class_names")):
        with pytest.raises(ern.UserError, match=re.escape(reason)):
            ern.load_checkpoint(tmp_path / f"{name}.pth")


def test_a_sigterm_routed_to_ctrl_c_is_deferred_alike():
    """The scripts route SIGTERM to KeyboardInterrupt (stop_on_ctrl_c_and_sigterm): inside a deferred block it waits for the
    block's end too, and the handler is put back."""
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        ern.stop_on_ctrl_c_and_sigterm()
        done = []
        with pytest.raises(ern.Terminated):  # a KeyboardInterrupt, told apart where Ctrl-C means less (a camera's end)
            with ern.ctrl_c_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                done.append("checkpoint and metrics")
        assert done == ["checkpoint and metrics"]
        assert signal.getsignal(signal.SIGTERM) is ern.raise_terminated
        with pytest.raises(KeyboardInterrupt) as stopped:
            with ern.ctrl_c_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
        assert type(stopped.value) is KeyboardInterrupt
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_then_printed_resume_command_ends_with_the_uninterrupted_weights(finished, tiny_dataset, tmp_path, stop):
    """Ctrl-C (or SIGTERM: SLURM's scancel and preemption, docker stop, which killed the run without its resume
    command before) after the first epoch, then the command it printed, from another folder: the deterministic run
    ends bit for bit as the uninterrupted one, its final and best models (weights, epoch, best epoch) and its final
    evaluation alike."""
    args = args_for(tiny_dataset, tmp_path, f"--epochs={EPOCHS}", "--deterministic=true", "--seed=3",
                    "--output_dir=run")  # relative: the command printed works from any folder
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    seen, interrupted = [], False
    for line in proc.stdout:
        seen.append(line)
        if re.match(r"epoch\s+1/", line):
            proc.send_signal(stop)
            interrupted = True
            break
    out, err = proc.communicate(timeout=300)
    out = "".join(seen) + out
    assert interrupted, f"no first epoch line\n{out}\n{err}"
    assert proc.returncode == 130 and "Traceback" not in err, f"exit {proc.returncode}\n{out}\n{err}"
    last = torch.load(tmp_path / "run" / "last.pth", map_location="cpu", weights_only=True)
    assert 1 <= last["epoch"] < EPOCHS, "interrupted after the last epoch: make EPOCHS larger"
    after = out[out.rindex(seen[-1]) + len(seen[-1]):]  # what it printed on the way out
    assert f"epoch {last['epoch']}" in after, after
    command = next((line.strip() for line in after.splitlines() if "--resume=" in line), None)
    assert command, f"no resume command in\n{after}"
    argv = shlex.split(command)
    assert argv[0] == sys.executable and Path(argv[1]) == SCRIPT.resolve(), command  # this interpreter, this file
    resumed = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path.parent, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, EPOCHS + 1))
    for name in ("final_emotion_model.pth", "best_emotion_model.pth"):  # the best model too: the resume kept `best`
        want = torch.load(finished / name, map_location="cpu", weights_only=True)
        got = torch.load(tmp_path / "run" / name, map_location="cpu", weights_only=True)
        assert (got["epoch"], got["best"]) == (want["epoch"], want["best"]), name
        assert want["model"].keys() == got["model"].keys()
        differ = [k for k in want["model"] if not torch.equal(want["model"][k], got["model"][k])]
        assert not differ, f"resumed {name} differs from the uninterrupted run's: {differ[:5]}"
    want, got = (json.loads((run / "evaluation_results.json").read_text()) for run in (finished, tmp_path / "run"))
    for key in ("best_epoch", "best_val_accuracy", "confusion_matrix"):
        assert got[key] == want[key], key


def train_on_random_faces(cfg, run_dir, resume=None):
    """ern.train on 32 random training faces (two steps a pass at batch 16) and 16 validation faces, in memory."""
    torch.manual_seed(0)
    x, y = torch.randint(0, 255, (32, 3, 32, 32), dtype=torch.uint8), torch.arange(32) % 8
    val = ern.Split("val", ["v.jpg"] * 16, np.arange(16) % 8, np.zeros((16, 4), np.float32),
                    images=np.random.default_rng(0).integers(0, 255, (16, 3, 32, 32), dtype=np.uint8))
    names, mean, std, cpu = [str(i) for i in range(8)], torch.zeros(3), torch.ones(3), torch.device("cpu")
    return ern.train(ern.build_model(cfg, 8), x, y, val, names, mean, std, cfg, run_dir, cpu, None, resume, None, True)


def test_a_resume_keeps_the_best_epoch_of_its_checkpoint(tmp_path):
    """train() resumed from a last.pth whose best is epoch 1 at validation accuracy 1.0, which no epoch can beat (an
    improvement is strictly greater): the resumed epoch leaves best_emotion_model.pth as it was, and the best it
    returns and writes into last.pth and final_emotion_model.pth is the checkpoint's. A resume that started `best`
    again (at -1) would count its first epoch as an improvement and replace the best model."""
    cfg = ern.Config(image_size=32, width=0.125, blocks="1,1,1,1", batch_size=16, epochs=1, amp=False,
                     channels_last=False, tsne_samples=0, attention_samples=0)
    first, _, _, _ = train_on_random_faces(cfg, tmp_path)
    kept = {"val_accuracy": 1.0, "epoch": 1}
    resume = {**ern.load_checkpoint(tmp_path / "last.pth"), "best": kept}
    best_before = (tmp_path / "best_emotion_model.pth").read_bytes()
    cfg = dataclasses.replace(cfg, epochs=2)
    history, best, _, _ = train_on_random_faces(cfg, tmp_path, resume)
    assert [h["epoch"] for h in history] == [1, 2] and history[0] == first[0]
    assert best == kept
    assert (tmp_path / "best_emotion_model.pth").read_bytes() == best_before
    for name in ("last.pth", "final_emotion_model.pth"):
        ckpt = ern.load_checkpoint(tmp_path / name)
        assert ckpt["epoch"] == 2 and ckpt["best"] == kept, name


def test_a_run_that_ended_on_a_fraction_of_an_epoch_trains_on_to_exactly_the_epochs_asked(tmp_path):
    """A budgeted run ends inside an epoch (--epochs=1.5: a pass and a half). Resumed with --epochs=3 it takes the
    steps of three passes in all, and its schedule ends at the cosine's floor; before, it counted the half pass as
    a whole one and stopped 0.5 epochs short, the learning rate above its floor. Fewer epochs than it has trained
    are refused (below); a last.pth from before the steps were saved counts its last pass as its config cut it."""
    cfg = ern.Config(image_size=32, width=0.125, blocks="1,1,1,1", batch_size=16, epochs=1.5, warmup_epochs=0,
                     amp=False, channels_last=False, tsne_samples=0, attention_samples=0)
    train_on_random_faces(cfg, tmp_path)  # two steps a pass
    shutil.copy(tmp_path / "last.pth", tmp_path / "half.pth")
    half = ern.load_checkpoint(tmp_path / "half.pth")
    assert (half["epoch"], half["steps"], half["scheduler"]["last_epoch"]) == (2, 3, 3)
    history, *_ = train_on_random_faces(dataclasses.replace(cfg, epochs=3), tmp_path, half)
    last = ern.load_checkpoint(tmp_path / "last.pth")
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert last["steps"] == last["scheduler"]["last_epoch"] == 6  # three passes of two steps
    assert int(next(iter(last["optimizer"]["state"].values()))["step"]) == 6
    assert history[-1]["lr"] == pytest.approx(cfg.lr * cfg.min_lr_ratio)
    older = {k: v for k, v in ern.load_checkpoint(tmp_path / "half.pth").items() if k != "steps"}
    assert ern.steps_taken(older, 2) == 3  # two passes, the second cut to one step by its config's 1.5 epochs
    history, *_ = train_on_random_faces(cfg, tmp_path, older)  # finished: nothing more to train
    assert [h["epoch"] for h in history] == [1, 2]


def test_a_resume_to_fewer_epochs_than_trained_is_refused_before_it_changes_a_file(finished, tmp_path):
    """--resume --epochs=2 of a run that trained 3: one line, and the run's files as they were (config.json was
    rewritten with the refused epochs, provenance.json given a start, train.log the run's header, before)."""
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    before = snapshot(run)
    with pytest.raises(ern.UserError, match=rf"^--epochs=2 is fewer than the {EPOCHS} epochs .*last\.pth has trained"):
        ern.main([f"--resume={run}", "--epochs=2", f"--cache_dir={tmp_path / 'cache'}"])
    assert snapshot(run) == before


def test_non_finite_loss_stops_naming_epoch_and_step_and_keeps_the_last_good_checkpoint(tiny_dataset, tmp_path):
    proc = run_script(*args_for(tiny_dataset, tmp_path, "--epochs=2", "--lr=1e30"), cwd=tmp_path, check=False)
    assert_clean_error(proc)
    assert re.search(r"non-finite.*epoch 1\b.*step \d+", proc.stderr, re.I), proc.stderr
    last = torch.load(tmp_path / "run" / "last.pth", map_location="cpu", weights_only=True)
    assert last["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert not (tmp_path / "run" / "final_emotion_model.pth").exists()
    assert not (tmp_path / "run" / "evaluation_results.json").exists()


def test_a_loss_that_diverges_while_the_budget_is_timed_is_one_line(tiny_dataset, tmp_path):
    """--time_budget times a few steps on a copy of the model before training; a loss that turns non-finite there
    (a learning rate far too high) is the same one line as in training, not a traceback."""
    proc = run_script(*args_for(tiny_dataset, tmp_path, "--epochs=2", "--lr=1e30", "--time_budget=5"), cwd=tmp_path,
                      check=False)
    assert_clean_error(proc)
    assert re.search(r"error: non-finite loss .* while timing the steps that plan --time_budget", proc.stderr), \
        proc.stderr[-2000:]


class NaNAtCall(nn.Module):
    """A linear classifier on mean colour whose logits turn NaN on one forward call."""

    def __init__(self, bad_call, num_classes=8):
        super().__init__()
        self.linear = nn.Linear(3, num_classes)
        self.calls, self.bad_call = 0, bad_call

    def forward(self, x):
        self.calls += 1
        f = x.mean((2, 3))
        logits = self.linear(f)
        return (logits * float("nan") if self.calls == self.bad_call else logits), None, f


def test_train_one_epoch_names_the_epoch_and_step_of_a_non_finite_loss():
    cfg = ern.Config(batch_size=4, epochs=9)
    model = NaNAtCall(bad_call=3)
    optimizer = ern.make_optimizer(model, cfg)
    scheduler = ern.make_scheduler(optimizer, cfg, 10)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(40) % 8
    with pytest.raises(ern.NonFiniteLoss, match=r"epoch 7\b.*step 3\b"):
        ern.train_one_epoch(model, images, labels, torch.full((3,), 0.5), torch.full((3,), 0.25), optimizer,
                            scheduler, torch.amp.GradScaler("cpu", enabled=False), cfg, 7, num_classes=8)


def test_finished_run_folder_is_never_overwritten_without_overwrite(finished, tiny_dataset, tmp_path):
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    proc = run_script(*args_for(tiny_dataset, tmp_path, "--epochs=1"), cwd=tmp_path, check=False)
    assert_clean_error(proc)
    assert str(run) in proc.stderr and "--overwrite" in proc.stderr
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    run_script(*args_for(tiny_dataset, tmp_path, "--epochs=1", "--overwrite=true"), cwd=tmp_path)
    assert json.loads((run / "config.json").read_text())["epochs"] == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 1


def test_a_resume_past_a_damaged_provenance_record_starts_it_again(finished, tiny_dataset, tmp_path):
    """provenance.json cut short (a copy, a sync tool): the resume says so and writes a new record of its own start;
    the checkpoint, not the record, is what resumes (a JSONDecodeError traceback before)."""
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    (run / "provenance.json").write_text((run / "provenance.json").read_text()[:100])
    proc = run_script(f"--resume={run}", f"--epochs={EPOCHS + 1}", cwd=tmp_path)
    assert f"note: {run / 'provenance.json'} is unreadable" in proc.stdout
    [start] = json.loads((run / "provenance.json").read_text())
    assert start["command"].endswith(shlex.join([f"--resume={run}", f"--epochs={EPOCHS + 1}"]))


# ---------------------------------------------------------------------------------------------
# Bad checkpoints
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, words", [
    (["--width=0.25"], ["width", "0.125", "0.25"]),
    (["--blocks=1,1,1"], ["blocks", "1,1,1,1", "1,1,1"]),
    (["--image_size=48"], ["image_size", "32", "48"]),
    ("renamed", ["Anger", "Rage"]),
    ("foreign weights", ["weights do not fit"]),
], ids=["width", "blocks", "image_size", "class_names", "weights"])
def test_resume_refuses_a_checkpoint_that_differs_from_the_run(finished, tiny_dataset, tmp_path, change, words):
    """Another network or image size on --resume's command line: one line naming the value and the run's, before the
    data is decoded (before: after decoding every split at the new size). Data of other classes, or weights of
    another network than the config says (a baseline's): once the data is read, before the folder changes."""
    (tmp_path / "run").mkdir()
    last = Path(shutil.copy(finished / "last.pth", tmp_path / "run" / "last.pth"))
    shutil.copy(finished / "best_emotion_model.pth", tmp_path / "run")
    if change == "foreign weights":
        ckpt = torch.load(last, weights_only=True)
        wider = ern.Config(**{**ckpt["config"], "width": 0.25})
        torch.save({**ckpt, "model": ern.build_model(wider, 8).state_dict()}, last)
        change = []
    if change == "renamed":
        data = Path(shutil.copytree(tiny_dataset, tmp_path / "data"))
        doc = yaml.safe_load((data / "data.yaml").read_text())
        (data / "data.yaml").write_text(yaml.safe_dump({**doc, "names": ["Rage", *doc["names"][1:]]}, sort_keys=False))
        change = [f"--data_dir={data}"]
    with pytest.raises(ern.UserError) as refused:
        ern.main([f"--resume={last}", f"--cache_dir={tmp_path / 'cache'}", *change])
    message = str(refused.value).replace(str(tmp_path), "")
    assert "\n" not in message and all(w in message for w in words), message
    assert {p.name for p in (tmp_path / "run").iterdir()} - {".lock"} == {"best_emotion_model.pth", "last.pth"}, \
        "training started"
    assert (tmp_path / "cache").exists() == (words[0] in ("Anger", "weights do not fit")), \
        "decoded before refusing another network"


class RunsCode:
    """Pickles to a call of os.mkdir: what a malicious checkpoint does on a plain torch.load."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.mark.parametrize("kind", ["missing", "state_dict", "random_bytes", "runs_code", "weights_only_for_resume"])
def test_bad_checkpoint_file_gives_one_clear_line(finished, tiny_dataset, tmp_path, kind):
    path = tmp_path / f"{kind}.pth"
    action = "--evaluate"
    if kind == "state_dict":
        torch.save(ern.build_model(ern.Config(width=0.125, blocks="1,1,1,1"), 8).state_dict(), path)
    elif kind == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "runs_code":
        torch.save({"format": ern.CHECKPOINT_FORMAT, "payload": RunsCode(str(tmp_path / "pwned"))}, path)
    elif kind == "weights_only_for_resume":
        shutil.copy(finished / "best_emotion_model.pth", path)
        action = "--resume"
    with pytest.raises(ern.UserError) as refused:
        ern.main([f"{action}={path}", f"--data_dir={tiny_dataset}", f"--output_dir={tmp_path / 'out'}",
                  f"--cache_dir={tmp_path / 'cache'}"])
    assert "\n" not in str(refused.value) and path.name in str(refused.value), refused.value
    assert not (tmp_path / "pwned").exists(), "the checkpoint ran code: torch.load without weights_only=True"


def test_a_checkpoint_this_user_may_not_read_is_one_line(finished, tiny_dataset, tmp_path, monkeypatch):
    """Another user's run on a shared machine: open() refuses its checkpoint (the system's PermissionError, made here
    for root, whom permissions do not stop) or its folder. Before: torch.load's PermissionError, then the same again
    from the handler that read the file's first bytes, a chained traceback; the folder's, from is_file (Python 3.14's
    is_file says False there instead: then "a folder without best_emotion_model.pth" whose listing names it)."""
    shutil.copytree(finished, tmp_path / "theirs", ignore=shutil.ignore_patterns(".lock"))
    real_open, real_stat, theirs = open, Path.stat, str(tmp_path / "theirs" / "best_emotion_model.pth")

    def refusing_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.fspath(file) == theirs:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    def refusing_stat(path, *args, **kwargs):  # a folder without the execute permission: nothing in it has a status
        if path.parent == tmp_path / "locked":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refusing_open)
    monkeypatch.setattr(Path, "stat", refusing_stat)
    (tmp_path / "locked").mkdir()
    for checkpoint in (tmp_path / "theirs", tmp_path / "locked"):
        with pytest.raises(ern.UserError) as refused:
            ern.main([f"--evaluate={checkpoint}", f"--data_dir={tiny_dataset}", f"--output_dir={tmp_path / 'out'}",
                      f"--cache_dir={tmp_path / 'cache'}"])
        assert str(refused.value).startswith(f"cannot read the checkpoint {checkpoint}") \
            and str(refused.value).endswith(": Permission denied"), refused.value
        with pytest.raises(ern.UserError, match=f"^cannot read the checkpoint {re.escape(str(checkpoint))}"):
            pr.main([str(tiny_dataset), f"--checkpoint={checkpoint}", f"--output_dir={tmp_path / 'pred'}"])


def test_resume_refuses_what_it_cannot_honour(tiny_dataset, tmp_path):
    """Another output folder, batch size, learning rate, weight decay, time budget or preset: one line naming the
    field and why, before any work; the run's own folder is no change. (Before: a TypeError traceback, a scheduler
    silently out of step, or a config.json recording a learning rate the optimizer never used.) Likewise another seed,
    held-out fraction, duplicate policy or crop margin (the validation split held out of train would hold faces
    already trained on, silently) and other per-epoch validation (the best epoch so far compared with accuracies
    measured otherwise). A run folder that lost its best model (copied without it): one line before training, not
    after it."""
    cfg = ern.Config(image_size=32, width=0.125, blocks="1,1,1,1", batch_size=16, output_dir=str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    last = tmp_path / "run" / "last.pth"
    torch.save({**ern.checkpoint_dict(ern.build_model(cfg, 8), cfg, ern.DEMO_CLASSES, torch.zeros(3), torch.ones(3), 1, {}),
                "optimizer": {}}, last)
    for arg, field in ((f"--output_dir={tmp_path / 'elsewhere'}", "--output_dir"), ("--batch_size=32", "--batch_size"),
                       ("--lr=0.5", "--lr"), ("--weight_decay=0", "--weight_decay"), ("--time_budget=5", "--time_budget"),
                       ("--preset=cpu", "--preset"), ("--seed=1", "--seed"), ("--val_fraction=0.2", "--val_fraction"),
                       ("--drop_duplicates=true", "--drop_duplicates"), ("--crop_margin=0.2", "--crop_margin"),
                       ("--val_faces=8", "--val_faces"), ("--tta_zoom=0.9", "--tta_zoom")):
        with pytest.raises(ern.UserError, match=rf"^--resume cannot change {field}=[^ ]+ \(the run's: "):
            ern.main([f"--resume={last}", arg])
    ckpt = torch.load(last, weights_only=True)
    torch.save({**ckpt, "best": {"epoch": 1, "val_accuracy": 0.5}}, last)
    with pytest.raises(ern.UserError, match=r"best_emotion_model.pth \(epoch 1, the run's best so far\) is missing"):
        ern.main([f"--resume={last}"])
    (tmp_path / "run" / "best_emotion_model.pth").write_bytes(b"")
    with pytest.raises(ern.UserError, match="no data.yaml"):  # past the refusal: the same folder, the same batch
        ern.main([f"--resume={last}", f"--output_dir={tmp_path / 'run'}", "--batch_size=16"])


@pytest.mark.parametrize("device, message", [("foo", "--device must be auto, cpu, cuda or cuda:N"),
                                             ("cuda:7", "--device=cuda:7 but")])
def test_an_unknown_device_is_one_line(tmp_path, device, message):
    with pytest.raises(ern.UserError, match=re.escape(message)):
        ern.main([f"--device={device}", "--epochs=1"])


@pytest.mark.parametrize("capability, archs, usable", [
    ((6, 1), ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"], False),  # a GTX 1080 and this machine's torch
    ((7, 0), ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"], False),  # a V100
    ((8, 9), ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"], True),  # Ada runs sm_86's binaries
    ((6, 1), ["sm_80", "compute_50"], True),  # code compiled for it on the fly
    ((7, 5), ["sm_80", "sm_90a"], False),
    ((9, 0), ["sm_80", "sm_90a"], True),
    ((10, 3), ["sm_90", "sm_100a"], False),  # an architecture's own instructions serve it alone
    ((10, 0), ["sm_90", "sm_100a"], True),
    ((12, 1), ["sm_90", "sm_100", "sm_120"], True),  # three digits: major 12
    ((12, 0), ["sm_90", "compute_90a"], False),
    ((12, 0), ["sm_90", "compute_90"], True)])
def test_a_gpu_this_torch_has_no_kernels_for_is_not_picked_and_is_one_line(monkeypatch, capsys, capability, archs,
                                                                            usable):
    """torch.cuda.is_available() is true on a GPU the build carries no kernels for, and its first kernel fails: auto
    computes on the CPU instead (and says so), --device=cuda is one line naming the GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: archs)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA GeForce GTX 1080")
    ern.gpu_unsupported.cache_clear()
    ern.auto_device.cache_clear()
    try:
        assert ern.resolve_device("auto").type == ("cuda" if usable else "cpu")
        if usable:
            ern.validate_device("cuda:0")
        else:
            assert f"GTX 1080 (compute capability {capability[0]}.{capability[1]}) has no kernels" in capsys.readouterr().err
            with pytest.raises(ern.UserError, match=r"--device=cuda: NVIDIA GeForce GTX 1080 .* or use --device=cpu"):
                ern.validate_device("cuda")
    finally:
        ern.gpu_unsupported.cache_clear()
        ern.auto_device.cache_clear()


def test_more_than_four_stages_are_built_as_asked():
    """--blocks=1,1,1,1,1 builds five stages (widths doubling from 80 x width), as its config and checkpoint say."""
    model = ern.build_model(ern.Config(width=0.125, blocks="1,1,1,1,1", image_size=64), 8).eval()
    assert len(model.stages) == 5 and [len(stage) for stage in model.stages] == [2] * 5  # one block + attention each
    with torch.no_grad():
        logits, _, f = model(torch.rand(2, 3, 64, 64))
    assert logits.shape == (2, 8) and f.shape == (2, 160)


def test_held_out_validation_keeps_the_faces_of_a_photo_together():
    """Every face of a photo is on one side, and each class (of a photo's first face) holds out round(0.2 n) of its
    n photos, at least one and never all: counted per class, so that another fraction or an unstratified draw fails."""
    rng = np.random.default_rng(0)
    images = [f"img{i}.jpg" for i in range(200) for _ in range(1 + i % 3)]  # one to three faces a photo
    labels = rng.integers(0, 4, len(images))
    held = ern.stratified_holdout(labels, images, 0.2, seed=1)
    on_both_sides = {p for p, h in zip(images, held) if h} & {p for p, h in zip(images, held) if not h}
    assert not on_both_sides
    held_photos = {p for p, h in zip(images, held) if h}
    first_labels = {p: int(l) for p, l in reversed(list(zip(images, labels)))}  # the first face's label wins
    per_class = Counter(first_labels.values())
    assert len(per_class) == 4 and min(per_class.values()) >= 10  # every class has photos enough for a fifth to count
    assert Counter(first_labels[p] for p in held_photos) == {
        c: min(n - 1, max(1, round(0.2 * n))) for c, n in per_class.items()}


def test_a_class_with_one_image_keeps_it_in_training_and_too_few_images_are_one_line(tmp_path):
    """The hold-out takes no class's only image (it would leave training); where every class has one, no
    validation split can be held out, which is said in one line (a division by zero at the first epoch before)."""
    images = [f"img{i}.jpg" for i in range(41)]
    labels = np.array([0] * 20 + [1] * 20 + [2])
    held = ern.stratified_holdout(labels, images, 0.2, seed=1)
    assert held[:20].sum() == held[20:40].sum() == 4 and not held[40]
    data = ern.make_synthetic_dataset(tmp_path / "one", per_class=(1, 0, 0), size=48, seed=1)
    proc = run_script(*args_for(data, tmp_path, "--epochs=1"), cwd=tmp_path, check=False)
    assert_clean_error(proc)
    assert "8 training images are too few to hold out a validation split" in proc.stderr


def test_a_split_of_the_training_images_is_no_validation_or_test_split(tiny_dataset, tmp_path, capsys):
    """val: and test: naming the training folder (as Ultralytics' coco128.yaml does) measure nothing unseen: a
    hold-out takes val's place and the evaluation is on it. A validation folder that copies the training images
    under other names, with --drop_duplicates=true: nothing would be left, one line (a crash after epoch 1 before)."""
    data = Path(shutil.copytree(tiny_dataset, tmp_path / "data"))
    doc = yaml.safe_load((data / "data.yaml").read_text())
    cfg = ern.Config(data_dir=str(data), cache_dir=str(tmp_path / "cache"), image_size=32)
    # val: the hold-out, --val_fraction=0.1 of each class's 12 images; test: gone, val the valid folder's 8 x 4
    for name, split, left, val in (("validation", "val", {"train", "val", "test"}, 8), ("test", "test", {"train", "val"}, 32)):
        (data / "data.yaml").write_text(yaml.safe_dump({**doc, split: doc["train"]}))
        _, splits, _ = ern.load_dataset(cfg)
        assert set(splits) == left and len(splits["val"]) == val
        assert not set(splits["val"].paths) & set(splits["train"].paths)
        out = capsys.readouterr().out
        assert re.search(rf"{name} split \(\S+/train/images\) holds exactly the training split's images", out), out
        assert "has no usable sample" not in out  # it has; they are the training images
    (data / "data.yaml").write_text(yaml.safe_dump(doc))
    for kind in ("images", "labels"):
        shutil.rmtree(data / "valid" / kind)
        shutil.copytree(data / "train" / kind, data / "valid" / kind)
        for f in (data / "valid" / kind).iterdir():
            f.rename(f.with_name("copy_" + f.name))
    with pytest.raises(ern.UserError, match="every validation sample duplicates a training image, so "
                                            "--drop_duplicates=true leaves none"):
        ern.load_dataset(dataclasses.replace(cfg, drop_duplicates=True))


def test_provenance_and_resume_from_another_folder(tiny_dataset, tmp_path):
    """provenance.json holds the command, versions, machine, code version and the dataset's fingerprint; a run
    started with relative --data_dir and --cache_dir resumes from another working folder, and the resume is
    appended to provenance.json."""
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    shutil.copytree(tiny_dataset, start / "data")
    elsewhere.mkdir()
    run_script(*FAST, "--data_dir=data", "--cache_dir=cache", "--epochs=1", "--output_dir=run", cwd=start)
    [first] = json.loads((start / "run" / "provenance.json").read_text())
    assert first["command"].startswith(shlex.join([sys.executable, str(SCRIPT.resolve())]))
    assert "--data_dir=data" in first["command"] and first["cwd"] == str(start)
    assert first["data_dir"] == str((start / "data").resolve())
    assert first["versions"]["torch"] == torch.__version__ and first["threads"] >= 1 and first["cpu"]
    assert first["cpu_bf16_native"] == ern.cpu_has_bf16() and first["device"] == "cpu"
    names = sorted(p.name for p in (start / "data" / "train" / "images").iterdir())
    assert first["dataset"]["train"] == {"images": 96, "samples": 96,
                                         "file_list_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest()}
    assert first["script_sha256"] == hashlib.sha256(SCRIPT.read_bytes()).hexdigest()
    git = subprocess.run(["git", "-C", str(SCRIPT.parent), "log", "-1", "--format=%H", "--", SCRIPT.name],
                         capture_output=True, text=True)
    assert first["git_commit"] == ((git.stdout.strip() or None) if git.returncode == 0 else None)
    run_script(f"--resume={start / 'run' / 'last.pth'}", cwd=elsewhere)  # the finished run: evaluated again
    entries = json.loads((start / "run" / "provenance.json").read_text())
    assert len(entries) == 2 and entries[1]["cwd"] == str(elsewhere) and entries[1]["dataset"] == first["dataset"]
    assert not (elsewhere / "cache").exists()  # the run's own cache, found by its absolute path


# ---------------------------------------------------------------------------------------------
# A run's folder is its own, what the yaml names is what is read, every place written is checked
# ---------------------------------------------------------------------------------------------

def snapshot(folder):
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.name != ".lock"}


def test_a_failed_resume_leaves_the_finished_run_as_it_was(tiny_dataset, tmp_path, monkeypatch):
    """A resume that is refused (a dataset folder that is not there, a dataset with other classes) changes no file of
    the run it names: not config.json, not data_report.json, not the log."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    ern.main([*FAST, f"--data_dir={tiny_dataset}", "--epochs=1", f"--output_dir={run}", f"--cache_dir={tmp_path / 'cache'}"])
    before = snapshot(run)
    other = tmp_path / "other"
    shutil.copytree(tiny_dataset, other)
    doc = yaml.safe_load((other / "data.yaml").read_text())
    doc["names"] = doc["names"][::-1]
    (other / "data.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    for data, says in ((tmp_path / "typo", "typo"), (other, "checkpoint classes")):
        with pytest.raises(ern.UserError, match=says):
            ern.main([f"--resume={run / 'last.pth'}", "--epochs=5", f"--data_dir={data}"])
        assert snapshot(run) == before


@pytest.mark.skipif(os.name == "nt", reason="no flock on Windows: folders are not claimed there")
def test_a_run_folder_is_claimed_by_one_run_at_a_time(tmp_path, monkeypatch):
    """The same --output_dir twice: the second run is refused while the first holds the folder, and gets it once the
    first has ended (its lock goes with its process). Two default folders in the same second are two folders."""
    cfg = ern.Config(output_dir=str(tmp_path / "run"))
    first, lock = ern.make_run_dir(cfg)
    with pytest.raises(ern.UserError, match="in use by another run"):
        ern.make_run_dir(cfg)
    lock.close()  # as the operating system does when the first run's process ends
    assert ern.make_run_dir(cfg)[0] == first
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ern.time, "strftime", lambda *a: "20261129-230000")
    folders = [ern.make_run_dir(ern.Config())[0] for _ in range(3)]
    assert [f.name for f in folders] == ["ern__0__20261129-230000", "ern__0__20261129-230000__2", "ern__0__20261129-230000__3"]


@pytest.mark.skipif(os.name == "nt", reason="no flock on Windows: folders are not claimed there")
@pytest.mark.parametrize("action", ["train", "evaluate"])
def test_a_run_that_fails_in_its_folder_gives_the_folder_back_while_its_traceback_is_kept(tmp_path, action):
    """A notebook keeps the last traceback, and with it the failed call's frames: the claim must end with the call."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "data.yaml").write_text("nc: 2\nnames: [a, b]\n")  # no images: refused once the folder is claimed
    argv = [f"--data_dir={tmp_path / 'data'}", f"--output_dir={tmp_path / 'run'}"]
    if action == "evaluate":
        model = ern.build_model(ern.Config(width=0.25, blocks="1,1,1,1"), 2)
        ern.atomic_save(ern.checkpoint_dict(model, ern.Config(width=0.25, blocks="1,1,1,1"), ["a", "b"], torch.zeros(3),
                                            torch.ones(3), 1, {}), tmp_path / "model.pth")
        argv.append(f"--evaluate={tmp_path / 'model.pth'}")
    with pytest.raises(ern.UserError, match="no training images") as failed:
        ern.main(argv)
    assert failed.traceback  # kept alive here, as sys.last_traceback keeps it in a notebook
    ern.claim_folder(tmp_path / "run").close()  # refused ("in use by another run") while the failed call held it


def test_a_refused_run_whose_log_cannot_be_written_either_says_the_first_error(tmp_path, monkeypatch):
    """A run refused in its folder notes why in train.log; where that write fails too (a disk full, a folder gone
    read-only) the run's own error is what is said, not the log's."""
    def refused(*args):
        raise ern.UserError("could not write last.pth: No space left on device")

    def unwritable(path, text):
        raise ern.UserError(f"could not write {path}: No space left on device")

    monkeypatch.setattr(ern, "train_in_folder", refused)
    monkeypatch.setattr(ern, "append_text", unwritable)
    with pytest.raises(ern.UserError, match="^could not write last.pth"):
        ern.run_training(ern.Config(output_dir=str(tmp_path / "run"), device="cpu"))


def test_an_output_dir_that_is_a_file_or_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(ern.UserError, match="is a file, not a folder"):
        ern.make_run_dir(ern.Config(output_dir=str(tmp_path / "a_file")))

    def read_only(folder):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(ern, "claim_folder", read_only)
    with pytest.raises(ern.UserError, match="cannot write in the run folder .*Read-only file system"):
        ern.make_run_dir(ern.Config(output_dir=str(tmp_path / "run")))


def test_out_of_memory_is_one_line_naming_the_batch_sizes(tiny_dataset, tmp_path, monkeypatch):
    """A laptop GPU too small for the default batch, or an allocation the system refuses (a real one here: a petabyte):
    one line naming the batch sizes to lower; any other error is left as it is."""
    def refused(*args, **kwargs):
        torch.empty(2**50, dtype=torch.uint8)

    def gpu_full(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 3.8 GiB")

    def other(*args, **kwargs):
        raise RuntimeError("an unrelated failure")

    for n, (fail, error, match) in enumerate([
            (refused, ern.UserError, r"out of memory on cpu \(.*DefaultCPUAllocator: can't allocate memory.*\) at "
                                     r"--batch_size=16, --eval_batch_size=64: start again with smaller ones"),
            (gpu_full, ern.UserError, r"out of memory on cpu \(CUDA out of memory. Tried to allocate 2.00 GiB.*"
                                      r"--batch_size=16"),
            (other, RuntimeError, "an unrelated failure")]):
        monkeypatch.setattr(ern, "train_one_epoch", fail)
        with pytest.raises(error, match=match):
            ern.main([*FAST, f"--data_dir={tiny_dataset}", f"--output_dir={tmp_path / str(n)}",
                      f"--cache_dir={tmp_path / 'cache'}"])


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"PK half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: "
                           "file write failed")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(ern.UserError, match="could not write .*last.pth.*file write failed"):
        ern.atomic_save({"w": torch.zeros(3)}, tmp_path / "last.pth")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, a file every write to fails: disk full")
@pytest.mark.parametrize("name", ["train.log", "metrics.jsonl", "training_history.png"])
def test_a_full_disk_under_the_log_is_one_line(tiny_dataset, tmp_path, name):
    """The run's log, its per-epoch metrics or a figure refused (ENOSPC, for real: the file is /dev/full): one line
    naming it, not a traceback; a figure's comes after evaluation_results.json, so no number is lost."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / name).symlink_to("/dev/full")
    proc = run_script(*args_for(tiny_dataset, tmp_path), cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == (f"error: could not write {tmp_path / 'run' / name}: No space left on "
                                            f"device; free some space or choose another --output_dir")
    assert (tmp_path / "run" / "evaluation_results.json").exists() == (name == "training_history.png")


def test_compile_without_a_cpp_compiler_is_one_line(tiny_dataset, tmp_path):
    """--compile=true where torch's inductor finds no C++ compiler (a slim container, Windows without MSVC; here
    CXX names none): one line saying so and naming --compile=false, not a traceback."""
    proc = run_script(*args_for(tiny_dataset, tmp_path, "--epochs=1", "--compile=true"), cwd=tmp_path, check=False,
                      env={"CXX": str(tmp_path / "no" / "g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    assert_clean_error(proc)
    assert proc.stderr.splitlines()[-1].startswith("error: --compile=true failed: InvalidCxxCompiler: No working C++ "
                                                   "compiler found"), proc.stderr[-2000:]
    assert "install one, or pass --compile=false" in proc.stderr


def test_a_cache_folder_that_cannot_be_made_is_one_line(tiny_dataset, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    cfg = ern.Config(data_dir=str(tiny_dataset), cache_dir=str(tmp_path / "a_file" / "cache"), image_size=32)
    with pytest.raises(ern.UserError, match="cannot create the decode cache folder .*--cache_dir"):
        ern.load_dataset(cfg)


def test_class_names_are_utf8_in_data_yaml_and_the_log_whatever_the_locale(tmp_path):
    """Ultralytics writes data.yaml in UTF-8; a process in an ASCII locale (no UTF-8 mode) reads its names intact,
    writes them to the log in UTF-8, and prints them escaped rather than dying."""
    (tmp_path / "train" / "images").mkdir(parents=True)
    names = ["Überraschung", "生气", "neutral"]
    (tmp_path / "data.yaml").write_bytes(yaml.safe_dump(dict(train="train/images", nc=3, names=names),
                                                        allow_unicode=True).encode("utf-8"))
    code = ("import sys, locale, emotion_recognition as ern; assert locale.getpreferredencoding(False) != 'UTF-8'; "
            "names = ern.read_data_yaml(sys.argv[1])[0]; ern.log(' '.join(names), sys.argv[2]); print(ascii(names))")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    env.pop("PYTHONIOENCODING", None)
    done = subprocess.run([sys.executable, "-X", "utf8=0", "-c", code, str(tmp_path), str(tmp_path / "train.log")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["\\xdcberraschung \\u751f\\u6c14 neutral", ascii(names)]
    assert (tmp_path / "train.log").read_bytes() == (" ".join(names) + "\n").encode("utf-8")


def test_a_disk_too_small_for_the_decode_cache_is_one_line_before_decoding(tiny_dataset, tmp_path, monkeypatch):
    """The cache is a sparse memory-mapped file: a disk filling under it would kill the run (SIGBUS) without a word."""
    _, folders, _, _ = ern.read_data_yaml(tiny_dataset)
    split, _, *_ = ern.scan_split("val", folders["val"], 8)
    need, real = len(split) * 3 * 32 * 32, shutil.disk_usage
    decoded = []
    decode = ern.decode_image
    monkeypatch.setattr(ern, "decode_image", lambda path: decoded.append(path) or decode(path))
    for free, cache in ((need - 1, tmp_path / "small"), (need, tmp_path / "enough")):
        monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=free))
        cfg = ern.Config(data_dir=str(tiny_dataset), cache_dir=str(cache), image_size=32, decode_threads=1)
        if free < need:
            with pytest.raises(ern.UserError, match=rf"val split's decode cache needs .* MiB in "
                                                    rf"{re.escape(str(cache))} and .* MiB are free: free some space"):
                ern.load_split_pixels(split, cfg)
            assert decoded == [] and list(cache.iterdir()) == []
        else:
            ern.load_split_pixels(split, cfg)
            assert split.images.shape == (len(split), 3, 32, 32) and len(decoded) == len(set(split.paths))


def test_a_cpu_quota_is_read_from_cgroup_v2_and_v1(tmp_path):
    """docker --cpus=2.5 on a 64-core host: every core visible, 2.5 cores of time. The smallest quota of this
    process's group and the groups above it, in cgroup v2's cpu.max or v1's cfs files; none, unlimited or unreadable:
    None."""
    def quota(files, membership="0::/kubepods/pod1"):
        root = tmp_path / str(len(list(tmp_path.iterdir())))
        root.mkdir()
        for name, text in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text + "\n")
        (root / "self_cgroup").write_text(membership + "\n")
        return ern.cpu_quota(root, root / "self_cgroup")

    assert quota({"kubepods/pod1/cpu.max": "250000 100000"}) == 3  # to the nearest core
    assert quota({"kubepods/pod1/cpu.max": "225000 100000"}) == 2
    assert quota({"kubepods/pod1/cpu.max": "max 100000", "kubepods/cpu.max": "400000 100000"}) == 4
    assert quota({"kubepods/pod1/cpu.max": "800000 100000", "kubepods/cpu.max": "300000 100000"}) == 3
    assert quota({"cpu.max": "140000 100000"}, "0::/") == 1  # a container's own namespace: its group is the root
    assert quota({"cpu.max": "20000 100000"}, "0::/") == 1  # a fifth of a core still runs one thread
    v1 = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n3:cpuset:/docker/abc"
    assert quota({"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "600000",
                  "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000"}, v1) == 6
    assert quota({"cpu/docker/cpu.cfs_quota_us": "50000", "cpu/docker/cpu.cfs_period_us": "10000"}, v1) == 5
    assert quota({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, "1:cpu:/") is None
    assert quota({"cpuset/cpu.cfs_quota_us": "100000", "cpuset/cpu.cfs_period_us": "100000"}, "3:cpuset:/") is None
    assert quota({"kubepods/pod1/cpu.max": "max 100000"}) is None
    assert quota({"kubepods/pod1/cpu.max": "garbled"}) is None
    assert quota({"cpu.max": "100000 100000"}, "garbled") is None
    assert quota({}) is None
    assert ern.cpu_quota(tmp_path / "no cgroups", tmp_path / "no membership") is None  # Windows, macOS


def test_torch_threads_are_capped_at_the_cpu_quota_unless_omp_num_threads_is_set(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr(ern, "cpu_quota", lambda: None)
    cores = ern.cpu_threads()  # the affinity mask's
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        for quota, expect in ((None, cores), (cores + 1, cores), (1, 1)):
            torch.set_num_threads(cores + 2)  # more than any of them
            monkeypatch.setattr(ern, "cpu_quota", lambda: quota)
            assert ern.cpu_threads() == expect
            ern.fit_threads_to_cpu()
            assert torch.get_num_threads() == expect
        torch.set_num_threads(cores + 2)
        monkeypatch.setenv("OMP_NUM_THREADS", str(cores + 2))  # the user's choice
        ern.fit_threads_to_cpu()
        assert torch.get_num_threads() == cores + 2
    finally:
        torch.set_num_threads(threads)


def test_what_labelimg_and_windows_leave_in_a_dataset_is_not_a_problem(tmp_path):
    """LabelImg's labels/classes.txt, Windows' Thumbs.db and desktop.ini and Jupyter's checkpoints are skipped; a label file without an
    image is still one, and an image named classes keeps its label file."""
    images, labels = tmp_path / "train" / "images", tmp_path / "train" / "labels"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    face = np.full((40, 40, 3), 128, np.uint8)
    for stem in ("a", "b"):
        cv2.imwrite(str(images / f"{stem}.png"), face)
        (labels / f"{stem}.txt").write_text("1 0.5 0.5 0.5 0.5\n")
    (images / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (images / "desktop.ini").write_text("[.ShellClassInfo]\n")
    (labels / "classes.txt").write_text("anger\nhappy\n")
    (labels / "orphan.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    (images / ".ipynb_checkpoints").mkdir()  # Jupyter's copies
    cv2.imwrite(str(images / ".ipynb_checkpoints" / "a-checkpoint.png"), face)
    split, problems, *_ = ern.scan_split("train", images, 2)
    assert sorted(Path(p).name for p in split.paths) == ["a.png", "b.png"]
    assert problems == [f"{labels / 'orphan.txt'}: label file without an image in {images}"]
    cv2.imwrite(str(images / "classes.png"), face)
    (labels / "classes.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    split, problems, *_ = ern.scan_split("train", images, 2)
    assert sorted((Path(p).name, c) for p, c in zip(split.paths, split.labels.tolist())) == [
        ("a.png", 1), ("b.png", 1), ("classes.png", 0)]


def test_what_a_killed_cache_build_left_is_removed_by_the_next_build(tiny_dataset, tmp_path):
    """SIGKILL mid-decode leaves NAME.PID.tmp (no cleanup runs): the next build of the split removes it once it is an
    hour old and its process is gone, and keeps a running build's, a recent one's and another split's."""
    cfg = ern.Config(data_dir=str(tiny_dataset), cache_dir=str(tmp_path / "cache"), image_size=32)
    ern.load_dataset(cfg, splits_wanted=("train",))
    [array] = (tmp_path / "cache").glob("*_train_*.npy")
    for built in (tmp_path / "cache").iterdir():
        built.unlink()  # the next load builds the cache again
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    prefix = array.stem.rsplit("_", 1)[0]  # the folder, split, size and margin: the key differs
    left = {f"{prefix}_{'1' * 20}.npy.{dead}.tmp": 7200, f"{prefix}_{'2' * 20}.json.{dead}.tmp": 7200,
            f"{prefix}_{'3' * 20}.npy.{os.getpid()}.tmp": 7200, f"{prefix}_{'4' * 20}.npy.{dead}.tmp": 60,
            f"0123456789_train_48px_m100_{'5' * 20}.npy.{dead}.tmp": 7200}  # another dataset's: its own builds' business
    for name, age in left.items():
        (tmp_path / "cache" / name).write_bytes(b"x" * 1000)
        os.utime(tmp_path / "cache" / name, (time.time() - age, time.time() - age))
    ern.load_dataset(cfg, splits_wanted=("train",))
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.tmp")) == sorted(list(left)[2:])


def test_a_truncated_decode_cache_is_rebuilt(tiny_dataset, tmp_path, monkeypatch):
    cfg = ern.Config(data_dir=str(tiny_dataset), cache_dir=str(tmp_path / "cache"), image_size=32, decode_threads=1)
    _, folders, _, _ = ern.read_data_yaml(tiny_dataset)
    split, _, *_ = ern.scan_split("val", folders["val"], 8)
    ern.load_split_pixels(split, cfg)
    want = np.array(split.images)
    array = next((tmp_path / "cache").glob("*.npy"))
    array.write_bytes(array.read_bytes()[:1000])  # a disk that filled, a copy cut short
    decoded = []
    real = ern.decode_image
    monkeypatch.setattr(ern, "decode_image", lambda path: decoded.append(path) or real(path))
    again, _, *_ = ern.scan_split("val", folders["val"], 8)
    ern.load_split_pixels(again, cfg)
    assert len(decoded) == len(set(again.paths)) and np.array_equal(np.asarray(again.images), want)


def test_an_old_cache_that_cannot_be_removed_is_left(tiny_dataset, tmp_path, monkeypatch):
    """A changed dataset's old cache that cannot be deleted (still mapped by another run on Windows, or a
    colleague's in a shared --cache_dir): left where it is; the new cache is built and used (a traceback before)."""
    data = Path(shutil.copytree(tiny_dataset, tmp_path / "data"))
    cfg = ern.Config(data_dir=str(data), cache_dir=str(tmp_path / "cache"), image_size=32)
    ern.load_dataset(cfg, splits_wanted=("train",))
    old = set((tmp_path / "cache").iterdir())
    image = next((data / "train" / "images").iterdir())
    os.utime(image, (time.time() + 5, time.time() + 5))  # the dataset changed: a new cache key
    unlink = Path.unlink

    def refused(path, missing_ok=False):
        if path in old:
            raise PermissionError(13, "Permission denied", str(path))
        unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refused)
    _, splits, _ = ern.load_dataset(cfg, splits_wanted=("train",))
    new = set((tmp_path / "cache").iterdir()) - old
    assert old <= set((tmp_path / "cache").iterdir()) and {p.suffix for p in new} == {".npy", ".json"}
    assert len(splits["train"]) + len(splits["val"]) == 96  # val: held out of train (it alone was asked for)


def test_a_resume_where_fewer_gpus_are_visible_restores_the_random_state_of_those_there(monkeypatch):
    """last.pth keeps a random state per GPU visible when it was saved; a resume that sees fewer (another
    CUDA_VISIBLE_DEVICES, a smaller allocation) restores theirs. torch's set_rng_state_all indexes its GPUs by the
    states given: an IndexError before. No GPU here: torch.cuda's count and setter stand in, the checkpoint is real."""
    cfg = ern.Config(image_size=32, width=0.125, blocks="1,1,1,1")
    model = ern.build_model(cfg, 8)
    optimizer, scheduler, scaler = ern.optimization_parts(model, cfg, torch.device("cpu"), 4)
    state = ern.training_state(optimizer, scheduler, scaler, [], {"epoch": 0, "val_accuracy": 0.0}, 4)
    saved = [torch.full((16,), k, dtype=torch.uint8) for k in range(2)]  # two GPUs at the save
    resume = {**ern.checkpoint_dict(model, cfg, ern.DEMO_CLASSES, torch.zeros(3), torch.ones(3), 1, {}, **state),
              "rng": {**state["rng"], "cuda": saved}}
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.extend(states))
    assert ern.restore_training_state(resume, optimizer, scheduler, scaler)[2] == 2
    assert len(restored) == 1 and torch.equal(restored[0], saved[0])


def test_a_test_split_that_is_the_validation_split_is_no_test_split(tiny_dataset, tmp_path):
    """data.yaml's test naming the validation folder (exports without a test split write that): no test split, and the
    final evaluation says val. A test image that repeats a validation image pixel for pixel is counted and said."""
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    doc = yaml.safe_load((data / "data.yaml").read_text())
    doc["test"] = doc["val"]
    (data / "data.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    cfg = ern.Config(data_dir=str(data), cache_dir=str(tmp_path / "cache"), image_size=32)
    log = tmp_path / "log.txt"
    _, splits, _ = ern.load_dataset(cfg, log)
    assert "test" not in splits and "no test split" in log.read_text()

    shutil.rmtree(data)
    shutil.copytree(tiny_dataset, data)
    val_image = sorted((data / "valid" / "images").iterdir())[0]
    shutil.copy(val_image, data / "test" / "images" / f"copy{val_image.suffix}")
    shutil.copy(data / "valid" / "labels" / f"{val_image.stem}.txt", data / "test" / "labels" / "copy.txt")
    _, splits, report = ern.load_dataset(cfg, log)
    assert "test" in splits and report["duplicates"]["test_in_val"]["samples"] == 1
    assert "1 test samples duplicate validation images" in log.read_text()


def test_what_users_type_is_read_as_they_mean_it(tiny_dataset, tmp_path):
    """A quoted nc, a byte-order mark in a label file and in an @list file, a class id that is not an integer, and a
    run folder given as --checkpoint."""
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    doc = yaml.safe_load((data / "data.yaml").read_text())
    doc["nc"] = "8"
    (data / "data.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    assert ern.read_data_yaml(data)[0] == doc["names"]  # not "nc is 8 but names lists 8 classes"

    label = tmp_path / "a.txt"
    label.write_bytes("\ufeff3 0.5 0.5 0.4 0.4\n".encode("utf-8"))  # Windows Notepad's UTF-8
    assert ern.parse_label_file(label, 8) == ([(3, 0.5, 0.5, 0.4, 0.4)], [], [])
    label.write_text("2.5 0.5 0.5 0.4 0.4\n")
    assert ern.parse_label_file(label, 8)[1] == [f"{label}:1: class id 2.5 is not an integer"]

    photo = sorted((tiny_dataset / "valid" / "images").iterdir())[0]
    listing = tmp_path / "list.txt"
    listing.write_bytes(f"\ufeff{photo}\n".encode("utf-8"))
    assert [s.path for s in pr.prediction_inputs([f"@{listing}"])] == [str(photo)]


def test_a_run_folder_stands_for_its_checkpoint(tmp_path):
    """--evaluate, --checkpoint: the folder's best_emotion_model.pth; --resume: its last.pth; a folder without it: the
    checkpoints it holds."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "final_emotion_model.pth").write_bytes(b"x")
    with pytest.raises(ern.UserError, match="without best_emotion_model.pth; its checkpoints: final_emotion_model.pth"):
        ern.checkpoint_in(run, "best_emotion_model.pth")
    (run / "best_emotion_model.pth").write_bytes(b"x")
    assert ern.checkpoint_in(run, "best_emotion_model.pth") == str(run / "best_emotion_model.pth")
    assert ern.checkpoint_in(run / "final_emotion_model.pth", "last.pth") == str(run / "final_emotion_model.pth")
    with pytest.raises(ern.UserError, match="without last.pth"):
        ern.main([f"--resume={run}"])


def test_an_image_list_split_reads_the_images_it_lists_with_their_labels(tiny_dataset, tmp_path):
    """`train: train.txt` (Ultralytics' and CVAT's image lists; lines relative to the list's folder, with or without
    './'): exactly the listed images, each with the label file the folder rule gives, as the folder would read them."""
    data = Path(shutil.copytree(tiny_dataset, tmp_path / "data")).resolve()
    images = sorted((data / "train" / "images").iterdir())
    lines = [f"./train/images/{p.name}" for p in images[:5]] + [f"train/images/{p.name}" for p in images[5:9]]
    (data / "lists").mkdir()
    (data / "lists" / "train.txt").write_text("# nine of them\n" + "".join(f"../{x}\n" for x in lines) +
                                             "../train/images/gone.jpg\n../train/labels/" + images[0].stem + ".txt\n"
                                             f"../{lines[0]}\n\"../{lines[6]}\"\n",  # again, and quoted: read once
                                             encoding="utf-16")  # as PowerShell's > writes it
    folder, *_ = ern.scan_split("train", data / "train" / "images", 8)
    listed, problems, *_ = ern.scan_split("train", data / "lists" / "train.txt", 8)
    expected = [i for i, p in enumerate(folder.paths) if Path(p) in images[:9]]
    assert listed.paths == [folder.paths[i] for i in expected] and len(set(listed.paths)) == 9
    assert listed.labels.tolist() == folder.labels[expected].tolist()
    np.testing.assert_array_equal(listed.boxes, folder.boxes[expected])
    assert problems == [f"{data / 'lists' / 'train.txt'}:11: {data / 'train' / 'images' / 'gone.jpg'} does not exist",
                        f"{data / 'lists' / 'train.txt'}:12: {data / 'train' / 'labels' / images[0].stem}.txt is not "
                        f"an image file (extension .txt)"]
    (data / "lists" / "long.txt").write_text("x" * 300 + ".jpg\n", encoding="utf-16")  # PowerShell's; too long
    assert ern.scan_split("train", data / "lists" / "long.txt", 8)[1] == [
        f"{data / 'lists' / 'long.txt'}:1: {data / 'lists' / ('x' * 300 + '.jpg')}: File name too long"]
    both, _, *_ = ern.scan_split("train", [data / "lists" / "train.txt", data / "train" / "images"], 8)
    assert both.paths == listed.paths + [p for p in folder.paths if Path(p) not in images[:9]]  # each image once


def test_cvats_yolo_1_1_image_list_is_read_from_the_export(tmp_path):
    """CVAT's YOLO 1.1 export (train.txt, obj.names, obj_train_data/ with each label beside its image) names each
    image as data/obj_train_data/x.jpg, for Darknet, which keeps the export in its data/ folder: every image "did not
    exist". A data/ folder that is there is still read as named."""
    (tmp_path / "obj_train_data").mkdir()
    cv2.imwrite(str(tmp_path / "obj_train_data" / "a.jpg"), np.full((16, 16, 3), 99, np.uint8))
    (tmp_path / "obj_train_data" / "a.txt").write_text("1 0.5 0.5 1 1")
    (tmp_path / "train.txt").write_text("data/obj_train_data/a.jpg\ndata/obj_train_data/gone.jpg\n.\n")
    split, problems, *_ = ern.scan_split("train", tmp_path / "train.txt", 2)
    assert split.paths == [str(tmp_path / "obj_train_data" / "a.jpg")] and split.labels.tolist() == [1]
    gone = tmp_path / "data" / "obj_train_data" / "gone.jpg"
    assert problems == [f"{tmp_path / 'train.txt'}:2: {gone} does not exist",
                        f"{tmp_path / 'train.txt'}:3: {tmp_path} is not an image file (extension none)"]
    shutil.copytree(tmp_path / "obj_train_data", tmp_path / "data" / "obj_train_data")
    split, problems, *_ = ern.scan_split("train", tmp_path / "train.txt", 2)
    assert split.paths == [str(tmp_path / "data" / "obj_train_data" / "a.jpg")]


def test_a_split_without_labels_is_a_problem_and_an_empty_one_is_empty(tiny_dataset, tmp_path):
    """An unlabelled test/images (a competition's) stopped even --strict=false; an empty test/images without its
    empty labels/ (which zip tools drop) stopped every run. Label files put among the images of an images/ folder
    are named in the refusal (it said only that labels/ was missing)."""
    data = Path(shutil.copytree(tiny_dataset, tmp_path / "data")).resolve()
    shutil.rmtree(data / "test" / "labels")
    n = len(list((data / "test" / "images").iterdir()))
    split, problems, *_ = ern.scan_split("test", data / "test" / "images", 8)
    assert len(split) == 0 and problems == [f"{data / 'test' / 'images'}: {n} images but no labels folder "
                                            f"{data / 'test' / 'labels'}: add the labels, or take the split out of "
                                            f"data.yaml (--strict=false leaves it out)"]
    cfg = ern.Config(data_dir=str(data), cache_dir=str(tmp_path / "cache"), image_size=32, strict=False)
    _, splits, report = ern.load_dataset(cfg)
    assert set(splits) == {"train", "val"} and report["problems"] == problems
    for p in (data / "test" / "images").iterdir():
        p.unlink()
    split, problems, *_ = ern.scan_split("test", data / "test" / "images", 8)
    assert len(split) == 0 and problems == []
    for label in (data / "train" / "labels").iterdir():  # beside the images in images/: Ultralytics would not read them
        label.rename(data / "train" / "images" / label.name)
    shutil.rmtree(data / "train" / "labels")
    n = len(list((data / "train" / "images").glob("*.txt")))
    with pytest.raises(ern.UserError, match=rf"train split: images in .* but no labels folder .* \({n} \.txt files lie "
                                            rf"among the images: .* move them there\)$"):
        ern.scan_split("train", data / "train" / "images", 8)


def test_a_split_whose_every_label_file_is_empty_is_a_problem(tiny_dataset, tmp_path):
    """Empty label files are images without faces; a whole split of them is an export that lost its labels, which
    became a validation split held out of training without a word."""
    data = Path(shutil.copytree(tiny_dataset, tmp_path / "data")).resolve()
    labels = sorted((data / "valid" / "labels").iterdir())
    for label in labels:
        label.write_text("")
    cfg = ern.Config(data_dir=str(data), cache_dir=str(tmp_path / "cache"), image_size=32)
    with pytest.raises(ern.UserError, match=re.escape(f"{data / 'valid' / 'images'}: all {len(labels)} label files "
                                                      f"of the val split are empty (no face labelled)")):
        ern.load_dataset(cfg)
    log = tmp_path / "train.log"
    _, splits, _ = ern.load_dataset(dataclasses.replace(cfg, strict=False), log)
    assert not set(splits["val"].paths) & {str(data / "valid" / "images" / f"{p.stem}.jpg") for p in labels}
    assert f"note: images with an empty label file (YOLO's image without faces) are not used: val {len(labels)}, " \
           f"e.g." in log.read_text()
    assert "note: the validation split has no usable sample; holding out" in log.read_text()


@pytest.mark.parametrize("ext", [".m4v", ".mpg", ".wmv", ".3gp"])
def test_common_video_files_are_videos(tmp_path, ext):
    clip = tmp_path / f"clip{ext}"
    clip.write_bytes(b"\x00")
    assert [s.kind for s in pr.prediction_inputs([str(clip)])] == ["video"]


@pytest.mark.parametrize("arg, message", [
    ("--seed=-1", "--seed must be in [0, 2**32)"), ("--seed=5000000000", "--seed must be in [0, 2**32)"),
    ("--time_budget=inf", "--time_budget must be a finite number"), ("--lr=nan", "--lr must be"),
    ("--dist_timeout=0", "--dist_timeout must be > 0"), ("--val_faces=-1", "--val_faces must be >= 0"),
    ("--blocks=2,a", "--blocks expects comma-separated integers"),
])
def test_every_value_a_user_types_is_range_checked_before_any_work(arg, message, tmp_path):
    """Values that parse but cannot work (a negative seed, which numpy's generators refuse; an infinite budget,
    which the plan cannot floor; a zero timeout) are one line before anything is read or written."""
    with pytest.raises(ern.UserError, match=re.escape(message)):
        ern.main([arg, f"--data_dir={tmp_path / 'none'}", f"--output_dir={tmp_path / 'run'}"])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overwrite", [[], ["--overwrite=true"]])
def test_evaluate_into_a_finished_runs_folder_changes_none_of_its_files(finished, tiny_dataset, tmp_path, overwrite):
    """Evaluating a run into its own folder is refused, --overwrite=true too (it deleted the checkpoints evaluated:
    the evaluation still ran, from the loaded model, and said nothing), however the folder or the model is named."""
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "best.pth").symlink_to(run / "best_emotion_model.pth")
    (tmp_path / "same").symlink_to(run)
    named = ((run, tmp_path / "x" / ".." / "run"), (tmp_path / "models" / "best.pth", run), (run, tmp_path / "same"))
    for model, out in named:
        with pytest.raises(ern.UserError, match="holds the checkpoint evaluated"):
            ern.main([f"--evaluate={model}", f"--data_dir={tiny_dataset}", f"--output_dir={out}",
                      f"--cache_dir={tmp_path / 'cache'}", *overwrite])
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_an_export_to_a_place_that_cannot_be_made_is_one_line(finished, tmp_path):
    (tmp_path / "file.txt").write_text("a file, not a folder")
    with pytest.raises(ern.UserError, match="cannot create .*file.txt"):
        ex.main([f"--checkpoint={finished}", f"--output={tmp_path / 'file.txt' / 'model.onnx'}"])


def test_a_split_the_yaml_leaves_out_is_not_read_though_its_folder_is_there(tiny_dataset, tmp_path):
    """A test split kept aside by leaving it out of data.yaml stays aside: no test split (the final evaluation is
    on validation), and a note names the folder that was not read."""
    data = Path(shutil.copytree(tiny_dataset, tmp_path / "data"))
    doc = yaml.safe_load((data / "data.yaml").read_text())
    del doc["test"]
    (data / "data.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    names, folders, notes, _ = ern.read_data_yaml(data)
    assert set(folders) == {"train", "val"} and (data / "test" / "images").is_dir()
    assert notes == [f"data.yaml names no test split: {data / 'test' / 'images'} is not read"]
