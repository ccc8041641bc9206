"""The channels_last probe and the kernels it guards. Every width and image size that a preset, the demo or the README
names trains in the default settings (at batch 8) under the oneDNN instruction sets this CPU can run from AVX2 up
(ONEDNN_MAX_CPU_ISA makes it run the narrower ones): oneDNN 3.12 crashes or hangs in some channels_last kernels
(benchmarks/onednn_*_repro.py), and the probe must catch them before training does. The 27.7 M-parameter default
model trains under the CPU's own level only, and SSE41 and AVX are left to benchmarks/isa_matrix.py: with them
this test took 5.4 minutes (BENCHMARKS.md). The CPU preset runs with the count of blocks it trains with at each level
(the other's layers have the same shapes), and the CPU's own level is not also run capped at it where the list of
levels tells it: neither reaches another kernel. The probe's verdicts on a child that aborts, hangs or computes wrong
numbers, and its cache, are checked with small models that do so on purpose. The 1x1 shortcuts, whose weight gradient
crashed under three levels, are checked against float64 and, without the probe, where they crashed."""
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import torch
import torch.nn as nn

from conftest import ROOT, ern

CPU_PRESET = "cpu preset (width 0.4, 96 px, stride-2 stem)"
# The defaults with each preset's overrides, and the sizes the README names (BENCHMARKS.md: the full matrix).
CPU, DEMO = ern.PRESETS["cpu"], ern.PRESETS["demo"]
NAMED = {"default (width 1.0, 96 px)": {},
         # as --preset=cpu trains on this CPU at the level: two blocks a stage in bf16, one in float32
         # (preset_for_machine); the other count adds no layer of another shape, hence no kernel (BLOCK_COUNTS)
         CPU_PRESET: {**CPU, "preset": "cpu", "device": "cpu"},
         "cpu preset of 11-24 (width 0.5, 64 px)": {**CPU, "image_size": 64, "stem_stride": 1, "width": 0.5},
         "cpu preset of 11-30 (width 0.5, 48 px, stride-1 stem)": {**CPU, "image_size": 48, "stem_stride": 1, "width": 0.5},
         "short ablation (cpu preset, width 0.25, 48 px)": {**CPU, "image_size": 48, "stem_stride": 1, "width": 0.25},
         "demo (width 0.25, 48 px)": dict(DEMO),
         "width 0.25 at 64 px": {"width": 0.25, "image_size": 64},
         "width 0.25 at 96 px": {"width": 0.25}}
# The CPU preset with each count of blocks (benchmarks/isa_matrix.py runs both under every level)
BLOCK_COUNTS = {"cpu preset, two blocks a stage": dict(CPU),
                "cpu preset, one block a stage": {**CPU, "blocks": "1,1,1,1"}}

# argv: the repository, {name: Config overrides}, "probed" (as the script does it) or "forced" (channels_last without
# the probe: the script before it), steps. One JSON line per model that trained.
CHILD = """
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
import emotion_recognition as ern
if __name__ == "__main__":
    cpu = torch.device("cpu")
    for name, overrides in json.loads(sys.argv[2]).items():
        cfg = ern.preset_for_machine(ern.Config(**overrides), {})
        model = ern.build_model(cfg, 8)
        cfg, verdict = ern.channels_last_checked(model, cfg, cpu) if sys.argv[3] == "probed" else (cfg, None)
        model = ern.place_model(model, cfg, cpu)
        optimizer, scheduler, scaler = ern.optimization_parts(model, cfg, cpu, 1)
        x = torch.randint(0, 256, (cfg.batch_size, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)
        y = torch.arange(cfg.batch_size) % 8
        mean, std = torch.full((3,), 128.0), torch.full((3,), 64.0)
        for epoch in range(1, int(sys.argv[4]) + 1):
            stats = ern.train_one_epoch(model, x, y, mean, std, optimizer, scheduler, scaler, cfg, epoch, num_classes=8,
                                        class_weights=ern.inverse_frequency_weights(cfg, y, 8))
        ern.run_inference(model, x.numpy(), mean, std, cpu, cfg)
        print(json.dumps({"model": name, "channels_last": cfg.channels_last, "autocast": str(ern.autocast_dtype(cfg, cpu)),
                          "probe": verdict and verdict["reason"], "blocks": cfg.blocks, "loss": stats["train_loss"]}),
              flush=True)
"""


# oneDNN's instruction-set levels, in order, with the CPU flags each adds (ONEDNN_MAX_CPU_ISA=NAME caps it at one)
ONEDNN_ISAS = {"SSE41": ("sse4_1",), "AVX": ("avx",), "AVX2": ("avx2", "fma"),
               "AVX512_CORE": ("avx512f", "avx512bw", "avx512vl", "avx512dq"), "AVX512_CORE_VNNI": ("avx512_vnni",),
               "AVX512_CORE_BF16": ("avx512_bf16",), "AVX512_CORE_FP16": ("avx512_fp16",),
               "AVX512_CORE_AMX": ("amx_tile", "amx_int8", "amx_bf16"), "AVX512_CORE_AMX_FP16": ("amx_fp16",)}


def onednn_isas(flags):
    """The oneDNN levels (ONEDNN_ISAS) that a CPU with these flags can run, narrowest first."""
    have, needed = [], set()
    for name, adds in ONEDNN_ISAS.items():
        needed |= set(adds)
        if not needed <= set(flags):
            break
        have.append(name)
    return have


# Flags of oneDNN levels that ONEDNN_ISAS leaves out (AVX2_VNNI, AVX2_VNNI_2, AVX10_2): a cap at a listed level masks them
UNLISTED_FLAGS = ("avx_vnni", "avx_vnni_int8", "avx_ne_convert", "avx10")


def own_level(flags):
    """This CPU's own level where ONEDNN_ISAS tells it (the widest listed that it runs, where the CPU has no flag of a
    level the list leaves out and is not at its end), else None."""
    have = onednn_isas(flags)
    if not have or have[-1] == list(ONEDNN_ISAS)[-1] or any(f.startswith(UNLISTED_FLAGS) for f in flags):
        return None
    return have[-1]


DEFAULT = "default (width 1.0, 96 px)"
FLAGS = ern.cpu_flags()
LEVELS = [isa for isa in onednn_isas(FLAGS) if isa not in ("SSE41", "AVX")]
CAPPED = [isa for isa in LEVELS if isa != own_level(FLAGS)]  # capping at the CPU's own level changes no kernel


@pytest.mark.parametrize("isa", [None, *CAPPED])
def test_every_named_model_trains_a_step_under_each_instruction_set(isa):
    """isa None: the CPU's own level, every model; a narrower level: every model but the default one. The CPU preset
    has one block a stage where the level computes in float32, as preset_for_machine gives it."""
    models = {k: {**v, "batch_size": 8} for k, v in NAMED.items() if isa is None or k != DEFAULT}  # the probe's too
    env = dict(os.environ, **({} if isa is None else {"ONEDNN_MAX_CPU_ISA": isa}))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), json.dumps(models), "probed", "1"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"ONEDNN_MAX_CPU_ISA={isa}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [line["model"] for line in lines] == list(models)
    for line in lines:
        assert line["loss"] == line["loss"] and line["loss"] > 0, line  # finite (NaN != NaN)
        assert line["probe"], line  # the probe decided (channels_last is on by default)
    preset = next(line for line in lines if line["model"] == CPU_PRESET)
    assert preset["blocks"] == ("2,2,2,2" if preset["autocast"] == "torch.bfloat16" else "1,1,1,1"), preset


def layer_shapes(overrides):
    """(layer, input shape) of each layer with weights or a computation of its own, in a training pass at batch 8."""
    cfg = ern.Config(**overrides)
    model, seen = ern.build_model(cfg, 8).train(), set()
    hooks = [m.register_forward_hook(lambda m, args, out: seen.add((repr(m), tuple(args[0].shape))))
             for m in model.modules() if not list(m.children()) and not isinstance(m, nn.Identity)]
    model(torch.randn(8, 3, cfg.image_size, cfg.image_size))
    for hook in hooks:
        hook.remove()
    return seen


def test_the_cpu_presets_two_counts_of_blocks_have_the_same_layer_shapes():
    """oneDNN picks a kernel by the layer, its input's shape, the dtype and the level: the second block of a stage
    repeats the first's shapes, so the matrix's one count of blocks a level (with the same test-time views in its
    inference pass) reaches the other's kernels."""
    two, one = (layer_shapes(overrides) for overrides in BLOCK_COUNTS.values())
    assert len(two) >= 30 and two == one, sorted(two ^ one)
    assert layer_shapes({**CPU, "width": 0.5}) - two  # the check tells another width apart


@pytest.mark.parametrize("stride, size", [(2, 12), (2, 7), (1, 6)])
def test_the_shortcut_in_channels_last_is_the_1x1_convolution(stride, size):
    """The oracle: torch's float64 convolution (values and both gradients), in float32 and under bf16 autocast."""
    torch.manual_seed(0)
    shortcut = ern.Projection(8, 16, stride).to(memory_format=torch.channels_last)
    x = torch.randn(3, 8, size, size).to(memory_format=torch.channels_last)
    x64 = x.double().requires_grad_()
    w64 = shortcut.weight.detach().double().requires_grad_()
    y64 = nn.functional.conv2d(x64, w64, stride=stride)
    g = torch.randn_like(y64)
    (y64 * g).sum().backward()
    for amp, tol in ((None, 1e-5), (torch.bfloat16, 0.1)):
        shortcut.weight.grad = None
        xs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp is not None):
            y = shortcut(xs)
        (y.float() * g.float()).sum().backward()
        assert y.dtype == (amp or torch.float32) and y.shape == y64.shape
        for ours, oracle in ((y, y64), (xs.grad, x64.grad), (shortcut.weight.grad, w64.grad)):
            assert torch.allclose(ours.double(), oracle, atol=tol, rtol=tol / 10), (amp, (ours.double() - oracle).abs().max())


FORCED = {"width 0.25 at 96 px": NAMED["width 0.25 at 96 px"]}  # crashed forced under both (BENCHMARKS.md)


@pytest.mark.parametrize("isa", [isa for isa in LEVELS if isa in ("AVX512_CORE", "AVX512_CORE_BF16")])
def test_the_model_that_crashed_in_channels_last_trains_in_it_without_the_probe(isa):
    """Without the probe, width 0.25 at 96 px died in the 1x1 shortcuts' backward under AVX512_CORE (float32, every
    time) and AVX512_CORE_BF16 (bf16, 4 of 5 processes); the shortcuts no longer reach that kernel."""
    models = {k: {**v, "batch_size": 8} for k, v in FORCED.items()}
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA=isa, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), json.dumps(models), "forced", "3"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"ONEDNN_MAX_CPU_ISA={isa}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    line = json.loads(proc.stdout.splitlines()[-1])
    assert line["channels_last"] and line["probe"] is None and line["loss"] > 0, line


class Layout(nn.Module):
    """A 1x1 convolution whose forward in channels_last does `what`: abort (as the oneDNN bugs do), hang, compute wrong
    numbers, or nothing unusual ("fine")."""

    def __init__(self, what):
        super().__init__()
        self.conv, self.what = nn.Conv2d(3, 4, 1), what

    def forward(self, x):
        y = self.conv(x)
        if not x.is_contiguous():  # channels_last
            if self.what == "abort":
                os.abort()
            if self.what == "hang":
                time.sleep(600)
            if self.what == "wrong":
                y = y * 1.5
        return y.mean((2, 3)), None


@pytest.mark.parametrize("what, safe, reason, definite", [
    ("fine", True, "gradients within", True), ("abort", False, "the probe process died (SIGABRT)", True),
    ("hang", False, "the probe hung: no answer within", True), ("wrong", False, "its gradients miss float64's", True)])
def test_the_probe_tells_a_safe_layout_from_one_that_crashes_hangs_or_is_wrong(what, safe, reason, definite):
    t0 = time.time()
    # only the hang waits out its timeout: 1 s there; 30 s for the others' channels_last steps on a loaded machine
    verdict = ern.run_probe(Layout(what), 8, 4, None, 1, min_timeout=1.0 if what == "hang" else 30.0)
    assert verdict[0] == safe and verdict[1].startswith(reason) and verdict[2] == definite, verdict
    assert time.time() - t0 < 60  # a hang is cut short: seconds after the contiguous passes answered


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals: an ignored one stays ignored across exec")
def test_a_ctrl_c_that_reaches_the_probe_child_neither_kills_it_nor_prints(capfd):
    """The terminal sends Ctrl-C to the whole process group, the probe's child too: it is the parent's to handle
    (it kills the child), so the child ignores it from its start. Before, it died of KeyboardInterrupt and printed
    its own traceback under the parent's one line. Here SIGINT goes to the child alone, three times while it runs."""
    import multiprocessing
    sent = []

    def interrupt_the_child():
        deadline = time.time() + 60
        while len(sent) < 3 and time.time() < deadline:
            for child in multiprocessing.active_children():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGINT)
                    sent.append(child.pid)
                    time.sleep(0.3)
            time.sleep(0.01)

    thread = threading.Thread(target=interrupt_the_child)
    thread.start()
    verdict = ern.run_probe(Layout("fine"), 8, 4, None, 1)
    thread.join()
    assert sent and verdict[0], verdict
    assert "KeyboardInterrupt" not in capfd.readouterr().err


def test_the_probe_of_a_script_without_a_main_guard_does_not_run_the_script_again(tmp_path):
    """A user's script that calls the trainer at its top level: the spawned probe imports the trainer, never the
    script (which would run its work twice and then fail to spawn from inside the child)."""
    script = tmp_path / "user_script.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nimport emotion_recognition as ern\n"
                      "print('top level ran', flush=True)\n"
                      "cfg = ern.Config(image_size=32, width=0.125, blocks='1,1,1,1')\n"
                      "print(ern.run_probe(ern.build_model(cfg, 8), 32, 4, None, 1), flush=True)\n")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()  # the verdict itself is the CPU's; a child that ran the script died (exit 1)
    assert lines[0] == "top level ran" and len(lines) == 2 and lines[1].endswith(", True)"), lines


def small_dev_shm_allowed():
    try:
        return subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /dev/shm"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not small_dev_shm_allowed(),
                    reason="needs a private mount namespace (unshare -m, as root) to make /dev/shm small")
def test_the_probe_runs_where_dev_shm_is_smaller_than_the_model(tmp_path):
    """Docker gives /dev/shm 64 MB, and a model handed to a spawned child goes through it: the default model's 105 MiB
    failed the start with "unable to allocate shared memory". Here /dev/shm holds 64 KiB and the model 1.8 MiB."""
    script = tmp_path / "probe.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nimport emotion_recognition as ern\n"
                      "cfg = ern.Config(image_size=32, width=0.25, blocks='1,1,1,1')\n"
                      "print(ern.run_probe(ern.build_model(cfg, 8), 32, 4, None, 1), flush=True)\n")
    done = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs /dev/shm && "
                           f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith(", True)"), done.stdout + done.stderr[-3000:]


def test_inside_a_daemonic_process_the_probe_declines_instead_of_crashing(monkeypatch):
    """A Pool or DataLoader worker building an EmotionPredictor: multiprocessing refuses it a child of its own
    (AssertionError: daemonic processes are not allowed to have children), which ended the caller's work."""
    import multiprocessing
    monkeypatch.setitem(multiprocessing.current_process()._config, "daemon", True)
    safe, reason, definite = ern.run_probe(Layout("fine"), 8, 4, None, 1)
    assert (safe, definite) == (False, False) and "daemonic" in reason


def test_a_linked_folder_on_another_drive_is_read(tmp_path, monkeypatch):
    """Windows' commonpath raises ValueError for paths on two drives (an album linked from D: to E:)."""
    (tmp_path / "album").mkdir()
    (tmp_path / "album" / "a.jpg").write_bytes(b"x")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "linked").symlink_to(tmp_path / "album")
    real = os.path.commonpath

    def two_drives(paths):
        if any("album" in p for p in paths):
            raise ValueError("Paths don't have the same drive")
        return real(paths)

    monkeypatch.setattr(os.path, "commonpath", two_drives)
    assert ern.folder_files(tmp_path / "photos") == [tmp_path / "photos" / "linked" / "a.jpg"]


def test_the_probe_of_a_network_defined_in_the_callers_script_unpickles_it_there(tmp_path):
    """benchmarks/resnet18_baseline.py's network is a class of its script: hidden from the child, the class could not
    be unpickled and the probe died (exit 1), which left the baseline without channels_last."""
    script = tmp_path / "baseline.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nimport torch.nn as nn\n"
                      "import emotion_recognition as ern\n\n"
                      "class Tiny(nn.Module):\n"
                      "    def __init__(self):\n        super().__init__()\n        self.conv = nn.Conv2d(3, 4, 3)\n"
                      "    def forward(self, x):\n        return self.conv(x).mean((2, 3)), None\n\n"
                      "if __name__ == '__main__':\n    print(ern.run_probe(Tiny(), 8, 4, None, 1), flush=True)\n")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(", True)") and "died" not in done.stdout, done.stdout


def test_the_callers_script_is_hidden_only_while_the_probe_starts(monkeypatch):
    main = sys.modules["__main__"]
    spec = object()
    monkeypatch.setattr(main, "__file__", "/somewhere/user_script.py", raising=False)
    monkeypatch.setattr(main, "__spec__", spec, raising=False)
    with ern.callers_script_hidden(nn.Linear(1, 1)):
        assert not hasattr(main, "__file__") and main.__spec__ is None
    assert main.__file__ == "/somewhere/user_script.py" and main.__spec__ is spec


def test_without_a_home_directory_verdicts_are_kept_in_the_temporary_folder(monkeypatch):
    def no_home(cls):
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(ern.Path, "home", classmethod(no_home))
    assert ern.user_cache_dir() == ern.Path(tempfile.gettempdir()) / f"ern-{os.getuid()}"


def test_a_verdict_is_cached_under_what_picks_the_kernels_and_a_doubtful_one_is_not(tmp_path, monkeypatch, capsys):
    """A probe is said as it starts (a first run on a machine waits for it: 1.7 s for the demo on a Zen 5, more for
    a larger model; silently before), and the verdict kept; the same machine and model are not probed, or said,
    again; another instruction set, input size, batch, arithmetic or thread count is."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls, answer = [], [(False, "the probe process died (SIGSEGV)", True)]
    monkeypatch.setattr(ern, "run_probe", lambda *a, **k: calls.append(a) or answer[0])
    cfg, cpu = ern.Config(image_size=32, width=0.125, blocks="1,1,1,1", amp=False), torch.device("cpu")
    model = ern.build_model(cfg, 8)
    checked, verdict = ern.channels_last_checked(model, cfg, cpu)
    assert not checked.channels_last and verdict["cached"] is None and len(calls) == 1
    assert capsys.readouterr().out.startswith("channels_last: trying this model's kernels on this CPU in a child "
                                              "process (once; the verdict is kept in ")
    checked, verdict = ern.channels_last_checked(model, cfg, cpu)  # the same machine and model: no second probe
    assert not checked.channels_last and verdict["cached"] and len(calls) == 1
    assert "trying" not in capsys.readouterr().out
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # other kernels: probed again
    ern.channels_last_checked(model, cfg, cpu)
    assert len(calls) == 2
    other = ern.dataclasses.replace(cfg, image_size=48)  # another input shape: probed again
    ern.channels_last_checked(ern.build_model(other, 8), other, cpu)
    assert len(calls) == 3
    ern.channels_last_checked(model, ern.dataclasses.replace(cfg, batch_size=32), cpu)  # another batch
    ern.channels_last_checked(model, cfg, cpu, batch=8)  # a torchrun process's share of it
    assert len(calls) == 5
    dtype, threads = ern.autocast_dtype, torch.get_num_threads()
    monkeypatch.setattr(ern, "autocast_dtype", lambda *args: torch.bfloat16)  # bf16 autocast's kernels
    ern.channels_last_checked(model, cfg, cpu)
    monkeypatch.setattr(ern, "autocast_dtype", dtype)
    torch.set_num_threads(threads + 1)  # oneDNN picks kernels by the thread count too
    try:
        ern.channels_last_checked(model, cfg, cpu)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 7
    ern.channels_last_checked(model, cfg, cpu)  # all as before: the verdict kept
    assert len(calls) == 7
    answer[0] = (False, "the probe process died (exit 1)", False)  # could not start: not the kernels' fault
    fresh = ern.dataclasses.replace(cfg, width=0.25)
    for _ in range(2):
        ern.channels_last_checked(ern.build_model(fresh, 8), fresh, cpu)
    assert len(calls) == 9
    assert ern.channels_last_checked(model, ern.dataclasses.replace(cfg, channels_last=False), cpu)[1] is None
