"""The CUDA path, on a GPU only (skipped elsewhere): one epoch with autocast, channels_last and torch.compile, and a
deterministic run interrupted and resumed that ends bit-identical to the uninterrupted one. Run it whenever a GPU
is available: `pytest tests/test_cuda.py`."""
import json

import pytest
import torch

from conftest import TINY, ern, run_script

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FAST = [*TINY, "--tsne_samples=0", "--attention_samples=0", "--device=cuda"]


def test_one_epoch_with_autocast_channels_last_and_compile(tiny_dataset, tmp_path):
    run_script(*FAST, f"--data_dir={tiny_dataset}", f"--output_dir={tmp_path / 'run'}", "--epochs=1", "--amp=true",
               "--channels_last=true", "--compile=true", cwd=tmp_path, timeout=900)
    results = json.loads((tmp_path / "run" / "evaluation_results.json").read_text())
    want = "bfloat16" if torch.cuda.get_device_capability()[0] >= 8 else "float16"
    assert results["arithmetic"] == {"autocast": want, "channels_last": True}
    assert 0 <= results["accuracy"] <= 1 and results["evaluated_samples"] == 32


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
