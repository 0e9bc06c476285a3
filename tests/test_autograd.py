"""Autograd: every collective that writes a tensor in place (all_reduce without ``out``, the
outputs, the fused ops' ``residual``) bumps its version counter as torch's in-place ops do, so a
backward that saved the tensor raises instead of silently using the new values; on the kernel
path as on the torch.distributed fallback."""

import pytest
import torch
import torch.distributed as dist

import symmtriton as st
from symmtriton.tools.testing import device

from helpers import buffer_without_symmetric_memory

STALE = "modified by an inplace operation"


def _backward_after(write, saved: torch.Tensor) -> str:
    """Save ``saved`` for backward (``(w * saved).sum()``), let ``write`` modify it, then run
    backward: the error's text, or what went wrong."""
    w = torch.ones(saved.shape, dtype=saved.dtype, device=saved.device, requires_grad=True)
    loss = (w * saved).sum()
    version = saved._version
    write()
    if saved._version == version:
        return "version not bumped"
    try:
        loss.backward()
        return "backward used the new values"
    except RuntimeError as exc:
        return STALE if STALE in str(exc) else str(exc)


def _saved_tensors(rank, world, fallback):
    if fallback:
        buffer_without_symmetric_memory("tp")
    else:
        st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD, size_mb=1)
    d = device()
    S, H = 2 * world, 8
    x, w = torch.ones(S, H, device=d), torch.ones(H, device=d)
    res, res_ar = torch.zeros(S // world, H, device=d), torch.zeros(S, H, device=d)
    t, out = torch.ones(16, device=d), torch.empty(16, device=d)
    out_rs, out_ag = torch.empty(S // world, H, device=d), torch.empty(S, H, device=d)
    counts = torch.ones(world, dtype=torch.int32, device=d)
    cases = {
        "all_reduce in place": (lambda: st.all_reduce(t), t),
        "all_reduce out": (lambda: st.all_reduce(x[0], out=out[:H]), out),
        "all_gather output": (lambda: st.all_gather_into_tensor(out_ag, x[:2]), out_ag),
        "reduce_scatter output": (lambda: st.reduce_scatter_tensor(out_rs, x), out_rs),
        "fused residual": (lambda: st.reduce_scatter_add_rmsnorm_all_gather(x, res, w), res),
        "fused out": (lambda: st.reduce_scatter_add_rmsnorm(x, res, w, out=out_rs), out_rs),
        "all_reduce_add_rmsnorm residual": (lambda: st.all_reduce_add_rmsnorm(x, res_ar, w),
                                            res_ar),
        "all_gather_v output": (lambda: st.all_gather_v(out_ag, x, counts), out_ag),
        "reduce_scatter_v output": (lambda: st.reduce_scatter_v(out_rs, x, counts), out_rs),
    }
    results = {name: _backward_after(write, saved) for name, (write, saved) in cases.items()}
    with torch.inference_mode():  # no version counters there: nothing to bump, no error
        ti = torch.ones(16, device=d)
        results["inference tensor"] = st.all_reduce(ti)[0].item() == world and STALE
    return results


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("fallback", [False, True], ids=["kernel", "fallback"])
def test_writes_bump_versions_so_backward_raises(cpu_pool, world, fallback):
    for res in cpu_pool(world).run(_saved_tensors, fallback):
        assert {k: v for k, v in res.items() if v != STALE} == {}
