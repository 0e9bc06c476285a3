"""``symmtriton-bench`` / ``python -m symmtriton.bench``: sweep the collectives against
torch.distributed, PyTorch's symmetric-memory ops and a local-copy ceiling.

Run it on every rank (``torchrun --nproc-per-node N -m symmtriton.bench ...``), or call
:func:`main` from every rank of an initialised process group. Rank 0 prints an nccl-tests-like
table, a progress line per row on stderr, and writes ``<name>.csv``, ``<name>.json`` and
``<name>.png`` (matplotlib optional) into ``--out-dir``.

Every rank runs the same rows in the same order (the kernels' barriers are per block: all ranks
must launch the same grid). Each row is checked against :mod:`symmtriton.reference` on
rank-tagged data before it is timed; the check result, like every time, is agreed over the group
(a MIN of the ok flags, a MAX of the per-rank median times: a collective is as slow as its
slowest rank). Times: CUDA events on the GPU, ``time.perf_counter`` on the CPU, median of
``--iters`` after ``--warmup``; ``graph`` mode captures ``--graph-iters`` calls in one CUDA graph
and reports a replay's time divided by that count.

Sizes are nccl-tests' ``size``: the gathered output (all-gather), the full input
(reduce-scatter, fused); ``algbw = size / time``, ``busbw = algbw * (W-1)/W`` (all-gather,
reduce-scatter) or ``algbw * 2(W-1)/W`` (fused: a reduce-scatter plus an all-gather, like an
all-reduce). The exit status is 1 when a row's check failed on some rank.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import re
import sys
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

import symmtriton

from . import reference, timing, tuning, workloads
from .memory import SymmetricMemoryManager
from .ops._common import torch_all_gather, torch_reduce_scatter
from .testing import device as _device
from .testing import free_port
from .bench_report import bus_factor, bytes_moved, efficiency_report, format_table, write_outputs
from .validation import REDUCE_DTYPES

BUFFER_KEY = "symmtriton_bench"
MODES = ("eager", "graph")
#: rows at or above this size get a kernel-efficiency figure on the GPU.
EFF_MIN_BYTES = 1 << 20
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
          "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}


def parse_bytes(text: str) -> int:
    """``"64K"``, ``"1MB"``, ``"256MiB"``, ``"4096"`` -> bytes (K = 1024, as nccl-tests)."""
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"not a byte size: {text!r} (examples: 1024, 64K, 1MB, 256M)")
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


def sweep_sizes(min_bytes: int, max_bytes: int) -> tuple[int, ...]:
    """``min_bytes, 2*min_bytes, ...`` up to ``max_bytes``."""
    if min_bytes < 1 or max_bytes < min_bytes:
        raise ValueError(f"need 1 <= min-bytes <= max-bytes, got {min_bytes} and {max_bytes}")
    out, s = [], min_bytes
    while s <= max_bytes:
        out.append(s)
        s *= 2
    return tuple(out)


@dataclass(frozen=True)
class BenchOptions:
    """Validated command-line options (see ``--help``)."""

    ops: tuple
    dtypes: tuple
    modes: tuple
    placements: tuple
    sizes: tuple
    iters: int
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

    def __post_init__(self):
        for key in ("iters", "graph_iters", "hidden"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if self.buffer_mb is not None and not self.buffer_mb > 0:
            raise ValueError(f"--buffer-mb must be > 0, got {self.buffer_mb}")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"--backend must be auto, nccl or gloo, got {self.backend!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="symmtriton-bench",
        description="Benchmark symmtriton's collectives (all-gather, reduce-scatter, fused "
                    "reduce-scatter + add + RMSNorm + all-gather) against torch.distributed, "
                    "PyTorch's symmetric-memory ops and a local-copy ceiling. Run on every rank, "
                    "e.g. torchrun --nproc-per-node 8 -m symmtriton.bench.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""\
columns (CSV/JSON; the table shows most of them):
  size_bytes   nccl-tests size: gathered output (all_gather), full input (reduce_scatter, fused)
  count        elements in size_bytes
  path         symmetric (Triton kernels) or fallback (symmetric memory unavailable)
  block_size, num_warps, max_blocks   launch config used (tuned winner or default)
  time_us      median per call, MAX over ranks; algbw = size/time; busbw = algbw*(W-1)/W
               (fused: *2(W-1)/W)
  check        ok / FAIL against symmtriton.reference on rank-tagged data (all ranks agree)
  baseline_us  torch.distributed (NCCL or gloo), speedup = baseline_us / time_us
  symm_mem_us  torch.ops.symm_mem (op in symm_mem_op), when this torch has one that runs
  copy_us      a device copy of size_bytes (the local ceiling); copy_gbs counts read + write
  efficiency   GPU, size >= 1 MiB: (bytes the kernel moves through this rank's memory / time)
               / copy_gbs; bytes moved = size + size/W, + 2 x size when staged (fused: twice
               size + size/W)

examples:
  torchrun --nproc-per-node 8 -m symmtriton.bench --ops all_gather,reduce_scatter
  torchrun --nproc-per-node 2 -m symmtriton.bench --max-bytes 4K --iters 2 --warmup 1  # CPU
  symmtriton-bench --tune --modes graph          # tune the swept sizes, then benchmark
""")
    p.add_argument("--ops", default="all_gather,reduce_scatter,fused",
                   help="comma list of all_gather, reduce_scatter, fused (default: all)")
    p.add_argument("--dtypes", default="bfloat16",
                   help="comma list of bfloat16, float16, float32 (default: bfloat16)")
    p.add_argument("--modes", default="eager,graph",
                   help="comma list of eager, graph (graph: CUDA graph replays; GPU only, skipped "
                        "on the CPU) (default: eager,graph)")
    p.add_argument("--placement", default="zero_copy,staged",
                   help="comma list: zero_copy (operand already in the symmetric buffer: AG "
                        "output, RS input, fused input), staged (ordinary tensors) "
                        "(default: both)")
    p.add_argument("--min-bytes", default="1K", help="smallest size (default 1K)")
    p.add_argument("--max-bytes", default=None,
                   help="largest size, x2 steps from --min-bytes (default 256M on the GPU, 64K on "
                        "the CPU)")
    p.add_argument("--iters", type=int, default=None,
                   help="timed calls per row, median reported (default 50 GPU, 3 CPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls before timing (default 10 GPU, 1 CPU)")
    p.add_argument("--graph-iters", type=int, default=10,
                   help="calls captured in one CUDA graph in graph mode (default 10)")
    p.add_argument("--hidden", type=int, default=4096,
                   help="hidden size H of the fused op's [S, H] input (default 4096; smaller "
                        "when a size holds fewer than W rows)")
    p.add_argument("--out-dir", default=os.path.join("benchmarks", "results"),
                   help="where rank 0 writes CSV, JSON and PNG (default benchmarks/results)")
    p.add_argument("--name", default=None,
                   help="file stem (default symmtriton_<device>_w<world size>)")
    p.add_argument("--tune", action="store_true",
                   help="autotune every swept op/dtype/size first and write the tuning cache "
                        "($SYMMTRITON_TUNING_CACHE, default ~/.cache/symmtriton/tuning.json)")
    p.add_argument("--no-baselines", dest="baselines", action="store_false",
                   help="skip torch.distributed, torch symm_mem and local-copy timings")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="do not write the PNG")
    p.add_argument("--backend", default="auto", choices=("auto", "nccl", "gloo"),
                   help="process-group backend when this command creates the group (default: "
                        "gloo without CUDA or when ranks share a GPU, else nccl)")
    p.add_argument("--buffer-mb", type=float, default=None,
                   help="symmetric buffer size in MiB (default: 3 x max size, at least 1)")
    return p


def parse_options(argv=None) -> BenchOptions:
    """Parse and validate ``argv`` (``ValueError`` names the bad value)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    on_gpu = _device().type == "cuda"
    try:
        dtype_names = _csv_list(args.dtypes, [tuning.dtype_name(t) for t in REDUCE_DTYPES], "dtypes")
        return BenchOptions(
            ops=_csv_list(args.ops, workloads.OPS, "ops"),
            dtypes=tuple(tuning.parse_dtype(d) for d in dtype_names),
            modes=_csv_list(args.modes, MODES, "modes"),
            placements=_csv_list(args.placement, workloads.PLACEMENTS, "placement"),
            sizes=sweep_sizes(parse_bytes(args.min_bytes),
                              parse_bytes(args.max_bytes or ("256M" if on_gpu else "64K"))),
            iters=args.iters if args.iters is not None else (50 if on_gpu else 3),
            warmup=args.warmup if args.warmup is not None else (10 if on_gpu else 1),
            graph_iters=args.graph_iters, hidden=args.hidden, out_dir=args.out_dir, name=args.name,
            tune=args.tune, baselines=args.baselines, plot=args.plot, backend=args.backend,
            buffer_mb=args.buffer_mb)
    except ValueError as exc:
        parser.error(str(exc))  # usage + message, exit status 2


# ------------------------------------------------------------------------------------------------
# process group


def init_distributed(backend: str = "auto"):
    """``(group, created)``: the WORLD group, initialised here from torchrun's ``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK`` (``LOCAL_WORLD_SIZE``) unless already initialised. ``auto``
    picks gloo without CUDA (or with ``SYMMTRITON_BACKEND=host``) and when several ranks share a
    GPU (NCCL refuses that; symmetric memory then needs
    ``TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1``, set here if unset), NCCL otherwise."""
    if dist.is_initialized():
        return dist.group.WORLD, False
    env = os.environ
    try:
        rank, world = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
        local_rank = int(env.get("LOCAL_RANK", "0"))
        local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers, got "
                         f"{[env.get(k) for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE')]}") from None
    cuda = _device().type == "cuda"
    shared = cuda and local_world > torch.cuda.device_count()
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if shared:
        os.environ.setdefault("TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES", "1")
    if backend == "auto":
        backend = "nccl" if cuda and not shared else "gloo"
    elif backend == "nccl" and (not cuda or shared):
        raise ValueError("--backend nccl needs one GPU per rank "
                         f"(CUDA in use: {cuda}, {local_world} local ranks on "
                         f"{torch.cuda.device_count() if cuda else 0} GPUs)")
    if "MASTER_ADDR" not in env:
        if world != 1:
            raise ValueError(f"WORLD_SIZE={world} but MASTER_ADDR is unset: launch with torchrun")
        env["MASTER_ADDR"], env["MASTER_PORT"] = "127.0.0.1", str(free_port())
    dist.init_process_group(backend, rank=rank, world_size=world)
    return dist.group.WORLD, True


# ------------------------------------------------------------------------------------------------
# timing


def timed(fn, mode: str, opts: BenchOptions, dev, group) -> float | None:
    """Agreed seconds per call of ``fn`` (MAX over ranks), or ``None`` when it failed on some
    rank. ``fn`` must fail alike on every rank (before launching anything) or not at all."""
    ok, t = True, math.inf
    try:
        if mode == "graph":
            t = timing.graph_time(fn, iters=opts.iters, warmup=opts.warmup,
                                  graph_iters=opts.graph_iters, device=dev, group=group)
        else:
            t = timing.median_time(fn, iters=opts.iters, warmup=opts.warmup, device=dev, group=group)
    except timing.CaptureError:  # agreed inside graph_time
        return None
    except Exception:
        ok = False
    if not timing.all_ranks_ok(ok, group):
        return None
    return timing.all_reduce_max([t], group)[0]


# ------------------------------------------------------------------------------------------------
# rows


@dataclass(frozen=True)
class Shape:
    """One row's operands: ``numel`` per shard (see :class:`symmtriton.workloads.Workload`)."""

    numel: int
    hidden: int | None
    total_bytes: int
    count: int


def shape_for(op: str, nbytes: int, dtype: torch.dtype, world: int, hidden: int) -> Shape:
    """The operands nearest ``nbytes`` (rounded down to whole shards; fused: ``[S, H]`` with
    ``H = hidden``, or less when ``nbytes`` holds fewer than ``W`` rows, and ``S`` a multiple of
    ``W``)."""
    esize = dtype.itemsize
    if op != "fused":
        numel = max(1, nbytes // (world * esize))
        return Shape(numel, None, world * numel * esize, world * numel)
    h = min(hidden, max(1, nbytes // (world * esize)))
    rows = max(1, nbytes // (world * esize * h))
    return Shape(rows * h, h, world * rows * h * esize, world * rows * h)


def _zeros(shape, dtype, dev):
    return torch.zeros(shape, dtype=dtype, device=dev)


def dist_baseline(op: str, shape: Shape, dtype, group, dev):
    """torch.distributed's version of ``op`` on ordinary tensors (fused: reduce-scatter, add,
    RMSNorm, all-gather, unfused)."""
    world = dist.get_world_size(group)
    n = shape.numel
    if op == "all_gather":
        inp, out = _zeros(n, dtype, dev), torch.empty(world * n, dtype=dtype, device=dev)
        return lambda: torch_all_gather(out, inp, group)
    if op == "reduce_scatter":
        inp, out = _zeros(world * n, dtype, dev), torch.empty(n, dtype=dtype, device=dev)
        return lambda: torch_reduce_scatter(out, inp, group)
    h = shape.hidden
    inp, res = _zeros((world * n // h, h), dtype, dev), _zeros((n // h, h), dtype, dev)
    weight, part = torch.ones(h, dtype=dtype, device=dev), torch.empty((n // h, h), dtype=dtype, device=dev)
    out = torch.empty((world * n // h, h), dtype=dtype, device=dev)

    def fused():
        torch_reduce_scatter(part, inp, group)
        res.add_(part)
        torch_all_gather(out, reference.rmsnorm(res, weight, workloads.FUSED_EPS), group)
    return fused


#: torch.ops.symm_mem ops tried per op, in order: (name, needs multicast).
SYMM_MEM_OPS = {
    "all_gather": (("multimem_all_gather_out", True), ("_low_contention_all_gather", False)),
    "reduce_scatter": (("reduce_scatter_out", False),),
    "fused": (("one_shot_all_reduce", False),),
}


#: torch.ops.symm_mem ops that cannot be captured in a CUDA graph.
SYMM_MEM_NOT_CAPTURABLE = ("_low_contention_all_gather",)


def symm_mem_baseline(op: str, shape: Shape, dtype, group, dev):
    """``(name, fn)`` running PyTorch's symmetric-memory version of ``op`` (fused: the
    one-shot all-reduce of the same input, communication only), or ``(None, why)``. Every step
    that can fail is agreed over the group before the next collective step."""
    ops = getattr(torch.ops, "symm_mem", None)
    if dev.type != "cuda" or ops is None:
        return None, "torch symm_mem ops need CUDA"
    import torch.distributed._symmetric_memory as symm

    world, name = dist.get_world_size(group), group.group_name
    n = shape.numel
    for op_name, needs_mc in SYMM_MEM_OPS[op]:
        if not hasattr(ops, op_name):
            continue
        ok, big = True, None
        try:
            big = symm.empty(world * n, dtype=dtype, device=dev)
        except Exception:
            ok = False
        if not timing.all_ranks_ok(ok, group):
            return None, "symm_mem.empty failed"
        try:
            hdl = symm.rendezvous(big, group)
        except Exception:  # e.g. a group this torch cannot rendezvous on
            hdl = None
        if not timing.all_ranks_ok(hdl is not None and (not needs_mc or hdl.multicast_ptr != 0), group):
            continue
        big.zero_()
        fn_op = getattr(ops, op_name)
        if op_name == "multimem_all_gather_out":
            inp = _zeros(n, dtype, dev)
            fn = (lambda i=inp, o=big: fn_op(i, name, o))
        elif op_name == "_low_contention_all_gather":
            fn = (lambda i=big[:n]: fn_op(i, name))
        elif op_name == "reduce_scatter_out":
            out = torch.empty(n, dtype=dtype, device=dev)
            fn = (lambda i=big, o=out: fn_op(i, name, False, o))
        else:  # one_shot_all_reduce
            fn = (lambda i=big: fn_op(i, "sum", name))
        return op_name, fn
    return None, f"no usable torch.ops.symm_mem op for {op}"


def copy_baseline(shape: Shape, dev):
    src = torch.zeros(shape.total_bytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _us(t):
    return None if t is None else round(t * 1e6, 3)


def _ratio(a, b):
    return None if a is None or b is None or b <= 0 else round(a / b, 3)


def _log(rank: int, msg: str, *, err: bool = False) -> None:
    if rank == 0:
        print(msg, file=sys.stderr if err else sys.stdout, flush=True)


def run_sweep(opts: BenchOptions, group) -> tuple[list[dict], list[str]]:
    """Every row of ``opts`` on every rank, in the same order; returns (rows, notes), identical
    on every rank."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    dev = _device()
    notes: list[str] = []

    def note(msg):
        if msg not in notes:
            notes.append(msg)
            _log(rank, f"# note: {msg}", err=True)

    ops = []
    for op in opts.ops:
        if workloads.op_available(op):
            ops.append(op)
        else:
            note(f"{op}: skipped, symmtriton.reduce_scatter_add_rmsnorm_all_gather does not exist yet")
    modes = list(opts.modes)
    if "graph" in modes and dev.type != "cuda":
        modes.remove("graph")
        note("graph mode needs CUDA: skipped")
    buf = SymmetricMemoryManager.buffer_for_group(group)
    path = "symmetric" if buf.symm_mem_hdl is not None else "fallback"
    if path == "fallback":
        note(f"symmetric memory unavailable ({buf.init_failure_reason}): symmtriton rows measure "
             "the torch.distributed fallback; zero_copy rows are skipped")
    dist_name = str(dist.get_backend(group))

    if opts.tune and path == "symmetric":
        for op in ops:
            for dtype in opts.dtypes:
                for nbytes in opts.sizes:
                    shape = shape_for(op, nbytes, dtype, world, opts.hidden)
                    key_numel, key_dtype = tuning.launch_key(op, shape.numel, dtype)
                    cands = tuning.candidate_configs(op, key_numel, key_dtype, world, hidden=shape.hidden,
                                                     max_candidates=None if dev.type == "cuda" else 2)
                    try:
                        res = tuning.tune(op, shape.numel, dtype, group, cands, hidden=shape.hidden,
                                          iters=opts.iters, warmup=opts.warmup)
                    except (RuntimeError, ValueError) as exc:
                        note(f"tuning {op} skipped: {exc}")
                        break
                    _log(rank, f"tune {op} {tuning.dtype_name(dtype)} {shape.total_bytes} B: "
                               f"{res.winner.as_dict()} {res.winner_time_s * 1e6:.1f} us "
                               f"({len(cands)} candidates)", err=True)
        if dev.type != "cuda":
            note("tuned on the CPU interpreter: the cache holds plumbing, not speed")

    plan = [(op, dtype, nbytes, mode, placement) for op in ops for dtype in opts.dtypes
            for nbytes in opts.sizes for mode in modes for placement in opts.placements]
    rows: list[dict] = []
    baselines: dict = {}
    for i, (op, dtype, nbytes, mode, placement) in enumerate(plan, 1):
        shape = shape_for(op, nbytes, dtype, world, opts.hidden)
        bkey = (op, dtype, shape.total_bytes, mode)
        if opts.baselines and bkey not in baselines:
            # A capture the driver invalidates is costly (see timing._abandon_capture): in graph
            # mode skip what failed eagerly and what is known not to be capturable.
            eager = baselines.get((op, dtype, shape.total_bytes, "eager"), {})

            def capturable(key, why_not=None):
                if mode != "graph":
                    return True
                if why_not:
                    note(f"graph mode: {why_not}")
                    return False
                return not eager or eager.get(key) is not None

            base = {"baseline": dist_name}
            gloo = "nccl" not in dist_name
            base["baseline_s"] = (timed(dist_baseline(op, shape, dtype, group, dev), mode, opts, dev, group)
                                  if capturable("baseline_s", gloo and f"torch.distributed over {dist_name} "
                                                "is not capturable: skipped") else None)
            sm_name, sm_fn = symm_mem_baseline(op, shape, dtype, group, dev)
            if sm_name is None:
                note(f"torch symm_mem baseline for {op}: {sm_fn}")
            base["symm_mem_op"] = sm_name
            base["symm_mem_s"] = (timed(sm_fn, mode, opts, dev, group) if sm_name and capturable(
                "symm_mem_s", sm_name in SYMM_MEM_NOT_CAPTURABLE and f"{sm_name} (side stream, host "
                "barrier) is not capturable: skipped") else None)
            base["copy_s"] = timed(copy_baseline(shape, dev), mode, opts, dev, group)
            baselines[bkey] = base
        base = baselines.get(bkey, {})
        if placement == "zero_copy" and path == "fallback":
            continue
        wl = workloads.make_workload(op, shape.numel, dtype, group, placement=placement, hidden=shape.hidden)
        key_numel, key_dtype = tuning.launch_key(op, shape.numel, dtype)
        cfg = tuning.lookup_config(op, key_numel, key_dtype, world, hidden=shape.hidden)
        ok = True
        try:
            ok = wl.check()
        except Exception as exc:  # a raise before launch: alike on every rank
            ok = False
            note(f"{op} {placement}: {type(exc).__name__}: {exc}")
        ok = timing.all_ranks_ok(ok, group)
        wl.reset()
        t = timed(wl.run, mode, opts, dev, group)
        total = shape.total_bytes
        algbw = None if t is None else total / t / 1e9
        copy_s = base.get("copy_s")
        eff = None
        if dev.type == "cuda" and total >= EFF_MIN_BYTES and t and copy_s:
            eff = round(bytes_moved(op, placement, total, world) / t / (2 * total / copy_s), 3)
        row = {
            "size_bytes": total, "count": shape.count, "dtype": tuning.dtype_name(dtype), "op": op,
            "placement": placement, "mode": mode, "world_size": world, "path": path,
            **cfg.as_dict(), "time_us": _us(t),
            "algbw_gbs": None if algbw is None else round(algbw, 3),
            "busbw_gbs": None if algbw is None else round(algbw * bus_factor(op, world), 3),
            "check": "ok" if ok else "FAIL",
            "baseline": base.get("baseline"), "baseline_us": _us(base.get("baseline_s")),
            "speedup": _ratio(base.get("baseline_s"), t),
            "symm_mem_op": base.get("symm_mem_op"), "symm_mem_us": _us(base.get("symm_mem_s")),
            "speedup_symm_mem": _ratio(base.get("symm_mem_s"), t),
            "copy_us": _us(copy_s), "copy_gbs": None if not copy_s else round(2 * total / copy_s / 1e9, 3),
            "efficiency": eff,
        }
        rows.append(row)
        _log(rank, f"[{i}/{len(plan)}] {op} {row['dtype']} {total} B {placement} {mode}: "
                   f"{row['time_us']} us ({row['check']})", err=True)
    return rows, notes


# ------------------------------------------------------------------------------------------------
# output


def bench_meta(group, opts: BenchOptions, argv) -> dict:
    """Provenance recorded in the JSON (no host names)."""
    import triton

    from .backends import select_backend

    return {
        "tool": "symmtriton-bench", "symmtriton": symmtriton.__version__, "torch": torch.__version__,
        "triton": triton.__version__, "cuda": torch.version.cuda, "device": tuning.device_name(),
        "world_size": dist.get_world_size(group), "backend": select_backend(),
        "dist_backend": str(dist.get_backend(group)),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "options": {k: (list(map(tuning.dtype_name, v)) if k == "dtypes" else v)
                    for k, v in asdict(opts).items()},
    }


def main(argv=None) -> int:
    """Entry point (every rank). Returns 0, or 1 when a check failed."""
    opts = parse_options(argv)
    group, created = init_distributed(opts.backend)
    rank = dist.get_rank(group)
    try:
        size_mb = opts.buffer_mb or max(1.0, math.ceil(3 * max(opts.sizes) / (1 << 20)))
        SymmetricMemoryManager.get_buffer(BUFFER_KEY, group, size_mb=size_mb)
        rows, notes = run_sweep(opts, group)
        failed = any(r["check"] != "ok" for r in rows)
        if rank == 0:
            meta = bench_meta(group, opts, argv)
            print(format_table(rows, meta))
            eff = efficiency_report(rows)
            if eff:
                print(eff)
            paths = write_outputs(rows, notes, meta, opts)
            print("# wrote " + ", ".join(paths.values()), file=sys.stderr)
            if failed:
                print("# FAIL: some rows did not match the reference", file=sys.stderr)
        timing.group_barrier(group)
        return 1 if failed else 0
    finally:
        if _device().type == "cuda":
            torch.cuda.synchronize()
        SymmetricMemoryManager.destroy(BUFFER_KEY)
        if created:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
