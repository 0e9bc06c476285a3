"""Collective timing helpers shared by the autotuner and the benchmark: host-side barriers and
reductions over a group, eager timing to completion (the whole device synchronised before the
clock stops), CUDA-graph timing whose capture outcome the ranks agree on. Every time is the MAX
over the ranks of each sample (:data:`TIMING_METHOD`)."""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist

from symmtriton.validation import check_count


def check_warmup(warmup) -> int:
    """``warmup`` (untimed calls before timing) as an int >= 0; ``ValueError`` otherwise."""
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    return warmup


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


def agreed_check(check, group, note, what: str) -> str:
    """``ok`` / ``FAIL`` of ``check()`` (true when the results are right), agreed over
    ``group``: ``FAIL`` on every rank when it fails on one. An exception (raised before any
    launch: alike on every rank) fails it and is noted with ``what``."""
    ok = True
    try:
        ok = check()
    except Exception as exc:
        ok = False
        note(f"{what}: {type(exc).__name__}: {exc}")
    return "ok" if all_ranks_ok(ok, group) else "FAIL"


#: how the times are taken and reduced (recorded in the benchmark's metadata).
TIMING_METHOD = {
    "eager": "host clock around a batch of calls that starts after a barrier of the ranks and "
             "stops after torch.cuda.synchronize() (every stream of the device: side streams and "
             "copy-engine work too), divided by the batch size",
    "graph": "CUDA events around each replay of a graph of --graph-iters calls (a graph joins "
             "every stream it forks), read after torch.cuda.synchronize(), divided by that count",
    "reduction": "max over ranks: each sample (the same calls on every rank) takes the slowest "
                 "rank's time; a row reports the median of these maxima",
}


def eager_samples(fn: Callable[[], object], n: int, device: torch.device, group=None,
                  batch: int = 1) -> list[float]:
    """Seconds per call of ``n`` samples of ``batch`` calls each, timed to completion on this
    rank: each sample starts after a barrier of ``group`` (when given; outside the clock) and
    stops after ``torch.cuda.synchronize`` of the whole device, so work a call leaves on another
    stream (a copy engine's peer copies, say) is inside the interval. ``time.perf_counter``."""
    times = []
    for _ in range(n):
        if group is not None:
            group_barrier(group)
        t0 = time.perf_counter()
        for _ in range(batch):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) / batch)
    return times


def replay_samples(replay: Callable[[], object], n: int, device: torch.device) -> list[float]:
    """Seconds of each of ``n`` back-to-back ``replay()`` calls of a CUDA graph, between two CUDA
    events on the current stream (the graph's work, every stream it forked joined back), read
    after ``torch.cuda.synchronize`` of the whole device."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(n)]
    for start, end in events:
        start.record()
        replay()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) * 1e-3 for start, end in events]


def relative_spread(times: list[float]) -> float:
    """Interquartile range over the median (0 for fewer than two times)."""
    if len(times) < 2:
        return 0.0
    q1, med, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return (q3 - q1) / med if med > 0 else 0.0


def agreed_median(sample: Callable[[int], list], iters: int, first: int, group,
                  max_spread: float) -> float:
    """Median of ``sample(first)`` seconds, each sample the MAX over ``group``'s ranks (when
    given), and of ``sample(iters - first)`` more when the spread of the first exceeds
    ``max_spread`` (decided on the agreed maxima: every rank takes as many samples)."""
    def rank_max(times):
        return times if group is None else all_reduce_max(times, group)

    times = rank_max(sample(first))
    if first < iters and relative_spread(times) > max_spread:
        times += rank_max(sample(iters - first))
    return statistics.median(times)


def _first(iters: int, group, min_iters: int | None) -> int:
    check_count("iters", iters)
    if group is None or min_iters is None:
        return iters
    return min(check_count("min_iters", min_iters), iters)


def median_time(fn: Callable[[], object], *, iters: int, warmup: int, device: torch.device,
                group=None, min_iters: int | None = None, max_spread: float = 0.05,
                batch: int = 1) -> float:
    """Seconds per ``fn()`` call to completion: ``warmup`` untimed calls, then ``iters`` samples
    of ``batch`` calls (:func:`eager_samples`: a barrier of ``group`` before each, the clock
    stopped after the whole device synchronised), each sample the MAX over ``group``'s ranks
    (a collective is done when its slowest rank is), and the median of those.

    With ``group`` and ``min_iters < iters``: ``min_iters`` samples first, and the rest only
    when their :func:`relative_spread` exceeds ``max_spread``. The ranks decide on the same
    maxima, so every rank makes the same number of calls: ``fn`` may be a collective."""
    first = _first(iters, group, min_iters)
    check_warmup(warmup)
    check_count("batch", batch)
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return agreed_median(lambda n: eager_samples(fn, n, device, group, batch), iters, first,
                         group, max_spread)


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
               device: torch.device, group, min_iters: int | None = None,
               max_spread: float = 0.05) -> float:
    """Seconds per call of ``fn`` inside a CUDA graph: ``warmup`` (at least one) eager calls on
    a side stream, ``graph_iters`` calls captured in one graph, one replay and a barrier, then
    ``iters`` replays back to back (:func:`replay_samples`; ``min_iters`` and ``max_spread`` as
    in :func:`median_time`), each the MAX over ``group``'s ranks; the median of those divided by
    ``graph_iters``. Kernel time without the host's launch cost, which dominates small messages
    in eager mode.

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
    first = _first(iters, group, min_iters)
    graph.replay()
    torch.cuda.synchronize(device)
    group_barrier(group)
    return agreed_median(lambda n: replay_samples(graph.replay, n, device), iters, first, group,
                         max_spread) / graph_iters


def agreed_time(fn: Callable[[], object], mode: str, *, device: torch.device, group,
                **counts) -> float | None:
    """Seconds per call of ``fn`` agreed over ``group`` (MAX over ranks): :func:`graph_time`
    when ``mode`` is ``"graph"``, else :func:`median_time` (``counts``: their counts; each
    ignores the other's ``graph_iters`` / ``batch``). ``None`` when it failed on some rank;
    ``fn`` must fail alike on every rank (before launching anything) or not at all."""
    ok, t = True, math.inf
    try:
        if mode == "graph":
            counts.pop("batch", None)
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
