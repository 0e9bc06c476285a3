"""Benchmark and tuning workloads (a tool, for :mod:`symmtriton.bench` and :mod:`symmtriton.tuner`):
one collective's operands on this rank, filled with rank-tagged data
(:func:`symmtriton.testing.tagged`), the call that runs it and the exact reference
(:mod:`symmtriton.reference`) it must match. Ops are named by their config name
(:data:`symmtriton.config.OPS`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import reference
from .config import OPS, LaunchConfig, check_dtype, check_hidden, check_op
from .context import find_buffer
from .memory import resolve_group
from .ops.all_gather import all_gather_into_tensor
from .ops.fused import reduce_scatter_add_rmsnorm_all_gather
from .ops.reduce_scatter import reduce_scatter_tensor
from .testing import device, sync, tagged
from .validation import check_count

__all__ = ["OPS", "PLACEMENTS", "FUSED_EPS", "Workload", "make_workload"]
#: where tensors of each op's operands may be placed (see :class:`Workload`).
PLACEMENTS = ("zero_copy", "staged")
#: epsilon the fused workload passes to RMSNorm.
FUSED_EPS = 1e-6


@dataclass(frozen=True, eq=False)
class Workload:
    """The operands of one collective on this rank and the call that runs it.

    ``numel`` elements of ``dtype`` per shard: the all-gather input, the reduce-scatter output,
    the fused op's residual (``rows x hidden``; its input is ``[world * rows, hidden]``).
    ``placement``: ``"zero_copy"`` puts the operand that peers access (AG output, RS input, fused
    input) in the group's symmetric buffer (``maybe_get_tensor``, byte 0: the scratch area),
    ``"staged"`` uses ordinary tensors, so the op stages through the buffer. Data are
    rank-tagged (:func:`symmtriton.testing.tagged`) so :meth:`check` compares exactly."""

    op: str
    numel: int
    dtype: torch.dtype
    placement: str
    hidden: int
    group: object
    rank: int
    world: int
    tensors: dict

    @property
    def total_bytes(self) -> int:
        """nccl-tests' size: the gathered output (AG), the full input (RS, fused)."""
        return self.world * self.numel * self.dtype.itemsize

    def reset(self) -> None:
        """Refill the inputs with their tagged values (the fused op updates its residual, and
        the zero-copy operand is a scratch area other calls may have overwritten)."""
        t = self.tensors
        if self.op == "all_gather":
            t["input"].copy_(tagged(self.numel, self.dtype, self.rank))
        else:
            t["input"].view(-1).copy_(tagged(self.world * self.numel, self.dtype, self.rank))
        if self.op == "fused":
            t["residual"].view(-1).copy_(tagged(self.numel, self.dtype, self.rank, salt=1))

    def run(self, config: LaunchConfig | None = None):
        """One call of the op (``config`` forces the launch config)."""
        t = self.tensors
        if self.op == "all_gather":
            return all_gather_into_tensor(t["output"], t["input"], self.group, config=config)
        if self.op == "reduce_scatter":
            return reduce_scatter_tensor(t["output"], t["input"], self.group, config=config)
        return reduce_scatter_add_rmsnorm_all_gather(t["input"], t["residual"], t["weight"],
                                                     eps=FUSED_EPS, group=self.group,
                                                     out=t["output"], config=config)

    def expected(self) -> torch.Tensor:
        """The reference result from every rank's tagged inputs (``symmtriton.reference``)."""
        w, n, dt = self.world, self.numel, self.dtype
        if self.op == "all_gather":
            return reference.all_gather([tagged(n, dt, r) for r in range(w)])
        inputs = [tagged(w * n, dt, r) for r in range(w)]
        if self.op == "reduce_scatter":
            return reference.reduce_scatter(inputs, self.rank)
        h = self.hidden
        inputs = [x.view(-1, h) for x in inputs]
        weight = self.tensors["weight"]
        normed = [reference.reduce_scatter_add_rmsnorm(inputs, tagged(n, dt, r, salt=1).view(-1, h),
                                                       weight, FUSED_EPS, r)[0] for r in range(w)]
        return reference.all_gather(normed)

    def check(self, config: LaunchConfig | None = None) -> bool:
        """Reset, run once, synchronise and compare with :meth:`expected` on this rank: bits
        for the all-gather, exact values for the reduce-scatter (tagged sums are exact), a
        1-2 ulp tolerance for the fused op's RMSNorm."""
        self.reset()
        self.run(config)
        sync()
        got, ref = self.tensors["output"], self.expected().to(self.tensors["output"].device)
        if self.op == "all_gather":
            return torch.equal(got.view(-1).view(torch.uint8), ref.view(-1).view(torch.uint8))
        if self.op == "reduce_scatter":
            return torch.equal(got, ref)
        tol = 1e-4 if self.dtype == torch.float32 else 1.0 / 64
        return torch.allclose(got.float().view(-1), ref.float().view(-1), rtol=tol, atol=tol)


def make_workload(op: str, numel: int, dtype: torch.dtype, group=None, *, placement: str = "staged",
                  hidden: int | None = None) -> Workload:
    """Allocate and fill the operands of ``op`` for shards of ``numel`` elements (see
    :class:`Workload`). ``hidden`` (fused only, required there) must divide ``numel``. Raises ``ValueError`` naming the bad value, alike on every rank, when the
    arguments do not fit (including a zero-copy operand that does not fit the buffer)."""
    check_op(op)
    check_dtype(dtype)
    numel = check_count("numel", numel)
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    hidden = check_hidden(op, numel, hidden) or numel
    group = resolve_group(group, "group")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    dev = device()
    big = (world * numel,) if op != "fused" else (world * numel // hidden, hidden)
    placed = None
    if placement == "zero_copy":
        buf = find_buffer(group)
        shape = big if op != "all_gather" else (world * numel,)
        placed = buf.maybe_get_tensor(shape, dtype)["tensor"]
        if placed is None:
            raise ValueError(
                f"placement 'zero_copy': {world * numel} elements of {dtype} do not fit the "
                f"group's symmetric buffer ({buf!r})")
    t: dict = {}
    if op == "all_gather":
        t["input"] = torch.empty(numel, dtype=dtype, device=dev)
        t["output"] = placed if placed is not None else torch.empty(world * numel, dtype=dtype, device=dev)
    elif op == "reduce_scatter":
        t["input"] = placed if placed is not None else torch.empty(big, dtype=dtype, device=dev)
        t["output"] = torch.empty(numel, dtype=dtype, device=dev)
    else:
        t["input"] = placed if placed is not None else torch.empty(big, dtype=dtype, device=dev)
        t["residual"] = torch.empty(numel // hidden, hidden, dtype=dtype, device=dev)
        t["weight"] = tagged(hidden, dtype, 0, salt=2)
        t["output"] = torch.empty(big, dtype=dtype, device=dev)
    wl = Workload(op, numel, dtype, placement, hidden, group, rank, world, t)
    wl.reset()
    return wl

