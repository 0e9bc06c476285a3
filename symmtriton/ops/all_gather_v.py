"""``all_gather_v``: host side of kernels/all_gather_v.py (expert-parallel dispatch)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .. import counts as C
from .. import env
from .._calls import sequenced
from ..config import ALIGN, CONFIG_OP, LaunchConfig, aligned16, bit_unit
from ..context import context, find_buffer, offset_in, region_after, symm_usable
from ..kernels.all_gather_v import _all_gather_v_kernel
from ..launch import Launch
from ..validation import check_disjoint, check_same, check_tensor
from ._operands import VarOperands, record
from ._vcommon import TL_COUNTS, CountsPlan, clamp_or_raise, pairs
from .driver import (TL_DTYPE, Collective, call, choose_config, eager_only, group_name,
                     tensor_desc)
from .fallback import torch_all_gather

#: most tensors one call moves (one kernel table row each).
MAX_TENSORS = 4
EACH, TOTAL = "the input capacity (input.shape[0])", "the output capacity (output.shape[0])"


def _pair_table(buf, rows: list) -> torch.Tensor:
    """The kernel's int64 table of tensor pairs, where the buffer lives. On the GPU it is built
    in pinned host memory and copied in stream order, so a plan may be prepared inside a CUDA
    graph capture (a call whose inputs were allocated in the capture: a new plan there), where a
    pageable copy is illegal; the copy is then a graph node that reads the pinned tensor at every
    replay, so both tensors are kept as long as the buffer (``close`` drops them)."""
    host = torch.tensor(rows, dtype=torch.int64, device="cpu")
    if buf.device.type != "cuda":
        return host
    host = host.pin_memory()
    table = torch.empty(host.shape, dtype=torch.int64, device=buf.device)
    table.copy_(host, non_blocking=True)
    buf.__dict__.setdefault("_pair_tables", []).append((host, table))
    return table


class AllGatherV(Collective):
    name = "all_gather_v"
    config_op = CONFIG_OP[name]

    def key(self, group, config, timeout_s, a: VarOperands):
        outs, ins = pairs(self.name, a.output, a.input)
        return (self.name, group, tuple(map(tensor_desc, outs)), tuple(map(tensor_desc, ins)),
                tensor_desc(a.counts), config, env.timeout_key(timeout_s))

    def uniform(self, a: VarOperands):
        outs, ins = pairs(self.name, a.output, a.input)
        return {**{f"output[{i}]": t for i, t in enumerate(outs)},
                **{f"input[{i}]": t for i, t in enumerate(ins)}}

    def validate(self, group, a: VarOperands):
        outs, ins = pairs(self.name, a.output, a.input)
        counts, op = a.counts, self.name
        if not 1 <= len(outs) <= MAX_TENSORS:
            raise ValueError(f"{op}: between 1 and {MAX_TENSORS} tensors per call, got {len(outs)}")
        for i, (o, t) in enumerate(zip(outs, ins)):
            check_tensor(f"output[{i}]", o)
            check_tensor(f"input[{i}]", t)
            check_same(op, **{f"output[{i}]": o, f"input[{i}]": t})
            if o.device != outs[0].device:
                raise ValueError(f"{op}: output[{i}] is on {o.device} but output[0] is on "
                                 f"{outs[0].device}")
            if o.shape[1:] != t.shape[1:]:
                raise ValueError(f"{op}: output[{i}] rows {tuple(o.shape[1:])} differ from "
                                 f"input[{i}] rows {tuple(t.shape[1:])}")
            if t.shape[0] != ins[0].shape[0] or o.shape[0] != outs[0].shape[0]:
                raise ValueError(f"{op}: every input needs the same capacity (dim 0) and every "
                                 f"output too; input[{i}] {tuple(t.shape)}, output[{i}] "
                                 f"{tuple(o.shape)} vs input[0] {tuple(ins[0].shape)}, output[0] "
                                 f"{tuple(outs[0].shape)}")
        C.check_counts(op, counts, dist.get_world_size(group), outs[0].device)
        check_disjoint(op, [*((f"output[{i}]", o) for i, o in enumerate(outs)),
                            *((f"input[{i}]", t) for i, t in enumerate(ins)), ("counts", counts)])

    def prepare(self, group, config, timeout_s, a: VarOperands):
        outs, ins = pairs(self.name, a.output, a.input)
        counts = a.counts
        cap_in, cap_out = ins[0].shape[0], outs[0].shape[0]
        rows = [math.prod(t.shape[1:]) * t.element_size() for t in ins]  # bytes per row
        buf = find_buffer(group)
        regions, end = [], region_after(buf, *outs, *ins, counts)  # (byte offset, staged)
        for o, row in zip(outs, rows):
            off = offset_in(buf, o)
            if off is not None:
                regions.append((off, False))  # zero-copy: peers write into the output
            else:
                regions.append((end, True))
                end += -(-cap_out * row // ALIGN) * ALIGN
        region_end = max([end] + [r + cap_out * row for (r, _), row in zip(regions, rows)])
        if not symm_usable(buf, outs[0].device, region_end):
            return CountsPlan("fallback", fallback=_torch_all_gather_v, group=group)
        world = dist.get_world_size(group)
        # the config is keyed by the unit of values alike on every rank, its grid counted in
        # that unit; this rank's tensors may allow only a narrower one (as for all_gather)
        key_unit = min((bit_unit(row, r) for row, (r, _) in zip(rows, regions)),
                       key=lambda d: d.itemsize)
        shard = max(1, cap_in * max(rows) // key_unit.itemsize)
        choice = choose_config(config, self.config_op, shard, key_unit, world)
        unit = min((bit_unit(row, t.data_ptr(), o.data_ptr(), r)
                    for o, t, row, (r, _) in zip(outs, ins, rows, regions)),
                   key=lambda d: d.itemsize)
        units = [row // unit.itemsize for row in rows]
        ctx = context(buf)
        table = _pair_table(buf, [[t.data_ptr(), o.data_ptr(), r, u, int(staged)]
                                  for o, t, (r, staged), u in zip(outs, ins, regions, units)])
        aligned = all(row % ALIGN == 0 for row in rows) and aligned16(
            *(p for o, t, (r, _) in zip(outs, ins, regions)
              for p in (o.data_ptr(), t.data_ptr(), ctx.local_base + r)))
        kernel = _kernel_launch(ctx, choice.config, table, counts, len(outs), unit, key_unit,
                                cap_in, cap_out, shard, aligned, timeout_s)
        return CountsPlan("barrier", kernel, choice, each=EACH, total=TOTAL, table=table)


def _kernel_launch(ctx, cfg: LaunchConfig, table, counts, nt, unit, key_unit, cap_in, cap_out,
                   shard, aligned, timeout_s):
    """The launch of ``_all_gather_v_kernel``: its arguments, listed here only. ``cfg`` and
    ``shard`` count ``key_unit``s (the same on every rank); the kernel copies in ``unit``s with
    its block scaled to the same bytes, so every rank launches the same grid and its block ``b``
    moves the same bytes on every rank."""
    return Launch.on(
        ctx, OP.name, _all_gather_v_kernel, cfg.grid(shard, ctx.grid_cap), cfg.num_warps,
        (table.data_ptr(), counts.data_ptr(), ctx.buf_table, ctx.sig_table, ctx.err_addr,
         ctx.err_addr + 4 * C.COUNTS_ERROR_WORD, ctx.grid_cap, cap_in, cap_out,
         env.timeout_ns(timeout_s)),
        dict(NT=nt, DTYPE=TL_DTYPE[unit], COUNTS_DTYPE=TL_COUNTS[counts.dtype],
             BLOCK_SIZE=cfg.block_size * (key_unit.itemsize // unit.itemsize), ALIGNED=aligned))


def _torch_all_gather_v(output, input, counts, group) -> None:
    """The same result through ``torch.distributed`` (padded all-gather; reads the counts on
    the host)."""
    outs, ins = pairs(OP.name, output, input)
    world = dist.get_world_size(group)
    cap_in = ins[0].shape[0]
    starts, ns, raise_after = clamp_or_raise(OP.name, counts, cap_in, outs[0].shape[0], EACH,
                                             TOTAL)
    for o, t in zip(outs, ins):
        if t.numel():
            full = torch_all_gather(t.new_empty((world * cap_in, *t.shape[1:])), t, group)
            for r in range(world):
                o[starts[r]:starts[r] + ns[r]].copy_(full[r * cap_in:r * cap_in + ns[r]])
    raise_after()


OP = AllGatherV()


def _traced(output, input, counts, group=None, *, config=None, timeout_s=None):
    """Under ``torch.compile``: ``torch.ops.symmtriton.all_gather_v`` (lists of tensors)."""
    eager_only(OP.name, config, timeout_s)
    outs, ins = pairs(OP.name, output, input)
    torch.ops.symmtriton.all_gather_v(outs, ins, counts, group_name(group))
    return output


@sequenced(_traced)
def all_gather_v(output, input, counts: torch.Tensor, group=None, *,
                 config: LaunchConfig | None = None, timeout_s: float | None = None):
    """Gather a variable number of rows from every rank of ``group``: rank ``r`` sends its first
    ``counts[r]`` rows of ``input`` ``[cap_in, *row]``; ``output`` ``[cap_out, *row]`` receives
    all of them packed in rank order (rank ``r``'s at row ``sum(counts[:r])``); rows past
    ``sum(counts)`` are not touched. Any dtype (a bit copy).

    ``counts``: an int32/int64 tensor ``[W]`` on the tensors' device, the same values on every
    rank, read when the kernel runs (no host synchronisation: a captured CUDA graph replays with
    new counts written into it). ``output`` and ``input`` may be equal-length lists (up to
    ``MAX_TENSORS``, each pair with its own dtype and row shape, one capacity for all inputs and
    one for all outputs): every pair moves in one launch. Counts beyond a capacity or negative are
    clamped (nothing is written out of bounds) and raise ``ValueError`` naming them: at once on
    the host backend, at the next variable-count call or :func:`symmtriton.synchronize` on the GPU.

    Zero-copy for outputs in the group's symmetric buffer (same offset on every rank), staged in
    the buffer otherwise, ``torch.distributed`` when symmetric memory cannot carry the call.
    Under ``torch.compile`` it traces as ``torch.ops.symmtriton.all_gather_v``."""
    return call(OP, group, config, timeout_s, record(VarOperands, (output, input, counts)))
