"""Barrier probe: what the wait timeout costs the collectives that wait on peers.

Every wait (a barrier, a line or a pushed chunk's flag) that keeps missing a peer reads the clock
now and then, so that it can give up after ``SYMMTRITON_TIMEOUT_S`` (default 300 s); with
``timeout_s=0`` it never reads the clock. DESIGN.md wants the timeout to cost nothing on the fast
path: this probe times each collective both ways and prints them side by side.

Rows: all-gather (zero-copy output), reduce-scatter (zero-copy input) and all-reduce (in place,
zero-copy) of bf16 (fp32 on the CPU), at each ``--sizes`` (nccl-tests' size: the gathered
output, the full input, the tensor) and each ``--protocols`` (``SYMMTRITON_PROTOCOL`` while the
row's calls are planned; ``kernel`` says what ran: ``lines``, ``barrier``, ``push``, the
all-reduce's ``one_shot`` / ``two_shot``). Each row is checked against
:mod:`symmtriton.tools.reference` first, then timed eager and, on a GPU, in a CUDA graph
(``--graph-iters`` calls per replay): the slowest rank's median per call, with the timeout on
(``on``) and off (``off``), and ``off/on`` (1.0: the timeout is free).

benchmarks/results/archive/2026-11-25_922ac1d/barrier_probe_h100x2.txt holds a run of an
earlier version of this probe, which also timed barrier designs no longer in the tree; its
``lib_on`` / ``lib_off`` rows are these columns.

Run (rank 0 prints; exit status 1 when a check failed):

    # 2 GPUs, one rank per GPU, NCCL group
    TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 \\
        python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/barrier_probe.py
    # CPU (host backend, Triton interpreter): plumbing only, the times mean nothing
    SYMMTRITON_BACKEND=host python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        benchmarks/barrier_probe.py --sizes 1K --iters 2
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

import symmtriton as st
from symmtriton.tools.bench import cli, timing
from symmtriton.tools.bench.options import parse_bytes
from symmtriton.tools.bench.workloads import make_workload
from symmtriton.tools.testing import device, protocol, teardown

#: the probe's ops: workload name -> the public call with a timeout (``None``: the default)
CALLS = {
    "all_gather": lambda t, s: st.all_gather_into_tensor(t["output"], t["input"], timeout_s=s),
    "reduce_scatter": lambda t, s: st.reduce_scatter_tensor(t["output"], t["input"], timeout_s=s),
    "all_reduce": lambda t, s: st.all_reduce(t["input"], timeout_s=s),
}
PROTOCOLS = ("lines", "barrier", "push")


def probe_row(op: str, nbytes: int, mode: str, dtype, group, args) -> dict:
    """Check, then time one op at one size under one protocol, timeout on and off."""
    world = dist.get_world_size(group)
    factor = 1 if op == "all_reduce" else world
    numel = max(nbytes // dtype.itemsize // factor, 1)
    dev = device()
    with protocol(mode):
        wl = make_workload(op, numel, dtype, group, placement="zero_copy")
        ok = timing.all_ranks_ok(wl.check(), group)
        row = {"op": op, "protocol": mode, "kernel": cli._variant(None) or "-",
               "bytes": wl.total_bytes, "ok": ok}
        modes = ("eager", "graph") if dev.type == "cuda" else ("eager",)
        for timing_mode in modes:
            for name, timeout_s in (("on", None), ("off", 0)):
                t = timing.agreed_time(lambda s=timeout_s: CALLS[op](wl.tensors, s), timing_mode,
                                       device=dev, group=group, iters=args.iters,
                                       warmup=args.warmup, graph_iters=args.graph_iters)
                row[f"{timing_mode} {name}"] = t
    return row


def format_rows(rows: list) -> str:
    """The table rank 0 prints: us per call, ``off/on`` per timing mode."""
    modes = [m for m in ("eager", "graph") if f"{m} on" in rows[0]] if rows else []
    head = f"{'op':15s}{'protocol':>9s}{'kernel':>14s}{'bytes':>11s}{'check':>6s}" + "".join(
        f"{m + ' on':>12s}{m + ' off':>12s}{'off/on':>7s}" for m in modes)
    lines = [head]
    for r in rows:
        line = (f"{r['op']:15s}{r['protocol']:>9s}{r['kernel']:>14s}{r['bytes']:>11d}"
                f"{'ok' if r['ok'] else 'FAIL':>6s}")
        for m in modes:
            on, off = r[f"{m} on"], r[f"{m} off"]
            ratio = f"{off / on:7.2f}" if on and off else f"{'-':>7s}"
            line += "".join(f"{'-' if t is None else f'{t * 1e6:.1f}':>12s}" for t in (on, off))
            line += ratio
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None,
                   help="comma list of sizes (K, M, G suffixes; default 4K,1M,64M GPU, 1K CPU)")
    p.add_argument("--protocols", default=",".join(PROTOCOLS),
                   help="comma list of %(default)s")
    p.add_argument("--ops", default=",".join(CALLS), help="comma list of %(default)s")
    p.add_argument("--iters", type=int, default=None, help="timed calls (default 200 GPU, 3 CPU)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls (default %(default)s)")
    p.add_argument("--graph-iters", type=int, default=10,
                   help="calls per CUDA graph replay (default %(default)s)")
    args = p.parse_args(argv)
    gpu = device().type == "cuda"
    ops, modes = args.ops.split(","), args.protocols.split(",")
    for what, got, allowed in (("--ops", ops, CALLS), ("--protocols", modes, PROTOCOLS)):
        if not got or set(got) - set(allowed):
            p.error(f"{what} must be a comma list of {', '.join(allowed)}, got {','.join(got)!r}")
    sizes = [parse_bytes(s) for s in (args.sizes or ("4K,1M,64M" if gpu else "1K")).split(",")]
    args.iters = args.iters or (200 if gpu else 3)
    group, created = cli.init_distributed()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    dtype = torch.bfloat16 if gpu else torch.float32
    st.SymmetricMemoryManager.get_buffer("probe", group, size_mb=max(sizes) * 2 // 2**20 + 2)
    try:
        rows = [probe_row(op, nbytes, mode, dtype, group, args)
                for mode in modes for op in ops for nbytes in sizes]
    finally:
        teardown(destroy_group=created)
    if rank == 0:
        print(f"# barrier_probe W={world} {device()} {str(dtype).removeprefix('torch.')}; us per "
              "call, the slowest rank's median; on: default timeout, off: timeout_s=0")
        print(format_rows(rows), flush=True)
    return 0 if all(r["ok"] for r in rows) else 1

if __name__ == "__main__":
    sys.exit(main())
