"""Numbers of the synchronisation protocol that host and device share (plain ints: the host
imports this without Triton's language; ``kernels/barrier.py`` documents the protocol).

Layout of each rank's signal pad, in int32 words:

- ``[CLOCK_WORD, CLOCK_WORD + 2)``: the host backend's clock (int64, ``ptx.clock_ns``'s twin);
- ``ERR_WORD``: this rank's error word, device-side copy (the host reads the pinned one);
- ``[SEQ0, SEQ0 + cap)``: call-sequence counters, one per possible block;
- ``[SEQ0 + cap + b * W + r]`` for ``b < cap``, ``r < W``: the last barrier value rank ``r``'s
  block ``b`` stored here.

``cap`` (:func:`grid_cap`) is the most blocks any launch may have. The pad is the kernels':
counters are never zero after the first call, so torch's own ``hdl.barrier()`` (which expects
zeros in words ``[0, W)``) must not be used on a handle symmtriton launched on.
"""

CLOCK_WORD = 0
ERR_WORD = 2
SEQ0 = 4
#: barrier values per call: call ``seq``'s barrier ``k`` (0 = start, 1 = end) stores
#: ``seq * BARRIERS_PER_CALL + k + 1``.
BARRIERS_PER_CALL = 2
#: a call that failed on the host (nothing launched) advances this rank's counters by this much:
#: two calls, so a peer sees it at least two calls ahead, which no matched call can be.
SKIP_BUMP = 2
#: error word bit for "a peer is out of step" (the low bits name the ranks involved); a
#: timeout sets only the bits of the ranks that did not arrive.
MISMATCH_BIT = 1 << 30
#: error word bit for "a peer gave up on this call" (it timed out or saw a mismatch, and poisoned
#: its lines: kernels/lines.py); the low bits name those peers.
GAVE_UP_BIT = 1 << 28
#: added to a barrier value to poison peers' slots after a mismatch (far ahead of any call).
POISON = 1 << 29


def grid_cap(pad_words: int, world: int) -> int:
    """Most blocks per launch a pad of ``pad_words`` int32 words holds at ``world`` ranks: one
    counter and ``world`` slots per block after the ``SEQ0`` reserved words."""
    return (pad_words - SEQ0) // (world + 1)

# -- flag-in-data lines (kernels/lines.py) ---------------------------------------------------------
#: parities of the line area: call ``seq`` uses parity ``seq % 2``.
LINES_PARITIES = 2
#: the flag of a line poisoned by a rank that gave up on a timeout (kernels/lines.py
#: ``lines_poison``): even, so never a call's flag (odd), and not the 0 of a cleared line; a reader
#: records ``GAVE_UP_BIT``.
LINES_POISON_FLAG = 2
#: the flag of a line poisoned by a rank that gave up on a mismatch: even too, and any flag but
#: ``LINES_POISON_FLAG`` reads as another call's, so a reader records ``MISMATCH_BIT`` whether it
#: saw the skipper's lines or a peer's poison first.
LINES_MISMATCH_POISON_FLAG = 4
#: bytes of one line: a 32-bit data word and a 32-bit flag.
LINES_LINE_BYTES = 8
#: data bytes one line carries.
LINES_WORD_BYTES = 4


def lines_area_bytes(world: int, slot_words: int) -> int:
    """Bytes of each rank's line area: ``LINES_PARITIES`` x ``world`` source slots of
    ``slot_words`` lines (none for one rank: nothing to exchange)."""
    return 0 if world < 2 else LINES_PARITIES * world * slot_words * LINES_LINE_BYTES
