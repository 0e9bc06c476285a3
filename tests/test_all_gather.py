"""all_gather_into_tensor against the pure-torch reference, bit-exact, on CPU and GPU pools."""

import pytest
import torch
import torch.distributed as dist

import symmtriton as st
from symmtriton.config import LaunchConfig
from symmtriton.tools import reference
from symmtriton.tools.testing import device, protocol, sync

from helpers import random_bits

SIZES = (1, 7, 8, 1000, 4099, 65536 + 5)
DTYPES = ("bfloat16", "float16", "float32", "uint8", "int64")


def _gather_cases(rank, world, dtype_name, sizes, mode):
    dtype = getattr(torch, dtype_name)
    buf = st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD, size_mb=64)
    failures = []
    for salt, n in enumerate(sizes):
        inp = random_bits(n, dtype, rank, salt)
        if mode == "zero_copy":
            out = buf.maybe_get_tensor((world * n,), dtype)["tensor"]
        else:
            out = (torch.full((world * n,), 3, dtype=dtype, device=device())
                   if dtype != torch.float16
                   else torch.empty((world * n,), dtype=dtype, device=device()))
        if mode == "in_place":
            out[rank * n:(rank + 1) * n].copy_(inp)
            inp = out[rank * n:(rank + 1) * n]
        if mode == "input_in_buffer":
            staged = buf.maybe_get_tensor((n,), dtype)["tensor"]
            staged.copy_(inp)
            inp = staged
        res = st.all_gather_into_tensor(out, inp)
        sync()
        ref = reference.all_gather([random_bits(n, dtype, r, salt) for r in range(world)])
        if res is not out or not torch.equal(out.view(torch.uint8), ref.view(torch.uint8)):
            failures.append((n, mode))
    return failures


@pytest.mark.parametrize("dtype", [  # float16: bfloat16's element size, bits copied alike
    pytest.param(d, marks=pytest.mark.full if d == "float16" else pytest.mark.w3_full)
    if d in ("float16", "float32", "int64") else d for d in DTYPES])
def test_all_gather_staged_bit_exact(pool, dtype):
    assert pool.run(_gather_cases, dtype, SIZES, "staged") == [[]] * pool.world_size


@pytest.mark.parametrize("mode", ["zero_copy", pytest.param("in_place", marks=pytest.mark.w3_full),
                                  pytest.param("input_in_buffer", marks=pytest.mark.w3_full)])
def test_all_gather_buffer_placements(pool, mode):
    assert pool.run(_gather_cases, "bfloat16", SIZES, mode) == [[]] * pool.world_size


@pytest.mark.w3_full
def test_all_gather_large(pool):
    sizes = (1 << 20, (1 << 20) + 3)
    assert pool.run(_gather_cases, "bfloat16", sizes, "staged") == [[]] * pool.world_size


def _shapes(rank, world):
    x = random_bits(3 * 5, torch.float32, rank).view(3, 5)
    cat = torch.empty(world * 3, 5, device=device())
    stacked = torch.empty(world, 3, 5, device=device())
    st.all_gather_into_tensor(cat, x)
    st.all_gather_into_tensor(stacked, x)
    sync()
    ref = reference.all_gather([random_bits(15, torch.float32, r).view(3, 5) for r in range(world)])
    return (torch.equal(cat.view(torch.int32), ref.view(torch.int32)),
            torch.equal(stacked.view(-1).view(torch.int32), ref.view(-1).view(torch.int32)))


def test_all_gather_multi_dim_and_stacked_output(pool):
    assert pool.run(_shapes) == [(True, True)] * pool.world_size


def _back_to_back(rank, world):
    """Many collectives on one scratch area with no host synchronisation in between: none may
    overwrite data a peer is still reading."""
    buf = st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD, size_mb=8)
    bad = []
    for it in range(6):
        n = 1000 + 37 * it
        out = buf.maybe_get_tensor((world * n,), torch.float32)["tensor"]  # same bytes each time
        st.all_gather_into_tensor(out, torch.full((n,), float(100 * it + rank), device=device()))
        got = out.view(world, n).clone()
        rs_in = buf.maybe_get_tensor((world * n,), torch.float32)["tensor"]
        rs_in.copy_(torch.arange(world * n, dtype=torch.float32, device=device()) % 11 + rank)
        rs_out = torch.empty(n, device=device())
        st.reduce_scatter_tensor(rs_out, rs_in)
        sync()
        expect_ag = torch.tensor([[100.0 * it + r] * n for r in range(world)], device=device())
        full = ((torch.arange(world * n, dtype=torch.float32, device=device()) % 11) * world
                + sum(range(world)))
        if (not torch.equal(got, expect_ag)
                or not torch.equal(rs_out, full[rank * n:(rank + 1) * n])):
            bad.append(it)
    return bad


@pytest.mark.w3_full
def test_back_to_back_reuse_of_one_scratch_area(pool):
    assert pool.run(_back_to_back) == [[]] * pool.world_size


def _unit_differs_by_rank(rank, world, tuned):
    """Rank 0's input starts 2 bytes past a 4-byte boundary, so it copies in 16-bit units where
    the other ranks copy 32-bit words: every rank must still launch the same grid (the barrier is
    per block), under a forced config and under the default."""
    n = 1000

    def shard(r):  # rank 0's starts one bf16 element into its allocation
        bits = random_bits(n + 1, torch.bfloat16, r)
        return bits[1:] if r == 0 else bits[:n]

    inp = shard(rank)
    out = torch.empty(world * n, dtype=torch.bfloat16, device=device())
    config = LaunchConfig(256, 1, 264) if tuned else None
    with protocol("barrier"):
        st.all_gather_into_tensor(out, inp, config=config, timeout_s=20)
        st.synchronize()
    ref = reference.all_gather([shard(r) for r in range(world)])
    return torch.equal(out.view(torch.int16), ref.view(torch.int16))


@pytest.mark.parametrize("tuned", [True, False], ids=["forced_config", "default"])
def test_ranks_copying_in_different_units_launch_one_grid(pool, tuned):
    assert pool.run(_unit_differs_by_rank, tuned) == [True] * pool.world_size


def _fallback(rank, world, why):
    if why == "disabled":
        import os

        os.environ["SYMMTRITON_DISABLE"] = "1"
        try:
            buf = st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD)
        finally:
            os.environ.pop("SYMMTRITON_DISABLE")
        assert buf.symm_mem_hdl is None
    else:  # too small: 1 MiB buffer, 2 MiB output
        st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD, size_mb=1)
    n = (1 << 19) // world + 3
    inp = random_bits(n, torch.float32, rank)
    out = torch.empty(world * n, device=device())
    st.all_gather_into_tensor(out, inp)
    sync()
    ref = reference.all_gather([random_bits(n, torch.float32, r) for r in range(world)])
    return torch.equal(out.view(torch.int32), ref.view(torch.int32))


@pytest.mark.parametrize("why", ["disabled", "too_small"])
def test_all_gather_falls_back_to_torch_distributed(pool, why):
    assert pool.run(_fallback, why) == [True] * pool.world_size
