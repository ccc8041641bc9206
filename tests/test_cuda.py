"""The CUDA path, on a GPU only (skipped elsewhere): one epoch with autocast, channels_last and torch.compile, its
evaluation against the same weights on the CPU in float32, and a deterministic run interrupted and resumed that ends
bit-identical to the uninterrupted one. Run it whenever a GPU is available: `pytest tests/test_cuda.py`."""
import csv
import json

import pytest
import torch

from conftest import TINY, ern, run_script

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FAST = [*TINY, "--tsne_samples=0", "--attention_samples=0", "--device=cuda"]


def predictions(folder):
    with open(folder / "evaluation_predictions.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_one_epoch_with_autocast_channels_last_and_compile(tiny_dataset, tmp_path):
    run_script(*FAST, f"--data_dir={tiny_dataset}", f"--output_dir={tmp_path / 'run'}", "--epochs=1", "--amp=true",
               "--channels_last=true", "--compile=true", cwd=tmp_path, timeout=900)
    results = json.loads((tmp_path / "run" / "evaluation_results.json").read_text())
    want = "bfloat16" if torch.cuda.get_device_capability()[0] >= 8 else "float16"
    assert results["arithmetic"] == {"autocast": want, "channels_last": True}
    faces = predictions(tmp_path / "run")
    assert len(faces) == results["evaluated_samples"] == 32
    assert results["accuracy"] == sum(f["true"] == f["predicted"] for f in faces) / 32
    # The oracle: the weights it evaluated, evaluated again on the CPU in float32. bf16 autocast on a CPU moved a
    # probability by at most 0.0003 (6 epochs), where another epoch's weights moved one by 0.30.
    run_script(f"--evaluate={results['checkpoint']}", f"--data_dir={tiny_dataset}",
               f"--output_dir={tmp_path / 'cpu'}", f"--cache_dir={tmp_path / 'cache'}", "--device=cpu", "--amp=false",
               "--tsne_samples=0", "--attention_samples=0", cwd=tmp_path)
    names, cpu = results["class_names"], predictions(tmp_path / "cpu")
    assert [f["image"] for f in faces] == [f["image"] for f in cpu]
    gap = max(abs(float(g[k]) - float(c[k])) for g, c in zip(faces, cpu) for k in names)
    assert gap < 0.02, f"CUDA's probabilities differ from the CPU's float32 ones by up to {gap}"


def test_an_interrupted_deterministic_run_resumes_bit_exactly(tiny_dataset, tmp_path, monkeypatch):
    common = [*FAST, f"--data_dir={tiny_dataset}", "--epochs=3", "--deterministic=true", "--seed=5"]
    monkeypatch.chdir(tmp_path)
    ern.main([*common, f"--output_dir={tmp_path / 'whole'}"])
    real, calls = ern.train_one_epoch, []

    def interrupted_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ern, "train_one_epoch", interrupted_in_epoch_2)
    with pytest.raises(SystemExit):
        ern.main([*common, f"--output_dir={tmp_path / 'cut'}"])
    monkeypatch.setattr(ern, "train_one_epoch", real)
    ern.main([f"--resume={tmp_path / 'cut' / 'last.pth'}"])
    want = torch.load(tmp_path / "whole" / "final_emotion_model.pth", weights_only=True)["model"]
    got = torch.load(tmp_path / "cut" / "final_emotion_model.pth", weights_only=True)["model"]
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
