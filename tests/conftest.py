"""Shared fixtures: one persistent worker pool per world (see symmtriton.tools.testing).

Worlds (``pool`` runs a test on each; ``gpu_pool`` on the GPU ones only):

* ``cpu-w2``, ``cpu-w3``, ``cpu-w4``: host backend, Triton interpreter, gloo group. ``cpu-w4``
  is marked ``full`` (the extended matrix CI runs after README's test command); so is ``cpu-w3``
  of a test marked ``w3_full`` (at test or at parameter level), for tests whose W = 3 case adds
  nothing to another default-tier test's W = 3 case of the same kernel and protocol.
* ``gpu-w2-nccl``, ``gpu-w2-gloo`` (and ``gpu-w4-*``, ``gpu-w8-*``): two (four, eight) ranks,
  one per GPU, with an NCCL and with a gloo group; generated only when that many GPUs are visible
  at collection time.
* ``gpu-w2-shared``, ``gpu-w4-shared``, ``gpu-w8-shared``: 2, 4 and 8 ranks on GPU 0 with a
  gloo group (NCCL refuses several ranks per GPU); start MPS for them, or the ranks
  time-slice the GPU (benchmarks/gpu_run.sh does).

GPU worlds are marked ``gpu`` (``pytest -m gpu``) and skipped without CUDA.
"""

import os
import sys
import threading
import time
from typing import NamedTuple

import pytest
import torch

from symmtriton.tools.testing import CPU_ENV, EXIT_MARK_ENV, GPU_ENV, GPU_PER_RANK_ENV, WorkerPool

CPU_WORLD_SIZES = (2, 3, 4)
#: CPU worlds of the extended matrix only (``-m full``); a pool starts on its first test
FULL_CPU_WORLD_SIZES = (4,)
SHARED_GPU_WORLD_SIZES = (2, 4, 8)
PER_GPU_WORLD_SIZES = (2, 4, 8)
PER_GPU_BACKENDS = ("nccl", "gloo")


class PoolSpec(NamedTuple):
    kind: str  #: "cpu" or "gpu"
    world_size: int
    dist_backend: str = "gloo"
    one_rank_per_gpu: bool = False

    @property
    def id(self) -> str:
        if self.kind == "cpu":
            return f"cpu-w{self.world_size}"
        return f"gpu-w{self.world_size}-{self.dist_backend if self.one_rank_per_gpu else 'shared'}"

    @property
    def env(self) -> dict:
        if self.kind == "cpu":
            return CPU_ENV
        return GPU_PER_RANK_ENV if self.one_rank_per_gpu else GPU_ENV


def gpu_specs() -> list:
    """The GPU worlds this machine runs (decided from the GPUs visible at collection time)."""
    gpus = torch.cuda.device_count()
    specs = [PoolSpec("gpu", w, backend, True) for w in PER_GPU_WORLD_SIZES if gpus >= w
             for backend in PER_GPU_BACKENDS]
    return specs + [PoolSpec("gpu", w) for w in SHARED_GPU_WORLD_SIZES]


_POOLS: dict = {}
_CLOSE_TIMES: list = []


def _pool(spec: PoolSpec) -> WorkerPool:
    if spec not in _POOLS:
        _POOLS[spec] = WorkerPool(spec.world_size, env=spec.env,
                                  timeout=float(os.environ.get("SYMMTRITON_TEST_TIMEOUT", 120)),
                                  dist_backend=spec.dist_backend,
                                  one_rank_per_gpu=spec.one_rank_per_gpu)
    return _POOLS[spec]


@pytest.fixture(scope="session")
def cpu_pool():
    """``cpu_pool(world_size)``: a pool of CPU workers (host backend, Triton interpreter)."""
    return lambda world_size: _pool(PoolSpec("cpu", world_size))


def _cpu_world(item):
    """The CPU world size ``item`` runs on through ``pool``, or None."""
    spec = getattr(item, "callspec", None) and item.callspec.params.get("pool_spec")
    return spec.world_size if spec and spec.kind == "cpu" else None


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marks
def pytest_collection_modifyitems(config, items):
    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("w3_full") and _cpu_world(item) == 3:
            item.add_marker(pytest.mark.full)
        if skip and "gpu" in item.keywords:
            item.add_marker(skip)


def _marks(spec: PoolSpec):
    if spec.kind == "gpu":
        return pytest.mark.gpu
    return pytest.mark.full if spec.world_size in FULL_CPU_WORLD_SIZES else ()


def _params(specs) -> list:
    return [pytest.param(s, id=s.id, marks=_marks(s)) for s in specs]


def pytest_generate_tests(metafunc):
    """``pool`` runs a test on every world of the module docstring; ``gpu_pool`` on the GPU
    worlds only. Use the ``cpu_pool`` fixture for CPU-only tests."""
    if "pool_spec" in metafunc.fixturenames:
        cpu = [PoolSpec("cpu", w) for w in CPU_WORLD_SIZES]
        metafunc.parametrize("pool_spec", _params(cpu + gpu_specs()))
    if "gpu_pool_spec" in metafunc.fixturenames:
        metafunc.parametrize("gpu_pool_spec", _params(gpu_specs()))


def _checked(spec: PoolSpec) -> WorkerPool:
    if spec.kind == "gpu" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return _pool(spec)


@pytest.fixture
def pool(pool_spec):
    return _checked(pool_spec)


@pytest.fixture
def gpu_pool(gpu_pool_spec):
    return _checked(gpu_pool_spec)


def _close(spec: PoolSpec) -> None:
    t0 = time.monotonic()
    _POOLS[spec].close()
    _CLOSE_TIMES.append((spec.id, time.monotonic() - t0))


def pytest_sessionfinish(session, exitstatus):
    """Close every pool (each worker runs symmtriton.tools.testing.teardown), all at once, and
    time it."""
    if os.environ.get(EXIT_MARK_ENV):
        print(f"symmtriton-exit-mark {time.time():.3f}", file=sys.__stderr__, flush=True)
    t0 = time.monotonic()
    closers = [threading.Thread(target=_close, args=(spec,)) for spec in _POOLS]
    for t in closers:
        t.start()
    for t in closers:
        t.join()
    _CLOSE_TIMES.append(("all", time.monotonic() - t0))


def pytest_terminal_summary(terminalreporter):
    if len(_CLOSE_TIMES) > 1:
        *pools, (_, wall) = _CLOSE_TIMES
        slowest = max(pools, key=lambda x: x[1])
        terminalreporter.write_line(f"worker pools closed: {len(pools)} in {wall:.1f} s "
                                    f"(slowest {slowest[0]} {slowest[1]:.1f} s)")


#: compile-tier workers: no interpreter, so Triton compiles for a GPU target with its bundled ptxas.
COMPILE_ENV = {"TRITON_INTERPRET": "0", "SYMMTRITON_BACKEND": "host", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="session")
def compiler():
    """One worker that compiles kernels for sm_90 / sm_100 (tests/test_compile*.py)."""
    pool = WorkerPool(1, env=COMPILE_ENV, timeout=600)
    yield pool
    pool.close()
