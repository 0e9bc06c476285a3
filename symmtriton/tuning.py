"""Launch-config autotuning and the persistent cache of agreed winners.

Entry points:

* :func:`lookup_config` — what every collective calls, per call, to pick its launch config: the
  tuned winner for this GPU, world size, op, launch dtype and power-of-two size bucket when the
  cache holds one, else :func:`symmtriton.config.default_config`. Cheap: the cache file is read
  once per process (and again only when ``$SYMMTRITON_TUNING_CACHE`` names another file), then a
  lookup is one dict access.
* :func:`tune` — a *collective* call (every rank of the group must make it, with the same
  arguments) that times candidate configs and records the winner.

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

Cache file (``$SYMMTRITON_TUNING_CACHE``, default ``~/.cache/symmtriton/tuning.json``)::

    {"version": 1, "entries": [
        {"device": "NVIDIA H100 80GB HBM3", "world_size": 8, "op": "all_gather",
         "dtype": "int32", "bucket": 65536,
         "config": {"block_size": 2048, "num_warps": 8, "max_blocks": 132},
         "time_us": 7.9, "tuned_numel": 65536, "date": "2026-11-25T14:00:00+00:00"}, ...]}

``dtype`` and ``bucket`` are those of the *launch*: all-gather is a bit copy launched in int32
words where sizes and addresses allow (int16 or uint8 otherwise), so its entries are keyed by the
unit dtype and the number of units per shard; reduce-scatter by the output shard's dtype and
element count; ``fused`` by the input dtype, the element count of one reduce-scatter output
shard (``residual.numel()``) and, in an extra ``"hidden"`` field, the row length ``H`` (its
``block_size`` is a row block and must cover ``H``: an entry never serves another ``H``).
:func:`launch_key` maps a tensor-level shard to that key. The bucket
is the shard's element count rounded up to a power of two, so a winner tuned at ``2**k`` elements
serves every shard of ``2**(k-1) + 1 .. 2**k`` elements. Content that cannot be read (bad JSON,
wrong schema, invalid configs) is ignored with one warning per file: a lookup never fails on it.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from ._launch import env_raw
from .config import CONFIG_KEYS, LaunchConfig, default_config
from .timing import CaptureError, all_reduce_max, graph_time, group_barrier, group_device, median_time
from .validation import check_count
from .workloads import check_dtype, check_op, make_workload

CACHE_ENV = "SYMMTRITON_TUNING_CACHE"
DEFAULT_CACHE = os.path.join("~", ".cache", "symmtriton", "tuning.json")
CACHE_VERSION = 1

# ------------------------------------------------------------------------------------------------
# keys


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling of the cache file and the bench)."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; ``ValueError`` naming the value when it is no dtype."""
    dtype = getattr(torch, str(name), None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} (expected a torch dtype name such as 'bfloat16')")
    return dtype


def size_bucket(numel: int) -> int:
    """``numel`` rounded up to a power of two (1 for 0 and 1): the cache's size key."""
    return 1 << max(0, int(numel) - 1).bit_length()


def launch_key(op: str, numel: int, dtype: torch.dtype) -> tuple[int, torch.dtype]:
    """``(numel, dtype)`` the op passes to :func:`lookup_config` for a shard of ``numel``
    elements of ``dtype`` (all-gather: the input; reduce-scatter: the output; fused: one
    reduce-scatter output shard, i.e. the residual), assuming 16-byte aligned tensors.

    All-gather copies bits in the widest unit that divides the shard's bytes (int32, int16 or
    uint8; see ``ops/_common.bit_unit``); the reductions launch in their own dtype."""
    check_op(op)
    check_dtype(dtype)
    if op != "all_gather":
        return int(numel), dtype
    from .ops._common import bit_unit

    nbytes = int(numel) * dtype.itemsize
    unit = bit_unit(nbytes)
    return nbytes // unit.itemsize, unit


@functools.lru_cache(maxsize=None)
def _device_name_for(backend: str, index: int) -> str:
    return torch.cuda.get_device_name(index) if backend == "cuda" else "cpu"


def device_name() -> str:
    """The cache's device key: the GPU's name (``torch.cuda.get_device_name``) on the ``cuda``
    backend, ``"cpu"`` on the ``host`` backend."""
    from .backends import select_backend

    backend = select_backend()
    return _device_name_for(backend, torch.cuda.current_device() if backend == "cuda" else -1)


# ------------------------------------------------------------------------------------------------
# cache file and in-memory table


def cache_path() -> str:
    """``$SYMMTRITON_TUNING_CACHE``, else ``~/.cache/symmtriton/tuning.json`` (user-expanded)."""
    return os.path.expanduser(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


_Key = tuple  # (device, world_size, op, dtype, bucket, hidden); hidden is None but for fused


class _Table:
    """The winners of one cache file, loaded once. ``entries``: key -> LaunchConfig;
    ``records``: key -> the file's record (kept so a rewrite preserves what it does not know);
    ``memo``: lookup arguments -> answer (hits and defaults), so a repeated lookup is one dict
    access; ``env``: the ``$SYMMTRITON_TUNING_CACHE`` value ``path`` came from."""

    def __init__(self, path: str | None, env: str | None = None):
        self.path = path
        self.env = env
        self.entries: dict[_Key, LaunchConfig] = {}
        self.records: dict[_Key, dict] = {}
        self.memo: dict[tuple, LaunchConfig] = {}


_TABLE = _Table(None)
_MEMO_MAX = 1 << 16
_WARNED: set = set()


def _warn_once(path: str, message: str) -> None:
    if path in _WARNED:
        return
    _WARNED.add(path)
    warnings.warn(f"symmtriton tuning cache {path}: {message}; ignored (defaults are used)",
                  RuntimeWarning, stacklevel=3)


def _parse_record(rec) -> tuple[_Key, LaunchConfig]:
    """One file record -> (key, config); ``ValueError`` describing what is wrong."""
    if not isinstance(rec, dict):
        raise ValueError(f"entry is not an object: {rec!r}")
    try:
        device, world, op, dtype, bucket, cfg = (rec[k] for k in
                                                 ("device", "world_size", "op", "dtype", "bucket", "config"))
    except KeyError as exc:
        raise ValueError(f"entry lacks {exc.args[0]!r}: {rec!r}") from None
    if not isinstance(device, str):
        raise ValueError(f"device must be a string, got {device!r}")
    check_count("world_size", world)
    check_op(op)
    bucket = check_count("bucket", bucket)
    if bucket & (bucket - 1):
        raise ValueError(f"bucket must be a power of two, got {bucket}")
    hidden = rec.get("hidden")
    if op == "fused":
        check_count("hidden", hidden)
    elif hidden is not None:
        raise ValueError(f"hidden applies to fused entries only, got {hidden!r} for {op!r}")
    if not isinstance(cfg, dict) or set(cfg) != set(CONFIG_KEYS):
        raise ValueError(f"config must have exactly the keys {CONFIG_KEYS}, got {cfg!r}")
    config = LaunchConfig(**cfg)
    if hidden is not None and config.block_size < hidden:
        raise ValueError(f"fused block_size {config.block_size} does not cover hidden {hidden}")
    return (device, world, op, parse_dtype(dtype), bucket, hidden), config


def _read_file(path: str) -> tuple[dict, dict, list[str]]:
    """(entries, records, problems) of the file at ``path``; a missing or empty file is empty.
    Never raises for the file's content."""
    entries: dict = {}
    records: dict = {}
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return entries, records, []
    except OSError as exc:
        return entries, records, [f"cannot be read ({exc})"]
    if not text.strip():
        return entries, records, []
    try:
        data = json.loads(text)
    except ValueError as exc:
        return entries, records, [f"is not valid JSON ({exc})"]
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        return entries, records, ['has no "entries" list']
    if data.get("version") != CACHE_VERSION:
        return entries, records, [f"has version {data.get('version')!r}, expected {CACHE_VERSION}"]
    problems = []
    for rec in data["entries"]:
        try:
            key, cfg = _parse_record(rec)
        except (ValueError, TypeError) as exc:
            problems.append(str(exc))
            continue
        entries[key] = cfg
        records[key] = rec
    return entries, records, problems


def _load(path: str, env: str | None) -> _Table:
    table = _Table(path, env)
    table.entries, table.records, problems = _read_file(path)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        _warn_once(path, problems[0] + more)
    return table


def _table() -> _Table:
    global _TABLE
    env = env_raw(CACHE_ENV)  # per call: one dict lookup (os.environ.get of an unset name: ~4 us)
    if _TABLE.path is None or env != _TABLE.env:
        path = cache_path()
        _TABLE = _TABLE if path == _TABLE.path else _load(path, env)
        _TABLE.env = env
    return _TABLE


def reload_cache() -> None:
    """Drop the in-memory table: the next lookup reads the cache file again."""
    global _TABLE
    _TABLE = _Table(None)


def cache_key(op: str, numel: int, dtype: torch.dtype, world: int, hidden: int | None = None) -> _Key:
    """The cache key of a launch (see the module docstring); ``hidden`` counts for fused only."""
    return (device_name(), world, op, dtype, size_bucket(numel), hidden if op == "fused" else None)


def cached_config(op: str, numel: int, dtype: torch.dtype, world: int, *,
                  hidden: int | None = None) -> LaunchConfig | None:
    """The cached winner for this launch key, or ``None``."""
    return _table().entries.get(cache_key(op, numel, dtype, world, hidden))


def lookup_config(op: str, numel: int, dtype: torch.dtype, world: int, *,
                  hidden: int | None = None) -> LaunchConfig:
    """The launch config of ``op`` for shards of ``numel`` elements of ``dtype`` on ``world``
    ranks (``hidden``: the fused op's row length): the cached, agreed winner when there is one,
    else ``default_config``. Every rank reads the same file, so every rank gets the same config
    (a rank whose file differs would launch another grid: share one cache file, or tune on all
    ranks)."""
    table = _table()
    memo_key = (op, numel, dtype, world, hidden,
                torch.cuda.current_device() if torch.cuda.is_initialized() else -1)
    cfg = table.memo.get(memo_key)
    if cfg is None:
        check_op(op)
        cfg = table.entries.get(cache_key(op, numel, dtype, world, hidden))
        if cfg is None:
            cfg = default_config(numel, dtype, world, hidden=hidden)
        if len(table.memo) >= _MEMO_MAX:
            table.memo.clear()
        table.memo[memo_key] = cfg
    return cfg


def _atomic_write_json(path: str, data) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tuning-", suffix=".json.tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def store_winner(key: _Key, config: LaunchConfig, *, write: bool, extra: dict | None = None) -> None:
    """Record ``config`` for ``key`` in this process's table and, with ``write``, merge it into
    the cache file (re-read first, so entries other processes wrote survive; unreadable content
    is replaced)."""
    device, world, op, dtype, bucket, hidden = key
    rec = {"device": device, "world_size": world, "op": op, "dtype": dtype_name(dtype),
           "bucket": bucket, "config": config.as_dict(), **(extra or {})}
    if hidden is not None:
        rec["hidden"] = hidden
    table = _table()
    table.entries[key] = config
    table.records[key] = rec
    table.memo.clear()
    if write:
        _, records, _ = _read_file(table.path)
        records[key] = rec
        ordered = sorted(records.values(), key=lambda r: (r["device"], r["world_size"], r["op"],
                                                          r["dtype"], r["bucket"], r.get("hidden") or 0))
        try:
            _atomic_write_json(table.path, {"version": CACHE_VERSION, "entries": ordered})
        except OSError as exc:  # never leave the other ranks waiting over a file problem
            warnings.warn(f"symmtriton tuning cache {table.path} could not be written ({exc}); "
                          "the winner is kept in memory only", RuntimeWarning, stacklevel=2)


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
    if op != "fused" and hidden is not None:
        raise ValueError(f"hidden applies to the fused op only, got hidden={hidden!r} for {op!r}")
    if op == "fused":
        if hidden is None:
            raise ValueError("candidate_configs: op 'fused' needs hidden (the row length)")
        check_count("hidden", hidden)
        if numel % hidden:
            raise ValueError(f"fused: numel {numel} is not a multiple of hidden {hidden}")
    if sm_count is None:
        sm_count = (torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
                    if device_name() != "cpu" else 132)
    grids = sorted({max(1, sm_count // 4), max(1, sm_count // 2), sm_count, 2 * sm_count})
    if op == "fused":
        out = _row_candidates(default_config(numel, dtype, world, hidden=hidden), numel // hidden,
                              world, grids)
    else:
        out = _chunk_candidates(op, default_config(numel, dtype, world), numel, dtype, grids)
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
                out.append(LaunchConfig(block_size=base.block_size, num_warps=warps, max_blocks=bound))
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
    ``hidden``; see :func:`launch_key`) and record the winner every rank agreed on. **Collective**: every rank of ``group`` calls it with the
    same arguments; the protocol is in the module docstring.

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
    from . import _launch as L
    from .memory import SymmetricMemoryManager
    from .testing import device

    check_op(op)
    check_dtype(dtype)
    numel = check_count("numel", numel)
    group = L.resolve_group(group)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    key_numel, key_dtype = launch_key(op, numel, dtype)
    if candidates is None:
        candidates = candidate_configs(op, key_numel, key_dtype, world, hidden=hidden)
    candidates = tuple(candidates)
    if not candidates:
        raise ValueError("candidates is empty: nothing to tune")
    for c in candidates:
        if not isinstance(c, LaunchConfig):
            raise TypeError(f"candidates must be LaunchConfig instances, got {c!r}")
    on_gpu = device().type == "cuda"
    mode = ("graph" if on_gpu else "eager") if mode is None else mode
    if mode not in ("graph", "eager"):
        raise ValueError(f"mode must be 'graph' or 'eager', got {mode!r}")
    if mode == "graph" and not on_gpu:
        raise ValueError("mode 'graph' needs the cuda backend (CUDA graphs)")
    check_count("graph_iters", graph_iters)
    iters = (20 if on_gpu else 2) if iters is None else check_count("iters", iters)
    warmup = (5 if on_gpu else 1) if warmup is None else warmup
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")

    # 1. agree on the arguments before anything is launched.
    signature = (op, numel, dtype_name(dtype), placement, hidden, iters, warmup, mode, graph_iters,
                 [c.as_dict() for c in candidates], measure is None, persist)
    signatures: list = [None] * world
    dist.all_gather_object(signatures, signature, group=group)
    if any(s != signatures[0] for s in signatures):
        differing = [r for r, s in enumerate(signatures) if s != signatures[0]]
        raise ValueError(f"tune: ranks {differing} called tune with arguments that differ from rank "
                         f"0's {signatures[0]!r}; every rank must pass the same op, size, dtype, "
                         "candidates and options")
    buf = SymmetricMemoryManager.buffer_for_group(group)
    if buf.symm_mem_hdl is None:
        raise RuntimeError(f"tune: symmetric memory is unavailable ({buf.init_failure_reason}); the "
                           "ops would fall back to torch.distributed, which has nothing to tune")
    wl = make_workload(op, numel, dtype, group, placement=placement, hidden=hidden)
    dev = wl.tensors["input"].device
    if measure is None and mode == "graph":
        try:  # capturability does not depend on the config: probe once with the op's own
            graph_time(wl.run, iters=1, warmup=1, graph_iters=1, device=dev, group=group)
        except CaptureError:
            mode = "eager"
            if rank == 0:
                warnings.warn(f"tune: {op} cannot be captured in a CUDA graph here; timing eagerly",
                              RuntimeWarning, stacklevel=2)

    # 2. same candidates, same order, same counts on every rank.
    local = []
    for cfg in candidates:
        run = functools.partial(wl.run, cfg)
        try:
            if measure is not None:
                t = float(measure(cfg, run))
            elif mode == "graph":
                t = graph_time(run, iters=iters, warmup=warmup, graph_iters=graph_iters, device=dev,
                               group=group)
            else:
                t = median_time(run, iters=iters, warmup=warmup, device=dev, group=group)
        except CaptureError:  # agreed on every rank
            t = math.inf
        except ValueError:  # the op rejected the config before launching, on every rank alike
            t = math.inf
        local.append(t if t == t else math.inf)  # NaN -> rejected

    # 3. a collective is as slow as its slowest rank.
    times = all_reduce_max(local, group)

    # 4. rank 0 chooses, everyone takes its choice.
    choice = torch.tensor([-1], dtype=torch.int64, device=group_device(group))
    if rank == 0:
        finite = [i for i, t in enumerate(times) if math.isfinite(t)]
        if finite:
            choice.fill_(min(finite, key=lambda i: (times[i], i)))
    dist.broadcast(choice, src=dist.get_global_rank(group, 0), group=group)
    idx = int(choice.item())
    if idx < 0:
        raise RuntimeError(f"tune: no candidate of {op} ran on every rank (all rejected)")
    winner = candidates[idx]

    # 5. record; rank 0 writes the file; nobody returns before it is there.
    key = cache_key(op, key_numel, key_dtype, world, hidden)
    extra = {"time_us": round(times[idx] * 1e6, 3), "mode": mode, "tuned_numel": key_numel,
             "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    store_winner(key, winner, write=persist and rank == 0, extra=extra)
    if persist:
        group_barrier(group)
    return TuneResult(op, numel, dtype, world, key, winner, candidates, tuple(times),
                      "measure" if measure is not None else mode)
