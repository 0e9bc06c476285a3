"""Rows in units, for the barrier-free fused RMSNorm kernels (lines of kernels/ll.py).

A row of ``H`` elements is cut into ``C = cdiv(H, CHUNK)`` units of ``CHUNK`` elements (the last
one masked); unit ``u = row * C + k`` is handled by block ``u % blocks`` in every phase, so one
row's reduction spreads over up to ``C`` blocks instead of one. Phases of a kernel:

1. push: each unit's pieces of the messages, by the unit's block (so a kernel running in place
   overwrites only pieces its own block has pushed);
2. reduce (:func:`unit_span`, ``common.ll_reduce_chunk``): the unit summed over the ranks in
   rank order, plus the residual, rounded to the dtype: ``x``. With ``C == 1`` the row is
   whole: :func:`unit_done` normalises and stores it at once. Else the kernel keeps ``x`` in
   memory it owns (the residual, or the output row of a row it computes for a peer) and
   :func:`unit_done` publishes the unit's sum of squares (fp32) as a *stats line*;
3. with ``C > 1`` (:func:`unit_norm`): wait for the row's ``C`` stats lines, sum them in unit
   order (one ``tl.sum`` of the same shape everywhere: the same bits in every block and on every
   rank), reload ``x``, normalise, store.

Stats lines lie in this rank's own slot of its line area (slot ``RANK``: peers write only their own
slots), parity of the call: line ``u`` is ``(flag << 32) | bits(ss_u)``, and line ``U + row``
(``U`` units in all) counts the blocks done with the row. Both are local to the GPU. A block that
has read its row's stats and stored its output adds one to the count (a relaxed ``atom.gpu``: its
loads have returned, since the wait's loop ended on their values, and the clearing stores depend on
the count's old value; an acq_rel atomic would also wait for the thread's NVLink pushes); the block
that brings it to ``C`` sets the row's stats lines and the count back to 0. So the area is all 0
between calls, as kernels/ll.py requires, and a stale line never carries a later call's flag. The
count comes after the wait's block barrier (kernels/ll.py, "Warps"): no warp of a block that
counted is still reading. (An inbox per unit, written by each unit of the row and cleared by its
one reader, avoids the atomic and measured 0.3-0.5 us faster; it hung on 2x H200 for ``[64, 4096]``
bf16, 2 warps and 4 units a row, before the waits had that barrier, and has not run on a GPU
since.) Phase 3 waits for other blocks of the same launch: every block must be running at once,
which holds on the GPU (the grid is bounded by co-residency) but not in the interpreter, which runs
blocks one after another, so there a launch with ``C > 1`` has one block.

A block whose waits failed goes on (its later waits return at once) and still publishes, so the
row's other blocks never wait for it; the call raises (``barrier.give_up``).
"""

import triton
import triton.language as tl

from .common import rms_normed, rms_scaled, sum_sq
from .ll import ll_peek, ll_put


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
def unit_done(x, c0, u, stats, out_row, w, H, eps, flag, NC: tl.constexpr):
    """Phase 2's end for unit ``u`` (columns ``c0 + [0, CHUNK)`` of its row, ``x`` in the
    dtype): with ``NC == 1`` (whole rows) store its RMSNorm times the weight ``w``
    (:func:`unit_weight`) at pointer ``out_row + column``; else publish its sum of squares as
    stats line ``u`` of the slot at ``stats``."""
    cols = c0 + tl.arange(0, x.shape[0])
    mask = cols < H
    if NC == 1:
        tl.store(out_row + cols, rms_normed(x, mask, w, H, eps), mask=mask)
    else:
        ll_put(stats, u, sum_sq(x, mask).to(tl.int32, bitcast=True), True, flag)


@triton.jit
def unit_norm(r, c0, C, U, stats, x_row, out_row, w_addr, H, eps, flag, src, status,
              timeout_ns, pad, W_DTYPE: tl.constexpr, CHUNK: tl.constexpr, NC: tl.constexpr,
              USE_PTX: tl.constexpr):
    """Phase 3 for the unit at row ``r``, column ``c0`` (:func:`unit_span`; ``C > 1`` units per
    row, ``NC`` the power of two >= ``C``): wait for its row's stats lines (this rank's bit
    ``src`` on failure), sum them, store the normalised ``x`` (read at pointer ``x_row +
    column``) times the weight at ``out_row + column``, and count this block done with the row
    (the last one clears). Returns ``status`` or-ed with the wait's."""
    cols = c0 + tl.arange(0, CHUNK)
    mask = cols < H
    # loads first, the wait after: their latency overlaps it
    w = tl.load(w_addr.to(tl.pointer_type(W_DTYPE)) + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_row + cols, mask=mask, other=0.0)
    words, st = ll_peek(stats, r * C, r * C + C, flag, src, status, timeout_ns, pad, NC, USE_PTX)
    ss = tl.sum(words.to(tl.float32, bitcast=True), axis=0)  # 0.0 past C
    tl.store(out_row + cols, rms_scaled(x, mask, ss, w, H, eps), mask=mask)
    lines = stats.to(tl.pointer_type(tl.int64))
    if tl.atomic_add(lines + U + r, 1, sem="relaxed", scope="gpu") == C - 1:
        first = r * C + tl.arange(0, NC)
        tl.store(lines + first, tl.zeros([NC], tl.int64), mask=first < r * C + C)
        tl.store(lines + U + r, 0)
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
        status = unit_norm(r, c0, C, U, stats, keep, out + r * H, w_addr, H, eps, flag, RANK,
                           status, timeout_ns, pad, W_DTYPE, CHUNK, NC, USE_PTX)
        u += nprog
    return status
