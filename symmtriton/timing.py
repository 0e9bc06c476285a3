"""Collective timing helpers shared by the autotuner and the benchmark: host-side barriers and
reductions over a group, median eager timing, CUDA-graph timing whose capture outcome the ranks
agree on."""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist

from .validation import check_count, check_warmup


def group_device(group) -> torch.device:
    """Where tensors for host-side collectives on ``group`` live: the current GPU for NCCL
    groups, the CPU otherwise (gloo)."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def group_barrier(group) -> None:
    """All ranks of ``group`` reach this point (a one-element all-reduce, completed on the host:
    unlike ``dist.barrier`` it needs no device ids for NCCL)."""
    t = torch.zeros(1, device=group_device(group))
    dist.all_reduce(t, group=group)
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


def all_reduce_max(values, group) -> list[float]:
    """Element-wise max of ``values`` (floats; ``inf`` allowed) over ``group``."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=group_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def all_ranks_ok(ok: bool, group) -> bool:
    """``True`` on every rank iff ``ok`` is true on every rank of ``group``."""
    t = torch.tensor([1 if ok else 0], dtype=torch.int32, device=group_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


def _timed_calls(fn: Callable[[], object], n: int, device: torch.device) -> list[float]:
    """Seconds of each of ``n`` calls: CUDA events (GPU) or ``time.perf_counter`` (CPU)."""
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(n)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) * 1e-3 for start, end in events]
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def relative_spread(times: list[float]) -> float:
    """Interquartile range over the median (0 for fewer than two times)."""
    if len(times) < 2:
        return 0.0
    q1, med, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return (q3 - q1) / med if med > 0 else 0.0


def median_time(fn: Callable[[], object], *, iters: int, warmup: int, device: torch.device,
                group=None, min_iters: int | None = None, max_spread: float = 0.05) -> float:
    """Median seconds of one ``fn()`` call on this rank: ``warmup`` untimed calls, a barrier on
    ``group`` (when given) so the ranks start together, then ``iters`` timed calls, each
    between two CUDA events (GPU) or two ``time.perf_counter`` reads (CPU).

    With ``group`` and ``min_iters < iters``: ``min_iters`` timed calls first, and the rest only
    when the largest :func:`relative_spread` over the ranks exceeds ``max_spread``. The ranks
    agree (MAX over ``group``), so every rank makes the same number of calls: ``fn`` may be a
    collective."""
    check_count("iters", iters)
    check_warmup(warmup)
    first = iters if group is None or min_iters is None else min(check_count("min_iters", min_iters), iters)
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if group is not None:
        group_barrier(group)
    times = _timed_calls(fn, first, device)
    if first < iters and all_reduce_max([relative_spread(times)], group)[0] > max_spread:
        times += _timed_calls(fn, iters - first, device)
    return statistics.median(times)


class CaptureError(RuntimeError):
    """A CUDA-graph capture failed on some rank (every rank raises it: the outcome is agreed)."""


def _abandon_capture(device: torch.device, pool, stream) -> None:
    """Undo what a failed capture leaves behind. When the driver invalidated the capture,
    ``CUDAGraph.capture_end`` raises before it tells the caching allocator that the capture
    ended, and before ``torch.cuda.graph`` restores the current stream: the allocator would then
    keep routing to the graph's pool and assert at exit (``captures_underway.empty()``)."""
    end = getattr(torch._C, "_cuda_endAllocateToPool", None)
    if end is not None:
        try:
            end(device.index, pool)
        except Exception:  # capture_end got that far itself: nothing to undo
            pass
    torch.cuda.set_stream(stream)
    try:
        torch.cuda.synchronize(device)
    except Exception:  # the capture's error, reported once more
        pass


def graph_time(fn: Callable[[], object], *, iters: int, warmup: int, graph_iters: int,
               device: torch.device, group, min_iters: int | None = None, max_spread: float = 0.05) -> float:
    """Seconds per call of ``fn`` inside a CUDA graph on this rank: ``warmup`` (at least one)
    eager calls on a side stream, ``graph_iters`` calls captured in one graph, then the median
    of ``iters`` replays (:func:`median_time`, with ``min_iters`` and ``max_spread``) divided by
    ``graph_iters``. Kernel time without
    the host's launch cost, which dominates small messages in eager mode.

    Collective: the ranks agree (MIN over ``group``) on whether the capture worked and every
    rank raises :class:`CaptureError` if it failed anywhere; a failed capture launched nothing,
    so no peer waits in a barrier."""
    check_count("graph_iters", graph_iters)
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(max(1, warmup)):
            fn()
    current.wait_stream(side)
    torch.cuda.synchronize(device)
    graph, pool, ok = torch.cuda.CUDAGraph(), torch.cuda.graph_pool_handle(), True
    try:
        with torch.cuda.graph(graph, pool=pool):
            for _ in range(graph_iters):
                fn()
    except Exception:
        ok = False
        _abandon_capture(device, pool, current)
    if not all_ranks_ok(ok, group):
        raise CaptureError("not capturable in a CUDA graph on every rank")
    return median_time(graph.replay, iters=iters, warmup=1, device=device, group=group,
                       min_iters=min_iters, max_spread=max_spread) / graph_iters


def agreed_time(fn: Callable[[], object], mode: str, *, device: torch.device, group, **counts) -> float | None:
    """Seconds per call of ``fn`` agreed over ``group`` (MAX over ranks): :func:`graph_time`
    when ``mode`` is ``"graph"``, else :func:`median_time` (``counts``: their counts). ``None``
    when it failed on some rank; ``fn`` must fail alike on every rank (before launching
    anything) or not at all."""
    ok, t = True, math.inf
    try:
        if mode == "graph":
            t = graph_time(fn, device=device, group=group, **counts)
        else:
            counts.pop("graph_iters", None)
            t = median_time(fn, device=device, group=group, **counts)
    except CaptureError:  # agreed inside graph_time
        return None
    except Exception:
        ok = False
    if not all_ranks_ok(ok, group):
        return None
    return all_reduce_max([t], group)[0]
