"""reduce_scatter_tensor against the pure-torch reference on CPU and GPU pools.

Inputs are rank-tagged small integers, so every sum is exact in bf16, fp16 and fp32."""

import dataclasses

import pytest
import torch
import torch.distributed as dist

import symmtriton as st
from symmtriton import env
from symmtriton.config import push_eligible
from symmtriton.context import Ctx
from symmtriton.kernels.reduce_scatter import _reduce_scatter_push_kernel
from symmtriton.ops import driver
from symmtriton.tools import reference
from symmtriton.tools.testing import device, protocol, sync, tagged

SIZES = (1, 7, 8, 1000, 4099, 65536 + 5)


def _rs_cases(rank, world, dtype_name, sizes, mode):
    dtype = getattr(torch, dtype_name)
    buf = st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD, size_mb=64)
    failures = []
    for salt, n in enumerate(sizes):
        inp = tagged(world * n, dtype, rank, salt)
        if mode == "zero_copy":
            sym = buf.maybe_get_tensor((world * n,), dtype)["tensor"]
            sym.copy_(inp)
            inp = sym
        out = torch.full((n,), 99, dtype=dtype, device=device())
        if mode == "output_in_buffer":
            out = buf.maybe_get_tensor((n,), dtype)["tensor"]
        res = st.reduce_scatter_tensor(out, inp)
        sync()
        ref = reference.reduce_scatter([tagged(world * n, dtype, r, salt) for r in range(world)],
                                       rank)
        if res is not out or not torch.equal(out, ref):
            failures.append((n, mode))
    return failures


@pytest.mark.parametrize("dtype", ["bfloat16", pytest.param("float16", marks=pytest.mark.w3_full),
                                   pytest.param("float32", marks=pytest.mark.w3_full)])
@pytest.mark.parametrize("mode", ["staged", "zero_copy"])
def test_reduce_scatter_exact(pool, dtype, mode):
    assert pool.run(_rs_cases, dtype, SIZES, mode) == [[]] * pool.world_size


@pytest.mark.w3_full
def test_reduce_scatter_output_in_buffer_does_not_clobber_staging(pool):
    assert pool.run(_rs_cases, "bfloat16", SIZES, "output_in_buffer") == [[]] * pool.world_size


@pytest.mark.w3_full
def test_reduce_scatter_large(pool):
    sizes = (1 << 20, (1 << 20) + 3)
    assert pool.run(_rs_cases, "bfloat16", sizes, "zero_copy") == [[]] * pool.world_size


def _rs_multi_dim(rank, world):
    x = tagged(world * 3 * 5, torch.float32, rank).view(world * 3, 5)
    out = torch.empty(3, 5, device=device())
    st.reduce_scatter_tensor(out, x)
    sync()
    ref = reference.reduce_scatter(
        [tagged(world * 15, torch.float32, r).view(world * 3, 5) for r in range(world)], rank)
    return torch.equal(out, ref)


def test_reduce_scatter_multi_dim(pool):
    assert pool.run(_rs_multi_dim) == [True] * pool.world_size


def _rs_fallback(rank, world):
    st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD, size_mb=1)
    n = (1 << 18) // world + 5  # world * n fp32 > 1 MiB
    out = torch.empty(n, device=device())
    st.reduce_scatter_tensor(out, tagged(world * n, torch.float32, rank))
    sync()
    return torch.equal(out, reference.reduce_scatter(
        [tagged(world * n, torch.float32, r) for r in range(world)], rank))


def test_reduce_scatter_falls_back_when_buffer_too_small(pool):
    assert pool.run(_rs_fallback) == [True] * pool.world_size


def _rs_push_cases(rank, world, mode):
    """The push kernel (``$SYMMTRITON_PROTOCOL=push``) on a buffer whose bytes past the operands
    (receive area, flags) hold garbage first: tails, unaligned sizes, several chunks per block
    (a forced 3-block grid), and the same call twice with new data."""
    buf = st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD, size_mb=64)
    buf.symm_buffer.fill_(0x7F)  # flags left over from other uses must not pass for this call's
    sync()
    few_blocks = st.LaunchConfig(block_size=64, num_warps=1, max_blocks=3)
    failures = []
    with protocol("push"):
        for salt, (n, dtype, cfg) in enumerate(((7, torch.bfloat16, None),
                                                (1000, torch.float32, few_blocks),
                                                (4099, torch.bfloat16, None),
                                                (1000, torch.float32, few_blocks))):
            inp = tagged(world * n, dtype, rank, salt)
            if mode == "zero_copy":
                inp = buf.maybe_get_tensor((world * n,), dtype)["tensor"].copy_(inp)
            out = torch.full((n,), 99, dtype=dtype, device=device())
            st.reduce_scatter_tensor(out, inp, config=cfg)
            sync()
            if driver.last_plan().kernel.fn is not _reduce_scatter_push_kernel:
                failures.append((n, "not pushed"))
            ref = reference.reduce_scatter(
                [tagged(world * n, dtype, r, salt) for r in range(world)], rank)
            if not torch.equal(out, ref):
                failures.append((n, mode))
    return failures


@pytest.mark.parametrize("mode", ["staged", "zero_copy"])
def test_reduce_scatter_push_exact(pool, mode):
    assert pool.run(_rs_push_cases, mode) == [[]] * pool.world_size


def test_auto_pushes_staged_slices_from_512k_and_zero_copy_from_32m(monkeypatch):
    """context.push_eligible: where ``auto`` pushes (the all-reduce's staged bound is 4 MiB; a
    zero-copy input from 4 MiB beyond 2 ranks), and what ``push`` / ``barrier`` / ``lines`` /
    multicast / one rank change."""
    ctx = Ctx(None, 0, 2, 0, 0, 0, 0, 1, 0, "sys")
    kib, mib, rs = 1 << 10, 1 << 20, "reduce_scatter"
    monkeypatch.delenv(env.PROTOCOL, raising=False)
    assert [push_eligible(ctx, rs, b, False, True) for b in (511 * kib, 512 * kib)] == [False, True]
    assert [push_eligible(ctx, rs, b, False, False) for b in (31 * mib, 32 * mib)] == [False, True]
    assert [push_eligible(ctx, "all_reduce", b, False, True)
            for b in (4 * mib - 2, 4 * mib)] == [False, True]
    wide = dataclasses.replace(ctx, world=4)
    assert [push_eligible(wide, rs, b, False, False) for b in (4 * mib - 2, 4 * mib)] == [
        False, True]
    assert not push_eligible(ctx, rs, 64 * mib, True, True)  # multimem pulls
    assert not push_eligible(dataclasses.replace(ctx, world=1), rs, 64 * mib, False, True)
    monkeypatch.setenv(env.PROTOCOL, "push")
    assert push_eligible(ctx, rs, 16, False, False)
    for mode in ("barrier", "lines"):
        monkeypatch.setenv(env.PROTOCOL, mode)
        assert not push_eligible(ctx, rs, 64 * mib, False, True)
