"""Flagged chunks: large messages pushed into the receiver's buffer, each chunk followed by a
flag, so the receiver works on a chunk as soon as it has landed (NVLink carries writes better
than reads, and a staged input needs no staging copy: peers never read it).

Areas (byte offsets in every rank's buffer, the same on every rank, past the operands): a slot
area of ``WORLD_SIZE - 1`` slots, and a flag area of ``WORLD_SIZE - 1`` rows of ``nflags`` int32
flags. Rank ``r``'s data for rank ``q`` goes to slot ``(r - q) % W - 1`` of ``q``'s areas
(:func:`slot_of`); its flags to the same row.

Protocol of one call (block ``b`` handles the chunks ``j`` with ``j % blocks == b`` on every
rank, so flag ``j`` has one writer block per source and one reader block):

1. :func:`clear_flags`: the block stores 0 over its flags in this rank's flag area;
2. the start barrier (kernels/barrier.py, release / acquire): the clears land before any peer's
   flag store, and every peer's block ``b`` began this launch, so nothing still reads the areas
   (the receiver's previous launch is complete);
3. per chunk: the data stores into the peer's slot, then :func:`flag_peers` (``bar.sync``, so
   the whole block's stores are part of the release; a release exchange of 1 at the barrier's
   scope into the peer's flag ``j``);
4. :func:`wait_flags` (acquire; ``bar.sync`` after): the chunk's data from every peer is visible
   to the whole block.

No end barrier: a peer writes this rank's areas only after this rank's start barrier of that
call, and a launch ends only after every flag it waits for (and so every write into its areas)
has landed. A flag is cleared only by its owner, before the barrier of the call that sets it;
whatever other ops left in the bytes of the areas is cleared or overwritten before it is read.

A wait that passes its deadline (``timeout_ns`` > 0, ``ptx.deadline_tick``) returns the late
peers' bits; the kernel then records them as the barrier does (``barrier.call_finish``) and skips
the rest of the call. The ranks are in step once the start barrier passed (it checks the call
counters), so a flag never belongs to another call.
"""

import triton
import triton.language as tl

from . import protocol as P
from .barrier import barrier, call_begin, call_finish, own_pad
from .ptx import as_i64, as_ptr, peer_addr, signal_put, wait_slots

ERR_WORD = tl.constexpr(P.ERR_WORD)
POISON = tl.constexpr(P.POISON)
#: flags one pass of :func:`clear_flags` clears per slot.
CLEAR_CHUNK = tl.constexpr(128)


@triton.jit
def slot_of(src_rank, dst_rank, WORLD_SIZE: tl.constexpr):
    """Slot (and flag row) of ``src_rank``'s data in ``dst_rank``'s areas (-1 when they are the
    same rank)."""
    return (src_rank + WORLD_SIZE - dst_rank) % WORLD_SIZE - 1


@triton.jit
def clear_flags(local, flag_off, nflags, pid, nprog, WORLD_SIZE: tl.constexpr):
    """Store 0 over flags ``j = pid (mod nprog)`` of every row of this rank's flag area (at
    ``local + flag_off``)."""
    k = pid
    while k < nflags:  # see ptx.py on loops
        idx = k + tl.arange(0, CLEAR_CHUNK) * nprog
        for s in tl.static_range(WORLD_SIZE - 1):
            flags = local + flag_off + (s * as_i64(nflags) + idx) * 4
            tl.store(flags.to(tl.pointer_type(tl.int32)), 0, mask=idx < nflags)
        k += CLEAR_CHUNK * nprog


@triton.jit
def flag_peers(buf_table, flag_off, j, nflags, RANK: tl.constexpr, WORLD_SIZE: tl.constexpr,
               WORLD_P2: tl.constexpr, SCOPE: tl.constexpr):
    """After the block's stores of chunk ``j`` into every peer: ``bar.sync``, then flag ``j`` of
    this rank's row at every peer, release at ``SCOPE``."""
    tl.debug_barrier()  # the block's stores before are part of the release below
    lanes = tl.arange(0, WORLD_P2)  # lane i: peer RANK + i
    peers = (RANK + lanes) % WORLD_SIZE
    flags = (tl.load(buf_table.to(tl.pointer_type(tl.int64)) + peers) + flag_off
             + (slot_of(RANK, peers, WORLD_SIZE) * as_i64(nflags) + j) * 4)
    signal_put(flags.to(tl.pointer_type(tl.int32)), (lanes >= 1) & (lanes < WORLD_SIZE), 1, SCOPE,
               True)


@triton.jit
def wait_flags(local, flag_off, j, nflags, pad, timeout_ns, RANK: tl.constexpr,
               WORLD_SIZE: tl.constexpr, WORLD_P2: tl.constexpr, SCOPE: tl.constexpr,
               USE_PTX: tl.constexpr):
    """Wait (acquire) until flag ``j`` of every peer's row in this rank's flag area is set.
    Returns 0, or the late peers' bits (``pad``: this rank's signal pad, for its clock and
    error word)."""
    lanes = tl.arange(0, WORLD_P2)  # lane r: source rank r
    flags = local + flag_off + (slot_of(lanes, RANK, WORLD_SIZE) * as_i64(nflags) + j) * 4
    valid = (lanes < WORLD_SIZE) & (lanes != RANK)
    return wait_slots(flags.to(tl.pointer_type(tl.int32)), valid, 1, POISON, pad + ERR_WORD * 4,
                      timeout_ns, pad, WORLD_P2, SCOPE, True, 0, USE_PTX)


@triton.jit
def push_slices(src, stride, buf_table, slot_off, flag_off, j, slice_len, total, nflags,
                DTYPE: tl.constexpr, RANK: tl.constexpr, WORLD_SIZE: tl.constexpr,
                WORLD_P2: tl.constexpr, BLOCK: tl.constexpr, SCOPE: tl.constexpr,
                ALIGNED: tl.constexpr):
    """The reduce-scatter half: elements ``[j * BLOCK, (j + 1) * BLOCK)`` of slice ``q`` of the
    message at pointer ``src`` (slice ``q`` starts at element ``q * stride``: ``stride`` is
    ``slice_len``, or 0 when every peer gets the whole message; elements past ``slice_len`` or
    ``total`` are masked) into the same place of this rank's slot at every peer ``q`` (slots of
    ``slice_len`` elements), then flag ``j`` (:func:`flag_peers`)."""
    ESIZE: tl.constexpr = DTYPE.primitive_bitwidth // 8
    offs = j * BLOCK + tl.arange(0, BLOCK)
    for i in tl.static_range(1, WORLD_SIZE):
        q = (RANK + i) % WORLD_SIZE
        mask = (offs < slice_len) & (q * as_i64(stride) + offs < total)
        slot = (peer_addr(buf_table, q) + slot_off
                + slot_of(RANK, q, WORLD_SIZE) * as_i64(slice_len) * ESIZE)
        tl.store(as_ptr(slot, DTYPE, ALIGNED) + offs,
                 tl.load(src + q * as_i64(stride) + offs, mask=mask), mask=mask)
    flag_peers(buf_table, flag_off, j, nflags, RANK, WORLD_SIZE, WORLD_P2, SCOPE)


@triton.jit
def reduce_slots(own, local, slot_off, j, slice_len, limit, DTYPE: tl.constexpr,
                 RANK: tl.constexpr, WORLD_SIZE: tl.constexpr, BLOCK: tl.constexpr,
                 ALIGNED: tl.constexpr):
    """Sum over the ranks, in rank order, of elements ``[j * BLOCK, (j + 1) * BLOCK)`` (those
    below ``limit``) of this rank's slice: its own at pointer ``own``, the peers' from its slots
    (at ``local + slot_off``, ``slice_len`` elements each). fp32; masked lanes are 0. Call it
    after :func:`wait_flags` for ``j``."""
    ESIZE: tl.constexpr = DTYPE.primitive_bitwidth // 8
    offs = j * BLOCK + tl.arange(0, BLOCK)
    mask = offs < limit
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for r in tl.static_range(WORLD_SIZE):
        if r == RANK:
            part = own
        else:
            slot = local + slot_off + slot_of(r, RANK, WORLD_SIZE) * as_i64(slice_len) * ESIZE
            part = as_ptr(slot, DTYPE, ALIGNED)
        acc += tl.load(part + offs, mask=mask, other=0.0).to(tl.float32)
    return acc


@triton.jit
def push_reduce_call(in_addr, out_addr, buf_table, sig_table, err_addr, seq_cap, slot_off,
                     flag_off, n, timeout_ns, DTYPE: tl.constexpr, RANK: tl.constexpr,
                     WORLD_SIZE: tl.constexpr, WORLD_P2: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     WHOLE: tl.constexpr, SCOPE: tl.constexpr, USE_PTX: tl.constexpr,
                     ALIGNED: tl.constexpr, PDL: tl.constexpr):
    """One call of a one-round push reduction into the ``n`` elements at ``out_addr``: every
    peer gets slice ``q`` (of ``n`` elements) of the input at ``in_addr`` from this rank, and
    ``out`` = the sum over the ranks of slice ``RANK`` (a reduce-scatter); with ``WHOLE`` every
    peer gets the whole input (``n`` elements) and ``out`` = the sum of the inputs (a one-shot
    all-reduce; ``out`` may be the input: a chunk is stored only after it was pushed).

    Phases: clear this block's flags, the start barrier, then for chunks ``c = pid (mod
    nprog)``: push chunk ``c`` one ahead of the chunk it waits for, wait for every peer's chunk
    ``c`` (acquire), sum in rank order in fp32 and store. Areas: ``WORLD_SIZE - 1`` slots of ``n``
    elements and rows of ``cdiv(n, BLOCK_SIZE)`` flags (see the module docstring). The whole of
    a kernel: it begins with ``barrier.call_begin`` (``PDL``) and ends with
    ``barrier.call_finish``."""
    pid, nprog, seq = call_begin(sig_table, RANK, WORLD_SIZE, PDL)
    nchunks = tl.cdiv(n, BLOCK_SIZE)
    local = peer_addr(buf_table, RANK)
    clear_flags(local, flag_off, nchunks, pid, nprog, WORLD_SIZE)
    bad = barrier(sig_table, pid, seq, 0, err_addr, timeout_ns, seq_cap, 0, RANK, WORLD_SIZE,
                  WORLD_P2, SCOPE, USE_PTX, True, True)  # a failed barrier recorded its error
    src = as_ptr(in_addr, DTYPE, ALIGNED)
    dst = as_ptr(out_addr, DTYPE, ALIGNED)
    if WHOLE:
        stride = tl.zeros([], dtype=tl.int64)
        own = src
    else:
        stride = as_i64(n)
        own = src + RANK * as_i64(n)
    total = (WORLD_SIZE - 1) * stride + n
    pad = own_pad(sig_table, RANK)
    status = tl.full([], 0, tl.int32)
    c = tl.where(bad != 0, nchunks, pid)
    if c < nchunks:
        push_slices(src, stride, buf_table, slot_off, flag_off, c, n, total, nchunks, DTYPE, RANK,
                    WORLD_SIZE, WORLD_P2, BLOCK_SIZE, SCOPE, ALIGNED)
    while c < nchunks:  # see ptx.py on loops
        nxt = c + nprog
        if nxt < nchunks:
            push_slices(src, stride, buf_table, slot_off, flag_off, nxt, n, total, nchunks, DTYPE,
                        RANK, WORLD_SIZE, WORLD_P2, BLOCK_SIZE, SCOPE, ALIGNED)
        status = wait_flags(local, flag_off, c, nchunks, pad, timeout_ns, RANK, WORLD_SIZE,
                            WORLD_P2, SCOPE, USE_PTX)
        if status == 0:
            offs = c * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
            acc = reduce_slots(own, local, slot_off, c, n, n, DTYPE, RANK, WORLD_SIZE, BLOCK_SIZE,
                               ALIGNED)
            tl.store(dst + offs, acc.to(DTYPE), mask=offs < n)
        c = tl.where(status != 0, nchunks, nxt)
    call_finish(sig_table, pid, seq, status, err_addr, seq_cap, RANK, WORLD_SIZE, WORLD_P2, SCOPE)
