"""``symmtriton-bench`` / ``python -m symmtriton.tools.bench``: sweep the collectives against
torch.distributed, PyTorch's symmetric-memory ops and copy ceilings.

Run it on every rank (``torchrun --nproc-per-node N -m symmtriton.tools.bench ...``), or call
:func:`main` from every rank of an initialised process group. Rank 0 prints an nccl-tests-like
table, a progress line per row on stderr, and writes ``<name>.json`` (metadata,
:mod:`symmtriton.tools.bench.meta`: commit, versions, GPU names, world size, rank placement, timing
method, peer-copy ceiling, date) before the first row, ``<name>.csv`` row by row as each
finishes (an interrupted run keeps what it measured), then the complete ``<name>.json`` and
``<name>.png`` (matplotlib optional) into ``--out-dir``.

Every rank runs the same rows in the same order (the kernels' barriers are per block: all ranks
must launch the same grid). Each row is checked against :mod:`symmtriton.tools.reference` on
rank-tagged data before it is timed; the check result, like every time, is agreed over the group
(a MIN of the ok flags; a MAX over ranks of every timed sample: a collective is done when its
slowest rank is). Times run to completion (:mod:`symmtriton.tools.bench.timing`): eager samples of
``--eager-batch`` calls start after a barrier and stop after the whole device synchronised (work
left on side streams or copy engines included); ``graph`` mode captures ``--graph-iters`` calls
in one CUDA graph and times each replay with CUDA events. A row reports the median of
``--min-iters`` to ``--iters`` samples after ``--warmup`` calls (more only where the agreed
samples spread above ``--max-spread``), divided by the calls per sample.

Sizes are nccl-tests' ``size``: the gathered output (all-gather, all-gather-v), the full input
(reduce-scatter, reduce-scatter-v, fused), the tensor (all-reduce, all-reduce fused);
``algbw = size / time``, ``busbw = algbw * (W-1)/W`` (the gathers and scatters) or
``algbw * 2(W-1)/W`` (all-reduce, and the fused ops: a reduce-scatter plus an all-gather). The
variable-count ops run once per count distribution of ``--v-counts`` (column ``variant``); the
all-reduce rows name the algorithm their size picks by default (one_shot, two_shot). The RMSNorm
row ops run once per form of ``--fp8`` (column ``fp8``; :mod:`symmtriton.tools.bench.rownorm`).
Efficiency compares a row with the copy bandwidth to a peer GPU when the ranks are on different
GPUs (measured once at start), else with a local copy. A row whose busbw (symmtriton's, the
baseline's or symm_mem's) exceeds that peer-copy ceiling by more than 5% is marked
``valid: false`` with a warning line (:func:`symmtriton.tools.bench.report.mark_validity`). The exit
status is 1 when a row's check failed on some rank.
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch
import torch.distributed as dist

from symmtriton import tuning
from symmtriton.config import OPS
from symmtriton.memory import SymmetricMemoryManager
from symmtriton.ops import driver

from ..testing import OVERLAP_ENV, free_port, release, teardown
from ..testing import device as _device
from . import moe, rownorm, timing, tune, workloads
from .baselines import Baselines, Shape, peer_copy_gbs, shape_for, topology
from .meta import bench_meta, ceiling_meta
from .options import BenchOptions, parse_options
from .report import (ResultFiles, ceiling_applies, efficiency_report, format_table,
                     mark_validity, result_row, row_label)

BUFFER_KEY = "symmtriton_bench"
#: rows above this size are not checked: the fp64 references would need several times the size.
CHECK_MAX_BYTES = 1 << 30
#: rows above this size warm up with at most 3 calls (each call is milliseconds).
BIG_BYTES = 64 << 20


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
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
        raise ValueError("RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers, got "
                         f"{[env.get(k) for k in names]}") from None
    cuda = _device().type == "cuda"
    shared = cuda and local_world > torch.cuda.device_count()
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if shared:
        os.environ.setdefault(OVERLAP_ENV, "1")
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


def tune_sweep(opts: BenchOptions, group, ops, note, log) -> None:
    """``--tune``: autotune every op, dtype and size of the sweep (writes the tuning cache)."""
    world, dev = dist.get_world_size(group), _device()
    for op in (op for op in ops if op in OPS):  # the others have no tuning-cache entry
        for dtype in opts.dtypes:
            for nbytes in opts.sizes:
                shape = shape_for(op, nbytes, dtype, world, opts.hidden)
                key_numel, key_dtype = tuning.launch_key(op, shape.numel, dtype)
                cands = tune.candidate_configs(op, key_numel, key_dtype, world,
                                               hidden=shape.hidden,
                                               max_candidates=None if dev.type == "cuda" else 2)
                try:
                    res = tune.tune(op, shape.numel, dtype, group, cands, hidden=shape.hidden,
                                    iters=opts.iters, warmup=opts.warmup)
                except (RuntimeError, ValueError) as exc:
                    note(f"tuning {op} skipped: {exc}")
                    break
                log(f"tune {op} {tuning.dtype_name(dtype)} {shape.total_bytes} B: "
                    f"{res.winner.as_dict()} {res.winner_time_s * 1e6:.1f} us "
                    f"({len(cands)} candidates)")
    if dev.type != "cuda":
        note("tuned on the CPU interpreter: the cache holds plumbing, not speed")


def _variant(counts) -> str | None:
    """The row's ``variant``: the count distribution (variable-count ops) and the path of the
    last plan (its ``path`` and ``algorithm``, ``symmtriton.ops.driver.PATHS``): ``lines``
    (barrier-free, kernels/lines.py), ``push`` / ``push_one_shot`` (flagged chunks,
    kernels/push.py), ``one_shot``/``two_shot`` (the all-reduce's barrier kernels), ``barrier``
    or ``multimem``; nothing for an empty call or the fallback; ``None`` parts are left out."""
    plan = driver.last_plan()
    kind = getattr(plan, "path", None)
    algorithm = getattr(plan, "algorithm", None)
    if kind in ("empty", "fallback"):
        kind = None
    elif kind == "push" and algorithm == "one_shot":
        kind = "push_one_shot"
    elif kind in ("barrier", "multimem") and algorithm in ("one_shot", "two_shot"):
        kind = algorithm
    return "/".join(x for x in (counts, kind) if x) or None


def _log(rank: int, msg: str, *, err: bool = False) -> None:
    if rank == 0:
        print(msg, file=sys.stderr if err else sys.stdout, flush=True)


def _notes(rank: int):
    """``(notes, note, warn)``: the run's note lines, ``note(msg)`` adding one once (printed
    ``# note:`` on rank 0), ``warn(msg)`` adding one every time (``# WARNING:``)."""
    notes: list[str] = []

    def note(msg):
        if msg not in notes:
            notes.append(msg)
            _log(rank, f"# note: {msg}", err=True)

    def warn(msg):
        notes.append(msg)
        _log(rank, f"# WARNING: {msg}", err=True)

    return notes, note, warn


def _fp8_forms(opts: BenchOptions, op: str) -> tuple:
    """The FP8 forms of ``--fp8`` that ``op``'s rows run (``None``: without FP8): the RMSNorm
    row ops take :data:`rownorm.FORMS`, the MoE ops those of :data:`moe.FP8_FORMS`; an op
    without any of the chosen forms runs without FP8."""
    takes = rownorm.FORMS if op in workloads.NORM_OPS else moe.FP8_FORMS.get(op, ())
    forms = tuple(None if f == "none" else f for f in opts.fp8 if f == "none" or f in takes)
    return forms or (None,)


def _sweep_plan(opts: BenchOptions, dev, note) -> list[tuple]:
    """The rows, in order: ``(op, dtype, nbytes, v-count kind, mode, placement, FP8 form)``
    (graph mode only with CUDA)."""
    modes = list(opts.modes)
    if "graph" in modes and dev.type != "cuda":
        modes.remove("graph")
        note("graph mode needs CUDA: skipped")
    if "zero_copy" in opts.placements and set(opts.ops) & set(moe.MOE_OPS):
        note("moe_dispatch / moe_combine: staged rows only")
    return [(op, dtype, nbytes, kind, mode, placement, fp8)
            for op in opts.ops for dtype in opts.dtypes
            for nbytes in (opts.sizes if op not in moe.MOE_OPS else (None,))
            for kind in (opts.v_counts if op in workloads.V_OPS else (None,))
            for fp8 in _fp8_forms(opts, op) for mode in modes for placement in opts.placements
            if op not in moe.MOE_OPS or placement == "staged"]


def _check(wl, nbytes: int, group, note, what: str) -> str:
    """``ok`` / ``FAIL`` (agreed over ``group``) of ``wl.check()``, ``skip`` above
    :data:`CHECK_MAX_BYTES`; an exception (raised before launch: alike on every rank) fails."""
    if nbytes > CHECK_MAX_BYTES:
        return "skip"
    return timing.agreed_check(wl.check, group, note, what)


def _measure(opts: BenchOptions, group, dev, spec: tuple, shape, warmup: int, note) -> tuple:
    """``(time, launch config, check, variant, extra baseline times)`` of symmtriton's call for
    one row ``spec``; an FP8 row (:class:`rownorm.Fp8Row`) also times ``ours_quant`` (with
    baselines)."""
    op, dtype, _, kind, mode, placement, fp8 = spec
    world = dist.get_world_size(group)
    wl = workloads.make_workload(op, shape.numel, dtype, group, placement=placement,
                                 hidden=shape.hidden, counts=kind,
                                 algorithm=opts.algorithm if op in workloads.WHOLE_OPS else None)
    cfg = None  # untuned ops pick their launch config inside
    if op in OPS:
        key_numel, key_dtype = tuning.launch_key(op, shape.numel, dtype)
        cfg = tuning.lookup_config(op, key_numel, key_dtype, world, hidden=shape.hidden)
    row = wl if fp8 is None else rownorm.Fp8Row(wl, fp8, baselines=opts.baselines, note=note)
    check = _check(row, shape.total_bytes, group, note, f"{op} {placement}")
    wl.reset()
    t = timing.agreed_time(row.run, mode, device=dev, group=group, **opts.counts(warmup))
    variant, extra = _variant(kind), {}
    if fp8 is not None and opts.baselines:
        extra["ours_quant_s"] = timing.agreed_time(row.run_ours_quant, mode, device=dev,
                                                   group=group, **opts.counts(warmup))
    del wl, row
    return t, cfg, check, variant, extra


def run_sweep(opts: BenchOptions, group, meta: dict, *,
              on_row=None) -> tuple[list[dict], list[str]]:
    """Every row of ``opts`` on every rank, in the same order; returns (rows, notes), identical
    on every rank. ``on_row(row)`` is called as each row finishes. ``meta``'s peer-copy ceiling
    (``meta["ceiling"]``) is the efficiency ceiling of cross-GPU rows and validates every row
    (:func:`symmtriton.tools.bench.report.mark_validity`: a warning line and a note per time
    over it)."""
    rank = dist.get_rank(group)
    dev, t_start = _device(), time.monotonic()
    notes, note, warn = _notes(rank)
    plan = _sweep_plan(opts, dev, note)
    buf = SymmetricMemoryManager.buffer_for_group(group)
    path = "symmetric" if buf.symm_mem_hdl is not None else "fallback"
    if path == "fallback":
        note(f"symmetric memory unavailable ({buf.init_failure_reason}): symmtriton rows measure "
             "the torch.distributed fallback; zero_copy rows are skipped")
    if opts.tune and path == "symmetric":
        tune_sweep(opts, group, list(opts.ops), note, lambda msg: _log(rank, msg, err=True))
    rows: list[dict] = []
    baselines = Baselines(opts, group, note)
    for i, spec in enumerate(plan, 1):
        row = _row(opts, group, dev, spec, baselines, path, meta, note)
        if row is None:
            continue
        applies = ceiling_applies(row["op"], meta["multicast"])
        for msg in mark_validity(row, meta["ceiling"]["peer_copy_gbs"] if applies else None):
            warn(msg)
        rows.append(row)
        if on_row is not None:
            on_row(row)
        _log(rank, f"[{i}/{len(plan)} {time.monotonic() - t_start:6.1f} s] {row_label(row)}: "
                   f"{row['time_us']} us ({row['check']})", err=True)
    return rows, notes


def _row(opts: BenchOptions, group, dev, spec: tuple, baselines, path: str, meta: dict, note):
    """The result row of ``spec`` (``None``: a zero-copy row without symmetric memory). An MoE
    row's shape is ``opts.moe`` (:mod:`symmtriton.tools.bench.moe`), its size this rank's
    tokens."""
    op, dtype, nbytes, kind, mode, placement, fp8 = spec
    world = dist.get_world_size(group)
    if op in moe.MOE_OPS:
        t, check, base = moe.measure(opts, opts.moe, op, dtype, mode, opts.warmup, group, note,
                                     use_fp8=fp8 is not None)
        n = opts.moe.tokens * opts.moe.hidden
        shape, cfg, variant = Shape(n, opts.moe.hidden, n * dtype.itemsize, n), None, _variant(None)
    else:
        shape = shape_for(op, nbytes, dtype, world, opts.hidden)
        counts = workloads.v_counts(kind, shape.count // shape.hidden, world) if kind else None
        warmup = opts.warmup if shape.total_bytes <= BIG_BYTES else min(opts.warmup, 3)
        base = baselines.get(op, dtype, shape, mode, warmup, counts, fp8)
        if placement == "zero_copy" and path == "fallback":
            return None
        t, cfg, check, variant, extra = _measure(opts, group, dev, spec, shape, warmup, note)
        base = {**base, **extra}
    return result_row(op, variant, dtype, shape, placement, mode, world, path, cfg, t, check,
                      base, meta, on_gpu=dev.type == "cuda", fp8=fp8)


def main(argv=None) -> int:
    """Entry point (every rank). Returns 0, or 1 when a check failed."""
    opts = parse_options(argv)
    group, created = init_distributed(opts.backend)
    rank = dist.get_rank(group)
    t0 = time.monotonic()
    # Leaving: on success every rank tears down together (graphs, buffers, barrier, group); on
    # an error only local memory is released: peers may be stuck, a barrier could hang.
    try:
        size_mb = opts.buffer_mb or max(1.0, math.ceil(3 * max(opts.sizes) / (1 << 20)),
                                        moe.buffer_mb(opts, dist.get_world_size(group)))
        buf = SymmetricMemoryManager.get_buffer(BUFFER_KEY, group, size_mb=size_mb)
        topo = topology(group, _device())
        p2p = peer_copy_gbs(buf, topo, group)
        hdl = buf.symm_mem_hdl
        multicast = timing.all_ranks_ok(hdl is not None and bool(hdl.multicast_ptr), group)
        ceiling = ceiling_meta(topo, dist.get_world_size(group), p2p, opts.peer_copy_gbs,
                               hdl is not None, multicast)
        meta = bench_meta(group, opts, argv, topo, p2p, buf, ceiling, multicast)
        files = ResultFiles(opts, meta) if rank == 0 else None
        if p2p is not None:
            _log(rank, "# peer copy (every rank into the next rank's GPU at once): "
                       f"{p2p:.0f} GB/s", err=True)
        _log(rank, f"# peer-copy ceiling: {ceiling['peer_copy_gbs']} GB/s, {ceiling['source']}",
             err=True)
        rows, notes = run_sweep(opts, group, meta, on_row=files.add if files else None)
        failed = any(r["check"] == "FAIL" for r in rows)
        invalid = sum(r["valid"] is False for r in rows)
        if rank == 0:
            print(format_table(rows, meta))
            eff = efficiency_report(rows)
            if eff:
                print(eff)
            paths = files.finish(rows, notes)
            print(f"# {len(rows)} rows in {time.monotonic() - t0:.1f} s; wrote "
                  + ", ".join(paths.values()), file=sys.stderr)
            if failed:
                print("# FAIL: some rows did not match the reference", file=sys.stderr)
            if invalid:
                print(f"# WARNING: {invalid} rows invalid (a busbw over the peer-copy ceiling): "
                      "see the WARNING lines and the valid / over_ceiling columns", file=sys.stderr)
    except BaseException:
        release(keys=None if created else [BUFFER_KEY])
        raise
    teardown(group=group, destroy_group=created, keys=None if created else [BUFFER_KEY])
    return 1 if failed else 0

