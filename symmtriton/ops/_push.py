"""Host side of the flagged-chunk push kernels (kernels/push.py): where their areas lie in the
buffer, and the launches of ``_reduce_scatter_push_kernel``, ``_all_reduce_one_shot_push_kernel``
and ``_all_reduce_push_kernel`` (their arguments, listed here only)."""

from __future__ import annotations

import torch

from .. import env
from ..config import ALIGN, LaunchConfig, aligned16
from ..context import Ctx, offset_in, region_after, symm_usable
from ..kernels.all_reduce import _all_reduce_one_shot_push_kernel, _all_reduce_push_kernel
from ..kernels.reduce_scatter import _reduce_scatter_push_kernel
from ..launch import Launch
from .driver import TL_DTYPE


def _up(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _areas(ctx: Ctx, operands, device: torch.device, *sizes: int) -> list[int] | None:
    """Offsets of consecutive 16-byte-aligned areas of ``sizes`` bytes past every operand that
    lies in the buffer, or ``None`` when the buffer has no room for them (alike on every rank)."""
    offsets, off = [], region_after(ctx.buf, *operands)
    for size in sizes:
        offsets.append(off)
        off += _up(size)
    return offsets if symm_usable(ctx.buf, device, off) else None


def _one_round_launch(op: str, ctx: Ctx, cfg: LaunchConfig, kernel, out: torch.Tensor,
                      input: torch.Tensor, n: int, timeout_s) -> Launch | None:
    """A launch of ``kernel`` (``push.push_reduce_call``) reducing slots of ``n`` elements into
    ``out``: slots for ``world - 1`` peers and a flag per slot and chunk, or ``None`` when they
    do not fit."""
    esize, peers = input.element_size(), ctx.world - 1
    areas = _areas(ctx, (out, input), input.device, peers * n * esize,
                   peers * -(-n // cfg.block_size) * 4)
    if areas is None:
        return None
    slot_off, flag_off = areas
    aligned = aligned16(input.data_ptr(), out.data_ptr(), ctx.local_base + slot_off, n * esize)
    return Launch.on(
        ctx, op, kernel, cfg.grid(n, ctx.grid_cap), cfg.num_warps,
        (input.data_ptr(), out.data_ptr(), ctx.buf_table, ctx.sig_table, ctx.err_addr,
         ctx.grid_cap, slot_off, flag_off, n, env.timeout_ns(timeout_s)),
        dict(DTYPE=TL_DTYPE[input.dtype], BLOCK_SIZE=cfg.block_size, ALIGNED=aligned))


def reduce_scatter_push_launch(op: str, ctx: Ctx, cfg: LaunchConfig, output: torch.Tensor,
                               input: torch.Tensor, timeout_s) -> Launch | None:
    """The push reduce-scatter of ``input`` into ``output`` (slices of ``output.numel()``), or
    ``None`` when its areas do not fit."""
    return _one_round_launch(op, ctx, cfg, _reduce_scatter_push_kernel, output, input,
                             output.numel(), timeout_s)


def all_reduce_one_shot_push_launch(op: str, ctx: Ctx, cfg: LaunchConfig, dst: torch.Tensor,
                                    tensor: torch.Tensor, timeout_s) -> Launch | None:
    """The push one-shot all-reduce of ``tensor`` into ``dst`` (may be ``tensor``): slots for
    the whole tensor from each of ``world - 1`` peers, or ``None`` when they do not fit."""
    return _one_round_launch(op, ctx, cfg, _all_reduce_one_shot_push_kernel, dst, tensor,
                             tensor.numel(), timeout_s)


def all_reduce_push_launch(op: str, ctx: Ctx, cfg: LaunchConfig, dst: torch.Tensor,
                           tensor: torch.Tensor, timeout_s) -> Launch | None:
    """The push two-shot all-reduce of ``tensor`` into ``dst`` (may be ``tensor``): slots for
    ``world - 1`` slices, a gather area laid out like the tensor unless ``dst`` lies in the
    buffer (the peers' sums then land in it directly), two flags per slot and chunk; or ``None``
    when they do not fit."""
    n, esize, peers = tensor.numel(), tensor.element_size(), ctx.world - 1
    cps = -(-(-(-n // cfg.block_size)) // ctx.world)  # chunks per slice
    out_off = offset_in(ctx.buf, dst)
    gather = out_off is None
    areas = _areas(ctx, (tensor, dst), tensor.device, peers * cps * cfg.block_size * esize,
                   n * esize if gather else 0, 2 * peers * cps * 4)
    if areas is None:
        return None
    slot_off, gather_off, flag_off = areas
    if not gather:
        gather_off = out_off
    base = ctx.local_base
    aligned = aligned16(tensor.data_ptr(), dst.data_ptr(), base + slot_off, base + gather_off,
                        cfg.block_size * esize)
    return Launch.on(
        ctx, op, _all_reduce_push_kernel, cfg.row_grid(cps, ctx.grid_cap), cfg.num_warps,
        (tensor.data_ptr(), dst.data_ptr(), ctx.buf_table, ctx.sig_table, ctx.err_addr,
         ctx.grid_cap, slot_off, flag_off, gather_off, n, cps, env.timeout_ns(timeout_s)),
        dict(DTYPE=TL_DTYPE[tensor.dtype], BLOCK_SIZE=cfg.block_size, GATHER=gather,
             ALIGNED=aligned))
