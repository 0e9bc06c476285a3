"""``moe_dispatch`` / ``moe_combine``: host side of kernels/moe_dispatch.py and
kernels/moe_combine.py (expert parallelism, all-to-all in DeepEP's low-latency layout).

A dispatch returns ``recv_x`` and a :class:`MoeHandle`; its combine takes the handle. Outputs are
new tensors per call (a plan is kept per set of operand addresses, so a loop whose tensors come
back at the same addresses, or a CUDA graph, reuses it). Operands are staged through the
group's buffer inside the launch (areas past every operand that lies in the buffer); where the
buffer cannot carry the call, :mod:`._moe_fallback` moves the same rows with
``torch.distributed``. An expert id out of range is skipped on the device and raises
``ValueError`` through the counts error word (:mod:`symmtriton.counts`): at once on the host
backend, at the next MoE or variable-count call or :func:`symmtriton.synchronize` on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from .. import counts as C
from .. import env, presets
from ..config import ALIGN, LaunchConfig, aligned16, size_bucket
from ..context import context, find_buffer, symm_usable
from ..kernels.moe_combine import _moe_combine_kernel
from ..kernels.moe_dispatch import _moe_dispatch_kernel
from ..launch import Launch
from . import _moe_fallback as fallback
from .._calls import counts_calls
from ..memory import resolve_group
from ..validation import check_count, check_tensor
from ._moe_operands import (ROW_DTYPES, CombineOperands, DispatchOperands, MoeHandle,
                            check_combine, check_dispatch, check_experts, check_routing)
from ._vcommon import TL_COUNTS
from .driver import (STALE, TL_DTYPE, Collective, ConfigChoice, bump_versions, call, compiling,
                     group_name, tensor_desc)

#: bytes of one chunk of a row (fp32 accumulators of the combine: ``BLOCK_H * 4``).
MOE_CHUNK_BYTES = 32768
#: most (token, expert) flags one block holds while it scans the routing (``BT * E_P2``).
SCAN_FLAGS = 4096


def moe_config(hidden: int, dtype: torch.dtype) -> LaunchConfig:
    """Chunks of a row of at most ``MOE_CHUNK_BYTES`` of fp32 (a power of two, the whole row
    when it fits), 512 elements per warp, one token per block up to the default grid bound."""
    block = min(size_bucket(hidden), MOE_CHUNK_BYTES // 4)
    return LaunchConfig(block, max(1, min(16, block // 512)), presets.DEFAULT_MAX_BLOCKS)


def _p2(n: int) -> int:
    return size_bucket(max(1, n))


def _area_start(buf, *extents) -> int:
    """First 16-byte-aligned offset past every ``(tensor, bytes)`` whose tensor lies in ``buf``
    (its extent counted as ``bytes``: the capacity, alike on every rank)."""
    end = 0
    for t, nbytes in extents:
        off = buf.byte_offset_of(t)
        if off is not None:
            end = max(end, off + nbytes)
    return _up(end)


def _up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def bad_expert_error(op: str, num_experts: int):
    """``make(code, where, launched) -> ValueError`` for an expert id out of range
    (:func:`symmtriton.counts.remember_error`)."""
    def make(code, where, launched):
        err = ValueError(f"{op if where is None else f'{where} ({op})'}: topk_idx holds an "
                         f"expert id outside [-1, {num_experts}); the kernel skipped it (nothing "
                         "was written out of bounds), so the routed rows are incomplete")
        err.launched = launched
        return err
    return make


@dataclass(eq=False)
class MoePlan:
    """Launch ``kernel`` (after raising an error an earlier call left in the counts error
    word), or run ``fallback(operands, group, make_error)``."""

    make_error: Callable
    outputs: Callable
    kernel: Launch | None = None
    choice: ConfigChoice | None = None
    fallback: Callable | None = None
    group: object = None

    def run(self, a, config):
        bump_versions(self.outputs(a))
        if self.fallback is not None:
            self.fallback(a, self.group, self.make_error)
            return a
        if not self.choice.current():
            return STALE
        kern = self.kernel
        C.check_error(kern.buf, kern.status)
        C.remember_error(kern.buf, self.make_error)
        kern.launch()
        if kern.sync_check:
            C.check_error(kern.buf, kern.status, launched=True)
        return a


def _ctx_for(buf, device):
    """The launch context, or ``None`` when the buffer has no symmetric memory on ``device``."""
    if buf.symm_mem_hdl is None or device != buf.device:
        return None
    return context(buf)


class MoeDispatch(Collective):
    name = "moe_dispatch"
    config_op = None  # untuned: moe_config

    def key(self, group, config, timeout_s, a):
        return (self.name, group, tensor_desc(a.x), tensor_desc(a.topk_idx), a.num_experts,
                a.max_tokens, tensor_desc(a.recv_x), tensor_desc(a.recv_counts),
                tensor_desc(a.rowmap), config, env.timeout_key(timeout_s))

    def uniform(self, a):
        return {"recv_x": a.recv_x, "rowmap": a.rowmap}

    def validate(self, group, a):
        check_dispatch(self.name, a, dist.get_world_size(group))

    def prepare(self, group, config, timeout_s, a):
        make_error = bad_expert_error(self.name, a.num_experts)
        outputs = _dispatch_outputs
        buf = find_buffer(group)
        ctx = _ctx_for(buf, a.x.device)
        M, (T, H), K = a.max_tokens, a.x.shape, a.topk_idx.shape[1]
        cfg = config or moe_config(H, a.x.dtype)
        if ctx is not None:
            world, EL = ctx.world, a.recv_x.shape[0]
            grid = cfg.row_grid(M, ctx.grid_cap)
            x_off = _area_start(buf, (a.x, M * H * a.x.element_size()),
                                (a.topk_idx, M * K * a.topk_idx.element_size()))
            meta_off = _up(x_off + world * M * H * a.x.element_size())
            cnt_off = _up(meta_off + world * M * K * 4)
            if symm_usable(buf, a.x.device, cnt_off + grid * world * EL * 4):
                aligned = (H * a.x.element_size()) % ALIGN == 0 and aligned16(
                    _addr(ctx, a.x), a.recv_x.data_ptr(), ctx.local_base + x_off)
                kern = _dispatch_launch(ctx, cfg, grid, a, (x_off, meta_off, cnt_off), aligned,
                                        timeout_s)
                return MoePlan(make_error, outputs, kern, ConfigChoice(cfg))
        return MoePlan(make_error, outputs, fallback=fallback.dispatch, group=group)


def _addr(ctx, t: torch.Tensor) -> int:
    """``t``'s address; the buffer's for an empty tensor (which may have none: 0 tokens)."""
    return t.data_ptr() if t.numel() else ctx.local_base


def _dispatch_outputs(a):
    return (a.recv_x, a.recv_counts, a.rowmap)


def _dispatch_launch(ctx, cfg, grid, a, offsets, aligned, timeout_s) -> Launch:
    """The launch of ``_moe_dispatch_kernel``: its arguments, listed here only."""
    (T, H), K, M = a.x.shape, a.topk_idx.shape[1], a.max_tokens
    EL = a.recv_x.shape[0]
    E_P2 = _p2(a.num_experts)
    return Launch(
        DISPATCH.name, ctx.buf, _moe_dispatch_kernel, grid, cfg.num_warps,
        (_addr(ctx, a.x), _addr(ctx, a.topk_idx), a.recv_x.data_ptr(), a.recv_counts.data_ptr(),
         a.rowmap.data_ptr(), ctx.buf_table, ctx.sig_table, ctx.err_addr,
         ctx.err_addr + 4 * C.COUNTS_ERROR_WORD, ctx.grid_cap, T, M, H, *offsets,
         env.timeout_ns(timeout_s)),
        dict(DTYPE=TL_DTYPE[a.x.dtype], IDX_DTYPE=TL_COUNTS[a.topk_idx.dtype], K=K, K_P2=_p2(K),
             EL=EL, EL_P2=_p2(EL), E_P2=E_P2, BT=min(_p2(M), max(1, SCAN_FLAGS // E_P2)),
             BLOCK_H=cfg.block_size, RANK=ctx.rank, WORLD_SIZE=ctx.world,
             WORLD_P2=ctx.world_p2, SCOPE=ctx.scope, USE_PTX=ctx.use_ptx, ALIGNED=aligned))


class MoeCombine(Collective):
    name = "moe_combine"
    config_op = None  # untuned: moe_config

    def key(self, group, config, timeout_s, a):
        return (self.name, group, tensor_desc(a.expert_out), tensor_desc(a.topk_idx),
                tensor_desc(a.topk_weights), tensor_desc(a.rowmap), a.num_experts,
                tensor_desc(a.out), config, env.timeout_key(timeout_s))

    def uniform(self, a):
        return {"expert_out": a.expert_out, "rowmap": a.rowmap}

    def validate(self, group, a):
        check_combine(self.name, a, dist.get_world_size(group))

    def prepare(self, group, config, timeout_s, a):
        make_error = bad_expert_error(self.name, a.num_experts)
        outputs = _combine_outputs
        buf = find_buffer(group)
        ctx = _ctx_for(buf, a.out.device)
        world, M, K = a.rowmap.shape
        H = a.out.shape[1]
        cfg = config or moe_config(H, a.out.dtype)
        if ctx is not None:
            wts_off = _area_start(buf, (a.expert_out, a.expert_out.nbytes),
                                  (a.topk_idx, M * K * a.topk_idx.element_size()),
                                  (a.topk_weights, M * K * a.topk_weights.element_size()),
                                  (a.out, M * H * a.out.element_size()))
            part_off = _up(wts_off + M * K * 4)
            if symm_usable(buf, a.out.device, part_off + world * M * H * 4):
                aligned = (H * a.out.element_size()) % ALIGN == 0 and H % 4 == 0 and aligned16(
                    a.expert_out.data_ptr(), _addr(ctx, a.out), ctx.local_base + part_off)
                kern = _combine_launch(ctx, cfg, cfg.row_grid(M, ctx.grid_cap), a,
                                       (wts_off, part_off), aligned, timeout_s)
                return MoePlan(make_error, outputs, kern, ConfigChoice(cfg))
        return MoePlan(make_error, outputs, fallback=fallback.combine, group=group)


def _combine_outputs(a):
    return (a.out,)


def _combine_launch(ctx, cfg, grid, a, offsets, aligned, timeout_s) -> Launch:
    """The launch of ``_moe_combine_kernel``: its arguments, listed here only."""
    world, M, K = a.rowmap.shape
    T, H = a.out.shape
    EL = a.expert_out.shape[0]
    return Launch(
        COMBINE.name, ctx.buf, _moe_combine_kernel, grid, cfg.num_warps,
        (a.expert_out.data_ptr(), _addr(ctx, a.topk_weights), _addr(ctx, a.topk_idx),
         _addr(ctx, a.out), a.rowmap.data_ptr(), ctx.buf_table, ctx.sig_table, ctx.err_addr,
         ctx.err_addr + 4 * C.COUNTS_ERROR_WORD, ctx.grid_cap, T, M, H, *offsets,
         env.timeout_ns(timeout_s)),
        dict(DTYPE=TL_DTYPE[a.out.dtype], W_DTYPE=TL_DTYPE[a.topk_weights.dtype],
             IDX_DTYPE=TL_COUNTS[a.topk_idx.dtype], K=K, K_P2=_p2(K), EL=EL,
             BLOCK_H=cfg.block_size, RANK=ctx.rank, WORLD_SIZE=ctx.world,
             WORLD_P2=ctx.world_p2, SCOPE=ctx.scope, USE_PTX=ctx.use_ptx, ALIGNED=aligned))


DISPATCH = MoeDispatch()
COMBINE = MoeCombine()


def _world(group) -> int:
    return dist.get_world_size(resolve_group(group, "group"))


def _dispatch_tensors(x, topk_idx, num_experts, world: int, max_tokens):
    """``(recv_x, recv_counts, rowmap)``, new, for the dispatch of ``x`` (checked far enough to
    size them; the rest is checked on the plan driver's path)."""
    op = DISPATCH.name
    check_tensor("x", x, dtypes=ROW_DTYPES)
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be [tokens, hidden], got shape {tuple(x.shape)}")
    check_routing(op, "x", x, topk_idx)
    EL = check_experts(op, num_experts, world) // world
    M = check_count("max_tokens_per_rank", max_tokens)
    return (x.new_empty((EL, world * M, x.shape[1])),
            torch.empty(EL, dtype=torch.int32, device=x.device),
            torch.empty((world, M, topk_idx.shape[1]), dtype=torch.int32, device=x.device))


@counts_calls
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
    CUDA graph replays with new routing. ``use_fp8=True`` is not supported yet (``ValueError``).

    Staged through the group's symmetric buffer (``torch.distributed`` where it cannot carry the
    call); an expert id out of range raises ``ValueError`` (see the module docstring). Under
    ``torch.compile`` it traces as ``torch.ops.symmtriton.moe_dispatch``."""
    if use_fp8:
        raise ValueError("moe_dispatch: use_fp8=True is not supported yet")
    world = _world(group)
    recv_x, recv_counts, rowmap = _dispatch_tensors(x, topk_idx, num_experts, world,
                                                    max_tokens_per_rank)
    if compiling(DISPATCH.name, config, timeout_s):
        torch.ops.symmtriton.moe_dispatch(x, topk_idx, num_experts, max_tokens_per_rank,
                                          group_name(group), recv_x, recv_counts, rowmap)
    else:
        call(DISPATCH, group, config, timeout_s, DispatchOperands(
            x, topk_idx, num_experts, max_tokens_per_rank, recv_x, recv_counts, rowmap))
    return recv_x, MoeHandle(recv_counts, rowmap, num_experts, x.shape[0])


@counts_calls
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
    if not isinstance(handle, MoeHandle):
        raise TypeError(f"moe_combine: handle must be the MoeHandle moe_dispatch returned, got "
                        f"{type(handle).__name__}")
    if out is None:
        check_tensor("expert_out", expert_out, dtypes=ROW_DTYPES)
        out = expert_out.new_empty((handle.tokens, expert_out.shape[-1]))
    if compiling(COMBINE.name, config, timeout_s):
        torch.ops.symmtriton.moe_combine(expert_out, topk_idx, topk_weights, handle.rowmap,
                                         handle.num_experts, group_name(group), out)
    else:
        call(COMBINE, group, config, timeout_s, CombineOperands(
            expert_out, topk_idx, topk_weights, handle.rowmap, handle.num_experts, out))
    return out


@counts_calls
def dispatch_into(x, topk_idx, num_experts, max_tokens_per_rank, recv_x, recv_counts, rowmap,
                  group=None) -> None:
    """:func:`moe_dispatch` into given outputs (the custom op's body)."""
    call(DISPATCH, group, None, None, DispatchOperands(x, topk_idx, num_experts,
                                                       max_tokens_per_rank, recv_x, recv_counts,
                                                       rowmap))


@counts_calls
def combine_into(expert_out, topk_idx, topk_weights, rowmap, num_experts, out,
                 group=None) -> None:
    """:func:`moe_combine` with the handle's ``rowmap`` (the custom op's body)."""
    call(COMBINE, group, None, None, CombineOperands(expert_out, topk_idx, topk_weights, rowmap,
                                                     num_experts, out))
