"""Every script in benchmarks/ imports and answers ``--help`` on the CPU (most need GPUs to
really run), so a script broken by a change elsewhere fails here; the ones that run on the CPU
host backend run once in the extended tier."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from symmtriton.tools.testing import CPU_ENV

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))


#: runs each script given with ``--help`` in this one process (one torch import for all) and
#: prints {script: [exit code or the exception, stdout]} as JSON
HELP_ALL = """
import contextlib, io, json, runpy, sys
got = {}
for path in sys.argv[1:]:
    sys.argv, out, code = [path, "--help"], io.StringIO(), None
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(path, run_name="__main__")
    except SystemExit as exc:
        code = exc.code
    except BaseException as exc:
        code = repr(exc)
    got[path] = [code, out.getvalue()]
print(json.dumps(got))
"""


def _run(args, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, **CPU_ENV, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def helps() -> dict:
    r = _run(["-c", HELP_ALL, *map(str, SCRIPTS)], timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.splitlines()[-1])


def test_there_are_scripts():
    assert {p.name for p in SCRIPTS} >= {"barrier_probe.py", "host_path.py"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_answers_help(script, helps):
    code, out = helps[str(script)]
    assert code in (0, None), code
    assert out.startswith("usage:"), out


def test_gpu_run_names_only_existing_scripts():
    text = (ROOT / "benchmarks" / "gpu_run.sh").read_text()
    for word in text.split():
        if word.startswith("benchmarks/") and word.endswith((".py", ".sh")):
            assert (ROOT / word).exists(), word


@pytest.mark.full
@pytest.mark.parametrize("args", [
    ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
     "benchmarks/barrier_probe.py", "--sizes", "1K", "--protocols", "lines,barrier",
     "--ops", "all_gather", "--iters", "1", "--warmup", "0"],
    ["benchmarks/host_path.py", "--calls", "2", "--repeats", "1", "--ops", "all_reduce"],
], ids=["barrier_probe", "host_path"])
def test_script_runs_on_two_cpu_ranks(args):
    r = _run(args, timeout=600)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr[-4000:]}"
    assert "W=2" in r.stdout and "cpu" in r.stdout, r.stdout
