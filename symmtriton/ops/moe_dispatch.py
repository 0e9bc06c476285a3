"""``moe_dispatch``: host side of kernels/moe_dispatch.py (expert parallelism: all-to-all in
DeepEP's low-latency layout; its combine: ops/moe_combine.py, what both share: ops/_moe.py).

Outputs are new tensors per call (a plan is kept per set of operand addresses, so a loop whose
tensors come back at the same addresses, or a CUDA graph, reuses it). Operands are read where
they lie, in the buffer (zero-copy) or not, with no copy before the launch; the tokens cross to
the peers' buffers inside the launch (areas past every operand that lies in the buffer, counted
at capacity, ``max_tokens_per_rank`` rows, so ranks that lay the buffer out alike agree). Where
the buffer cannot carry the call, ``ops/_moe_fallback.py`` moves the same rows with
``torch.distributed``. An expert id out of range is skipped on the device and raises
``ValueError`` through the counts error word (:mod:`symmtriton.counts`): at once on the host
backend, at the next MoE or variable-count call or :func:`symmtriton.synchronize` on the GPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import counts as C
from .. import env
from .._calls import sequenced
from ..config import ALIGN, LaunchConfig, aligned16
from ..context import find_buffer, symm_usable
from ..kernels.moe_dispatch import _moe_dispatch_kernel
from ..launch import Launch
from ..memory import resolve_group
from ..validation import check_count, check_tensor
from . import _moe_fallback as fallback
from ._moe import (FP8_DTYPE, FP8_GROUP, ROW_DTYPES, MoeHandle, MoePlan, addr, area_start,
                   bad_expert_error, check_dispatch, check_experts, check_routing, check_use_fp8,
                   ctx_for, moe_config, p2, scale_groups, up)
from ._operands import DispatchOperands, record
from ._quant import FP8
from ._vcommon import TL_COUNTS
from .driver import TL_DTYPE, Collective, ConfigChoice, call, eager_only, group_name, tensor_desc

#: most (token, expert) flags one block holds while it scans the routing (``BT * E_P2``).
SCAN_FLAGS = 4096


def _outputs(a: DispatchOperands):
    if a.recv_scales is None:
        return (a.recv_x, a.recv_counts, a.rowmap)
    return (a.recv_x, a.recv_counts, a.rowmap, a.recv_scales)


class MoeDispatch(Collective):
    name = "moe_dispatch"
    config_op = None  # untuned: ops/_moe.py moe_config

    def key(self, group, config, timeout_s, a: DispatchOperands):
        return (self.name, group, tensor_desc(a.x), tensor_desc(a.topk_idx), a.num_experts,
                a.max_tokens, tensor_desc(a.recv_x), tensor_desc(a.recv_counts),
                tensor_desc(a.rowmap), tensor_desc(a.recv_scales), config,
                env.timeout_key(timeout_s))

    def uniform(self, a: DispatchOperands):
        return {"recv_x": a.recv_x, "rowmap": a.rowmap}

    def validate(self, group, a: DispatchOperands):
        check_dispatch(self.name, a, dist.get_world_size(group))

    def prepare(self, group, config, timeout_s, a: DispatchOperands):
        make_error = bad_expert_error(self.name, a.num_experts)
        buf = find_buffer(group)
        ctx = ctx_for(buf, a.x.device)
        M, H, K = a.max_tokens, a.x.shape[1], a.topk_idx.shape[1]
        cfg = config or moe_config(H)
        if ctx is not None:
            world, EL, esize = ctx.world, a.recv_x.shape[0], a.x.element_size()
            rsize = a.recv_x.element_size()  # of the rows on the link: FP8 or x's
            groups = 0 if a.recv_scales is None else scale_groups(H)
            grid = cfg.row_grid(M, ctx.grid_cap)
            x_off = area_start(buf, (a.x, M * H * esize),
                               (a.topk_idx, M * K * a.topk_idx.element_size()))
            meta_off = up(x_off + world * M * H * rsize)
            sc_off = up(meta_off + world * M * K * 4)
            cnt_off = up(sc_off + world * M * groups * 4)
            if symm_usable(buf, a.x.device, cnt_off + grid * world * EL * 4):
                aligned = (H * esize) % ALIGN == 0 and (H * rsize) % ALIGN == 0 and aligned16(
                    addr(ctx, a.x), a.recv_x.data_ptr(), ctx.local_base + x_off)
                kern = _kernel_launch(ctx, cfg, grid, a, (x_off, meta_off, sc_off, cnt_off),
                                      aligned, timeout_s)
                return MoePlan("barrier", make_error, _outputs, kern, ConfigChoice(cfg))
        return MoePlan("fallback", make_error, _outputs, fallback=fallback.dispatch, group=group)


def _kernel_launch(ctx, cfg: LaunchConfig, grid: int, a: DispatchOperands, offsets, aligned,
                   timeout_s) -> Launch:
    """The launch of ``_moe_dispatch_kernel``: its arguments, listed here only."""
    (T, H), K, M = a.x.shape, a.topk_idx.shape[1], a.max_tokens
    EL, E_P2 = a.recv_x.shape[0], p2(a.num_experts)
    fp8 = a.recv_scales is not None
    q_dtype, q_max = FP8[FP8_DTYPE] if fp8 else (TL_DTYPE[a.x.dtype], 0.0)
    return Launch.on(
        ctx, OP.name, _moe_dispatch_kernel, grid, cfg.num_warps,
        (addr(ctx, a.x), addr(ctx, a.topk_idx), a.recv_x.data_ptr(), a.recv_counts.data_ptr(),
         a.rowmap.data_ptr(), a.recv_scales.data_ptr() if fp8 else 0, ctx.buf_table,
         ctx.sig_table, ctx.err_addr, ctx.err_addr + 4 * C.COUNTS_ERROR_WORD, ctx.grid_cap, T, M,
         H, *offsets, env.timeout_ns(timeout_s)),
        dict(DTYPE=TL_DTYPE[a.x.dtype], IDX_DTYPE=TL_COUNTS[a.topk_idx.dtype], K=K, K_P2=p2(K),
             EL=EL, EL_P2=p2(EL), E_P2=E_P2, BT=min(p2(M), max(1, SCAN_FLAGS // E_P2)),
             BLOCK_H=max(cfg.block_size, FP8_GROUP) if fp8 else cfg.block_size,
             ALIGNED=aligned, QUANT=fp8, Q_DTYPE=q_dtype, Q_MAX=q_max, Q_GROUP=FP8_GROUP))


OP = MoeDispatch()


def _new_outputs(x, topk_idx, num_experts, group, max_tokens, use_fp8):
    """``(recv_x, recv_counts, rowmap, recv_scales)``, new, for the dispatch of ``x`` (checked
    far enough to size them; the rest is checked on the plan driver's path); ``recv_scales``
    ``None`` without ``use_fp8``."""
    fp8 = check_use_fp8(OP.name, use_fp8)
    world = dist.get_world_size(resolve_group(group, "group"))
    check_tensor("x", x, dtypes=ROW_DTYPES)
    if x.dim() != 2:
        raise ValueError(f"{OP.name}: x must be [tokens, hidden], got shape {tuple(x.shape)}")
    check_routing(OP.name, "x", x, topk_idx)
    EL = check_experts(OP.name, num_experts, world) // world
    M = check_count("max_tokens_per_rank", max_tokens)
    H = x.shape[1]
    scales = None
    if fp8:
        scales = torch.empty((EL, world * M, scale_groups(H)), dtype=torch.float32,
                             device=x.device)
    return (torch.empty((EL, world * M, H), dtype=FP8_DTYPE if fp8 else x.dtype, device=x.device),
            torch.empty(EL, dtype=torch.int32, device=x.device),
            torch.empty((world, M, topk_idx.shape[1]), dtype=torch.int32, device=x.device),
            scales)


def _traced(x, topk_idx, num_experts, group=None, *, max_tokens_per_rank, use_fp8=False,
            config=None, timeout_s=None):
    """Under ``torch.compile``: the outputs, then ``torch.ops.symmtriton.moe_dispatch``."""
    eager_only(OP.name, config, timeout_s)
    recv_x, counts, rowmap, scales = _new_outputs(x, topk_idx, num_experts, group,
                                                  max_tokens_per_rank, use_fp8)
    torch.ops.symmtriton.moe_dispatch(x, topk_idx, num_experts, max_tokens_per_rank,
                                      group_name(group), recv_x, counts, rowmap, scales)
    return recv_x, MoeHandle(counts, rowmap, num_experts, x.shape[0], scales)


@sequenced(_traced)
def moe_dispatch(x, topk_idx, num_experts: int, group=None, *, max_tokens_per_rank: int,
                 use_fp8: bool = False, config: LaunchConfig | None = None,
                 timeout_s: float | None = None):
    """Send every token of ``x`` ``[T, H]`` (bf16, fp16 or fp32; ``T <= max_tokens_per_rank``,
    ``T`` may differ between ranks and be 0) to the ranks owning its experts ``topk_idx``
    ``[T, K]`` (int32/int64 on the device; -1 = unused slot): expert ``e`` of ``num_experts``
    lives on rank ``e // (num_experts / W)``. A token crosses to a rank once however many of its
    experts that rank owns. Returns ``(recv_x, handle)``: ``recv_x`` ``[E/W, W *
    max_tokens_per_rank, H]`` holds, per local expert, the rows routed to it packed from row 0 in
    the order (source rank, token index); ``handle.recv_counts`` (int32 ``[E/W]`` on the device)
    counts them (rows past it are unspecified). Nothing is read back to the host, so a captured
    CUDA graph replays with new routing.

    ``use_fp8=True`` (a bool): each token is quantised once, on its rank, before it is sent, and
    crosses as ``torch.float8_e4m3fn`` with one fp32 scale per group of 128 channels (the last
    group shorter where ``H`` is not a multiple of 128): ``scale = amax(|x[t, group]|) / 448``
    (1 for a group of zeros), value ``clamp(x / scale, -448, 448)`` rounded to the nearest
    e4m3fn (both divisions rounded to nearest, as torch's). ``recv_x`` is then
    ``float8_e4m3fn`` and ``handle.recv_scales`` fp32 ``[E/W, W * max_tokens_per_rank,
    ceil(H / 128)]`` holds each row's scales (``recv_x * scale`` dequantises; rows past the
    counts unspecified); without it ``handle.recv_scales`` is ``None``. The combine takes the
    experts' output in its own dtype either way.

    Staged through the group's symmetric buffer (``torch.distributed`` where it cannot carry the
    call); an expert id out of range raises ``ValueError`` (see the module docstring). Under
    ``torch.compile`` it traces as ``torch.ops.symmtriton.moe_dispatch``."""
    recv_x, counts, rowmap, scales = _new_outputs(x, topk_idx, num_experts, group,
                                                  max_tokens_per_rank, use_fp8)
    call(OP, group, config, timeout_s, record(DispatchOperands, (
        x, topk_idx, num_experts, max_tokens_per_rank, recv_x, counts, rowmap, scales)))
    return recv_x, MoeHandle(counts, rowmap, num_experts, x.shape[0], scales)


def _traced_into(x, topk_idx, num_experts, max_tokens_per_rank, recv_x, recv_counts, rowmap,
                 recv_scales=None, group=None):
    torch.ops.symmtriton.moe_dispatch(x, topk_idx, num_experts, max_tokens_per_rank,
                                      group_name(group), recv_x, recv_counts, rowmap, recv_scales)


@sequenced(_traced_into)
def dispatch_into(x, topk_idx, num_experts, max_tokens_per_rank, recv_x, recv_counts, rowmap,
                  recv_scales=None, group=None) -> None:
    """:func:`moe_dispatch` into given outputs: what ``torch.ops.symmtriton.moe_dispatch``
    runs (FP8 where ``recv_scales`` is given)."""
    call(OP, group, None, None, record(DispatchOperands, (
        x, topk_idx, num_experts, max_tokens_per_rank, recv_x, recv_counts, rowmap,
        recv_scales)))
