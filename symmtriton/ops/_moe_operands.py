"""The operands of ``moe_dispatch`` / ``moe_combine`` (symmtriton/ops/moe.py): their records,
the handle that links the two, and their checks (``ValueError`` / ``TypeError`` naming the bad
value, before anything is launched)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..validation import check_count, check_disjoint, check_tensor


class MoeHandle(NamedTuple):
    """What :func:`moe_combine` needs of its :func:`moe_dispatch`: ``recv_counts`` (int32
    ``[E/W]``, rows per local expert), ``rowmap`` (int32 ``[W, M, K]``: the row of ``recv_x``,
    flat over ``[E/W, W * M]``, of each source rank's token and slot, -1 where this rank does
    not own the slot's expert), the expert count and this rank's token count."""

    recv_counts: torch.Tensor
    rowmap: torch.Tensor
    num_experts: int
    tokens: int


class DispatchOperands(NamedTuple):
    """A dispatch of ``x`` routed by ``topk_idx`` into ``recv_x``, ``recv_counts`` and
    ``rowmap`` (``max_tokens``: ``max_tokens_per_rank``)."""

    x: torch.Tensor
    topk_idx: torch.Tensor
    num_experts: int
    max_tokens: int
    recv_x: torch.Tensor
    recv_counts: torch.Tensor
    rowmap: torch.Tensor


class CombineOperands(NamedTuple):
    """A combine of ``expert_out`` by the dispatch's ``rowmap`` into ``out``."""

    expert_out: torch.Tensor
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    rowmap: torch.Tensor
    num_experts: int
    out: torch.Tensor


#: dtypes of the token rows (x, expert_out) and of the routing.
ROW_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
IDX_DTYPES = (torch.int32, torch.int64)
WEIGHT_DTYPES = ROW_DTYPES
#: most experts per token (the kernels unroll a loop over the slots).
MAX_TOPK = 64
#: most experts in all (one block scans the routing with a flag per expert).
MAX_EXPERTS = 4096


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
    """The operands of a dispatch (``ops.moe.DispatchOperands``)."""
    _check_rows(op, "x", a.x, 2)
    K = check_routing(op, "x", a.x, a.topk_idx)
    E = check_experts(op, a.num_experts, world)
    M = check_count("max_tokens_per_rank", a.max_tokens)
    (T, H), EL = a.x.shape, E // world
    if T > M:
        raise ValueError(f"{op}: x has {T} tokens, more than max_tokens_per_rank={M}")
    expect = {"recv_x": ((EL, world * M, H), a.x.dtype), "recv_counts": ((EL,), torch.int32),
              "rowmap": ((world, M, K), torch.int32)}
    for name, (shape, dtype) in expect.items():
        t = getattr(a, name)
        check_tensor(name, t, dtypes=(dtype,))
        if tuple(t.shape) != shape or t.device != a.x.device:
            raise ValueError(f"{op}: {name} must be {list(shape)} on {a.x.device}, got "
                             f"{tuple(t.shape)} on {t.device}")
    check_disjoint(op, [(n, getattr(a, n)) for n in ("x", "topk_idx", *expect)])


def check_combine(op: str, a, world: int) -> None:
    """The operands of a combine (``ops.moe.CombineOperands``)."""
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
