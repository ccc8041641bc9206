"""predict.py and EmotionPredictor: photos, folders, videos, cameras, bad input, the crops the network is given.

The subprocess tests run the script as a user would, on files the tests write and on a real photograph
that matplotlib (a requirement) ships: Grace Hopper's portrait. Nothing is downloaded.
"""
import csv
import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from matplotlib import cbook

from conftest import EXPORT, PREDICT, ROOT, ern, ex, pr, run_script

HOPPER = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)  # 512x600 RGB portrait, one frontal face
CLASSES = ["Anger", "Contempt", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny ERN checkpoint (32 px), its classifier scaled so that the probabilities differ across faces."""
    torch.manual_seed(0)
    cfg = ern.Config(image_size=32, width=0.125, blocks="1,1,1,1", eval_batch_size=64)
    model = ern.build_model(cfg, len(CLASSES))
    with torch.no_grad():
        model.classifier.weight.mul_(20)
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    torch.save(ern.checkpoint_dict(model, cfg, CLASSES, torch.full((3,), 0.5), torch.full((3,), 0.25), 1,
                                   {"val_accuracy": 0.5}), path)
    return path


def predict(*args, **kwargs):
    return run_script(*args, script=PREDICT, **kwargs)


def hopper_rgb():
    return cv2.cvtColor(cv2.imread(str(HOPPER)), cv2.COLOR_BGR2RGB)


def hopper_head():
    """The Hopper photograph's head without the flag, 220 x 240 px, BGR."""
    return cv2.resize(cv2.imread(str(HOPPER))[60:400, 110:420], (220, 240))


def read_csv(folder):
    with open(folder / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def write_video(path, frames, fps=10.0, size=(640, 480)):
    """A video of the Hopper head (without the flag) moving right by 6 px a frame on a grey background (back to
    the left edge after 55 frames)."""
    face = hopper_head()
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    for i in range(frames):
        frame = np.full((size[1], size[0], 3), 90, np.uint8)
        x = 80 + 6 * i % 330
        frame[120:360, x:x + 220] = face
        writer.write(frame)
    writer.release()
    return path


def test_a_folder_with_a_nested_copy_and_a_broken_file(checkpoint, tmp_path):
    """Rows for the image and its nested copy (the same numbers), the broken file named with its reason on
    stderr and in summary.json, a file that is not an image ignored and listed, exit code 1."""
    media = tmp_path / "media"
    (media / "sub").mkdir(parents=True)
    shutil.copy(HOPPER, media / "hopper.jpg")
    shutil.copy(HOPPER, media / "sub" / "copy.jpg")
    (media / "broken.jpg").write_bytes(open(HOPPER, "rb").read()[:5000])  # truncated
    (media / "notes.txt").write_text("not a picture")
    (media / ".hidden.jpg").write_bytes(b"junk")  # hidden: skipped
    proc = predict(f"{media}", f"--checkpoint={checkpoint}", f"--output_dir={tmp_path / 'out'}",
                      cwd=tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert any(str(media / "broken.jpg") in line and "truncated" in line for line in proc.stderr.splitlines())
    rows = read_csv(tmp_path / "out")
    by_source = {r["source"]: r for r in rows}
    assert set(by_source) == {str(media / "hopper.jpg"), str(media / "sub" / "copy.jpg")}
    a, b = by_source.values()
    assert {k: v for k, v in a.items() if k != "source"} == {k: v for k, v in b.items() if k != "source"}
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["errors"] == [{"source": str(media / "broken.jpg"), "error": "truncated jpeg file"}]
    assert summary["ignored"] == [str(media / "notes.txt")]
    assert (tmp_path / "out" / "annotated" / "media" / "sub" / "copy.jpg").is_file()
    assert cv2.imread(str(tmp_path / "out" / "annotated" / "media" / "hopper.jpg")).shape == (600, 512, 3)


def test_a_photo_line_counts_faces_and_a_demo_model_is_named(checkpoint, tmp_path, capsys):
    """"Anger in 100% of the faces" for a photo of one face read as a confidence: a photo's line counts the faces.
    A --demo model (drawn faces only) used on a photo gets a note."""
    ckpt = torch.load(checkpoint, weights_only=False)
    ckpt["config"]["preset"] = "demo"
    torch.save(ckpt, tmp_path / "demo.pth")
    two = tmp_path / "two.jpg"
    cv2.imwrite(str(two), np.hstack([cv2.imread(str(HOPPER))] * 2))  # two faces side by side
    assert pr.main([str(HOPPER), str(two), f"--checkpoint={tmp_path / 'demo.pth'}",
                    f"--output_dir={tmp_path / 'out'}"]) == 0
    out, err = capsys.readouterr()
    rows = read_csv(tmp_path / "out")
    for source, faces in ((str(HOPPER), 1), (str(two), 2)):
        top = Counter(r["emotion"] for r in rows if r["source"] == source).most_common(1)[0]
        assert f"{source}: {faces} face(s) detected, {faces} row(s); top emotion {top[0]} ({top[1]} of {faces} " \
               f"face(s))" in out
    assert "note: this is a --demo model, which knows drawn faces only" in err


def test_the_closing_line_names_the_folders_written_and_no_other(checkpoint, tmp_path, capsys):
    """A photo gets annotated/; an input that cannot be read gets no picture, and the line said annotated/ anyway."""
    assert pr.main([str(tmp_path / "missing.jpg"), f"--checkpoint={checkpoint}", f"--output_dir={tmp_path / 'none'}"]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == (f"0 rows from 1 source(s) in {tmp_path / 'none' / 'predictions.csv'}; "
                                                         f"summary.json beside it; 1 input(s) could not be read")
    assert pr.main([str(HOPPER), f"--checkpoint={checkpoint}", f"--output_dir={tmp_path / 'one'}"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("predictions.csv; summary.json, annotated/ beside it")


@pytest.mark.skipif(sys.platform == "win32", reason="a POSIX shell closes the descriptor")
def test_a_run_started_without_stdout_writes_its_predictions(checkpoint, tmp_path):
    """`predict.py ... >&-` (and Windows' pythonw) start Python with sys.stdout None: the first photo's line died
    with AttributeError, a traceback and exit 1."""
    command = f"{shlex.quote(sys.executable)} {shlex.quote(str(PREDICT))} {shlex.quote(str(HOPPER))} " \
              f"--checkpoint={shlex.quote(str(checkpoint))} --output_dir={shlex.quote(str(tmp_path / 'out'))} >&-"
    done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(read_csv(tmp_path / "out")) == 1


def test_equal_shares_go_to_the_larger_mean_probability_not_the_first_class():
    names = ["anger", "happy", "sad"]
    probs = [np.array([0.5, 0.3, 0.2]), np.array([0.1, 0.8, 0.1]), np.full(3, np.nan)]  # one face each; a gap
    assert pr.emotion_shares(probs, names) == ({"anger": 0.5, "happy": 0.5, "sad": 0.0}, "happy")
    assert pr.emotion_shares(probs[::-1], names[::-1])[1] == "happy"  # the order of classes and rows is no tie-break
    assert pr.emotion_shares(probs[:1] * 2 + probs[1:], names)[1] == "anger"  # the largest share first
    assert pr.emotion_shares([np.full(3, np.nan)], names) == ({}, None)


def test_a_whole_image_line_says_so_not_zero_faces_detected():
    """--detect_faces=false: "0 face(s) detected ... (1 of 1 face(s))" contradicted itself."""
    image = {"source": "a.jpg", "kind": "image", "faces": 0, "whole": 1, "no_face": 0, "rows": 1,
             "dominant_emotion": "Happy", "emotion_share": {"Happy": 1.0}}
    assert pr.source_line(image) == "a.jpg: whole image classified, 1 row(s); emotion Happy"
    video = {**image, "source": "v.mp4", "kind": "video", "frames": 3, "tracks": 1, "whole": 3, "rows": 3,
             "dominant_emotion": "Sad", "emotion_share": {"Sad": 2 / 3}}
    assert pr.source_line({**video, "tracks": 0}) == "v.mp4: 3 frames, whole frames classified, 3 row(s); top " \
                                                   "emotion Sad (67% of the frames)"
    # a video's faces are detections, one a frame: "300 face(s) detected" read as 300 people
    faces = {**video, "frames": 300, "faces": 300, "whole": 0, "rows": 300}
    assert pr.source_line(faces) == "v.mp4: 300 frames, 1 face track(s), 300 face detection(s), 300 row(s); top " \
                                    "emotion Sad (67% of the faces)"
    assert pr.source_line({**image, "faces": 1, "whole": 0}) == "a.jpg: 1 face(s) detected, 1 row(s); top emotion " \
                                                                "Happy (1 of 1 face(s))"
    tie = {**faces, "dominant_emotion": "Contempt", "emotion_share": {"Contempt": 0.5, "Happy": 0.0, "Neutral": 0.5}}
    assert pr.source_line(tie).endswith("; top emotion Contempt (50% of the faces), as many as Neutral (the higher "
                                        "mean probability decided)")  # a tie was shown as one emotion's


def test_a_timeline_leaves_frames_without_the_face_blank(tmp_path, monkeypatch):
    """A track seen at 0-0.3 s and again at 1.4-1.6 s (frames every 0.1 s): the line stops at 0.3 s and starts again
    at 1.4 s. Drawn through, it showed a gradual change of expression across the second without the face."""
    import matplotlib.axes
    drawn, plot = [], matplotlib.axes.Axes.plot

    def recorded(ax, x, y, *args, **kwargs):
        drawn.append((np.asarray(x), np.asarray(y)))
        return plot(ax, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recorded)
    times = [0.0, 0.1, 0.2, 0.3, 1.4, 1.5, 1.6]
    probs = [np.eye(8)[0] if t < 1 else np.eye(8)[6] for t in times]
    timeline = pr.Timeline()
    for t, p in zip(times, probs):
        timeline.add(0, t, p)
    pr.plot_timeline(timeline, CLASSES, "clip", tmp_path / "timeline.png")
    assert len(drawn) == 8 and (tmp_path / "timeline.png").stat().st_size > 5000
    for x, y in drawn:
        assert np.flatnonzero(np.isnan(x)).tolist() == [4] and np.isnan(y[4])
        assert np.array_equal(np.delete(x, 4), times)


@pytest.mark.parametrize("where", ["EmotionPredictor", "prediction_inputs"])
def test_ctrl_c_before_the_first_input_is_one_line(checkpoint, tmp_path, monkeypatch, capsys, where):
    """Ctrl-C while the model loads (or the probe runs) or while folders are listed: exit status 130 and one line,
    no traceback."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pr, where, interrupted)
    try:
        status = pr.main([str(HOPPER), f"--checkpoint={checkpoint}", f"--output_dir={tmp_path / 'out'}"])
    except KeyboardInterrupt:  # not left to stop pytest itself
        pytest.fail("Ctrl-C escaped predict.main as a traceback")
    assert status == 130
    assert capsys.readouterr().err == "interrupted\n"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, a file every write to fails: disk full")
def test_a_full_disk_under_the_predictions_is_one_line(checkpoint, tmp_path):
    """The CSV's last rows refused (ENOSPC, for real: the CSV is /dev/full) when it is closed: one line, not a
    traceback."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "predictions.csv").symlink_to("/dev/full")
    proc = predict(str(HOPPER), f"--checkpoint={checkpoint}", f"--output_dir={tmp_path / 'out'}", "--overwrite=true",
                   cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1] == (f"error: could not write {tmp_path / 'out' / 'predictions.csv'}: No space "
                                            f"left on device; free some space or choose another --output_dir")


def test_out_of_memory_in_evaluation_and_prediction_is_one_line(checkpoint, tiny_dataset, tmp_path, monkeypatch):
    """An allocation the system refuses (a real one: a petabyte) while --evaluate or predict.py classifies: one
    line naming the batch size to lower, and predict.py's summary.json still written, saying why it stopped."""
    def refused(*args, **kwargs):
        torch.empty(2**50, dtype=torch.uint8)

    monkeypatch.setattr(ern, "run_inference", refused)
    with pytest.raises(ern.UserError, match=r"out of memory on cpu \(.*DefaultCPUAllocator.*\) at "
                                            r"--eval_batch_size=64, --attention_samples=\d+, --tsne_samples=\d+: "
                                            r"start again with smaller ones"):
        ern.main([f"--evaluate={checkpoint}", f"--data_dir={tiny_dataset}", f"--output_dir={tmp_path / 'eval'}",
                  f"--cache_dir={tmp_path / 'cache'}"])
    monkeypatch.setattr(pr, "run_inference", refused)
    with pytest.raises(ern.UserError, match=r"out of memory on cpu \(.*\) at --batch=\d+: start again with a smaller"):
        pr.main([str(HOPPER), f"--checkpoint={checkpoint}", f"--output_dir={tmp_path / 'out'}"])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["sources"] == [] and summary["stopped"].startswith("out of memory on cpu")


def test_predictions_started_in_the_same_second_get_a_folder_each(checkpoint, tmp_path, monkeypatch):
    """The default folder is named by the second: a second call in it (a shell loop, xargs -P) gets predict__TIME__2,
    not a refusal or the first one's CSV."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pr.time, "strftime", lambda fmt, *when: "20261206-120000")
    for _ in range(2):
        assert pr.main([str(HOPPER), f"--checkpoint={checkpoint}"]) == 0
    folders = sorted(p.name for p in (tmp_path / "outputs").iterdir())
    assert folders == ["predict__20261206-120000", "predict__20261206-120000__2"]
    assert all(len(read_csv(tmp_path / "outputs" / f)) == 1 for f in folders)


def test_csv_columns_boxes_and_probabilities_on_a_real_photograph(checkpoint, tmp_path):
    """The columns in the issue's order then the class names in the checkpoint's; one face found on the portrait,
    its box in the photo's pixels around the face; probabilities summing to 1; emotion and confidence their max."""
    proc = predict(f"{HOPPER}", f"--checkpoint={checkpoint}", f"--output_dir={tmp_path / 'out'}",
                      cwd=tmp_path)
    header = (tmp_path / "out" / "predictions.csv").read_text().splitlines()[0].split(",")
    assert header == pr.CSV_COLUMNS + CLASSES
    [row] = read_csv(tmp_path / "out")
    x1, y1, x2, y2 = (float(row[k]) for k in ("x1", "y1", "x2", "y2"))
    assert row["face_detected"] == "true" and row["frame"] == "" and row["time_s"] == ""
    assert x1 < 256 < x2 and y1 < 215 < y2 and 150 < x2 - x1 < 320  # around the eyes and nose (hand-read)
    probs = np.array([float(row[c]) for c in CLASSES])
    assert probs.sum() == pytest.approx(1, abs=1e-3)
    assert row["emotion"] == CLASSES[int(probs.argmax())] and float(row["confidence"]) == pytest.approx(probs.max(), abs=1e-4)
    assert "1 face(s) detected" in proc.stdout


def test_ctrl_c_keeps_the_rows_written(checkpoint, tmp_path):
    """Ctrl-C in the middle of a video: exit 130, no traceback, the rows of the frames done are in the CSV, the
    summary says interrupted, and the annotated video holds those frames."""
    video = write_video(tmp_path / "long.mp4", frames=400)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(PREDICT), str(video), f"--checkpoint={checkpoint}",
                             f"--output_dir={out}", "--batch=8"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.time() + 120
    while not (out / "predictions.csv").exists() or len(read_csv(out)) < 16:  # two batches of 8 frames written
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"ended or too slow before two batches: {proc.communicate()}")
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr and "interrupted" in stderr
    frames = sorted({int(r["frame"]) for r in read_csv(out)})
    assert 16 <= len(frames) < 400 and frames == list(range(len(frames)))
    summary = json.loads((out / "summary.json").read_text())
    [entry] = summary["sources"]
    assert summary["interrupted"] is True and entry["frames"] == len(frames)
    assert entry["warnings"] == ["stopped by Ctrl-C"]  # not also "the video ended after 16 of the 400 frames"
    # a frame's rows are written before its annotated frame: Ctrl-C between the two leaves one frame fewer there
    annotated = int(cv2.VideoCapture(str(out / "annotated" / "long.mp4")).get(cv2.CAP_PROP_FRAME_COUNT))
    assert len(frames) - 1 <= annotated <= len(frames)


def test_a_video_every_second_frame(checkpoint, tmp_path):
    """Frame indices 0, 2, 4, ... as OpenCV counts them, times from the container's frame rate, one track
    for the one moving face, an annotated video with as many frames as were classified, a timeline."""
    video = write_video(tmp_path / "clip.mp4", frames=15, fps=10.0)
    predict(f"{video}", f"--checkpoint={checkpoint}", f"--output_dir={tmp_path / 'out'}", "--every=2",
               "--smoothing=0.5", cwd=tmp_path)
    rows = read_csv(tmp_path / "out")
    assert [int(r["frame"]) for r in rows] == list(range(0, 15, 2))
    assert [float(r["time_s"]) for r in rows] == pytest.approx([f / 10.0 for f in range(0, 15, 2)])
    assert {r["face"] for r in rows} == {"0"} and all(r["face_detected"] == "true" for r in rows)
    annotated = cv2.VideoCapture(str(tmp_path / "out" / "annotated" / "clip.mp4"))
    # one frame per classified frame, at 10 / 2 frames per second: it lasts as long as the source
    assert int(annotated.get(cv2.CAP_PROP_FRAME_COUNT)) == 8 and annotated.get(cv2.CAP_PROP_FPS) == pytest.approx(5.0)
    assert (tmp_path / "out" / "timelines" / "clip.png").stat().st_size > 10_000
    [source] = json.loads((tmp_path / "out" / "summary.json").read_text())["sources"]
    assert (source["frames"], source["faces"], source["tracks"], source["rows"]) == (8, 8, 1, 8)
    assert sum(source["emotion_share"].values()) == pytest.approx(1) and source["error"] is None


def test_smoothing_reaches_the_timeline_but_not_the_csv(checkpoint, tmp_path, monkeypatch):
    """--smoothing=0.5 at 60 fps: the CSV keeps each frame's own probabilities; the timeline (drawn from the smoothed
    track, as the annotated video's labels and the summary are) holds them smoothed in time, 0.5 ** (elapsed /
    SMOOTHING_STEP) of the past kept: the formula applied to the CSV's rows."""
    video = write_video(tmp_path / "clip.mp4", frames=8, fps=60.0)
    drawn = {}
    monkeypatch.setattr(pr, "plot_timeline", lambda timeline, *args: drawn.update(t=timeline.times[0],
                                                                                  p=timeline.probs[0]))
    assert pr.main([str(video), f"--checkpoint={checkpoint}", f"--output_dir={tmp_path / 'out'}",
                    "--smoothing=0.5"]) == 0
    rows = read_csv(tmp_path / "out")
    raw = np.array([[float(r[c]) for c in list(rows[0])[len(pr.CSV_COLUMNS):]] for r in rows])
    times = drawn["t"]  # the CSV's to the millisecond
    want = [raw[0]]
    for i in range(1, len(raw)):
        keep = 0.5 ** ((times[i] - times[i - 1]) / pr.SMOOTHING_STEP)
        want.append(keep * want[-1] + (1 - keep) * raw[i])
    assert len(rows) == 8 and {r["face"] for r in rows} == {"0"}
    assert [float(r["time_s"]) for r in rows] == pytest.approx([i / 60 for i in range(8)], abs=5e-4) == times
    assert np.abs(np.array(drawn["p"]) - want).max() < 2e-4  # the CSV's four decimals
    assert np.abs(np.array(drawn["p"]) - raw).max() > 1e-3  # the smoothing changed them, so the check above tells


def avi_with_gaps(path, frames, gaps, announced=None, fps=25.0):
    """An MJPEG AVI of grey frames (brightness 20 * i) with variable frame rate: gaps[i] empty chunks (AVI's
    dropped frames) before frame i, each moving the frames after it on by 1 / fps, as a phone's recording
    does when it slows down. `announced`: the frame count its headers claim (default: the chunks it holds)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (64, 48))
    for i in range(frames):
        writer.write(np.full((48, 64, 3), 20 * i, np.uint8))
    writer.release()
    data = path.read_bytes()
    movi = data.index(b"movi") - 8  # the LIST chunk that holds the frames
    end, at, jpegs = movi + 8 + int.from_bytes(data[movi + 4:movi + 8], "little"), movi + 12, []
    while at < end:
        size = int.from_bytes(data[at + 4:at + 8], "little")
        jpegs.append(data[at + 8:at + 8 + size])
        at += 8 + size + size % 2
    chunks = [c for i, jpeg in enumerate(jpegs) for c in [b""] * gaps.get(i, 0) + [jpeg]]
    body, index = bytearray(b"movi"), bytearray()
    for c in chunks:
        index += b"00dc" + struct.pack("<III", 0x10 if c else 0, len(body), len(c))  # keyframe flag, offset, size
        body += b"00dc" + struct.pack("<I", len(c)) + c + b"\0" * (len(c) % 2)
    out = bytearray(data[:movi] + b"LIST" + struct.pack("<I", len(body)) + body + b"idx1" +
                    struct.pack("<I", len(index)) + index)
    struct.pack_into("<I", out, 4, len(out) - 8)  # RIFF size
    struct.pack_into("<I", out, out.index(b"avih") + 24, announced or len(chunks))  # dwTotalFrames
    struct.pack_into("<I", out, out.index(b"strh") + 40, announced or len(chunks))  # the stream's dwLength
    path.write_bytes(out)
    return path


def test_a_variable_frame_rate_video_gets_each_frames_own_time(checkpoint, tmp_path):
    """Times are the frames' timestamps, not index / fps, which drifts by the gaps (0.16 s, then 0.24 s), and the
    annotated copy lasts as long as the source; a video that holds fewer frames than its header counts but lasts
    as long is not called cut short, one that stops early in time is."""
    gaps = avi_with_gaps(tmp_path / "gaps.avi", 10, {3: 4, 6: 2})
    cut = avi_with_gaps(tmp_path / "cut.avi", 10, {}, announced=16)
    predict(f"{gaps}", f"{cut}", f"--checkpoint={checkpoint}", f"--output_dir={tmp_path / 'out'}", cwd=tmp_path)
    rows = read_csv(tmp_path / "out")
    times = {name: [float(r["time_s"]) for r in rows if r["source"].endswith(name)] for name in ("gaps.avi", "cut.avi")}
    frame_times = [0, 1, 2, 7, 8, 9, 12, 13, 14, 15]  # in frames of 1 / 25 s: 4 dropped before the 4th, 2 before the 7th
    assert times["gaps.avi"] == pytest.approx([f / 25 for f in frame_times])
    assert times["cut.avi"] == pytest.approx([f / 25 for f in range(10)])
    gaps_entry, cut_entry = json.loads((tmp_path / "out" / "summary.json").read_text())["sources"]
    assert gaps_entry["frames"] == 10 and not any("ended" in w for w in gaps_entry["warnings"])
    # the annotated copy keeps the source's time: a frame repeated through each gap, 16 frames at 25 a second
    annotated = cv2.VideoCapture(str(tmp_path / "out" / "annotated" / "gaps.mp4"))
    assert int(annotated.get(cv2.CAP_PROP_FRAME_COUNT)) == 16 and annotated.get(cv2.CAP_PROP_FPS) == pytest.approx(25)
    assert "the video ended after 10 of the 16 frames its header announces" in cut_entry["warnings"]


def test_a_header_that_counts_the_audio_is_no_cut_video():
    """MKV, WebM and MPEG-TS give a frame count of duration x fps, and the audio may run past the video: a whole
    minute at 25 fps whose header announces 12 frames (0.48 s) more was called cut short; a video that stops at half
    its minute still is, and so is a clip a few frames short."""
    mkv = dict(total=1512, fps=25.0, every=1, estimated=True)
    assert not pr.ended_early(last_time=1499 / 25, **mkv)  # the old rule warned: 0.46 s short
    assert pr.ended_early(last_time=749 / 25, **mkv)
    assert pr.ended_early(last_time=1499 / 25, **{**mkv, "estimated": False})  # an MP4's count is the header's own
    assert pr.ended_early(last_time=9 / 25, total=16, fps=25.0, every=1)  # 10 of 16 frames (the AVI test above)
    # every 3rd frame: 0, 3, ..., 12 of 17 frames, the 15th not decoded: two frames, within an estimate's error (the
    # old rule warned)
    assert not pr.ended_early(last_time=12 / 25, total=17, fps=25.0, every=3)


def test_a_video_that_decodes_nothing_names_its_codec():
    class Header:  # what cv2.VideoCapture.get gives
        def __init__(self, code):
            self.code = code

        def get(self, prop):
            assert prop == cv2.CAP_PROP_FOURCC
            return float(self.code)

    assert pr.codec_name(Header(cv2.VideoWriter_fourcc(*"avc1"))) == "codec avc1"
    assert pr.codec_name(Header(cv2.VideoWriter_fourcc(*"H264"))) == "codec H264"
    assert pr.codec_name(Header(0)) == pr.codec_name(Header(-1)) == "codec unknown"


def test_a_class_name_opencvs_font_cannot_draw_is_drawn_without_accents_or_as_its_class_id():
    """OpenCV's Hershey font draws printable ASCII alone (anything else as "?"): an annotated picture names Ärger as
    Arger and 生气 (class 1 of four) or a name of no letters (class 3) by its id, pixel for pixel as if the model's
    classes had those names."""
    image = np.full((120, 160, 3), 128, np.uint8)

    def drawn(name, names):
        row = {"emotion": name, "confidence": 0.5, "probabilities": dict.fromkeys(names, 0.25)}
        return pr.annotate(image, [((20, 40, 100, 110), True, None)], [row])

    names = ["Ärger", "生气", "Sad", ""]
    assert (drawn("Ärger", names) == drawn("Arger", ["Arger"])).all()
    assert (drawn("生气", names) == drawn("class 1", ["class 1"])).all()
    assert (drawn("", names) == drawn("class 3", ["class 3"])).all()
    assert (drawn("class 1", ["class 1"]) != drawn("class 2", ["class 2"])).any()  # the label is in the picture
    assert (drawn("Sad", names) == drawn("Sad", ["Sad"])).all()


def test_frames_that_change_size_stay_in_the_annotated_video(tmp_path):
    """A WebRTC or screen recording changes resolution mid-stream; OpenCV's writer drops frames of another size than
    its first without a word, so the annotated video lost them."""
    warnings = []
    video = pr.AnnotatedVideo(tmp_path / "a.mp4", lambda: 10.0, True, warnings)
    for k, (w, h) in enumerate([(64, 48)] * 3 + [(80, 60)] * 2 + [(48, 96)] * 2):  # and a phone turned upright
        video.write(np.full((h, w, 3), 30 * (k + 1), np.uint8), k / 10)
    video.close()
    capture = cv2.VideoCapture(str(tmp_path / "a.mp4"))
    frames = []
    while (frame := capture.read()[1]) is not None:
        frames.append(frame)
    assert [f.shape for f in frames] == [(48, 64, 3)] * 7
    assert [round(float(f[24, 32].mean()) / 30) for f in frames] == list(range(1, 8))  # each frame, in order
    assert all(f[:, :16].max() < 20 for f in frames[5:])  # upright: 24x48 in the middle, black bars beside it
    assert all(f[:, :16].min() > 20 for f in frames[:5])  # the same shape: no bars
    assert warnings == ["the frames changed size from 64x48 to 80x60; the annotated video shows them scaled into the "
                        "first size, with black bars"]


def test_a_timeline_without_faces_warns_of_nothing(tmp_path, monkeypatch):
    """A video without a face drew its timeline's legend over no line: matplotlib's "No artists with labels" on
    stderr. A track seen in one frame is drawn as dots (a line of one point is not drawn)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pr.plot_timeline(pr.Timeline(), ["a", "b"], "v.mp4", tmp_path / "none.png")
    assert (tmp_path / "none.png").exists()
    drawn, timeline = [], pr.Timeline()
    monkeypatch.setattr(pr, "save_figure", lambda fig, path, dpi: drawn.append(fig))
    for tid, t, p in ((1, 0.5, [0.8, 0.2]), (2, 0.1, [0.3, 0.7]), (2, 0.2, [0.3, 0.7])):
        timeline.add(tid, t, np.array(p))
    pr.plot_timeline(timeline, ["a", "b"], "v.mp4", tmp_path / "one.png")
    one, two = drawn[0].axes
    assert [line.get_marker() for line in one.lines] == ["o", "o"]  # track 1: one frame
    assert [line.get_marker() for line in two.lines] == ["None", "None"] and two.lines[0].get_linestyle() == "-"


def test_a_slow_motion_clip_of_an_uneven_rate_gets_its_annotated_video(checkpoint, tmp_path):
    """119.767 frames a second (a slow-motion clip's average): OpenCV's MPEG-4 writer refused the rate as given
    (its time base would need 119767 ticks a second, above MPEG-4's 65535), which left no annotated video and
    blamed OpenCV. An annotated video now runs at most 60 frames a second, in step with the source."""
    clip = avi_with_gaps(tmp_path / "slow.avi", 6, {}, fps=119.767)
    predict(f"{clip}", f"--checkpoint={checkpoint}", f"--output_dir={tmp_path / 'out'}", cwd=tmp_path)
    [entry] = json.loads((tmp_path / "out" / "summary.json").read_text())["sources"]
    assert entry["annotated"] and not entry["warnings"], entry
    annotated = cv2.VideoCapture(entry["annotated"])  # at most 60 a second: the frames at 0, 1, 2, 3 sixtieths
    assert annotated.get(cv2.CAP_PROP_FPS) == pytest.approx(60) and annotated.get(cv2.CAP_PROP_FRAME_COUNT) == 4


def test_whole_images_without_detection_and_jsonl_on_stdout(checkpoint, tmp_path):
    """--detect_faces=false: one row per image, the whole image, face_detected false; --jsonl: one JSON
    line per face on stdout, the same numbers as the CSV, everything else on stderr."""
    proc = predict(f"{HOPPER}", f"--checkpoint={checkpoint}", f"--output_dir={tmp_path / 'out'}",
                      "--detect_faces=false", "--jsonl", cwd=tmp_path)
    [row] = read_csv(tmp_path / "out")
    assert (row["x1"], row["y1"], row["x2"], row["y2"], row["face_detected"]) == ("0.0", "0.0", "512.0", "600.0", "false")
    [line] = proc.stdout.splitlines()
    face = json.loads(line)
    assert face["face_detected"] is False and face["emotion"] == row["emotion"]
    assert [face["probabilities"][c] for c in CLASSES] == pytest.approx([float(row[c]) for c in CLASSES], abs=1e-4)


def test_jsonl_keeps_stdout_json_when_the_model_loads_with_a_note(checkpoint, tmp_path, monkeypatch, capsys):
    """The trainer's note on loading a model (channels_last off, where this CPU's probe refused it) went to stdout,
    the first line a `predict.py --jsonl ... | jq` could not parse; with --jsonl it goes to stderr."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no verdict cached: the probe runs
    monkeypatch.setattr(ern, "run_probe", lambda *a, **k: (False, "a refusal", False))
    assert pr.main([f"{HOPPER}", f"--checkpoint={checkpoint}", f"--output_dir={tmp_path / 'out'}", "--jsonl",
                    "--detect_faces=false"]) == 0
    out, err = capsys.readouterr()
    assert "channels_last off: a refusal" in err
    [line] = out.splitlines()
    assert json.loads(line)["source"] == str(HOPPER)


def test_no_face_no_emotion(checkpoint, tmp_path):
    """A photo without a face: its row says face_detected false with the emotion, confidence and probabilities
    empty, the summary counts it as no face and gives no emotion, the console says "no face"; a video's frames
    without a face likewise. --detect_faces=false classifies the whole picture instead."""
    blank = tmp_path / "wall.png"
    cv2.imwrite(str(blank), np.full((200, 300, 3), 128, np.uint8))
    writer = cv2.VideoWriter(str(tmp_path / "empty.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (320, 240))
    for _ in range(3):
        writer.write(np.full((240, 320, 3), 90, np.uint8))
    writer.release()
    proc = predict(f"{blank}", f"{tmp_path / 'empty.mp4'}", f"--checkpoint={checkpoint}", f"--output_dir={tmp_path / 'a'}",
                   cwd=tmp_path)
    rows = read_csv(tmp_path / "a")
    assert len(rows) == 4 and [r["frame"] for r in rows] == ["", "0", "1", "2"]
    for row in rows:
        assert row["face_detected"] == "false" and row["emotion"] == row["confidence"] == ""
        assert all(row[c] == "" for c in CLASSES)
    assert (rows[0]["x2"], rows[0]["y2"]) == ("300.0", "200.0")
    image, video = json.loads((tmp_path / "a" / "summary.json").read_text())["sources"]
    assert (image["faces"], image["whole"], image["no_face"], image["rows"], image["dominant_emotion"],
            image["emotion_share"]) == (0, 0, 1, 1, None, {})
    assert (video["faces"], video["whole"], video["no_face"], video["rows"], video["tracks"],
            video["dominant_emotion"]) == (0, 0, 3, 3, 0, None)
    assert f"{blank}: no face" in proc.stdout and "3 frame(s) without a face" in proc.stdout
    predict(f"{blank}", f"{tmp_path / 'empty.mp4'}", f"--checkpoint={checkpoint}", f"--output_dir={tmp_path / 'b'}",
            "--detect_faces=false", cwd=tmp_path)
    row = read_csv(tmp_path / "b")[0]
    assert row["face_detected"] == "false" and row["emotion"] in CLASSES
    image, video = json.loads((tmp_path / "b" / "summary.json").read_text())["sources"]
    # summary.json: the classified whole image or frames counted as such, not as faces nor as rows without one
    assert (image["faces"], image["whole"], image["no_face"], image["rows"]) == (0, 1, 0, 1)
    assert (video["faces"], video["whole"], video["no_face"], video["rows"]) == (0, 3, 0, 3)
    assert sum(float(row[c]) for c in CLASSES) == pytest.approx(1, abs=1e-3)
    assert pr.EmotionPredictor(checkpoint)(cv2.imread(str(blank))) == [
        {"box": [0.0, 0.0, 300.0, 200.0], "face_detected": False, "emotion": None, "confidence": None, "probabilities": None}]


def test_unreadable_video_missing_camera_and_missing_file_are_named(checkpoint, tmp_path):
    """Several inputs in one call (comma-separated): each failure named, the good one still processed, exit 1. A name
    too long for the file system (stat raises ENAMETOOLONG, which Path.is_dir passed on before Python 3.13)."""
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 4096)
    long = tmp_path / ("x" * 300 + ".jpg")
    proc = predict(f"{HOPPER}", f"{bad}", "camera:9", f"{tmp_path / 'nothere.jpg'}", f"{long}",
                   f"--checkpoint={checkpoint}", f"--output_dir={tmp_path / 'out'}", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = {e["source"]: e["error"] for e in json.loads((tmp_path / "out" / "summary.json").read_text())["errors"]}
    assert set(errors) == {str(bad), "camera:9", str(tmp_path / "nothere.jpg"), str(long)}
    assert "cannot open the video" in errors[str(bad)] and "camera" in errors["camera:9"]
    assert errors[str(long)] == "cannot read it: File name too long"
    assert [r["source"] for r in read_csv(tmp_path / "out")] == [str(HOPPER)]
    for source in errors:
        assert any(source in line and "error" in line for line in proc.stderr.splitlines())


def test_a_camera_index_opencv_would_read_as_another_backends_is_refused():
    """OpenCV reads camera 200 as backend 200 (V4L2)'s camera 0: another camera than the one named, silently."""
    camera, other = pr.prediction_inputs(["camera:99", "camera:200"])
    assert camera.kind == "camera" and (other.kind, other.path) == ("error", "camera:200")
    assert other.error.startswith("a camera's index is below 100")


def test_a_frame_rate_that_is_no_rate_is_none():
    """A camera's driver says -1 where it cannot tell (a virtual camera, a capture card), a header 0, NaN or
    infinity: none of them is a rate to time frames or write a video at (-1 wrote one frame each 1000 s)."""
    class Capture:
        def __init__(self, rate):
            self.rate = rate

        def get(self, prop):
            assert prop == cv2.CAP_PROP_FPS
            return self.rate

    assert [pr.frame_rate(Capture(r)) for r in (-1.0, 0.0, math.nan, math.inf, 29.97)] == [None] * 4 + [29.97]


@pytest.mark.parametrize("max_frames", [0, 5])
def test_a_camera_that_stops_delivering_frames_is_said_to(checkpoint, tmp_path, monkeypatch, max_frames):
    """A camera ends at Ctrl-C or --max_frames; one unplugged (here: a 5-frame file played as camera:0) ended as if
    all were well. --max_frames=5 met is a camera's normal end."""
    clip = write_video(tmp_path / "clip.mp4", frames=5)
    monkeypatch.setattr(pr, "open_video", lambda source: (cv2.VideoCapture(str(clip)), 0.0, 0, []))
    assert pr.main(["camera:0", f"--checkpoint={checkpoint}", f"--output_dir={tmp_path / 'out'}",
                    f"--max_frames={max_frames}"]) == 0
    [entry] = json.loads((tmp_path / "out" / "summary.json").read_text())["sources"]
    assert entry["frames"] == 5
    stopped = ["the camera stopped delivering frames after 5 (unplugged, or taken by another program)"]
    assert entry["warnings"] == ([] if max_frames else stopped)


class FlakyCamera:
    """A capture whose calls of read or grab numbered in `fails` (from 1) get no frame, as from a camera warming up or
    dropping one."""

    def __init__(self, capture, fails):
        self.capture, self.fails, self.calls = capture, fails, 0

    def read(self):
        return self.call(self.capture.read, (False, None))

    def grab(self):
        return self.call(self.capture.grab, False)

    def call(self, real, failed):
        self.calls += 1
        return failed if self.calls in self.fails else real()

    def __getattr__(self, name):
        return getattr(self.capture, name)


@pytest.mark.parametrize("every", [1, 2])
def test_a_camera_that_misses_a_few_frames_goes_on(checkpoint, tmp_path, monkeypatch, every):
    """Some cameras give no frame for their first reads after opening (warming up), or drop one: the camera went on
    to the clip's 5 frames (3 with --every=2), past three failed reads at the start and two failed reads (or, with
    --every=2, grabs of frames not classified) in the middle. Before: the first failed one ended it ("no frame could
    be decoded", exit 1)."""
    clip = write_video(tmp_path / "clip.mp4", frames=5)
    monkeypatch.setattr(pr, "open_video", lambda source: (FlakyCamera(cv2.VideoCapture(str(clip)), {1, 2, 3, 5, 6}),
                                                          0.0, 0, []))
    assert pr.main(["camera:0", f"--checkpoint={checkpoint}", f"--output_dir={tmp_path / 'out'}",
                    f"--every={every}"]) == 0
    [entry] = json.loads((tmp_path / "out" / "summary.json").read_text())["sources"]
    classified = 5 if every == 1 else 3
    assert entry["frames"] == classified and entry["error"] is None
    assert entry["warnings"] == [f"the camera stopped delivering frames after {classified} (unplugged, or taken by "
                                 f"another program)"]


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_ends_a_camera_and_sigterm_ends_the_run(checkpoint, tmp_path, monkeypatch, stop):
    """Ctrl-C is how a camera ends: its entry is kept and the next input starts. SIGTERM (docker stop, SLURM's
    scancel) stops the whole run, as it does in a video (it ended the camera alone, and the run went on). The camera
    here: a 5-frame file played as camera:0, the signal sent at its second frame."""
    clip, real = write_video(tmp_path / "clip.mp4", frames=5), pr.open_video
    monkeypatch.setattr(pr, "open_video", lambda source: (cv2.VideoCapture(str(clip)), 0.0, 0, [])
                        if source.kind == "camera" else real(source))
    calls, update = [], pr.FaceTracker.update

    def update_and_signal(self, *args):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), stop)
        return update(self, *args)

    monkeypatch.setattr(pr.FaceTracker, "update", update_and_signal)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        ern.stop_on_ctrl_c_and_sigterm()  # as predict.py's __main__ does
        status = pr.main(["camera:0", str(clip), f"--checkpoint={checkpoint}", f"--output_dir={tmp_path / 'out'}"])
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    sources = json.loads((tmp_path / "out" / "summary.json").read_text())["sources"]
    said = "Ctrl-C" if stop == signal.SIGINT else "SIGTERM"
    assert (sources[0]["frames"], sources[0]["warnings"]) == (2, [f"stopped by {said}"])
    if stop == signal.SIGINT:
        assert status == 0 and len(sources) == 2 and sources[1]["frames"] == 5
    else:
        assert status == 130 and len(sources) == 1


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX's")
def test_a_named_pipe_is_named_not_read(tmp_path):
    """Reading a pipe waits for a writer for ever (a device may too): it is an error of its own, before any model."""
    os.mkfifo(tmp_path / "pipe.jpg")
    [source] = pr.prediction_inputs([str(tmp_path / "pipe.jpg")])
    assert (source.kind, source.error) == ("error", "not a file or folder (a camera is camera:N)")
    shutil.copy(HOPPER, tmp_path / "photo.jpg")  # in a folder it was passed over without a word
    assert [(s.kind, s.path, s.error) for s in pr.prediction_inputs([str(tmp_path)])] == [
        ("image", str(tmp_path / "photo.jpg"), ""),
        ("error", str(tmp_path / "pipe.jpg"), "not a regular file (a pipe, a socket or a device), so it is left out")]


def test_a_list_file_of_inputs(checkpoint, tmp_path):
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"{HOPPER}\n\n{HOPPER}\n")
    predict(f"@{listing}", f"--checkpoint={checkpoint}", f"--output_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert [r["source"] for r in read_csv(tmp_path / "out")] == [str(HOPPER)] * 2


def test_a_list_file_is_read_from_its_own_folder_as_windows_writes_it(tmp_path, monkeypatch):
    """Lines relative to the list's folder (the current folder's where only it holds them), UTF-16 from PowerShell's
    >, quoted paths from Explorer's "Copy as path", # comments: each was an input that did not exist."""
    (tmp_path / "batch" / "img").mkdir(parents=True)
    (tmp_path / "work" / "img").mkdir(parents=True)
    for folder, name in (("batch", "a.jpg"), ("work", "a.jpg"), ("work", "b.jpg")):
        (tmp_path / folder / "img" / name).write_bytes(b"x")
    listing = tmp_path / "batch" / "list.txt"
    listing.write_text('# photos of day 1\r\nimg/a.jpg\r\n"img/b.jpg"\r\n\r\ncamera:0\r\n' + "y" * 300 +
                       "\r\nimg/gone.jpg\r\n", encoding="utf-16")
    monkeypatch.chdir(tmp_path / "work")
    assert pr.read_list_files([f"@{listing}", "x.jpg"]) == [str(tmp_path / "batch" / "img" / "a.jpg"), "img/b.jpg",
                                                            "camera:0", "y" * 300,  # a name too long fails on its own
                                                            str(tmp_path / "batch" / "img" / "gone.jpg"), "x.jpg"]
    [source] = pr.prediction_inputs(["y" * 300])  # on its own
    assert source.kind == "error"


def test_a_jpeg_with_a_trailer_is_readable_here_and_in_training(checkpoint, tmp_path):
    """Phone cameras append bytes after the end-of-image marker: the image is whole. A cut JPEG is not."""
    data = open(HOPPER, "rb").read()
    trailer = tmp_path / "phone.jpg"
    trailer.write_bytes(data + b"\x00MOTION-PHOTO" + bytes(range(256)) * 40)
    image, fmt = ern.decode_image(trailer)  # the decoder that also fills the training cache
    assert fmt == "jpeg" and np.array_equal(image, ern.decode_image(HOPPER)[0])
    for cut in (len(data) - 300, len(data) // 2):
        (tmp_path / "cut.jpg").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated"):
            ern.decode_image(tmp_path / "cut.jpg")
    predict(f"{trailer}", f"--checkpoint={checkpoint}", f"--output_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert len(read_csv(tmp_path / "out")) == 1


def test_a_png_with_a_trailer_is_whole_and_a_cut_one_is_not(tmp_path):
    """Bytes after a PNG's IEND chunk (an editor's or a phone's trailer) leave the image whole: more than 4 KiB of
    them made it "truncated". A PNG cut anywhere before its IEND is truncated."""
    data = cv2.imencode(".png", hopper_head())[1].tobytes()
    whole = tmp_path / "trailer.png"
    whole.write_bytes(data + bytes(range(256)) * 40)
    image, fmt = ern.decode_image(whole)
    assert fmt == "png" and np.array_equal(image, cv2.cvtColor(hopper_head(), cv2.COLOR_BGR2RGB))
    for cut in (len(data) - 1, len(data) - 12, len(data) // 2, 40):
        assert ern.truncated(data[:cut], "png"), cut


def test_a_jfif_in_a_folder_is_an_image_and_its_annotated_copy_a_jpg(checkpoint, tmp_path):
    """Browsers on Windows save a JPEG as .jfif: a folder's .jfif photos were passed over as neither image nor
    video (summary.json's "ignored"); OpenCV writes no .jfif, so its annotated copy is a .jpg."""
    (tmp_path / "photos").mkdir()
    shutil.copy(HOPPER, tmp_path / "photos" / "download.jfif")
    (tmp_path / "photos" / "notes.txt").write_text("not a picture")
    assert pr.main([f"{tmp_path / 'photos'}", f"--checkpoint={checkpoint}", f"--output_dir={tmp_path / 'out'}"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    [source] = summary["sources"]
    assert Path(source["source"]).name == "download.jfif" and not source["warnings"] and not source["error"], source
    assert summary["ignored"] == [str(tmp_path / "photos" / "notes.txt")]
    annotated = tmp_path / "out" / "annotated" / "photos" / "download.jpg"
    assert source["annotated"] == str(annotated) and cv2.imread(str(annotated)).shape == cv2.imread(str(HOPPER)).shape


def test_a_cut_jpeg_with_an_exif_thumbnail_is_truncated():
    """The thumbnail in the APP1 segment has its own end marker: only the main image's may count."""
    data = open(HOPPER, "rb").read()
    thumbnail = cv2.imencode(".jpg", cv2.resize(cv2.imread(str(HOPPER)), (64, 75)))[1].tobytes()
    payload = b"Exif\x00\x00" + thumbnail
    with_thumbnail = data[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]
    assert ern.image_format(with_thumbnail) == "jpeg" and not ern.truncated(with_thumbnail, "jpeg")
    cut = with_thumbnail[:len(with_thumbnail) * 2 // 3]
    assert b"\xff\xd9" in cut and ern.truncated(cut, "jpeg")
    after_app0 = 4 + int.from_bytes(data[4:6], "big")  # SOI, then the APP0 segment's marker and length
    padded = data[:after_app0] + b"\x00\x00" + data[after_app0:]  # stray bytes between segments: libjpeg reads it
    assert cv2.imdecode(np.frombuffer(padded, np.uint8), cv2.IMREAD_COLOR) is not None and not ern.truncated(padded, "jpeg")


def test_prediction_crops_are_the_training_crops(tiny_dataset, tmp_path):
    """Given a face's dataset box (in pixels), the predictor cuts exactly the crop that the training cache holds."""
    cfg = ern.Config(data_dir=str(tiny_dataset), cache_dir=str(tmp_path / "cache"), image_size=32, crop_margin=0.1)
    split, _, *_ = ern.scan_split("train", tiny_dataset / "train" / "images", 8)
    ern.load_split_pixels(split, cfg)
    cfg = dataclasses.replace(cfg, width=0.125, blocks="1,1,1,1")
    path = tmp_path / "m.pth"
    torch.save(ern.checkpoint_dict(ern.build_model(cfg, 8), cfg, CLASSES, torch.zeros(3), torch.ones(3), 0, {}), path)
    predictor = pr.EmotionPredictor(path)
    for i in range(0, len(split), 17):
        image = ern.decode_image(split.paths[i])[0]
        h, w = image.shape[:2]
        cx, cy, bw, bh = split.boxes[i]
        box = ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h)
        [(_, detected, crop)] = predictor.faces(image, boxes=[box])
        assert detected and np.array_equal(crop, split.images[i])


def test_given_boxes_that_are_no_boxes_are_refused(tmp_path):
    """EmotionPredictor's boxes=: a box partly outside the image is cropped as a label box is; one wholly outside,
    empty or inverted is refused in one line (each was classified as a face, of padding), as are NaN and three
    numbers (bare ValueErrors)."""
    cfg = ern.Config(image_size=32, width=0.125, blocks="1,1,1,1")
    path = tmp_path / "m.pth"
    torch.save(ern.checkpoint_dict(ern.build_model(cfg, 8), cfg, CLASSES, torch.zeros(3), torch.ones(3), 0, {}), path)
    predictor = pr.EmotionPredictor(path, detect_faces=False)
    image = np.zeros((400, 300, 3), np.uint8)
    [face] = predictor(image, boxes=[(-50, 10, 20, 90)])
    assert face["face_detected"] and face["emotion"] in CLASSES and face["box"] == [-50, 10, 20, 90]
    for box, words in (((300, 10, 360, 90), "lies outside the 300x400 image"), ((10, 10, 10, 50), "x1 < x2"),
                       ((50, 10, 20, 90), "x1 < x2"), ((float("nan"), 0, 10, 10), "finite"),
                       ((1, 2, 3), "give four numbers"), (None, "give four numbers")):
        with pytest.raises(ern.UserError, match=re.escape(words)):
            predictor(image, boxes=[box])


AFFECTNET_FRAMING = (1.42, -0.056)  # the export's training crops, in Haar sides and shift (BENCHMARKS.md)


def hand_face_region(box, shape, scale=1.25, shift=0.0):
    """The region a detected pixel box (x1, y1, x2, y2) must be cropped to, written out here rather than taken from
    predict.py: a square `scale` times the box's longer side, centred on the box and moved down `shift` sides, as a
    normalized (cx, cy, w, h) of an image of shape (H, W, ...). The defaults are predict.py's framing (FACE_CROP_SCALE
    1.25, no shift)."""
    x1, y1, x2, y2 = box
    height, width = shape[:2]
    side = max(x2 - x1, y2 - y1)
    return ((x1 + x2) / 2 / width, ((y1 + y2) / 2 + shift * side) / height, side * scale / width, side * scale / height)


def test_face_crop_box_frames_the_longer_side_scaled_and_shifted_down():
    """face_crop_box against numbers worked out by hand, on boxes that are not square in images that are not square
    (so that swapped width and height, the box's width for its longer side, a shift upwards or another scale all give
    other numbers); and a detected face's crop is crop_box of that region at 1.25 sides, no shift."""
    assert pr.FACE_CROP_SCALE == 1.25  # the calibrated framing (benchmarks/crop_calibration.py) assumed below
    box, shape = (100, 50, 140, 110), (200, 400, 3)  # 40 wide, 60 tall, centred at (120, 80); the image 400 wide
    # side 60; 1.25 sides = 75 px: 75 / 400 of the width, 75 / 200 of the height
    assert pr.face_crop_box(box, shape) == pytest.approx((120 / 400, 80 / 200, 75 / 400, 75 / 200))
    # -0.056 sides: the centre 3.36 px up
    assert pr.face_crop_box(box, shape, 1.25, -0.056) == pytest.approx((0.3, 76.64 / 200, 0.1875, 0.375))
    # 80 wide, 30 tall, centred at (50, 35), in an image 160 wide and 300 tall; 2 sides = 160 px, 0.1 sides = 8 px down
    assert pr.face_crop_box((10, 20, 90, 50), (300, 160), 2.0, 0.1) == pytest.approx(
        (50 / 160, 43 / 300, 160 / 160, 160 / 300))
    assert hand_face_region(box, shape, 1.25, -0.056) == pytest.approx((0.3, 76.64 / 200, 0.1875, 0.375))  # the oracle
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    want = ern.crop_box(image, hand_face_region(box, shape), 0.0, 32).transpose(2, 0, 1)
    assert np.array_equal(pr.detected_face_crop(image, box, 32), want)
    assert not np.array_equal(ern.crop_box(image, hand_face_region(box, shape, 1.0), 0.0, 32).transpose(2, 0, 1), want)


def test_a_detected_face_gets_the_crop_training_saw(checkpoint):
    """The Haar path gives the network the training crop of the same face. The training image is the portrait's
    face framed as the AffectNet export frames faces (96 px, the median framing benchmarks/crop_calibration.py
    measured on the export); placed 2.5x larger in a 640x480 photo and found again, the crop --predict cuts
    correlates with the crop training cuts from that image (its whole-image label box) more than a crop of the
    tight Haar box, or of twice its side, or a quarter of a side off. The framings are written out here
    (hand_face_region), and the crop --predict cuts is exactly the one of 1.25 Haar sides centred on the box."""
    predictor = pr.EmotionPredictor(checkpoint)
    portrait = hopper_rgb()
    [(box, _, _)] = predictor.faces(portrait)
    training_image = ern.crop_box(portrait, hand_face_region(box, portrait.shape, *AFFECTNET_FRAMING), 0.0, 96)
    training_crop = predictor.crop(training_image, pr.WHOLE_IMAGE, predictor.cfg.crop_margin)
    photo = np.full((480, 640, 3), 80, np.uint8)
    photo[100:340, 300:540] = cv2.resize(training_image, (240, 240), interpolation=cv2.INTER_LINEAR)
    [(found, detected, crop)] = predictor.faces(photo)
    assert detected and 300 <= found[0] < found[2] <= 540 and 100 <= found[1] < found[3] <= 340
    corr = lambda a: np.corrcoef(a.ravel().astype(float), training_crop.ravel().astype(float))[0, 1]
    framed = lambda box, scale: predictor.crop(photo, hand_face_region(box, photo.shape, scale, 0.0), 0.0)
    assert np.array_equal(crop, framed(found, 1.25))
    quarter = (found[2] - found[0]) / 4
    others = [framed(found, 1.0), framed(found, 2.0), framed([v + quarter for v in found], 1.25)]
    # measured: 0.58 (1.25 sides zoom in 12 % on the 1.42 framing), against 0.22, 0.28 and 0.06
    assert corr(crop) > 0.5 and corr(crop) > max(corr(c) for c in others) + 0.2, [corr(crop)] + [corr(c) for c in others]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the point is a machine without the GPU the model was trained on")
def test_a_model_trained_with_device_cuda_predicts_and_exports_on_a_machine_without_one(tmp_path):
    """The checkpoint's config says --device=cuda (its training machine's); prediction and export use this one's."""
    cfg = ern.Config(image_size=32, width=0.125, blocks="1,1,1,1", device="cuda")
    model = ern.build_model(cfg, len(CLASSES))
    path = tmp_path / "gpu_trained.pth"
    torch.save(ern.checkpoint_dict(model, cfg, CLASSES, torch.full((3,), 0.5), torch.full((3,), 0.25), 1, {}), path)
    [face] = pr.EmotionPredictor(path)(hopper_rgb())
    assert face["face_detected"] and sum(face["probabilities"].values()) == pytest.approx(1)
    run_script(f"--checkpoint={path}", f"--output={tmp_path / 'model.onnx'}", cwd=tmp_path, script=EXPORT)
    assert (tmp_path / "model.onnx").stat().st_size > 10_000


def test_notebook_api_matches_the_command_line(checkpoint, tmp_path):
    """EmotionPredictor(rgb) gives the same faces and probabilities as --predict's CSV; batched classification
    equals one face at a time."""
    predict(f"{HOPPER}", f"--checkpoint={checkpoint}", f"--output_dir={tmp_path / 'out'}", cwd=tmp_path)
    [row] = read_csv(tmp_path / "out")
    predictor = pr.EmotionPredictor(checkpoint)
    [face] = predictor(hopper_rgb())
    assert face["box"] == [float(row[k]) for k in ("x1", "y1", "x2", "y2")]
    assert list(face["probabilities"].values()) == pytest.approx([float(row[c]) for c in CLASSES], abs=1e-4)
    crops = np.stack([c for *_, c in predictor.faces(hopper_rgb())] + [c for *_, c in predictor.faces(
        cv2.flip(hopper_rgb(), 1))] * 3)
    together = predictor.classify(crops)
    one_by_one = np.concatenate([predictor.classify(crops[i:i + 1]) for i in range(len(crops))])
    assert together == pytest.approx(one_by_one, abs=1e-5)


def test_a_closed_stdout_stops_the_printing_not_the_run(checkpoint, tmp_path):
    """`predict.py photos | head -1`: the reader goes away after a line; every photo is still classified, the
    console says nothing of a broken pipe (before: "writing into ... failed: Broken pipe" after the first photo,
    or a traceback at the last line), exit 0. Python's default buffering, as in a shell."""
    media = tmp_path / "media"
    media.mkdir()
    for k in range(3):
        shutil.copy(HOPPER, media / f"hopper{k}.jpg")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen([sys.executable, str(PREDICT), str(media), f"--checkpoint={checkpoint}",
                             f"--output_dir={tmp_path / 'out'}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the first line: the model still loads
    stderr = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, stderr
    assert len(read_csv(tmp_path / "out")) == 3 and "Broken pipe" not in stderr and "Traceback" not in stderr


def test_an_explanation_that_cannot_be_written_is_its_photos_warning(checkpoint, tmp_path):
    """A photo whose name fits the system's 255 bytes and whose explanation's (10 bytes longer) does not: the photo
    is classified and annotated, and the picture that failed is its warning (it ended the whole run, exit status 2,
    advising to free some space). A video's frames: one warning, and no more pictures tried for that video."""
    photo, video = tmp_path / ("a" * 246 + ".jpg"), write_video(tmp_path / ("b" * 236 + ".mp4"), frames=3)
    shutil.copy(HOPPER, photo)
    status = pr.main([str(photo), str(video), f"--checkpoint={checkpoint}", "--explain",
                      f"--output_dir={tmp_path / 'out'}"])
    image, clip = json.loads((tmp_path / "out" / "summary.json").read_text())["sources"]
    assert status == 0 and image["error"] is None and Path(image["annotated"]).exists() and image["rows"] == 1
    explain = tmp_path / "out" / "explain"
    assert image["warnings"] == [f"--explain: could not write {explain / photo.stem}_face0.png: File name too long"]
    assert (clip["frames"], clip["error"]) == (3, None) and Path(clip["annotated"]).exists()
    assert clip["warnings"] == [f"--explain: could not write {explain / video.stem}_frame000000_face0.png: File name "
                                f"too long; no more pictures of this source"]
    assert len(read_csv(tmp_path / "out")) == 4


def test_a_timeline_that_cannot_be_written_is_its_videos_warning(checkpoint, tmp_path, monkeypatch):
    """A video's timeline figure that fails to be written (a disk filling up: save_figure's one line) is that video's
    warning; its rows, its annotated copy and the next input stand (it stopped the whole run, exit status 2)."""
    video, photo = write_video(tmp_path / "clip.mp4", frames=3), tmp_path / "photo.jpg"
    shutil.copy(HOPPER, photo)

    def disk_full(timeline, class_names, title, path):
        raise ern.UserError(f"could not write {path}: No space left on device")

    monkeypatch.setattr(pr, "plot_timeline", disk_full)
    status = pr.main([str(video), str(photo), f"--checkpoint={checkpoint}", f"--output_dir={tmp_path / 'out'}"])
    clip, image = sorted(json.loads((tmp_path / "out" / "summary.json").read_text())["sources"],
                         key=lambda entry: entry["kind"] == "image")
    timeline = tmp_path / "out" / "timelines" / "clip.png"
    assert status == 0 and clip["frames"] == 3 and Path(clip["annotated"]).exists() and "timeline" not in clip
    assert clip["warnings"] == [f"could not write {timeline}: No space left on device"]
    assert image["rows"] == 1 and image["error"] is None


def test_home_folders_long_names_and_dollar_signs_in_names(checkpoint, tmp_path, monkeypatch):
    """--checkpoint=~/..., --output_dir=~/... and export's --output=~/... are the home folder's (the shell leaves
    ~ after = alone: a folder named ~ before); a name too long for the system is one line (a traceback before);
    a file name with two $ is drawn as text in --explain's titles (matplotlib read it as math and died)."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(checkpoint, home / "model.pth")
    photo = tmp_path / "price_$5_vs_$10.jpg"
    shutil.copy(HOPPER, photo)
    predict(str(photo), "--checkpoint=~/model.pth", "--output_dir=~/preds", "--explain", cwd=tmp_path,
            env={"HOME": str(home)})
    assert len(read_csv(home / "preds")) == 1 and not (tmp_path / "~").exists()
    assert [p.name for p in (home / "preds" / "explain").iterdir()] == ["price_$5_vs_$10_face0.png"]
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert ex.main([f"--checkpoint={checkpoint}", "--output=~/model.onnx"]) == 0
    assert (home / "model.onnx").exists() and not (tmp_path / "~").exists()
    long = "x" * 300
    for main, args, message in ((pr.main, [str(HOPPER), f"--checkpoint={long}.pth"], "cannot read the checkpoint"),
                                (pr.main, [str(HOPPER), f"--checkpoint={checkpoint}", f"--output_dir={long}"],
                                 "cannot write the predictions into"),
                                (ex.main, [f"--checkpoint={checkpoint}", f"--output={long}.onnx"], "cannot write"),
                                (ern.main, [f"--output_dir={long}"], "cannot write in --output_dir")):
        with pytest.raises(ern.UserError, match=f"{message}.*File name too long"):
            main(args)


def test_a_name_that_begins_with_a_tilde_is_a_name(checkpoint, tmp_path, monkeypatch):
    """~draft.jpg (an editor's working copy) as an input and a line of an @list, --output_dir=~out, and export's
    --output=~m.onnx: where ~name names no user the shell leaves it as typed, and pathlib's expanduser raised
    RuntimeError on it (a traceback before)."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(HOPPER, tmp_path / "~draft.jpg")
    (tmp_path / "inputs.txt").write_text("~draft.jpg\n")
    assert pr.main(["~draft.jpg", f"--checkpoint={checkpoint}", "--output_dir=~out"]) == 0
    assert pr.main(["@inputs.txt", f"--checkpoint={checkpoint}", "--output_dir=~listed"]) == 0
    for out in ("~out", "~listed"):
        rows = read_csv(tmp_path / out)
        assert [(Path(r["source"]).name, r["face_detected"]) for r in rows] == [("~draft.jpg", "true")]
    assert ex.main([f"--checkpoint={checkpoint}", "--output=~m.onnx"]) == 0 and (tmp_path / "~m.onnx").exists()
    pwd = pytest.importorskip("pwd")  # and no home folder at all (some containers): ~/x names none, ~draft.jpg a file

    def no_entry(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.delenv("HOME")
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    with pytest.raises(ern.UserError, match=r"^~/preds: ~ names no home folder here \(no \$HOME, no passwd entry\)"):
        pr.main(["~draft.jpg", f"--checkpoint={checkpoint}", "--output_dir=~/preds"])
    assert ern.user_path("~draft.jpg") == Path("~draft.jpg") and not (tmp_path / "~").exists()


def test_a_folder_input_leaves_out_the_predictions_written_into_it(checkpoint, tmp_path):
    """The default outputs/ under the current folder, or --output_dir inside the folder read: a second run reads
    its photos, not the first run's annotated copies (it nested them one level deeper each time), also where the
    output folder is the photo folder itself. A linked folder that leads out (an album on another disk) is read,
    one that leads back in is not (its photos keep their names), a link loop ends (links were skipped without a
    word). --overwrite=true takes the earlier run's pictures away with its rows."""
    photos, album = tmp_path / "photos", tmp_path / "disk" / "album"
    (photos / "2023").mkdir(parents=True)
    album.mkdir(parents=True)
    shutil.copy(HOPPER, photos / "hopper.jpg")
    shutil.copy(HOPPER, photos / "2023" / "party.jpg")
    shutil.copy(HOPPER, album / "linked.jpg")
    (photos / "album").symlink_to(album, target_is_directory=True)
    (photos / "0_latest").symlink_to(photos / "2023", target_is_directory=True)  # sorts first, leads back in
    (album / "loop").symlink_to(photos, target_is_directory=True)
    want = sorted(str(photos / p) for p in ("album/linked.jpg", "hopper.jpg", "2023/party.jpg"))
    for out in (photos / "out", photos):
        for run in range(2):
            predict(*([str(photos)] if run else [str(photos / "hopper.jpg"), "--explain"]), f"--checkpoint={checkpoint}",
                    f"--output_dir={out}", "--overwrite=true", cwd=tmp_path)
        assert sorted(r["source"] for r in read_csv(out)) == want, out
        assert not (out / "explain").exists()  # the first run's, taken away by the second


def test_decoded_photos_waiting_are_bounded_by_pixels_not_count():
    """The prefetch decodes photos ahead of classification: at most PREFETCH_PIXELS of them (sized by the largest
    so far) wait, however many cores (2 x threads of them waited, 9.5 GB of 48-megapixel photos on 32 cores);
    phone photos still run the full depth ahead."""
    from concurrent.futures import ThreadPoolExecutor
    for side, most in ((8000, 3), (4000, 9)):  # 64 Mpx: two ahead (and the one yielded); 16 Mpx: the depth, 8
        submitted, peak = [], 0

        def photos():
            for k in range(20):
                submitted.append(k)
                yield k

        def decode(k):  # a side x side image that takes no memory here
            return np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), (side, side), (0, 0))

        with ThreadPoolExecutor(2) as pool:
            for done, image in enumerate(pr.ordered_prefetch(decode, photos(), pool, 8, lambda a: a.size), 1):
                peak = max(peak, len(submitted) - done + 1)  # decoded or being decoded, not yet classified
        assert peak == most, (side, peak)


def test_a_face_in_a_panorama_is_found(checkpoint):
    """Detection works on a copy at most 640 px wide, and at least 300 px on its short side: the Haar window (24 px)
    is then 8 % of it, the smallest face looked for. In a 5:1 panorama's 640 px copy (128 px tall) the window was
    18.75 % of the height: this face, about a sixth of it, came to some 21 px there, and was not found."""
    face = cv2.resize(hopper_rgb()[60:400, 110:420], (120, 132))
    canvas = np.full((600, 3000, 3), 90, np.uint8)
    canvas[240:372, 1400:1520] = face
    found = pr.EmotionPredictor(checkpoint).faces(canvas)
    assert len(found) == 1 and found[0][1] and 1350 < found[0][0][0] < 1460, found


def test_the_notebook_api_takes_grayscale_and_rgba_and_refuses_other_arrays(checkpoint):
    predictor = pr.EmotionPredictor(checkpoint)
    gray = cv2.cvtColor(hopper_rgb(), cv2.COLOR_RGB2GRAY)
    want = predictor(np.repeat(gray[:, :, None], 3, axis=2))
    assert want[0]["face_detected"] and predictor(gray) == want and predictor(gray[:, :, None]) == want
    rgba = np.dstack([hopper_rgb(), np.full(gray.shape, 7, np.uint8)])
    assert predictor(rgba) == predictor(hopper_rgb())
    for bad in (hopper_rgb() / 255.0, hopper_rgb()[:, :, :2], hopper_rgb()[None], hopper_rgb()[5:5]):  # [5:5]: empty
        with pytest.raises(pr.UserError, match=rf"expected an image as a uint8 array.*got {bad.dtype} "
                                               rf"{re.escape(str(bad.shape))}"):
            predictor(bad)


def test_an_opencv_without_its_haar_cascades_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(cv2.data, "haarcascades", str(tmp_path))
    with pytest.raises(pr.UserError, match=f"OpenCV's Haar cascades are missing from {re.escape(str(tmp_path))}"):
        pr.FaceDetector()
    monkeypatch.delattr(cv2, "data")  # conda's and the distributions' builds
    with pytest.raises(pr.UserError, match=r"no Haar cascades \(no cv2.data\): .*pip install -r requirements.txt"):
        pr.FaceDetector()


@pytest.mark.skipif(sys.platform != "linux", reason="macOS and Windows keep names in Unicode")
def test_file_names_opencv_and_the_console_cannot_take(checkpoint, tmp_path):
    """Names from an old archive (Latin-1 bytes, not UTF-8: Python hands them on with surrogates, and OpenCV crashed
    on them, SIGSEGV), OpenCV's Haar cascades in a folder of such a name, and a console that cannot print Chinese (a
    Windows console redirected to a file: cp1252, which raised UnicodeEncodeError). The photos are read, annotated,
    explained and printed escaped; the video OpenCV cannot open is named with the reason."""
    media = tmp_path / "media"
    media.mkdir()
    shutil.copy(HOPPER, media / os.fsdecode(b"caf\xe9.jpg"))
    shutil.copy(HOPPER, media / "生气.jpg")
    os.replace(write_video(media / "clip.mp4", frames=4), media / os.fsdecode(b"film_\xe9.mp4"))
    cascades = tmp_path / os.fsdecode(b"Kaskaden_\xdf")
    shutil.copytree(cv2.data.haarcascades, cascades)
    code = "import sys, cv2, predict; cv2.data.haarcascades = sys.argv[1]; sys.exit(predict.main(sys.argv[2:]))"
    done = subprocess.run([sys.executable, "-c", code, str(cascades), str(media), f"--checkpoint={checkpoint}",
                           f"--output_dir={tmp_path / 'out'}", "--explain=true"], cwd=ROOT, env={**os.environ, "PYTHONIOENCODING": "cp1252"},
                          capture_output=True, text=True, encoding="cp1252", timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]  # 1: an input could not be read
    assert "media/\\u751f\\u6c14.jpg: 1 face(s) detected" in done.stdout
    assert "film_\\udce9.mp4: error: OpenCV cannot open a file whose name is not UTF-8" in done.stderr
    with open(tmp_path / "out" / "predictions.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = list(csv.DictReader(f))  # the names as the file system has them
    assert {Path(r["source"]).name: r["face_detected"] for r in rows} == {os.fsdecode(b"caf\xe9.jpg"): "true",
                                                                          "生气.jpg": "true"}
    annotated = sorted((tmp_path / "out" / "annotated").rglob("*.jpg"))
    assert [p.name for p in annotated] == sorted([os.fsdecode(b"caf\xe9.jpg"), "生气.jpg"])
    assert all(cv2.imdecode(np.fromfile(p, np.uint8), cv2.IMREAD_COLOR).shape == (600, 512, 3) for p in annotated)
    assert len(list((tmp_path / "out" / "explain").rglob("*_face0.png"))) == 2


def test_tracker_keeps_ids_by_overlap_and_smooths():
    step = pr.SMOOTHING_STEP
    tracker = pr.FaceTracker(smoothing=0.5, min_iou=0.3, max_gap=1.5 * step, min_missed=2)
    a, b = (0, 0, 100, 100), (300, 0, 400, 100)
    p, q, r = np.eye(3)
    face = lambda box: (box, True, None)
    ids, _ = tracker.update([face(a), face(b)], [p, q], 0.0)
    assert ids == [0, 1]
    ids, smoothed = tracker.update([face((310, 0, 410, 100)), face((10, 0, 110, 100))], [r, r], step)  # order swapped
    assert ids == [1, 0]
    assert smoothed[0] == pytest.approx(0.5 * q + 0.5 * r) and smoothed[1] == pytest.approx(0.5 * p + 0.5 * r)
    ids, smoothed = tracker.update([face((20, 0, 120, 100)), (None, False, None)], [r, q], 2 * step)  # 1 missed once
    assert ids == [0, pr.WHOLE_FRAME] and smoothed[0] == pytest.approx(0.25 * p + 0.75 * r) and smoothed[1] == pytest.approx(q)
    tracker.update([], [], 3 * step)  # track 1: two frames missed, 2 steps unseen: more than max_gap
    ids, smoothed = tracker.update([face(b)], [q], 4 * step)
    assert ids == [2] and smoothed[0] == pytest.approx(q)  # a new track starts raw


def test_a_track_follows_its_face_through_a_change_of_frame_size():
    """A WebRTC stream rescales with its bandwidth: two faces, the frame halved, each keeps its track and its smoothing.
    Before: the boxes were compared across the sizes, so each face started a new track (an overlap below TRACK_IOU)."""
    step = pr.SMOOTHING_STEP
    tracker = pr.FaceTracker(smoothing=0.5)
    p, q = np.eye(2)
    face = lambda box: (box, True, None)
    ids, _ = tracker.update([face((200, 100, 400, 300)), face((420, 100, 620, 300))], [p, q], 0.0, (640, 480))
    assert ids == [0, 1]
    ids, smoothed = tracker.update([face((211, 51, 311, 151)), face((101, 49, 201, 149))], [p, q], step, (320, 240))
    assert ids == [1, 0]
    assert smoothed[0] == pytest.approx(0.5 * q + 0.5 * p) and smoothed[1] == pytest.approx(0.5 * p + 0.5 * q)
    ids, _ = tracker.update([face((200, 100, 400, 300))], [q], 2 * step, (640, 480))  # and back
    assert ids == [0] and tracker.update([face((200, 100, 400, 300))], [q], 3 * step)[0] == [0]  # no size: as before


def test_tracks_end_and_smooth_in_seconds_not_classified_frames():
    """Every frame of 30 a second: a face missed for 0.4 s keeps its track (max_gap 0.5 s). One frame a second
    (--every=30): two missed detections keep it and three end it (counted in frames, ten missed frames kept a track for
    ten seconds). Smoothing weighs the past by the time elapsed: 0.5 over one step is 0.25 over two and about 0 over a
    second; a frame of no later time counts one step."""
    step = pr.SMOOTHING_STEP
    p, q = np.eye(2)
    box = (0, 0, 100, 100)
    tracker = pr.FaceTracker(smoothing=0.5, max_gap=0.5, min_missed=3)
    tracker.update([(box, True, None)], [p], 0.0)
    for k in range(1, 13):  # 12 frames without the face, to 0.4 s
        tracker.update([], [], k * step)
    ids, smoothed = tracker.update([(box, True, None)], [q], 13 * step)
    before = 0.5 ** 13 * p + (1 - 0.5 ** 13) * q
    assert ids == [0] and smoothed[0] == pytest.approx(before)
    ids, smoothed = tracker.update([(box, True, None)], [p], 15 * step)
    assert smoothed[0] == pytest.approx(0.25 * before + 0.75 * p)
    ids, smoothed = tracker.update([(box, True, None)], [q], 15 * step)
    assert smoothed[0] == pytest.approx(0.5 * (0.25 * before + 0.75 * p) + 0.5 * q)
    sparse = pr.FaceTracker(smoothing=0.9, max_gap=0.5, min_missed=3)
    sparse.update([(box, True, None)], [p], 0.0)
    sparse.update([], [], 1.0)
    sparse.update([], [], 2.0)  # two missed detections
    ids, smoothed = sparse.update([(box, True, None)], [q], 3.0)
    assert ids == [0] and smoothed[0] == pytest.approx(q, abs=1e-3)  # 0.9 ** (3 / step) of the past: 8e-5
    for k in (4.0, 5.0, 6.0):
        sparse.update([], [], k)  # three missed, 3 s unseen: ended
    assert sparse.update([(box, True, None)], [p], 7.0)[0] == [1]


def test_a_long_video_keeps_the_timeline_tracks_it_draws_and_no_others():
    """Of 30 tracks (track k seen k + 1 times) with tracks 2 and 3 live, the timeline keeps the six longest (24-29)
    and the live ones; the points of the rest, which the timeline cannot draw, are forgotten."""
    timeline = pr.Timeline()
    for k in range(30):
        for _ in range(k + 1):
            timeline.add(k, 0.1, np.eye(8)[0])
    timeline.forget(live={2: {}, 3: {}})
    assert sorted(timeline.frames) == sorted(timeline.times) == sorted(timeline.probs) == [2, 3, 24, 25, 26, 27, 28, 29]
    assert len(timeline.times[29]) == len(timeline.probs[29]) == timeline.frames[29] == 30
    assert timeline.longest() == [24, 25, 26, 27, 28, 29]
    few = pr.Timeline()
    for k in range(10):
        few.add(k, 0.1, np.eye(8)[0])
    few.forget(live={})  # too few to be worth it: kept
    assert len(few.times) == 10


def test_a_long_track_is_drawn_from_averages_of_evenly_many_frames(monkeypatch):
    """100 frames of one track, at most 8 points: its points are each the average of 16 consecutive frames (times
    and probabilities alike), 6 of them (frames 96-99 wait for a seventh), whatever the frames' times."""
    monkeypatch.setattr(pr, "TIMELINE_POINTS", 8)
    rng = np.random.default_rng(0)
    times, probs = np.cumsum(rng.uniform(0.01, 0.1, 100)), rng.dirichlet(np.ones(8), 100)
    timeline = pr.Timeline()
    for t, p in zip(times, probs):
        timeline.add(0, t, p)
    assert timeline.group[0] == 16 and timeline.frames[0] == 100
    assert timeline.times[0] == pytest.approx(times[:96].reshape(6, 16).mean(1))
    assert np.array(timeline.probs[0]) == pytest.approx(probs[:96].reshape(6, 16, 8).mean(1))


def test_a_video_s_timeline_holds_few_tracks_and_few_points(checkpoint, tmp_path, monkeypatch):
    """predict_video's timeline with TIMELINE_TRACKS 1 and TIMELINE_POINTS 4, on a video at 2 fps of a face seen
    in one frame five times (each followed by three frames without it, 1.5 s: the track ends), then for nine frames:
    it drops tracks 1-3 once it holds five (keeping the live one and one longest), draws the last, and holds two
    points of it, the averages of its first four frames' rows and of the next four's (the ninth waits for a group
    of four), times and probabilities."""
    monkeypatch.setattr(pr, "TIMELINE_TRACKS", 1)
    monkeypatch.setattr(pr, "TIMELINE_POINTS", 4)
    held, drawn, forget = [], [], pr.Timeline.forget

    def counted(timeline, live):
        forget(timeline, live)
        held.append(len(timeline.frames))

    monkeypatch.setattr(pr.Timeline, "forget", counted)
    monkeypatch.setattr(pr, "plot_timeline", lambda timeline, *args: drawn.append(timeline))
    face = hopper_head()
    blank = np.full((480, 640, 3), 90, np.uint8)
    seen = blank.copy()
    seen[120:360, 200:420] = face
    writer = cv2.VideoWriter(str(tmp_path / "v.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 2.0, (640, 480))
    for frame in ([seen] + [blank] * 3) * 5 + [seen] * 9:
        writer.write(frame)
    writer.release()
    assert pr.main([str(tmp_path / "v.mp4"), f"--checkpoint={checkpoint}", f"--output_dir={tmp_path / 'out'}",
                    "--smoothing=0"]) == 0  # the CSV's probabilities are the raw ones, the timeline's the smoothed
    rows = [r for r in read_csv(tmp_path / "out") if r["face"] == "5"]
    assert len(rows) == 9 and held and max(held) == 4
    [timeline] = drawn
    assert sorted(timeline.frames) == [0, 4, 5] and timeline.longest() == [5] and timeline.frames[5] == 9
    times = np.array([float(r["time_s"]) for r in rows])
    assert timeline.times[5] == pytest.approx([times[:4].mean(), times[4:8].mean()])
    probs = np.array([[float(r[name]) for name in CLASSES] for r in rows])  # written to 4 decimals
    assert np.array(timeline.probs[5]) == pytest.approx(probs[:8].reshape(2, 4, 8).mean(1), abs=1e-4)
    [source] = json.loads((tmp_path / "out" / "summary.json").read_text())["sources"]
    assert source["tracks"] == 6


def test_gifs_are_videos_with_each_frames_own_delay(checkpoint, tmp_path):
    """An animated GIF (frames shown 0.1, 0.3, 0.1 and 2 s) is read as a video at its frames' own times, from a
    folder too, and not called cut short; a still GIF is a video of one frame. --explain on a video says that it
    writes a picture per face of every frame."""
    from PIL import Image
    face = cv2.cvtColor(hopper_head(), cv2.COLOR_BGR2RGB)
    frames = []
    for i in range(4):
        frame = np.full((360, 480, 3), 90, np.uint8)
        frame[60:300, 40 + 20 * i:260 + 20 * i] = face
        frames.append(Image.fromarray(frame))
    (tmp_path / "gifs").mkdir()
    frames[0].save(tmp_path / "gifs" / "moving.gif", save_all=True, append_images=frames[1:],
                   duration=[100, 300, 100, 2000])
    frames[0].save(tmp_path / "gifs" / "still.gif")
    proc = predict(f"{tmp_path / 'gifs'}", f"--checkpoint={checkpoint}", f"--output_dir={tmp_path / 'out'}",
                   "--explain", cwd=tmp_path)
    assert "--explain writes a picture for each face of every classified video frame" in proc.stderr
    rows = read_csv(tmp_path / "out")
    moving = [r for r in rows if r["source"].endswith("moving.gif")]
    assert [float(r["time_s"]) for r in moving] == pytest.approx([0.0, 0.1, 0.4, 0.5])
    assert {r["face"] for r in moving} == {"0"} and all(r["face_detected"] == "true" for r in moving)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    entries = {Path(e["source"]).name: e for e in summary["sources"]}
    assert entries["moving.gif"]["kind"] == "video" and entries["moving.gif"]["frames"] == 4
    for entry in entries.values():
        assert (entry["kind"], entry["warnings"], entry["error"]) == ("video", [], None)
    assert (entries["still.gif"]["frames"], entries["still.gif"]["faces"], entries["still.gif"]["tracks"]) == (1, 1, 1)
    assert len(list((tmp_path / "out" / "explain").rglob("moving_frame*_face0.png"))) == 4


def test_videos_of_one_name_max_frames_and_a_video_in_a_folder(checkpoint, tmp_path):
    """Two videos named clip.mp4 get two annotated videos; --max_frames stops each after that many frames;
    a folder's videos are found beside its images."""
    for day in ("day1", "day2"):
        (tmp_path / day).mkdir()
        write_video(tmp_path / day / "clip.mp4", frames=6)
    shutil.copy(HOPPER, tmp_path / "day2" / "still.jpg")
    predict(f"{tmp_path / 'day1' / 'clip.mp4'}", f"{tmp_path / 'day2'}", f"--checkpoint={checkpoint}",
               f"--output_dir={tmp_path / 'out'}", "--max_frames=3", cwd=tmp_path)
    rows = read_csv(tmp_path / "out")
    frames = [(r["source"], r["frame"]) for r in rows if r["frame"]]
    assert frames == [(str(tmp_path / d / "clip.mp4"), str(i)) for d in ("day1", "day2") for i in range(3)]
    assert [r["source"] for r in rows if not r["frame"]] == [str(tmp_path / "day2" / "still.jpg")]
    annotated = sorted(p.relative_to(tmp_path / "out" / "annotated").as_posix()
                       for p in (tmp_path / "out" / "annotated").rglob("*.*"))
    assert annotated == ["clip.mp4", "day2/clip.mp4", "day2/still.jpg"]


@pytest.mark.parametrize("arg, message", [("--every=0", "--every must be >= 1"), ("--smoothing=1", "--smoothing must be in"),
                                          ("--batch=0", "--batch must be >= 1"), ("--device=gpu", "--device must be"),
                                          ("--no_face=skip", "unknown field --no_face"),
                                          ("--crop_margin=0.3", "--crop_margin is a training setting")])
def test_prediction_settings_are_checked(arg, message):
    with pytest.raises(ern.UserError, match=message):
        pr.main(["x.jpg", "--checkpoint=m.pth", arg])


def test_a_flag_and_its_value_apart_are_refused_not_read_as_an_input():
    """`--detect_faces false photo.jpg` detected faces (a bare flag is true) and read "false" as an input; a
    value after a bare flag is refused naming the form that works. A bare flag before an input still works."""
    with pytest.raises(ern.UserError, match=re.escape("--detect_faces false: a setting's value follows '=': "
                                                      "--detect_faces=false")):
        pr.main(["--checkpoint=m.pth", "--detect_faces", "false", "x.jpg"])
    (given,), words = ern.read_overrides(["--jsonl", "x.jpg", "--detect_faces", "1.jpg"], (pr.Prediction,), "",
                                         positional=True)
    assert given == {"jsonl": True, "detect_faces": True} and words == ["x.jpg", "1.jpg"]


def test_predict_needs_a_model_and_an_input(checkpoint, tmp_path):
    proc = predict(str(HOPPER), cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: give the model: --checkpoint=RUN_FOLDER or a .pth"
    with pytest.raises(ern.UserError, match="name at least one input"):
        pr.main([f"--checkpoint={checkpoint}"])


def test_the_trainer_names_the_script_for_prediction_and_export(tmp_path):
    for arg, script in (("--predict=photo.jpg", "python predict.py"), ("--export=onnx", "python export.py"),
                        ("--explain", "python predict.py")):
        with pytest.raises(ern.UserError, match=f"^{arg.split('=')[0]} is not the trainer's: {script}"):
            ern.main([arg])


def test_actions_stay_out_of_the_saved_config():
    fields = {f.name for f in dataclasses.fields(ern.Config)}
    actions = {f.name for f in dataclasses.fields(ern.Action)}
    assert not fields & actions and {"evaluate", "demo", "resume", "split"} == actions
    # prediction shares only the inference and system settings with training
    assert fields & {f.name for f in dataclasses.fields(pr.Prediction)} == {
        "tta_flip", "tta_shift", "tta_zoom", "amp", "channels_last", "device", "output_dir", "overwrite"}
