"""Variable-count reduce-scatter (sum) along dim 0 (expert parallelism: combine).

Every rank holds ``sum(counts)`` rows in rank order; rank ``r`` receives rows
``[sum(counts[:r]), + counts[r])`` summed over the ranks, in fp32. ``counts`` is read when the
kernel runs, so a captured CUDA graph replays with new counts; the grid is derived from the
capacities only.

Phases of ``_reduce_scatter_v_kernel`` (block ``b`` handles chunks ``c`` with
``c % blocks == b``, counted from the first row of a rank's slice):

0. clamp the counts (``common.clamped_counts``: nothing moves out of bounds; block 0 records an
   overflow in the counts error word);
1. with ``STAGE_IN``: copy chunk ``c`` of every rank's slice of the local input into the region
   (only chunks that block ``b`` of the peers reads);
2. start barrier (release / acquire, as ``_reduce_scatter_kernel``'s): chunk ``c`` of every
   slice is in place on every rank;
3. reduce: load chunk ``c`` of slice ``RANK`` from every rank, accumulate in fp32, store to the
   output;
4. end barrier (relaxed): no peer reads this rank's chunk ``c`` any more, so the region may be
   overwritten once the launch is complete.

A block whose barrier fails (timeout, ranks out of step: kernels/barrier.py) skips the reduce.
Rows of the output past ``counts[RANK]`` are never written.
"""

import triton
import triton.language as tl

from .barrier import barrier, call_begin, call_end
from .common import clamped_counts, copy_slices, lane, row_elems
from .ptx import as_ptr, load_reduce, peer_addr


@triton.jit
def _reduce_scatter_v_kernel(in_addr, out_addr, counts_addr, buf_table, sig_table, err_addr,
                             count_err_addr, seq_cap, region_off, row, cap_in, cap_out, timeout_ns,
                             DTYPE: tl.constexpr, COUNTS_DTYPE: tl.constexpr, RANK: tl.constexpr,
                             WORLD_SIZE: tl.constexpr, WORLD_P2: tl.constexpr,
                             BLOCK_SIZE: tl.constexpr, STAGE_IN: tl.constexpr,
                             SCOPE: tl.constexpr, USE_PTX: tl.constexpr, ALIGNED: tl.constexpr,
                             PDL: tl.constexpr):
    pid, nprog, seq = call_begin(sig_table, RANK, WORLD_SIZE, PDL)
    ESIZE: tl.constexpr = DTYPE.primitive_bitwidth // 8
    start, n = clamped_counts(counts_addr, count_err_addr, pid, cap_out, cap_in, COUNTS_DTYPE,
                              WORLD_SIZE, WORLD_P2)
    if STAGE_IN:
        local = peer_addr(buf_table, RANK) + region_off
        copy_slices(in_addr, local, start, n, row, pid, nprog, DTYPE, BLOCK_SIZE, WORLD_SIZE,
                    ALIGNED)
    bad = barrier(sig_table, pid, seq, 0, err_addr, timeout_ns, seq_cap, 0, RANK, WORLD_SIZE,
                  WORLD_P2, SCOPE, USE_PTX, True, True)
    dst = as_ptr(out_addr, DTYPE, ALIGNED)
    count = row_elems(lane(tl.where(bad != 0, 0, n), RANK), row, DTYPE, ALIGNED)
    slice_off = region_off + lane(start, RANK) * row * ESIZE
    c = pid
    while c * BLOCK_SIZE < count:  # chunks c = pid (mod nprog); see ptx.py on loops
        first = c * BLOCK_SIZE
        offs = first + tl.arange(0, BLOCK_SIZE)
        acc = load_reduce(0, buf_table, slice_off, first, count, BLOCK_SIZE, DTYPE, WORLD_SIZE,
                          False, ALIGNED)
        tl.store(dst + offs, acc.to(DTYPE), mask=offs < count)
        c += nprog
    barrier(sig_table, pid, seq, bad, err_addr, timeout_ns, seq_cap, 1, RANK, WORLD_SIZE,
            WORLD_P2, SCOPE, USE_PTX, False, False)
    call_end(sig_table, pid, seq, seq_cap, RANK, WORLD_SIZE)
