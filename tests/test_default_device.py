"""A default device set by the user (``torch.set_default_device``) changes nothing: every
allocation symmtriton makes names its device.

On the CPU tier a ``meta`` default stands in for the ``cuda`` one many inference engines set (a
factory call that omits ``device=`` lands on the wrong device either way; on ``meta`` it fails
at once). The default is set before the buffer is created and before every collective, and the
same calls must still work once it is reset."""

import os

import pytest
import torch
import torch.distributed as dist

import symmtriton as st
from symmtriton.tools import reference
from symmtriton.tools.testing import device, sync, tagged

from helpers import random_bits

M = st.SymmetricMemoryManager


def _collectives(rank, world, dev, salt):
    """All-gather (staged, zero-copy), reduce-scatter (staged, zero-copy) and both fused ops
    on the buffer ``"dd"`` (staged only when it is unavailable: the torch.distributed fallback);
    the number of results that differ from the reference (exact; the normed rows to fp32
    rounding)."""
    buf = M.get_buffer("dd")
    bad = 0
    n, s, H = 37, 2, 40
    x = random_bits(n, torch.bfloat16, rank, salt)
    ag_ref = reference.all_gather([random_bits(n, torch.bfloat16, r, salt) for r in range(world)])
    staged = torch.empty(world * n, dtype=torch.bfloat16, device=dev)
    zero_copy = buf.maybe_get_tensor((world * n,), torch.bfloat16)["tensor"]
    for out in (staged, zero_copy) if zero_copy is not None else (staged,):
        st.all_gather_into_tensor(out, x)
        sync()
        bad += not torch.equal(out.view(torch.uint8), ag_ref.view(torch.uint8))
    inputs = [tagged(world * n, torch.float32, r, salt) for r in range(world)]
    rs_ref = reference.reduce_scatter(inputs, rank)
    sym = buf.maybe_get_tensor((world * n,), torch.float32)["tensor"]
    if sym is not None:
        sym.copy_(inputs[rank])
    for inp in (inputs[rank], sym) if sym is not None else (inputs[rank],):
        out = torch.empty(n, dtype=torch.float32, device=dev)
        st.reduce_scatter_tensor(out, inp)
        sync()
        bad += not torch.equal(out, rs_ref)
    rows = [tagged(world * s * H, torch.float32, r, salt).view(world * s, H) for r in range(world)]
    weight = torch.ones(H, dtype=torch.float32, device=dev)
    res0 = tagged(s * H, torch.float32, rank, salt + 1, bound=2).view(s, H)
    normed, new_res = reference.reduce_scatter_add_rmsnorm(rows, res0, weight, 1e-6, rank)
    gathered = torch.cat([reference.reduce_scatter_add_rmsnorm(rows, tagged(
        s * H, torch.float32, r, salt + 1, bound=2).view(s, H), weight, 1e-6, r)[0]
        for r in range(world)])
    for fn, expect in ((st.reduce_scatter_add_rmsnorm, normed),
                       (st.reduce_scatter_add_rmsnorm_all_gather, gathered)):
        residual = res0.clone()
        got = fn(rows[rank], residual, weight)
        sync()
        bad += not torch.equal(residual, new_res)  # the residual is a sum of integers: exact
        bad += got.device != dev or not torch.allclose(got, expect, rtol=1e-5, atol=1e-5)
    return bad


def _under_default_device(rank, world, default, disabled=False):
    dev = device()
    if disabled:
        os.environ["SYMMTRITON_DISABLE"] = "1"
    torch.set_default_device(default)
    try:
        buf = M.get_buffer("dd", dist.group.WORLD, size_mb=1)
        created = (buf.init_failure_reason is None,
                   buf.symm_buffer is not None and buf.symm_buffer.device == dev,
                   buf.status is not None and buf.status.device.type)
        bad_under = _collectives(rank, world, dev, 0)
        stray = torch.empty(1).device.type  # the default is still in force here
    finally:
        torch.set_default_device(None)
        os.environ.pop("SYMMTRITON_DISABLE", None)
    bad_after = _collectives(rank, world, dev, 1)  # nothing created under the default lingers
    return created, bad_under, bad_after, stray


def test_meta_default_device_changes_nothing(cpu_pool):
    for created, bad_under, bad_after, stray in cpu_pool(2).run(_under_default_device, "meta"):
        assert created == (True, True, "cpu")
        assert (bad_under, bad_after, stray) == (0, 0, "meta")


def test_meta_default_device_with_the_torch_fallback(cpu_pool):
    results = cpu_pool(2).run(_under_default_device, "meta", True)
    for created, bad_under, bad_after, stray in results:
        assert created == (False, False, False)
        assert (bad_under, bad_after, stray) == (0, 0, "meta")


@pytest.mark.gpu
def test_cuda_default_device_changes_nothing(gpu_pool):
    """The default device once broke the buffer: ``pin_memory`` of the status word raised."""
    for created, bad_under, bad_after, stray in gpu_pool.run(_under_default_device, "cuda"):
        assert created == (True, True, "cpu")
        assert (bad_under, bad_after, stray) == (0, 0, "cuda")
