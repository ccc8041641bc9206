"""The first thing to run on a GPU: the CUDA tests, then the default protocol (96 px, 27.7 M parameters, compile on)
on the packed AffectNet set, for 50 epochs if its time budget says they fit, else the most that fit (said so).
Reports images per second, seconds per epoch, peak GPU memory, validation accuracy (best and final epoch) and the
fraction of the GPU's bf16 matrix rate that training reaches (a large bf16 matmul timed in the same process);
writes one JSON file, anew after each stage (a run cut short keeps what it measured, and an "error" says what
stopped it), and beside it copies of the training run's log, metrics and results (the run folder's checkpoints are
too big to bring back from a lent machine).

    python benchmarks/pack_data.py                 # here, once: packed/affectnet96 (about 58.5 MiB, git-ignored)
    python benchmarks/gpu_check.py --json=$OUT/gpu_check.json --minutes=7   # on the GPU machine, packed/ carried along
    python benchmarks/gpu_check.py --smoke         # the same code path on the CPU, tiny synthetic data, < 1 minute

Everything runs in this one process (its start is where the budget counts from), but the CUDA tests, which pytest
runs in a child, for at most CUDA_TESTS_SHARE of the budget.
"""
import argparse
import importlib
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import emotion_recognition as ern  # noqa: E402
torch = ern.torch

SMOKE = ["--image_size=32", "--width=0.125", "--blocks=1,1,1,1", "--batch_size=16", "--eval_batch_size=64",
         "--tsne_samples=60", "--attention_samples=16", "--warmup_epochs=0", "--device=cpu"]  # compile: a C++ build
CUDA_TESTS_SHARE = 0.3  # of --minutes at most for the CUDA tests: the training has the rest
RUN_FILES = ("train.log", "metrics.jsonl", "evaluation_results.json", "provenance.json", "config.json")  # copied back


def text(output):
    """A child's output as text: TimeoutExpired keeps what it had read as bytes."""
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def cuda_tests(seconds):
    """pytest tests/test_cuda.py in a child for at most `seconds`: its exit status (None: timed out) and closing line
    (all skipped on a machine without CUDA)."""
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                               str(ROOT / "tests" / "test_cuda.py")], cwd=ROOT, capture_output=True, text=True,
                              timeout=seconds)
    except subprocess.TimeoutExpired as e:
        return {"returncode": None, "summary": f"stopped after {seconds:.0f} s (CUDA_TESTS_SHARE of --minutes)",
                "output_tail": text(e.stdout)[-2000:] + text(e.stderr)[-1000:]}
    return {"returncode": proc.returncode, "summary": (proc.stdout.strip().splitlines() or [""])[-1],
            "output_tail": proc.stdout[-2000:] + proc.stderr[-1000:]}


def matmul_tflops(device, n, dtype, repeats=10):
    """TFLOP/s of an n x n x n matrix product (the mean of `repeats` after three warm-ups)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0) / 1e12


def forward_flops(cfg, num_classes):
    """FLOPs of one forward pass of one face through the model cfg describes (PyTorch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode
    model = ern.build_model(cfg, num_classes).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, cfg.image_size, cfg.image_size))
    return counter.get_total_flops()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="", help="the packed set (pack_data.py; default packed/affectnet96; "
                        "--smoke: a synthetic set unless given)")
    parser.add_argument("--minutes", type=float, default=8.0, help="the whole check, this process's start included")
    parser.add_argument("--json", default="gpu_check.json")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "gpu_check"), help="folder of the training run")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny synthetic data, the same code path")
    args = parser.parse_args()
    started = ern.process_start_time()
    sys.stdout.reconfigure(line_buffering=True)  # the log's lines reach a pipe as they come: a run cut short keeps them
    out, json_path = Path(args.out), Path(args.json)
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here; --smoke runs the check's code path on the CPU")
    data = Path(args.data or ROOT / "packed" / "affectnet96")
    if args.smoke and not args.data:
        data = out.parent / "gpu_check_smoke_data"
        if not (data / "data.yaml").exists():
            ern.make_synthetic_dataset(data, per_class=(12, 4, 0), size=48, seed=0)
    elif not (data / "data.yaml").exists():
        raise SystemExit(f"{data}: no packed set; run benchmarks/pack_data.py here and carry packed/")
    ern.pyplot()  # the final evaluation's packages, imported now: one missing fails in seconds, not after training
    importlib.import_module("sklearn.manifold")
    report = {"cpu": ern.cpu_model(), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "torch": torch.__version__, "smoke": args.smoke}

    def save():
        report["minutes"] = (time.time() - started) / 60
        ern.write_json(report, json_path)

    report["cuda_tests"] = cuda_tests(120 if args.smoke else CUDA_TESTS_SHARE * args.minutes * 60)
    print(f"tests/test_cuda.py: {report['cuda_tests']['summary']}")
    save()

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report["matmul_tflops"] = matmul_tflops(device, 8192 if device.type == "cuda" else 256, dtype)
    print(f"{'bf16' if dtype == torch.bfloat16 else 'float32'} matmul: {report['matmul_tflops']:.1f} TFLOP/s")
    save()

    argv = [f"--data_dir={data}", f"--output_dir={out}", "--overwrite=true", f"--cache_dir={out.parent / 'cache'}",
            f"--compile={not args.smoke}", f"--time_budget={args.minutes - 0.25:.2f}",  # 15 s for the report
            *(SMOKE if args.smoke else [])]
    report["train"] = {"command": shlex.join(["emotion_recognition.py", *argv]), "run_dir": str(out)}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        ern.main(argv, started=started)  # the default protocol: 96 px, width 1.0, 50 epochs at most; the budget
        # counts from this process's start
    except BaseException as e:  # a refused plan, out of memory, a compiler's failure, Ctrl-C or `timeout -s INT`
        report["error"] = f"{type(e).__name__}: {str(e)[:1000]}"
        raise
    finally:
        for name in RUN_FILES:
            if (out / name).is_file():
                shutil.copy(out / name, json_path.with_name(f"{json_path.stem}_{name}"))
        save()
    results = json.loads((out / "evaluation_results.json").read_text())
    plan = json.loads((out / "provenance.json").read_text())[-1]["time_budget_plan"]
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    cfg = ern.Config(**{k: v for k, v in results["config"].items() if k in ern.Config.__dataclass_fields__})
    train_faces = json.loads((out / "data_report.json").read_text())["splits"]["train"]["samples"]
    images_per_s = cfg.batch_size / plan["step_seconds"]
    whole = history[1:-1] if cfg.epochs % 1 else history[1:]  # the first warms up; a part-epoch last is short
    epoch_s = statistics.median(h["epoch_seconds"] for h in whole or history)
    flops = forward_flops(cfg, len(results["class_names"]))
    report["train"].update({
        "epochs": cfg.epochs, "max_epochs": plan["max_epochs"], "all_epochs_fit": cfg.epochs == plan["max_epochs"],
        "images_per_second": images_per_s,  # the plan's timed steps
        # the epochs as run, their validation included: a floor under the steps' rate
        "images_per_second_with_validation": ern.epoch_steps(train_faces, cfg) * cfg.batch_size / epoch_s,
        "seconds_per_epoch": epoch_s,
        "first_epoch_seconds": history[0]["epoch_seconds"],
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
        "best_val_accuracy": results["best_val_accuracy"], "final_epoch_val_accuracy": results["final_epoch_val_accuracy"],
        "evaluated_split": results["evaluated_split"], "arithmetic": results["arithmetic"],
        "forward_gflops_per_image": flops / 1e9, "train_faces": train_faces,
        # a training step is about three forward passes (the backward pass costs two)
        "fraction_of_matmul_rate": 3 * flops * images_per_s / (report["matmul_tflops"] * 1e12)})
    save()
    t = report["train"]
    print(f"{t['epochs']} of {t['max_epochs']} epochs{'' if t['all_epochs_fit'] else ' (the most that fit the budget)'}, "
          f"{t['images_per_second']:.0f} images/s, {t['seconds_per_epoch']:.1f} s an epoch, peak GPU memory "
          f"{t['peak_gpu_memory_gib'] or 0:.1f} GiB, val accuracy best {t['best_val_accuracy']:.2%} final "
          f"{t['final_epoch_val_accuracy']:.2%}, {t['fraction_of_matmul_rate']:.1%} of the matmul rate; "
          f"{report['minutes']:.1f} min; {json_path}")


if __name__ == "__main__":
    try:
        main()
    except ern.UserError as e:  # the trainer's one line (a budget too short for the plan): the report says it too
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
