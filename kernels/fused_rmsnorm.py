"""Reduce-scatter + residual add + RMSNorm (+ all-gather) over rows, in one launch.

The input is ``[S, H]`` per rank (partial sums), ``S = WORLD_SIZE * s``; rank ``q`` owns rows
``[q*s, (q+1)*s)``. Block ``b`` handles local rows ``i`` with ``i % blocks == b``, i.e. global
rows ``RANK*s + i``. Phases of ``_fused_rmsnorm_kernel``:

1. with ``STAGE_IN``: copy rows ``q*s + i`` (every ``q``) of the local input into the region:
   exactly the rows block ``b`` of the peers reads from this rank;
2. start barrier (release / acquire): those rows are in place on every rank;
3. per row: reduce row ``RANK*s + i`` over all ranks in fp32 (``multimem.ld_reduce`` or one load
   per peer), add the residual row and round to the residual's dtype (stored back: the
   residual is updated in place), RMSNorm in fp32 statistics, times ``weight``;
   with ``ALL_GATHER`` store the normed row at the same row of the region on every rank
   (``multimem.st`` or one store per peer) — this overwrites input rows that only this rank's
   block ``b`` reads, and it has read them already — else store it to the local output;
   with ``Q_GATHER`` (FP8 output, kernels/quant.py ``gather_row``) the row is quantised once
   and what every rank gets is its *record*: over the first bytes of the row's ``H * ESIZE``
   in the region, the ``H`` FP8 bytes, then with dynamic scaling the row's fp32 scale (4 bytes,
   little endian, at any alignment) — half the bytes of a bf16 row, or fewer;
4. end barrier (release / acquire with ``ALL_GATHER``, else relaxed: only reads came before
   it): every peer's normed rows ``q*s + i`` have landed here and nobody reads this
   rank's rows any more;
5. with ``COPY_OUT``: copy rows ``q*s + i`` (every peer's ``q``) from the region to the output
   (this rank's own rows were stored there in phase 3, with their push); with ``Q_GATHER``
   the records' FP8 bytes to the output and their scales to the scales
   (``quant.gathered_rows``). FP8 output without ``Q_GATHER`` (dynamic rows too short for a
   record: ops/_quant.py ``fp8_records``) gathers the rows in the input's dtype and quantises
   them here (``quant.quant_shards``).

Region, per row ``r`` (``H * ESIZE`` bytes at ``region_off + r * H * ESIZE`` on every rank):
this rank's partial sums of row ``r`` until the row's owner (rank ``r // s``) has read them in
phase 3, then the normed row (``ALL_GATHER``) or its FP8 record (``Q_GATHER``; the rest of the
row's bytes keep stale input). Between the barriers only the row's owner touches them.

A block whose barrier fails (timeout, ranks out of step: kernels/barrier.py) skips the phases
after it.

A row is one chunk: ``BLOCK_H`` (a power of two >= H) covers it, the tail masked.

``_fused_rmsnorm_lines_kernel`` (small inputs, no barrier, one exchange; lines of kernels/lines.py;
rows of whole 32-bit words in units of ``CHUNK`` elements, kernels/lines_rows.py). Without
``ALL_GATHER``: rows ``q*s + i`` of the input go into slot ``RANK`` of rank ``q`` (line
``i * H_words + k``); this rank's row ``RANK*s + i`` is summed over the ranks in rank order (its own
part from the input, the peers' from its slots, fp32), the residual added, the rounded sum stored
back to the residual, and its RMSNorm times ``weight`` to row ``i`` of ``out``. With ``ALL_GATHER``
a second exchange (all-gather of the normed rows) is replaced by work done on every rank: every
input row (lines ``r * H_words``) and this rank's residual rows ``i`` (lines ``(S + i) * H_words``;
pushed by the block that later updates that piece) go to every peer, and every rank computes every
row ``r = q*s + i`` as rank ``q`` does (the same sums in the same order: the same bits) with rank
``q``'s residual row, stores it to row ``r`` of ``out`` and, for its own rows, the sum to the
residual (a peer's row waits for its norm in ``out``). Small messages are latency-bound: one
exchange of ``(S + s) * H`` elements per peer beats two of ``s * H`` (the fused rows of
benchmarks/results/archive/2026-11-26_3ac72a2/lines_vs_barrier_h200x2_w2.csv). ``out`` may be the
input: a block overwrites only pieces it has pushed and read (lines_rows.py). With FP8 output
the lines carry the same input and residual rows in the input's dtype (there is no exchange of
normed rows to shrink), and every rank quantises every row it computes (whole rows per unit).
"""

import triton
import triton.language as tl

from .barrier import barrier, call_begin, call_end
from .common import copy_shards, lines_push_to, lines_reduce_chunk, rms_normed, row_operands
from .lines import lines_begin, lines_finish, lines_flag, lines_get, lines_slot
from .quant import gather_row, gathered_rows, quant_shards, store_row
from .lines_rows import norm_units, unit_done, unit_span, unit_weight
from .ptx import as_i64, as_ptr, load_reduce, peer_addr, store_all, words_to_elems


@triton.jit
def _fused_rmsnorm_kernel(in_addr, out_addr, res_addr, w_addr, buf_table, sig_table, mc_addr,
                          err_addr, seq_cap, region_off, s, H, eps, timeout_ns, q_addr,
                          DTYPE: tl.constexpr,
                          W_DTYPE: tl.constexpr, RANK: tl.constexpr, WORLD_SIZE: tl.constexpr,
                          WORLD_P2: tl.constexpr, BLOCK_H: tl.constexpr, STAGE_IN: tl.constexpr,
                          ALL_GATHER: tl.constexpr, COPY_OUT: tl.constexpr,
                          USE_MULTIMEM: tl.constexpr, SCOPE: tl.constexpr, USE_PTX: tl.constexpr,
                          ALIGNED: tl.constexpr, PDL: tl.constexpr, QUANT: tl.constexpr,
                          Q_DTYPE: tl.constexpr, Q_MAX: tl.constexpr, Q_GATHER: tl.constexpr):
    pid, nprog, seq = call_begin(sig_table, RANK, WORLD_SIZE, PDL)
    ESIZE: tl.constexpr = DTYPE.primitive_bitwidth // 8
    local = peer_addr(buf_table, RANK) + region_off
    if STAGE_IN:
        copy_shards(in_addr, local, s * H, H, s, pid, nprog, 0, DTYPE, BLOCK_H, WORLD_SIZE,
                    ALIGNED)
    bad = barrier(sig_table, pid, seq, 0, err_addr, timeout_ns, seq_cap, 0, RANK, WORLD_SIZE,
                  WORLD_P2, SCOPE, USE_PTX, True, True)
    cols, mask, res, out, w = row_operands(res_addr, out_addr, w_addr, H, DTYPE, W_DTYPE, Q_DTYPE,
                                           BLOCK_H, ALIGNED)
    i = tl.where(bad != 0, s, pid)
    while i < s:
        row_off = region_off + (RANK * s + i).to(tl.int64) * H * ESIZE
        acc = load_reduce(mc_addr, buf_table, row_off, 0, H, BLOCK_H, DTYPE, WORLD_SIZE,
                          USE_MULTIMEM, ALIGNED)
        r_ptr = res + i.to(tl.int64) * H + cols
        x = (acc + tl.load(r_ptr, mask=mask, other=0.0).to(tl.float32)).to(DTYPE)
        tl.store(r_ptr, x, mask=mask)
        y = rms_normed(x, mask, w, H, eps)
        if Q_GATHER:  # FP8 records to every rank, this rank's row to the output now
            row = (RANK * s + i).to(tl.int64)
            gather_row(y, mask, out + row * H + cols, out_addr, q_addr, row, mc_addr, buf_table,
                       row_off, H, BLOCK_H, RANK, WORLD_SIZE, USE_MULTIMEM, ALIGNED, QUANT,
                       Q_DTYPE, Q_MAX)
        elif ALL_GATHER:
            store_all(mc_addr, buf_table, row_off, 0, H, y, BLOCK_H, DTYPE, RANK, WORLD_SIZE,
                      USE_MULTIMEM, ALIGNED)
            if COPY_OUT:  # this rank's rows go to the output now, not after the end barrier
                row = (RANK * s + i).to(tl.int64)
                store_row(out + row * H + cols, y, mask, out_addr, q_addr, row, QUANT, Q_DTYPE,
                          Q_MAX)
        else:
            store_row(out + i.to(tl.int64) * H + cols, y, mask, out_addr, q_addr, i, QUANT,
                      Q_DTYPE, Q_MAX)
        i += nprog
    bad = barrier(sig_table, pid, seq, bad, err_addr, timeout_ns, seq_cap, 1, RANK, WORLD_SIZE,
                  WORLD_P2, SCOPE, USE_PTX, ALL_GATHER, ALL_GATHER)
    if Q_GATHER:  # the gathered FP8 records
        gathered_rows(local, out_addr, q_addr, s, H, H * ESIZE, pid, nprog, bad, BLOCK_H,
                      WORLD_SIZE, RANK, ALIGNED, QUANT)
    elif COPY_OUT & (QUANT != 0):  # the gathered rows quantised on their way out
        quant_shards(local, out_addr, q_addr, s, H, pid, nprog, bad, DTYPE, BLOCK_H, WORLD_SIZE,
                     RANK, QUANT, Q_DTYPE, Q_MAX)
    elif COPY_OUT:
        copy_shards(local, out_addr, s * H, H, s, pid, nprog, bad, DTYPE, BLOCK_H, WORLD_SIZE,
                    ALIGNED, RANK)
    call_end(sig_table, pid, seq, seq_cap, RANK, WORLD_SIZE)


@triton.jit
def _push_units(src, res, buf_table, lines_off, s, U, C, H, pid, nprog, seq, slot_words,
                DTYPE: tl.constexpr, CHUNK: tl.constexpr, RANK: tl.constexpr,
                WORLD_SIZE: tl.constexpr, ALL_GATHER: tl.constexpr):
    """Phase 1 of ``_fused_rmsnorm_lines_kernel``, units ``u = pid (mod nprog)`` below ``U``:
    with ``ALL_GATHER`` every input row, and this rank's residual rows, to every peer; else rows
    ``q*s + i`` of the input to rank ``q``."""
    S = WORLD_SIZE * as_i64(s)
    u = pid
    while u < U:  # see ptx.py on loops
        r, c0, start, end = unit_span(u, C, H, CHUNK)
        if ALL_GATHER:
            lines_push_to(src, buf_table, -1, lines_off, start, end, seq, slot_words, DTYPE,
                          CHUNK, RANK, WORLD_SIZE)
            if r // s == RANK:  # residual row i = r - RANK*s as lines of row S + i
                shift = (S - RANK * s) * H
                lines_push_to(res - S * H, buf_table, -1, lines_off, start + shift, end + shift,
                              seq, slot_words, DTYPE, CHUNK, RANK, WORLD_SIZE)
        else:
            for k in tl.static_range(1, WORLD_SIZE):
                q = (RANK + k) % WORLD_SIZE
                lines_push_to(src + q * as_i64(s) * H, buf_table, q, lines_off, start, end, seq,
                              slot_words, DTYPE, CHUNK, RANK, WORLD_SIZE)
        u += nprog


@triton.jit
def _gathered_unit(src, res, out, area, r, c0, start, end, s, H, seq, flag, slot_words, status,
                   timeout_ns, pad, DTYPE: tl.constexpr, CHUNK: tl.constexpr, NC: tl.constexpr,
                   RANK: tl.constexpr, WORLD_SIZE: tl.constexpr, USE_PTX: tl.constexpr,
                   ALIGNED: tl.constexpr):
    """Phase 2 with ``ALL_GATHER``: the unit ``[start, end)`` of row ``r = q*s + i``, as rank
    ``q`` computes it (with rank ``q``'s residual row ``i``, from its lines when ``q`` is a
    peer). Stores ``x`` to the residual (``q == RANK``) or, with ``NC > 1``, to the output row
    where it waits for its norm. Returns ``(x, status)``."""
    EPW: tl.constexpr = 32 // DTYPE.primitive_bitwidth  # elements per 32-bit word
    offs = tl.arange(0, CHUNK)
    mask = start + offs < end
    q = r // s
    i = r - q * s
    r0 = tl.zeros([CHUNK], tl.float32)
    if q == RANK:
        r0 = tl.load(res + i * H + c0 + offs, mask=mask, other=0.0).to(tl.float32)
    acc, status = lines_reduce_chunk(src, area, start, end, seq, flag, slot_words, status,
                                     timeout_ns, pad, DTYPE, CHUNK, RANK, WORLD_SIZE, USE_PTX,
                                     ALIGNED)
    if q != RANK:  # rank q's residual piece
        shift = (WORLD_SIZE * as_i64(s) - q * s) * H  # residual row i as lines of row S + i
        words, st = lines_get(lines_slot(area, seq, q, slot_words, WORLD_SIZE),
                              (start + shift) // EPW, (end + shift) // EPW, flag, q.to(tl.int32),
                              status, timeout_ns, pad, CHUNK // EPW, USE_PTX, ALIGNED)
        status = status | st
        r0 = words_to_elems(words, DTYPE).to(tl.float32)
    x = (acc + r0).to(DTYPE)
    if q == RANK:
        tl.store(res + i * H + c0 + offs, x, mask=mask)
    elif NC > 1:  # x waits for its norm in the output row
        tl.store(out + start + offs, x, mask=mask)
    return x, status


@triton.jit
def _fused_rmsnorm_lines_kernel(in_addr, out_addr, res_addr, w_addr, buf_table, sig_table,
                                err_addr, seq_cap, lines_off, slot_words, s, H, eps, timeout_ns,
                                q_addr, DTYPE: tl.constexpr, W_DTYPE: tl.constexpr,
                                RANK: tl.constexpr, WORLD_SIZE: tl.constexpr,
                                WORLD_P2: tl.constexpr, CHUNK: tl.constexpr, NC: tl.constexpr,
                                ALL_GATHER: tl.constexpr, SCOPE: tl.constexpr,
                                USE_PTX: tl.constexpr,
                                ALIGNED: tl.constexpr, PDL: tl.constexpr, QUANT: tl.constexpr,
                                Q_DTYPE: tl.constexpr, Q_MAX: tl.constexpr):
    pid, nprog, seq, pad, area = lines_begin(sig_table, buf_table, lines_off, RANK, WORLD_SIZE,
                                             PDL)
    flag = lines_flag(seq)
    src = as_ptr(in_addr, DTYPE, ALIGNED)
    res = as_ptr(res_addr, DTYPE, ALIGNED)
    out = as_ptr(out_addr, Q_DTYPE, ALIGNED)
    C = tl.cdiv(H, CHUNK)
    U = (WORLD_SIZE * as_i64(s) if ALL_GATHER else as_i64(s)) * C  # units of the rows computed
    _push_units(src, res, buf_table, lines_off, s, U, C, H, pid, nprog, seq, slot_words, DTYPE,
                CHUNK, RANK, WORLD_SIZE, ALL_GATHER)  # 1. push
    stats = lines_slot(area, seq, RANK, slot_words, WORLD_SIZE)
    status = tl.full([], 0, tl.int32)
    u = pid
    while u < U:  # 2. reduce and add (lines_rows.py)
        r, c0, start, end = unit_span(u, C, H, CHUNK)
        w = unit_weight(w_addr, c0, H, W_DTYPE, CHUNK, NC)  # loads before the waits
        if ALL_GATHER:  # row r = q*s + i as rank q computes it
            x, status = _gathered_unit(src, res, out, area, r, c0, start, end, s, H, seq, flag,
                                       slot_words, status, timeout_ns, pad, DTYPE, CHUNK, NC,
                                       RANK, WORLD_SIZE, USE_PTX, ALIGNED)
        else:  # this rank's row r
            offs = start + tl.arange(0, CHUNK)
            r0 = tl.load(res + offs, mask=offs < end, other=0.0)
            acc, status = lines_reduce_chunk(src + RANK * as_i64(s) * H, area, start, end, seq,
                                             flag, slot_words, status, timeout_ns, pad, DTYPE,
                                             CHUNK, RANK, WORLD_SIZE, USE_PTX, ALIGNED)
            x = (acc + r0.to(tl.float32)).to(DTYPE)
            tl.store(res + offs, x, mask=offs < end)
        unit_done(x, c0, u, C, stats, out + r * H, w, H, eps, flag, r, out_addr, q_addr, NC,
                  QUANT, Q_DTYPE, Q_MAX)
        u += nprog
    if NC > 1:  # 3. normalise (lines_rows.py); x waits in the residual for this rank's rows
        status = norm_units(pid, nprog, U, C, stats, res, out, w_addr, H, eps, flag, status,
                            timeout_ns, pad, RANK * as_i64(s) if ALL_GATHER else 0, s, W_DTYPE,
                            CHUNK, NC, RANK, USE_PTX)
    lines_finish(sig_table, buf_table, lines_off, pid, seq, slot_words, status, err_addr, seq_cap,
                 RANK, WORLD_SIZE, WORLD_P2, SCOPE)
