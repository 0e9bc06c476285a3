"""Flag-in-data exchange ("LL" lines, as in NCCL's LL protocol) for small messages: the data
carries its own flag, so an op needs no barrier at all.

Area. Past the scratch bytes of every rank's buffer (``lines_off``, the same on every rank) lies a
line area of ``LINES_PARITIES`` (2) parities x ``WORLD_SIZE`` source slots x ``slot_words``
lines (kernels/protocol.py). A line is one int64: ``(flag << 32) | word``, one 32-bit data
word with its flag; 8-byte aligned stores and loads of it are single-copy atomic, so a reader
that sees the flag sees the word. Call ``seq`` (the call counter of kernels/barrier.py) uses
parity ``seq % 2`` and the flag :func:`lines_flag` (``seq``, odd, never 0). Rank ``r``'s data for
rank ``q`` goes to slot ``r`` of ``q``'s area.

Protocol of one call (every op: :func:`lines_begin`, push everything, receive,
:func:`lines_finish`):

- put (:func:`lines_put`): plain stores of the lines into the peer's slot (16-byte stores of two
  lines where aligned; each 8-byte line is one element of the access, written whole); no
  fence, no signal: each line orders itself;
- get (:func:`lines_get`): volatile loads of the local lines (16-byte pairs where aligned) until
  every flag equals this call's flag, then store 0 over them (local stores).

Which block pushes a line does not matter, only its place in the slot: the flat ops and the row
kernels (kernels/lines_rows.py) push and receive the same chunks in the same block.

Why no barrier is needed to reuse a slot: every line of the area is 0 except while a call is
in flight. A writer writes parity ``p`` again at call ``seq + 2`` only after its call
``seq + 1`` received data this rank sent in *its* call ``seq + 1`` (every op of a group
exchanges with every peer, barrier ops included), which this rank's stream started only after
its call ``seq`` had read and cleared parity ``p``. So a line holds 0 or this call's flag, and
a reader never sees a stale value.

Out of step: any other non-zero flag is a peer's different call (a call that raised on some
ranks only advanced their counters by ``SKIP_BUMP``, keeping the parity: kernels/barrier.py).
Every rank pushes before it waits, so each rank of a mismatched pair sees the other's wrong
flag: the wait returns ``MISMATCH_BIT`` with the peer's bit, and the op abandons the call as the
barrier does (``barrier.give_up`` in :func:`lines_finish`: error words, and the peers' barrier
slots poisoned). A peer that never writes is a timeout after ``timeout_ns``
(``ptx.deadline_tick``); the area must be destroyed with its buffer after an error.

Giving up is agreed: a block that gave up on call ``seq`` (a timeout or a mismatch) overwrites this
rank's slot of that call's parity at every peer with poison lines (:func:`lines_poison`, in
:func:`lines_finish`; flag ``LINES_POISON_FLAG`` after a timeout, ``LINES_MISMATCH_POISON_FLAG``
after a mismatch: never a call's). A late peer that has not yet read the lines this rank pushed sees
the poison, a wrong flag, and gives up on the same call, with ``GAVE_UP_BIT`` after a timeout and
``MISMATCH_BIT`` after a mismatch (so with three or more ranks, a rank that reads a peer's poison
before the skipper's lines still reports the mismatch); one that read them before the poison landed
returned that call, and gives up at a later call (its next call on this parity reads the poison; the
next on the other parity waits for lines this rank never sends).

Warps: a wait's exit is decided per warp. Triton lays a vector of fewer lines than the block has
threads out with copies in several warps and reduces such copies within a warp only, so the
warps of one block may leave the loop at different polls. A warp that cleared a line while
another warp's copy had not yet seen its flag would leave that warp polling a 0 for ever (the
PTX of 4-line waits in 2-warp blocks reduces by warp shuffles only, and such waits hung on 2x
H200), so every wait ends with a block barrier before its lines are cleared. (With it, the row
kernels' 4-line inbox waits in 2-warp blocks ran 2000 graph replays of [1..256, 4096] on 2x
H200 without a hang.)

Scope: volatile loads see the peers' stores once they land (system-coherent); the data is in
the line itself, so there is nothing else to order. Successive calls are ordered by the stream.
A wait costs no clock read on its fast path (``ptx.deadline_tick``).
"""

import triton
import triton.language as tl

from . import protocol as P
from .barrier import call_begin, call_end, give_up, own_pad
from .ptx import deadline_tick, peer_addr

ERR_WORD = tl.constexpr(P.ERR_WORD)
MISMATCH_BIT = tl.constexpr(P.MISMATCH_BIT)
GAVE_UP_BIT = tl.constexpr(P.GAVE_UP_BIT)
LINES_PARITIES = tl.constexpr(P.LINES_PARITIES)
LINES_POISON_FLAG = tl.constexpr(P.LINES_POISON_FLAG)
LINES_MISMATCH_POISON_FLAG = tl.constexpr(P.LINES_MISMATCH_POISON_FLAG)
#: lines one pass of :func:`lines_poison` stores.
POISON_CHUNK = tl.constexpr(1024)


@triton.jit
def lines_flag(seq):
    """The flag of call ``seq``: odd, so never the 0 of a cleared line."""
    return ((seq & 0x3FFFFFFF) << 1) | 1


@triton.jit
def lines_slot(area_addr, seq, src, slot_words, WORLD_SIZE: tl.constexpr):
    """Address (int64) of source ``src``'s slot, parity of call ``seq``, in the area at
    ``area_addr``."""
    parity = (seq % LINES_PARITIES).to(tl.int64)
    return area_addr + ((parity * WORLD_SIZE + src) * slot_words) * 8


@triton.jit
def _line_ptrs(slot_addr):
    return tl.multiple_of(slot_addr.to(tl.pointer_type(tl.int64)), 16)


@triton.jit
def lines_poison(buf_table, lines_off, seq, slot_words, status, RANK: tl.constexpr,
                 WORLD_SIZE: tl.constexpr):
    """With ``status`` non-zero (this block gave up on call ``seq``): store poison lines over
    this rank's whole slot, parity of ``seq``, in every peer's line area (module docstring), so
    no peer returns that call as a success after this rank failed it; the flag tells a mismatch
    (``MISMATCH_BIT`` in ``status``) from a timeout. Failure path only."""
    if status != 0:
        tl.debug_barrier()  # after the block's own puts of this call
        flag = tl.where((status & MISMATCH_BIT) != 0, LINES_MISMATCH_POISON_FLAG,
                        LINES_POISON_FLAG)
        poison = tl.full([POISON_CHUNK], 0, tl.int64) + (flag.to(tl.int64) << 32)
        for i in tl.static_range(1, WORLD_SIZE):
            q = (RANK + i) % WORLD_SIZE
            base = _line_ptrs(lines_slot(peer_addr(buf_table, q) + lines_off, seq, RANK,
                                         slot_words, WORLD_SIZE))
            k = 0
            while k < slot_words:  # see ptx.py on loops
                offs = k + tl.arange(0, POISON_CHUNK)
                tl.store(base + offs, poison, mask=offs < slot_words)
                k += POISON_CHUNK


@triton.jit
def lines_put(slot_addr, offs, words, mask, flag):
    """Store ``words`` (32-bit, any int type) as lines ``offs`` of the slot at ``slot_addr``."""
    lines = (words.to(tl.int64) & 0xFFFFFFFF) | (flag.to(tl.int64) << 32)
    tl.store(_line_ptrs(slot_addr) + offs, lines, mask=mask)


@triton.jit
def _take(v, flag, got, words, wrong):
    """One poll of lines ``v`` (int64, 0 where not loaded): lines with ``flag`` give their word,
    lines with another non-zero flag are wrong (``wrong`` bit 1, a mismatch poison included;
    bit 2: the flag was ``LINES_POISON_FLAG``, the peer gave up on a timeout); either ends the wait
    for that line."""
    f = (v >> 32).to(tl.int32)
    hit = ~got & (f == flag)
    bad = ~got & (f != flag) & (f != 0)
    poisoned = bad & (f == LINES_POISON_FLAG)
    wrong = wrong | tl.where(poisoned, 2, bad.to(tl.int32))
    return got | hit | bad, tl.where(hit, v.to(tl.int32), words), wrong


@triton.jit
def _get_pairs(base, first, end, flag, skip, timeout_ns, pad, NW: tl.constexpr,
               USE_PTX: tl.constexpr):
    """:func:`lines_get`'s wait, one ``ld.volatile.global.v2.b64`` per pair of lines."""
    lo_off = first + 2 * tl.arange(0, NW // 2)
    got_lo = (lo_off >= end) | (skip != 0)
    got_hi = (lo_off + 1 >= end) | (skip != 0)
    words_lo = tl.zeros([NW // 2], tl.int32)
    words_hi = tl.zeros([NW // 2], tl.int32)
    wrong = tl.zeros([NW // 2], tl.int32)
    deadline_ns = tl.full([], 0, tl.int64)
    misses = 0
    expired = 0
    while (tl.min((got_lo & got_hi).to(tl.int32), axis=0) == 0) & (expired == 0):
        lo, hi = tl.inline_asm_elementwise(
            """{ .reg .pred p; setp.ne.s32 p, $3, 0; mov.b64 $0, 0; mov.b64 $1, 0;
            @p ld.volatile.global.v2.b64 {$0, $1}, [$2]; }""", "=l,=l,l,r",
            [base + lo_off, (~(got_lo & got_hi)).to(tl.int32)], dtype=(tl.int64, tl.int64),
            is_pure=False, pack=1)
        got_lo, words_lo, wrong = _take(lo, flag, got_lo, words_lo, wrong)
        got_hi, words_hi, wrong = _take(hi, flag, got_hi, words_hi, wrong)
        misses += 1
        deadline_ns, expired = deadline_tick(misses, deadline_ns, timeout_ns, pad + ERR_WORD * 4,
                                             pad, USE_PTX)
    tl.debug_barrier()  # every warp is done polling before any line is cleared (module docstring)
    if skip == 0:
        zero = tl.zeros([NW // 2], tl.int64)
        tl.store(base + lo_off, zero, mask=lo_off < end)
        tl.store(base + lo_off + 1, zero, mask=lo_off + 1 < end)
    return tl.reshape(tl.join(words_lo, words_hi), [NW]), got_lo & got_hi, wrong


@triton.jit
def _get_lines(base, first, end, flag, skip, timeout_ns, pad, NW: tl.constexpr,
               USE_PTX: tl.constexpr):
    """:func:`lines_get`'s wait, one volatile load per line."""
    offs = first + tl.arange(0, NW)
    mask = offs < end
    got = ~mask | (skip != 0)
    words = tl.zeros([NW], tl.int32)
    wrong = tl.zeros([NW], tl.int32)
    deadline_ns = tl.full([], 0, tl.int64)
    misses = 0
    expired = 0
    while (tl.min(got.to(tl.int32), axis=0) == 0) & (expired == 0):
        v = tl.load(base + offs, mask=~got, other=0, volatile=True)
        got, words, wrong = _take(v, flag, got, words, wrong)
        misses += 1
        deadline_ns, expired = deadline_tick(misses, deadline_ns, timeout_ns, pad + ERR_WORD * 4,
                                             pad, USE_PTX)
    tl.debug_barrier()  # every warp is done polling before any line is cleared (module docstring)
    if skip == 0:
        tl.store(base + offs, tl.zeros([NW], tl.int64), mask=mask)
    return words, got, wrong


@triton.jit
def lines_get(slot_addr, first, end, flag, src, skip, timeout_ns, pad, NW: tl.constexpr,
              USE_PTX: tl.constexpr, PAIRS: tl.constexpr):
    """Wait for lines ``[first, first + NW)`` (those ``< end``) of the local slot at
    ``slot_addr`` to carry ``flag``, then clear them. Returns ``(words, status)``: ``NW`` int32
    words (0 past ``end``) and 0, or rank ``src``'s bit (a line still missing at the deadline),
    with ``MISMATCH_BIT`` when a line carried another call's flag or a mismatch poison, with
    ``GAVE_UP_BIT`` when it carried a timeout poison (:func:`lines_poison`). Waits for nothing when
    ``skip`` is non-zero (a block that abandoned the call). ``pad``: this rank's signal pad (its
    error word and, in the interpreter, its clock: ``ptx.deadline_tick``).

    With ``PAIRS`` and ``USE_PTX`` (``first`` even: the slot's 16-byte pairs of lines) each
    thread polls whole pairs with one ``ld.volatile.global.v2.b64`` (inline PTX: Triton does not
    vectorize volatile loads) and keeps the two halves apart until the wait is over (no layout
    change inside the loop); else one volatile load per line (also the interpreter's)."""
    base = _line_ptrs(slot_addr)
    if PAIRS:  # nested: a constexpr ``and`` would make the branch a runtime one
        if USE_PTX:
            words, got, wrong = _get_pairs(base, first, end, flag, skip, timeout_ns, pad, NW,
                                           USE_PTX)
        else:
            words, got, wrong = _get_lines(base, first, end, flag, skip, timeout_ns, pad, NW,
                                           USE_PTX)
    else:
        words, got, wrong = _get_lines(base, first, end, flag, skip, timeout_ns, pad, NW, USE_PTX)
    return words, _status(got, wrong, src)


@triton.jit
def _status(got, wrong, src):
    """A wait's status (:func:`lines_get`) from its lines' ``got`` and ``wrong``: rank ``src``'s bit
    with ``MISMATCH_BIT`` (another call's flag), ``GAVE_UP_BIT`` (poison) or neither (a line
    still missing at the deadline); 0 when every line came."""
    mismatch = tl.max(wrong & 1, axis=0) != 0
    gave_up = tl.max(wrong & 2, axis=0) != 0
    missing = tl.min(got.to(tl.int32), axis=0) == 0
    return (tl.where(mismatch, MISMATCH_BIT | (1 << src), 0)
            | tl.where(gave_up, GAVE_UP_BIT | (1 << src), 0)
            | tl.where(missing, 1 << src, 0))


@triton.jit
def lines_begin(sig_table, buf_table, lines_off, RANK: tl.constexpr, WORLD_SIZE: tl.constexpr,
                PDL: tl.constexpr):
    """The first statement of every lines kernel: ``barrier.call_begin``'s ``(pid, nprog,
    seq)``, then this rank's signal pad (its error word and clock, for the waits) and its line
    area (int64 addresses)."""
    pid, nprog, seq = call_begin(sig_table, RANK, WORLD_SIZE, PDL)
    return pid, nprog, seq, own_pad(sig_table, RANK), peer_addr(buf_table, RANK) + lines_off


@triton.jit
def lines_finish(sig_table, buf_table, lines_off, pid, seq, slot_words, status, err_addr,
                 seq_cap, RANK: tl.constexpr, WORLD_SIZE: tl.constexpr, WORLD_P2: tl.constexpr,
                 SCOPE: tl.constexpr):
    """The last statement of every lines kernel: with the waits' ``status`` non-zero, give up
    as the barrier does (``barrier.give_up``) and poison this rank's lines of the call at every
    peer (:func:`lines_poison`); then ``barrier.call_end``."""
    give_up(sig_table, seq, status, err_addr, seq_cap, RANK, WORLD_SIZE, WORLD_P2, SCOPE)
    lines_poison(buf_table, lines_off, seq, slot_words, status, RANK, WORLD_SIZE)
    call_end(sig_table, pid, seq, seq_cap, RANK, WORLD_SIZE)
