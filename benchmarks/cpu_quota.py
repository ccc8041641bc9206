"""
Training under a CPU quota (docker --cpus, a Kubernetes limit) with each thread count from 1 to the visible cores, side
by side in one run: torch's own count (one per visible core) against the one fit_threads_to_cpu picks (one per core
of the quota, to the nearest core), and the ratio of their step times.

    sudo python benchmarks/cpu_quota.py --json=cpu_quota.json --cores=1

Needs root and a cgroup file system with the cpu controller (v1's /sys/fs/cgroup/cpu, or v2's with "cpu" in
cgroup.subtree_control): it makes a group with a quota of --cores cores, and each measurement is a child process put
in it before it imports torch. The child, at its thread count, trains the CPU preset's float32 model (PRESETS["cpu"] with the float32
fields, --amp=false) on random faces through train_one_epoch: one untimed warm-up step, then --steps timed ones;
the thread counts alternate over --rounds rounds so that a change in the machine's load hits each.
"""

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_group(cores, name="ern_cpu_quota_bench"):
    """A cgroup with a quota of `cores` cores: its folder, and the file a pid is written to, to join it."""
    v1 = Path("/sys/fs/cgroup/cpu")
    if v1.is_dir():
        group = v1 / name
        group.mkdir(exist_ok=True)
        period = int((group / "cpu.cfs_period_us").read_text())
        (group / "cpu.cfs_quota_us").write_text(str(int(cores * period)))
        return group, group / "tasks"
    group = Path("/sys/fs/cgroup") / name
    group.mkdir(exist_ok=True)
    (group / "cpu.max").write_text(f"{int(cores * 100000)} 100000")
    return group, group / "cgroup.procs"


def child(threads, steps):
    """In the group: train `steps` steps on `threads` threads and print what they took, torch's own count and the
    trainer's (fit_threads_to_cpu). Imported here: the parent joins the child to the group before torch starts."""
    import numpy as np
    import torch

    import emotion_recognition as ern
    own = torch.get_num_threads()
    ern.fit_threads_to_cpu()
    picked = torch.get_num_threads()
    torch.set_num_threads(threads)
    cfg = dataclasses.replace(ern.Config(), **{**ern.PRESETS["cpu"], **ern.PRESETS_FLOAT32_CPU["cpu"]}, amp=False)
    device, k, b, s = torch.device("cpu"), 8, cfg.batch_size, cfg.image_size
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (b * steps, 3, s, s), dtype=np.uint8))
    labels = torch.from_numpy(rng.integers(0, k, b * steps)).long()
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    torch.manual_seed(0)
    model = ern.place_model(ern.build_model(cfg, k), cfg, device)
    optimizer = ern.make_optimizer(model, cfg)
    scheduler = ern.make_scheduler(optimizer, cfg, steps + 1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ern.train_one_epoch(model, images[:b], labels[:b], mean, std, optimizer, scheduler, scaler, cfg, 0, num_classes=k)
    t0 = time.perf_counter()
    ern.train_one_epoch(model, images, labels, mean, std, optimizer, scheduler, scaler, cfg, 1, num_classes=k)
    print(json.dumps({"threads": torch.get_num_threads(), "seconds": time.perf_counter() - t0, "own": own, "picked": picked,
                      "batch": b, "image_size": s}))


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--cores", type=float, default=1.0, help="the group's quota, in cores")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per way and round")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        return child(args.child, args.steps)
    group, join = make_group(args.cores)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    visible = len(os.sched_getaffinity(0))
    runs = {t: [] for t in range(1, visible + 1)}
    for r in range(args.rounds):
        for t in list(runs)[::1 if r % 2 == 0 else -1]:
            proc = subprocess.run([sys.executable, __file__, f"--json={args.json}", f"--steps={args.steps}",
                                   f"--child={t}"], env=env, capture_output=True, text=True, check=True,
                                  preexec_fn=lambda: join.write_text(str(os.getpid())))
            runs[t].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}, {t} threads: {runs[t][-1]}", flush=True)
    step = {t: sum(x["seconds"] for x in rs) / (len(rs) * args.steps) for t, rs in runs.items()}
    group.rmdir()  # its processes have ended
    own, picked = runs[1][0]["own"], runs[1][0]["picked"]

    import torch  # only now: the children above start torch in the group, the parent need not

    import emotion_recognition as ern
    from bench_pipeline import code_version, machine_info
    out = {"command": "python " + shlex.join([os.path.relpath(sys.argv[0])] + argv),
           "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "machine": {**machine_info(torch.device("cpu")), "cpu_flags": sorted(
               f for f in ern.cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c"))), "cpu_bf16_native": ern.cpu_has_bf16()},
           "code": code_version(), "quota_cores": args.cores, "steps": args.steps, "rounds": args.rounds, "runs": runs,
           "seconds_per_step": step, "torch_threads": own, "picked_threads": picked,
           "speedup_over_torch_threads": step[own] / step[picked] if own in step else None}
    Path(args.json).write_text(json.dumps(out, indent=2))
    for t, seconds in step.items():
        print(f"{t} threads: {seconds:.3f} s a step" + ("  (torch's own)" if t == own else "")
              + ("  (fit_threads_to_cpu's)" if t == picked else ""))
    if own in step:
        print(f"{args.cores:g} cores of quota: fit_threads_to_cpu's {picked} threads train {step[own] / step[picked]:.2f}x "
              f"as fast as torch's {own}")


if __name__ == "__main__":
    main(sys.argv[1:])
