"""benchmarks/gpu_check.py, the first thing to run on a GPU, cannot rot: its --smoke mode runs the same code path
(the CUDA tests in a child, a timed matrix product, a budgeted training run through main(), the report) on the CPU
on a tiny synthetic set."""
import json
import subprocess
import sys
import time

from conftest import ROOT


def test_gpu_check_smoke_runs_its_code_path_on_the_cpu_within_a_minute(tmp_path):
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--minutes=0.75",
                           f"--json={tmp_path / 'check.json'}", f"--out={tmp_path / 'run'}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    took = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["smoke"] and report["gpu"] is None and report["matmul_tflops"] > 0
    assert report["cuda_tests"]["returncode"] == 0 and "skipped" in report["cuda_tests"]["summary"]
    train = report["train"]
    assert 1 <= train["epochs"] <= train["max_epochs"] == 50
    assert train["images_per_second"] > 0 and train["seconds_per_epoch"] > 0 and train["forward_gflops_per_image"] > 0
    assert 0 <= train["final_epoch_val_accuracy"] <= train["best_val_accuracy"] <= 1
    assert train["evaluated_split"] == "val" and 0 < train["fraction_of_matmul_rate"]
    assert took < 60, took
