"""All-reduce (sum) of ``n`` elements: one-shot or two-shot, in one launch.

The ``n`` elements are cut into chunks of ``BLOCK_SIZE``; the chunks into ``SLICES`` slices of
``cps`` chunks each (one-shot: one slice; two-shot: one per rank, slice ``q`` reduced by rank
``q``). Block ``b`` handles the chunks ``q * cps + j`` with ``j % blocks == b``, on every rank
and in every phase, so a per-block barrier orders everything a chunk goes through. The region
(``region_off`` in every rank's buffer) holds each rank's input. Phases of
``_all_reduce_kernel``:

1. with ``STAGE_IN``: copy this block's chunks of the local input into the region;
2. start barrier: every rank's chunks are in the region;
3. one-shot: load each chunk from every rank (``multimem.ld_reduce`` once, or one load per peer),
   sum in fp32, store the sum locally (to ``out``, or with ``COPY_OUT`` to the result area
   ``res_off`` of this rank's buffer). Two-shot: the same for the chunks of slice ``RANK`` only,
   then store the sum at ``res_off`` on every rank (``multimem.st`` or one store per peer). The
   result area is the region itself (in place, staged) or another area of the buffer at the same
   offset on every rank; a chunk of slice ``q`` is read and written only by rank ``q``'s block
   ``b``, after it read it, so writing over the region is safe;
4. end barrier: the sums of every slice have landed on every rank, and nobody reads this rank's
   region any more (it may be overwritten, e.g. by the next GEMM, once the launch is complete);
5. with ``COPY_OUT``: copy this block's chunks from the result area to ``out``.

``_all_reduce_lines_kernel`` (one-shot for small tensors, no barrier; lines of kernels/lines.py):
block ``b`` pushes chunks ``c % blocks == b`` of the input as lines into slot ``RANK`` of every
peer, then sums each of those chunks over the ranks in rank order (its own from the input, the
peers' from its slots; fp32, the same order on every rank, so every rank gets the same bits) and
stores it to ``out``, which may be the input (a block rewrites only chunks it pushed already).
Nothing of the buffer outside the line area is touched.

``_all_reduce_push_kernel`` (two-shot for large tensors without multicast; the flagged chunks of
kernels/push.py, two rounds): block ``b`` clears its flags of both rounds and passes the start
barrier; then for its chunks ``j`` of the slices (``j % blocks == b``), pipelined one chunk
ahead as in the push reduce-scatter: pushes chunk ``j`` of every peer's slice of the input into
its slot there and flags it (round 1); waits for round 1 of chunk ``j`` of its own slice, sums it
over the ranks in rank order (fp32), stores the sum to ``out`` and into every peer's gather
target, and flags it (round 2). Finally it waits for round 2 of its chunks of every peer's
slice; with ``GATHER`` the sums landed in a gather area (laid out like the tensor) and are copied
to ``out``, else they landed in ``out`` itself (``out`` lies in the buffer: ``gather_off`` is its
offset). In place is safe: a rank's chunk of a peer's slice is overwritten by that peer's sum
only after the peer saw its round-1 flag, which follows the rank's read of the chunk.

``_all_reduce_one_shot_push_kernel`` (one round of flagged chunks, ``push.push_reduce_call``
with ``WHOLE``): every rank pushes its whole input into its slot at every peer, chunk by chunk,
and sums each chunk over the ranks in rank order (fp32) into ``out`` as soon as the peers' flags
for it are set. Each rank sends ``world - 1`` times the tensor (two-shot: twice ``(world - 1) /
world`` of it) but waits for one round of flags instead of two; neither the input nor ``out``
needs to lie in the buffer.
"""

import triton
import triton.language as tl

from .barrier import barrier, call_begin, call_end, call_finish, own_pad
from .common import copy_units, lines_push_chunks, lines_reduce_store
from .lines import lines_begin, lines_finish
from .ptx import as_i64, as_ptr, load_reduce, peer_addr, store_all
from .push import (clear_flags, flag_peers, push_reduce_call, push_slices, reduce_slots,
                   wait_flags)


@triton.jit
def _all_reduce_kernel(in_addr, out_addr, buf_table, sig_table, mc_addr, err_addr, seq_cap,
                       region_off, res_off, n, cps, timeout_ns, DTYPE: tl.constexpr,
                       RANK: tl.constexpr, WORLD_SIZE: tl.constexpr, WORLD_P2: tl.constexpr,
                       BLOCK_SIZE: tl.constexpr, TWO_SHOT: tl.constexpr, STAGE_IN: tl.constexpr,
                       COPY_OUT: tl.constexpr, USE_MULTIMEM: tl.constexpr, SCOPE: tl.constexpr,
                       USE_PTX: tl.constexpr, ALIGNED: tl.constexpr, PDL: tl.constexpr):
    pid, nprog, seq = call_begin(sig_table, RANK, WORLD_SIZE, PDL)
    SLICES: tl.constexpr = WORLD_SIZE if TWO_SHOT else 1
    local = peer_addr(buf_table, RANK)
    if STAGE_IN:
        copy_units(in_addr, local + region_off, n, cps, BLOCK_SIZE, pid, nprog, DTYPE, BLOCK_SIZE,
                   SLICES, ALIGNED)
    bad = barrier(sig_table, pid, seq, 0, err_addr, timeout_ns, seq_cap, 0, RANK, WORLD_SIZE,
                  WORLD_P2, SCOPE, USE_PTX, True, True)
    if COPY_OUT:
        dst = as_ptr(local + res_off, DTYPE, ALIGNED)
    else:
        dst = as_ptr(out_addr, DTYPE, ALIGNED)
    first = tl.zeros([], dtype=tl.int64)  # the first chunk of this rank's slice
    if TWO_SHOT:
        first += RANK * as_i64(cps)
    j = tl.where(bad != 0, cps, pid)
    while j < cps:  # see ptx.py on loops
        start = (first + j) * BLOCK_SIZE
        acc = load_reduce(mc_addr, buf_table, region_off, start, n, BLOCK_SIZE, DTYPE, WORLD_SIZE,
                          USE_MULTIMEM, ALIGNED)
        if TWO_SHOT:
            store_all(mc_addr, buf_table, res_off, start, n, acc.to(DTYPE), BLOCK_SIZE, DTYPE,
                      RANK, WORLD_SIZE, USE_MULTIMEM, ALIGNED)
        else:
            offs = start + tl.arange(0, BLOCK_SIZE)
            tl.store(dst + offs, acc.to(DTYPE), mask=offs < n)
        j += nprog
    barrier(sig_table, pid, seq, bad, err_addr, timeout_ns, seq_cap, 1, RANK, WORLD_SIZE,
            WORLD_P2, SCOPE, USE_PTX, True, True)
    if COPY_OUT:
        copy_units(local + res_off, out_addr, n, cps, BLOCK_SIZE, pid, nprog, DTYPE, BLOCK_SIZE,
                   SLICES, ALIGNED)
    call_end(sig_table, pid, seq, seq_cap, RANK, WORLD_SIZE)


@triton.jit
def _all_reduce_lines_kernel(in_addr, out_addr, buf_table, sig_table, err_addr, seq_cap, lines_off,
                             slot_words, n, timeout_ns, DTYPE: tl.constexpr, RANK: tl.constexpr,
                             WORLD_SIZE: tl.constexpr, WORLD_P2: tl.constexpr, BLOCK: tl.constexpr,
                             SCOPE: tl.constexpr, USE_PTX: tl.constexpr, ALIGNED: tl.constexpr,
                             PDL: tl.constexpr):
    pid, nprog, seq, pad, area = lines_begin(sig_table, buf_table, lines_off, RANK, WORLD_SIZE,
                                             PDL)
    src = as_ptr(in_addr, DTYPE, ALIGNED)
    lines_push_chunks(src, buf_table, -1, lines_off, n, pid, nprog, seq, slot_words, DTYPE, BLOCK,
                      RANK, WORLD_SIZE)
    status = lines_reduce_store(src, as_ptr(out_addr, DTYPE, ALIGNED), area, n, pid, nprog, seq,
                                slot_words, timeout_ns, pad, DTYPE, BLOCK, RANK, WORLD_SIZE,
                                USE_PTX)
    lines_finish(sig_table, buf_table, lines_off, pid, seq, slot_words, status, err_addr, seq_cap,
                 RANK, WORLD_SIZE, WORLD_P2, SCOPE)


@triton.jit
def _sum_and_share(src, dst, buf_table, local, slot_off, flag_off, gather_off, j, L, n,
                   DTYPE: tl.constexpr, RANK: tl.constexpr, WORLD_SIZE: tl.constexpr,
                   WORLD_P2: tl.constexpr, BLOCK_SIZE: tl.constexpr, SCOPE: tl.constexpr,
                   ALIGNED: tl.constexpr):
    """Round 2 of chunk ``j`` of this rank's slice (its round-1 flags seen): the sum over the
    ranks, stored to ``dst`` and to every peer's gather target (``gather_off``), then flagged."""
    first = RANK * as_i64(L)
    vals = reduce_slots(src + first, local, slot_off, j, L, n - first, DTYPE, RANK, WORLD_SIZE,
                        BLOCK_SIZE, ALIGNED).to(DTYPE)
    offs = first + j * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    tl.store(dst + offs, vals, mask=mask)
    for i in tl.static_range(1, WORLD_SIZE):
        target = peer_addr(buf_table, (RANK + i) % WORLD_SIZE) + gather_off
        tl.store(as_ptr(target, DTYPE, ALIGNED) + offs, vals, mask=mask)
    flag_peers(buf_table, flag_off, j, L // BLOCK_SIZE, RANK, WORLD_SIZE, WORLD_P2, SCOPE)


@triton.jit
def _all_reduce_push_kernel(in_addr, out_addr, buf_table, sig_table, err_addr, seq_cap, slot_off,
                            flag_off, gather_off, n, cps, timeout_ns, DTYPE: tl.constexpr,
                            RANK: tl.constexpr, WORLD_SIZE: tl.constexpr,
                            WORLD_P2: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                            GATHER: tl.constexpr, SCOPE: tl.constexpr, USE_PTX: tl.constexpr,
                            ALIGNED: tl.constexpr, PDL: tl.constexpr):
    pid, nprog, seq = call_begin(sig_table, RANK, WORLD_SIZE, PDL)
    local = peer_addr(buf_table, RANK)
    L = cps * BLOCK_SIZE  # elements per slice
    flag2_off = flag_off + (WORLD_SIZE - 1) * as_i64(cps) * 4  # round 2's flags
    clear_flags(local, flag_off, cps, pid, nprog, WORLD_SIZE)
    clear_flags(local, flag2_off, cps, pid, nprog, WORLD_SIZE)
    bad = barrier(sig_table, pid, seq, 0, err_addr, timeout_ns, seq_cap, 0, RANK, WORLD_SIZE,
                  WORLD_P2, SCOPE, USE_PTX, True, True)  # a failed barrier recorded its error
    src = as_ptr(in_addr, DTYPE, ALIGNED)
    dst = as_ptr(out_addr, DTYPE, ALIGNED)
    pad = own_pad(sig_table, RANK)
    status = tl.full([], 0, tl.int32)
    j = tl.where(bad != 0, cps, pid)
    if j < cps:
        push_slices(src, L, buf_table, slot_off, flag_off, j, L, n, cps, DTYPE, RANK, WORLD_SIZE,
                    WORLD_P2, BLOCK_SIZE, SCOPE, ALIGNED)
    while j < cps:  # round 1 pushed one chunk ahead of round 2; see ptx.py on loops
        nxt = j + nprog
        if nxt < cps:
            push_slices(src, L, buf_table, slot_off, flag_off, nxt, L, n, cps, DTYPE, RANK,
                        WORLD_SIZE, WORLD_P2, BLOCK_SIZE, SCOPE, ALIGNED)
        status = wait_flags(local, flag_off, j, cps, pad, timeout_ns, RANK, WORLD_SIZE, WORLD_P2,
                            SCOPE, USE_PTX)
        if status == 0:
            _sum_and_share(src, dst, buf_table, local, slot_off, flag2_off, gather_off, j, L, n,
                           DTYPE, RANK, WORLD_SIZE, WORLD_P2, BLOCK_SIZE, SCOPE, ALIGNED)
        j = tl.where(status != 0, cps, nxt)
    j = tl.where((bad != 0) | (status != 0), cps, pid)
    while j < cps:  # round 2 received: every peer's sums of chunk j
        status = wait_flags(local, flag2_off, j, cps, pad, timeout_ns, RANK, WORLD_SIZE, WORLD_P2,
                            SCOPE, USE_PTX)
        if GATHER:
            if status == 0:
                gathered = as_ptr(local + gather_off, DTYPE, ALIGNED)
                for i in tl.static_range(1, WORLD_SIZE):
                    offs = ((RANK + i) % WORLD_SIZE) * as_i64(L) + j * BLOCK_SIZE
                    offs += tl.arange(0, BLOCK_SIZE)
                    tl.store(dst + offs, tl.load(gathered + offs, mask=offs < n), mask=offs < n)
        j = tl.where(status != 0, cps, j + nprog)
    call_finish(sig_table, pid, seq, status, err_addr, seq_cap, RANK, WORLD_SIZE, WORLD_P2, SCOPE)


@triton.jit
def _all_reduce_one_shot_push_kernel(in_addr, out_addr, buf_table, sig_table, err_addr, seq_cap,
                                     slot_off, flag_off, n, timeout_ns, DTYPE: tl.constexpr,
                                     RANK: tl.constexpr, WORLD_SIZE: tl.constexpr,
                                     WORLD_P2: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                                     SCOPE: tl.constexpr, USE_PTX: tl.constexpr,
                                     ALIGNED: tl.constexpr, PDL: tl.constexpr):
    push_reduce_call(in_addr, out_addr, buf_table, sig_table, err_addr, seq_cap, slot_off,
                     flag_off, n, timeout_ns, DTYPE, RANK, WORLD_SIZE, WORLD_P2, BLOCK_SIZE, True,
                     SCOPE, USE_PTX, ALIGNED, PDL)
