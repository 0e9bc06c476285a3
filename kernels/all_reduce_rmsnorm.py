"""All-reduce + residual add + RMSNorm over rows, one-shot or two-shot, in one launch.

``input`` is ``[S, H]`` per rank (partial sums); ``residual`` ``[S, H]`` is the same on every
rank. Rows are cut into ``SLICES`` slices of ``rps`` rows (one-shot: one slice of all ``S``
rows; two-shot: one per rank, slice ``q`` reduced by rank ``q``). Block ``b`` handles rows
``q * rps + j`` with ``j % blocks == b`` on every rank and in every phase, so a per-block
barrier orders everything a row goes through. The region (``region_off`` in every rank's
buffer) holds each rank's input. Phases of ``_all_reduce_rmsnorm_kernel``:

1. with ``STAGE_IN``: copy this block's rows of the local input into the region;
2. start barrier: every rank's rows are in the region;
3. reduce row ``i`` of the slice over all ranks in fp32 (``multimem.ld_reduce`` once, or one
   load per peer), add the residual row and round to the residual's dtype: ``x``.
   One-shot (every row): store ``x`` to the residual and ``rmsnorm(x) * weight`` (fp32
   statistics) to ``out``. Two-shot (rows of slice ``RANK``): store ``x`` at row ``i`` of the
   result area (``res_off`` in every rank's buffer; the region itself when the input was staged,
   since only this rank's block ``b`` reads that row of the region and it has read it already;
   another area when the input is zero-copy, which is left unchanged) on every rank
   (``multimem.st`` or one store per peer);
4. end barrier: every slice's ``x`` rows have landed on every rank, and nobody reads this rank's
   region any more (it may be overwritten once the launch is complete);
5. two-shot only: for this block's rows of every slice, read ``x`` from the local result area, store
   it to the residual and ``rmsnorm(x) * weight`` to ``out`` (every rank normalises every row:
   the norm is cheap next to a second all-gather).

A row is one chunk: ``BLOCK_H`` (a power of two >= H) covers it, the tail masked.

``_all_reduce_rmsnorm_lines_kernel`` (one-shot for small inputs, no barrier; lines of
kernels/lines.py; rows in units of ``CHUNK`` elements, kernels/lines_rows.py): each unit's block
pushes it as lines into slot ``RANK`` of every peer, sums it over the ranks in rank order (its own
part from the input, the peers' from its slots; fp32, the same bits on every rank), adds the
residual and stores the rounded sum back to the residual; the row's norm follows as in
lines_rows.py. Nothing of the buffer outside the line area is touched.
"""

import triton
import triton.language as tl

from .barrier import barrier, call_begin, call_end
from .common import copy_units, lines_push_to, lines_reduce_chunk, rms_normed, row_operands
from .lines import lines_begin, lines_finish, lines_flag, lines_slot
from .lines_rows import norm_units, unit_done, unit_span, unit_weight
from .ptx import as_i64, as_ptr, load_reduce, peer_addr, store_all
from .quant import store_row


@triton.jit
def _finish_row(x, row, res, out, w, cols, mask, H, eps, out_addr, q_addr, QUANT: tl.constexpr,
                Q_DTYPE: tl.constexpr, Q_MAX: tl.constexpr):
    """Store the reduced row ``x`` (residual dtype) to the residual and its RMSNorm (fp32
    statistics) times ``w`` to ``out`` (quantised with ``QUANT``: kernels/quant.py)."""
    off = row * H + cols
    tl.store(res + off, x, mask=mask)
    store_row(out + off, rms_normed(x, mask, w, H, eps), mask, out_addr, q_addr, row, QUANT,
              Q_DTYPE, Q_MAX)


@triton.jit
def _all_reduce_rmsnorm_kernel(in_addr, out_addr, res_addr, w_addr, buf_table, sig_table, mc_addr,
                               err_addr, seq_cap, region_off, res_off, S, H, rps, eps,
                               timeout_ns, q_addr,
                               DTYPE: tl.constexpr, W_DTYPE: tl.constexpr, RANK: tl.constexpr,
                               WORLD_SIZE: tl.constexpr, WORLD_P2: tl.constexpr,
                               BLOCK_H: tl.constexpr, TWO_SHOT: tl.constexpr,
                               STAGE_IN: tl.constexpr, USE_MULTIMEM: tl.constexpr,
                               SCOPE: tl.constexpr, USE_PTX: tl.constexpr, ALIGNED: tl.constexpr,
                               PDL: tl.constexpr, QUANT: tl.constexpr, Q_DTYPE: tl.constexpr,
                               Q_MAX: tl.constexpr):
    pid, nprog, seq = call_begin(sig_table, RANK, WORLD_SIZE, PDL)
    ESIZE: tl.constexpr = DTYPE.primitive_bitwidth // 8
    SLICES: tl.constexpr = WORLD_SIZE if TWO_SHOT else 1
    local = peer_addr(buf_table, RANK) + region_off
    if STAGE_IN:
        copy_units(in_addr, local, as_i64(S) * H, rps, H, pid, nprog, DTYPE, BLOCK_H, SLICES,
                   ALIGNED)
    bad = barrier(sig_table, pid, seq, 0, err_addr, timeout_ns, seq_cap, 0, RANK, WORLD_SIZE,
                  WORLD_P2, SCOPE, USE_PTX, True, True)
    cols, mask, res, out, w = row_operands(res_addr, out_addr, w_addr, H, DTYPE, W_DTYPE, Q_DTYPE,
                                           BLOCK_H, ALIGNED)
    first = tl.zeros([], dtype=tl.int64)  # the first row of this rank's slice
    if TWO_SHOT:
        first += RANK * as_i64(rps)
    j = tl.where(bad != 0, rps, pid)
    while j < rps:  # see ptx.py on loops
        row = first + j
        if row < S:
            row_off = region_off + row * H * ESIZE
            acc = load_reduce(mc_addr, buf_table, row_off, 0, H, BLOCK_H, DTYPE, WORLD_SIZE,
                              USE_MULTIMEM, ALIGNED)
            r0 = tl.load(res + row * H + cols, mask=mask, other=0.0).to(tl.float32)
            x = (acc + r0).to(DTYPE)
            if TWO_SHOT:
                store_all(mc_addr, buf_table, res_off + row * H * ESIZE, 0, H, x, BLOCK_H, DTYPE,
                          RANK, WORLD_SIZE, USE_MULTIMEM, ALIGNED)
            else:
                _finish_row(x, row, res, out, w, cols, mask, H, eps, out_addr, q_addr, QUANT,
                            Q_DTYPE, Q_MAX)
        j += nprog
    bad = barrier(sig_table, pid, seq, bad, err_addr, timeout_ns, seq_cap, 1, RANK, WORLD_SIZE,
                  WORLD_P2, SCOPE, USE_PTX, True, True)
    if TWO_SHOT:
        src = as_ptr(peer_addr(buf_table, RANK) + res_off, DTYPE, ALIGNED)
        j = tl.where(bad != 0, rps, pid)
        while j < rps:
            for q in tl.static_range(WORLD_SIZE):
                row = q * as_i64(rps) + j
                if row < S:
                    x = tl.load(src + row * H + cols, mask=mask)
                    _finish_row(x, row, res, out, w, cols, mask, H, eps, out_addr, q_addr, QUANT,
                            Q_DTYPE, Q_MAX)
            j += nprog
    call_end(sig_table, pid, seq, seq_cap, RANK, WORLD_SIZE)


@triton.jit
def _all_reduce_rmsnorm_lines_kernel(in_addr, out_addr, res_addr, w_addr, buf_table, sig_table,
                                     err_addr, seq_cap, lines_off, slot_words, S, H, eps,
                                     timeout_ns, q_addr, DTYPE: tl.constexpr, W_DTYPE: tl.constexpr,
                                     RANK: tl.constexpr, WORLD_SIZE: tl.constexpr,
                                     WORLD_P2: tl.constexpr, CHUNK: tl.constexpr, NC: tl.constexpr,
                                     SCOPE: tl.constexpr, USE_PTX: tl.constexpr,
                                     ALIGNED: tl.constexpr, PDL: tl.constexpr,
                                     QUANT: tl.constexpr, Q_DTYPE: tl.constexpr,
                                     Q_MAX: tl.constexpr):
    pid, nprog, seq, pad, area = lines_begin(sig_table, buf_table, lines_off, RANK, WORLD_SIZE,
                                             PDL)
    flag = lines_flag(seq)
    src = as_ptr(in_addr, DTYPE, ALIGNED)
    res = as_ptr(res_addr, DTYPE, ALIGNED)
    out = as_ptr(out_addr, Q_DTYPE, ALIGNED)
    C = tl.cdiv(H, CHUNK)
    U = S * C
    u = pid
    while u < U:  # 1. push; see ptx.py on loops
        r, c0, start, end = unit_span(u, C, H, CHUNK)
        lines_push_to(src, buf_table, -1, lines_off, start, end, seq, slot_words, DTYPE, CHUNK,
                      RANK, WORLD_SIZE)
        u += nprog
    stats = lines_slot(area, seq, RANK, slot_words, WORLD_SIZE)
    status = tl.full([], 0, tl.int32)
    u = pid
    while u < U:  # 2. reduce, add, store the residual (lines_rows.py)
        r, c0, start, end = unit_span(u, C, H, CHUNK)
        offs = start + tl.arange(0, CHUNK)
        r0 = tl.load(res + offs, mask=offs < end, other=0.0)  # loads before the waits
        w = unit_weight(w_addr, c0, H, W_DTYPE, CHUNK, NC)
        acc, status = lines_reduce_chunk(src, area, start, end, seq, flag, slot_words, status,
                                         timeout_ns, pad, DTYPE, CHUNK, RANK, WORLD_SIZE, USE_PTX,
                                         ALIGNED)
        x = (acc + r0.to(tl.float32)).to(DTYPE)
        tl.store(res + offs, x, mask=offs < end)
        unit_done(x, c0, u, C, stats, out + r * H, w, H, eps, flag, r, out_addr, q_addr, NC,
                  QUANT, Q_DTYPE, Q_MAX)
        u += nprog
    if NC > 1:  # 3. normalise (lines_rows.py)
        status = norm_units(pid, nprog, U, C, stats, res, out, w_addr, H, eps, flag, status,
                            timeout_ns, pad, 0, S, W_DTYPE, CHUNK, NC, RANK, USE_PTX)
    lines_finish(sig_table, buf_table, lines_off, pid, seq, slot_words, status, err_addr, seq_cap,
                 RANK, WORLD_SIZE, WORLD_P2, SCOPE)
