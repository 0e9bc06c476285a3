"""How a collective is launched, decided in one place: which path carries a call (multimem,
lines, barrier or push: the ``*_eligible`` predicates) and with which :class:`LaunchConfig`
(block size in elements, warps, the most blocks).

The numbers these rules read are named in :mod:`symmtriton.presets`, each with the run that
justifies it. :func:`default_config` is the barrier kernels' config; the tuning cache
(:mod:`symmtriton.tuning`, filled by :mod:`symmtriton.tools.bench.tune`) may replace it with a
winner every rank agreed on. Every rank must launch the same grid for the same call (the barrier
is per block), so every decision here is a pure function of values alike on every rank.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from . import env, presets
from .validation import REDUCE_DTYPES, check_count

#: keys of a config, spelled the same in the tuner cache, the bench CSV and the code.
CONFIG_KEYS = ("block_size", "num_warps", "max_blocks")
#: The op vocabulary of launch configs, one name per kernel: the tuning cache's ``"op"``, the
#: bench's ``--ops``, the tuner's ``op``. Public functions that share a kernel share its name.
OPS = ("all_gather", "reduce_scatter", "fused")
#: public functions the bench also measures (``--ops``: ``OPS + UNTUNED_OPS``) without a cache
#: entry of their own (they take their kernel's, :data:`CONFIG_OP`, or pick theirs inside).
UNTUNED_OPS = ("all_reduce", "all_reduce_add_rmsnorm", "reduce_scatter_add_rmsnorm",
               "all_gather_v", "reduce_scatter_v", "moe_dispatch", "moe_combine")
#: ops whose operands are rows ``[S, H]``: they take a ``hidden`` (see :func:`check_hidden`).
ROW_OPS = ("fused", "all_reduce_add_rmsnorm", "reduce_scatter_add_rmsnorm", "all_gather_v",
           "reduce_scatter_v")
#: public function -> the config name of its kernel (kernels/<file>.py).
CONFIG_OP = {
    "all_gather_into_tensor": "all_gather",                  # kernels/all_gather.py
    "reduce_scatter_tensor": "reduce_scatter",               # kernels/reduce_scatter.py
    "reduce_scatter_add_rmsnorm_all_gather": "fused",        # kernels/fused_rmsnorm.py
    "reduce_scatter_add_rmsnorm": "fused",                   # kernels/fused_rmsnorm.py
    # the variable-count kernels chunk rows as the uniform ones do: their configs, by capacity
    "all_gather_v": "all_gather",                            # kernels/all_gather_v.py
    "reduce_scatter_v": "reduce_scatter",                    # kernels/reduce_scatter_v.py
}


def check_op(op) -> str:
    """``op`` if it is a config op name (:data:`OPS`); ``ValueError`` naming it otherwise."""
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}, got {op!r}")
    return op


def check_hidden(op: str, numel: int, hidden) -> int | None:
    """``hidden`` (the row length ``H`` of a row op, :data:`ROW_OPS`: required there, dividing
    ``numel``; ``None`` for the other ops), or ``ValueError`` naming the bad value."""
    if op not in ROW_OPS:
        if hidden is not None:
            raise ValueError(f"hidden applies to the row ops ({', '.join(ROW_OPS)}) only, got "
                             f"hidden={hidden!r} for {op!r}")
        return None
    if hidden is None:
        raise ValueError(f"op {op!r} needs hidden (the row length H of its [S, H] operands)")
    check_count("hidden", hidden)
    if numel % hidden:
        raise ValueError(f"{op}: numel {numel} is not a multiple of hidden {hidden}")
    return hidden


def check_dtype(dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    return dtype


def size_bucket(numel: int) -> int:
    """``numel`` rounded up to a power of two (1 for 0 and 1): the tuning cache's size key, and
    the default row block."""
    return 1 << max(0, int(numel) - 1).bit_length()


def bit_unit(nbytes: int, *addrs: int) -> torch.dtype:
    """The widest integer type (<= 4 bytes) that divides ``nbytes`` and every address: the unit
    the all-gather's bit copy moves (and the dtype its config is keyed by)."""
    for dtype, size in ((torch.int32, 4), (torch.int16, 2)):
        if nbytes % size == 0 and all(a % size == 0 for a in addrs):
            return dtype
    return torch.uint8


@dataclass(frozen=True)
class LaunchConfig:
    block_size: int  # elements per chunk (power of two); a block handles one chunk at a time
    num_warps: int
    max_blocks: int  # upper bound on the grid; the launcher also clamps to the signal pad

    def __post_init__(self):
        for key in CONFIG_KEYS:
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LaunchConfig.{key} must be a positive int, got {value!r}")
        if self.block_size & (self.block_size - 1):
            raise ValueError(
                f"LaunchConfig.block_size must be a power of two, got {self.block_size}")

    def grid(self, numel: int, cap: int) -> int:
        """Blocks for ``numel`` elements per shard: one per chunk, at most ``max_blocks`` and at
        most ``cap`` (the launcher's bound: signal-pad slots, co-residency)."""
        return self.row_grid(-(-numel // self.block_size), cap)

    def row_grid(self, rows: int, cap: int) -> int:
        """Blocks for the fused row kernels, where a chunk is one row (``block_size`` covers it):
        one block per row, at most ``max_blocks`` and ``cap``."""
        return max(1, min(rows, self.max_blocks, cap))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


#: widest row the fused kernels hold in one block (fp32 statistics in registers).
MAX_FUSED_HIDDEN = 65536


def _check_numel(numel: int) -> None:
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")


def _large_chunk(slice_bytes: int) -> int | None:
    """The :data:`~symmtriton.presets.RS_LARGE_CHUNKS` chunk bytes for a slice of
    ``slice_bytes``, or ``None`` below the smallest bound."""
    return next((chunk for low, chunk in presets.RS_LARGE_CHUNKS if slice_bytes >= low), None)


def _config(block_size: int, num_warps: int) -> LaunchConfig:
    return LaunchConfig(block_size, num_warps, presets.DEFAULT_MAX_BLOCKS)


def default_config(numel: int, dtype: torch.dtype, world: int, *, hidden: int | None = None,
                   op: str | None = None) -> LaunchConfig:
    """The barrier kernels' config for shards of ``numel`` elements of ``dtype``: a chunk is the
    shard's power of two, at most ``presets.DEFAULT_CHUNK_BYTES`` and at least one 16-byte
    access per thread of a warp; warps give each thread 4 accesses per peer, at most
    ``presets.DEFAULT_NUM_WARPS``. ``op="reduce_scatter"``: at more than 2 ranks chunks of
    ``presets.RS_WIDE_CHUNK_BYTES`` with 2 accesses per thread; at 2 ranks, shards from the
    smallest bound of ``presets.RS_LARGE_CHUNKS`` take its chunks (``RS_LARGE_NUM_WARPS``).
    With ``hidden`` (the fused row kernels, at most :data:`MAX_FUSED_HIDDEN`): a chunk is a row,
    and the warps grow with it so each thread holds at most 16 fp32 values per row tensor."""
    _check_numel(numel)
    esize = dtype.itemsize
    vec = max(1, 16 // esize)  # elements per 16-byte access
    if hidden is not None:
        if not 1 <= hidden <= MAX_FUSED_HIDDEN:
            raise ValueError(f"hidden must be in [1, {MAX_FUSED_HIDDEN}], got {hidden}")
        block = max(vec, size_bucket(hidden))
        return _config(block, max(1, min(32, block // (32 * 16))))
    chunk_bytes = presets.DEFAULT_CHUNK_BYTES
    per_thread = 4 * vec  # 16-byte accesses in flight per thread and peer, in elements
    large = _large_chunk(numel * esize)
    if op == "reduce_scatter" and large and world <= 2:
        return _config(large // esize, presets.RS_LARGE_NUM_WARPS)
    if op == "reduce_scatter" and world > 2:
        chunk_bytes, per_thread = presets.RS_WIDE_CHUNK_BYTES, 2 * vec
    block = max(vec * 32, min(size_bucket(max(numel, 1)), chunk_bytes // esize))
    return _config(block, max(1, min(presets.DEFAULT_NUM_WARPS, block // (32 * per_thread))))


def push_config(numel: int, dtype: torch.dtype, world: int) -> LaunchConfig:
    """Config of the push kernels (kernels/push.py) for slices of ``numel`` elements of
    ``dtype``, at any world size: ``presets.RS_LARGE_CHUNKS`` (``RS_LARGE_NUM_WARPS``) from its
    smallest bound, ``presets.DEFAULT_CHUNK_BYTES`` (``DEFAULT_NUM_WARPS``) below. Not read from
    the tuning cache (its entries time the pull)."""
    _check_numel(numel)
    large = _large_chunk(numel * dtype.itemsize)
    if large:
        return _config(large // dtype.itemsize, presets.RS_LARGE_NUM_WARPS)
    return _config(presets.DEFAULT_CHUNK_BYTES // dtype.itemsize, presets.DEFAULT_NUM_WARPS)


def lines_config(numel: int, dtype: torch.dtype, world: int) -> LaunchConfig:
    """Config of the flat lines kernels for ``numel`` elements of ``dtype`` per peer: chunks of
    at most ``presets.LINES_CHUNK_BYTES`` (half that for messages within
    ``presets.LINES_HALF_CHUNK_PEER_BYTES``) and at least 64 words, a warp per 256 words (at
    most 4), so every thread stores 16-byte pairs of lines."""
    _check_numel(numel)
    esize = dtype.itemsize
    low, high = presets.LINES_HALF_CHUNK_PEER_BYTES
    chunk = presets.LINES_CHUNK_BYTES
    return _lines_chunks(numel, esize, chunk // 2 if low < numel * esize <= high else chunk)


def lines_row_config(hidden: int, dtype: torch.dtype, world: int) -> LaunchConfig:
    """Config of the row lines kernels for rows of ``hidden`` elements of ``dtype``: units of
    ``presets.ROW_UNIT_BYTES`` for rows longer than ``presets.ROW_SMALL_UNIT_MIN_ROW_BYTES``,
    else of ``presets.LINES_CHUNK_BYTES``; :func:`lines_row_split` widens them."""
    check_count("hidden", hidden)
    long_row = hidden * dtype.itemsize > presets.ROW_SMALL_UNIT_MIN_ROW_BYTES
    unit = presets.ROW_UNIT_BYTES if long_row else presets.LINES_CHUNK_BYTES
    return _lines_chunks(hidden, dtype.itemsize, unit)


def _lines_chunks(numel: int, esize: int, chunk_bytes: int) -> LaunchConfig:
    epw = max(1, 4 // esize)  # elements per 32-bit word
    block = max(64 * epw, min(size_bucket(max(numel, 1)), chunk_bytes // esize))
    return _config(block, max(1, min(4, block // epw // 256)))


def lines_row_split(cfg: LaunchConfig, rows: int, hidden: int, itemsize: int, cap: int,
                    slot_lines: int, sequential: bool) -> tuple[int, int, int, int]:
    """How the row lines kernels cut ``rows`` rows of ``hidden`` elements: ``(grid, chunk, nc,
    num_warps)``. A unit is ``chunk`` elements (whole words, at most the row's power of two):
    ``cfg.block_size``, doubled while the units outnumber the blocks or their inboxes (``nc``
    lines each, the power of two >= units per row) overflow a slot of ``slot_lines``; a warp
    per 256 words (at most 4, at least ``cfg.num_warps``); a block per unit, at most
    ``cfg.max_blocks`` and ``cap``. ``sequential`` (the interpreter runs blocks one after
    another): at most ``presets.SEQUENTIAL_ROW_UNITS`` units per row, and one block runs them
    all when a row has several."""
    row_p2 = size_bucket(hidden)
    blocks = max(1, min(cfg.max_blocks, cap))
    chunk = lines_block(min(cfg.block_size, row_p2), itemsize)
    if sequential:
        chunk = max(chunk, row_p2 // presets.SEQUENTIAL_ROW_UNITS)
    while True:
        per_row = -(-hidden // chunk)
        total = rows * per_row
        if chunk >= row_p2 or (total <= blocks and total * size_bucket(per_row) <= slot_lines):
            break
        chunk *= 2
    grid = 1 if sequential and per_row > 1 else cfg.row_grid(total, cap)
    warps = max(cfg.num_warps, min(4, chunk * itemsize // 4 // 256))
    return grid, chunk, size_bucket(per_row), warps


def lines_block(block_size: int, itemsize: int) -> int:
    """The chunk (elements of ``itemsize`` bytes) a lines kernel runs with for ``block_size``:
    at least two 32-bit words, so a chunk is whole words."""
    return max(block_size, 2 * max(1, 4 // itemsize))


def all_reduce_config(numel: int, dtype: torch.dtype, world: int, algorithm: str) -> LaunchConfig:
    """The barrier all-reduce kernel's config (untuned): one-shot as :func:`default_config`;
    two-shot over a rank's slice: ``presets.TWO_SHOT_PAIR_SMALL`` at 2 ranks for slices up to
    its bound, else ``presets.TWO_SHOT_CHUNKS``."""
    if algorithm != "two_shot":
        return default_config(numel, dtype, world)
    esize = dtype.itemsize
    slice_bytes = -(-numel // world) * esize
    small = presets.TWO_SHOT_PAIR_SMALL
    if world <= 2 and slice_bytes <= small.max_slice_bytes:
        return _config(max(16 // esize * 32, small.chunk_bytes // esize), small.num_warps)
    scaled = presets.TWO_SHOT_CHUNKS
    chunk = size_bucket(slice_bytes) // scaled.slice_chunks
    chunk = min(scaled.max_bytes, max(scaled.min_bytes, chunk))
    return _config(chunk // esize, scaled.num_warps)


#: all-reduce algorithms: ``lines`` (one-shot over flag-in-data lines; chosen for small tensors
#: by ops/all_reduce.py) and the barrier kernels' two (:func:`all_reduce_algorithm`).
ALL_REDUCE_ALGORITHMS = ("lines", "one_shot", "two_shot")


def all_reduce_algorithm(nbytes: int, world: int) -> str:
    """``"one_shot"`` (every rank reduces the whole tensor) at one rank and for tensors of at
    most ``presets.ALL_REDUCE_ONE_SHOT_MAX_BYTES``, quartered per doubling of the world from 2;
    ``"two_shot"`` (reduce-scatter + all-gather in one launch) above."""
    if nbytes < 0 or world < 1:
        raise ValueError(f"nbytes must be >= 0 and world >= 1, got {nbytes}, {world}")
    limit = presets.ALL_REDUCE_ONE_SHOT_MAX_BYTES * 4 // max(2, size_bucket(world)) ** 2
    return "one_shot" if world == 1 or nbytes <= limit else "two_shot"


# -- which path carries a call (``ctx``: the buffer's symmtriton.context.Ctx) -------------------

#: the access width of the kernels (bytes): the multimem path needs it of every address and size.
ALIGN = 16


def aligned16(*values: int) -> bool:
    return all(v % ALIGN == 0 for v in values)


def multimem_eligible(ctx, dtype: torch.dtype | None, *addrs_and_sizes: int) -> bool:
    """Every rank has multicast, ``dtype`` reduces in multimem (None: a bit copy, any dtype),
    and every address and byte count is a multiple of :data:`ALIGN`."""
    return (ctx.mc_addr != 0 and (dtype is None or dtype in REDUCE_DTYPES)
            and aligned16(*addrs_and_sizes))


def lines_fit(ctx, per_peer_bytes: int, row_bytes: int) -> bool:
    """The lines path can carry a call that sends ``per_peer_bytes`` to each peer in rows of
    ``row_bytes`` (the whole message for flat ops): the buffer has a line area (more than one
    rank), rows are whole 32-bit words, and the message fits a slot."""
    return (ctx.lines_words > 0 and row_bytes % 4 == 0 and per_peer_bytes % 4 == 0
            and per_peer_bytes // 4 <= ctx.lines_words)


def lines_eligible(ctx, per_peer_bytes: int, row_bytes: int,
                   max_bytes: int | None = None) -> bool:
    """:func:`lines_fit`, and ``$SYMMTRITON_PROTOCOL`` chooses lines: ``lines`` always,
    ``barrier`` and ``push`` never, ``auto`` while what this rank pushes in all
    (``per_peer_bytes`` x (``world`` - 1)) is at most ``max_bytes`` (default
    ``presets.LINES_MAX_BYTES``; the row ops pass ``presets.LINES_ROWS_MAX_BYTES``), and at most
    ``presets.LINES_SHARED_GPU_MAX_BYTES`` when every rank shares one GPU."""
    mode = env.protocol()
    if mode in ("barrier", "push") or not lines_fit(ctx, per_peer_bytes, row_bytes):
        return False
    limit = presets.LINES_MAX_BYTES if max_bytes is None else max_bytes
    if ctx.scope != "sys":
        limit = min(limit, presets.LINES_SHARED_GPU_MAX_BYTES)
    return mode == "lines" or per_peer_bytes * (ctx.world - 1) <= limit


def _push_mode(ctx, multimem: bool) -> str | None:
    """``$SYMMTRITON_PROTOCOL`` when it lets a call push at all (more than one rank, the pull
    would use no multimem, neither ``barrier`` nor ``lines``), else ``None``."""
    mode = env.protocol()
    if ctx.world < 2 or multimem or mode in ("barrier", "lines"):
        return None
    return mode


def push_eligible(ctx, op: str, slice_bytes: int, multimem: bool, staged: bool) -> bool:
    """``op`` (``"reduce_scatter"`` or ``"all_reduce"``) pushes slices of ``slice_bytes``: more
    than one rank, the pull has no multimem (``multimem``: what it would use), and
    ``$SYMMTRITON_PROTOCOL`` chooses it: ``push`` always, ``auto`` from the
    ``presets.PUSH_MIN_SLICE_BYTES`` bound of ``op`` for a ``staged`` or zero-copy input and the
    world size. The caller checks that the buffer has room."""
    mode = _push_mode(ctx, multimem)
    if mode is None:
        return False
    bounds = presets.PUSH_MIN_SLICE_BYTES[op]
    limit = (bounds.staged if staged else bounds.zero_copy_pair if ctx.world == 2
             else bounds.zero_copy_wide)
    return mode == "push" or slice_bytes >= limit


def push_one_shot_eligible(ctx, nbytes: int, multimem: bool, staged: bool, algo: str,
                           requested: str | None) -> bool:
    """The all-reduce of ``nbytes`` pushes the whole tensor in one round: more than one rank, the
    pull has no multimem, and ``$SYMMTRITON_PROTOCOL`` chooses it: ``push`` when the algorithm
    (``algo``, picked by size or ``requested`` by the caller) is one-shot; ``auto`` at 2 ranks,
    unless the caller requested two-shot, from ``presets.PUSH_ONE_SHOT_MIN_BYTES`` (``None``:
    never). The caller checks that the buffer has room."""
    mode = _push_mode(ctx, multimem)
    if mode is None:
        return False
    if mode == "push":
        return algo == "one_shot"
    limits = presets.PUSH_ONE_SHOT_MIN_BYTES
    return (ctx.world == 2 and requested != "two_shot" and limits is not None
            and nbytes >= limits[0 if staged else 1])
