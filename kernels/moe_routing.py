"""Routing of the MoE all-to-all pair (kernels/moe_dispatch.py, kernels/moe_combine.py): expert
ids read from ``topk_idx`` and checked, which ranks a token goes to, and the scan that numbers the
tokens of every expert.

Expert ``e`` of ``E = WORLD_SIZE * EL`` lives on rank ``e // EL`` as its local expert ``e % EL``.
An id of ``-1`` is an unused slot; an id below ``-1`` or at least ``E`` is out of range: it is
treated as unused (nothing is written for it) and the kernel stores ``MOE_BAD_EXPERT`` in the
buffer's counts error word (symmtriton/counts.py: the host raises it at the next call or at
``synchronize``). A token that names one expert in several slots is routed to it once.
"""

import triton
import triton.language as tl

from .ptx import as_i64

#: the bit of the counts error word that says "an expert id is out of range" (the row-count bits
#: of kernels/common.py are 1, 2 and 4).
MOE_BAD_EXPERT = tl.constexpr(8)


@triton.jit
def slot_ids(idx_addr, toks, T, k, E, IDX_DTYPE: tl.constexpr, K: tl.constexpr):
    """Slot ``k`` of the topk rows of the tokens ``toks`` (a vector): ``(ids, bad)``, the expert
    ids as int32 (-1 for an unused slot, a token ``>= T`` or an id out of range) and the number
    of ids out of range."""
    valid = toks < T
    src = idx_addr.to(tl.pointer_type(IDX_DTYPE)) + as_i64(toks) * K + k
    raw = tl.load(src, mask=valid, other=-1)
    bad = valid & ((raw < -1) | (raw >= E))
    return tl.where(bad | (raw < 0), -1, raw).to(tl.int32), tl.sum(bad.to(tl.int32), axis=0)


@triton.jit
def token_ids(idx_addr, t, T, E, IDX_DTYPE: tl.constexpr, K: tl.constexpr, K_P2: tl.constexpr):
    """The topk row of token ``t`` (a scalar): ``(ids, bad)`` as :func:`slot_ids`, ``ids`` over
    ``K_P2`` lanes (-1 past ``K``)."""
    ks = tl.arange(0, K_P2)
    valid = (ks < K) & (t < T)
    src = idx_addr.to(tl.pointer_type(IDX_DTYPE)) + as_i64(t) * K + ks
    raw = tl.load(src, mask=valid, other=-1)
    bad = valid & ((raw < -1) | (raw >= E))
    return tl.where(bad | (raw < 0), -1, raw).to(tl.int32), tl.sum(bad.to(tl.int32), axis=0)


@triton.jit
def routed(idx_addr, first, T, E, IDX_DTYPE: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
           E_P2: tl.constexpr):
    """Tokens ``[first, first + BT)``: ``(hot, bad)``, ``hot`` int32 ``[BT, E_P2]`` with 1 where
    the token (``< T``) names expert ``e`` in any slot, ``bad`` the ids out of range."""
    toks = first + tl.arange(0, BT)
    es = tl.arange(0, E_P2)
    hot = tl.zeros([BT, E_P2], dtype=tl.int32)
    bad = tl.zeros([], dtype=tl.int32)
    for k in tl.static_range(K):
        ids, b = slot_ids(idx_addr, toks, T, k, E, IDX_DTYPE, K)
        hot = tl.maximum(hot, (ids[:, None] == es[None, :]).to(tl.int32))
        bad += b
    return hot, bad


@triton.jit
def ranks_of(ids, EL: tl.constexpr, WORLD_P2: tl.constexpr):
    """Which ranks a token with expert ids ``ids`` (a vector, -1 unused) goes to: int32
    ``[WORLD_P2]``, 1 for each rank owning one of its experts."""
    dest = tl.where(ids >= 0, ids // EL, -1)
    lanes = tl.arange(0, WORLD_P2)
    return tl.max((dest[:, None] == lanes[None, :]).to(tl.int32), axis=0)


@triton.jit
def gather(vec, ids):
    """``vec[ids]`` for a vector of indices ``ids`` into the small vector ``vec`` (0 where an
    index is out of range)."""
    lanes = tl.arange(0, vec.shape[0])
    return tl.sum(tl.where(ids[:, None] == lanes[None, :], vec[None, :], 0), axis=1)


@triton.jit
def record_bad(err_addr, bad):
    """Store ``MOE_BAD_EXPERT`` in the int32 counts error word at ``err_addr`` when ``bad``."""
    if bad != 0:
        tl.store(err_addr.to(tl.pointer_type(tl.int32)), MOE_BAD_EXPERT)


@triton.jit
def row_of(mat, r):
    """Row ``r`` (a scalar) of the small matrix ``mat``."""
    rows = tl.arange(0, mat.shape[0])
    return tl.sum(tl.where((rows == r)[:, None], mat, 0), axis=0)
