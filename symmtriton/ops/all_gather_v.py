"""``all_gather_v``: host side of kernels/all_gather_v.py (expert-parallel dispatch)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .. import _launch as L
from .._calls import counts_calls
from .. import counts as C
from ..config import LaunchConfig
from ..tuning import lookup_config
from ..validation import check_distinct, check_same, check_tensor
from ._common import TL_DTYPE, bit_unit, torch_all_gather
from ._vcommon import TL_COUNTS, clamp_or_raise, desc, pairs, run

OP = "all_gather_v"
#: most tensors one call moves (one kernel table row each).
MAX_TENSORS = 4
EACH, TOTAL = "the input capacity (input.shape[0])", "the output capacity (output.shape[0])"


@counts_calls
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
    the buffer otherwise, ``torch.distributed`` when symmetric memory cannot carry the call."""
    group = L.resolve_group(group)
    try:
        outs, ins = pairs(OP, output, input)
        key = (OP, group, tuple(map(desc, outs)), tuple(map(desc, ins)), desc(counts), config,
               L.timeout_key(timeout_s))
    except (AttributeError, TypeError):
        key = None  # not tensors: validation below raises
    plan = L.get_plan(key) if key is not None else None
    if plan is not None:
        L.check_uniform(group, OP, **_uniform(outs, ins))
        if run(plan, OP, config, counts, _torch_all_gather_v, outs, ins, counts, group):
            return output
    outs, ins = pairs(OP, output, input)
    world = dist.get_world_size(group)
    _validate(outs, ins, counts, world)
    if plan is None:
        L.check_uniform(group, OP, **_uniform(outs, ins))
    plan = L.put_plan(key, _prepare(group, config, timeout_s, outs, ins, counts, world))
    run(plan, OP, config, counts, _torch_all_gather_v, outs, ins, counts, group)
    return output


def _uniform(outs, ins) -> dict:
    return {**{f"output[{i}]": t for i, t in enumerate(outs)},
            **{f"input[{i}]": t for i, t in enumerate(ins)}}


def _validate(outs, ins, counts, world) -> None:
    if not 1 <= len(outs) <= MAX_TENSORS:
        raise ValueError(f"{OP}: between 1 and {MAX_TENSORS} tensors per call, got {len(outs)}")
    for i, (o, t) in enumerate(zip(outs, ins)):
        check_tensor(f"output[{i}]", o)
        check_tensor(f"input[{i}]", t)
        check_same(OP, **{f"output[{i}]": o, f"input[{i}]": t})
        if o.device != outs[0].device:
            raise ValueError(f"{OP}: output[{i}] is on {o.device} but output[0] is on "
                             f"{outs[0].device}")
        if o.shape[1:] != t.shape[1:]:
            raise ValueError(f"{OP}: output[{i}] rows {tuple(o.shape[1:])} differ from input[{i}] "
                             f"rows {tuple(t.shape[1:])}")
        if t.shape[0] != ins[0].shape[0] or o.shape[0] != outs[0].shape[0]:
            raise ValueError(f"{OP}: every input needs the same capacity (dim 0) and every output "
                             f"too; input[{i}] {tuple(t.shape)}, output[{i}] {tuple(o.shape)} vs "
                             f"input[0] {tuple(ins[0].shape)}, output[0] {tuple(outs[0].shape)}")
    C.check_counts(OP, counts, world, outs[0].device)
    named = [*((f"output[{i}]", o) for i, o in enumerate(outs)),
             *((f"input[{i}]", t) for i, t in enumerate(ins)), ("counts", counts)]
    for j, (a_name, a) in enumerate(named[:len(outs)]):
        for b_name, b in named[j + 1:]:
            check_distinct(OP, a_name, a, b_name, b)


def _prepare(group, config, timeout_s, outs, ins, counts, world):
    cap_in, cap_out = ins[0].shape[0], outs[0].shape[0]
    rows = [math.prod(t.shape[1:]) * t.element_size() for t in ins]  # bytes per row
    buf = L.find_buffer(group)
    regions, end = [], L.region_after(buf, *outs, *ins, counts)  # (byte offset, staged)
    for o, row in zip(outs, rows):
        off = buf.byte_offset_of(o) if buf.symm_mem_hdl is not None else None
        if off is not None:
            regions.append((off, False))  # zero-copy: peers write into the output
        else:
            regions.append((end, True))
            end += -(-cap_out * row // L.ALIGN) * L.ALIGN
    region_end = max([end] + [r + cap_out * row for (r, _), row in zip(regions, rows)])
    if not L.symm_usable(buf, outs[0].device, region_end):
        return L.Plan("fallback")
    ctx = L.context(buf)
    unit = min((bit_unit(row, t.data_ptr(), o.data_ptr(), r)
                for o, t, row, (r, _) in zip(outs, ins, rows, regions)), key=lambda d: d.itemsize)
    units = [row // unit.itemsize for row in rows]
    shard = max(1, cap_in * max(units))
    lookup = (("all_gather", shard, unit, world), {})
    cfg = config or lookup_config(*lookup[0])
    aligned = all(row % L.ALIGN == 0 for row in rows) and L.aligned16(
        *(p for o, t, (r, _) in zip(outs, ins, regions)
          for p in (o.data_ptr(), t.data_ptr(), ctx.local_base + r)))
    table = torch.tensor([[t.data_ptr(), o.data_ptr(), r, u, int(staged)]
                          for o, t, (r, staged), u in zip(outs, ins, regions, units)],
                         dtype=torch.int64, device=outs[0].device)
    kern = L.kernel("all_gather_v", "_all_gather_v_kernel")
    plan = L.Plan(
        "launch", buf, kern, cfg.grid(shard, ctx.grid_cap), cfg.num_warps,
        (table.data_ptr(), counts.data_ptr(), ctx.buf_table, ctx.sig_table, ctx.err_addr,
         ctx.err_addr + 4 * C.COUNTS_ERROR_WORD,
         ctx.grid_cap, cap_in, cap_out, L.timeout_ns(timeout_s)),
        dict(NT=len(outs), DTYPE=TL_DTYPE[unit], COUNTS_DTYPE=TL_COUNTS[counts.dtype],
             RANK=ctx.rank, WORLD_SIZE=world, WORLD_P2=ctx.world_p2, BLOCK_SIZE=cfg.block_size,
             SCOPE=ctx.scope, USE_PTX=ctx.use_ptx, ALIGNED=aligned),
        extra=(lookup[0], lookup[1], cfg, EACH, TOTAL, table))
    return plan


def _torch_all_gather_v(outs, ins, counts, group) -> None:
    """The same result through ``torch.distributed`` (padded all-gather; reads the counts on
    the host)."""
    world = dist.get_world_size(group)
    cap_in = ins[0].shape[0]
    starts, ns, raise_after = clamp_or_raise(OP, counts, cap_in, outs[0].shape[0], EACH, TOTAL)
    for o, t in zip(outs, ins):
        if t.numel():
            full = torch_all_gather(t.new_empty((world * cap_in, *t.shape[1:])), t, group)
            for r in range(world):
                o[starts[r]:starts[r] + ns[r]].copy_(full[r * cap_in:r * cap_in + ns[r]])
    raise_after()
