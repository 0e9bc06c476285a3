"""Phases shared by several collectives (device code)."""

import triton
import triton.language as tl

from .lines import lines_flag, lines_get, lines_put, lines_slot
from .ptx import as_i64, as_ptr, elems_to_words, peer_addr, words_to_elems


@triton.jit
def copy_shards(src_addr, dst_addr, shard_len, chunk_len, nchunks, pid, nprog, skip,
                DTYPE: tl.constexpr, BLOCK: tl.constexpr, WORLD_SIZE: tl.constexpr,
                ALIGNED: tl.constexpr, OWN: tl.constexpr = -1):
    """Copy ``WORLD_SIZE`` shards of ``shard_len`` elements (all but shard ``OWN`` when it is
    not -1: a kernel that stored its own shard already); a shard is ``nchunks`` chunks of
    ``chunk_len <= BLOCK`` elements (the last one may be short), chunk ``c`` of every shard
    copied by block ``c % nprog``: exactly the chunks that block of every rank reads or writes
    remotely, so a per-block barrier orders the copy against the remote phase. Chunks are
    ``BLOCK_SIZE``-element pieces of a flat shard (all-gather, reduce-scatter) or rows of
    ``H`` elements (the fused kernel). Nothing is copied when ``skip`` is nonzero (a block
    that abandoned the call)."""
    src = as_ptr(src_addr, DTYPE, ALIGNED)
    dst = as_ptr(dst_addr, DTYPE, ALIGNED)
    cols = tl.arange(0, BLOCK)
    c = tl.where(skip != 0, nchunks, pid)
    while c < nchunks:  # chunks c = pid (mod nprog); see ptx.py on loops
        offs = as_i64(c) * chunk_len + cols
        mask = (cols < chunk_len) & (offs < shard_len)
        for r in tl.static_range(WORLD_SIZE):
            if r != OWN:
                shard = r * as_i64(shard_len)
                tl.store(dst + shard + offs, tl.load(src + shard + offs, mask=mask), mask=mask)
        c += nprog


@triton.jit
def copy_units(src_addr, dst_addr, n, per_slice, stride, pid, nprog, DTYPE: tl.constexpr,
               BLOCK: tl.constexpr, SLICES: tl.constexpr, ALIGNED: tl.constexpr):
    """Copy units ``u = q * per_slice + j`` (every ``q < SLICES``, every ``j = pid (mod nprog)``,
    ``j < per_slice``) of ``n`` elements; unit ``u`` is elements ``[u * stride, u * stride +
    stride)`` (``stride <= BLOCK``: a chunk of the all-reduce, a row of a fused op), tails masked.
    The units block ``pid`` of every rank touches remotely in the all-reduce kernels, so a
    per-block barrier orders this copy against them."""
    src = as_ptr(src_addr, DTYPE, ALIGNED)
    dst = as_ptr(dst_addr, DTYPE, ALIGNED)
    cols = tl.arange(0, BLOCK)
    j = pid
    while j < per_slice:  # see ptx.py on loops
        for q in tl.static_range(SLICES):
            offs = (q * as_i64(per_slice) + j) * stride + cols
            mask = (cols < stride) & (offs < n)
            tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)
        j += nprog


@triton.jit
def lines_push_vals(vals, buf_table, peer, lines_off, start, end, seq, slot_words,
                    DTYPE: tl.constexpr, RANK: tl.constexpr, WORLD_SIZE: tl.constexpr):
    """Push ``vals``, elements ``[start, start + BLOCK)`` of a message (those ``< end`` count), as
    lines (word ``k`` of the message = line ``k``, kernels/lines.py) into slot ``RANK`` of the line
    area of rank ``peer``, or of every peer when ``peer`` is -1."""
    EPW: tl.constexpr = 32 // DTYPE.primitive_bitwidth
    woffs = start // EPW + tl.arange(0, vals.shape[0] // EPW)
    words = elems_to_words(vals, DTYPE)
    for i in tl.static_range(1, WORLD_SIZE):
        q = (RANK + i) % WORLD_SIZE
        if (peer == -1) | (peer == q):
            slot = lines_slot(peer_addr(buf_table, q) + lines_off, seq, RANK, slot_words,
                              WORLD_SIZE)
            lines_put(slot, woffs, words, woffs < end // EPW, lines_flag(seq))


@triton.jit
def lines_push_to(src, buf_table, peer, lines_off, start, end, seq, slot_words, DTYPE: tl.constexpr,
                  BLOCK: tl.constexpr, RANK: tl.constexpr, WORLD_SIZE: tl.constexpr):
    """:func:`lines_push_vals` of elements ``[start, min(start + BLOCK, end))`` of a message whose
    element ``j`` is at pointer ``src + j`` (loaded once for all peers)."""
    offs = start + tl.arange(0, BLOCK)
    lines_push_vals(tl.load(src + offs, mask=offs < end, other=0.0), buf_table, peer, lines_off,
                    start, end, seq, slot_words, DTYPE, RANK, WORLD_SIZE)


@triton.jit
def lines_push_chunks(src, buf_table, peer, lines_off, n, pid, nprog, seq, slot_words,
                      DTYPE: tl.constexpr, CHUNK: tl.constexpr, RANK: tl.constexpr,
                      WORLD_SIZE: tl.constexpr):
    """:func:`lines_push_to` of a whole message of ``n`` elements at pointer ``src``, in chunks of
    ``CHUNK`` elements, chunk ``c`` by block ``c % nprog``: a message spread over many blocks
    leaves through many SMs at once."""
    c = pid
    while c * CHUNK < n:  # see ptx.py on loops
        lines_push_to(src, buf_table, peer, lines_off, as_i64(c) * CHUNK, n, seq, slot_words, DTYPE,
                      CHUNK, RANK, WORLD_SIZE)
        c += nprog


@triton.jit
def lines_reduce_chunk(own, area, start, end, seq, flag, slot_words, status, timeout_ns, pad,
                       DTYPE: tl.constexpr, BLOCK: tl.constexpr, RANK: tl.constexpr,
                       WORLD_SIZE: tl.constexpr, USE_PTX: tl.constexpr, PAIRS: tl.constexpr):
    """Sum over ranks, in rank order (the same on every rank), of elements ``[start,
    min(start + BLOCK, end))`` of a message pushed as lines (kernels/lines.py): this rank's own
    part read at pointer ``own``, each peer's from its slot of this rank's line area ``area``
    (line ``k`` = word ``k`` of the message). fp32; masked lanes are 0. Returns ``(acc,
    status)``, ``status`` or-ed with the waits' (no wait when it is non-zero). ``PAIRS``:
    ``start`` is a multiple of two words (16-byte polls, ``lines.lines_get``)."""
    EPW: tl.constexpr = 32 // DTYPE.primitive_bitwidth
    offs = tl.arange(0, BLOCK)
    mine = tl.load(own + start + offs, mask=start + offs < end, other=0.0)  # before any wait
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for r in tl.static_range(WORLD_SIZE):
        if r == RANK:
            v = mine
        else:
            words, st = lines_get(lines_slot(area, seq, r, slot_words, WORLD_SIZE), start // EPW,
                                  end // EPW, flag, r, status, timeout_ns, pad, BLOCK // EPW,
                                  USE_PTX, PAIRS)
            status = status | st
            v = words_to_elems(words, DTYPE)
        acc += v.to(tl.float32)
    return acc, status


@triton.jit
def lines_reduce_store(own, dst, area, n, pid, nprog, seq, slot_words, timeout_ns, pad,
                       DTYPE: tl.constexpr, BLOCK: tl.constexpr, RANK: tl.constexpr,
                       WORLD_SIZE: tl.constexpr, USE_PTX: tl.constexpr):
    """The receiving half of the flat barrier-free reductions: for chunks ``c = pid (mod
    nprog)`` of a message of ``n`` elements, :func:`lines_reduce_chunk` (this rank's part at
    pointer ``own``) stored at pointer ``dst`` in ``DTYPE``. Returns the waits' status (the
    loop stops at the first failure)."""
    status = tl.full([], 0, tl.int32)
    c = pid
    while (c < tl.cdiv(n, BLOCK)) & (status == 0):  # see ptx.py on loops
        offs = c * BLOCK + tl.arange(0, BLOCK)
        acc, status = lines_reduce_chunk(own, area, c * BLOCK, n, seq, lines_flag(seq), slot_words,
                                         status, timeout_ns, pad, DTYPE, BLOCK, RANK, WORLD_SIZE,
                                         USE_PTX, True)
        tl.store(dst + offs, acc.to(DTYPE), mask=offs < n)
        c += nprog
    return status


@triton.jit
def sum_sq(x, mask):
    """Sum of squares (fp32) of ``x`` where ``mask``."""
    xf = tl.where(mask, x.to(tl.float32), 0.0)
    return tl.sum(xf * xf, axis=0)


@triton.jit
def rms_scaled(x, mask, ss, w, H, eps):
    """``x`` (a row or a piece of one) RMS-normalised by its row's sum of squares ``ss`` (fp32,
    over the row's ``H`` elements) times ``w`` (fp32), in ``x``'s dtype."""
    xf = tl.where(mask, x.to(tl.float32), 0.0)
    return (xf * tl.rsqrt(ss / H + eps) * w).to(x.dtype)


@triton.jit
def rms_normed(x, mask, w, H, eps):
    """The row ``x`` RMS-normalised (fp32 statistics over its ``H`` elements where ``mask``)
    times ``w`` (fp32), in ``x``'s dtype: the norm of every fused kernel."""
    return rms_scaled(x, mask, sum_sq(x, mask), w, H, eps)


@triton.jit
def row_operands(res_addr, out_addr, w_addr, H, DTYPE: tl.constexpr, W_DTYPE: tl.constexpr,
                 OUT_DTYPE: tl.constexpr, BLOCK_H: tl.constexpr, ALIGNED: tl.constexpr):
    """What the fused RMSNorm kernels hold for every row: the column offsets and their mask (the
    row's tail), residual and output (``OUT_DTYPE``) pointers, and the weight in fp32."""
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    res = as_ptr(res_addr, DTYPE, ALIGNED)
    out = as_ptr(out_addr, OUT_DTYPE, ALIGNED)
    w = tl.load(as_ptr(w_addr, W_DTYPE, ALIGNED) + cols, mask=mask, other=0.0).to(tl.float32)
    return cols, mask, res, out, w


# -- variable counts (all_gather_v, reduce_scatter_v) --------------------------------------------
#: bits of the counts error word (the buffer's status word ``COUNTS_ERROR_WORD``, see
#: symmtriton/counts.py): a negative count, a count above its per-rank capacity, and a
#: sum above the total capacity.
COUNT_NEGATIVE = tl.constexpr(1)
COUNT_OVER_EACH = tl.constexpr(2)
COUNT_OVER_TOTAL = tl.constexpr(4)


@triton.jit
def lane(vec, r):
    """Element ``r`` of the small per-rank vector ``vec`` (a scalar)."""
    return tl.sum(tl.where(tl.arange(0, vec.shape[0]) == r, vec, 0), axis=0)


@triton.jit
def row_elems(rows, row, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """``rows * row`` elements. With ``ALIGNED`` (the launcher sets it only when every row is
    whole 16-byte vectors) it is computed as a multiple of the vector length, so the compiler
    knows it and keeps 16-byte accesses under masks built from it (a ``tl.multiple_of`` hint on
    the scalar does not: checked in the sm_90 PTX, tests/test_all_gather_v.py)."""
    if ALIGNED:
        VEC: tl.constexpr = 128 // DTYPE.primitive_bitwidth
        elems = rows * (row // VEC) * VEC
    else:
        elems = rows * row
    return elems


@triton.jit
def clamped_counts(counts_addr, err_addr, pid, cap_each, cap_total, COUNTS_DTYPE: tl.constexpr,
                   WORLD_SIZE: tl.constexpr, WORLD_P2: tl.constexpr):
    """Read the ``WORLD_SIZE`` counts at ``counts_addr`` (read when the kernel runs: a CUDA graph
    replays with new counts) and clamp them so nothing moves out of bounds: a count lies in
    ``[0, cap_each]``, and rank ``r``'s rows ``[start_r, start_r + n_r)`` end by ``cap_total``.
    Returns ``(start, n)``, int64 vectors over rank lanes. Block 0 stores the error bits
    (``COUNT_*``) in the int32 at ``err_addr`` when clamping changed anything."""
    lanes = tl.arange(0, WORLD_P2)
    valid = lanes < WORLD_SIZE
    src = counts_addr.to(tl.pointer_type(COUNTS_DTYPE))
    raw = tl.load(src + lanes, mask=valid, other=0).to(tl.int64)
    cnt = tl.minimum(tl.maximum(raw, 0), cap_each)
    before = tl.sum(tl.where(lanes[None, :] < lanes[:, None], cnt[None, :], 0), axis=1)
    start = tl.minimum(before, cap_total)
    n = tl.minimum(before + cnt, cap_total) - start
    code = (tl.max(tl.where(raw < 0, COUNT_NEGATIVE, 0), axis=0)
            | tl.max(tl.where(raw > cap_each, COUNT_OVER_EACH, 0), axis=0)
            | tl.where(tl.sum(cnt, axis=0) > cap_total, COUNT_OVER_TOTAL, 0))
    if (pid == 0) & (code != 0):
        tl.store(err_addr.to(tl.pointer_type(tl.int32)), code.to(tl.int32))
    return start, n


@triton.jit
def copy_slices(src_addr, dst_addr, start, n, row, pid, nprog, DTYPE: tl.constexpr,
                BLOCK_SIZE: tl.constexpr, WORLD_SIZE: tl.constexpr, ALIGNED: tl.constexpr):
    """Copy rank ``r``'s rows ``[start_r, start_r + n_r)`` (``row`` elements each) for every
    rank, chunk ``c`` of each slice (counted from the slice's first row) by block ``c % nprog``:
    the chunks that block of every rank moves remotely, as in :func:`copy_shards`."""
    src = as_ptr(src_addr, DTYPE, ALIGNED)
    dst = as_ptr(dst_addr, DTYPE, ALIGNED)
    for r in tl.static_range(WORLD_SIZE):
        first = row_elems(lane(start, r), row, DTYPE, ALIGNED)
        count = row_elems(lane(n, r), row, DTYPE, ALIGNED)
        c = pid
        while c * BLOCK_SIZE < count:  # chunks c = pid (mod nprog); see ptx.py on loops
            offs = c * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
            mask = offs < count
            tl.store(dst + first + offs, tl.load(src + first + offs, mask=mask), mask=mask)
            c += nprog
