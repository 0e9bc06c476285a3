"""Variable-count all-gather along dim 0 of up to a few tensors at once (expert parallelism).

Rank ``r`` contributes its first ``counts[r]`` rows; every rank receives all of them packed in
rank order (rank ``r``'s at row ``sum(counts[:r])``). ``counts`` is read when the kernel runs,
so a captured CUDA graph replays with new counts; the grid is derived from the capacities only.

Tensor table (``desc_addr``: int64 ``[NT, DESC_COLS]``, one row per tensor, in units of
``DTYPE``, the bit-copy unit common to all tensors): ``input address, output address, region
byte offset in the symmetric buffer, row length in units, copy-out flag``. The region is the
output itself (zero-copy: peers write into it) or a staging area (flag 1: copied out at the end).

Phases of ``_all_gather_v_kernel`` (block ``b`` handles chunks ``c`` with ``c % blocks == b``,
counted from the first row of a rank's slice):

0. clamp the counts (``common.clamped_counts``: nothing moves out of bounds; block 0 records an
   overflow in the counts error word);
1. start barrier (relaxed arrive, acquire poll, as ``_all_gather_kernel``'s): every peer's
   block ``b`` has begun this launch, so nothing still reads the region chunks it is about to
   get;
2. push, for every tensor: load chunk ``c`` of this rank's rows, store it at this rank's slice of
   the region on every rank (one store per peer);
3. end barrier (release / acquire): chunk ``c`` of every rank's slice has landed in this
   rank's regions;
4. for every staged tensor: copy chunk ``c`` of every slice from the region to the output.

A block whose barrier fails (timeout, ranks out of step: kernels/barrier.py) moves nothing
after it. After the launch the regions may be reused by the next operation on the stream, as for
``_all_gather_kernel``. Rows of the output past ``sum(counts)`` are never written.
"""

import triton
import triton.language as tl

from .barrier import barrier, call_begin, call_end
from .common import clamped_counts, copy_slices, lane, row_elems
from .ptx import as_ptr, peer_addr, store_all

#: int64 columns of a tensor's row in the table.
DESC_COLS = tl.constexpr(5)


@triton.jit
def _all_gather_v_kernel(desc_addr, counts_addr, buf_table, sig_table, err_addr, count_err_addr,
                         seq_cap, cap_in, cap_out, timeout_ns, NT: tl.constexpr,
                         DTYPE: tl.constexpr, COUNTS_DTYPE: tl.constexpr, RANK: tl.constexpr,
                         WORLD_SIZE: tl.constexpr, WORLD_P2: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, SCOPE: tl.constexpr, USE_PTX: tl.constexpr,
                         ALIGNED: tl.constexpr, PDL: tl.constexpr):
    pid, nprog, seq = call_begin(sig_table, RANK, WORLD_SIZE, PDL)
    ESIZE: tl.constexpr = DTYPE.primitive_bitwidth // 8
    start, n = clamped_counts(counts_addr, count_err_addr, pid, cap_in, cap_out, COUNTS_DTYPE,
                              WORLD_SIZE, WORLD_P2)
    desc = desc_addr.to(tl.pointer_type(tl.int64))
    bad = barrier(sig_table, pid, seq, 0, err_addr, timeout_ns, seq_cap, 0, RANK, WORLD_SIZE,
                  WORLD_P2, SCOPE, USE_PTX, False, True)
    n = tl.where(bad != 0, 0, n)  # a block that abandoned the call moves nothing
    for t in tl.static_range(NT):
        src = as_ptr(tl.load(desc + t * DESC_COLS), DTYPE, ALIGNED)
        region_off = tl.load(desc + t * DESC_COLS + 2)
        row = tl.load(desc + t * DESC_COLS + 3)
        count = row_elems(lane(n, RANK), row, DTYPE, ALIGNED)
        slice_off = region_off + lane(start, RANK) * row * ESIZE
        c = pid
        while c * BLOCK_SIZE < count:  # chunks c = pid (mod nprog); see ptx.py on loops
            first = c * BLOCK_SIZE
            offs = first + tl.arange(0, BLOCK_SIZE)
            vals = tl.load(src + offs, mask=offs < count)
            store_all(0, buf_table, slice_off, first, count, vals, BLOCK_SIZE, DTYPE, RANK,
                      WORLD_SIZE, False, ALIGNED)
            c += nprog
    bad = barrier(sig_table, pid, seq, bad, err_addr, timeout_ns, seq_cap, 1, RANK, WORLD_SIZE,
                  WORLD_P2, SCOPE, USE_PTX, True, True)
    n = tl.where(bad != 0, 0, n)
    for t in tl.static_range(NT):
        if tl.load(desc + t * DESC_COLS + 4) != 0:
            local = peer_addr(buf_table, RANK) + tl.load(desc + t * DESC_COLS + 2)
            copy_slices(local, tl.load(desc + t * DESC_COLS + 1), start, n,
                        tl.load(desc + t * DESC_COLS + 3), pid, nprog, DTYPE, BLOCK_SIZE,
                        WORLD_SIZE, ALIGNED)
    call_end(sig_table, pid, seq, seq_cap, RANK, WORLD_SIZE)
