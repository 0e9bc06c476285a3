"""MoE combine (all-to-all back, DeepEP's low-latency layout): every rank returns one pre-reduced
row per (token, rank) to the token's rank, which sums them.

Inputs on rank ``d``: ``expert_out [EL, W * M, H]`` (``recv``'s layout, kernels/moe_dispatch.py)
and the dispatch's ``rowmap [W, M, K]``; on rank ``r``: ``topk_idx`` and ``topk_weights [T_r, K]``
of its tokens, as given to the dispatch. Output on rank ``r``: ``y [T_r, H]`` in ``DTYPE``,
``y[t] = sum_k topk_weights[t, k] * expert_out[row of (t, k)]`` over the slots that name an
expert, accumulated in fp32 (zeros for a token with none).

Areas of every rank's buffer (byte offsets alike on every rank): ``wts_off`` fp32 ``[M, K]``
(this rank's weights, read by the peers), ``part_off`` fp32 ``[W, M, H]`` (slot ``[d, t]``: rank
``d``'s partial sum for this rank's token ``t``). The weights are pulled (one remote load of
``K`` values per token and rank) rather than pushed: the staged copy needs no area on the peers.

Units: token ``t < M`` belongs to block ``t % blocks`` on every rank, as source and as
destination, so the per-block barrier (kernels/barrier.py) orders everything a block reads after
it. Both barriers signal and poll at ``SCOPE`` (``gpu`` when every rank runs on this GPU, else
``sys``). Phases of ``_moe_combine_kernel``:

0. stage: the block converts the weights of its tokens to fp32 at ``wts_off`` of this rank;
1. start barrier (release / acquire): the weights are visible to every peer's block ``b``, and
   every peer's earlier reads of its areas (an earlier call) are over;
2. partials (destination side): for each of its tokens ``t`` and each source ``r`` with a row
   of ``rowmap[r, t]``, ``sum_k w_r[t, k] * expert_out[rowmap[r, t, k]]`` in fp32, the
   weights read from rank ``r``'s ``wts_off``; stored at ``[RANK, t]`` of ``r``'s partial area;
3. end barrier (release / acquire): every partial of block ``b``'s tokens has landed;
4. sum (source side, local only): ``y[t]`` is the fp32 sum, in rank order, of the partials of
   the ranks that own one of its experts (from ``topk_idx``, so the combine's ``topk_idx``
   must be the dispatch's).

Reuse: the areas are read after the end barrier by this rank only, and written by peers after
a later call's start barrier, so they may be reused by anything after the launch on this rank's
stream. A block whose barrier fails (timeout, ranks out of step) moves nothing after it. Rows of
``rowmap`` outside ``[0, EL * W * M)`` are ignored; an expert id out of range in ``topk_idx`` is
ignored and recorded (kernels/moe_routing.py).
"""

import triton
import triton.language as tl

from .barrier import barrier, call_begin, call_end
from .common import lane, row_elems
from .moe_routing import ranks_of, record_bad, token_ids
from .ptx import as_i64, as_ptr, peer_addr


@triton.jit
def _stage_weights(w_addr, buf_table, pid, nprog, T, wts_off, W_DTYPE: tl.constexpr,
                   K: tl.constexpr, K_P2: tl.constexpr, RANK: tl.constexpr):
    """Phase 0 (module docstring) of block ``pid``."""
    ks = tl.arange(0, K_P2)
    src = w_addr.to(tl.pointer_type(W_DTYPE))
    dst = (peer_addr(buf_table, RANK) + wts_off).to(tl.pointer_type(tl.float32))
    t = pid
    while t < T:  # see ptx.py on loops
        w = tl.load(src + as_i64(t) * K + ks, mask=ks < K, other=0.0)
        tl.store(dst + as_i64(t) * K + ks, w.to(tl.float32), mask=ks < K)
        t += nprog


@triton.jit
def _partial(out, buf_table, rows, r, t, M, H, wts_off, part_off, DTYPE: tl.constexpr,
             K: tl.constexpr, K_P2: tl.constexpr, BLOCK_H: tl.constexpr, RANK: tl.constexpr,
             ALIGNED: tl.constexpr):
    """Phase 2 for token ``t`` of source ``r`` whose slots have the rows ``rows`` (-1: none)."""
    ks = tl.arange(0, K_P2)
    peer = peer_addr(buf_table, r)
    w = tl.load((peer + wts_off).to(tl.pointer_type(tl.float32)) + as_i64(t) * K + ks,
                mask=(ks < K) & (rows >= 0), other=0.0)
    slot = as_i64(RANK) * M + t
    dst = as_ptr(peer + part_off, tl.float32, ALIGNED) + row_elems(slot, H, tl.float32, ALIGNED)
    cols = tl.arange(0, BLOCK_H)
    n = row_elems(1, H, DTYPE, ALIGNED)
    h = 0
    while h < n:  # see ptx.py on loops
        mask = h + cols < n
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for k in tl.static_range(K):
            row = lane(rows, k)
            if row >= 0:
                src = out + row_elems(as_i64(row), H, DTYPE, ALIGNED) + h + cols
                acc += lane(w, k) * tl.load(src, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst + h + cols, acc, mask=mask)
        h += BLOCK_H


@triton.jit
def _partials(out_addr, rowmap_addr, buf_table, pid, nprog, skip, M, H, wts_off, part_off,
              DTYPE: tl.constexpr, K: tl.constexpr, K_P2: tl.constexpr, EL: tl.constexpr,
              BLOCK_H: tl.constexpr, RANK: tl.constexpr, WORLD_SIZE: tl.constexpr,
              ALIGNED: tl.constexpr):
    """Phase 2 (module docstring) of block ``pid``; nothing when ``skip`` is non-zero."""
    ks = tl.arange(0, K_P2)
    out = as_ptr(out_addr, DTYPE, ALIGNED)
    rowmap = rowmap_addr.to(tl.pointer_type(tl.int32))
    t = tl.where(skip != 0, M, pid)
    while t < M:  # see ptx.py on loops
        for r in tl.static_range(WORLD_SIZE):
            rows = tl.load(rowmap + (as_i64(r) * M + t) * K + ks, mask=ks < K, other=-1)
            rows = tl.where((rows >= 0) & (rows < EL * WORLD_SIZE * M), rows, -1)
            if tl.max(rows, axis=0) >= 0:
                _partial(out, buf_table, rows, r, t, M, H, wts_off, part_off, DTYPE, K, K_P2,
                         BLOCK_H, RANK, ALIGNED)
        t += nprog


@triton.jit
def _sum(idx_addr, y_addr, buf_table, cnt_err_addr, pid, nprog, skip, T, M, H, part_off,
         DTYPE: tl.constexpr, IDX_DTYPE: tl.constexpr, K: tl.constexpr, K_P2: tl.constexpr,
         EL: tl.constexpr, BLOCK_H: tl.constexpr, RANK: tl.constexpr, WORLD_SIZE: tl.constexpr,
         WORLD_P2: tl.constexpr, ALIGNED: tl.constexpr):
    """Phase 4 (module docstring) of block ``pid``; nothing when ``skip`` is non-zero."""
    part = as_ptr(peer_addr(buf_table, RANK) + part_off, tl.float32, ALIGNED)
    y = as_ptr(y_addr, DTYPE, ALIGNED)
    cols = tl.arange(0, BLOCK_H)
    n = row_elems(1, H, DTYPE, ALIGNED)
    t = tl.where(skip != 0, T, pid)
    while t < T:  # see ptx.py on loops
        ids, bad = token_ids(idx_addr, t, T, WORLD_SIZE * EL, IDX_DTYPE, K, K_P2)
        record_bad(cnt_err_addr, bad)
        sends = ranks_of(ids, EL, WORLD_P2)
        h = 0
        while h < n:
            mask = h + cols < n
            acc = tl.zeros([BLOCK_H], dtype=tl.float32)
            for d in tl.static_range(WORLD_SIZE):
                if lane(sends, d) != 0:
                    src = part + row_elems(as_i64(d) * M + t, H, tl.float32, ALIGNED)
                    acc += tl.load(src + h + cols, mask=mask, other=0.0)
            tl.store(y + row_elems(as_i64(t), H, DTYPE, ALIGNED) + h + cols, acc.to(DTYPE),
                     mask=mask)
            h += BLOCK_H
        t += nprog


@triton.jit
def _moe_combine_kernel(out_addr, w_addr, idx_addr, y_addr, rowmap_addr, buf_table, sig_table,
                        err_addr, cnt_err_addr, seq_cap, T, M, H, wts_off, part_off, timeout_ns,
                        DTYPE: tl.constexpr, W_DTYPE: tl.constexpr, IDX_DTYPE: tl.constexpr,
                        K: tl.constexpr, K_P2: tl.constexpr, EL: tl.constexpr,
                        BLOCK_H: tl.constexpr, RANK: tl.constexpr, WORLD_SIZE: tl.constexpr,
                        WORLD_P2: tl.constexpr, SCOPE: tl.constexpr, USE_PTX: tl.constexpr,
                        ALIGNED: tl.constexpr, PDL: tl.constexpr):
    pid, nprog, seq = call_begin(sig_table, RANK, WORLD_SIZE, PDL)
    _stage_weights(w_addr, buf_table, pid, nprog, T, wts_off, W_DTYPE, K, K_P2, RANK)
    bad = barrier(sig_table, pid, seq, 0, err_addr, timeout_ns, seq_cap, 0, RANK, WORLD_SIZE,
                  WORLD_P2, SCOPE, USE_PTX, True, True)
    _partials(out_addr, rowmap_addr, buf_table, pid, nprog, bad, M, H, wts_off, part_off, DTYPE,
              K, K_P2, EL, BLOCK_H, RANK, WORLD_SIZE, ALIGNED)
    bad = barrier(sig_table, pid, seq, bad, err_addr, timeout_ns, seq_cap, 1, RANK, WORLD_SIZE,
                  WORLD_P2, SCOPE, USE_PTX, True, True)
    _sum(idx_addr, y_addr, buf_table, cnt_err_addr, pid, nprog, bad, T, M, H, part_off, DTYPE,
         IDX_DTYPE, K, K_P2, EL, BLOCK_H, RANK, WORLD_SIZE, WORLD_P2, ALIGNED)
    call_end(sig_table, pid, seq, seq_cap, RANK, WORLD_SIZE)
