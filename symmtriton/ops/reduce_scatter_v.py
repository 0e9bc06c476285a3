"""``reduce_scatter_v``: host side of kernels/reduce_scatter_v.py (expert-parallel combine)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .. import _launch as L
from .._calls import counts_calls
from .. import counts as C
from ..config import LaunchConfig
from ..tuning import lookup_config
from ..validation import REDUCE_DTYPES, check_distinct, check_same, check_tensor
from ._common import TL_DTYPE
from ._vcommon import TL_COUNTS, clamp_or_raise, desc, run

OP = "reduce_scatter_v"
EACH, TOTAL = "the output capacity (output.shape[0])", "the input capacity (input.shape[0])"


@counts_calls
def reduce_scatter_v(output: torch.Tensor, input: torch.Tensor, counts: torch.Tensor, group=None,
                     *, config: LaunchConfig | None = None,
                     timeout_s: float | None = None) -> torch.Tensor:
    """Sum ``input`` ``[cap_in, *row]`` (``sum(counts)`` valid rows on every rank, in rank order)
    over the ranks of ``group`` and keep rows ``sum(counts[:r]) .. + counts[r]`` in this rank's
    ``output`` ``[cap_out, *row]``; rows past ``counts[r]`` are not touched. bf16, fp16, fp32,
    accumulated in fp32.

    ``counts``: an int32/int64 tensor ``[W]`` on the tensors' device, the same on every rank,
    read when the kernel runs (a captured CUDA graph replays with new counts). Counts beyond a
    capacity or negative are clamped and raise ``ValueError`` naming them, as for
    :func:`symmtriton.all_gather_v`. Zero-copy when ``input`` lies in the group's symmetric
    buffer, staged otherwise, ``torch.distributed`` when symmetric memory cannot carry it."""
    group = L.resolve_group(group)
    try:
        key = (OP, group, desc(output), desc(input), desc(counts), config,
               L.timeout_key(timeout_s))
    except (AttributeError, TypeError):
        key = None  # not tensors: validation below raises
    plan = L.get_plan(key) if key is not None else None
    if plan is not None:
        L.check_uniform(group, OP, output=output, input=input)
        if run(plan, OP, config, counts, _torch_reduce_scatter_v, output, input, counts, group):
            return output
    check_tensor("output", output, dtypes=REDUCE_DTYPES)
    check_tensor("input", input, dtypes=REDUCE_DTYPES)
    check_same(OP, output=output, input=input)
    if output.shape[1:] != input.shape[1:]:
        raise ValueError(f"{OP}: output rows {tuple(output.shape[1:])} differ from input rows "
                         f"{tuple(input.shape[1:])}")
    world = dist.get_world_size(group)
    C.check_counts(OP, counts, world, output.device)
    check_distinct(OP, "output", output, "input", input)
    check_distinct(OP, "output", output, "counts", counts)
    if plan is None:
        L.check_uniform(group, OP, output=output, input=input)
    plan = L.put_plan(key, _prepare(group, config, timeout_s, output, input, counts, world))
    run(plan, OP, config, counts, _torch_reduce_scatter_v, output, input, counts, group)
    return output


def _prepare(group, config, timeout_s, output, input, counts, world):
    cap_in, cap_out = input.shape[0], output.shape[0]
    row = math.prod(input.shape[1:])
    esize = input.element_size()
    buf = L.find_buffer(group)
    in_off = buf.byte_offset_of(input) if buf.symm_mem_hdl is not None else None
    region = in_off if in_off is not None else L.region_after(buf, output, counts)
    if not L.symm_usable(buf, input.device, region + cap_in * row * esize):
        return L.Plan("fallback")
    ctx = L.context(buf)
    slice_max = max(1, cap_out * row)
    lookup = (("reduce_scatter", slice_max, input.dtype, world), {})
    cfg = config or lookup_config(*lookup[0])
    aligned = (row * esize) % L.ALIGN == 0 and L.aligned16(
        input.data_ptr(), output.data_ptr(), ctx.local_base + region)
    kern = L.kernel("reduce_scatter_v", "_reduce_scatter_v_kernel")
    return L.Plan(
        "launch", buf, kern, cfg.grid(slice_max, ctx.grid_cap), cfg.num_warps,
        (input.data_ptr(), output.data_ptr(), counts.data_ptr(), ctx.buf_table, ctx.sig_table,
         ctx.err_addr, ctx.err_addr + 4 * C.COUNTS_ERROR_WORD,
         ctx.grid_cap, region, row, cap_in, cap_out,
         L.timeout_ns(timeout_s)),
        dict(DTYPE=TL_DTYPE[input.dtype], COUNTS_DTYPE=TL_COUNTS[counts.dtype], RANK=ctx.rank,
             WORLD_SIZE=world, WORLD_P2=ctx.world_p2, BLOCK_SIZE=cfg.block_size,
             STAGE_IN=in_off is None, SCOPE=ctx.scope, USE_PTX=ctx.use_ptx, ALIGNED=aligned),
        extra=(lookup[0], lookup[1], cfg, EACH, TOTAL))


def _torch_reduce_scatter_v(output, input, counts, group) -> None:
    """The same result through ``torch.distributed`` (an fp32 all-reduce of the valid rows;
    reads the counts on the host)."""
    rank = dist.get_rank(group)
    starts, ns, raise_after = clamp_or_raise(OP, counts, output.shape[0], input.shape[0], EACH,
                                             TOTAL)
    total = starts[-1] + ns[-1]
    acc = input[:total].float()  # a copy for fp16/bf16; cloned for fp32 below
    if acc.data_ptr() == input.data_ptr():
        acc = acc.clone()
    if acc.numel():
        dist.all_reduce(acc, group=group)
    output[:ns[rank]].copy_(acc[starts[rank]:starts[rank] + ns[rank]])
    raise_after()
