"""Reduce-scatter (sum) along dim 0: every rank pulls its slice from every rank and reduces it.

Phases of ``_reduce_scatter_kernel`` (block ``b`` handles chunks ``c`` with ``c % blocks == b``):

1. with ``STAGE_IN``: copy chunk ``c`` of every slice of the local input into the region
   (only chunks that block ``b`` of the peers reads);
2. start barrier (release / acquire: the staged or zero-copy input is read after it): chunk
   ``c`` of every slice is in place on every rank;
3. reduce: load chunk ``c`` of slice ``RANK`` from every rank (``multimem.ld_reduce`` once, or
   one load per peer), accumulate in fp32, store to the local output;
4. end barrier (relaxed: only reads came before it, and their values are used): no peer reads
   this rank's chunk ``c`` any more, so the region (a zero-copy input written by, say, the next
   GEMM) may be overwritten once the launch is complete.

A block whose barrier fails (timeout, ranks out of step: kernels/barrier.py) skips the phases
after it.

``_reduce_scatter_lines_kernel`` (small messages, no barrier; lines of kernels/lines.py): block
``b`` pushes chunk ``c`` (``c % blocks == b``; ``BLOCK`` elements) of slice ``q`` of the local input
as lines into slot ``RANK`` of rank ``q``, for every peer ``q``, then sums chunk ``c`` over the
ranks in rank order (its own slice from the input, the peers' from its slots; fp32, the same order
on every rank) into the output. Nothing of the buffer outside the line area is touched.

``_reduce_scatter_push_kernel`` (large messages without multicast; the flagged chunks of
kernels/push.py): block ``b`` clears its flags, passes the start barrier, then for its chunks
``c`` (``c % blocks == b``) pushes chunk ``c`` of slice ``q`` of the local input (staged or
zero-copy: never read remotely) into its slot at every peer ``q`` and flags it, then waits for
the previous chunk's flags and sums that chunk over the ranks in rank order (its own slice from
the input, the peers' from its slots; fp32) into the output. A chunk's push runs before the
previous chunk's wait, so every block has a push in flight while it waits. No end barrier.
"""

import triton
import triton.language as tl

from .barrier import barrier, call_begin, call_end
from .common import copy_shards, lines_push_chunks, lines_reduce_store
from .lines import lines_begin, lines_finish
from .ptx import as_i64, as_ptr, load_reduce, peer_addr
from .push import push_reduce_call


@triton.jit
def _reduce_scatter_kernel(in_addr, out_addr, buf_table, sig_table, mc_addr, err_addr, seq_cap,
                           region_off, n, timeout_ns, DTYPE: tl.constexpr, RANK: tl.constexpr,
                           WORLD_SIZE: tl.constexpr, WORLD_P2: tl.constexpr,
                           BLOCK_SIZE: tl.constexpr, STAGE_IN: tl.constexpr,
                           USE_MULTIMEM: tl.constexpr, SCOPE: tl.constexpr, USE_PTX: tl.constexpr,
                           ALIGNED: tl.constexpr, PDL: tl.constexpr):
    pid, nprog, seq = call_begin(sig_table, RANK, WORLD_SIZE, PDL)
    ESIZE: tl.constexpr = DTYPE.primitive_bitwidth // 8
    nchunks = tl.cdiv(n, BLOCK_SIZE)
    if STAGE_IN:
        local = peer_addr(buf_table, RANK) + region_off
        copy_shards(in_addr, local, n, BLOCK_SIZE, nchunks, pid, nprog, 0, DTYPE, BLOCK_SIZE,
                    WORLD_SIZE, ALIGNED)
    bad = barrier(sig_table, pid, seq, 0, err_addr, timeout_ns, seq_cap, 0, RANK, WORLD_SIZE,
                  WORLD_P2, SCOPE, USE_PTX, True, True)
    dst = as_ptr(out_addr, DTYPE, ALIGNED)
    slice_off = region_off + RANK * as_i64(n) * ESIZE
    c = tl.where(bad != 0, nchunks, pid)
    while c < nchunks:  # chunks c = pid (mod nprog); see ptx.py on loops
        start = c * BLOCK_SIZE
        offs = start + tl.arange(0, BLOCK_SIZE)
        acc = load_reduce(mc_addr, buf_table, slice_off, start, n, BLOCK_SIZE, DTYPE, WORLD_SIZE,
                          USE_MULTIMEM, ALIGNED)
        tl.store(dst + offs, acc.to(DTYPE), mask=offs < n)
        c += nprog
    barrier(sig_table, pid, seq, bad, err_addr, timeout_ns, seq_cap, 1, RANK, WORLD_SIZE,
            WORLD_P2, SCOPE, USE_PTX, False, False)
    call_end(sig_table, pid, seq, seq_cap, RANK, WORLD_SIZE)


@triton.jit
def _reduce_scatter_lines_kernel(in_addr, out_addr, buf_table, sig_table, err_addr, seq_cap,
                                 lines_off, slot_words, n, timeout_ns, DTYPE: tl.constexpr,
                                 RANK: tl.constexpr, WORLD_SIZE: tl.constexpr,
                                 WORLD_P2: tl.constexpr, BLOCK: tl.constexpr, SCOPE: tl.constexpr,
                                 USE_PTX: tl.constexpr, ALIGNED: tl.constexpr, PDL: tl.constexpr):
    pid, nprog, seq, pad, area = lines_begin(sig_table, buf_table, lines_off, RANK, WORLD_SIZE,
                                             PDL)
    src = as_ptr(in_addr, DTYPE, ALIGNED)
    for i in tl.static_range(1, WORLD_SIZE):  # push slice q to rank q
        q = (RANK + i) % WORLD_SIZE
        lines_push_chunks(src + q * as_i64(n), buf_table, q, lines_off, n, pid, nprog, seq,
                          slot_words, DTYPE, BLOCK, RANK, WORLD_SIZE)
    status = lines_reduce_store(src + RANK * as_i64(n), as_ptr(out_addr, DTYPE, ALIGNED), area, n,
                                pid, nprog, seq, slot_words, timeout_ns, pad, DTYPE, BLOCK, RANK,
                                WORLD_SIZE, USE_PTX)
    lines_finish(sig_table, buf_table, lines_off, pid, seq, slot_words, status, err_addr, seq_cap,
                 RANK, WORLD_SIZE, WORLD_P2, SCOPE)


@triton.jit
def _reduce_scatter_push_kernel(in_addr, out_addr, buf_table, sig_table, err_addr, seq_cap,
                                slot_off, flag_off, n, timeout_ns, DTYPE: tl.constexpr,
                                RANK: tl.constexpr, WORLD_SIZE: tl.constexpr,
                                WORLD_P2: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                                SCOPE: tl.constexpr, USE_PTX: tl.constexpr, ALIGNED: tl.constexpr,
                                PDL: tl.constexpr):
    push_reduce_call(in_addr, out_addr, buf_table, sig_table, err_addr, seq_cap, slot_off,
                     flag_off, n, timeout_ns, DTYPE, RANK, WORLD_SIZE, WORLD_P2, BLOCK_SIZE, False,
                     SCOPE, USE_PTX, ALIGNED, PDL)
