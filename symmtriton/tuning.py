"""The agreed launch configs: the cache file of tuned winners and :func:`lookup_config`, what
every collective calls (runtime: below ``ops/``; the tuner that fills the file is
:mod:`symmtriton.tools.bench.tune`, a tool above it).

:func:`lookup_config` picks a call's launch config: the tuned winner for this GPU, world size,
op, launch dtype and power-of-two size bucket when the cache holds one, else
:func:`symmtriton.config.default_config`. Cheap: the cache file is read once per process (and
again only when ``$SYMMTRITON_TUNING_CACHE`` names another file), then a lookup is one dict access.

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

import functools
import json
import os
import tempfile
import warnings

import torch

from . import env
from .backends import select_backend
from .config import (CONFIG_KEYS, LaunchConfig, bit_unit, check_dtype, check_op, default_config,
                     size_bucket)
from .validation import check_count

CACHE_ENV = env.TUNING_CACHE
CACHE_VERSION = 1

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


def launch_key(op: str, numel: int, dtype: torch.dtype) -> tuple[int, torch.dtype]:
    """``(numel, dtype)`` the op passes to :func:`lookup_config` for a shard of ``numel``
    elements of ``dtype`` (all-gather: the input; reduce-scatter: the output; fused: one
    reduce-scatter output shard, i.e. the residual), assuming 16-byte aligned tensors.

    All-gather copies bits in the widest unit that divides the shard's bytes (int32, int16 or
    uint8; see :func:`symmtriton.config.bit_unit`); the reductions launch in their own dtype."""
    check_op(op)
    check_dtype(dtype)
    if op != "all_gather":
        return int(numel), dtype
    nbytes = int(numel) * dtype.itemsize
    unit = bit_unit(nbytes)
    return nbytes // unit.itemsize, unit


@functools.lru_cache(maxsize=None)
def _device_name_for(backend: str, index: int) -> str:
    return torch.cuda.get_device_name(index) if backend == "cuda" else "cpu"


def device_name() -> str:
    """The cache's device key: the GPU's name (``torch.cuda.get_device_name``) on the ``cuda``
    backend, ``"cpu"`` on the ``host`` backend."""
    backend = select_backend()
    return _device_name_for(backend, torch.cuda.current_device() if backend == "cuda" else -1)


# ------------------------------------------------------------------------------------------------
# cache file and in-memory table


def cache_path() -> str:
    """``$SYMMTRITON_TUNING_CACHE``, else ``~/.cache/symmtriton/tuning.json`` (user-expanded)."""
    return env.tuning_cache_path()


_Key = tuple  # (device, world_size, op, dtype, bucket, hidden); hidden is None but for fused


class _Table:
    """The winners of one cache file, loaded once. ``entries``: key -> LaunchConfig;
    ``records``: key -> the file's record (kept so a rewrite preserves what it does not know);
    ``memo``: lookup arguments -> answer (hits and defaults), so a repeated lookup is one dict
    access; ``env``: the ``$SYMMTRITON_TUNING_CACHE`` value ``path`` came from."""

    def __init__(self, path: str | None, raw=None):
        self.path = path
        self.env = raw
        self.entries: dict[_Key, LaunchConfig] = {}
        self.records: dict[_Key, dict] = {}
        self.memo: dict[tuple, LaunchConfig] = {}


_TABLE = _Table(None)
_MEMO_MAX = 1 << 16
#: bumped whenever an answer of :func:`lookup_config` may change (a table loaded, reloaded or
#: given a winner): plans compare it per call instead of looking up again (:func:`stamp`).
_GENERATION = [0]
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
        device, world, op, dtype, bucket, cfg = (
            rec[k] for k in ("device", "world_size", "op", "dtype", "bucket", "config"))
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


def _load(path: str, raw) -> _Table:
    table = _Table(path, raw)
    table.entries, table.records, problems = _read_file(path)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        _warn_once(path, problems[0] + more)
    return table


def _table() -> _Table:
    global _TABLE
    raw = env.tuning_cache_raw()  # one dict lookup, not os.environ.get
    if _TABLE.path is None or raw != _TABLE.env:
        path = cache_path()
        if path != _TABLE.path:
            _TABLE = _load(path, raw)
            _GENERATION[0] += 1
        _TABLE.env = raw
    return _TABLE


def stamp() -> int:
    """A number that changes whenever an answer of :func:`lookup_config` may have changed: the
    table was loaded or reloaded (``$SYMMTRITON_TUNING_CACHE`` names another file,
    :func:`reload_cache`) or given a winner (:func:`store_winner`). A plan's config still holds
    while the stamp it was made under does (``ops.driver.ConfigChoice``): one dict lookup (the
    environment) and one int compare per call instead of a lookup. The answers for another
    current CUDA device (a GPU of another name) are not covered: plans key on their tensors'
    devices, and a process drives GPUs of one kind."""
    raw = env.tuning_cache_raw()
    if raw is not _TABLE.env or _TABLE.path is None:
        _table().env = raw  # an equal value set again: later calls pass the identity test
    return _GENERATION[0]


def reload_cache() -> None:
    """Drop the in-memory table: the next lookup reads the cache file again."""
    global _TABLE
    _TABLE = _Table(None)
    _GENERATION[0] += 1


def cache_key(op: str, numel: int, dtype: torch.dtype, world: int,
              hidden: int | None = None) -> _Key:
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
            cfg = default_config(numel, dtype, world, hidden=hidden, op=op)
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


def store_winner(key: _Key, config: LaunchConfig, *, write: bool,
                 extra: dict | None = None) -> None:
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
    _GENERATION[0] += 1
    if write:
        _, records, _ = _read_file(table.path)
        records[key] = rec
        ordered = sorted(records.values(), key=lambda r: (
            r["device"], r["world_size"], r["op"], r["dtype"], r["bucket"], r.get("hidden") or 0))
        try:
            _atomic_write_json(table.path, {"version": CACHE_VERSION, "entries": ordered})
        except OSError as exc:  # never leave the other ranks waiting over a file problem
            warnings.warn(f"symmtriton tuning cache {table.path} could not be written ({exc}); "
                          "the winner is kept in memory only", RuntimeWarning, stacklevel=2)
