"""benchmarks/speedrun.py, which made the figures of issue 24's tables: its rows compose as its docstring says, and a
row's run is read back as the trainer wrote it (the final epoch's accuracy, evaluated again where the best epoch
was another)."""
import importlib.util
import json
import shlex

from conftest import ROOT, ern, run_script

SPEEDRUN = ROOT / "benchmarks" / "speedrun.py"
spec = importlib.util.spec_from_file_location("speedrun", SPEEDRUN)
sr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sr)


def test_a_row_adds_its_changes_to_those_above_it_and_an_equals_row_replaces_them():
    rows = dict(sr.cumulative(["=compile", "+val subset", "old", "+batch 128"]))  # run in ROWS' order, not as given
    assert list(rows) == ["old", "+val subset", "+batch 128", "=compile"]
    assert rows == {"old": sr.OLD, "+val subset": f"{sr.OLD} --val_faces=1024",
                    "+batch 128": f"{sr.OLD} --val_faces=1024 --batch_size=128", "=compile": "--compile=true"}


def test_a_row_runs_the_preset_with_its_changes_and_reads_the_final_epoch_back(tiny_dataset, tmp_path):
    """One row on the tiny set: the preset under the budget, the row's changes and --extra after it (the later
    --name wins), and the final epoch's accuracy as --evaluate of final_emotion_model.pth gives it."""
    extra = (f"--image_size=32 --stem_stride=1 --width=0.125 --blocks=1,1,1,1 --batch_size=16 --epochs=3 "
             f"--val_faces=8 --tsne_samples=0 --attention_samples=0 --tta_shift=0 --tta_zoom=0 "
             f"--cache_dir={tmp_path / 'cache'}")
    run_script(f"--data_dir={tiny_dataset}", f"--out={tmp_path / 'sr'}", "--budget=1", "--rows==new preset",
               f"--extra={extra}", cwd=tmp_path, script=SPEEDRUN)
    [row] = json.loads((tmp_path / "sr" / "speedrun.json").read_text())["runs"]
    run = tmp_path / "sr" / "new_preset__0"
    results = json.loads((run / "evaluation_results.json").read_text())
    _, final = ern.main([f"--evaluate={run / 'final_emotion_model.pth'}", f"--split={results['evaluated_split']}",
                         f"--cache_dir={tmp_path / 'cache'}", f"--output_dir={tmp_path / 'final'}"])
    assert (row["final_val_accuracy"], row["best_val_accuracy"]) == (final["accuracy"], results["accuracy"])
    assert row["epochs"] == 3 and 0 < row["minutes"] <= 1.05 and row["epoch_seconds"] > 0
    command = shlex.split(row["command"])
    assert command[2:8] == [f"--data_dir={tiny_dataset}", "--preset=cpu", "--amp=false", "--time_budget=1.0",
                            "--seed=0", f"--output_dir={run}"]
    assert command[-len(shlex.split(extra)):] == shlex.split(extra)


def test_the_step_time_screen_times_the_compiled_model_where_the_row_compiles(monkeypatch):
    """--step_time of a row with --compile=true trains what torch.compile returned (the screen once timed the eager
    model under that row's name), and of a row without it never compiles."""
    import argparse
    import torch

    class Counted(torch.nn.Module):  # torch.compile's stand-in: the same model, its calls counted
        def __init__(self, model):
            super().__init__()
            self.model, self.calls = model, 0

        def forward(self, x):
            self.calls += 1
            return self.model(x)

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(Counted(model)) or compiled[-1])
    tiny = "--image_size=32 --stem_stride=1 --width=0.125 --blocks=1,1,1,1 --batch_size=8 --channels_last=false"
    for flag, want in (("--compile=false", 0), ("--compile=true", 1)):
        row = sr.step_time("row", f"{tiny} {flag}", argparse.Namespace(bf16=False), steps=3)
        assert row["compile"] is bool(want) and len(compiled) == want and row["step_seconds"] > 0
    assert compiled[0].calls == 2 + 3  # the warm-up steps and the timed ones
