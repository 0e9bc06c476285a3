"""The benchmark's command line: parsing and validating ``symmtriton-bench``'s options."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass

from symmtriton import tuning
from symmtriton.config import ALL_REDUCE_ALGORITHMS
from symmtriton.validation import REDUCE_DTYPES

from ..testing import device as _device
from . import moe, rownorm, workloads

MODES = ("eager", "graph")
#: ``--fp8`` choices: rows without FP8 output, and the FP8 forms (:data:`rownorm.FORMS`).
FP8_CHOICES = ("none",) + rownorm.FORMS
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20,
          "MB": 1 << 20, "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}
#: ``--quick``: sizes 4K, 64K, 1M, 16M, 256M (GPU) and at most 20 timed samples per row.
QUICK = {"min_bytes": "4K", "step": 16, "iters": 20, "warmup": 3}


def parse_bytes(text: str) -> int:
    """``"64K"``, ``"1MB"``, ``"256MiB"``, ``"4G"``, ``"4096"`` -> bytes (K = 1024, as
    nccl-tests)."""
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"not a byte size: {text!r} (examples: 1024, 64K, 1MB, 256M, 4G)")
    value = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if value < 1:
        raise ValueError(f"byte size must be >= 1, got {text!r}")
    return value


def _csv_list(text: str, allowed, what: str) -> tuple:
    items = tuple(x.strip() for x in str(text).split(",") if x.strip())
    if not items:
        raise ValueError(f"--{what}: empty list")
    for x in items:
        if x not in allowed:
            raise ValueError(f"--{what}: {x!r} is not one of {', '.join(allowed)}")
    return tuple(dict.fromkeys(items))


def sweep_sizes(min_bytes: int, max_bytes: int, step: int = 2) -> tuple[int, ...]:
    """``min_bytes, step*min_bytes, ...`` up to ``max_bytes``."""
    if min_bytes < 1 or max_bytes < min_bytes:
        raise ValueError(f"need 1 <= min-bytes <= max-bytes, got {min_bytes} and {max_bytes}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 2:
        raise ValueError(f"--step must be an int >= 2, got {step!r}")
    out, s = [], min_bytes
    while s <= max_bytes:
        out.append(s)
        s *= step
    return tuple(out)


@dataclass(frozen=True)
class BenchOptions:
    """Validated command-line options (see ``--help``)."""

    ops: tuple
    v_counts: tuple
    dtypes: tuple
    modes: tuple
    placements: tuple
    sizes: tuple
    iters: int
    min_iters: int
    max_spread: float
    warmup: int
    graph_iters: int
    hidden: int
    out_dir: str
    name: str | None
    tune: bool
    baselines: bool
    plot: bool
    backend: str
    buffer_mb: float | None
    algorithm: str | None = None
    eager_batch: int = 1
    peer_copy_gbs: float | None = None
    commit: str | None = None
    moe: moe.MoeShape = moe.MoeShape(moe.TOKENS, moe.HIDDEN, moe.TOPK, moe.EXPERTS)
    fp8: tuple = ("none",)

    def __post_init__(self):
        for key in ("iters", "min_iters", "graph_iters", "hidden", "eager_batch"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be >= 1, "
                                 f"got {getattr(self, key)}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if not self.max_spread >= 0:
            raise ValueError(f"--max-spread must be >= 0, got {self.max_spread}")
        if self.buffer_mb is not None and not self.buffer_mb > 0:
            raise ValueError(f"--buffer-mb must be > 0, got {self.buffer_mb}")
        if self.peer_copy_gbs is not None and not self.peer_copy_gbs > 0:
            raise ValueError(f"--peer-copy-gbs must be > 0, got {self.peer_copy_gbs}")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"--backend must be auto, nccl or gloo, got {self.backend!r}")
        for key in ("tokens", "topk", "experts", "hidden"):
            if getattr(self.moe, key) < 1:
                raise ValueError(f"--{key} must be >= 1, got {getattr(self.moe, key)}")
        if self.moe.topk > self.moe.experts:
            raise ValueError(f"--topk {self.moe.topk} exceeds --experts {self.moe.experts}")

    def counts(self, warmup: int) -> dict:
        """Keyword counts of :func:`symmtriton.tools.bench.timing.agreed_time` for a row
        warmed up ``warmup`` times."""
        return {"iters": self.iters, "warmup": warmup, "min_iters": self.min_iters,
                "max_spread": self.max_spread, "graph_iters": self.graph_iters,
                "batch": self.eager_batch}


EPILOG = """\
columns (CSV/JSON; the table shows most of them):
  size_bytes   nccl-tests size: gathered output (all_gather, all_gather_v), full input
               (reduce_scatter[_v], fused, reduce_scatter_add_rmsnorm), the tensor (all_reduce,
               all_reduce_add_rmsnorm); moe_dispatch / moe_combine: one rank's tokens
               (--tokens x --hidden), one row per dtype and mode, staged only
  count        elements in size_bytes
  variant      the kernel the row launched: lines, barrier, push, push_one_shot, or the
               all-reduce's one_shot / two_shot; all_gather_v / reduce_scatter_v: the counts
               (--v-counts) before it
  fp8          --fp8 rows: static or dynamic (float8_e4m3fn output); empty otherwise
  path         symmetric (Triton kernels) or fallback (symmetric memory unavailable)
  block_size, num_warps, max_blocks   launch config used (tuned winner or default; blank for
               the untuned ops, which pick theirs inside)
  time_us      per call, to completion on every rank (see timing below); algbw = size/time;
               busbw = algbw*(W-1)/W (fused and all-reduce ops: *2(W-1)/W), as nccl-tests
               reports them
  check        ok / FAIL against symmtriton.tools.reference on rank-tagged data (all ranks
               agree); skip above 1 GiB (the references would need several times the size)
  baseline_us  torch.distributed (NCCL or gloo), speedup = baseline_us / time_us; fused ops:
               the unfused sequence (all-reduce or reduce-scatter, add, RMSNorm[, all-gather]);
               v ops: the uniform collective on tensors padded to max(counts) rows per rank;
               MoE ops: all_to_all_single of the same rows (eager: splits exchanged first;
               graph: padded to --tokens per rank); fp8 rows: then torch's quantisation
  symm_mem_us  the fastest torch.ops.symm_mem op (named in symm_mem_op) that this torch has and
               that runs (all_reduce: one_shot_all_reduce, two_shot_all_reduce_; fused ops:
               one_shot_all_reduce or reduce_scatter_out of the input, communication only;
               moe_dispatch: all_to_all_vdev, NVSHMEM backend only); none for the v ops
  ours_quant_us  fp8 rows: the same op of ours in the input dtype, then torch's quantisation
               (speedup_ours_quant = ours_quant_us / time_us)
  copy_us      a device copy of size_bytes on this GPU; copy_gbs counts read + write
  ceiling      what efficiency compares with: p2p (ranks on different GPUs: a copy to the
               next rank's GPU, measured once at start, or --peer-copy-gbs; ceiling_gbs) or
               local (copy_gbs)
  efficiency   GPU, size >= 1 MiB. p2p: busbw / ceiling_gbs. local: (bytes the kernel moves
               through this rank's memory / time) / copy_gbs; bytes moved = size + size/W,
               + 2 x size when staged (fused: twice size + size/W)
  valid        false when a busbw of the row (ours, ours_quant, the baseline's or symm_mem's)
               exceeds the peer-copy ceiling by more than 5% (named in over_ceiling, a warning
               printed, the speedups against it left blank); empty when no ceiling is known
               (CPU, ranks sharing a GPU, one rank) or the op may reduce through multicast
  time_reduction  max_over_ranks; commit: the project's commit (JSON meta: the whole provenance)

timing: eager = a barrier, then --eager-batch calls timed with the host clock, stopped after
torch.cuda.synchronize() of the whole device (side-stream and copy-engine work included);
graph = CUDA events around each replay. Every sample (the same calls on every rank) takes the
MAX over ranks; time_us is the median of these maxima. A row takes --min-iters samples and
stops there when their interquartile range is within --max-spread of the median; otherwise it
takes up to --iters.

examples:
  torchrun --nproc-per-node 2 -m symmtriton.tools.bench            # one rank per GPU, NCCL
  torchrun --nproc-per-node 2 -m symmtriton.tools.bench --quick    # 5 sizes, under a minute
  torchrun --nproc-per-node 2 -m symmtriton.tools.bench --ops all_gather,reduce_scatter \\
      --modes graph --min-bytes 256M --max-bytes 4G --step 2     # where NCCL peaks
  torchrun --nproc-per-node 2 -m symmtriton.tools.bench \\
      --ops all_reduce,all_reduce_add_rmsnorm,all_gather_v,reduce_scatter_v \\
      --max-bytes 64M --step 16                                  # the opt-in ops
  torchrun --nproc-per-node 2 -m symmtriton.tools.bench --ops moe_dispatch,moe_combine \
      --tokens 128 --hidden 7168 --topk 8 --experts 64           # MoE all-to-all (defaults)
  torchrun --nproc-per-node 2 -m symmtriton.tools.bench --max-bytes 4K --iters 2 \\
      --warmup 1                                                 # CPU
  symmtriton-bench --tune --modes graph          # tune the swept sizes, then benchmark
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="symmtriton-bench",
        description="Benchmark symmtriton's collectives (all-gather, reduce-scatter, fused "
                    "reduce-scatter + add + RMSNorm + all-gather; opt-in: all-reduce, fused "
                    "all-reduce + add + RMSNorm, all-gather-v, reduce-scatter-v, MoE dispatch / "
                    "combine) against "
                    "torch.distributed, "
                    "PyTorch's symmetric-memory ops and copy ceilings. Run on every rank, "
                    "e.g. torchrun --nproc-per-node 8 -m symmtriton.tools.bench.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    _add_sweep_options(p)
    _add_timing_options(p)
    _add_run_options(p)
    return p


def _add_sweep_options(p: argparse.ArgumentParser) -> None:
    """What the sweep runs: ops, count distributions, dtypes, modes, placements, sizes."""
    p.add_argument("--ops", default=",".join(workloads.OPS),
                   help=f"comma list of {', '.join(workloads.BENCH_OPS)} (default: "
                        f"{','.join(workloads.OPS)})")
    p.add_argument("--v-counts", default=",".join(workloads.V_COUNTS),
                   help="count distributions of all_gather_v / reduce_scatter_v rows: uniform "
                        "(every rank the same rows), skewed (rank 0 none, rank r > 0 in "
                        "proportion to r + 1) (default: both)")
    p.add_argument("--dtypes", default="bfloat16",
                   help="comma list of bfloat16, float16, float32 (default: bfloat16)")
    p.add_argument("--modes", default="eager,graph",
                   help="comma list of eager, graph (graph: CUDA graph replays; GPU only, skipped "
                        "on the CPU) (default: eager,graph)")
    p.add_argument("--placement", default="zero_copy,staged",
                   help="comma list: zero_copy (the operand peers read or write already in the "
                        "symmetric buffer: AG, AG-v output; RS, RS-v, fused, all-reduce input), "
                        "staged (ordinary tensors) "
                        "(default: both)")
    p.add_argument("--fp8", default="none",
                   help="comma list of none, static, dynamic: the output of the RMSNorm row ops "
                        "(fused, reduce_scatter_add_rmsnorm, all_reduce_add_rmsnorm): in the "
                        "input dtype (none), or float8_e4m3fn with a static scale or dynamic "
                        "per-row scales; one row per form (default: none)")
    p.add_argument("--quick", action="store_true",
                   help=f"sizes {QUICK['min_bytes']} to --max-bytes in x{QUICK['step']} steps, "
                        f"at most {QUICK['iters']} timed samples, {QUICK['warmup']} warm-up calls "
                        "(explicit options win)")
    p.add_argument("--min-bytes", default=None, help="smallest size (default 1K)")
    p.add_argument("--max-bytes", default=None,
                   help="largest size (default 256M on the GPU, 64K on the CPU; up to 4G and "
                        "more for bus bandwidth where NCCL peaks)")
    p.add_argument("--step", type=int, default=None, help="size factor between rows (default 4)")


def _add_timing_options(p: argparse.ArgumentParser) -> None:
    """How each row is timed, and the ceiling rows are validated against."""
    p.add_argument("--iters", type=int, default=None,
                   help="most timed samples per row (eager: of --eager-batch calls; graph: "
                        "replays), median reported (default 50 GPU, 3 CPU)")
    p.add_argument("--min-iters", type=int, default=None,
                   help="timed samples before the spread test (default 10, at most --iters)")
    p.add_argument("--max-spread", type=float, default=0.05,
                   help="stop after --min-iters calls when (p75 - p25) / median is at most this "
                        "on every rank (default 0.05; 0 always runs --iters)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls before timing (default 10 GPU, 1 CPU; at most 3 above "
                        "64 MiB)")
    p.add_argument("--graph-iters", type=int, default=10,
                   help="calls captured in one CUDA graph in graph mode (default 10)")
    p.add_argument("--eager-batch", type=int, default=None,
                   help="calls per timed sample in eager mode, the clock stopped after the whole "
                        "device synchronised (default 10 GPU, 1 CPU)")
    p.add_argument("--peer-copy-gbs", type=float, default=None,
                   help="peer-copy ceiling in GB/s to validate rows against when this run does "
                        "not measure one (e.g. ranks on one GPU); recorded as given by this "
                        "option")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Provenance, operands, output files, tuning, baselines, process group and buffer."""
    p.add_argument("--commit", default=None,
                   help="the project's commit to record when the bench runs outside a git "
                        "checkout (default: git rev-parse HEAD of the package's checkout)")
    p.add_argument("--hidden", type=int, default=None,
                   help="hidden size H of the row ops' [S, H] operands (fused ops, v ops) "
                        "(default 4096; smaller when a size holds fewer than W rows) and of the "
                        f"MoE rows' tokens (default {moe.HIDDEN})")
    p.add_argument("--tokens", type=int, default=moe.TOKENS,
                   help=f"MoE rows: tokens per rank (default {moe.TOKENS})")
    p.add_argument("--topk", type=int, default=moe.TOPK,
                   help=f"MoE rows: experts per token (default {moe.TOPK})")
    p.add_argument("--experts", type=int, default=moe.EXPERTS,
                   help=f"MoE rows: experts in all, a multiple of the world size (default "
                        f"{moe.EXPERTS})")
    p.add_argument("--out-dir", default=os.path.join("benchmarks", "results"),
                   help="where rank 0 writes CSV, JSON and PNG (default benchmarks/results)")
    p.add_argument("--name", default=None,
                   help="file stem (default symmtriton_<device>_w<world size>[_pergpu|_shared])")
    p.add_argument("--tune", action="store_true",
                   help="autotune every swept op/dtype/size first and write the tuning cache "
                        "($SYMMTRITON_TUNING_CACHE, default ~/.cache/symmtriton/tuning.json)")
    p.add_argument("--no-baselines", dest="baselines", action="store_false",
                   help="skip torch.distributed, torch symm_mem and copy timings")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="do not write the PNG")
    p.add_argument("--backend", default="auto", choices=("auto", "nccl", "gloo"),
                   help="process-group backend when this command creates the group (default: "
                        "gloo without CUDA or when ranks share a GPU, else nccl)")
    p.add_argument("--algorithm", default="auto", choices=("auto",) + ALL_REDUCE_ALGORITHMS,
                   help="algorithm of the all-reduce ops (all_reduce, all_reduce_add_rmsnorm): "
                        "auto (by size) or forced, e.g. one_shot with SYMMTRITON_PROTOCOL=push "
                        "for the one-shot push (default auto)")
    p.add_argument("--buffer-mb", type=float, default=None,
                   help="symmetric buffer size in MiB (default: 3 x max size, at least 1)")


def parse_options(argv=None) -> BenchOptions:
    """Parse and validate ``argv`` (``ValueError`` names the bad value)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    on_gpu = _device().type == "cuda"
    quick = QUICK if args.quick else {}
    iters = args.iters
    if iters is None:
        iters = min(50 if on_gpu else 3, quick.get("iters", 1 << 30))
    warmup = args.warmup
    if warmup is None:
        warmup = quick.get("warmup", 10 if on_gpu else 1)
    try:
        dtype_names = _csv_list(args.dtypes, [tuning.dtype_name(t) for t in REDUCE_DTYPES],
                                "dtypes")
        return BenchOptions(
            ops=_csv_list(args.ops, workloads.BENCH_OPS, "ops"),
            v_counts=_csv_list(args.v_counts, workloads.V_COUNTS, "v-counts"),
            dtypes=tuple(tuning.parse_dtype(d) for d in dtype_names),
            modes=_csv_list(args.modes, MODES, "modes"),
            placements=_csv_list(args.placement, workloads.PLACEMENTS, "placement"),
            sizes=sweep_sizes(parse_bytes(args.min_bytes or quick.get("min_bytes", "1K")),
                              parse_bytes(args.max_bytes or ("256M" if on_gpu else "64K")),
                              args.step if args.step is not None else quick.get("step", 4)),
            iters=iters,
            min_iters=args.min_iters if args.min_iters is not None else min(10, max(iters, 1)),
            max_spread=args.max_spread,
            warmup=warmup, graph_iters=args.graph_iters, hidden=args.hidden or 4096,
            out_dir=args.out_dir, name=args.name,
            tune=args.tune, baselines=args.baselines, plot=args.plot, backend=args.backend,
            buffer_mb=args.buffer_mb,
            algorithm=None if args.algorithm == "auto" else args.algorithm,
            eager_batch=(args.eager_batch if args.eager_batch is not None
                         else (10 if on_gpu else 1)),
            peer_copy_gbs=args.peer_copy_gbs, commit=args.commit,
            moe=moe.MoeShape(args.tokens, args.hidden or moe.HIDDEN, args.topk, args.experts),
            fp8=_csv_list(args.fp8, FP8_CHOICES, "fp8"))
    except ValueError as exc:
        parser.error(str(exc))  # usage + message, exit status 2
