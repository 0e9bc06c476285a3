"""Rows in units, for the barrier-free fused RMSNorm kernels (lines of kernels/lines.py).

A row of ``H`` elements is cut into ``C = cdiv(H, CHUNK)`` units of ``CHUNK`` elements (the last
one masked); unit ``u = row * C + k`` is handled by block ``u % blocks`` in every phase, so one
row's reduction spreads over up to ``C`` blocks instead of one. Phases of a kernel:

1. push: each unit's pieces of the messages, by the unit's block (so a kernel running in place
   overwrites only pieces its own block has pushed);
2. reduce (:func:`unit_span`, ``common.lines_reduce_chunk``): the unit summed over the ranks in
   rank order, plus the residual, rounded to the dtype: ``x``. With ``C == 1`` the row is
   whole: :func:`unit_done` normalises and stores it at once. Else the kernel keeps ``x`` in
   memory it owns (the residual, or the output row of a row it computes for a peer) and
   :func:`unit_done` publishes the unit's sum of squares (fp32) as a *stats line*;
3. with ``C > 1`` (:func:`unit_norm`): wait for the row's ``C`` stats lines, sum them in unit
   order (one ``tl.sum`` of the same shape everywhere: the same bits in every block and on every
   rank), reload ``x``, normalise, store.

Stats lines lie in this rank's own slot of its line area (slot ``RANK``: peers write only their own
slots), parity of the call, local to the GPU. Each unit has an inbox of ``NC`` lines (unit ``v``'s
at line ``v * NC``); the block of unit ``(row, c)`` writes ``(flag << 32) | bits(ss)`` to entry
``c`` of the inbox of every unit of its row, and each unit's block waits for the ``C`` entries of
its own inbox and clears them (``lines.lines_get``), as a rank does with its slots: a line has one
writer and one reader, and holds 0 or the flag of the call in flight (kernels/lines.py). So no
atomic is needed, and the area is all 0 between calls. The wait ends with a block barrier before the
clear (kernels/lines.py, "Warps"): no warp of the block still polls a line it clears.
(Measured on 2x H200, W=2, graph, bf16 all-reduce + add + RMSNorm [1, 2, 4, 8, 16] x 4096:
inboxes 3.86 / 3.88 / 3.98 / 4.26 / 4.55 us, in the same run stats lines shared by the row and
counted by a relaxed atomic 4.08 / 4.12 / 4.37 / 4.64 / 5.12;
benchmarks/results/archive/2026-11-26_fbba1ea/rows_inbox_vs_counted_h200x2_w2.csv.)
Phase 3 waits for other blocks of the same launch: every block must be running at once, which
holds on the GPU (the grid is bounded by co-residency) but not in the interpreter, which runs
blocks one after another, so there a launch with ``C > 1`` has one block.

A block whose waits failed goes on (its later waits return at once) and still publishes, so the
row's other blocks never wait for it; the call raises (``lines.lines_finish``).
"""

import triton
import triton.language as tl

from .common import rms_normed, rms_scaled, sum_sq
from .lines import lines_get, lines_put
from .quant import store_row


@triton.jit
def unit_span(u, C, H, CHUNK: tl.constexpr):
    """Unit ``u``'s row ``r``, first column ``c0``, and its elements ``[start, end)`` counted
    over rows of ``H`` (int64)."""
    r = (u // C).to(tl.int64)
    c0 = (u - r * C) * CHUNK
    start = r * H + c0
    return r, c0, start, r * H + tl.minimum(c0 + CHUNK, H)


@triton.jit
def unit_weight(w_addr, c0, H, W_DTYPE: tl.constexpr, CHUNK: tl.constexpr, NC: tl.constexpr):
    """The weight (fp32) of columns ``c0 + [0, CHUNK)`` for :func:`unit_done`, loaded before the
    unit's waits (so its latency overlaps them) when ``NC == 1``; else zeros (unused)."""
    cols = c0 + tl.arange(0, CHUNK)
    w = tl.zeros([CHUNK], tl.float32)
    if NC == 1:
        w = tl.load(w_addr.to(tl.pointer_type(W_DTYPE)) + cols, mask=cols < H,
                    other=0.0).to(tl.float32)
    return w


@triton.jit
def unit_done(x, c0, u, C, stats, out_row, w, H, eps, flag, r, out_addr, q_addr,
              NC: tl.constexpr, QUANT: tl.constexpr, Q_DTYPE: tl.constexpr, Q_MAX: tl.constexpr):
    """Phase 2's end for unit ``u`` (columns ``c0 + [0, CHUNK)`` of its row ``r``, ``x`` in the
    dtype): with ``NC == 1`` (whole rows) store its RMSNorm times the weight ``w``
    (:func:`unit_weight`) at pointer ``out_row + column`` (quantised with ``QUANT``:
    kernels/quant.py, whose kernels run FP8 rows whole); else send its sum of squares to the
    inboxes of its row's ``C`` units in the slot at ``stats``."""
    cols = c0 + tl.arange(0, x.shape[0])
    mask = cols < H
    if NC == 1:
        store_row(out_row + cols, rms_normed(x, mask, w, H, eps), mask, out_addr, q_addr, r,
                  QUANT, Q_DTYPE, Q_MAX)
    else:
        k = tl.arange(0, NC)
        c = u % C
        ss = tl.zeros([NC], tl.float32) + sum_sq(x, mask)
        lines_put(stats, (u - c + k) * NC + c, ss.to(tl.int32, bitcast=True), k < C, flag)


@triton.jit
def unit_norm(u, c0, C, stats, x_row, out_row, w_addr, H, eps, flag, src, status, timeout_ns,
              pad, W_DTYPE: tl.constexpr, CHUNK: tl.constexpr, NC: tl.constexpr,
              USE_PTX: tl.constexpr):
    """Phase 3 for unit ``u`` at column ``c0`` of its row (:func:`unit_span`; ``C > 1`` units
    per row, ``NC`` the power of two >= ``C``): wait for its inbox (this rank's bit ``src`` on
    failure) and clear it, sum the row's sums of squares, and store the normalised ``x`` (read
    at pointer ``x_row + column``) times the weight at ``out_row + column``. Returns ``status``
    or-ed with the wait's."""
    cols = c0 + tl.arange(0, CHUNK)
    mask = cols < H
    # loads first, the wait after: their latency overlaps it
    w = tl.load(w_addr.to(tl.pointer_type(W_DTYPE)) + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_row + cols, mask=mask, other=0.0)
    words, st = lines_get(stats, u * NC, u * NC + C, flag, src, status, timeout_ns, pad, NC,
                          USE_PTX, False)
    ss = tl.sum(words.to(tl.float32, bitcast=True), axis=0)  # 0.0 past C
    tl.store(out_row + cols, rms_scaled(x, mask, ss, w, H, eps), mask=mask)
    return status | st


@triton.jit
def norm_units(pid, nprog, U, C, stats, res, out, w_addr, H, eps, flag, status, timeout_ns, pad,
               own_first, own_rows, W_DTYPE: tl.constexpr, CHUNK: tl.constexpr,
               NC: tl.constexpr, RANK: tl.constexpr, USE_PTX: tl.constexpr):
    """Phase 3 (:func:`unit_norm`) for this block's units ``u = pid (mod nprog)`` below ``U``:
    ``x`` of row ``r`` waits in row ``r - own_first`` of the residual (pointer ``res``) for the
    ``own_rows`` rows from ``own_first``, else in row ``r`` of the output (``out``). Returns
    ``status`` or-ed with the waits'."""
    u = pid
    while u < U:  # see ptx.py on loops
        r, c0, start, end = unit_span(u, C, H, CHUNK)
        keep = out + r * H
        if (r >= own_first) & (r < own_first + own_rows):
            keep = res + (r - own_first) * H
        status = unit_norm(u, c0, C, stats, keep, out + r * H, w_addr, H, eps, flag, RANK,
                           status, timeout_ns, pad, W_DTYPE, CHUNK, NC, USE_PTX)
        u += nprog
    return status
