"""What ``moe_dispatch`` and ``moe_combine`` (symmtriton/ops/moe_dispatch.py,
symmtriton/ops/moe_combine.py) share: the handle that links them, the checks of their operands
(``ValueError`` / ``TypeError`` naming the bad value, before anything is launched; the operand
records are in ``ops/_operands.py``), their launch config, where their areas lie in the buffer,
the error of an expert id out of range, and their plan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from .. import counts as C
from .. import presets
from ..config import ALIGN, LaunchConfig, size_bucket
from ..context import context
from ..launch import Launch
from ..validation import check_count, check_disjoint, check_tensor
from .driver import STALE, ConfigChoice, bump_versions


class MoeHandle(NamedTuple):
    """What :func:`moe_combine` needs of its :func:`moe_dispatch`: ``recv_counts`` (int32
    ``[E/W]``, rows per local expert), ``rowmap`` (int32 ``[W, M, K]``: the row of ``recv_x``,
    flat over ``[E/W, W * M]``, of each source rank's token and slot, -1 where this rank does
    not own the slot's expert), the expert count and this rank's token count; and
    ``recv_scales``: with ``use_fp8=True`` the fp32 scales of ``recv_x``'s FP8 rows, ``[E/W, W *
    M, ceil(H / 128)]`` (one per row and group of 128 channels), else ``None``."""

    recv_counts: torch.Tensor
    rowmap: torch.Tensor
    num_experts: int
    tokens: int
    recv_scales: torch.Tensor | None = None


#: dtypes of the token rows (x, expert_out) and of the routing.
ROW_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
IDX_DTYPES = (torch.int32, torch.int64)
WEIGHT_DTYPES = ROW_DTYPES
#: most experts per token (the kernels unroll a loop over the slots).
MAX_TOPK = 64
#: most experts in all (one block scans the routing with a flag per expert).
MAX_EXPERTS = 4096
#: ``use_fp8=True``: the dtype of the rows on the link and of ``recv_x`` (its Triton type and
#: largest finite value: ``ops/_quant.py`` ``FP8``), and the channels per scale.
FP8_DTYPE, FP8_GROUP = torch.float8_e4m3fn, 128


def scale_groups(hidden: int) -> int:
    """Scales per FP8 row: one per ``FP8_GROUP`` channels, the last group shorter."""
    return -(-hidden // FP8_GROUP)


def check_use_fp8(op: str, use_fp8) -> bool:
    """``use_fp8`` is a bool (``TypeError`` naming the value otherwise)."""
    if not isinstance(use_fp8, bool):
        raise TypeError(f"{op}: use_fp8 must be a bool, got {type(use_fp8).__name__} "
                        f"{use_fp8!r}")
    return use_fp8


def check_experts(op: str, num_experts, world: int) -> int:
    """``num_experts`` is a positive int divisible by ``world``, at most ``MAX_EXPERTS``."""
    check_count("num_experts", num_experts)
    if num_experts % world:
        raise ValueError(f"{op}: num_experts={num_experts} is not divisible by the group size "
                         f"{world} (every rank owns num_experts / {world} experts)")
    if num_experts > MAX_EXPERTS:
        raise ValueError(f"{op}: num_experts={num_experts} exceeds {MAX_EXPERTS}")
    return num_experts


def check_routing(op: str, x_name: str, x: torch.Tensor, topk_idx) -> int:
    """``x`` ``[T, H]`` (checked already) and ``topk_idx`` ``[T, K]`` int32/int64 on its device;
    returns ``K``."""
    check_tensor("topk_idx", topk_idx, dtypes=IDX_DTYPES)
    if topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: topk_idx shape {tuple(topk_idx.shape)} must be [{x.shape[0]}, K] "
                         f"({x_name} has {x.shape[0]} tokens)")
    if not 1 <= topk_idx.shape[1] <= MAX_TOPK:
        raise ValueError(f"{op}: topk_idx has K={topk_idx.shape[1]} experts per token; supported: "
                         f"1 to {MAX_TOPK}")
    if topk_idx.device != x.device:
        raise ValueError(f"{op}: topk_idx is on {topk_idx.device} but {x_name} is on {x.device}")
    return topk_idx.shape[1]


def _check_rows(op: str, name: str, t, dims: int) -> None:
    check_tensor(name, t, dtypes=ROW_DTYPES)
    if t.dim() != dims:
        raise ValueError(f"{op}: {name} must have {dims} dimensions, got shape {tuple(t.shape)}")
    if t.shape[-1] < 1:
        raise ValueError(f"{op}: {name} has hidden size 0 (shape {tuple(t.shape)})")


def check_dispatch(op: str, a, world: int) -> None:
    """The operands of a dispatch (``_operands.DispatchOperands``)."""
    _check_rows(op, "x", a.x, 2)
    K = check_routing(op, "x", a.x, a.topk_idx)
    E = check_experts(op, a.num_experts, world)
    M = check_count("max_tokens_per_rank", a.max_tokens)
    (T, H), EL = a.x.shape, E // world
    if T > M:
        raise ValueError(f"{op}: x has {T} tokens, more than max_tokens_per_rank={M}")
    fp8 = a.recv_scales is not None
    expect = {"recv_x": ((EL, world * M, H), FP8_DTYPE if fp8 else a.x.dtype),
              "recv_counts": ((EL,), torch.int32), "rowmap": ((world, M, K), torch.int32)}
    if fp8:
        expect["recv_scales"] = ((EL, world * M, scale_groups(H)), torch.float32)
    for name, (shape, dtype) in expect.items():
        t = getattr(a, name)
        check_tensor(name, t, dtypes=(dtype,))
        if tuple(t.shape) != shape or t.device != a.x.device:
            raise ValueError(f"{op}: {name} must be {list(shape)} on {a.x.device}, got "
                             f"{tuple(t.shape)} on {t.device}")
    check_disjoint(op, [(n, getattr(a, n)) for n in ("x", "topk_idx", *expect)])


def check_combine(op: str, a, world: int) -> None:
    """The operands of a combine (``_operands.CombineOperands``)."""
    _check_rows(op, "expert_out", a.expert_out, 3)
    check_tensor("handle.rowmap", a.rowmap, dtypes=(torch.int32,))
    E = check_experts(op, a.num_experts, world)
    if a.rowmap.dim() != 3 or a.rowmap.shape[0] != world:
        raise ValueError(f"{op}: handle.rowmap shape {tuple(a.rowmap.shape)} is not [{world}, M, "
                         "K]: pass the handle of a moe_dispatch on this group")
    _, M, K = a.rowmap.shape
    H = a.expert_out.shape[2]
    if tuple(a.expert_out.shape) != (E // world, world * M, H):
        raise ValueError(f"{op}: expert_out shape {tuple(a.expert_out.shape)} must be recv_x's, "
                         f"[{E // world}, {world * M}, H]")
    _check_rows(op, "out", a.out, 2)
    if check_routing(op, "out", a.out, a.topk_idx) != K:
        raise ValueError(f"{op}: topk_idx has K={a.topk_idx.shape[1]} but the dispatch had K={K}")
    check_tensor("topk_weights", a.topk_weights, dtypes=WEIGHT_DTYPES)
    if tuple(a.topk_weights.shape) != tuple(a.topk_idx.shape):
        raise ValueError(f"{op}: topk_weights shape {tuple(a.topk_weights.shape)} differs from "
                         f"topk_idx shape {tuple(a.topk_idx.shape)} (K mismatch or token count)")
    for name in ("expert_out", "topk_weights", "rowmap"):
        if getattr(a, name).device != a.out.device:
            raise ValueError(f"{op}: {name} is on {getattr(a, name).device} but out is on "
                             f"{a.out.device}")
    if a.out.dtype != a.expert_out.dtype or a.out.shape[1] != H or a.out.shape[0] > M:
        raise ValueError(f"{op}: out must be [T <= {M}, {H}] of {a.expert_out.dtype}, got "
                         f"{tuple(a.out.shape)} of {a.out.dtype}")
    check_disjoint(op, [(n, getattr(a, n)) for n in ("out", "expert_out", "topk_idx",
                                                     "topk_weights", "rowmap")])


# -- launch config, areas, errors, plan ------------------------------------------------------------
#: bytes of one chunk of a row (fp32 accumulators of the combine: ``BLOCK_H * 4``).
MOE_CHUNK_BYTES = 32768


def moe_config(hidden: int) -> LaunchConfig:
    """Chunks of a row of at most ``MOE_CHUNK_BYTES`` of fp32 (a power of two, the whole row
    when it fits), 512 elements per warp, one token per block up to the default grid bound."""
    block = min(size_bucket(hidden), MOE_CHUNK_BYTES // 4)
    return LaunchConfig(block, max(1, min(16, block // 512)), presets.DEFAULT_MAX_BLOCKS)


def p2(n: int) -> int:
    """The power of two at or above ``n`` (1 for 0): a constexpr's lane count."""
    return size_bucket(max(1, n))


def up(n: int) -> int:
    """``n`` rounded up to a 16-byte boundary."""
    return -(-n // ALIGN) * ALIGN


def area_start(buf, *extents) -> int:
    """First 16-byte-aligned offset past every ``(tensor, bytes)`` whose tensor lies in ``buf``
    (its extent counted as ``bytes``: the capacity, alike on every rank)."""
    end = 0
    for t, nbytes in extents:
        off = buf.byte_offset_of(t)
        if off is not None:
            end = max(end, off + nbytes)
    return up(end)


def addr(ctx, t: torch.Tensor) -> int:
    """``t``'s address; the buffer's for an empty tensor (which may have none: 0 tokens)."""
    return t.data_ptr() if t.numel() else ctx.local_base


def ctx_for(buf, device):
    """The launch context, or ``None`` when the buffer has no symmetric memory on ``device``."""
    if buf.symm_mem_hdl is None or device != buf.device:
        return None
    return context(buf)


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
    """``path`` ``"barrier"``: launch ``kernel`` (after raising the error an earlier call left in
    the counts error word); ``"fallback"``: run ``fallback(operands, group, make_error)``.
    ``outputs(operands)``: the tensors a call writes."""

    path: str
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
