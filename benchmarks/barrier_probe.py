"""Barrier probe: what the barrier's timeout and its wait loop cost, variant by variant.

One torchrun times all-gather (push, zero-copy) and reduce-scatter (pull, zero-copy, bf16) at
a few sizes, eager (200 calls, each between two CUDA events) and in a CUDA graph (10 ops per
graph, 20 replays = 200 ops), under barrier variants (``--variants``; the default omits c, bc,
a0, a8k, e0 and f, measured in
benchmarks/results/archive/2026-11-25_922ac1d/barrier_probe_h100x2.txt):

  lib_on / lib_off  the library ops as of the commit run, default timeout (300 s) /
                    ``timeout_s=0`` (last, so a hang there loses only these rows)
  a    the barrier as of commit e4ca5a5 (counter slots; whole-block loop, %globaltimer every 64
       misses, then one load of the error word in pinned host memory), timeout on
  a0   today's barrier, timeout 0 (the runtime check skips the clock)
  b    today's barrier, timeout on, error word in device memory (no PCIe read)
  c    today's loop, poll budget instead of %globaltimer, error word in host memory
  bc   poll budget and device error word (no clock read, no PCIe read)
  d    today's loop with the timeout compiled out (constexpr)
  a8k  today's loop, %globaltimer read every 8192 misses instead of 64
  e    epoch flags, thread 0 of each block arrives (st.release.sys) and polls (ld.acquire.sys)
       in one inline-PTX loop, %globaltimer every 8192 polls; bar.sync around it
  e0   as e, timeout compiled out
  f    as e, relaxed arrive after fence.acq_rel.sys, ld.relaxed polling, one fence after
  g    epoch flags, pure-tl whole-block loop (the interpreter twin), poll budget
  n    the library's barrier as of the commit run (kernels/barrier.py: call-sequence values,
       whole-block loop, device error word, clock every 64 misses), timeout 300 s
  n0   the same, timeout 0

Epoch variants (e, e0, f, g) keep flags in the tail of the symmetric buffer and per-block epochs
in a local device array; they never reset anything, and use ``--timeout`` (default 5 s: the fast
path does not depend on its value, and a broken variant ends instead of hanging); a-a8k use
300 s like the library. Every variant launches through the library's launch path (a Plan), so
eager numbers compare like for like; a watchdog ends the run after 175 s (partial table).

Run (2 GPUs, one rank per GPU, NCCL group; also works with several ranks on one GPU):

    TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 \\
        python -m torch.distributed.run --nproc-per-node 2 benchmarks/barrier_probe.py

Prints two tables last (rank 0's numbers): median us per op, and ``max/median`` with the count
of ops above 2x the median; ``ERR`` where a variant's results were wrong or it timed out.
"""

import argparse
import os
import statistics
import threading

import torch
import torch.distributed as dist
import triton
import triton.language as tl

import symmtriton as st
from symmtriton import _launch as L
from symmtriton.kernels.barrier import barrier as lib_barrier
from symmtriton.kernels.barrier import call_end, call_seq
from symmtriton.kernels.ptx import clock_ns
from symmtriton.testing import teardown
from symmtriton.tuning import lookup_config

VARIANTS = {"a": 0, "a0": 0, "b": 0, "c": 1, "bc": 1, "d": 2, "a8k": 3, "e": 4, "e0": 5,
            "f": 6, "g": 7, "n": 8, "n0": 8}
EPOCH_VARIANTS = (4, 5, 6, 7)
SYNC_BYTES = 1 << 20  # flags at the end of the buffer: counter slots, then epoch slots
EPOCH_OFF = tl.constexpr(1 << 19)  # epoch slots' offset in it


@triton.jit
def _cwait(addrs, todo, err, timeout_ns, clock_addr, SCOPE: tl.constexpr, CLOCK: tl.constexpr,
           EVERY: tl.constexpr, TIMEOUT: tl.constexpr):
    """kernels/barrier.py's wait loop with knobs: CLOCK=False counts polls instead."""
    got = ~todo
    deadline_ns = tl.full([], 0, tl.int64)
    misses = tl.full([], 0, tl.int64)
    expired = 0
    while (tl.min(got.to(tl.int32), axis=0) == 0) & (expired == 0):
        old = tl.atomic_add(addrs, 0, mask=~got, sem="acquire", scope=SCOPE)
        got = got | ((old >= 1) & ~got)
        misses += 1
        if TIMEOUT:
            if (timeout_ns > 0) & (misses % EVERY == 0):
                if CLOCK:
                    now = clock_ns(clock_addr, True)
                else:
                    now = misses * 100  # a poll budget: ~100 ns per poll assumed
                if deadline_ns == 0:
                    deadline_ns = now + timeout_ns
                    if tl.load(err, volatile=True) != 0:
                        deadline_ns = now
                expired = (now >= deadline_ns).to(tl.int32)
    return got


@triton.jit
def _cbarrier(buf_table, sync_off, block_id, err, timeout_ns, RANK: tl.constexpr,
              W: tl.constexpr, WP2: tl.constexpr, SCOPE: tl.constexpr, CLOCK: tl.constexpr,
              EVERY: tl.constexpr, TIMEOUT: tl.constexpr):
    """The barrier of kernels/barrier.py before this probe (counter slots: +1 release, wait
    >= 1 acquire by the whole block, -1 relaxed), slots in the buffer's tail, with knobs."""
    tl.debug_barrier()
    lanes = tl.arange(0, WP2)
    valid = lanes < W
    peers = tl.minimum(lanes, W - 1)
    table = buf_table.to(tl.pointer_type(tl.int64))
    pads = (tl.load(table + peers) + sync_off).to(tl.pointer_type(tl.int32))
    own = (tl.load(table + RANK) + sync_off).to(tl.pointer_type(tl.int32))
    slot = 2 + block_id * W
    tl.atomic_add(pads + slot + RANK, 1, mask=valid, sem="release", scope=SCOPE)
    mine = own + slot + peers
    got = _cwait(mine, valid, err, timeout_ns, own, SCOPE, CLOCK, EVERY, TIMEOUT)
    tl.atomic_add(mine, -1, mask=valid & got, sem="relaxed", scope=SCOPE)
    missing = tl.sum(tl.where(valid & ~got, 1 << lanes, 0), axis=0)
    if missing != 0:
        tl.store(err, missing)
    tl.debug_barrier()


def _ptx_loop(arrive: str, poll: str, after: str, timeout: bool) -> str:
    """Thread 0: store the epoch ($2) into slot $7 of every peer's flag area (table $6, W = $3),
    then poll its own W slots from $1 until each is >= the epoch; %globaltimer every 8192 polls
    when ``timeout`` ($4 ns; on expiry 1 goes to the error word $5)."""
    check = """
        and.b32 q, n, 8191; setp.ne.u32 p, q, 0; @p bra POLL;
        mov.u64 t, %globaltimer; setp.eq.u64 p, dl, 0; @p add.u64 dl, t, $4;
        setp.lt.u64 p, t, dl; @p bra POLL;
        mov.u32 $0, 1; st.global.u32 [$5], 1; bra DONE;""" if timeout else "bra POLL;"
    return f"""{{ .reg .pred p; .reg .u32 q, r, n; .reg .s32 v, d; .reg .u64 a, b, t, dl;
        mov.u32 $0, 0; mov.u32 q, %tid.x; setp.ne.u32 p, q, 0; @p bra DONE;
        {arrive.split('|')[0]}
        mov.u32 r, 0;
        SEND: setp.ge.u32 p, r, $3; @p bra SENT;
        mul.wide.u32 b, r, 8; add.u64 b, b, $6; ld.global.u64 b, [b]; add.u64 b, b, $7;
        {arrive.split('|')[1]} [b], $2;
        add.u32 r, r, 1; bra SEND;
        SENT: mov.u32 r, 0; mov.u32 n, 0; mov.u64 dl, 0; mov.u64 a, $1;
        PEER: setp.ge.u32 p, r, $3; @p bra WAITED;
        POLL: {poll} v, [a]; sub.s32 d, v, $2; setp.ge.s32 p, d, 0; @p bra NEXT;
        add.u32 n, n, 1; {check}
        NEXT: add.u64 a, a, 4; add.u32 r, r, 1; bra PEER;
        WAITED: {after}
        DONE: }}"""


_PTX_E = tl.constexpr(_ptx_loop("|st.release.sys.global.u32", "ld.acquire.sys.global.u32", "",
                                True))
_PTX_E0 = tl.constexpr(_ptx_loop("|st.release.sys.global.u32", "ld.acquire.sys.global.u32", "",
                                 False))
_PTX_F = tl.constexpr(_ptx_loop("fence.acq_rel.sys;|st.relaxed.sys.global.u32",
                                "ld.relaxed.sys.global.u32", "fence.acq_rel.sys;", True))


@triton.jit
def _thread0(ASM: tl.constexpr, own, e, W: tl.constexpr, timeout_ns, err_addr, buf_table, mine):
    one = tl.full([1], 0, tl.int64)
    tl.inline_asm_elementwise(ASM, "=r,l,r,r,l,l,l,l",
                              [one + own, e + tl.zeros([1], tl.int32), W + tl.zeros([1], tl.int32),
                               one + timeout_ns, one + err_addr, one + buf_table, one + mine],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _ebarrier(buf_table, sync_off, pid, e, err_addr, timeout_ns, RANK: tl.constexpr,
              W: tl.constexpr, WP2: tl.constexpr, SCOPE: tl.constexpr, V: tl.constexpr):
    """Epoch barrier: slot ``[pid * W + r]`` of a rank's flag area holds the last epoch rank
    ``r``'s block ``pid`` reached; wait until every slot is >= ``e``."""
    tl.debug_barrier()
    table = buf_table.to(tl.pointer_type(tl.int64))
    own = tl.load(table + RANK) + sync_off + (pid * W).to(tl.int64) * 4
    mine = (RANK + pid * W).to(tl.int64) * 4 + sync_off
    if V == 7:
        lanes = tl.arange(0, WP2)
        valid = lanes < W
        peers = tl.minimum(lanes, W - 1)
        dst = (tl.load(table + peers) + mine).to(tl.pointer_type(tl.int32))
        tl.atomic_xchg(dst, e, mask=valid, sem="release", scope=SCOPE)
        slots = own.to(tl.pointer_type(tl.int32)) + peers
        got = ~valid
        polls = tl.full([], 0, tl.int64)
        while (tl.min(got.to(tl.int32), axis=0) == 0) & (polls < timeout_ns // 100):
            v = tl.atomic_add(slots, 0, mask=~got, sem="acquire", scope=SCOPE)
            got = got | ((v - e) >= 0)
            polls += 1
        if tl.min(got.to(tl.int32), axis=0) == 0:
            tl.store(err_addr.to(tl.pointer_type(tl.int32)), 1)
    else:
        if V == 4:
            _thread0(_PTX_E, own, e, W, timeout_ns, err_addr, buf_table, mine)
        elif V == 5:
            _thread0(_PTX_E0, own, e, W, timeout_ns, err_addr, buf_table, mine)
        else:
            _thread0(_PTX_F, own, e, W, timeout_ns, err_addr, buf_table, mine)
    tl.debug_barrier()


@triton.jit
def _bar(sig_table, buf_table, sync_off, pid, e, err_addr, timeout_ns, RANK: tl.constexpr,
         W: tl.constexpr, WP2: tl.constexpr, SCOPE: tl.constexpr, V: tl.constexpr):
    err = err_addr.to(tl.pointer_type(tl.int32))
    if V == 0:
        _cbarrier(buf_table, sync_off, pid, err, timeout_ns, RANK, W, WP2, SCOPE, True, 64, True)
    elif V == 1:
        _cbarrier(buf_table, sync_off, pid, err, timeout_ns, RANK, W, WP2, SCOPE, False, 64, True)
    elif V == 2:
        _cbarrier(buf_table, sync_off, pid, err, timeout_ns, RANK, W, WP2, SCOPE, True, 64, False)
    elif V == 3:
        _cbarrier(buf_table, sync_off, pid, err, timeout_ns, RANK, W, WP2, SCOPE, True, 8192,
                  True)
    else:
        _ebarrier(buf_table, sync_off + EPOCH_OFF, pid, e, err_addr, timeout_ns, RANK, W, WP2,
                  SCOPE, V)


@triton.jit
def _lib_bar(sig_table, pid, seq, err_addr, timeout_ns, seq_cap, K: tl.constexpr,
             RANK: tl.constexpr, W: tl.constexpr, WP2: tl.constexpr, SCOPE: tl.constexpr,
             RS: tl.constexpr):
    """Barrier ``K`` of the library's protocol with the orderings its kernels use: all-gather
    relaxed/acquire then release/acquire, reduce-scatter release/acquire then relaxed/relaxed."""
    REL: tl.constexpr = (K == 1) != RS
    ACQ: tl.constexpr = (K == 0) or not RS
    lib_barrier(sig_table, pid, seq, 0, err_addr, timeout_ns, seq_cap, K, RANK, W, WP2, SCOPE,
                True, REL, ACQ)


@triton.jit
def _probe_kernel(x_addr, out_addr, buf_table, sig_table, err_addr, ep_addr, sync_off, n,
                  timeout_ns, seq_cap, RANK: tl.constexpr, W: tl.constexpr, WP2: tl.constexpr,
                  BLOCK: tl.constexpr, SCOPE: tl.constexpr, V: tl.constexpr, RS: tl.constexpr):
    """AG: push int32 shard ``x`` to offset ``RANK * n`` of every rank's buffer. RS: sum bf16
    slice ``RANK`` of every rank's buffer into ``out``. Zero-copy, two barriers."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    ep = ep_addr.to(tl.pointer_type(tl.int32)) + pid
    e = 0
    seq = 0
    if V // 4 == 1:
        e = tl.load(ep)
    if V == 8:
        seq = call_seq(sig_table, pid, RANK, W)
        _lib_bar(sig_table, pid, seq, err_addr, timeout_ns, seq_cap, 0, RANK, W, WP2, SCOPE, RS)
    else:
        _bar(sig_table, buf_table, sync_off, pid, e + 1, err_addr, timeout_ns, RANK, W, WP2,
             SCOPE, V)
    table = buf_table.to(tl.pointer_type(tl.int64))
    c = pid
    nchunks = tl.cdiv(n, BLOCK)
    while c < nchunks:
        offs = c * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        if RS:
            acc = tl.zeros([BLOCK], tl.float32)
            for r in tl.static_range(W):
                src = (tl.load(table + r)).to(tl.pointer_type(tl.bfloat16)) + RANK * n
                acc += tl.load(src + offs, mask=mask).to(tl.float32)
            tl.store(out_addr.to(tl.pointer_type(tl.bfloat16)) + offs, acc.to(tl.bfloat16),
                     mask=mask)
        else:
            vals = tl.load(x_addr.to(tl.pointer_type(tl.int32)) + offs, mask=mask)
            for r in tl.static_range(W):
                peer = (RANK + 1 + r) % W
                dst = tl.load(table + peer).to(tl.pointer_type(tl.int32)) + RANK * n
                tl.store(dst + offs, vals, mask=mask)
        c += nprog
    if V == 8:
        _lib_bar(sig_table, pid, seq, err_addr, timeout_ns, seq_cap, 1, RANK, W, WP2, SCOPE, RS)
        call_end(sig_table, pid, seq, seq_cap, RANK, W)
    else:
        _bar(sig_table, buf_table, sync_off, pid, e + 2, err_addr, timeout_ns, RANK, W, WP2,
             SCOPE, V)
    if V // 4 == 1:
        tl.store(ep, e + 2)


def _sync(dev) -> None:
    torch.cuda.synchronize(dev)
    dist.barrier()


def _times(fn, dev, graph: bool) -> list:
    """us per op: 200 eager calls, or 20 replays of a 10-op graph (each replay / 10)."""
    L_OPS, REPS = 10, 20
    if graph:
        s = torch.cuda.Stream(dev)
        s.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream(dev).wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(L_OPS):
                fn()
        run, count, per = g.replay, REPS, L_OPS
        run()
    else:
        run, count, per = fn, 200, 1
        for _ in range(5):
            run()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(count)]
    L.timeout_ns()  # parse the env once outside the timed loop
    _sync(dev)
    for a, b in ev:
        a.record()
        run()
        b.record()
    torch.cuda.synchronize(dev)
    return [a.elapsed_time(b) * 1e3 / per for a, b in ev]


def _report(cells: dict, args, world: int, dev, scope: str) -> None:
    """The two tables: median us per op, and max/median with the count of ops > 2x median."""
    sizes = [int(s) for s in args.sizes.split(",")]
    cols = [(op, nb, g) for op in ("ag", "rs") for nb in sizes for g in (False, True)]

    def head(nb):
        return f"{nb >> 20}M" if nb >= 1 << 20 else f"{nb >> 10}K"
    names = [f"{op}{head(nb)}{'g' if g else 'e'}" for op, nb, g in cols]
    grids = {(op, nb): c[4] for (v, op, nb, g), c in cells.items()}
    print(f"\n# barrier_probe W={world} {torch.cuda.get_device_name(dev)} scope={scope}, rank 0; "
          "e = eager, g = graph (10 ops per replay); grids " +
          " ".join(f"{op}{head(nb)}:{g}" for (op, nb), g in grids.items()))
    for title, fmt in (("median us per op", lambda c: f"{c[0]:.1f}"),
                       ("max/median x ops > 2x median", lambda c: f"{c[1]:.1f}x{c[2]}")):
        print(f"## {title}")
        print(f"{'variant':>8} " + " ".join(f"{s:>9}" for s in names))
        for v in args.variants.split(","):
            row = [cells.get((v, *c)) for c in cols]
            print(f"{v:>8} " + " ".join(
                f"{'-' if c is None else fmt(c) if c[3] else 'ERR':>9}" for c in row), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="4096,1048576,67108864", help="bytes per rank's region")
    # the library's rows last: a hang there (watchdog) loses only them
    p.add_argument("--variants", default="a,b,d,e,g,n,n0,lib_on,lib_off",
                   help="comma list of " + ", ".join(VARIANTS) + ", lib_on, lib_off")
    p.add_argument("--timeout", type=float, default=5.0, help="probe variants' bound, seconds")
    args = p.parse_args()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    shared = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > torch.cuda.device_count()
    if shared:  # NCCL refuses two ranks on one GPU
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("nccl", device_id=dev)
    rank, world = dist.get_rank(), dist.get_world_size()
    cells: dict = {}

    def stop():
        print("barrier_probe: watchdog fired after 175 s; partial results:", flush=True)
        if rank == 0:
            _report(cells, args, world, dev, "?")
        os._exit(3)
    watchdog = threading.Timer(175.0, stop)
    watchdog.daemon = True
    watchdog.start()
    sizes = [int(s) for s in args.sizes.split(",")]
    buf = st.SymmetricMemoryManager.get_buffer("probe", dist.group.WORLD,
                                               size_mb=max(sizes) // 2**20 + 2)
    ctx = L.context(buf)
    sync_off = buf.nbytes - SYNC_BYTES
    buf.symm_buffer[sync_off:].zero_()
    ep = torch.zeros(1024, dtype=torch.int32, device=dev)
    derr = torch.zeros(4, dtype=torch.int32, device=dev)
    _sync(dev)
    for v in args.variants.split(","):
        for op in ("ag", "rs"):
            for nbytes in sizes:
                rs = op == "rs"
                n = nbytes // (2 if rs else 4) // world
                region = buf.symm_buffer[:world * n * (2 if rs else 4)]
                if rs:
                    inp = region.view(torch.bfloat16)
                    inp.fill_(rank + 1)
                    out = torch.empty(n, dtype=torch.bfloat16, device=dev)
                    want = float(world * (world + 1) // 2)
                else:
                    out = region.view(torch.int32)
                    x = torch.full((n,), rank + 1, dtype=torch.int32, device=dev)
                cfg = lookup_config("all_gather", n, torch.int32, world) if not rs else \
                    lookup_config("reduce_scatter", n, torch.bfloat16, world)
                grid = cfg.grid(n, ctx.grid_cap)
                if v in ("lib_on", "lib_off"):
                    tmo = None if v == "lib_on" else 0
                    fn = (lambda: st.reduce_scatter_tensor(out, inp, timeout_s=tmo)) if rs else \
                        (lambda: st.all_gather_into_tensor(out, x, timeout_s=tmo))
                else:
                    V = VARIANTS[v]
                    err = derr.data_ptr() if v in ("b", "bc") else ctx.err_addr
                    tns = 0 if v in ("a0", "n0") else int(
                        (args.timeout if V in EPOCH_VARIANTS else 300.0) * 1e9)
                    xa = inp.data_ptr() if rs else x.data_ptr()
                    # the library's launch path (a Plan: Triton's launcher called directly)
                    plan = L.Plan("launch", buf, _probe_kernel, grid, cfg.num_warps,
                                  (xa, out.data_ptr(), ctx.buf_table, ctx.sig_table, err,
                                   ep.data_ptr(), sync_off, n, tns, ctx.grid_cap),
                                  dict(RANK=rank, W=world, WP2=ctx.world_p2, BLOCK=cfg.block_size,
                                       SCOPE=ctx.scope, V=V, RS=rs))

                    def fn(plan=plan):
                        L.launch(buf, "probe", plan)
                for graph in (False, True):
                    ts = _times(fn, dev, graph)
                    if rs:
                        ok = bool((out.float() == want).all())
                    else:
                        ok = bool(all((out[r * n:(r + 1) * n] == r + 1).all()
                                      for r in range(world)))
                    ok = ok and int(derr[0]) == 0 and int(buf.status[0]) == 0
                    med = statistics.median(ts)
                    cells[(v, op, nbytes, graph)] = (med, max(ts) / med,
                                                     sum(t > 2 * med for t in ts), ok, grid)
                    if rs:
                        inp.fill_(rank + 1)
                    else:
                        out.zero_()
                    _sync(dev)
    watchdog.cancel()
    if rank == 0:
        _report(cells, args, world, dev, ctx.scope)
    teardown()  # buffers before the group (the graphs died with _times): exits promptly


if __name__ == "__main__":
    main()
