"""``python -m symmtriton`` (this module's ``main``): a demo of the collectives on this machine, checked and timed.

Starts ``--world-size`` local processes (no torchrun needed) on the default backend: ``host``
(POSIX shared memory, Triton interpreter) without a GPU, ``cuda`` (several ranks on the GPUs
there are) with one. Each runs all-gather, reduce-scatter and the fused
reduce-scatter + add + RMSNorm + all-gather on symmetric memory, checks them against the
pure-torch reference and reports the time per call.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

import symmtriton as st

from . import reference
from .testing import CPU_ENV, GPU_ENV, WorkerPool, device, sync, tagged


def _demo(rank, world, numel, hidden, iters):
    buf = st.SymmetricMemoryManager.get_buffer("demo", dist.group.WORLD, size_mb=64)
    dtype = torch.bfloat16
    rows = []

    def timed(fn):
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        return (time.perf_counter() - t0) / iters * 1e6

    x = tagged(numel, dtype, rank)
    out = torch.empty(world * numel, dtype=dtype, device=device())
    us = timed(lambda: st.all_gather_into_tensor(out, x))
    ok = torch.equal(out, reference.all_gather([tagged(numel, dtype, r) for r in range(world)]))
    rows.append(("all_gather_into_tensor", world * numel * 2, ok, us))

    inp = buf.maybe_get_tensor((world * numel,), dtype)["tensor"]  # zero-copy input
    shard = torch.empty(numel, dtype=dtype, device=device())

    def rs():
        inp.copy_(tagged(world * numel, dtype, rank))
        st.reduce_scatter_tensor(shard, inp)

    us = timed(rs)
    ok = torch.equal(shard, reference.reduce_scatter(
        [tagged(world * numel, dtype, r) for r in range(world)], rank))
    rows.append(("reduce_scatter_tensor", world * numel * 2, ok, us))

    s = 2
    f_in = tagged(world * s * hidden, dtype, rank, 1).view(world * s, hidden)
    weight = torch.ones(hidden, dtype=dtype, device=device())
    residual = tagged(s * hidden, dtype, rank, 2).view(s, hidden)
    res0 = residual.clone()
    normed = st.reduce_scatter_add_rmsnorm_all_gather(f_in, residual, weight)
    inputs = [tagged(world * s * hidden, dtype, r, 1).view(world * s, hidden) for r in range(world)]
    exp = [reference.reduce_scatter_add_rmsnorm(inputs, tagged(s * hidden, dtype, r, 2).view(s, hidden),
                                                weight, 1e-6, r) for r in range(world)]
    ok = torch.equal(residual, exp[rank][1]) and torch.allclose(
        normed.float(), torch.cat([e[0] for e in exp]).float(), rtol=1.6e-2, atol=1e-2)
    scratch = res0.clone()
    us = timed(lambda: st.reduce_scatter_add_rmsnorm_all_gather(f_in, scratch, weight, out=normed))
    rows.append(("reduce_scatter_add_rmsnorm_all_gather", world * s * hidden * 2, ok, us))
    return buf.backend, str(device()), rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m symmtriton", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2, help="local processes (default 2)")
    p.add_argument("--numel", type=int, default=4096, help="elements per rank for AG/RS (bf16)")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size of the fused op")
    p.add_argument("--iters", type=int, default=None, help="timed calls (default 3 CPU, 100 GPU)")
    args = p.parse_args(argv)
    if args.world_size < 1 or args.numel < 1 or args.hidden < 1:
        p.error("--world-size, --numel and --hidden must be >= 1")
    gpu = torch.cuda.is_available()
    iters = args.iters or (100 if gpu else 3)
    with WorkerPool(args.world_size, env=GPU_ENV if gpu else CPU_ENV, timeout=600) as pool:
        results = pool.run(_demo, args.numel, args.hidden, iters)
    backend, dev, _ = results[0]
    print(f"symmtriton demo: {args.world_size} ranks, backend {backend} ({dev}), bf16, "
          f"{iters} timed calls per op{' (Triton interpreter: slow by design)' if not gpu else ''}")
    print(f"{'op':40s} {'bytes':>10s} {'correct':>8s} {'us/call (max over ranks)':>26s}")
    all_ok = True
    for i, (op, nbytes, _, _) in enumerate(results[0][2]):
        ok = all(r[2][i][2] for r in results)
        us = max(r[2][i][3] for r in results)
        all_ok &= ok
        print(f"{op:40s} {nbytes:10d} {str(ok):>8s} {us:26.1f}")
    return 0 if all_ok else 1


