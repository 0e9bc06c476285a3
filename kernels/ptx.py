"""PTX helpers and their pure-``tl`` twins.

Every helper that emits inline PTX takes a constexpr that selects it; the twin is what runs in
the Triton interpreter (``TRITON_INTERPRET=1``, the ``host`` backend) and on hardware without
multicast. A multimem helper and its twin return the same values in the same element order, so
a kernel compiled with ``USE_MULTIMEM=False`` is the multimem kernel with the twins swapped in.

Addresses arrive as int64 and become typed pointers through :func:`as_ptr`; no symmetric
tensor is ever a kernel argument (the interpreter would copy its whole storage back after the
launch, racing with peers that write into it).

Loops over chunks are ``while`` loops: the interpreter turns a ``range`` bound into a Python int
through ``int(1-element array)``, which NumPy >= 2.4 rejects; a ``while`` condition it reads with
``bool()``, which works.

``multimem`` instructions are never predicated (ptxas rejects ``@p multimem``): a masked lane
branches around the instruction inside a ``{ }`` scope, whose label is local to that scope.

Programmatic dependent launch (PDL, sm_90+): every kernel entry point (``_<op>_kernel``) takes a
``PDL`` constexpr and calls :func:`pdl_wait` first (its first statement is
``barrier.call_begin``, whose first statement is the wait), before any memory access of any
kind (inputs, pointer tables, the signal pad and its call counters, the line area). The host
sets ``PDL`` together with the ``launch_pdl`` launch option (``symmtriton/launch.py``).
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """With ``PDL``: ``griddepcontrol.wait`` (Triton's ``gdc_wait``, inline PTX, so never in the
    interpreter, where the host never sets ``PDL``). A kernel launched with PDL may start while
    the previous grid on its stream is still finishing; this wait returns once that grid has
    completed and its memory operations are visible. So a kernel that waits before its first
    memory access sees exactly what it would without PDL: stream order is kept, and every
    protocol argument that rests on "the stream began call ``seq + 1`` after call ``seq``
    completed" (kernels/barrier.py, kernels/lines.py) still holds; only the launch latency and the
    block set-up before the wait overlap the previous grid's tail.

    No kernel calls ``griddepcontrol.launch_dependents``: the next grid then launches only once
    every block of this one has exited (then the wait above is short). An early trigger was
    measured to cost: a replayed CUDA graph of 200 dependent launches of a tiny copy kernel on
    one H200, us per launch without PDL / with this wait / with the wait and an early trigger:
    grid 1 0.99 / 0.72 / 0.72, grid 16 1.23 / 0.80 / 0.89, grid 132 1.46 / 0.94 / 1.32."""
    if PDL:
        gdc_wait()


@triton.jit
def as_ptr(addr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The int64 address ``addr`` as a pointer to ``DTYPE``; ``ALIGNED`` promises 16 bytes."""
    ptr = addr.to(tl.pointer_type(DTYPE))
    if ALIGNED:  # on the pointer: a hint on the int64 does not survive the cast
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def as_i64(x):
    """``x`` as an int64 tensor; also for a runtime int Triton specialized to the constant 1."""
    return x + tl.zeros([], dtype=tl.int64)


@triton.jit
def peer_addr(table_addr, rank):
    """Base address of ``rank``'s buffer, read from the int64 table at ``table_addr``."""
    return tl.load(table_addr.to(tl.pointer_type(tl.int64)) + rank)


@triton.jit
def clock_ns(clock_addr, USE_PTX: tl.constexpr):
    """Nanoseconds on a global clock: ``%globaltimer``. The twin reads the int64 at
    ``clock_addr``, which the host backend keeps current from a thread of this process
    (``time.monotonic_ns``, about every millisecond)."""
    if USE_PTX:
        t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64,
                                      is_pure=False, pack=1)
    else:
        t = tl.load(clock_addr.to(tl.pointer_type(tl.int64)), volatile=True)
    return t


# ---------------------------------------------------------------------------------------------
# Barrier signals (kernels/barrier.py owns the protocol; these move the values).
# ---------------------------------------------------------------------------------------------
#: misses between two clock reads in a wait. Measured on 2x H100 (variants b vs d of
#: benchmarks/results/archive/2026-11-25_922ac1d/barrier_probe_h100x2.txt): reading
#: ``%globaltimer`` every 64 misses costs nothing measurable once the error word is in device
#: memory; the old 0.3-1.3 ms stalls came from loading the error word from pinned host memory
#: (variants a, c).
CLOCK_EVERY = tl.constexpr(64)


@triton.jit
def deadline_tick(misses, deadline_ns, timeout_ns, err_word, clock_addr, USE_PTX: tl.constexpr):
    """One miss of a wait loop with a bound: every ``CLOCK_EVERY`` misses (never on the fast path)
    read the clock; the first read starts the deadline ``timeout_ns`` ahead, at once expired
    when the int32 ``err_word`` (device memory) is set (a wait after an error gives up at its
    first clock read). Returns ``(deadline_ns, expired)``; never expires with
    ``timeout_ns == 0``."""
    expired = 0
    if (timeout_ns > 0) & (misses % CLOCK_EVERY == 0):
        now = clock_ns(clock_addr, USE_PTX)
        if deadline_ns == 0:
            deadline_ns = now + timeout_ns
            if tl.load(err_word.to(tl.pointer_type(tl.int32)), volatile=True) != 0:
                deadline_ns = now
        expired = (now >= deadline_ns).to(tl.int32)
    return deadline_ns, expired


@triton.jit
def signal_put(dsts, valid, value, SCOPE: tl.constexpr, RELEASE: tl.constexpr):
    """Store ``value`` (int32) at the lanes' pointers ``dsts`` where ``valid``, *release* or
    relaxed at ``SCOPE``. A caller that publishes its block's writes runs ``bar.sync``
    (``tl.debug_barrier``) first, which makes them part of the release."""
    if RELEASE:
        tl.atomic_xchg(dsts, value, mask=valid, sem="release", scope=SCOPE)
    else:
        tl.atomic_xchg(dsts, value, mask=valid, sem="relaxed", scope=SCOPE)


@triton.jit
def wait_slots(slots, valid, value, ahead, err_word, timeout_ns, clock_addr,
               WORLD_P2: tl.constexpr, SCOPE: tl.constexpr, ACQUIRE: tl.constexpr,
               MISMATCH_BIT: tl.constexpr, USE_PTX: tl.constexpr):
    """Wait until the int32 at each lane's pointer ``slots`` (``WORLD_P2`` lanes, one per rank;
    lanes not ``valid`` are skipped) holds a value ``>= value`` (signed difference), *acquire*
    or relaxed, at ``SCOPE``. Returns, the same in every thread, a bit mask: lane ``r``'s bit for
    a slot still short at the deadline (``timeout_ns`` > 0; the clock, ``clock_ns``, is read
    every ``CLOCK_EVERY`` misses; the first read starts the deadline, at once expired if the
    int32 at ``err_word``, device memory, is set), or for a slot ``>= ahead``, then with
    ``MISMATCH_BIT``. 0: every slot reached ``value``, none ``ahead``.

    The whole block runs the loop, one lane per rank (a single polling thread in one inline-PTX
    loop measured slower on 2x H100: 9.1 vs 6.9 us per 4 KiB all-gather in a graph, variants
    e/f vs b of the probe); the loop's reductions and the closing ``bar.sync`` hand what the
    acquire saw to every thread. The same code runs in the interpreter (``USE_PTX`` only picks
    the clock)."""
    lanes = tl.arange(0, WORLD_P2)
    got = ~valid
    seen = tl.zeros([WORLD_P2], tl.int32)
    deadline_ns = tl.full([], 0, tl.int64)
    misses = 0
    expired = 0
    while (tl.min(got.to(tl.int32), axis=0) == 0) & (expired == 0):
        if ACQUIRE:
            v = tl.atomic_add(slots, 0, mask=~got, sem="acquire", scope=SCOPE)
        else:
            v = tl.atomic_add(slots, 0, mask=~got, sem="relaxed", scope=SCOPE)
        new = ((v - value) >= 0) & ~got
        seen = tl.where(new, v, seen)
        got = got | new
        misses += 1
        deadline_ns, expired = deadline_tick(misses, deadline_ns, timeout_ns, err_word, clock_addr,
                                             USE_PTX)
    early = valid & got & ((seen - ahead) >= 0)
    bits = tl.sum(tl.where((valid & ~got) | early, 1 << lanes, 0), axis=0)
    status = bits | tl.where(tl.sum(early.to(tl.int32), axis=0) > 0, MISMATCH_BIT, 0)
    tl.debug_barrier()
    return status


@triton.jit
def signal_wait(table_addr, slot_off, own_slots, value, ahead, err_word, timeout_ns, clock_addr,
                WORLD_SIZE: tl.constexpr, WORLD_P2: tl.constexpr, SCOPE: tl.constexpr,
                RELEASE: tl.constexpr, ACQUIRE: tl.constexpr, MISMATCH_BIT: tl.constexpr,
                USE_PTX: tl.constexpr):
    """Store ``value`` (int32) at byte ``slot_off`` of every rank's pad (``table_addr``: int64
    pad addresses; :func:`signal_put`), then wait until each of the ``WORLD_SIZE`` int32 slots
    at ``own_slots`` holds a value ``>= value`` (:func:`wait_slots`, which says what the
    returned bit mask holds)."""
    lanes = tl.arange(0, WORLD_P2)
    valid = lanes < WORLD_SIZE
    peers = tl.minimum(lanes, WORLD_SIZE - 1)
    table = table_addr.to(tl.pointer_type(tl.int64))
    signal_put((tl.load(table + peers) + slot_off).to(tl.pointer_type(tl.int32)), valid, value,
               SCOPE, RELEASE)
    return wait_slots(own_slots.to(tl.pointer_type(tl.int32)) + peers, valid, value, ahead,
                      err_word, timeout_ns, clock_addr, WORLD_P2, SCOPE, ACQUIRE, MISMATCH_BIT,
                      USE_PTX)


# ---------------------------------------------------------------------------------------------
# 16-byte vectors <-> elements. A vector is 4 x 32-bit words; words hold 1 fp32 or 2 16-bit
# values, low half first (little endian), so the element order is the memory order.
# ---------------------------------------------------------------------------------------------
@triton.jit
def words_to_elems(words, DTYPE: tl.constexpr):
    """[NW] 32-bit words -> [NW * 4 / sizeof(DTYPE)] values of DTYPE (8, 16 or 32 bits), in
    memory order (low bytes first)."""
    NW: tl.constexpr = words.shape[0]
    if DTYPE.primitive_bitwidth == 32:
        vals = words.to(DTYPE, bitcast=True)
    else:
        lo = (words & 0xFFFF).to(tl.uint16)
        hi = ((words >> 16) & 0xFFFF).to(tl.uint16)
        halves = tl.reshape(tl.join(lo, hi), [NW * 2])
        if DTYPE.primitive_bitwidth == 16:
            vals = halves.to(DTYPE, bitcast=True)
        else:
            b0 = (halves & 0xFF).to(tl.uint8)
            b1 = ((halves >> 8) & 0xFF).to(tl.uint8)
            vals = tl.reshape(tl.join(b0, b1), [NW * 4]).to(DTYPE, bitcast=True)
    return vals


@triton.jit
def elems_to_words(vals, DTYPE: tl.constexpr):
    """Inverse of :func:`words_to_elems`: values of DTYPE -> uint32 words, in memory order."""
    if DTYPE.primitive_bitwidth == 32:
        words = vals.to(tl.uint32, bitcast=True)
    else:
        NE: tl.constexpr = vals.shape[0]
        if DTYPE.primitive_bitwidth == 16:
            halves = vals.to(tl.uint16, bitcast=True)
        else:
            b0, b1 = tl.split(tl.reshape(vals.to(tl.uint8, bitcast=True), [NE // 2, 2]))
            halves = b0.to(tl.uint16) | (b1.to(tl.uint16) << 8)
        lo, hi = tl.split(tl.reshape(halves, [halves.shape[0] // 2, 2]))
        words = lo.to(tl.uint32) | (hi.to(tl.uint32) << 16)
    return words


@triton.jit
def _words_to_elems(w0, w1, w2, w3, DTYPE: tl.constexpr):
    """Four [NV] uint32 word tensors (word ``i`` of each 16-byte vector) -> the vectors' values
    of DTYPE in memory order."""
    NV: tl.constexpr = w0.shape[0]
    return words_to_elems(tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [NV * 4]), DTYPE)


@triton.jit
def _elems_to_words(vals, NV: tl.constexpr, DTYPE: tl.constexpr):
    """Inverse of :func:`_words_to_elems`: values of DTYPE -> four [NV] uint32 word tensors."""
    x = tl.reshape(elems_to_words(vals, DTYPE), [NV, 2, 2])  # [v, i, j] = word 2i + j
    even, odd = tl.split(x)  # j = 0 / 1, indexed by i
    w0, w2 = tl.split(even)
    w1, w3 = tl.split(odd)
    return w0, w1, w2, w3


@triton.jit
def _multimem_ld_reduce_v4(vec_addrs, mask, DTYPE: tl.constexpr):
    """``multimem.ld_reduce`` (sum, fp32 accumulation for 16-bit types) of one 16-byte vector per
    lane at multicast addresses ``vec_addrs``; masked lanes skip the instruction."""
    pred = mask.to(tl.int32)
    if DTYPE == tl.bfloat16:
        w0, w1, w2, w3 = tl.inline_asm_elementwise(
            """{ .reg .pred p; setp.ne.s32 p, $5, 0; @!p bra skip;
            multimem.ld_reduce.relaxed.sys.global.add.acc::f32.v4.bf16x2 {$0, $1, $2, $3}, [$4];
            skip: }""", "=r,=r,=r,=r,l,r", [vec_addrs, pred],
            dtype=(tl.uint32, tl.uint32, tl.uint32, tl.uint32), is_pure=False, pack=1)
    elif DTYPE == tl.float16:
        w0, w1, w2, w3 = tl.inline_asm_elementwise(
            """{ .reg .pred p; setp.ne.s32 p, $5, 0; @!p bra skip;
            multimem.ld_reduce.relaxed.sys.global.add.acc::f32.v4.f16x2 {$0, $1, $2, $3}, [$4];
            skip: }""", "=r,=r,=r,=r,l,r", [vec_addrs, pred],
            dtype=(tl.uint32, tl.uint32, tl.uint32, tl.uint32), is_pure=False, pack=1)
    else:
        tl.static_assert(DTYPE == tl.float32, "multimem reductions support bf16, fp16 and fp32")
        w0, w1, w2, w3 = tl.inline_asm_elementwise(
            """{ .reg .pred p; setp.ne.s32 p, $5, 0; @!p bra skip;
            multimem.ld_reduce.relaxed.sys.global.add.v4.f32 {$0, $1, $2, $3}, [$4];
            skip: }""", "=r,=r,=r,=r,l,r", [vec_addrs, pred],
            dtype=(tl.uint32, tl.uint32, tl.uint32, tl.uint32), is_pure=False, pack=1)
    return w0, w1, w2, w3


@triton.jit
def _multimem_st_v4(vec_addrs, mask, w0, w1, w2, w3):
    """``multimem.st`` of one 16-byte vector per lane to every rank; masked lanes skip it."""
    tl.inline_asm_elementwise(
        """{ .reg .pred p; setp.ne.s32 p, $6, 0; @!p bra skip;
        multimem.st.relaxed.sys.global.v4.f32 [$1], {$2, $3, $4, $5};
        skip: }
        mov.u32 $0, 0;""", "=r,l,r,r,r,r,r",
        [vec_addrs, w0, w1, w2, w3, mask.to(tl.int32)], dtype=tl.uint32, is_pure=False, pack=1)


# ---------------------------------------------------------------------------------------------
# Element-level helpers used by the kernels: the multimem instruction or its peer-pointer twin.
# ``start`` is the first element of a BLOCK-element chunk, ``n`` the elements in the region,
# ``byte_off`` the region's byte offset inside every rank's buffer.
# ---------------------------------------------------------------------------------------------
@triton.jit
def load_reduce(mc_addr, buf_table, byte_off, start, n, BLOCK: tl.constexpr, DTYPE: tl.constexpr,
                WORLD_SIZE: tl.constexpr, USE_MULTIMEM: tl.constexpr, ALIGNED: tl.constexpr):
    """Sum over ranks of elements ``[start, start + BLOCK)`` of the region, in fp32 (masked
    lanes are 0). Multimem: one ``ld_reduce`` per 16 bytes. Twin: load from every peer."""
    if USE_MULTIMEM:
        VEC: tl.constexpr = 128 // DTYPE.primitive_bitwidth  # elements per 16 bytes
        NV: tl.constexpr = BLOCK // VEC
        vecs = start // VEC + tl.arange(0, NV)
        vec_addrs = (mc_addr + byte_off + vecs.to(tl.int64) * 16).to(tl.pointer_type(tl.uint64))
        w0, w1, w2, w3 = _multimem_ld_reduce_v4(vec_addrs, vecs < n // VEC, DTYPE)
        offs = start + tl.arange(0, BLOCK)
        acc = tl.where(offs < n, _words_to_elems(w0, w1, w2, w3, DTYPE).to(tl.float32), 0.0)
    else:
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for r in tl.static_range(WORLD_SIZE):
            src = as_ptr(peer_addr(buf_table, r) + byte_off, DTYPE, ALIGNED)
            acc += tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
    return acc


@triton.jit
def store_all(mc_addr, buf_table, byte_off, start, n, vals, BLOCK: tl.constexpr,
              DTYPE: tl.constexpr, RANK: tl.constexpr, WORLD_SIZE: tl.constexpr,
              USE_MULTIMEM: tl.constexpr, ALIGNED: tl.constexpr):
    """Store ``vals`` (BLOCK elements of DTYPE) at ``[start, start + BLOCK)`` of the region on
    every rank. Multimem: one ``multimem.st`` per 16 bytes. Twin: a store to every peer."""
    if USE_MULTIMEM:
        VEC: tl.constexpr = 128 // DTYPE.primitive_bitwidth  # elements per 16 bytes
        NV: tl.constexpr = BLOCK // VEC
        vecs = start // VEC + tl.arange(0, NV)
        vec_addrs = (mc_addr + byte_off + vecs.to(tl.int64) * 16).to(tl.pointer_type(tl.uint64))
        w0, w1, w2, w3 = _elems_to_words(vals, NV, DTYPE)
        _multimem_st_v4(vec_addrs, vecs < n // VEC, w0, w1, w2, w3)
    else:
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        for r in tl.static_range(WORLD_SIZE):
            # Start with the next rank so the ranks do not all write to rank 0 at once.
            peer = (RANK + 1 + r) % WORLD_SIZE
            dst = as_ptr(peer_addr(buf_table, peer) + byte_off, DTYPE, ALIGNED)
            tl.store(dst + offs, vals, mask=mask)
