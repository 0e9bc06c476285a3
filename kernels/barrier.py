"""The one barrier every symmtriton kernel uses: per block, over signal pads.

Protocol. Slot ``[block * WORLD_SIZE + r]`` of rank ``q``'s signal pad (int32, counted after the
first ``SLOT0`` words) counts signals from rank ``r``'s block ``block`` to rank ``q``'s block
``block`` that ``q`` has not consumed yet. The first ``SLOT0`` words hold the host backend's
clock (see ``ptx.clock_ns``).

- send: atomic ``+1``, *release*, on slot ``[block * W + RANK]`` of every peer's pad. Nothing
  waits for its result.
- wait: atomic reads (``+0``), *acquire*, of slots ``[block * W + r]`` of this rank's pad,
  repeated until every one is ``>= 1``;
- consume: atomic ``-1`` on each of them, relaxed (ordered before this lane's next read of the
  slot by coherence: the same thread touches the same slot every time).

Every atomic has scope ``SCOPE``: ``"gpu"`` when all ranks run on one GPU, else ``"sys"``
(peers on other GPUs); the launcher picks it (``_launch.barrier_scope``).

A ``bar.sync`` (``tl.debug_barrier``) before the send makes every thread's earlier memory
operations part of what the release publishes; one after the wait makes what the acquire saw
visible to every thread of the block. So: everything block ``b`` of any rank did before the
barrier happens-before everything block ``b`` of every rank does after it. Other blocks are not
ordered; kernels are written so that block ``b`` only touches data that block ``b`` of the peers
touches, and successive launches are ordered by the stream.

A slot is a counter, not a flag, because a fast rank may send barrier ``k + 1`` before the peer
consumed its signal of barrier ``k`` (it only needs the peer to have *sent* ``k``): the slot then
holds 2, and never more. Each wait consumes exactly one signal per peer, so the pads are all zero
whenever no kernel is in flight: the barrier needs no host-side epoch and replays under CUDA
graphs. As long as every rank launches the same grid for the same sequence of operations, the
k-th send pairs with the k-th wait. Per barrier a block waits for one memory round trip per
poll, nothing more (the send and the consume are fire-and-forget).

With ``WORLD_SIZE == 1`` the barrier is one ``bar.sync``: there is no peer to order against (the
block's threads still are), and stream order covers successive launches.

The grid must satisfy ``SLOT0 + blocks * WORLD_SIZE <= signal pad words``; the launchers clamp
it.

Timeout: with ``timeout_ns > 0``, a wait that keeps missing a peer for ``CLOCK_EVERY`` polls
starts a deadline on the global clock (read once every ``CLOCK_EVERY`` polls from then on) and
gives up once it passes; the block then stores the bit mask of ranks that did not arrive in
``*err_addr`` (int32, this rank's memory, host-readable) and goes on; the host turns it into an
error. A later barrier that finds the error word set gives up at its first clock read, so a
launch waits about one timeout, not one per barrier. The abandoned signals are left in the pads:
a buffer that timed out must be destroyed and recreated.
"""

import triton
import triton.language as tl

from .ptx import clock_ns

#: int32 words at the start of every signal pad that are not barrier slots (the host clock).
SLOT0 = tl.constexpr(2)
#: polls between two clock reads. ``%globaltimer`` reads are slow when many blocks spin on
#: them: reading it on every poll made a 1 MiB all-gather at 2 ranks x 32 blocks on one H100
#: (MPS) take 168 us instead of 5 us (benchmarks/results/NOTES.md).
CLOCK_EVERY = tl.constexpr(64)


@triton.jit
def _wait_signalled(addrs, todo, err, timeout_ns, clock_addr, SCOPE: tl.constexpr,
                    USE_PTX: tl.constexpr):
    """Poll the slots at ``addrs`` (lanes in ``todo``) until each holds a signal or the deadline
    passed; returns the lanes that got one (not yet consumed). The clock is read once every
    ``CLOCK_EVERY`` misses, never on the fast path."""
    got = ~todo
    deadline_ns = tl.full([], 0, tl.int64)
    misses = 0
    expired = 0
    while (tl.min(got.to(tl.int32), axis=0) == 0) & (expired == 0):
        old = tl.atomic_add(addrs, 0, mask=~got, sem="acquire", scope=SCOPE)
        got = got | ((old >= 1) & ~got)
        misses += 1
        if (timeout_ns > 0) & (misses % CLOCK_EVERY == 0):
            now = clock_ns(clock_addr, USE_PTX)
            if deadline_ns == 0:  # start the clock, unless an earlier wait timed out
                deadline_ns = now + timeout_ns
                if tl.load(err, volatile=True) != 0:
                    deadline_ns = now
            expired = (now >= deadline_ns).to(tl.int32)  # the loop ends anyway once all got one
    return got


@triton.jit
def barrier(sig_table, block_id, err_addr, timeout_ns, RANK: tl.constexpr,
            WORLD_SIZE: tl.constexpr, WORLD_P2: tl.constexpr, SCOPE: tl.constexpr,
            USE_PTX: tl.constexpr):
    """Barrier of block ``block_id`` with block ``block_id`` of every rank (module docstring)."""
    tl.debug_barrier()
    if WORLD_SIZE > 1:
        lanes = tl.arange(0, WORLD_P2)
        valid = lanes < WORLD_SIZE
        peers = tl.minimum(lanes, WORLD_SIZE - 1)
        table = sig_table.to(tl.pointer_type(tl.int64))
        pads = tl.load(table + peers).to(tl.pointer_type(tl.int32))
        own = tl.load(table + RANK).to(tl.pointer_type(tl.int32))
        slot = SLOT0 + block_id * WORLD_SIZE
        err = err_addr.to(tl.pointer_type(tl.int32))
        tl.atomic_add(pads + slot + RANK, 1, mask=valid, sem="release", scope=SCOPE)
        mine = own + slot + peers
        got = _wait_signalled(mine, valid, err, timeout_ns, own, SCOPE, USE_PTX)
        tl.atomic_add(mine, -1, mask=valid & got, sem="relaxed", scope=SCOPE)
        missing = tl.sum(tl.where(valid & ~got, 1 << lanes, 0), axis=0)
        if missing != 0:
            tl.store(err, missing)
        tl.debug_barrier()
