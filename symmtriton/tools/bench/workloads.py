"""Benchmark and tuning workloads (for :mod:`symmtriton.tools.bench.cli` and
:mod:`symmtriton.tools.bench.tune`): one collective's operands on this rank, filled with
rank-tagged data (:func:`symmtriton.tools.testing.tagged`), the call that runs it and the exact
reference (:mod:`symmtriton.tools.reference`) it must match. Ops are named by their config name
(:data:`symmtriton.config.OPS`) or, for ops without a tuning-cache entry of their own, by their
public function's name (:data:`symmtriton.config.UNTUNED_OPS`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from symmtriton.config import (ALL_REDUCE_ALGORITHMS, OPS, UNTUNED_OPS, LaunchConfig,
                               check_dtype, check_hidden)
from symmtriton.context import find_buffer
from symmtriton.memory import resolve_group
from symmtriton.ops.all_gather import all_gather_into_tensor
from symmtriton.ops.all_gather_v import all_gather_v
from symmtriton.ops.all_reduce import all_reduce, all_reduce_add_rmsnorm
from symmtriton.ops.fused import (reduce_scatter_add_rmsnorm,
                                  reduce_scatter_add_rmsnorm_all_gather)
from symmtriton.ops.reduce_scatter import reduce_scatter_tensor
from symmtriton.ops.reduce_scatter_v import reduce_scatter_v
from symmtriton.validation import check_count

from .. import reference
from ..testing import device, sync, tagged
from . import timing


__all__ = ["OPS", "BENCH_OPS", "V_OPS", "V_COUNTS", "NORM_OPS", "PLACEMENTS", "FUSED_EPS",
           "Workload", "make_workload", "size_factor", "v_counts"]
#: every op the bench measures: the tuned ops first, then the others.
BENCH_OPS = OPS + UNTUNED_OPS
#: the variable-count ops and the count distributions their rows run (see :func:`v_counts`).
V_OPS = ("all_gather_v", "reduce_scatter_v")
V_COUNTS = ("uniform", "skewed")
#: ops whose operand is the whole tensor on every rank (no shards): all-reduce.
WHOLE_OPS = ("all_reduce", "all_reduce_add_rmsnorm")
#: the RMSNorm row ops (residual, weight, normed output; FP8 output by ``out_dtype=``), and those
#: of them whose residual is this rank's shard of the rows.
NORM_OPS = ("fused", "reduce_scatter_add_rmsnorm", "all_reduce_add_rmsnorm")
SHARD_NORM_OPS = ("fused", "reduce_scatter_add_rmsnorm")
#: where tensors of each op's operands may be placed (see :class:`Workload`).
PLACEMENTS = ("zero_copy", "staged")
#: the operand that ``zero_copy`` puts in the symmetric buffer: the one peers access.
ZERO_COPY = {"all_gather": "output", "reduce_scatter": "input", "fused": "input",
             "reduce_scatter_add_rmsnorm": "input", "all_reduce": "input",
             "all_reduce_add_rmsnorm": "input", "all_gather_v": "output",
             "reduce_scatter_v": "input"}
#: epsilon the fused workloads pass to RMSNorm.
FUSED_EPS = 1e-6
#: what :meth:`Workload.check` writes into the output first: rows an op must not touch keep it.
GUARD = 100


def size_factor(op: str, world: int) -> int:
    """nccl-tests' size over ``numel`` elements: ``world`` for the sharded ops (a shard is
    ``numel``), 1 for the all-reduce ops (the tensor is ``numel``)."""
    return 1 if op in WHOLE_OPS else world


def v_counts(kind: str, total: int, world: int) -> tuple:
    """Rows per rank of a variable-count row, summing to ``total``: ``"uniform"`` (``total /
    world`` each; ``total`` a multiple of ``world``) or ``"skewed"`` (rank 0 none, rank ``r > 0``
    in proportion to ``r + 1``, the remainder to the last rank; at W=2 rank 1 has every row)."""
    if kind not in V_COUNTS:
        raise ValueError(f"counts must be one of {', '.join(V_COUNTS)}, got {kind!r}")
    if kind == "uniform" or world == 1:
        return (total // world,) * world
    weights = [0] + [r + 1 for r in range(1, world)]
    counts = [total * w // sum(weights) for w in weights]
    counts[-1] += total - sum(counts)
    return tuple(counts)


@dataclass(frozen=True, eq=False)
class Workload:
    """The operands of one collective on this rank and the call that runs it.

    ``numel`` elements of ``dtype``: per shard for the sharded ops (the all-gather input, the
    reduce-scatter output, the residual ``rows x hidden`` of the fused op and of
    ``reduce_scatter_add_rmsnorm``, with input ``[world * rows, hidden]``, a variable-count op's
    average rows per rank ``x hidden``), the whole tensor for the all-reduce ops
    (``all_reduce_add_rmsnorm``: ``[rows, hidden]``). ``counts``: the
    variable-count ops' rows per rank (``tensors["counts"]`` holds them on the device; inputs have
    ``max(counts)`` rows, outputs ``sum(counts)`` (all-gather-v) or ``max(counts)``).
    ``algorithm``: the all-reduce ops' ``algorithm=`` (``None``: by size).
    ``placement``: ``"zero_copy"`` puts the operand that peers access (:data:`ZERO_COPY`) in the
    group's symmetric buffer (``maybe_get_tensor``, byte 0: the scratch area), ``"staged"`` uses
    ordinary tensors, so the op stages through the buffer. Data are rank-tagged
    (:func:`symmtriton.tools.testing.tagged`) so :meth:`check` compares exactly."""

    op: str
    numel: int
    dtype: torch.dtype
    placement: str
    hidden: int
    group: object
    rank: int
    world: int
    tensors: dict
    counts: tuple | None = None
    algorithm: str | None = None

    @property
    def total_bytes(self) -> int:
        """nccl-tests' size: the gathered output (AG, AG-v), the full input (RS, RS-v, fused),
        the tensor (all-reduce)."""
        return size_factor(self.op, self.world) * self.numel * self.dtype.itemsize

    def _inputs(self, rank: int) -> torch.Tensor:
        x = self.tensors["input"]
        return tagged(x.numel(), self.dtype, rank).view(x.shape)

    def _residual(self, rank: int) -> torch.Tensor:
        """The residual shard of ``rank`` (:data:`SHARD_NORM_OPS`); the all-reduce's replicated
        residual."""
        r = self.tensors["residual"]
        owner = rank if self.op in SHARD_NORM_OPS else 0
        return tagged(r.numel(), self.dtype, owner, salt=1).view(r.shape)

    def reset(self) -> None:
        """Refill the inputs with their tagged values (the fused ops update their residual, and
        the zero-copy operand is a scratch area other calls may have overwritten)."""
        self.tensors["input"].copy_(self._inputs(self.rank))
        if "residual" in self.tensors:
            self.tensors["residual"].copy_(self._residual(self.rank))

    def run(self, config: LaunchConfig | None = None):
        """One call of the op (``config`` forces the launch config)."""
        t, op, g = self.tensors, self.op, self.group
        if op == "all_gather":
            return all_gather_into_tensor(t["output"], t["input"], g, config=config)
        if op == "reduce_scatter":
            return reduce_scatter_tensor(t["output"], t["input"], g, config=config)
        if op == "fused":
            return reduce_scatter_add_rmsnorm_all_gather(t["input"], t["residual"], t["weight"],
                                                         eps=FUSED_EPS, group=g, out=t["output"],
                                                         config=config)
        if op == "reduce_scatter_add_rmsnorm":
            return reduce_scatter_add_rmsnorm(t["input"], t["residual"], t["weight"],
                                              eps=FUSED_EPS, group=g, out=t["output"],
                                              config=config)
        if op == "all_reduce":  # zero-copy: in place in the buffer, as torch's symm_mem ops are
            out = None if self.placement == "zero_copy" else t["output"]
            return all_reduce(t["input"], g, out=out, config=config, algorithm=self.algorithm)
        if op == "all_reduce_add_rmsnorm":
            return all_reduce_add_rmsnorm(t["input"], t["residual"], t["weight"], eps=FUSED_EPS,
                                          group=g, out=t["output"], config=config,
                                          algorithm=self.algorithm)
        fn = all_gather_v if op == "all_gather_v" else reduce_scatter_v
        return fn(t["output"], t["input"], t["counts"], g, config=config)

    def expected(self) -> dict:
        """The reference results from every rank's tagged inputs
        (:mod:`symmtriton.tools.reference`), by tensor name: the output (rows the op must not
        touch hold :data:`GUARD`), and the all-reduce fused op's updated residual."""
        op, w, out = self.op, self.world, self.tensors["output"]
        inputs = [self._inputs(r) for r in range(w)]
        if op == "all_gather":
            return {"output": reference.all_gather(inputs)}
        if op == "reduce_scatter":
            return {"output": reference.reduce_scatter(inputs, self.rank)}
        if op == "all_reduce":
            name = "input" if self.placement == "zero_copy" else "output"
            return {name: reference.all_reduce(inputs)}
        weight = self.tensors.get("weight")
        if op == "fused":
            normed = [reference.reduce_scatter_add_rmsnorm(inputs, self._residual(r), weight,
                                                           FUSED_EPS, r)[0] for r in range(w)]
            return {"output": reference.all_gather(normed)}
        if op == "reduce_scatter_add_rmsnorm":
            return {"output": reference.reduce_scatter_add_rmsnorm(
                inputs, self._residual(self.rank), weight, FUSED_EPS, self.rank)[0]}
        if op == "all_reduce_add_rmsnorm":
            normed, res = reference.all_reduce_add_rmsnorm(inputs, self._residual(0), weight,
                                                           FUSED_EPS)
            return {"output": normed, "residual": res}
        if op == "all_gather_v":
            return {"output": reference.all_gather_v(inputs, list(self.counts))}
        got = reference.reduce_scatter_v(inputs, list(self.counts), self.rank)
        guard = torch.full((out.shape[0] - got.shape[0], *out.shape[1:]), GUARD, dtype=self.dtype,
                           device=got.device)
        return {"output": torch.cat([got, guard])}

    def check(self, config: LaunchConfig | None = None) -> bool:
        """Reset, fill the output with :data:`GUARD` (every rank, before any rank runs: peers may
        write into it), run once, synchronise and compare with :meth:`expected` on this rank:
        bits for the all-gathers, exact values for the sums and the updated residual (tagged
        sums are exact), a 1-2 ulp tolerance for the fused ops' RMSNorm."""
        self.reset()
        self.tensors["output"].fill_(GUARD)
        sync()
        timing.group_barrier(self.group)
        self.run(config)
        sync()
        ok = True
        for name, ref in self.expected().items():
            got, ref = self.tensors[name], ref.to(self.tensors[name].device)
            if self.op in NORM_OPS and name == "output":
                tol = 1e-4 if self.dtype == torch.float32 else 1.0 / 64
                ok &= torch.allclose(got.float().view(-1), ref.float().view(-1), rtol=tol, atol=tol)
            else:
                ok &= got.shape == ref.shape and torch.equal(got.view(-1).view(torch.uint8),
                                                             ref.view(-1).view(torch.uint8))
        return bool(ok)


def _shapes(op: str, numel: int, hidden: int, world: int, counts) -> dict:
    """Each operand's shape, by name."""
    rows = numel // hidden
    if op == "all_gather":
        return {"input": (numel,), "output": (world * numel,)}
    if op == "reduce_scatter":
        return {"input": (world * numel,), "output": (numel,)}
    if op == "fused":
        return {"input": (world * rows, hidden), "residual": (rows, hidden),
                "output": (world * rows, hidden)}
    if op == "reduce_scatter_add_rmsnorm":
        return {"input": (world * rows, hidden), "residual": (rows, hidden),
                "output": (rows, hidden)}
    if op == "all_reduce":
        return {"input": (numel,), "output": (numel,)}
    if op == "all_reduce_add_rmsnorm":
        return {"input": (rows, hidden), "residual": (rows, hidden), "output": (rows, hidden)}
    cap, total = max(counts), sum(counts)
    if op == "all_gather_v":
        return {"input": (cap, hidden), "output": (total, hidden)}
    return {"input": (total, hidden), "output": (cap, hidden)}


def make_workload(op: str, numel: int, dtype: torch.dtype, group=None, *, placement: str = "staged",
                  hidden: int | None = None, counts: str | None = None,
                  algorithm: str | None = None) -> Workload:
    """Allocate and fill the operands of ``op`` for ``numel`` elements (see :class:`Workload`).
    ``hidden`` (the row ops, :data:`symmtriton.config.ROW_OPS`: required there) must divide
    ``numel``; ``counts`` (the variable-count ops only; default ``"uniform"``) names the count
    distribution (:func:`v_counts`); ``algorithm`` (the all-reduce ops only) their
    ``algorithm=``. Raises ``ValueError`` naming the bad value, alike on every
    rank, when the arguments do not fit (including a zero-copy operand that does not fit the
    buffer)."""
    if op not in BENCH_OPS:
        raise ValueError(f"op must be one of {', '.join(BENCH_OPS)}, got {op!r}")
    check_dtype(dtype)
    numel = check_count("numel", numel)
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    hidden = check_hidden(op, numel, hidden) or numel
    group = resolve_group(group, "group")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    dev = device()
    rows = None
    if op in V_OPS:
        rows = v_counts("uniform" if counts is None else counts, world * (numel // hidden), world)
    elif counts is not None:
        raise ValueError(f"counts applies to {', '.join(V_OPS)} only, got counts={counts!r} "
                         f"for {op!r}")
    if algorithm is not None and (op not in WHOLE_OPS or algorithm not in ALL_REDUCE_ALGORITHMS):
        raise ValueError(f"algorithm must be None or one of {', '.join(ALL_REDUCE_ALGORITHMS)} for "
                         f"{', '.join(WHOLE_OPS)}, got algorithm={algorithm!r} for {op!r}")
    shapes = _shapes(op, numel, hidden, world, rows)
    t: dict = {}
    if placement == "zero_copy":
        buf, shape = find_buffer(group), shapes[ZERO_COPY[op]]
        t[ZERO_COPY[op]] = buf.maybe_get_tensor(shape, dtype)["tensor"]
        if t[ZERO_COPY[op]] is None:
            raise ValueError(f"placement 'zero_copy': {shape} elements of {dtype} do not fit the "
                             f"group's symmetric buffer ({buf!r})")
    for name, shape in shapes.items():
        if name not in t:
            t[name] = torch.empty(shape, dtype=dtype, device=dev)
    if "residual" in t:
        t["weight"] = tagged(hidden, dtype, 0, salt=2)
    if rows is not None:
        t["counts"] = torch.tensor(rows, dtype=torch.int32, device=dev)
    wl = Workload(op, numel, dtype, placement, hidden, group, rank, world, t, rows, algorithm)
    wl.reset()
    return wl
