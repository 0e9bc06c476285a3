"""Reduce-scatter + residual add + RMSNorm (+ all-gather) over rows, in one launch.

The input is ``[S, H]`` per rank (partial sums), ``S = WORLD_SIZE * s``; rank ``q`` owns rows
``[q*s, (q+1)*s)``. Block ``b`` handles local rows ``i`` with ``i % blocks == b``, i.e. global
rows ``RANK*s + i``. Phases of ``_fused_rmsnorm_kernel``:

1. with ``STAGE_IN``: copy rows ``q*s + i`` (every ``q``) of the local input into the region:
   exactly the rows block ``b`` of the peers reads from this rank;
2. start barrier (release / acquire): those rows are in place on every rank;
3. per row: reduce row ``RANK*s + i`` over all ranks in fp32 (``multimem.ld_reduce`` or one load
   per peer), add the residual row and round to the residual's dtype (stored back: the
   residual is updated in place), RMSNorm in fp32 statistics, times ``weight``;
   with ``ALL_GATHER`` store the normed row at the same row of the region on every rank
   (``multimem.st`` or one store per peer) — this overwrites input rows that only this rank's
   block ``b`` reads, and it has read them already — else store it to the local output;
4. end barrier (release / acquire with ``ALL_GATHER``, else relaxed: only reads came before
   it): every peer's normed rows ``q*s + i`` have landed here and nobody reads this
   rank's rows any more;
5. with ``COPY_OUT``: copy rows ``q*s + i`` (every ``q``) from the region to the output.

A block whose barrier fails (timeout, ranks out of step: kernels/barrier.py) skips the phases
after it.

A row is one chunk: ``BLOCK_H`` (a power of two >= H) covers it, the tail masked.

``_fused_rmsnorm_ll_kernel`` (small inputs, no barrier, one exchange; lines of kernels/ll.py; rows
of whole 32-bit words; with ``SPREAD`` messages leave in chunks of ``CHUNK`` elements spread over
all blocks, ``common.ll_push_chunks``, more blocks than rows). Without ``ALL_GATHER``: rows ``q*s +
i`` of the input go into slot ``RANK`` of rank ``q`` (line ``i * H_words + k``), then block ``b``
per row ``i % blocks == b`` sums row ``RANK*s + i`` over the ranks in rank order (its own from the
input, the peers' from its slots, fp32), adds the residual, rounds, stores it back and stores the
RMSNorm times ``weight`` to row ``i`` of ``out``. With ``ALL_GATHER`` a second exchange (all-gather
of the normed rows) is replaced by work done on every rank: every input row (lines ``r * H_words``)
and this rank's residual rows ``i`` (lines ``(S + i) * H_words``; pushed by the block that later
updates that row) go to every peer, then block ``b`` computes rows ``r = q*s + i`` (``r % blocks ==
b``) as rank ``q`` would (the same sums in the same order: the same bits) with rank ``q``'s
residual row, stores it to row ``r`` of ``out`` and, for its own rows, to the residual. Small
messages are latency-bound: one exchange of ``(S + s) * H`` elements per peer beats two of ``s *
H`` (measured in benchmarks/results/NOTES.md). ``out`` may be the input (``SPREAD`` off): rows are
then pushed whole, each by the block that overwrites it later, instead of in chunks spread over all
blocks.
"""

import triton
import triton.language as tl

from .barrier import barrier, call_end, call_seq, give_up, own_pad
from .common import (copy_shards, ll_push_chunks, ll_push_to, ll_reduce_chunk, rms_normed,
                     row_operands)
from .ll import ll_flag, ll_get, ll_slot
from .ptx import as_i64, as_ptr, load_reduce, pdl_wait, peer_addr, store_all, words_to_elems


@triton.jit
def _fused_rmsnorm_kernel(in_addr, out_addr, res_addr, w_addr, buf_table, sig_table, mc_addr,
                          err_addr, seq_cap, region_off, s, H, eps, timeout_ns,
                          DTYPE: tl.constexpr,
                          W_DTYPE: tl.constexpr, RANK: tl.constexpr, WORLD_SIZE: tl.constexpr,
                          WORLD_P2: tl.constexpr, BLOCK_H: tl.constexpr, STAGE_IN: tl.constexpr,
                          ALL_GATHER: tl.constexpr, COPY_OUT: tl.constexpr,
                          USE_MULTIMEM: tl.constexpr, SCOPE: tl.constexpr, USE_PTX: tl.constexpr,
                          ALIGNED: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)  # before any memory access
    ESIZE: tl.constexpr = DTYPE.primitive_bitwidth // 8
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    local = peer_addr(buf_table, RANK) + region_off
    seq = call_seq(sig_table, pid, RANK, WORLD_SIZE)
    if STAGE_IN:
        copy_shards(in_addr, local, s * H, H, s, pid, nprog, 0, DTYPE, BLOCK_H, WORLD_SIZE,
                    ALIGNED)
    bad = barrier(sig_table, pid, seq, 0, err_addr, timeout_ns, seq_cap, 0, RANK, WORLD_SIZE,
                  WORLD_P2, SCOPE, USE_PTX, True, True)
    cols, mask, res, out, w = row_operands(res_addr, out_addr, w_addr, H, DTYPE, W_DTYPE, BLOCK_H,
                                           ALIGNED)
    i = tl.where(bad != 0, s, pid)
    while i < s:
        row_off = region_off + (RANK * s + i).to(tl.int64) * H * ESIZE
        acc = load_reduce(mc_addr, buf_table, row_off, 0, H, BLOCK_H, DTYPE, WORLD_SIZE,
                          USE_MULTIMEM, ALIGNED)
        r_ptr = res + i.to(tl.int64) * H + cols
        x = (acc + tl.load(r_ptr, mask=mask, other=0.0).to(tl.float32)).to(DTYPE)
        tl.store(r_ptr, x, mask=mask)
        y = rms_normed(x, mask, w, H, eps)
        if ALL_GATHER:
            store_all(mc_addr, buf_table, row_off, 0, H, y, BLOCK_H, DTYPE, RANK, WORLD_SIZE,
                      USE_MULTIMEM, ALIGNED)
        else:
            tl.store(out + i.to(tl.int64) * H + cols, y, mask=mask)
        i += nprog
    bad = barrier(sig_table, pid, seq, bad, err_addr, timeout_ns, seq_cap, 1, RANK, WORLD_SIZE,
                  WORLD_P2, SCOPE, USE_PTX, ALL_GATHER, ALL_GATHER)
    if COPY_OUT:
        copy_shards(local, out_addr, s * H, H, s, pid, nprog, bad, DTYPE, BLOCK_H, WORLD_SIZE,
                    ALIGNED)
    call_end(sig_table, pid, seq, seq_cap, RANK, WORLD_SIZE)


@triton.jit
def _fused_rmsnorm_ll_kernel(in_addr, out_addr, res_addr, w_addr, buf_table, sig_table, err_addr,
                             seq_cap, ll_off, slot_words, s, H, eps, timeout_ns,
                             DTYPE: tl.constexpr, W_DTYPE: tl.constexpr, RANK: tl.constexpr,
                             WORLD_SIZE: tl.constexpr, WORLD_P2: tl.constexpr,
                             BLOCK_H: tl.constexpr, CHUNK: tl.constexpr,
                             SPREAD: tl.constexpr, ALL_GATHER: tl.constexpr, SCOPE: tl.constexpr,
                             USE_PTX: tl.constexpr, ALIGNED: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)  # before any memory access
    EPW: tl.constexpr = 32 // DTYPE.primitive_bitwidth  # elements per 32-bit word
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    seq = call_seq(sig_table, pid, RANK, WORLD_SIZE)
    flag = ll_flag(seq)
    src = as_ptr(in_addr, DTYPE, ALIGNED)
    S = WORLD_SIZE * as_i64(s)
    cols, mask, res, out, w = row_operands(res_addr, out_addr, w_addr, H, DTYPE, W_DTYPE, BLOCK_H,
                                           ALIGNED)
    if ALL_GATHER:  # 1. every input row, and this rank's residual rows, to every peer
        if SPREAD:
            ll_push_chunks(src, buf_table, -1, ll_off, S * H, pid, nprog, seq, slot_words, DTYPE,
                           CHUNK, RANK, WORLD_SIZE)
        else:  # ``out`` is the input: row r by the block that overwrites it in phase 2
            r = pid
            while r < S:  # see ptx.py on loops
                ll_push_to(src, buf_table, -1, ll_off, as_i64(r) * H, as_i64(r + 1) * H, seq,
                           slot_words, DTYPE, BLOCK_H, RANK, WORLD_SIZE)
                r += nprog
        # residual row i by the block that updates it in phase 2 (row RANK*s + i, block
        # (RANK*s + i) % nprog), so the peers get it before the update
        i = (pid + nprog - (RANK * s) % nprog) % nprog
        while i < s:
            ll_push_to(res - S * H, buf_table, -1, ll_off, (S + i) * H, (S + i + 1) * H, seq,
                       slot_words, DTYPE, BLOCK_H, RANK, WORLD_SIZE)
            i += nprog
    else:  # 1. rows q*s + i to rank q
        for k in tl.static_range(1, WORLD_SIZE):
            q = (RANK + k) % WORLD_SIZE
            if SPREAD:
                ll_push_chunks(src + q * as_i64(s) * H, buf_table, q, ll_off, as_i64(s) * H, pid,
                               nprog, seq, slot_words, DTYPE, CHUNK, RANK, WORLD_SIZE)
            else:  # ``out`` is the input: row i by the block that overwrites it in phase 2
                i = pid
                while i < s:
                    ll_push_to(src + q * as_i64(s) * H, buf_table, q, ll_off, as_i64(i) * H,
                               as_i64(i + 1) * H, seq, slot_words, DTYPE, BLOCK_H, RANK,
                               WORLD_SIZE)
                    i += nprog
    area = peer_addr(buf_table, RANK) + ll_off
    pad = own_pad(sig_table, RANK)
    status = tl.full([], 0, tl.int32)
    if ALL_GATHER:  # 2. every row, the same bits on every rank
        r = pid
        while (r < S) & (status == 0):
            q = r // s
            i = r - q * s
            start = as_i64(r) * H
            acc, status = ll_reduce_chunk(src, area, start, start + H, seq, flag, slot_words,
                                          status, timeout_ns, pad, DTYPE, BLOCK_H, RANK,
                                          WORLD_SIZE, USE_PTX, ALIGNED)
            if q == RANK:
                r0 = tl.load(res + as_i64(i) * H + cols, mask=mask, other=0.0).to(tl.float32)
            else:
                first = (S + i) * (H // EPW)
                words, st = ll_get(ll_slot(area, seq, q, slot_words, WORLD_SIZE), first,
                                   first + H // EPW, flag, q, status, timeout_ns, pad,
                                   BLOCK_H // EPW, USE_PTX, ALIGNED)
                status = status | st
                r0 = words_to_elems(words, DTYPE).to(tl.float32)
            x = (acc + r0).to(DTYPE)
            if q == RANK:
                tl.store(res + as_i64(i) * H + cols, x, mask=mask)
            tl.store(out + start + cols, rms_normed(x, mask, w, H, eps), mask=mask)
            r += nprog
    else:  # 2. this rank's rows
        own = src + RANK * as_i64(s) * H
        i = pid
        while (i < s) & (status == 0):
            start = as_i64(i) * H
            acc, status = ll_reduce_chunk(own, area, start, start + H, seq, flag, slot_words,
                                          status, timeout_ns, pad, DTYPE, BLOCK_H, RANK,
                                          WORLD_SIZE, USE_PTX, ALIGNED)
            x = (acc + tl.load(res + start + cols, mask=mask, other=0.0).to(tl.float32)).to(DTYPE)
            tl.store(res + start + cols, x, mask=mask)
            tl.store(out + start + cols, rms_normed(x, mask, w, H, eps), mask=mask)
            i += nprog
    give_up(sig_table, seq, status, err_addr, seq_cap, RANK, WORLD_SIZE, WORLD_P2, SCOPE)
    call_end(sig_table, pid, seq, seq_cap, RANK, WORLD_SIZE)
