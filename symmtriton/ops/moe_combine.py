"""``moe_combine``: host side of kernels/moe_combine.py, the way back of ``moe_dispatch``
(ops/moe_dispatch.py; what both share: ops/_moe.py). Each rank returns one pre-reduced fp32 row
per (token, rank), staged through the group's buffer; ``ops/_moe_fallback.py`` where the buffer
cannot carry the call (the dispatch may have taken the other path: both leave the same handle)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import counts as C
from .. import env
from .._calls import sequenced
from ..config import ALIGN, LaunchConfig, aligned16
from ..context import find_buffer, symm_usable
from ..kernels.moe_combine import _moe_combine_kernel
from ..launch import Launch
from ..validation import check_tensor
from . import _moe_fallback as fallback
from ._moe import (ROW_DTYPES, MoeHandle, MoePlan, addr, area_start, bad_expert_error,
                   check_combine, ctx_for, moe_config, p2, up)
from ._operands import CombineOperands, record
from ._vcommon import TL_COUNTS
from .driver import TL_DTYPE, Collective, ConfigChoice, call, eager_only, group_name, tensor_desc


def _outputs(a: CombineOperands):
    return (a.out,)


class MoeCombine(Collective):
    name = "moe_combine"
    config_op = None  # untuned: ops/_moe.py moe_config

    def key(self, group, config, timeout_s, a: CombineOperands):
        return (self.name, group, tensor_desc(a.expert_out), tensor_desc(a.topk_idx),
                tensor_desc(a.topk_weights), tensor_desc(a.rowmap), a.num_experts,
                tensor_desc(a.out), config, env.timeout_key(timeout_s))

    def uniform(self, a: CombineOperands):
        return {"expert_out": a.expert_out, "rowmap": a.rowmap}

    def validate(self, group, a: CombineOperands):
        check_combine(self.name, a, dist.get_world_size(group))

    def prepare(self, group, config, timeout_s, a: CombineOperands):
        make_error = bad_expert_error(self.name, a.num_experts)
        buf = find_buffer(group)
        ctx = ctx_for(buf, a.out.device)
        world, M, K = a.rowmap.shape
        H = a.out.shape[1]
        cfg = config or moe_config(H)
        if ctx is not None:
            wts_off = area_start(buf, (a.expert_out, a.expert_out.nbytes),
                                 (a.topk_idx, M * K * a.topk_idx.element_size()),
                                 (a.topk_weights, M * K * a.topk_weights.element_size()),
                                 (a.out, M * H * a.out.element_size()))
            part_off = up(wts_off + M * K * 4)
            if symm_usable(buf, a.out.device, part_off + world * M * H * 4):
                aligned = (H * a.out.element_size()) % ALIGN == 0 and H % 4 == 0 and aligned16(
                    a.expert_out.data_ptr(), addr(ctx, a.out), ctx.local_base + part_off)
                kern = _kernel_launch(ctx, cfg, cfg.row_grid(M, ctx.grid_cap), a,
                                      (wts_off, part_off), aligned, timeout_s)
                return MoePlan("barrier", make_error, _outputs, kern, ConfigChoice(cfg))
        return MoePlan("fallback", make_error, _outputs, fallback=fallback.combine, group=group)


def _kernel_launch(ctx, cfg: LaunchConfig, grid: int, a: CombineOperands, offsets, aligned,
                   timeout_s) -> Launch:
    """The launch of ``_moe_combine_kernel``: its arguments, listed here only."""
    world, M, K = a.rowmap.shape
    T, H = a.out.shape
    return Launch.on(
        ctx, OP.name, _moe_combine_kernel, grid, cfg.num_warps,
        (a.expert_out.data_ptr(), addr(ctx, a.topk_weights), addr(ctx, a.topk_idx),
         addr(ctx, a.out), a.rowmap.data_ptr(), ctx.buf_table, ctx.sig_table, ctx.err_addr,
         ctx.err_addr + 4 * C.COUNTS_ERROR_WORD, ctx.grid_cap, T, M, H, *offsets,
         env.timeout_ns(timeout_s)),
        dict(DTYPE=TL_DTYPE[a.out.dtype], W_DTYPE=TL_DTYPE[a.topk_weights.dtype],
             IDX_DTYPE=TL_COUNTS[a.topk_idx.dtype], K=K, K_P2=p2(K), EL=a.expert_out.shape[0],
             BLOCK_H=cfg.block_size, ALIGNED=aligned))


OP = MoeCombine()


def _out_for(expert_out, handle, out):
    """``out``, or a new ``[T, H]`` tensor of ``expert_out``'s dtype (``handle`` checked)."""
    if not isinstance(handle, MoeHandle):
        raise TypeError(f"{OP.name}: handle must be the MoeHandle moe_dispatch returned, got "
                        f"{type(handle).__name__}")
    if out is None:
        check_tensor("expert_out", expert_out, dtypes=ROW_DTYPES)
        out = expert_out.new_empty((handle.tokens, expert_out.shape[-1]))
    return out


def _traced(expert_out, topk_idx, topk_weights, handle, group=None, *, out=None, config=None,
            timeout_s=None):
    """Under ``torch.compile``: ``torch.ops.symmtriton.moe_combine`` into ``out``."""
    eager_only(OP.name, config, timeout_s)
    out = _out_for(expert_out, handle, out)
    torch.ops.symmtriton.moe_combine(expert_out, topk_idx, topk_weights, handle.rowmap,
                                     handle.num_experts, group_name(group), out)
    return out


@sequenced(_traced)
def moe_combine(expert_out, topk_idx, topk_weights, handle: MoeHandle, group=None, *,
                out=None, config: LaunchConfig | None = None, timeout_s: float | None = None):
    """Return every token's expert outputs to its rank and sum them: ``y[t] = sum_k
    topk_weights[t, k] * expert_out[row of (t, topk_idx[t, k])]`` over the slots naming an
    expert, accumulated in fp32, in ``expert_out``'s dtype (zeros for a token with none).
    ``expert_out`` has ``recv_x``'s shape (only its valid rows are read); ``topk_idx`` and
    ``handle`` are the dispatch's; ``topk_weights`` ``[T, K]`` fp32, bf16 or fp16. Each rank
    sends back one pre-reduced row per (token, rank). Writes and returns ``out`` (``[T, H]``; a
    new tensor when ``None``). Under ``torch.compile`` it traces as
    ``torch.ops.symmtriton.moe_combine``."""
    out = _out_for(expert_out, handle, out)
    call(OP, group, config, timeout_s, record(CombineOperands, (
        expert_out, topk_idx, topk_weights, handle.rowmap, handle.num_experts, out)))
    return out


def _traced_into(expert_out, topk_idx, topk_weights, rowmap, num_experts, out, group=None):
    torch.ops.symmtriton.moe_combine(expert_out, topk_idx, topk_weights, rowmap, num_experts,
                                     group_name(group), out)


@sequenced(_traced_into)
def combine_into(expert_out, topk_idx, topk_weights, rowmap, num_experts, out,
                 group=None) -> None:
    """:func:`moe_combine` with the handle's ``rowmap`` and ``num_experts``: what
    ``torch.ops.symmtriton.moe_combine`` runs."""
    call(OP, group, None, None, record(CombineOperands, (
        expert_out, topk_idx, topk_weights, rowmap, num_experts, out)))
