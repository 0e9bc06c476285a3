"""``reduce_scatter_v``: host side of kernels/reduce_scatter_v.py (expert-parallel combine)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .. import counts as C
from .. import env
from .._calls import sequenced
from ..config import ALIGN, CONFIG_OP, LaunchConfig, aligned16
from ..context import context, find_buffer, offset_in, region_after, symm_usable
from ..kernels.reduce_scatter_v import _reduce_scatter_v_kernel
from ..launch import Launch
from ..validation import REDUCE_DTYPES, check_disjoint, check_same, check_tensor
from ._operands import VarOperands, record
from ._vcommon import TL_COUNTS, CountsPlan, clamp_or_raise
from .driver import (TL_DTYPE, Collective, call, choose_config, eager_only, group_name,
                     tensor_desc)

EACH, TOTAL = "the output capacity (output.shape[0])", "the input capacity (input.shape[0])"


class ReduceScatterV(Collective):
    name = "reduce_scatter_v"
    config_op = CONFIG_OP[name]

    def key(self, group, config, timeout_s, a: VarOperands):
        return (self.name, group, tensor_desc(a.output), tensor_desc(a.input),
                tensor_desc(a.counts), config, env.timeout_key(timeout_s))

    def uniform(self, a: VarOperands):
        return {"output": a.output, "input": a.input}

    def validate(self, group, a: VarOperands):
        output, input, counts = a.output, a.input, a.counts
        op = self.name
        check_tensor("output", output, dtypes=REDUCE_DTYPES)
        check_tensor("input", input, dtypes=REDUCE_DTYPES)
        check_same(op, output=output, input=input)
        if output.shape[1:] != input.shape[1:]:
            raise ValueError(f"{op}: output rows {tuple(output.shape[1:])} differ from input rows "
                             f"{tuple(input.shape[1:])}")
        C.check_counts(op, counts, dist.get_world_size(group), output.device)
        check_disjoint(op, [("output", output), ("input", input), ("counts", counts)])

    def prepare(self, group, config, timeout_s, a: VarOperands):
        output, input, counts = a.output, a.input, a.counts
        row = math.prod(input.shape[1:])
        esize = input.element_size()
        buf = find_buffer(group)
        in_off = offset_in(buf, input)
        region = in_off if in_off is not None else region_after(buf, output, counts)
        if not symm_usable(buf, input.device, region + input.shape[0] * row * esize):
            return CountsPlan("fallback", fallback=_torch_reduce_scatter_v, group=group)
        slice_max = max(1, output.shape[0] * row)
        choice = choose_config(config, self.config_op, slice_max, input.dtype,
                               dist.get_world_size(group))
        ctx = context(buf)
        aligned = (row * esize) % ALIGN == 0 and aligned16(
            input.data_ptr(), output.data_ptr(), ctx.local_base + region)
        kernel = _kernel_launch(ctx, choice.config, output, input, counts, region, row,
                                slice_max, in_off is None, aligned, timeout_s)
        return CountsPlan("barrier", kernel, choice, each=EACH, total=TOTAL)


def _kernel_launch(ctx, cfg: LaunchConfig, output, input, counts, region, row, slice_max,
                   stage_in, aligned, timeout_s):
    """The launch of ``_reduce_scatter_v_kernel``: its arguments, listed here only. An empty
    tensor (zero rows, or rows of zero elements) has address 0, which Triton types as a 32-bit
    int that does not cast to a pointer: it passes the buffer's own address, never
    dereferenced (nothing to move), so the kernel runs as for any other size (same grid and
    barriers on every rank, counts checked against the capacities)."""
    return Launch.on(
        ctx, OP.name, _reduce_scatter_v_kernel, cfg.grid(slice_max, ctx.grid_cap),
        cfg.num_warps,
        (_address(input, ctx), _address(output, ctx), counts.data_ptr(), ctx.buf_table,
         ctx.sig_table, ctx.err_addr, ctx.err_addr + 4 * C.COUNTS_ERROR_WORD, ctx.grid_cap,
         region, row, input.shape[0], output.shape[0], env.timeout_ns(timeout_s)),
        dict(DTYPE=TL_DTYPE[input.dtype], COUNTS_DTYPE=TL_COUNTS[counts.dtype],
             BLOCK_SIZE=cfg.block_size, STAGE_IN=stage_in, ALIGNED=aligned))


def _address(t: torch.Tensor, ctx) -> int:
    return t.data_ptr() if t.numel() else ctx.local_base


def _torch_reduce_scatter_v(output, input, counts, group) -> None:
    """The same result through ``torch.distributed`` (an fp32 all-reduce of the valid rows;
    reads the counts on the host)."""
    rank = dist.get_rank(group)
    starts, ns, raise_after = clamp_or_raise(OP.name, counts, output.shape[0], input.shape[0],
                                             EACH, TOTAL)
    total = starts[-1] + ns[-1]
    acc = input[:total].float()  # a copy for fp16/bf16; cloned for fp32 below
    if acc.data_ptr() == input.data_ptr():
        acc = acc.clone()
    if acc.numel():
        dist.all_reduce(acc, group=group)
    output[:ns[rank]].copy_(acc[starts[rank]:starts[rank] + ns[rank]])
    raise_after()


OP = ReduceScatterV()


def _traced(output, input, counts, group=None, *, config=None, timeout_s=None):
    """Under ``torch.compile``: ``torch.ops.symmtriton.reduce_scatter_v``."""
    eager_only(OP.name, config, timeout_s)
    torch.ops.symmtriton.reduce_scatter_v(output, input, counts, group_name(group))
    return output


@sequenced(_traced)
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
    buffer, staged otherwise, ``torch.distributed`` when symmetric memory cannot carry it. Under
    ``torch.compile`` it traces as ``torch.ops.symmtriton.reduce_scatter_v``."""
    return call(OP, group, config, timeout_s, record(VarOperands, (output, input, counts)))
