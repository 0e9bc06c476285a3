"""A late peer on the barrier-free path (kernels/lines.py): the ranks that gave up on a call and
the rank that came late agree that the call failed. Every op with a lines kernel; the late rank
pushes its lines after the others' deadline, finds the poisoned lines they left in its area, and
raises at the same call (the late rank calls only after the others' calls returned)."""

import pytest
import torch
import torch.distributed as dist

import symmtriton as st
from symmtriton.ops import driver
from symmtriton.kernels.all_gather import _all_gather_lines_kernel
from symmtriton.kernels.all_reduce import _all_reduce_lines_kernel
from symmtriton.kernels.all_reduce_rmsnorm import _all_reduce_rmsnorm_lines_kernel
from symmtriton.kernels.fused_rmsnorm import _fused_rmsnorm_lines_kernel
from symmtriton.kernels.reduce_scatter import _reduce_scatter_lines_kernel
from symmtriton.tools.testing import device, protocol, tagged

LINES_KERNELS = (_all_gather_lines_kernel, _reduce_scatter_lines_kernel, _all_reduce_lines_kernel,
                 _all_reduce_rmsnorm_lines_kernel, _fused_rmsnorm_lines_kernel)

TIMEOUT_S = 1.0


def _call(op, rank, world):
    """One small call of ``op`` (a lines kernel under ``$SYMMTRITON_PROTOCOL=lines``)."""
    dev, bf16, S, H = device(), torch.bfloat16, 2, 64
    if op == "all_reduce":
        return st.all_reduce(tagged(256, bf16, rank), timeout_s=TIMEOUT_S)
    if op == "all_gather":
        out = torch.empty(world * 256, dtype=bf16, device=dev)
        return st.all_gather_into_tensor(out, tagged(256, bf16, rank), timeout_s=TIMEOUT_S)
    if op == "reduce_scatter":
        out = torch.empty(256, dtype=bf16, device=dev)
        return st.reduce_scatter_tensor(out, tagged(world * 256, bf16, rank), timeout_s=TIMEOUT_S)
    weight = torch.ones(H, dtype=bf16, device=dev)
    if op == "all_reduce_add_rmsnorm":
        x, res = tagged(S * H, bf16, rank).view(S, H), tagged(S * H, bf16, 0).view(S, H)
        return st.all_reduce_add_rmsnorm(x, res, weight, timeout_s=TIMEOUT_S)
    x, res = tagged(world * S * H, bf16, rank).view(world * S, H), tagged(S * H, bf16, 0).view(S, H)
    return st.reduce_scatter_add_rmsnorm_all_gather(x, res, weight, timeout_s=TIMEOUT_S)


def _attempt(op, rank, world) -> str:
    """This rank's outcome of one call: ``"ok"``, ``"timeout"`` (waited for a rank past the
    deadline), ``"gave up"`` (a peer gave up on the call) or ``"mismatch"``."""
    try:
        _call(op, rank, world)
        st.synchronize()
        return "ok"
    except st.CollectiveMismatchError:
        return "mismatch"
    except st.CollectiveTimeoutError as e:
        return "gave up" if "gave up" in str(e) else "timeout"


def _late_call(rank, world, op):
    """Rank ``world - 1`` calls ``op`` only after the others' call returned (a host barrier
    between), so they wait past their deadline; returns this rank's outcome and whether a lines
    kernel ran."""
    buf = st.SymmetricMemoryManager.get_buffer("late", dist.group.WORLD, size_mb=1)
    with protocol("lines"):
        _call(op, rank, world)  # in step: one good call first
        st.synchronize()
        dist.barrier()
        if rank == world - 1:
            dist.barrier()  # the others are done with the call
            outcome = _attempt(op, rank, world)
        else:
            outcome = _attempt(op, rank, world)
            dist.barrier()
        lines = driver.last_plan().kernel.fn in LINES_KERNELS
    dist.barrier()
    if buf.device.type == "cuda":
        torch.cuda.synchronize()
    st.SymmetricMemoryManager.destroy("late")
    return outcome, lines


OPS = ["all_reduce", "all_gather", "reduce_scatter", "all_reduce_add_rmsnorm",
       "reduce_scatter_add_rmsnorm_all_gather"]


@pytest.mark.parametrize("op", [pytest.param(op, marks=() if op == "all_reduce" else
                                             pytest.mark.full) for op in OPS])
def test_late_peer_fails_the_same_call(pool, op):
    """The ranks on time fail the call (a timeout, or, beyond 2 ranks, the poison of an on-time
    peer that gave up first: the error names whichever a block saw); the late rank's call fails
    too, naming the peers that gave up, never returning as a success."""
    results = pool.run(_late_call, op)
    assert all(lines for _, lines in results)
    outcomes = [outcome for outcome, _ in results]
    assert set(outcomes[:-1]) <= {"timeout", "gave up"}, outcomes
    assert outcomes[-1] == "gave up", outcomes
