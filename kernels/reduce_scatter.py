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

``_reduce_scatter_ll_kernel`` (small messages, no barrier; lines of kernels/ll.py): block ``b``
pushes chunk ``c`` (``c % blocks == b``; ``BLOCK`` elements) of slice ``q`` of the local input
as lines into slot ``RANK`` of rank ``q``, for every peer ``q``, then sums chunk ``c`` over the
ranks in rank order (its own slice from the input, the peers' from its slots; fp32, the same
order on every rank) into the output. Nothing of the buffer outside the line area is touched.

``_reduce_scatter_push_kernel`` (large messages without multicast; NVLink carries writes better
than reads): every rank pushes, the receiver reduces locally. Each rank's region holds a
receive area (``WORLD_SIZE - 1`` slots of ``n`` elements: slot ``(r - q) % W - 1`` of rank ``q``
takes rank ``r``'s slice ``q``) and a flag area (an int32 per slot and chunk). Block ``b``,
chunks ``c`` with ``c % blocks == b``:

1. clear its chunks' flags in this rank's flag area;
2. start barrier (release: the clears land before any peer's flag; acquire: the pushes after it
   must not overtake the peers' clears and their reads of the previous call): every peer's
   block ``b`` began this launch, so nothing still reads the receive areas;
3. per chunk: push chunk ``c`` of slice ``q`` of the local input (staged or zero-copy: never
   read remotely) into slot of rank ``q``, for every peer ``q``; ``bar.sync``; store flag 1 for
   ``c`` at every peer (release, at the barrier's scope); then wait for the flags of the chunk
   before (acquire) and sum it over the ranks in rank order (its own slice from the input, the
   peers' from the slots; fp32) into the output. A chunk's push runs before the previous
   chunk's wait, so every block has a push in flight while it waits.

There is no end barrier: a peer writes this rank's region only after this rank's start barrier
of that call, and this launch ends only after every flag it waits for (and so every write into
its region) has landed. A flag is cleared only by its owner, before the barrier of the call
that sets it. A wait that times out records the error as the barrier does (``give_up``).
"""

import triton
import triton.language as tl

from .barrier import ERR_WORD, POISON, barrier, call_end, call_seq, give_up, own_pad
from .common import copy_shards, ll_push_chunks, ll_reduce_store
from .ptx import as_i64, as_ptr, load_reduce, pdl_wait, peer_addr, signal_put, wait_slots


@triton.jit
def _reduce_scatter_kernel(in_addr, out_addr, buf_table, sig_table, mc_addr, err_addr, seq_cap,
                           region_off, n, timeout_ns, DTYPE: tl.constexpr, RANK: tl.constexpr,
                           WORLD_SIZE: tl.constexpr, WORLD_P2: tl.constexpr,
                           BLOCK_SIZE: tl.constexpr, STAGE_IN: tl.constexpr,
                           USE_MULTIMEM: tl.constexpr, SCOPE: tl.constexpr, USE_PTX: tl.constexpr,
                           ALIGNED: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)  # before any memory access
    ESIZE: tl.constexpr = DTYPE.primitive_bitwidth // 8
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    nchunks = tl.cdiv(n, BLOCK_SIZE)
    seq = call_seq(sig_table, pid, RANK, WORLD_SIZE)
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
def _reduce_scatter_ll_kernel(in_addr, out_addr, buf_table, sig_table, err_addr, seq_cap, ll_off,
                              slot_words, n, timeout_ns, DTYPE: tl.constexpr, RANK: tl.constexpr,
                              WORLD_SIZE: tl.constexpr, WORLD_P2: tl.constexpr,
                              BLOCK: tl.constexpr, SCOPE: tl.constexpr, USE_PTX: tl.constexpr,
                              ALIGNED: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)  # before any memory access
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    seq = call_seq(sig_table, pid, RANK, WORLD_SIZE)
    src = as_ptr(in_addr, DTYPE, ALIGNED)
    for i in tl.static_range(1, WORLD_SIZE):  # push slice q to rank q
        q = (RANK + i) % WORLD_SIZE
        ll_push_chunks(src + q * as_i64(n), buf_table, q, ll_off, n, pid, nprog, seq, slot_words,
                       DTYPE, BLOCK, RANK, WORLD_SIZE)
    status = ll_reduce_store(src + RANK * as_i64(n), as_ptr(out_addr, DTYPE, ALIGNED),
                             peer_addr(buf_table, RANK) + ll_off, n, pid, nprog, seq, slot_words,
                             timeout_ns, own_pad(sig_table, RANK), DTYPE, BLOCK, RANK, WORLD_SIZE,
                             USE_PTX)
    give_up(sig_table, seq, status, err_addr, seq_cap, RANK, WORLD_SIZE, WORLD_P2, SCOPE)
    call_end(sig_table, pid, seq, seq_cap, RANK, WORLD_SIZE)


@triton.jit
def _push_phase(src, buf_table, recv_off, flag_off, c, n, nchunks, DTYPE: tl.constexpr,
                RANK: tl.constexpr, WORLD_SIZE: tl.constexpr, WORLD_P2: tl.constexpr,
                BLOCK_SIZE: tl.constexpr, SCOPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Push chunk ``c`` of every peer's slice into its receive slot, then flag it (release)."""
    ESIZE: tl.constexpr = DTYPE.primitive_bitwidth // 8
    offs = c * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    for i in tl.static_range(1, WORLD_SIZE):  # peer RANK + i; this rank is its slot W - i - 1
        q = (RANK + i) % WORLD_SIZE
        slot = peer_addr(buf_table, q) + recv_off + (WORLD_SIZE - i - 1) * as_i64(n) * ESIZE
        tl.store(as_ptr(slot, DTYPE, ALIGNED) + offs,
                 tl.load(src + q * as_i64(n) + offs, mask=mask), mask=mask)
    tl.debug_barrier()  # the block's stores above are part of the release below
    lanes = tl.arange(0, WORLD_P2)
    peers = (RANK + lanes) % WORLD_SIZE
    flags = (tl.load(buf_table.to(tl.pointer_type(tl.int64)) + peers) + flag_off
             + ((WORLD_SIZE - lanes - 1) * as_i64(nchunks) + c) * 4)
    signal_put(flags.to(tl.pointer_type(tl.int32)), (lanes >= 1) & (lanes < WORLD_SIZE), 1, SCOPE,
               True)


@triton.jit
def _reduce_phase(src, dst, local, recv_off, flag_off, c, n, nchunks, timeout_ns, pad,
                  DTYPE: tl.constexpr, RANK: tl.constexpr, WORLD_SIZE: tl.constexpr,
                  WORLD_P2: tl.constexpr, BLOCK_SIZE: tl.constexpr, SCOPE: tl.constexpr,
                  USE_PTX: tl.constexpr, ALIGNED: tl.constexpr):
    """Wait for chunk ``c``'s flags from every peer (acquire), then store its sum over the ranks
    (rank order, fp32) to the output. Returns the wait's status (0: every flag came)."""
    ESIZE: tl.constexpr = DTYPE.primitive_bitwidth // 8
    lanes = tl.arange(0, WORLD_P2)
    slots = (lanes + WORLD_SIZE - RANK) % WORLD_SIZE - 1  # source rank lanes' slot
    flags = local + flag_off + (slots * as_i64(nchunks) + c) * 4
    valid = (lanes < WORLD_SIZE) & (lanes != RANK)
    status = wait_slots(flags.to(tl.pointer_type(tl.int32)), valid, 1, POISON, pad + ERR_WORD * 4,
                        timeout_ns, pad, WORLD_P2, SCOPE, True, 0, USE_PTX)
    if status == 0:
        offs = c * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < n
        acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
        for r in tl.static_range(WORLD_SIZE):
            if r == RANK:
                part = src + RANK * as_i64(n)
            else:
                slot = (r + WORLD_SIZE - RANK) % WORLD_SIZE - 1
                part = as_ptr(local + recv_off + slot * as_i64(n) * ESIZE, DTYPE, ALIGNED)
            acc += tl.load(part + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst + offs, acc.to(DTYPE), mask=mask)
    return status


@triton.jit
def _reduce_scatter_push_kernel(in_addr, out_addr, buf_table, sig_table, err_addr, seq_cap,
                                recv_off, flag_off, n, timeout_ns, DTYPE: tl.constexpr,
                                RANK: tl.constexpr, WORLD_SIZE: tl.constexpr,
                                WORLD_P2: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                                SCOPE: tl.constexpr, USE_PTX: tl.constexpr, ALIGNED: tl.constexpr,
                                PDL: tl.constexpr):
    pdl_wait(PDL)  # before any memory access
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    nchunks = tl.cdiv(n, BLOCK_SIZE)
    seq = call_seq(sig_table, pid, RANK, WORLD_SIZE)
    local = peer_addr(buf_table, RANK)
    k = pid  # clear this block's flags: chunks c = pid (mod nprog) of every slot
    while k < nchunks:  # see ptx.py on loops
        chunks = k + tl.arange(0, 128) * nprog
        for s in tl.static_range(WORLD_SIZE - 1):
            flags = (local + flag_off + (s * as_i64(nchunks) + chunks) * 4)
            tl.store(flags.to(tl.pointer_type(tl.int32)), 0, mask=chunks < nchunks)
        k += 128 * nprog
    bad = barrier(sig_table, pid, seq, 0, err_addr, timeout_ns, seq_cap, 0, RANK, WORLD_SIZE,
                  WORLD_P2, SCOPE, USE_PTX, True, True)  # a failed barrier recorded its error
    src = as_ptr(in_addr, DTYPE, ALIGNED)
    dst = as_ptr(out_addr, DTYPE, ALIGNED)
    pad = own_pad(sig_table, RANK)
    status = tl.full([], 0, tl.int32)
    c = tl.where(bad != 0, nchunks, pid)
    if c < nchunks:
        _push_phase(src, buf_table, recv_off, flag_off, c, n, nchunks, DTYPE, RANK, WORLD_SIZE,
                    WORLD_P2, BLOCK_SIZE, SCOPE, ALIGNED)
    while c < nchunks:  # chunks c = pid (mod nprog); see ptx.py on loops
        nxt = c + nprog
        if nxt < nchunks:
            _push_phase(src, buf_table, recv_off, flag_off, nxt, n, nchunks, DTYPE, RANK,
                        WORLD_SIZE, WORLD_P2, BLOCK_SIZE, SCOPE, ALIGNED)
        status = _reduce_phase(src, dst, local, recv_off, flag_off, c, n, nchunks, timeout_ns, pad,
                               DTYPE, RANK, WORLD_SIZE, WORLD_P2, BLOCK_SIZE, SCOPE, USE_PTX,
                               ALIGNED)
        c = tl.where(status != 0, nchunks, nxt)
    give_up(sig_table, seq, status, err_addr, seq_cap, RANK, WORLD_SIZE, WORLD_P2, SCOPE)
    call_end(sig_table, pid, seq, seq_cap, RANK, WORLD_SIZE)
