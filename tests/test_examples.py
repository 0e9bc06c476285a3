"""Every example runs on CPU with 2 ranks under torchrun (host backend, Triton interpreter),
prints its result line and exits within 15 s of starting its teardown; ``--help`` of each works."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from symmtriton.testing import EXIT_MARK_ENV

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TIMEOUT = float(os.environ.get("SYMMTRITON_EXAMPLE_TIMEOUT", 240))

#: example -> (tiny flags, a line rank 0 must print)
CASES = {
    "all_gather": (["--numel", "1000", "--iters", "2", "--warmup", "1"],
                   "results match torch.distributed"),
    "ep_moe": (["--steps", "2", "--iters", "1", "--warmup", "0"], "outputs match"),
    "reduce_scatter": (["--numel", "1000", "--iters", "2", "--warmup", "1"],
                       "results match torch.distributed"),
    "symmetric_buffers": (["--numel", "256", "--buffer-mb", "4"], "symmetric_buffers: all checks passed"),
    "tp_decode": (["--layers", "2", "--hidden", "64", "--heads", "4", "--vocab", "128", "--steps", "3",
                   "--iters", "2", "--warmup", "1"], "outputs match"),
}


def _env() -> dict:
    env = dict(os.environ)
    env.update({"CUDA_VISIBLE_DEVICES": "", "SYMMTRITON_BACKEND": "host", "TRITON_INTERPRET": "1",
                "OMP_NUM_THREADS": "1", EXIT_MARK_ENV: "1"})
    return env


def _run(args, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_every_example_has_a_case():
    found = {p.stem for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")}
    assert found == set(CASES)


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
