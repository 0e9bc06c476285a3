"""All-gather along dim 0: every rank pushes its shard into every rank's gathered region.

Phases of ``_all_gather_kernel`` (block ``b`` handles chunks ``c`` with ``c % blocks == b``):

1. start barrier (relaxed arrive: no data precedes it; acquire poll: the pushes after it must
   not overtake the peers' reads before it): every peer's block ``b`` has begun this launch,
   so its stream finished all earlier work and nothing still reads the region chunk ``c`` of
   its buffer is about to get;
2. push: load chunk ``c`` of the local input, store it at shard ``RANK`` of the region on every
   rank (``multimem.st`` once to all, or one store per peer);
3. end barrier (release / acquire): chunk ``c`` of every shard has landed in this rank's region;
4. with ``COPY_OUT``: copy chunk ``c`` of every peer's shard from the region to the output tensor
   (this rank's own chunk was stored there in phase 2, with its push).

A block whose barrier fails (timeout, ranks out of step: kernels/barrier.py) skips the phases
after it.

After the launch the region may be reused by the next operation on the stream: every peer that
writes it again first passes that operation's start barrier, which this rank reaches only after
this launch is complete.

``_all_gather_lines_kernel`` (small messages, no barrier; lines of kernels/lines.py): block ``b``
pushes elements ``[c * BLOCK, (c + 1) * BLOCK)`` of the shard (chunks ``c % blocks == b``; any 8-,
16- or 32-bit ``DTYPE``: a bit copy) as lines into slot ``RANK`` of every peer and copies them to
shard ``RANK`` of the output, then takes the same chunks of every peer's slot into the peers' shards
of the output. Nothing of the buffer outside the line area is touched.
"""

import triton
import triton.language as tl

from .barrier import barrier, call_begin, call_end
from .common import copy_shards, lines_push_to
from .lines import lines_begin, lines_finish, lines_flag, lines_get, lines_slot
from .ptx import as_i64, as_ptr, peer_addr, store_all, words_to_elems


@triton.jit
def _all_gather_kernel(in_addr, out_addr, buf_table, sig_table, mc_addr, err_addr, seq_cap,
                       region_off, n, timeout_ns, DTYPE: tl.constexpr, RANK: tl.constexpr,
                       WORLD_SIZE: tl.constexpr, WORLD_P2: tl.constexpr,
                       BLOCK_SIZE: tl.constexpr, COPY_OUT: tl.constexpr,
                       USE_MULTIMEM: tl.constexpr, SCOPE: tl.constexpr, USE_PTX: tl.constexpr,
                       ALIGNED: tl.constexpr, PDL: tl.constexpr):
    pid, nprog, seq = call_begin(sig_table, RANK, WORLD_SIZE, PDL)
    ESIZE: tl.constexpr = DTYPE.primitive_bitwidth // 8
    bad = barrier(sig_table, pid, seq, 0, err_addr, timeout_ns, seq_cap, 0, RANK, WORLD_SIZE,
                  WORLD_P2, SCOPE, USE_PTX, False, True)
    src = as_ptr(in_addr, DTYPE, ALIGNED)
    dst = as_ptr(out_addr, DTYPE, ALIGNED)
    shard_off = region_off + RANK * as_i64(n) * ESIZE
    nchunks = tl.cdiv(n, BLOCK_SIZE)
    c = tl.where(bad != 0, nchunks, pid)
    while c < nchunks:  # chunks c = pid (mod nprog); see ptx.py on loops
        start = c * BLOCK_SIZE
        offs = start + tl.arange(0, BLOCK_SIZE)
        vals = tl.load(src + offs, mask=offs < n)
        store_all(mc_addr, buf_table, shard_off, start, n, vals, BLOCK_SIZE, DTYPE, RANK,
                  WORLD_SIZE, USE_MULTIMEM, ALIGNED)
        if COPY_OUT:  # this rank's shard goes to the output now, not after the end barrier
            tl.store(dst + RANK * as_i64(n) + offs, vals, mask=offs < n)
        c += nprog
    bad = barrier(sig_table, pid, seq, bad, err_addr, timeout_ns, seq_cap, 1, RANK, WORLD_SIZE,
                  WORLD_P2, SCOPE, USE_PTX, True, True)
    if COPY_OUT:
        local = peer_addr(buf_table, RANK) + region_off
        copy_shards(local, out_addr, n, BLOCK_SIZE, nchunks, pid, nprog, bad, DTYPE, BLOCK_SIZE,
                    WORLD_SIZE, ALIGNED, RANK)
    call_end(sig_table, pid, seq, seq_cap, RANK, WORLD_SIZE)


@triton.jit
def _all_gather_lines_kernel(in_addr, out_addr, buf_table, sig_table, err_addr, seq_cap, lines_off,
                             slot_words, n, timeout_ns, DTYPE: tl.constexpr, RANK: tl.constexpr,
                             WORLD_SIZE: tl.constexpr, WORLD_P2: tl.constexpr, BLOCK: tl.constexpr,
                             SCOPE: tl.constexpr, USE_PTX: tl.constexpr, ALIGNED: tl.constexpr,
                             PDL: tl.constexpr):
    pid, nprog, seq, pad, area = lines_begin(sig_table, buf_table, lines_off, RANK, WORLD_SIZE,
                                             PDL)
    EPW: tl.constexpr = 32 // DTYPE.primitive_bitwidth  # elements per 32-bit word
    src = as_ptr(in_addr, DTYPE, ALIGNED)
    dst = as_ptr(out_addr, DTYPE, ALIGNED)
    nchunks = tl.cdiv(n, BLOCK)
    c = pid
    while c < nchunks:  # push; chunks c = pid (mod nprog), see ptx.py on loops
        lines_push_to(src, buf_table, -1, lines_off, c * BLOCK, n, seq, slot_words, DTYPE, BLOCK,
                      RANK, WORLD_SIZE)
        offs = c * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst + RANK * as_i64(n) + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)
        c += nprog
    flag = lines_flag(seq)
    status = tl.full([], 0, tl.int32)
    c = pid
    while (c < nchunks) & (status == 0):  # receive
        offs = c * BLOCK + tl.arange(0, BLOCK)
        for i in tl.static_range(1, WORLD_SIZE):
            peer = (RANK + WORLD_SIZE - i) % WORLD_SIZE
            words, st = lines_get(lines_slot(area, seq, peer, slot_words, WORLD_SIZE),
                                  c * (BLOCK // EPW), n // EPW, flag, peer, status, timeout_ns, pad,
                                  BLOCK // EPW, USE_PTX, True)
            status = status | st
            tl.store(dst + peer * as_i64(n) + offs, words_to_elems(words, DTYPE), mask=offs < n)
        c += nprog
    lines_finish(sig_table, buf_table, lines_off, pid, seq, slot_words, status, err_addr, seq_cap,
                 RANK, WORLD_SIZE, WORLD_P2, SCOPE)
