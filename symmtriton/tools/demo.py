"""``python -m symmtriton`` (this module's ``main``): every public collective on this machine,
checked against the pure-torch reference and timed.

Starts ``--world-size`` local processes (no torchrun needed) on the default backend: ``host``
(POSIX shared memory, the Triton interpreter) without a GPU, ``cuda`` with one (every rank on
GPU 0: the ranks share it, so times show the plumbing, not NVLink latency). Each rank runs
every op family once on rank-tagged data (:mod:`symmtriton.tools.bench.workloads`), compares
the result with :mod:`symmtriton.tools.reference` (bit for bit, RMSNorm within 1-2 ulp), then
times it:

  all_gather_into_tensor, reduce_scatter_tensor, reduce_scatter_add_rmsnorm_all_gather,
  reduce_scatter_add_rmsnorm, all_gather_v, reduce_scatter_v (skewed counts: rank 0 sends no
  rows), all_reduce (in place, and into ``out=``), all_reduce_add_rmsnorm, moe_dispatch and
  moe_combine (top-2 of two experts per rank).

One line per op: its input shape, dtype, path (``staged``: ordinary tensors, staged through the
symmetric buffer inside the launch; ``zero-copy``: the operand peers access lies in the buffer;
then the kernel: ``lines`` barrier-free, ``barrier``, ``push``, or the all-reduce's
``one_shot``/``two_shot``; ``fallback``: torch.distributed, symmetric memory unavailable), OK or
FAIL, and the time per call (slowest rank). The exit status is 1 when any check failed.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.distributed as dist

from symmtriton.memory import SymmetricMemoryManager
from symmtriton.ops.fused import reduce_scatter_add_rmsnorm

from . import reference
from .bench import timing
from .bench.cli import _variant
from .bench.moe import MOE_OPS, MoeShape, MoeWorkload
from .bench.workloads import FUSED_EPS, Workload, make_workload
from .testing import CPU_ENV, GPU_ENV, WorkerPool, device

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
#: (line label, workload op, placement, count distribution of the v ops). ``shard_norm`` is
#: reduce_scatter_add_rmsnorm (:class:`ShardNorm`).
CASES = (
    ("all_gather_into_tensor", "all_gather", "staged", None),
    ("reduce_scatter_tensor", "reduce_scatter", "zero_copy", None),
    ("reduce_scatter_add_rmsnorm_all_gather", "fused", "staged", None),
    ("reduce_scatter_add_rmsnorm", "shard_norm", "staged", None),
    ("all_gather_v", "all_gather_v", "staged", "skewed"),
    ("reduce_scatter_v", "reduce_scatter_v", "staged", "skewed"),
    ("all_reduce (in place)", "all_reduce", "zero_copy", None),
    ("all_reduce (out=)", "all_reduce", "staged", None),
    ("all_reduce_add_rmsnorm", "all_reduce_add_rmsnorm", "staged", None),
    ("moe_dispatch", "moe_dispatch", "staged", None),
    ("moe_combine", "moe_combine", "staged", None),
)
#: top-k and experts per rank of the MoE cases.
MOE_TOPK, MOE_EXPERTS_PER_RANK = 2, 2
#: the demo's buffer size in MiB (CPU: POSIX shared memory, reserved in full).
BUFFER_MB = {"cuda": 64, "cpu": 16}


class ShardNorm(Workload):
    """``reduce_scatter_add_rmsnorm``: the ``fused`` workload's operands with this rank's
    ``[rows, hidden]`` shard as output (no all-gather); checks the normed shard and the updated
    residual."""

    @classmethod
    def make(cls, rows_numel: int, dtype, group, hidden: int) -> "ShardNorm":
        wl = make_workload("fused", rows_numel, dtype, group, hidden=hidden)
        out = torch.empty_like(wl.tensors["residual"])
        fields = {f.name: getattr(wl, f.name) for f in dataclasses.fields(wl)}
        return cls(**{**fields, "tensors": {**wl.tensors, "output": out}})

    def run(self, config=None):
        t = self.tensors
        return reduce_scatter_add_rmsnorm(t["input"], t["residual"], t["weight"], eps=FUSED_EPS,
                                          group=self.group, out=t["output"], config=config)

    def expected(self) -> dict:
        inputs = [self._inputs(r) for r in range(self.world)]
        normed, residual = reference.reduce_scatter_add_rmsnorm(
            inputs, self._residual(self.rank), self.tensors["weight"], FUSED_EPS, self.rank)
        return {"output": normed, "residual": residual}


def _workload(op: str, placement: str, counts, numel: int, rows: int, hidden: int, dtype, group):
    """The operands of one case: ``numel`` elements per rank for the flat ops, ``rows`` rows
    of ``hidden`` per rank (``world * rows`` tokens in all) for the row ops."""
    world = dist.get_world_size(group)
    if op == "shard_norm":
        return ShardNorm.make(rows * hidden, dtype, group, hidden)
    if op in MOE_OPS:
        shape = MoeShape(rows, hidden, MOE_TOPK, MOE_EXPERTS_PER_RANK * world)
        return MoeWorkload(op, shape, dtype, group)
    if op in ("all_gather", "reduce_scatter", "all_reduce"):
        return make_workload(op, numel, dtype, group, placement=placement)
    total = world * rows * hidden if op == "all_reduce_add_rmsnorm" else rows * hidden
    return make_workload(op, total, dtype, group, placement=placement, hidden=hidden, counts=counts)


def _demo(rank, world, numel, rows, hidden, dtype_name, iters, warmup):
    """Check and time every case on this rank: [(label, shape, path, ok, seconds | None)]."""
    dev = device()
    buf = SymmetricMemoryManager.get_buffer("demo", dist.group.WORLD, size_mb=BUFFER_MB[dev.type])
    group, dtype, lines = dist.group.WORLD, DTYPES[dtype_name], []
    for label, op, placement, counts in CASES:
        wl = _workload(op, placement, counts, numel, rows, hidden, dtype, group)
        ok = timing.all_ranks_ok(wl.check(), group)
        kernel = _variant(None) if buf.symm_mem_hdl is not None else "fallback"
        path = ", ".join(x for x in (placement.replace("_", "-"), kernel) if x)
        t = timing.agreed_time(wl.run, "eager", device=dev, group=group, iters=iters, warmup=warmup)
        shape = str(list(wl.tensors["input"].shape))
        if wl.counts is not None:
            shape += f" counts {list(wl.counts)}"
        lines.append((label, shape, path, ok, t))
    return buf.backend, str(dev), lines


def human_time(seconds) -> str:
    """``12.3 us``, ``4.56 ms`` or ``2.35 s``; ``-`` when the timing failed."""
    if seconds is None:
        return "-"
    for unit, scale in (("us", 1e6), ("ms", 1e3)):
        if seconds * scale < 1000:
            return f"{seconds * scale:.1f} {unit}"
    return f"{seconds:.2f} s"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m symmtriton", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2, help="local processes (default 2)")
    p.add_argument("--numel", type=int, default=None,
                   help="elements per rank of the flat ops: all-gather input, reduce-scatter "
                        "output, all-reduce tensor (default 4096 GPU, 256 CPU)")
    p.add_argument("--rows", type=int, default=2,
                   help="rows per rank of the row ops (fused, v, all-reduce + RMSNorm; "
                        "default %(default)s)")
    p.add_argument("--hidden", type=int, default=None,
                   help="row length of the row ops (default 1024 GPU, 64 CPU)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    p.add_argument("--iters", type=int, default=None, help="timed calls (default 100 GPU, 2 CPU)")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    numel, hidden, iters = (default if value is None else value for value, default in (
        (args.numel, 4096 if gpu else 256), (args.hidden, 1024 if gpu else 64),
        (args.iters, 100 if gpu else 2)))
    if min(args.world_size, numel, args.rows, hidden, iters) < 1:
        p.error("--world-size, --numel, --rows, --hidden and --iters must be >= 1")
    with WorkerPool(args.world_size, env=GPU_ENV if gpu else CPU_ENV, timeout=900) as pool:
        results = pool.run(_demo, numel, args.rows, hidden, args.dtype, iters, 10 if gpu else 0)
    backend, dev, lines = results[0]
    where = "the ranks share GPU 0" if gpu else "Triton interpreter: slow by design"
    print(f"symmtriton demo: {args.world_size} ranks, backend {backend} ({dev}; {where}), "
          f"timed calls per op: {iters}, time = the slowest rank's median")
    print(f"{'op':38s} {'input shape':22s} {'dtype':9s} {'path':20s} {'check':5s} {'time':>9s}")
    for label, shape, path, ok, t in lines:
        print(f"{label:38s} {shape:22s} {args.dtype:9s} {path:20s} {'OK' if ok else 'FAIL':5s} "
              f"{human_time(t):>9s}")
    failed = [line[0] for line in lines if not line[3]]
    print(f"all {len(lines)} checks passed" if not failed else f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0
