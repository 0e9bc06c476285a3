"""Phases shared by several collectives (device code)."""

import triton
import triton.language as tl

from .ptx import as_i64, as_ptr


@triton.jit
def copy_shards(src_addr, dst_addr, shard_len, chunk_len, nchunks, pid, nprog, skip,
                DTYPE: tl.constexpr, BLOCK: tl.constexpr, WORLD_SIZE: tl.constexpr,
                ALIGNED: tl.constexpr):
    """Copy ``WORLD_SIZE`` shards of ``shard_len`` elements; a shard is ``nchunks`` chunks of
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
def row_operands(res_addr, out_addr, w_addr, H, DTYPE: tl.constexpr, W_DTYPE: tl.constexpr,
                 BLOCK_H: tl.constexpr, ALIGNED: tl.constexpr):
    """What the fused RMSNorm kernels hold for every row: the column offsets and their mask (the
    row's tail), residual and output pointers, and the weight in fp32."""
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    res = as_ptr(res_addr, DTYPE, ALIGNED)
    out = as_ptr(out_addr, DTYPE, ALIGNED)
    w = tl.load(as_ptr(w_addr, W_DTYPE, ALIGNED) + cols, mask=mask, other=0.0).to(tl.float32)
    return cols, mask, res, out, w
