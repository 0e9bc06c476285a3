"""The one barrier every symmtriton kernel uses: per block, over signal pads.

Protocol. Slot ``[block * WORLD_SIZE + r]`` of rank ``q``'s signal pad (uint32, counted after
the first ``SLOT0`` words) carries signals from rank ``r``'s block ``block`` to rank ``q``'s block
``block``. The first ``SLOT0`` words hold the host backend's clock (see ``ptx.clock_ns``).

- send: CAS ``0 -> 1`` on slot ``[block * W + RANK]`` of every peer's pad, *release*, system
  scope, retried until it succeeds (a 1 still there is the previous signal, not yet consumed).
- wait: CAS ``1 -> 0`` on slots ``[block * W + r]`` of this rank's pad for every ``r``, *acquire*,
  system scope, retried until all succeed.

A ``bar.sync`` (``tl.debug_barrier``) before the send makes every thread's earlier memory
operations part of what the release publishes; one after the wait makes what the acquire saw
visible to every thread of the block. So: everything block ``b`` of any rank did before the
barrier happens-before everything block ``b`` of every rank does after it. Other blocks are not
ordered; kernels are written so that block ``b`` only touches data that block ``b`` of the peers
touches, and successive launches are ordered by the stream.

Each wait consumes exactly the signal it waits for, so the pads are all zero whenever no kernel
is in flight: the barrier needs no host-side epoch and replays under CUDA graphs. Sends to a
slot and waits on it alternate strictly, so as long as every rank launches the same grid for
the same sequence of operations, the k-th send pairs with the k-th wait.

The grid must satisfy ``SLOT0 + blocks * WORLD_SIZE <= signal pad words``; the launchers clamp
it.

Timeout: with ``deadline_ns > 0`` a spin gives up at that time on the global clock; the block
then stores the bit mask of ranks that did not arrive in ``*err_addr`` (int32, this rank's
memory, host-readable) and goes on; the host turns it into an error. Later barriers that find
the error word set give up at once, so a launch waits about one timeout, not one per barrier.
The abandoned signals are left in the pads: a buffer that timed out must be destroyed and
recreated.
"""

import triton
import triton.language as tl

from .ptx import clock_ns

#: uint32 words at the start of every signal pad that are not barrier slots (the host clock).
SLOT0 = tl.constexpr(2)


@triton.jit
def _spin_cas(addrs, todo, CMP: tl.constexpr, VAL: tl.constexpr, SEM: tl.constexpr, deadline_ns,
              clock_addr, USE_PTX: tl.constexpr):
    """CAS ``CMP -> VAL`` on each lane in ``todo`` until every one succeeded or the deadline
    passed; returns the lanes that succeeded. A lane that succeeded turns into a CAS that cannot
    match (slots hold only 0 or 1), so it is never applied twice."""
    done = ~todo
    expired = 0
    while (tl.min(done.to(tl.int32), axis=0) == 0) & (expired == 0):
        cmp = tl.where(done, -1, CMP)
        val = tl.where(done, -1, VAL)
        old = tl.atomic_cas(addrs, cmp, val, sem=SEM, scope="sys")
        done = done | (old == CMP)
        if deadline_ns > 0:
            expired = (clock_ns(clock_addr, USE_PTX) > deadline_ns).to(tl.int32)
    return done


@triton.jit
def barrier(sig_table, block_id, err_addr, timeout_ns, RANK: tl.constexpr,
            WORLD_SIZE: tl.constexpr, WORLD_P2: tl.constexpr, USE_PTX: tl.constexpr):
    """Barrier of block ``block_id`` with block ``block_id`` of every rank (module docstring)."""
    tl.debug_barrier()
    lanes = tl.arange(0, WORLD_P2)
    valid = lanes < WORLD_SIZE
    peers = tl.minimum(lanes, WORLD_SIZE - 1)
    table = sig_table.to(tl.pointer_type(tl.int64))
    pads = tl.load(table + peers).to(tl.pointer_type(tl.int32))
    own = tl.load(table + RANK).to(tl.pointer_type(tl.int32))
    slot = SLOT0 + block_id * WORLD_SIZE
    err = err_addr.to(tl.pointer_type(tl.int32))
    deadline_ns = tl.full([], 0, tl.int64)
    if timeout_ns > 0:
        deadline_ns = clock_ns(own, USE_PTX) + timeout_ns
        if tl.load(err, volatile=True) != 0:
            deadline_ns = tl.full([], 1, tl.int64)  # an earlier barrier timed out: do not wait again
    sent = _spin_cas(pads + slot + RANK, valid, 0, 1, "release", deadline_ns, own, USE_PTX)
    got = _spin_cas(own + slot + peers, valid, 1, 0, "acquire", deadline_ns, own, USE_PTX)
    missing = tl.sum(tl.where(valid & ~(sent & got), 1 << lanes, 0), axis=0)
    if missing != 0:
        tl.store(err, missing)
    tl.debug_barrier()
