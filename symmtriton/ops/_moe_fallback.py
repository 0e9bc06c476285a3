"""The ``torch.distributed`` path of ``moe_dispatch`` / ``moe_combine`` (ops/moe_dispatch.py,
ops/moe_combine.py), for calls symmetric memory cannot carry: the same results and the same
``rowmap`` as the kernels (kernels/moe_dispatch.py), so a dispatch on one path pairs with a
combine on the other.

Both move padded, equal-split ``all_to_all_single`` messages (every rank sends ``M`` token slots
to every rank), so nothing is read back to the host but the expert-id check; that check is
skipped while a CUDA graph is being captured. With ``use_fp8=True`` the dispatch quantises the
rows before they move, as the kernel does (:func:`quantise_groups`), bit for bit alike.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from ._moe import FP8_DTYPE, FP8_GROUP, scale_groups
from ._quant import FP8
from .fallback import torch_all_gather


def _all_to_all(t: torch.Tensor, group) -> torch.Tensor:
    """``t`` ``[W, ...]`` with block ``d`` sent to rank ``d``; block ``r`` of the result came from
    rank ``r``. Moved as bytes (gloo has no all-to-all for every dtype)."""
    out = torch.empty_like(t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        dist.all_to_all_single(out.view(torch.uint8), t.contiguous().view(torch.uint8),
                               group=group)
    return out


def clean_ids(topk_idx: torch.Tensor, num_experts: int):
    """``(ids, bad)``: ``topk_idx`` as int64 with every unused or out-of-range slot -1, and
    whether an id was out of range (a device tensor: read it only where the host may wait)."""
    ids = topk_idx.long()
    bad = (ids < -1) | (ids >= num_experts)
    return torch.where(bad | (ids < 0), -1, ids), bad.any()


def _raise_bad(bad: torch.Tensor, make_error) -> None:
    """Raise ``make_error`` when ``bad`` (every rank made the call: ``launched``)."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return
    if bool(bad):
        raise make_error(0, None, True)


def quantise_groups(x: torch.Tensor):
    """``x`` ``[T, H]`` quantised per token and group of ``FP8_GROUP`` channels (the last one
    shorter), the kernel's rule (kernels/quant.py ``quant_groups``): ``(q, scales)``, ``q``
    ``FP8_DTYPE`` ``[T, H]``, ``scales`` fp32 ``[T, ceil(H / FP8_GROUP)]``."""
    (T, H), groups, q_max = x.shape, scale_groups(x.shape[1]), FP8[FP8_DTYPE][1]
    xf = torch.zeros((T, groups * FP8_GROUP), dtype=torch.float32, device=x.device)
    xf[:, :H] = x.float()
    xf = xf.view(T, groups, FP8_GROUP)
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scales = torch.where(amax > 0, amax / q_max, torch.ones_like(amax))
    q = (xf / scales).clamp(-q_max, q_max).view(T, groups * FP8_GROUP)[:, :H].to(FP8_DTYPE)
    return q, scales.view(T, groups)


def _sent_rows(a, world: int, M: int):
    """``[(rows, dst), ...]``: what the dispatch of ``a`` moves, ``rows`` ``[W, M, n]`` (this
    rank's tokens in every block, zeros past them), and where it lands, ``dst`` ``[rows, n]``:
    ``x`` into ``recv_x``, or its FP8 bytes into ``recv_x``'s and its scales into
    ``recv_scales``."""
    if a.recv_scales is None:
        pairs = [(a.x, a.recv_x)]
    else:
        q, scales = quantise_groups(a.x)
        pairs = [(q.view(torch.uint8), a.recv_x.view(torch.uint8)), (scales, a.recv_scales)]
    out = []
    for src, dst in pairs:
        rows = src.new_zeros((world, M, src.shape[1]))
        rows[:, :src.shape[0]] = src
        out.append((rows, dst.view(-1, src.shape[1])))
    return out


def dispatch(a, group, make_error) -> None:
    """``moe_dispatch`` of the operands ``a`` (``_operands.DispatchOperands``) through
    ``torch.distributed``: writes ``a.recv_x``, ``a.recv_counts``, ``a.rowmap`` (and
    ``a.recv_scales`` with FP8)."""
    world = dist.get_world_size(group)
    T, K, M = a.x.shape[0], a.topk_idx.shape[1], a.max_tokens
    E = a.num_experts
    EL = E // world
    ids, bad = clean_ids(a.topk_idx, E)
    hot = torch.zeros(T, E + 1, dtype=torch.int32, device=a.x.device)
    hot.scatter_(1, torch.where(ids < 0, E, ids), 1)  # one per (token, expert), however named
    hot = hot[:, :E]
    pos = (hot.cumsum(0) - hot).gather(1, ids.clamp(min=0))  # the token's index in its expert
    dest = torch.where(ids >= 0, ids // EL, -1)
    ranks = torch.arange(world, device=a.x.device)[:, None, None]
    meta = torch.full((world, M, K), -1, dtype=torch.int32, device=a.x.device)
    meta[:, :T] = torch.where(dest[None] == ranks, (ids % EL) * M + pos, -1).int()
    meta = _all_to_all(meta, group)
    moved = [(_all_to_all(rows, group), dst) for rows, dst in _sent_rows(a, world, M)]
    cnt = _all_to_all(hot.sum(0, dtype=torch.int32).view(world, EL), group)  # [source, expert]
    offs = (cnt.cumsum(0, dtype=torch.int32) - cnt).long()
    j = torch.where(meta >= 0, meta // M, 0).long()
    rows = j * (world * M) + offs.gather(1, j.view(world, M * K)).view(world, M, K) + meta % M
    rows = torch.where(meta >= 0, rows, -1)
    a.rowmap.copy_(rows)
    a.recv_counts.copy_(cnt.sum(0))
    valid = rows >= 0
    src = torch.arange(world * M, device=a.x.device)[:, None].expand(world * M, K)
    for got, dst in moved:
        dst[rows[valid]] = got.view(world * M, -1)[src[valid.view(world * M, K)]]
    _raise_bad(bad, make_error)


def combine(a, group, make_error) -> None:
    """``moe_combine`` of the operands ``a`` (``_operands.CombineOperands``) through
    ``torch.distributed``: writes ``a.out``."""
    world, M, K = a.rowmap.shape
    T, H = a.out.shape
    E = a.num_experts
    dev = a.out.device
    w = torch.zeros(M, K, dtype=torch.float32, device=dev)
    w[:T] = a.topk_weights.float()
    weights = torch_all_gather(w.new_empty(world * M, K), w, group).view(world, M, K)
    flat = a.expert_out.view(-1, H)
    rows = a.rowmap.long()
    valid = (rows >= 0) & (rows < flat.shape[0])
    part = torch.zeros(world, M, H, dtype=torch.float32, device=dev)
    for k in range(K):  # slot order, as the kernel
        v = flat[rows[:, :, k].clamp(0, flat.shape[0] - 1)].float()
        part += torch.where(valid[:, :, k, None], weights[:, :, k, None] * v, 0.0)
    part = _all_to_all(part, group)  # [rank that computed it, token of this rank]
    ids, bad = clean_ids(a.topk_idx, E)
    dest = torch.where(ids >= 0, ids // (E // world), -1)
    acc = torch.zeros(T, H, dtype=torch.float32, device=dev)
    for d in range(world):  # rank order, as the kernel
        acc += torch.where((dest == d).any(1)[:, None], part[d, :T], 0.0)
    a.out.copy_(acc)
    _raise_bad(bad, make_error)
