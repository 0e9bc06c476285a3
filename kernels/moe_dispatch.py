"""MoE dispatch (all-to-all, DeepEP's low-latency layout): every token goes to the ranks that own
its experts, once per rank, and lands packed per local expert.

Rank ``r`` holds ``T_r <= M`` tokens ``x [T_r, H]`` and their ``topk_idx [T_r, K]``; expert ``e``
lives on rank ``e // EL`` (kernels/moe_routing.py). Output on rank ``d``: ``recv [EL, W * M, H]``,
for local expert ``j`` its rows packed from row 0 in the order (source rank, token index), and
``recv_counts [EL]``; the handle's ``rowmap [W, M, K]`` (int32) holds, for source ``r``, token
``t`` and slot ``k``, the row of ``recv`` (flat over ``[EL, W * M]``) that slot's expert got, or
-1 where the slot's expert is not on this rank: what the combine (kernels/moe_combine.py) needs.

FP8 (``QUANT``): the source quantises each row it sends once, per group of ``Q_GROUP``
channels (a power of two dividing ``BLOCK_H``: 128 from the host), the last group shorter where
``H`` is not a multiple of it (kernels/quant.py ``quant_groups``: ``scale = amax(|x[t, group]|)
/ Q_MAX``, 1 for a group of zeros, values ``clamp(x / scale, -Q_MAX, Q_MAX)`` in ``Q_DTYPE``),
so ``Q_DTYPE`` rows and fp32 scales cross the link; ``recv`` is then ``Q_DTYPE`` and ``scales
[EL, W * M, G]`` (``G = cdiv(H, Q_GROUP)``) gets each row's scales. Without ``QUANT``,
``Q_DTYPE`` is the input's dtype and rows cross as they are.

Areas of every rank's buffer (byte offsets alike on every rank): ``x_off`` ``Q_DTYPE`` rows
``[W, M, H]``, ``meta_off`` int32 ``[W, M, K]`` (slot ``[r, t]``: what source ``r`` sent for
its token ``t``), ``sc_off`` (``QUANT`` only) fp32 scales ``[W, M, G]`` (slot ``[r, t]``: the
scales of the row at ``[r, t]``), ``cnt_off`` int32 ``[blocks, W, EL]`` (block ``b``'s copy of
every source's tokens per local expert). Row accesses are 16-byte vectors where ``ALIGNED``
(every row of ``x``, of the row area and of ``recv`` whole 16-byte vectors).

Units: token ``t < M`` belongs to block ``t % blocks`` on every rank, as source and as
destination, so the per-block barrier (kernels/barrier.py) orders everything a block reads after
it. Both barriers signal and poll at ``SCOPE`` (``gpu`` when every rank runs on this GPU, else
``sys``). Phases of ``_moe_dispatch_kernel``:

0. start barrier (relaxed arrive, acquire poll): every peer's block ``b`` has begun this launch,
   so its earlier reads of its buffer (an earlier call) are over;
1. send (source side): the block scans the topk rows of every token (``routed``, chunks of
   ``BT``; tl.cumsum gives token ``t`` its index among the tokens of each expert), and for each
   of its tokens ``t`` stores, on every rank ``d``, the meta slot ``[RANK, t]`` (per slot ``k``
   ``j * M + index`` where ``d`` owns the slot's expert as local expert ``j``, else -1; -1 for
   ``t >= T``) and, on each distinct rank owning one of its experts, the row ``x[t]`` at
   ``[RANK, t]`` (once, however many of its experts that rank owns; with ``QUANT`` quantised
   once for all ranks, its scales at ``[RANK, t]`` of the scale area). Then it stores its tokens
   per expert at ``[b, RANK]`` of every rank's count area;
2. end barrier (release / acquire): every source's block ``b`` sent its tokens and counts;
3. pack (destination side, local only): the block takes the offsets of source ``r`` in expert
   ``j`` (exclusive prefix sum over sources of its copy of the counts), writes ``rowmap[r, t]``
   and copies the row ``[r, t]`` (and with ``QUANT`` its scales, to the same rows of
   ``scales``) to each of its rows of ``recv``; block 0 writes ``recv_counts``.

Reuse: peers write into this rank's areas only after the start barrier of a later call, which
this rank reaches after this launch completed, so the areas may be reused (and scratch views
written) by anything after the launch on this rank's stream. A block whose barrier fails
(timeout, ranks out of step) moves nothing after it. An expert id out of range is skipped and
recorded by block 0 (every block scans every token).
"""

import triton
import triton.language as tl

from .barrier import barrier, call_begin, call_end
from .common import lane, row_elems
from .moe_routing import gather, ranks_of, record_bad, routed, row_of, token_ids
from .ptx import as_i64, as_ptr, peer_addr
from .quant import quant_groups


@triton.jit
def _copy_row(src, dst_table, dst_off, sends, H, DTYPE: tl.constexpr, BLOCK_H: tl.constexpr,
              RANK: tl.constexpr, WORLD_SIZE: tl.constexpr, ALIGNED: tl.constexpr):
    """Copy the row of ``H`` elements at pointer ``src`` to byte ``dst_off`` of the buffer of
    every rank ``d`` with ``sends[d]`` set (one load per chunk, one store per rank)."""
    cols = tl.arange(0, BLOCK_H)
    n = row_elems(1, H, DTYPE, ALIGNED)
    h = 0
    while h < n:  # see ptx.py on loops
        mask = h + cols < n
        vals = tl.load(src + h + cols, mask=mask)
        for i in tl.static_range(WORLD_SIZE):
            d = (RANK + 1 + i) % WORLD_SIZE  # start with the next rank: not all at rank 0
            if lane(sends, d) != 0:
                dst = as_ptr(peer_addr(dst_table, d) + dst_off, DTYPE, ALIGNED)
                tl.store(dst + h + cols, vals, mask=mask)
        h += BLOCK_H


@triton.jit
def _send_row_fp8(src, dst_table, dst_off, sc_dst_off, sends, H, DTYPE: tl.constexpr,
                  Q_DTYPE: tl.constexpr, Q_MAX: tl.constexpr, Q_GROUP: tl.constexpr,
                  BLOCK_H: tl.constexpr, RANK: tl.constexpr, WORLD_SIZE: tl.constexpr,
                  ALIGNED: tl.constexpr):
    """The row of ``H`` elements at pointer ``src`` quantised per group of ``Q_GROUP`` channels
    (kernels/quant.py ``quant_groups``), stored as ``Q_DTYPE`` at byte ``dst_off`` and its fp32
    group scales at byte ``sc_dst_off`` of the buffer of every rank ``d`` with ``sends[d]``
    (quantised once, in chunks of ``BLOCK_H``, a multiple of ``Q_GROUP``)."""
    tl.static_assert(BLOCK_H % Q_GROUP == 0)
    gs = tl.arange(0, BLOCK_H // Q_GROUP)
    cols = gs[:, None] * Q_GROUP + tl.arange(0, Q_GROUP)[None, :]
    n = row_elems(1, H, DTYPE, ALIGNED)
    h = 0
    while h < n:  # see ptx.py on loops
        mask = h + cols < n
        q, scales = quant_groups(tl.load(src + h + cols, mask=mask, other=0.0).to(tl.float32),
                                 Q_DTYPE, Q_MAX)
        g = h // Q_GROUP + gs
        for i in tl.static_range(WORLD_SIZE):
            d = (RANK + 1 + i) % WORLD_SIZE  # start with the next rank: not all at rank 0
            if lane(sends, d) != 0:
                base = peer_addr(dst_table, d)
                tl.store(as_ptr(base + dst_off, Q_DTYPE, ALIGNED) + h + cols, q, mask=mask)
                dst = (base + sc_dst_off).to(tl.pointer_type(tl.float32))
                tl.store(dst + g, scales, mask=g * Q_GROUP < n)
        h += BLOCK_H


@triton.jit
def _send_token(x_addr, idx_addr, buf_table, t, T, M, H, before, x_off, meta_off, sc_off,
                DTYPE: tl.constexpr, IDX_DTYPE: tl.constexpr, K: tl.constexpr,
                K_P2: tl.constexpr, EL: tl.constexpr, BLOCK_H: tl.constexpr,
                RANK: tl.constexpr, WORLD_SIZE: tl.constexpr, WORLD_P2: tl.constexpr,
                ALIGNED: tl.constexpr, QUANT: tl.constexpr, Q_DTYPE: tl.constexpr,
                Q_MAX: tl.constexpr, Q_GROUP: tl.constexpr):
    """Phase 1 for token ``t``: ``before`` (``[E_P2]``) holds, per expert, the tokens before
    ``t`` that name it."""
    ids, _ = token_ids(idx_addr, t, T, WORLD_SIZE * EL, IDX_DTYPE, K, K_P2)
    ks = tl.arange(0, K_P2)
    code = (ids % EL) * M + gather(before, ids)
    slot = as_i64(RANK) * M + t
    for i in tl.static_range(WORLD_SIZE):
        d = (RANK + 1 + i) % WORLD_SIZE
        meta = tl.where((ids >= 0) & (ids // EL == d), code, -1)
        dst = (peer_addr(buf_table, d) + meta_off).to(tl.pointer_type(tl.int32))
        tl.store(dst + slot * K + ks, meta, mask=ks < K)
    sends = ranks_of(ids, EL, WORLD_P2)
    if tl.max(sends, axis=0) > 0:
        src = as_ptr(x_addr, DTYPE, ALIGNED) + row_elems(as_i64(t), H, DTYPE, ALIGNED)
        dst_off = x_off + row_elems(slot, H, Q_DTYPE, ALIGNED) * (Q_DTYPE.primitive_bitwidth // 8)
        if QUANT:
            sc_dst_off = sc_off + slot * tl.cdiv(H, Q_GROUP) * 4
            _send_row_fp8(src, buf_table, dst_off, sc_dst_off, sends, H, DTYPE, Q_DTYPE, Q_MAX,
                          Q_GROUP, BLOCK_H, RANK, WORLD_SIZE, ALIGNED)
        else:
            _copy_row(src, buf_table, dst_off, sends, H, DTYPE, BLOCK_H, RANK, WORLD_SIZE,
                      ALIGNED)


@triton.jit
def _send(x_addr, idx_addr, buf_table, cnt_err_addr, pid, nprog, T, M, H, x_off, meta_off,
          sc_off, cnt_off, DTYPE: tl.constexpr, IDX_DTYPE: tl.constexpr, K: tl.constexpr,
          K_P2: tl.constexpr, EL: tl.constexpr, E_P2: tl.constexpr, BT: tl.constexpr,
          BLOCK_H: tl.constexpr, RANK: tl.constexpr, WORLD_SIZE: tl.constexpr,
          WORLD_P2: tl.constexpr, ALIGNED: tl.constexpr, QUANT: tl.constexpr,
          Q_DTYPE: tl.constexpr, Q_MAX: tl.constexpr, Q_GROUP: tl.constexpr):
    """Phase 1 (module docstring) of block ``pid``."""
    es = tl.arange(0, E_P2)
    carry = tl.zeros([E_P2], dtype=tl.int32)  # tokens so far per expert
    bad = tl.zeros([], dtype=tl.int32)
    first = 0
    while first < M:  # see ptx.py on loops
        hot, b = routed(idx_addr, first, T, WORLD_SIZE * EL, IDX_DTYPE, K, BT, E_P2)
        bad += b
        before = tl.cumsum(hot, axis=0) - hot + carry[None, :]
        t = first + (pid - first % nprog + nprog) % nprog  # this block's first token here
        while t < tl.minimum(first + BT, M):
            _send_token(x_addr, idx_addr, buf_table, t, T, M, H, row_of(before, t - first),
                        x_off, meta_off, sc_off, DTYPE, IDX_DTYPE, K, K_P2, EL, BLOCK_H, RANK,
                        WORLD_SIZE, WORLD_P2, ALIGNED, QUANT, Q_DTYPE, Q_MAX, Q_GROUP)
            t += nprog
        carry += tl.sum(hot, axis=0)
        first += BT
    for d in tl.static_range(WORLD_SIZE):  # expert e of rank d at [pid, RANK, e - d * EL]
        dst = (peer_addr(buf_table, d) + cnt_off).to(tl.pointer_type(tl.int32))
        dst += (as_i64(pid) * WORLD_SIZE + RANK) * EL + es - d * EL
        tl.store(dst, carry, mask=(es >= d * EL) & (es < (d + 1) * EL))
    if pid == 0:
        record_bad(cnt_err_addr, bad)


@triton.jit
def _pack_scales(src, scales, rows, H, K: tl.constexpr, Q_GROUP: tl.constexpr,
                 BLOCK_H: tl.constexpr):
    """Phase 3's scales: the ``cdiv(H, Q_GROUP)`` fp32 group scales at pointer ``src`` to row
    ``rows[k]`` of ``scales`` (``[EL * W * M, groups]``) for every slot ``k`` with a row."""
    G = tl.cdiv(H, Q_GROUP)
    gs = tl.arange(0, BLOCK_H // Q_GROUP)
    g = 0
    while g < G:  # see ptx.py on loops
        mask = g + gs < G
        vals = tl.load(src + g + gs, mask=mask)
        for k in tl.static_range(K):
            row = lane(rows, k)
            if row >= 0:
                tl.store(scales + as_i64(row) * G + g + gs, vals, mask=mask)
        g += BLOCK_H // Q_GROUP


@triton.jit
def _pack_token(own, recv, scales, rowmap, r, t, M, H, offs_r, x_off, meta_off, sc_off,
                K: tl.constexpr, K_P2: tl.constexpr, EL: tl.constexpr, BLOCK_H: tl.constexpr,
                WORLD_SIZE: tl.constexpr, ALIGNED: tl.constexpr, QUANT: tl.constexpr,
                Q_DTYPE: tl.constexpr, Q_GROUP: tl.constexpr):
    """Phase 3 for token ``t`` of source ``r``; ``offs_r`` (``[EL_P2]``) holds source ``r``'s
    first row in each local expert. Rows are ``Q_DTYPE`` (the input's without ``QUANT``)."""
    ks = tl.arange(0, K_P2)
    slot = as_i64(r) * M + t
    meta = tl.load((own + meta_off).to(tl.pointer_type(tl.int32)) + slot * K + ks, mask=ks < K,
                   other=-1)
    j = tl.where(meta >= 0, meta // M, 0)
    rows = j * (WORLD_SIZE * M) + gather(offs_r, j) + meta % M
    rows = tl.where((meta >= 0) & (j < EL), rows, -1)
    tl.store(rowmap + slot * K + ks, rows, mask=ks < K)
    if tl.max(rows, axis=0) >= 0:
        src = as_ptr(own + x_off, Q_DTYPE, ALIGNED) + row_elems(slot, H, Q_DTYPE, ALIGNED)
        cols = tl.arange(0, BLOCK_H)
        n = row_elems(1, H, Q_DTYPE, ALIGNED)
        h = 0
        while h < n:  # see ptx.py on loops
            mask = h + cols < n
            vals = tl.load(src + h + cols, mask=mask)
            for k in tl.static_range(K):
                row = lane(rows, k)
                if row >= 0:
                    dst = recv + row_elems(as_i64(row), H, Q_DTYPE, ALIGNED)
                    tl.store(dst + h + cols, vals, mask=mask)
            h += BLOCK_H
        if QUANT:
            sc_src = (own + sc_off).to(tl.pointer_type(tl.float32)) + slot * tl.cdiv(H, Q_GROUP)
            _pack_scales(sc_src, scales, rows, H, K, Q_GROUP, BLOCK_H)


@triton.jit
def _pack(recv_addr, counts_addr, rowmap_addr, scales_addr, buf_table, pid, nprog, skip, M, H,
          x_off, meta_off, sc_off, cnt_off, K: tl.constexpr, K_P2: tl.constexpr,
          EL: tl.constexpr, EL_P2: tl.constexpr, BLOCK_H: tl.constexpr, RANK: tl.constexpr,
          WORLD_SIZE: tl.constexpr, WORLD_P2: tl.constexpr, ALIGNED: tl.constexpr,
          QUANT: tl.constexpr, Q_DTYPE: tl.constexpr, Q_GROUP: tl.constexpr):
    """Phase 3 (module docstring) of block ``pid``; nothing when ``skip`` is non-zero."""
    own = peer_addr(buf_table, RANK)
    srcs = tl.arange(0, WORLD_P2)[:, None]
    js = tl.arange(0, EL_P2)[None, :]
    cnt_src = (own + cnt_off).to(tl.pointer_type(tl.int32)) + (as_i64(pid) * WORLD_SIZE + srcs) * EL
    cnt = tl.load(cnt_src + js, mask=(srcs < WORLD_SIZE) & (js < EL), other=0)
    offs = tl.cumsum(cnt, axis=0) - cnt  # first row of source r in expert j
    if (pid == 0) & (skip == 0):
        counts = tl.sum(cnt, axis=0)
        tl.store(counts_addr.to(tl.pointer_type(tl.int32)) + tl.arange(0, EL_P2), counts,
                 mask=tl.arange(0, EL_P2) < EL)
    recv = as_ptr(recv_addr, Q_DTYPE, ALIGNED)
    scales = as_i64(scales_addr).to(tl.pointer_type(tl.float32))  # 0 without QUANT
    rowmap = rowmap_addr.to(tl.pointer_type(tl.int32))
    t = tl.where(skip != 0, M, pid)
    while t < M:  # see ptx.py on loops
        for r in tl.static_range(WORLD_SIZE):
            _pack_token(own, recv, scales, rowmap, r, t, M, H, row_of(offs, r), x_off, meta_off,
                        sc_off, K, K_P2, EL, BLOCK_H, WORLD_SIZE, ALIGNED, QUANT, Q_DTYPE,
                        Q_GROUP)
        t += nprog


@triton.jit
def _moe_dispatch_kernel(x_addr, idx_addr, recv_addr, counts_addr, rowmap_addr, scales_addr,
                         buf_table, sig_table, err_addr, cnt_err_addr, seq_cap, T, M, H, x_off,
                         meta_off, sc_off, cnt_off, timeout_ns, DTYPE: tl.constexpr,
                         IDX_DTYPE: tl.constexpr, K: tl.constexpr, K_P2: tl.constexpr,
                         EL: tl.constexpr, EL_P2: tl.constexpr, E_P2: tl.constexpr,
                         BT: tl.constexpr, BLOCK_H: tl.constexpr, RANK: tl.constexpr,
                         WORLD_SIZE: tl.constexpr, WORLD_P2: tl.constexpr, SCOPE: tl.constexpr,
                         USE_PTX: tl.constexpr, ALIGNED: tl.constexpr, QUANT: tl.constexpr,
                         Q_DTYPE: tl.constexpr, Q_MAX: tl.constexpr, Q_GROUP: tl.constexpr,
                         PDL: tl.constexpr):
    pid, nprog, seq = call_begin(sig_table, RANK, WORLD_SIZE, PDL)
    bad = barrier(sig_table, pid, seq, 0, err_addr, timeout_ns, seq_cap, 0, RANK, WORLD_SIZE,
                  WORLD_P2, SCOPE, USE_PTX, False, True)
    if bad == 0:
        _send(x_addr, idx_addr, buf_table, cnt_err_addr, pid, nprog, T, M, H, x_off, meta_off,
              sc_off, cnt_off, DTYPE, IDX_DTYPE, K, K_P2, EL, E_P2, BT, BLOCK_H, RANK,
              WORLD_SIZE, WORLD_P2, ALIGNED, QUANT, Q_DTYPE, Q_MAX, Q_GROUP)
    bad = barrier(sig_table, pid, seq, bad, err_addr, timeout_ns, seq_cap, 1, RANK, WORLD_SIZE,
                  WORLD_P2, SCOPE, USE_PTX, True, True)
    _pack(recv_addr, counts_addr, rowmap_addr, scales_addr, buf_table, pid, nprog, bad, M, H,
          x_off, meta_off, sc_off, cnt_off, K, K_P2, EL, EL_P2, BLOCK_H, RANK, WORLD_SIZE,
          WORLD_P2, ALIGNED, QUANT, Q_DTYPE, Q_GROUP)
    call_end(sig_table, pid, seq, seq_cap, RANK, WORLD_SIZE)
