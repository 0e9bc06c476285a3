"""Shared fixtures: one persistent worker pool per world size (see symmtriton.testing)."""

import os

import pytest
import torch

from symmtriton.testing import CPU_ENV, GPU_ENV, WorkerPool

_POOLS: dict = {}


@pytest.fixture(scope="session")
def gpu_pool():
    """``gpu_pool(world_size)``: workers sharing the visible GPUs (cuda backend)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return lambda world_size: _pool(world_size, GPU_ENV)


def _pool(world_size: int, env: dict) -> WorkerPool:
    key = (world_size, tuple(sorted(env.items())))
    if key not in _POOLS:
        _POOLS[key] = WorkerPool(world_size, env=env, timeout=float(os.environ.get("SYMMTRITON_TEST_TIMEOUT", 120)))
    return _POOLS[key]


@pytest.fixture(scope="session")
def cpu_pool():
    """``cpu_pool(world_size)``: a pool of CPU workers (host backend, Triton interpreter)."""
    return lambda world_size: _pool(world_size, CPU_ENV)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


CPU_WORLD_SIZES = (2, 3, 4)
GPU_WORLD_SIZES = (2, 4, 8)


def pytest_generate_tests(metafunc):
    """``pool`` runs a test on CPU pools of 2, 3 and 4 ranks and, marked ``gpu``, on GPU pools
    of 2, 4 and 8 ranks sharing the visible GPUs. Use the ``cpu_pool`` fixture for CPU-only tests."""
    if "pool_spec" in metafunc.fixturenames:
        params = [pytest.param(("cpu", w), id=f"cpu-w{w}") for w in CPU_WORLD_SIZES]
        params += [pytest.param(("gpu", w), id=f"gpu-w{w}", marks=pytest.mark.gpu) for w in GPU_WORLD_SIZES]
        metafunc.parametrize("pool_spec", params)


@pytest.fixture
def pool(pool_spec):
    kind, world_size = pool_spec
    if kind == "gpu" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return _pool(world_size, CPU_ENV if kind == "cpu" else GPU_ENV)


def pytest_sessionfinish(session, exitstatus):
    for p in _POOLS.values():
        p.close()
