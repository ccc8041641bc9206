"""Which models crash in channels_last under which oneDNN instruction set, with and without the probe.

For every model that tests/test_kernels.py names (the CPU preset with each count of blocks) and every oneDNN level
this CPU can run (ONEDNN_MAX_CPU_ISA), in a child process each (test_kernels.CHILD): two training steps at --batch
faces in channels_last with the probe bypassed ("forced": what the script did before the probe) and then as the script
does it now ("probed": the probe's verdict, then the steps).
A child that dies or hangs past --timeout is reported as such. Prints a table, writes JSON.

    python benchmarks/isa_matrix.py --json=isa_matrix.json [--batch=8] [--threads=1,2] [--isas=AVX2,AVX512_CORE]
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import emotion_recognition as ern  # noqa: E402
from test_kernels import BLOCK_COUNTS, CHILD, CPU_PRESET, NAMED, onednn_isas  # noqa: E402

def outcome(isa, name, overrides, batch, mode, threads, timeout, cache):
    """One model's two training steps in a child (test_kernels.CHILD) under the oneDNN level isa."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA=isa, XDG_CACHE_HOME=cache, OMP_NUM_THREADS=str(threads))
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), json.dumps({name: {**overrides, "batch_size": batch}}),
                               mode, "2"], env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"result": f"hung (> {timeout} s)", "seconds": timeout}
    if proc.returncode != 0:
        code = proc.returncode
        name = signal.Signals(-code).name if code < 0 else f"exit {code}"
        return {"result": f"died ({name})", "seconds": round(time.time() - t0, 1), "stderr": proc.stderr[-300:]}
    return {"result": "ok", "seconds": round(time.time() - t0, 1), **json.loads(proc.stdout.strip().splitlines()[-1])}


# the test's models, the CPU preset with each count of blocks under every level
MODELS = {**{k: v for k, v in NAMED.items() if k != CPU_PRESET}, **BLOCK_COUNTS}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="isa_matrix.json")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--isas", default="", help="comma-separated oneDNN levels (default: every one this CPU runs)")
    parser.add_argument("--timeout", type=int, default=120)
    parser.add_argument("--cache", default="/tmp/ern_isa_matrix_cache", help="XDG_CACHE_HOME of the children (fresh probes)")
    args = parser.parse_args()
    isas = [isa for isa in onednn_isas(ern.cpu_flags()) if not args.isas or isa in args.isas.split(",")]
    print(f"CPU: {ern.cpu_model()}; oneDNN levels it can run: {', '.join(isas)}; torch {ern.torch.__version__}")
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        for isa in isas:
            for name, overrides in MODELS.items():
                row = {"isa": isa, "threads": threads, "model": name}
                for mode in ("forced", "probed"):
                    row[mode] = outcome(isa, name, overrides, args.batch, mode, threads, args.timeout, args.cache)
                rows.append(row)
                probed = row["probed"]
                print(f"{isa:17s} {threads}t {name:48s} forced: {row['forced']['result']:18s} probed: {probed['result']:8s}"
                      f" channels_last={probed.get('channels_last')} ({probed.get('autocast')}) {probed.get('probe') or ''}",
                      flush=True)
    Path(args.json).write_text(json.dumps({"cpu": ern.cpu_model(), "flags": ern.cpu_flags(), "torch": ern.torch.__version__,
                                           "batch": args.batch, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
