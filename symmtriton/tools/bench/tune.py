"""The collective tuner (a tool: the runtime never imports it): :func:`tune` is a *collective*
call (every rank of the group must make it, with the same arguments) that times candidate
configs (:func:`candidate_configs`) and records the winner in the cache file that
:func:`symmtriton.tuning.lookup_config` reads (format: :mod:`symmtriton.tuning`).

Agreement protocol of :func:`tune` (the kernels have per-block barriers, so every rank must
launch the same grid in the same order, and a config is only usable if every rank uses it):

1. the ranks exchange their arguments and candidate lists and raise ``ValueError`` on every rank
   if any differ (nothing has been launched yet);
2. every rank runs the candidates in list order, each with the same warm-up and iteration counts
   and a group barrier before its timed iterations; a candidate the op rejects with
   ``ValueError`` (raised before any launch, alike on every rank) gets an infinite time;
3. the per-candidate times (median per rank: CUDA events on the GPU, ``time.perf_counter`` on the
   CPU) are reduced over the group with a MAX all-reduce: a collective is as slow as its slowest
   rank;
4. group rank 0 picks the fastest candidate (first one on ties) and broadcasts its index; no rank
   ever chooses from its own local timings;
5. every rank records the winner in its in-memory table; group rank 0 merges it into the cache
   file (atomically: temporary file + ``os.replace``), then a group barrier, so the file holds
   the winner on every rank once :func:`tune` returns.
"""

from __future__ import annotations

import datetime as _dt
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from symmtriton.backends import backend_device, select_backend
from symmtriton.config import (LaunchConfig, check_dtype, check_hidden, check_op, default_config,
                               size_bucket)
from symmtriton.context import find_buffer
from symmtriton.memory import resolve_group
from symmtriton.tuning import cache_key, device_name, dtype_name, launch_key, store_winner
from symmtriton.validation import check_count

from .timing import (CaptureError, all_reduce_max, check_warmup, graph_time, group_barrier,
                     group_device, median_time)
from .workloads import make_workload

# ------------------------------------------------------------------------------------------------
# candidates

_MIN_INFLIGHT = 512 * 1024  # bytes one round of chunks should cover (see candidate_configs)


def candidate_configs(op: str, numel: int, dtype: torch.dtype, world: int, *,
                      hidden: int | None = None, sm_count: int | None = None,
                      max_candidates: int | None = None) -> tuple[LaunchConfig, ...]:
    """Launch configs worth timing for a launch of ``numel`` elements of ``dtype`` per shard
    (the launch key: see :func:`launch_key`); ``default_config`` comes first.

    All-gather and reduce-scatter: block sizes are powers of two from one 16-byte access per
    thread of a warp (512 bytes) up to 32 KiB, no larger than the shard; warps 1..16 with every
    thread doing 1..16 (all-gather) or 1..8 (reduce-scatter: fp32 accumulators take more
    registers) 16-byte accesses per chunk.
    Fused (``hidden`` required): a block handles whole rows, so ``block_size`` stays the row
    block of ``default_config`` (the power of two covering ``hidden``: a smaller one would not
    cover a row); warps 1..32 with 2..16 row values per thread.
    Grid bounds: a quarter, half, one and two blocks per SM (``sm_count``: the GPU's, or 132 =
    H100 off the GPU), keeping only bounds that change the launched grid, and (chunked ops) only
    grids whose one round of chunks covers at least a quarter of ``min(shard, 512 KiB)``.

    A deterministic function of its arguments, so every rank builds the same list.
    ``max_candidates`` keeps the default plus evenly spaced others (the Triton interpreter is
    slow: CPU tuning checks the plumbing, not the speed)."""
    check_op(op)
    check_dtype(dtype)
    numel = check_count("numel", numel)
    world = check_count("world", world)
    check_hidden(op, numel, hidden)
    if sm_count is None:
        sm_count = 132  # H100, off the GPU
        if device_name() != "cpu":
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            sm_count = props.multi_processor_count
    grids = sorted({max(1, sm_count // 4), max(1, sm_count // 2), sm_count, 2 * sm_count})
    if op == "fused":
        out = _row_candidates(default_config(numel, dtype, world, hidden=hidden), numel // hidden,
                              world, grids)
    else:
        out = _chunk_candidates(op, default_config(numel, dtype, world, op=op), numel, dtype,
                                grids)
    if max_candidates is not None:
        check_count("max_candidates", max_candidates)
        if len(out) > max_candidates:
            base, rest, k = out[0], out[1:], max_candidates - 1
            if k <= 1:
                out = [base] + rest[-1:] * k
            else:  # len(rest) > k, so the spaced indices are distinct
                out = [base] + [rest[round(i * (len(rest) - 1) / (k - 1))] for i in range(k)]
    return tuple(out)


def _chunk_candidates(op, base: LaunchConfig, numel: int, dtype, grids) -> list[LaunchConfig]:
    esize = dtype.itemsize
    vec = max(1, 16 // esize)
    max_vecs = 16 if op == "all_gather" else 8
    out = [base]
    seen = {(base.block_size, base.num_warps, min(-(-numel // base.block_size), base.max_blocks))}
    block, hi = 32 * vec, max(32 * vec, min(size_bucket(numel), (32 * 1024) // esize))
    while block <= hi:
        chunks = -(-numel // block)
        bounds = [g for g in grids if g < chunks] + [g for g in grids if g >= chunks][:1]
        for warps in (1, 2, 4, 8, 16):
            if not 1 <= block // (32 * warps * vec) <= max_vecs:
                continue
            for bound in bounds:
                grid = min(bound, chunks)
                if grid * block * esize < min(numel * esize, _MIN_INFLIGHT) // 4:
                    continue  # too little in flight: a long loop of small chunks
                if (block, warps, grid) not in seen:
                    seen.add((block, warps, grid))
                    out.append(LaunchConfig(block_size=block, num_warps=warps, max_blocks=bound))
        block *= 2
    return out


def _row_candidates(base: LaunchConfig, rows: int, world: int, grids) -> list[LaunchConfig]:
    """Row-kernel candidates: ``base``'s row block, other warp counts and grid bounds, grids
    deduplicated as one block per row, at most ``max_blocks`` (the row kernel's grid)."""
    out, seen = [base], {(base.num_warps, min(rows, base.max_blocks))}
    for warps in (1, 2, 4, 8, 16, 32):
        if not 2 <= base.block_size // (32 * warps) <= 16:
            continue
        for bound in sorted({*grids, base.max_blocks}):
            sig = (warps, min(rows, bound))
            if sig not in seen:
                seen.add(sig)
                out.append(LaunchConfig(block_size=base.block_size, num_warps=warps,
                                        max_blocks=bound))
    return out


# ------------------------------------------------------------------------------------------------
# tuning


@dataclass(frozen=True)
class TuneResult:
    """The agreed outcome of :func:`tune` (identical on every rank).

    ``times_s[i]``: the MAX over ranks of candidate ``i``'s median time (``inf``: rejected)."""

    op: str
    numel: int
    dtype: torch.dtype
    world: int
    key: tuple
    winner: LaunchConfig
    candidates: tuple
    times_s: tuple
    mode: str = "eager"  # how the candidates were timed: "graph" or "eager"

    @property
    def winner_time_s(self) -> float:
        return self.times_s[self.candidates.index(self.winner)]


def tune(op: str, numel: int, dtype: torch.dtype, group=None,
         candidates: list[LaunchConfig] | tuple[LaunchConfig, ...] | None = None, *,
         placement: str = "staged", hidden: int | None = None, iters: int | None = None,
         warmup: int | None = None, mode: str | None = None, graph_iters: int = 10,
         measure: Callable[[LaunchConfig, Callable[[], object]], float] | None = None,
         persist: bool = True) -> TuneResult:
    """Time ``candidates`` for ``op`` on shards of ``numel`` elements of ``dtype`` (tensor
    level: the AG input, the RS output, the fused residual of ``numel // hidden`` rows of
    ``hidden``; see :func:`launch_key`) and record the winner every rank agreed on.
    **Collective**: every rank of ``group`` calls it with the same arguments; the protocol is in
    the module docstring.

    ``candidates``: default :func:`candidate_configs` of the launch key. ``iters``/``warmup``:
    default 20/5 on the GPU, 2/1 on the CPU. ``mode``: ``"graph"`` (default on the GPU: each
    candidate timed in a CUDA graph of ``graph_iters`` calls, :func:`.timing.graph_time`, so the
    host's launch cost does not drown the differences; falls back to eager for every candidate,
    agreed, when the op cannot be captured) or ``"eager"`` (default on the CPU,
    :func:`.timing.median_time`).
    ``measure(config, run) -> seconds`` replaces the
    timing (tests inject fake timings with it); it must call ``run()`` the same number of times
    on every rank. ``persist``: rank 0 merges the winner into the cache file. Raises
    ``ValueError`` when the arguments differ between ranks (on every rank, before any launch),
    ``RuntimeError`` when no candidate ran on every rank or symmetric memory is unavailable."""
    check_op(op)
    check_dtype(dtype)
    numel = check_count("numel", numel)
    group = resolve_group(group, "group")
    world = dist.get_world_size(group)
    key_numel, key_dtype = launch_key(op, numel, dtype)
    if candidates is None:
        candidates = candidate_configs(op, key_numel, key_dtype, world, hidden=hidden)
    candidates = _checked_candidates(candidates)
    mode, iters, warmup = _timing_counts(mode, graph_iters, iters, warmup)

    # 1. agree on the arguments before anything is launched.
    _agree_arguments((op, numel, dtype_name(dtype), placement, hidden, iters, warmup, mode,
                      graph_iters, [c.as_dict() for c in candidates], measure is None, persist),
                     group)
    wl = _workload(op, numel, dtype, group, placement, hidden)
    dev = wl.tensors["input"].device
    if measure is None and mode == "graph":
        mode = _graph_or_eager(wl, dev, group, op)

    # 2. same candidates, same order, same counts on every rank.
    local = [_candidate_time(functools.partial(wl.run, cfg), cfg, measure, mode, iters, warmup,
                             graph_iters, dev, group) for cfg in candidates]
    # 3. a collective is as slow as its slowest rank.
    times = all_reduce_max(local, group)
    # 4. rank 0 chooses, everyone takes its choice.
    idx = _agreed_choice(times, group)
    if idx < 0:
        raise RuntimeError(f"tune: no candidate of {op} ran on every rank (all rejected)")
    winner = candidates[idx]

    # 5. record; rank 0 writes the file; nobody returns before it is there.
    key = cache_key(op, key_numel, key_dtype, world, hidden)
    _record(key, winner, times[idx], mode, key_numel, persist, group)
    return TuneResult(op, numel, dtype, world, key, winner, candidates, tuple(times),
                      "measure" if measure is not None else mode)


def _checked_candidates(candidates) -> tuple:
    """``candidates`` as a non-empty tuple of :class:`LaunchConfig`."""
    candidates = tuple(candidates)
    if not candidates:
        raise ValueError("candidates is empty: nothing to tune")
    for c in candidates:
        if not isinstance(c, LaunchConfig):
            raise TypeError(f"candidates must be LaunchConfig instances, got {c!r}")
    return candidates


def _timing_counts(mode, graph_iters, iters, warmup) -> tuple:
    """``(mode, iters, warmup)`` checked, with :func:`tune`'s defaults for this device."""
    on_gpu = backend_device(select_backend()).type == "cuda"
    mode = ("graph" if on_gpu else "eager") if mode is None else mode
    if mode not in ("graph", "eager"):
        raise ValueError(f"mode must be 'graph' or 'eager', got {mode!r}")
    if mode == "graph" and not on_gpu:
        raise ValueError("mode 'graph' needs the cuda backend (CUDA graphs)")
    check_count("graph_iters", graph_iters)
    iters = (20 if on_gpu else 2) if iters is None else check_count("iters", iters)
    warmup = (5 if on_gpu else 1) if warmup is None else check_warmup(warmup)
    return mode, iters, warmup


def _agree_arguments(signature: tuple, group) -> None:
    """``ValueError`` on every rank unless every rank of ``group`` passed ``signature``."""
    signatures: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(signatures, signature, group=group)
    if any(s != signatures[0] for s in signatures):
        differing = [r for r, s in enumerate(signatures) if s != signatures[0]]
        raise ValueError(f"tune: ranks {differing} called tune with arguments that differ from "
                         f"rank 0's {signatures[0]!r}; every rank must pass the same op, size, "
                         "dtype, candidates and options")


def _workload(op: str, numel: int, dtype, group, placement: str, hidden):
    """The workload the candidates run; ``RuntimeError`` without symmetric memory."""
    buf = find_buffer(group)
    if buf.symm_mem_hdl is None:
        raise RuntimeError(f"tune: symmetric memory is unavailable ({buf.init_failure_reason}); "
                           "the ops would fall back to torch.distributed, which has nothing to "
                           "tune")
    return make_workload(op, numel, dtype, group, placement=placement, hidden=hidden)


def _graph_or_eager(wl, dev, group, op: str) -> str:
    """``"graph"`` when the op captures in a CUDA graph here (agreed over ``group``), else
    ``"eager"`` with a warning from group rank 0 (on :func:`tune`'s caller). Capturability does
    not depend on the config: probed once with the op's own."""
    try:
        graph_time(wl.run, iters=1, warmup=1, graph_iters=1, device=dev, group=group)
    except CaptureError:
        if dist.get_rank(group) == 0:
            warnings.warn(f"tune: {op} cannot be captured in a CUDA graph here; timing eagerly",
                          RuntimeWarning, stacklevel=3)
        return "eager"
    return "graph"


def _candidate_time(run, cfg: LaunchConfig, measure, mode: str, iters: int, warmup: int,
                    graph_iters: int, dev, group) -> float:
    """One candidate's time on this rank; ``inf`` when it cannot be captured (agreed), the op
    rejects the config (before launching, on every rank alike) or the time is NaN."""
    try:
        if measure is not None:
            t = float(measure(cfg, run))
        elif mode == "graph":
            t = graph_time(run, iters=iters, warmup=warmup, graph_iters=graph_iters, device=dev,
                           group=group)
        else:
            t = median_time(run, iters=iters, warmup=warmup, device=dev, group=group)
    except (CaptureError, ValueError):
        t = math.inf
    return t if t == t else math.inf  # NaN -> rejected


def _record(key: tuple, winner: LaunchConfig, time_s: float, mode: str, key_numel: int,
            persist: bool, group) -> None:
    """Every rank records ``winner`` in memory; with ``persist`` group rank 0 merges it into the
    cache file, then a group barrier (no rank returns before the file holds it)."""
    extra = {"time_us": round(time_s * 1e6, 3), "mode": mode, "tuned_numel": key_numel,
             "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    store_winner(key, winner, write=persist and dist.get_rank(group) == 0, extra=extra)
    if persist:
        group_barrier(group)


def _agreed_choice(times: list, group) -> int:
    """Group rank 0's pick, broadcast: the index of the fastest finite time (the first on
    ties), or -1 when none is finite."""
    choice = torch.tensor([-1], dtype=torch.int64, device=group_device(group))
    if dist.get_rank(group) == 0:
        finite = [i for i, t in enumerate(times) if math.isfinite(t)]
        if finite:
            choice.fill_(min(finite, key=lambda i: (times[i], i)))
    dist.broadcast(choice, src=dist.get_global_rank(group, 0), group=group)
    return int(choice.item())
