"""The one barrier every symmtriton kernel uses: per block, over signal pads, with call
sequence numbers.

Pad layout (int32 words of each rank's signal pad; numbers in ``kernels/protocol.py``):
``ERR_WORD`` (this rank's error word, device copy), ``cap`` call-sequence counters from
``SEQ0``, then the barrier slots from ``slot0 = SEQ0 + cap``: slot ``[slot0 + b * W + r]`` of
rank ``q`` holds the last barrier value rank ``r``'s block ``b`` stored there. Nothing is ever
reset: every value only grows, so CUDA graphs replay with no host-side step.

Call sequence. Every launch of a collective on a buffer is one *call* (the barrier-free ops of
kernels/lines.py count the same way and take their flags from the same counters). Block ``b`` reads
its counter ``seq = counter[b]`` (:func:`call_seq`); every launch advances every counter by one
(:func:`call_end`: block ``b`` stores ``seq + 1`` to ``counter[b + k * blocks]`` for every
``k >= 0`` below ``cap``, indices no other block of the launch reads), so all counters hold the
number of calls made, whatever the grids, and every block of a launch reads the same ``seq``. A call
that fails on the host before launching adds ``SKIP_BUMP`` (2) to every counter
(``_calls.call_failed``, stream-ordered), so the ranks' counters then differ by two calls.

Barrier ``k`` of call ``seq`` (``k`` = 0 start, 1 end) uses the value ``v = seq * 2 + k + 1``:

- arrive: the block stores ``v`` into slot ``[slot0 + b * W + RANK]`` of every rank's pad,
  *release* at the barrier's scope when this block wrote data the peers read after the barrier
  (the ``bar.sync`` before the store makes the whole block's writes part of it), *relaxed* when
  the block wrote nothing the peers read (before the start barrier of a push, whose data came
  from earlier launches, complete; after reads only, whose values the block already used);
- wait: the block polls this rank's slots ``[slot0 + b * W + r]`` until each is ``>= v``,
  *acquire* when this block then touches memory the peers used before arriving (reads data
  they wrote, or writes a region they read), relaxed when nothing follows; the reductions
  of the loop (``bar.sync``) hand what the acquire saw to the whole block.

A peer can be ahead of this rank by at most one call (it cannot pass a barrier this rank has
not arrived at), so a slot ``>= (seq + 2) * 2 + 1`` means the ranks are out of step (a call
raised on some ranks only, and counted twice there): the block records ``MISMATCH_BIT`` and
the ranks' bits in its error word, overwrites every slot it owns on every peer (all blocks)
with a value ``POISON`` ahead, so every peer's blocks see a mismatch too, and abandons the call
(its data phases are skipped). Such a call is never paired with another rank's next call:
every rank's call raises. (Ranks that launch *different* collectives in the same order are not
told apart: ``SYMMTRITON_CHECK_UNIFORM`` is for that.)

Every signal and poll has scope ``SCOPE``: ``"gpu"`` when all ranks run on one GPU, else
``"sys"``; the launcher picks it (``_launch.barrier_scope``). Each block signals and polls
with one lane per rank (``ptx.signal_wait``); other blocks are not ordered: a kernel's block
``b`` touches only data that block ``b`` of the peers touches, and successive launches are
ordered by the stream.

Buffer reuse: what block ``b`` did before barrier ``k`` of a call happens-before what block
``b`` of every rank does after it. The start barrier lets peers write into this rank's region
(its earlier reads are over: they were in earlier launches or before the barrier); the end
barrier makes pushed data visible and ends the peers' reads of this rank's region, so the
region (a zero-copy operand included) may be written by anything after the launch on this
rank's stream. A signal of call ``seq`` is overwritten only by a later call of the same block
and rank, which can only come after this rank arrived at the barrier that consumed it.

With ``WORLD_SIZE == 1`` the barrier is one ``bar.sync`` and there are no counters.

Every kernel begins with :func:`call_begin` (the block, the grid, the call number; a lines
kernel of kernels/lines.py through ``lines.lines_begin``). A barrier kernel ends with
:func:`call_end`; one whose waits are not barriers (the flagged chunks of kernels/push.py) with
:func:`call_finish` (:func:`give_up` first); a lines kernel with ``lines.lines_finish`` (its
poison too).

Programmatic dependent launch (PDL): a kernel launched with it may begin while the previous
grid on its stream finishes, so every kernel runs ``ptx.pdl_wait`` (``griddepcontrol.wait``:
the previous grid complete, its writes visible) before its first memory access, the counter
read of :func:`call_seq` included (:func:`call_begin` waits first), and none triggers its
dependents early. Hence "this rank's stream finished every earlier launch before this one
touched memory", which the counters, the start barrier's reuse argument and the lines' flags
rest on, holds with PDL as without it.

Timeout: with ``timeout_ns > 0``, a wait that keeps missing a peer for ``ptx.CLOCK_EVERY``
polls (64) reads the global clock (``%globaltimer``; never on the fast path) to start a deadline, at
once expired when this rank's error word is already set (device memory: a later barrier after
an error gives up at its first clock read, so a launch waits about one timeout, not one per
barrier), and gives up once it passes. The bit mask of the late ranks then goes to ``*err_addr``
(int32, pinned host memory: only ever written by the device, never read) and to the pad's
``ERR_WORD``; the host turns it into an error. The buffer must be destroyed after an error.
"""

import triton
import triton.language as tl

from . import protocol as P
from .ptx import pdl_wait, signal_wait

ERR_WORD = tl.constexpr(P.ERR_WORD)
SEQ0 = tl.constexpr(P.SEQ0)
NB = tl.constexpr(P.BARRIERS_PER_CALL)
MISMATCH_BIT = tl.constexpr(P.MISMATCH_BIT)
POISON = tl.constexpr(P.POISON)
#: counters one block advances per pass of :func:`call_end`.
SEQ_CHUNK = tl.constexpr(128)


@triton.jit
def own_pad(sig_table, RANK: tl.constexpr):
    """Address (int64) of this rank's signal pad."""
    return tl.load(sig_table.to(tl.pointer_type(tl.int64)) + RANK)


@triton.jit
def call_seq(sig_table, pid, RANK: tl.constexpr, WORLD_SIZE: tl.constexpr):
    """This launch's call number, read from block ``pid``'s counter (0 when ``WORLD_SIZE`` is
    1: no counters)."""
    seq = tl.full([], 0, tl.int32)
    if WORLD_SIZE > 1:
        seq = tl.load(own_pad(sig_table, RANK).to(tl.pointer_type(tl.int32)) + SEQ0 + pid)
    return seq


@triton.jit
def call_begin(sig_table, RANK: tl.constexpr, WORLD_SIZE: tl.constexpr, PDL: tl.constexpr):
    """The first statement of every kernel: with ``PDL``, wait for the previous grid
    (``ptx.pdl_wait``, before any memory access); then ``(pid, nprog, seq)``: this block, the
    grid's blocks, and the call number (:func:`call_seq`)."""
    pdl_wait(PDL)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    return pid, nprog, call_seq(sig_table, pid, RANK, WORLD_SIZE)


@triton.jit
def call_end(sig_table, pid, seq, seq_cap, RANK: tl.constexpr, WORLD_SIZE: tl.constexpr):
    """Advance the counters ``pid + k * blocks`` below ``seq_cap`` to ``seq + 1``: together the
    blocks of a launch advance every counter once."""
    if WORLD_SIZE > 1:
        counters = own_pad(sig_table, RANK).to(tl.pointer_type(tl.int32)) + SEQ0
        step = tl.num_programs(0)
        k = 0
        while pid + k * step < seq_cap:  # see ptx.py on loops
            idx = pid + (k + tl.arange(0, SEQ_CHUNK)) * step
            tl.store(counters + idx, seq + 1, mask=idx < seq_cap)
            k += SEQ_CHUNK


@triton.jit
def _abandon(sig_table, status, value, err_addr, own, seq_cap, RANK: tl.constexpr,
             WORLD_SIZE: tl.constexpr, WORLD_P2: tl.constexpr, SCOPE: tl.constexpr):
    """Record ``status`` in both error words; after a mismatch, poison every slot this rank
    owns on every peer (all blocks), so each peer's blocks see the mismatch too."""
    tl.store(err_addr.to(tl.pointer_type(tl.int32)), status)
    tl.store(own.to(tl.pointer_type(tl.int32)) + ERR_WORD, status)
    if (status & MISMATCH_BIT) != 0:
        lanes = tl.arange(0, WORLD_P2)
        peers = tl.minimum(lanes, WORLD_SIZE - 1)
        pads = tl.load(sig_table.to(tl.pointer_type(tl.int64)) + peers)
        slots = (pads + (SEQ0 + seq_cap + RANK) * 4).to(tl.pointer_type(tl.int32))
        b = 0
        while b < seq_cap:
            tl.atomic_max(slots + b * WORLD_SIZE, value + POISON, mask=lanes < WORLD_SIZE,
                          sem="relaxed", scope=SCOPE)
            b += 1


@triton.jit
def barrier(sig_table, pid, seq, status, err_addr, timeout_ns, seq_cap, K: tl.constexpr,
            RANK: tl.constexpr, WORLD_SIZE: tl.constexpr, WORLD_P2: tl.constexpr,
            SCOPE: tl.constexpr, USE_PTX: tl.constexpr, RELEASE: tl.constexpr,
            ACQUIRE: tl.constexpr):
    """Barrier ``K`` of call ``seq`` of block ``pid`` with block ``pid`` of every rank (module
    docstring). ``status``: the block's error so far (0 = none); a block with an error skips
    the barrier. Returns the block's error after it (0 = every rank arrived, in step)."""
    status = status + tl.zeros([], tl.int32)
    tl.debug_barrier()
    if WORLD_SIZE > 1:
        if status == 0:
            own = own_pad(sig_table, RANK)
            slot0 = SEQ0 + seq_cap
            value = seq * NB + (K + 1)
            status = signal_wait(sig_table, (slot0 + pid * WORLD_SIZE + RANK) * 4,
                                 own + (slot0 + pid * WORLD_SIZE) * 4, value, (seq + 2) * NB + 1,
                                 own + ERR_WORD * 4, timeout_ns, own, WORLD_SIZE, WORLD_P2, SCOPE,
                                 RELEASE, ACQUIRE, MISMATCH_BIT, USE_PTX)
            if status != 0:
                _abandon(sig_table, status, value, err_addr, own, seq_cap, RANK, WORLD_SIZE,
                         WORLD_P2, SCOPE)
    return status


@triton.jit
def give_up(sig_table, seq, status, err_addr, seq_cap, RANK: tl.constexpr,
            WORLD_SIZE: tl.constexpr, WORLD_P2: tl.constexpr, SCOPE: tl.constexpr):
    """What a barrier does when its wait fails, for an op that waits without one (the lines of
    kernels/lines.py): with ``status`` non-zero, record it in both error words and, after a
    mismatch, poison this rank's slots on every peer, so peers in a barrier op see it too."""
    if status != 0:
        _abandon(sig_table, status, seq * NB + 1, err_addr, own_pad(sig_table, RANK), seq_cap,
                 RANK, WORLD_SIZE, WORLD_P2, SCOPE)


@triton.jit
def call_finish(sig_table, pid, seq, status, err_addr, seq_cap, RANK: tl.constexpr,
                WORLD_SIZE: tl.constexpr, WORLD_P2: tl.constexpr, SCOPE: tl.constexpr):
    """The last statement of a kernel whose waits are not barriers: :func:`give_up` with the
    waits' ``status``, then :func:`call_end`."""
    give_up(sig_table, seq, status, err_addr, seq_cap, RANK, WORLD_SIZE, WORLD_P2, SCOPE)
    call_end(sig_table, pid, seq, seq_cap, RANK, WORLD_SIZE)
