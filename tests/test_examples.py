"""Every example runs on CPU with 2 ranks under torchrun (host backend, Triton interpreter),
prints its result line and exits within 15 s of starting its teardown; ``--help`` of each works."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from symmtriton.tools.testing import EXIT_MARK_ENV

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TIMEOUT = float(os.environ.get("SYMMTRITON_EXAMPLE_TIMEOUT", 240))

#: example -> (tiny flags, a line rank 0 must print)
CASES = {
    "all_gather": (["--numel", "1000", "--iters", "2", "--warmup", "1"],
                   "results match torch.distributed"),
    "ep_moe": (["--steps", "2", "--iters", "1", "--warmup", "0"], "outputs match"),
    "megatron_tp": (["--steps", "2", "--iters", "1", "--warmup", "0"], "outputs match"),
    "reduce_scatter": (["--numel", "1000", "--iters", "2", "--warmup", "1"],
                       "results match torch.distributed"),
    "symmetric_buffers": (["--numel", "256", "--buffer-mb", "4"],
                          "symmetric_buffers: all checks passed"),
    "tp_decode": (["--layers", "2", "--hidden", "64", "--heads", "4", "--vocab", "128",
                   "--steps", "3", "--iters", "2", "--warmup", "1"], "outputs match"),
}
#: what every example says of its baseline on the CPU; the timed ones add why no ratio is given
CPU_BASELINE = "baseline: torch.distributed on a gloo group (CPU transport)"
CPU_NO_RATIO = ("times not comparable, no ratio given: CPU host backend: symmtriton's kernels run "
                "in the Triton interpreter")


def _env() -> dict:
    env = dict(os.environ)
    env.update({"CUDA_VISIBLE_DEVICES": "", "SYMMTRITON_BACKEND": "host", "TRITON_INTERPRET": "1",
                "OMP_NUM_THREADS": "1", EXIT_MARK_ENV: "1"})
    return env


def _run(args, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def test_every_example_has_a_case():
    found = {p.stem for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")}
    assert found == set(CASES)


def _check_baseline_wording(name: str, stdout: str) -> None:
    """Every example names its baseline; none quotes a speed-up on the CPU (not like for like)."""
    assert CPU_BASELINE in stdout, stdout
    assert "speed-up" not in stdout.lower() and "speedup" not in stdout.lower(), stdout
    if name != "symmetric_buffers":  # the timed ones print both times and say why no ratio
        assert CPU_NO_RATIO in stdout, stdout


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_help(name):
    r = _run([str(EXAMPLES / f"{name}.py"), "--help"], timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage:") and "--dtype" in r.stdout
    assert "TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES" in r.stdout


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.full)
                                  if n in ("ep_moe", "reduce_scatter", "tp_decode") else n
                                  for n in sorted(CASES)])
def test_example_runs_on_two_cpu_ranks(name):
    flags, expect = CASES[name]
    r = _run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
              str(EXAMPLES / f"{name}.py"), *flags])
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr[-4000:]}"
    lines = r.stdout.splitlines()
    assert any(expect in line for line in lines), r.stdout
    assert any(line.startswith(name) and "world=2" in line for line in lines), r.stdout
    _check_baseline_wording(name, r.stdout)
    marks = [float(m) for m in re.findall(r"symmtriton-exit-mark ([0-9.]+)", r.stderr)]
    assert len(marks) == 2 and time.time() - min(marks) < 15, (marks, time.time())


@pytest.mark.parametrize("flags, message", [
    (["--hidden", "0"], "argument --hidden: must be >= 1, got 0"),
    (["--hidden", "64", "--heads", "5"], "--hidden 64 must be divisible by 5"),
])
def test_example_rejects_bad_flags(flags, message):
    r = _run([str(EXAMPLES / "tp_decode.py"), *flags], timeout=60)
    assert r.returncode == 2 and message in r.stderr, r.stderr


@pytest.mark.full
def test_tp_decode_all_reduce_mode_runs_on_two_cpu_ranks():
    """``--mode ar``: replicated residual, all_reduce_add_rmsnorm against all_reduce + add +
    rms_norm."""
    flags, expect = CASES["tp_decode"]
    r = _run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
              str(EXAMPLES / "tp_decode.py"), *flags, "--mode", "ar"])
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr[-4000:]}"
    assert any(expect in line for line in r.stdout.splitlines()), r.stdout
    assert "mode=ar" in r.stdout and "all_reduce_add_rmsnorm" in r.stdout, r.stdout
    _check_baseline_wording("tp_decode", r.stdout)


def _examples_common():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import _common
    finally:
        sys.path.remove(str(EXAMPLES))
    return _common


@pytest.mark.parametrize("device, dist_backend, shared, expect", [
    ("cpu", "gloo", False, "times not comparable, no ratio given: CPU host backend"),
    ("cuda", "gloo", True, "times not comparable, no ratio given: 4 ranks share one GPU; the "
                           "baseline moves data through the CPU (gloo)"),
    ("cuda", "nccl", False, "baseline: torch.distributed on an NCCL group (GPU to GPU); speed-up "
                            "over it: staged 3.00x, zero-copy 6.00x"),
])
def test_speed_up_only_like_for_like(device, dist_backend, shared, expect):
    common = _examples_common()
    env = common.Env(0, 4, 0, torch.device(device), None, dist_backend, shared)
    line = common.versus_baseline(env, {"staged": 2e-6, "zero-copy": 1e-6}, 6e-6)
    assert expect in line, line
    assert ("speed-up" in line) == (dist_backend == "nccl"), line
