"""FP8 output of the fused RMSNorm kernels: the normed rows quantised in the launch that
computes them.

A kernel with ``QUANT`` (a constexpr: 0 none, 1 static, 2 dynamic) stores each normed row ``y``
(already rounded to the input's dtype: the values the unquantised op returns) as
``clamp(y / scale, -Q_MAX, Q_MAX)`` cast to ``Q_DTYPE`` (``tl.float8e4nv`` or ``tl.float8e5``;
``Q_MAX`` its largest finite value; the value rounded to the FP8 grid in fp32 first:
:func:`fp8_grid`). Static: ``scale`` is the fp32 at address ``q_addr``.
Dynamic: ``scale = amax(|y|) / Q_MAX`` of the row (1 for a row of zeros), stored as fp32 at
``out_addr + q_addr + 4 * row`` (``q_addr``: the scales' offset from the output). The whole row
is in hand where it is stored (every kernel with dynamic scaling runs rows as one chunk), so the
amax is one ``tl.max``. With ``QUANT`` 0 none of this is compiled.
"""

import triton
import triton.language as tl

from .ptx import as_i64, as_ptr, peer_addr, store_all


@triton.jit
def quant_scale_ptr(out_addr, q_addr, row, QUANT: tl.constexpr):
    """The fp32 scale of ``row``: the static scale, or the row's entry of the dynamic scales."""
    addr = as_i64(q_addr)
    if QUANT == 2:
        addr = as_i64(out_addr) + q_addr + as_i64(row) * 4
    return addr.to(tl.pointer_type(tl.float32))


@triton.jit
def store_row(ptr, y, mask, out_addr, q_addr, row, QUANT: tl.constexpr, Q_DTYPE: tl.constexpr,
              Q_MAX: tl.constexpr):
    """Store the normed row (or piece of a row, static scaling only) ``y`` at ``ptr`` (a pointer
    to the output's dtype): as it is without ``QUANT``, else quantised (module docstring)."""
    if QUANT == 0:
        tl.store(ptr, y, mask=mask)
    else:
        yf = tl.where(mask, y.to(tl.float32), 0.0)
        sp = quant_scale_ptr(out_addr, q_addr, row, QUANT)
        if QUANT == 1:
            scale = tl.load(sp)
        else:
            amax = tl.max(tl.abs(yf), axis=0)
            scale = tl.where(amax > 0.0, amax / Q_MAX, 1.0)
            tl.store(sp, scale)
        q = fp8_grid(tl.minimum(tl.maximum(yf / scale, -Q_MAX), Q_MAX), Q_DTYPE)
        tl.store(ptr, q.to(Q_DTYPE), mask=mask)


@triton.jit
def fp8_grid(v, Q_DTYPE: tl.constexpr):
    """``v`` (fp32, finite) rounded to nearest-even on ``Q_DTYPE``'s grid, so the cast after it
    is exact: the interpreter's fp32 -> FP8 cast drops the carry of a mantissa rounded up into
    the next power of two (7.9 -> 4.0), the GPU's does not, and both agree on exact values. The
    grid step at ``|v|`` is ``2^(max(e, emin) - mantissa bits)`` (``e``: ``v``'s exponent; the
    subnormal step below ``emin``); adding and taking away ``1.5 * 2^23`` steps rounds to it."""
    MANT: tl.constexpr = Q_DTYPE.fp_mantissa_width
    EMIN: tl.constexpr = 1 - Q_DTYPE.exponent_bias
    e = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    magic = ((tl.maximum(e, EMIN) - MANT + 150) << 23) | (1 << 22)
    m = magic.to(tl.float32, bitcast=True)
    return (v + m) - m


@triton.jit
def quant_row(y, mask, out_addr, q_addr, row, QUANT: tl.constexpr, Q_DTYPE: tl.constexpr,
              Q_MAX: tl.constexpr):
    """The row ``y`` quantised exactly as :func:`store_row` stores it, stored nowhere: ``(q,
    scale)``, ``q`` in ``Q_DTYPE`` (0 where not ``mask``) and the fp32 scale (the static one, or
    the row's dynamic one)."""
    yf = tl.where(mask, y.to(tl.float32), 0.0)
    if QUANT == 1:
        scale = tl.load(quant_scale_ptr(out_addr, q_addr, row, QUANT))
    else:
        amax = tl.max(tl.abs(yf), axis=0)
        scale = tl.where(amax > 0.0, amax / Q_MAX, 1.0)
    q = fp8_grid(tl.minimum(tl.maximum(yf / scale, -Q_MAX), Q_MAX), Q_DTYPE)
    return q.to(Q_DTYPE), scale


@triton.jit
def gather_row(y, mask, out_row, out_addr, q_addr, row, mc_addr, buf_table, row_off, H,
               BLOCK_H: tl.constexpr, RANK: tl.constexpr, WORLD_SIZE: tl.constexpr,
               USE_MULTIMEM: tl.constexpr, ALIGNED: tl.constexpr, QUANT: tl.constexpr,
               Q_DTYPE: tl.constexpr, Q_MAX: tl.constexpr):
    """The all-gather of an FP8 row: ``y`` (this rank's normed row ``row``, ``BLOCK_H >= H``
    lanes) quantised once (:func:`quant_row`), stored at pointer ``out_row`` (and its dynamic
    scale among the scales), and its *record* stored at byte ``row_off`` of every rank's buffer:
    the ``H`` FP8 bytes, then (``QUANT`` 2) the scale's 4 bytes at ``row_off + H``, little
    endian, at any alignment. Multimem: the record's whole 16-byte vectors by ``multimem.st``
    (``BLOCK_H >= 16``), the rest by a store to every peer; else every byte by peer stores.
    ``ALIGNED``: ``row_off`` and ``H`` are multiples of 16 (no rest). :func:`gathered_rows`
    reads the records."""
    q, scale = quant_row(y, mask, out_addr, q_addr, row, QUANT, Q_DTYPE, Q_MAX)
    tl.store(out_row, q, mask=mask)
    if QUANT == 2:
        tl.store(quant_scale_ptr(out_addr, q_addr, row, QUANT), scale)
    qb = q.to(tl.uint8, bitcast=True)
    cols = tl.arange(0, BLOCK_H)
    rest = mask
    peer_rows = True  # the peers get some of the row's bytes by plain stores
    if USE_MULTIMEM:
        if BLOCK_H >= 16:  # nested: a constexpr ``and`` would make the branch a runtime one
            store_all(mc_addr, buf_table, row_off, 0, H, qb, BLOCK_H, tl.uint8, RANK, WORLD_SIZE,
                      True, ALIGNED)
            rest = mask & (cols >= (H // 16) * 16)
            if ALIGNED:
                peer_rows = False
    for r in tl.static_range(WORLD_SIZE):
        peer = (RANK + 1 + r) % WORLD_SIZE  # as store_all: not every rank at rank 0 first
        base = peer_addr(buf_table, peer) + row_off
        if peer_rows:
            tl.store(as_ptr(base, tl.uint8, ALIGNED) + cols, qb, mask=rest)
        if QUANT == 2:
            k = tl.arange(0, 4)
            sb = ((scale.to(tl.int32, bitcast=True) >> (k * 8)) & 0xFF).to(tl.uint8)
            tl.store(base.to(tl.pointer_type(tl.uint8)) + H + k, sb)


@triton.jit
def gathered_rows(local, out_addr, q_addr, s, H, row_bytes, pid, nprog, skip,
                  BLOCK_H: tl.constexpr, WORLD_SIZE: tl.constexpr, OWN: tl.constexpr,
                  ALIGNED: tl.constexpr, QUANT: tl.constexpr):
    """The records (:func:`gather_row`) of rows ``q*s + i`` (``i = pid (mod nprog)``, every
    ``q`` but ``OWN``), row ``r``'s at byte ``r * row_bytes`` of the region at ``local``, copied
    into the FP8 output (``H`` bytes a row) and, with ``QUANT`` 2, the scales; nothing when
    ``skip`` is nonzero."""
    src = as_ptr(local, tl.uint8, ALIGNED)
    out = as_ptr(out_addr, tl.uint8, ALIGNED)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    k = tl.arange(0, 4)
    i = tl.where(skip != 0, s, pid)
    while i < s:  # see ptx.py on loops
        for q in tl.static_range(WORLD_SIZE):
            if q != OWN:
                row = q * as_i64(s) + i
                rec = src + row * row_bytes
                tl.store(out + row * H + cols, tl.load(rec + cols, mask=mask), mask=mask)
                if QUANT == 2:
                    b = tl.load(rec + H + k).to(tl.int32)
                    bits = tl.sum(b << (k * 8), axis=0)  # disjoint bytes: the sum is the or
                    tl.store(quant_scale_ptr(out_addr, q_addr, row, QUANT),
                             bits.to(tl.float32, bitcast=True))
        i += nprog


@triton.jit
def quant_shards(src_addr, out_addr, q_addr, s, H, pid, nprog, skip, DTYPE: tl.constexpr,
                 BLOCK_H: tl.constexpr, WORLD_SIZE: tl.constexpr, OWN: tl.constexpr,
                 QUANT: tl.constexpr, Q_DTYPE: tl.constexpr, Q_MAX: tl.constexpr):
    """``copy_shards`` (kernels/common.py) of rows ``q*s + i`` (``i = pid (mod nprog)``, every
    ``q`` but ``OWN``) of ``H`` elements from ``src_addr`` (``DTYPE``) into the FP8 output,
    quantised; nothing when ``skip`` is nonzero."""
    src = src_addr.to(tl.pointer_type(DTYPE))
    out = out_addr.to(tl.pointer_type(Q_DTYPE))
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    i = tl.where(skip != 0, s, pid)
    while i < s:  # see ptx.py on loops
        for q in tl.static_range(WORLD_SIZE):
            if q != OWN:
                row = q * as_i64(s) + i
                y = tl.load(src + row * H + cols, mask=mask, other=0.0)
                store_row(out + row * H + cols, y, mask, out_addr, q_addr, row, QUANT, Q_DTYPE,
                          Q_MAX)
        i += nprog


@triton.jit
def quant_groups(v, Q_DTYPE: tl.constexpr, Q_MAX: tl.constexpr):
    """``v`` (fp32 ``[groups, G]``, lanes past the data 0) quantised per group (a row of ``v``):
    ``(q, scales)``, ``scales[g] = amax(|v[g]|) / Q_MAX`` (1 for a group of zeros) and ``q =
    clamp(v / scales[g], -Q_MAX, Q_MAX)`` in ``Q_DTYPE`` (rounded on the grid first:
    :func:`fp8_grid`). Both divisions round to nearest (``div_rn``, IEEE as torch's), so the
    GPU's results equal torch's bit for bit."""
    amax = tl.max(tl.abs(v), axis=1)
    scales = tl.where(amax > 0.0, tl.math.div_rn(amax, tl.full(amax.shape, Q_MAX, tl.float32)),
                      1.0)
    q = tl.math.div_rn(v, tl.broadcast_to(scales[:, None], v.shape))
    q = fp8_grid(tl.minimum(tl.maximum(q, -Q_MAX), Q_MAX), Q_DTYPE)
    return q.to(Q_DTYPE), scales
