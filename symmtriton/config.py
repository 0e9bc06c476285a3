"""Launch configurations: the one place that says how a collective is launched.

A :class:`LaunchConfig` is data (block size in elements, warps, the most blocks); one
:func:`default_config` picks it from the size, dtype and world size; the tuning cache
(:mod:`symmtriton.tuning`, filled by the tuner :mod:`symmtriton.tuner`) may replace it with a
measured winner that every rank agreed on.
Every rank must launch the same grid for the same operation (the barrier is per block), so a
config is a pure function of values that are the same on every rank.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .validation import check_count

#: keys of a config, spelled the same in the tuner cache, the bench CSV and the code.
CONFIG_KEYS = ("block_size", "num_warps", "max_blocks")

#: The op vocabulary of launch configs, one name per kernel: the tuning cache's ``"op"``, the
#: bench's ``--ops``, the tuner's ``op``. Public functions that share a kernel share its name.
OPS = ("all_gather", "reduce_scatter", "fused")
#: public functions the bench also measures (``--ops``) that have no tuning-cache entry of their
#: own (all-reduce: ``default_config``; the v ops: the all-gather's / reduce-scatter's entries):
#: the bench's vocabulary is ``OPS + UNTUNED_OPS``, spelled as the functions are named.
UNTUNED_OPS = ("all_reduce", "all_reduce_add_rmsnorm", "all_gather_v", "reduce_scatter_v")
#: ops whose operands are rows ``[S, H]``: they take a ``hidden`` (see :func:`check_hidden`).
ROW_OPS = ("fused", "all_reduce_add_rmsnorm", "all_gather_v", "reduce_scatter_v")
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
            raise ValueError(f"LaunchConfig.block_size must be a power of two, got {self.block_size}")

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


#: reduce-scatter chunks at more than 2 ranks: each block pulls a chunk from every peer, and 16
#: KiB chunks leave a mid-size shard with few blocks. Measured on 4x H200 (NVLink, one rank per
#: GPU), graph, zero-copy bf16, 1 / 4 / 16 MiB: 4 KiB chunks and 4 warps 10.16 / 18.62 / 48.90 us,
#: 16 KiB and 8 warps 16.18 / 19.67 / 50.25, torch's reduce_scatter_out 10.80 / 19.52 / 49.48
#: (benchmarks/results/archive/2026-11-26_8265bdc/configs_h200x4_w4.log).
RS_WIDE_CHUNK_BYTES = 4 * 1024


#: reduce-scatter chunks for large slices (the pull at 2 ranks, the push kernels at any world size,
#: :func:`push_config`): ``(smallest slice bytes, chunk bytes)``, 16 warps. Measured on 2x H200,
#: W=2, graph, bf16 (benchmarks/results/archive/2026-11-26_823f5d1/push_vs_pull_h200.csv and
#: push_chunk_sweep_h200x2_w2.txt there):
#: pull, zero-copy, 4 / 16 / 64 MiB inputs, 32 KiB chunks 12.28 / 31.15 / 108.0 us vs 16 KiB and
#: 8 warps 12.86 / 31.97 / 112.1; push, 16 / 64 / 256 MiB / 1 GiB, 16 KiB 37.0 / 157.6 / 621.5
#: / 2459, 32 KiB 34.0 / 123.9 / 489.8 / 1922, 64 KiB 32.5 / 106.8 / 398.2 / 1503, 128 KiB
#: 116.7 / 386.8 / 1489 from 64 MiB: a pushing block pays a release per chunk.
RS_LARGE_CHUNKS = ((128 << 20, 128 << 10), (8 << 20, 64 << 10), (2 << 20, 32 << 10))


def _large_chunk(slice_bytes: int) -> int | None:
    """The :data:`RS_LARGE_CHUNKS` chunk bytes for a slice of ``slice_bytes``, or ``None`` below
    the smallest bound."""
    return next((chunk for low, chunk in RS_LARGE_CHUNKS if slice_bytes >= low), None)


def default_config(numel: int, dtype: torch.dtype, world: int, *, hidden: int | None = None,
                   op: str | None = None) -> LaunchConfig:
    """Heuristic config for a collective over shards of ``numel`` elements of ``dtype``.

    Small shards: one chunk per block and just enough threads for 16-byte accesses, so the
    latency is one barrier pair plus one round of loads. Large shards: 16 KiB chunks, 8 warps, a
    persistent grid of up to 2 blocks per SM of an H100 (132 SMs). ``op``
    ``"reduce_scatter"`` at more than 2 ranks: :data:`RS_WIDE_CHUNK_BYTES` chunks with two
    16-byte loads per thread and peer (at every shard size: 4x H200, W=4, 16 MiB, 4 KiB chunks
    48.47 us, 32 KiB 50.04); at 2 ranks, for shards of at least 2 MiB, :data:`RS_LARGE_CHUNKS`.

    With ``hidden`` (the fused row kernels): a chunk is one row of ``hidden`` elements, and the
    warps grow with the row so each thread holds at most 16 fp32 values per row tensor.
    """
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    esize = dtype.itemsize
    vec = max(1, 16 // esize)  # elements per 16-byte access
    if hidden is not None:
        if not 1 <= hidden <= MAX_FUSED_HIDDEN:
            raise ValueError(f"hidden must be in [1, {MAX_FUSED_HIDDEN}], got {hidden}")
        block = max(vec, size_bucket(hidden))
        return LaunchConfig(block_size=block, num_warps=max(1, min(32, block // (32 * 16))),
                            max_blocks=264)
    chunk_bytes = 16 * 1024
    per_thread = 4 * vec  # 4 x 16-byte accesses in flight per thread and peer
    large = _large_chunk(numel * esize)
    if op == "reduce_scatter" and large and world <= 2:
        return LaunchConfig(block_size=large // esize, num_warps=16, max_blocks=264)
    if op == "reduce_scatter" and world > 2:
        chunk_bytes, per_thread = RS_WIDE_CHUNK_BYTES, 2 * vec
    block = max(vec * 32, min(size_bucket(max(numel, 1)), chunk_bytes // esize))
    num_warps = max(1, min(8, block // (32 * per_thread)))
    return LaunchConfig(block_size=block, num_warps=num_warps, max_blocks=264)


def push_config(numel: int, dtype: torch.dtype, world: int) -> LaunchConfig:
    """Config of the flagged-chunk push kernels (kernels/push.py) for slices of ``numel``
    elements of ``dtype``: :data:`RS_LARGE_CHUNKS` from 2 MiB slices, 16 KiB chunks and 8 warps
    below (a pushing block pays a release per chunk: chunks no smaller at any world size). Like
    the lines kernels' configs, not read from the tuning cache (its entries time the pull)."""
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    large = _large_chunk(numel * dtype.itemsize)
    return LaunchConfig(block_size=(large or 16 * 1024) // dtype.itemsize,
                        num_warps=16 if large else 8, max_blocks=264)


#: data bytes per chunk of the barrier-free kernels (kernels/lines.py): a block moves twice that
#: (flags) per chunk and peer. Measured on 2x H200, W=2, graph, zero-copy bf16 (chunk 4096 /
#: 1024 / 512 B): all-gather 64 KiB 4.49 / 4.04 / 3.28 us, all-reduce 64 KiB 4.52 / 4.33 /
#: 3.62 us, 1 KiB unchanged
#: (benchmarks/results/archive/2026-11-26_3ac72a2/lines_chunk_sweep_h200x2_w2.csv): small chunks
#: spread a message over more blocks, each polling fewer lines.
LINES_CHUNK_BYTES = 512
#: messages of more than 4 KiB and at most 32 KiB per peer go in chunks of half that: 32-128
#: blocks. Measured on 2x H200, W=2, graph, zero-copy bf16 (256 / 512-byte chunks): all-gather
#: 16 / 32 / 64 / 128 KiB 2.76 / 2.83 / 2.96 / 3.40 us vs 2.74 / 2.88 / 3.04 / 3.24,
#: reduce-scatter 2.73 / 2.79 / 2.93 / 3.32 vs 2.87 / 2.90 / 3.05 / 3.23
#: (benchmarks/results/archive/2026-11-26_fbba1ea/lines_flat_chunk256_h200x2_w2.csv).
LINES_HALF_CHUNK_PEER_BYTES = (4 * 1024, 32 * 1024)


def lines_config(numel: int, dtype: torch.dtype, world: int) -> LaunchConfig:
    """Config of the barrier-free kernels for ``numel`` elements of ``dtype`` per peer: chunks
    of at most :data:`LINES_CHUNK_BYTES` (half that for the sizes of
    :data:`LINES_HALF_CHUNK_PEER_BYTES`; at least 64 words), a warp per 256 words (at most 4), so
    every thread stores 16-byte pairs of lines and small messages spread over blocks."""
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    esize = dtype.itemsize
    low, high = LINES_HALF_CHUNK_PEER_BYTES
    chunk = LINES_CHUNK_BYTES // 2 if low < numel * esize <= high else LINES_CHUNK_BYTES
    return _lines_chunks(numel, esize, chunk)


#: data bytes of a row unit of the barrier-free row kernels before :func:`lines_row_split` widens
#: it to fit the blocks: rows of more than :data:`ROW_SMALL_UNIT_MIN_ROW_BYTES` start at 256,
#: shorter rows at :data:`LINES_CHUNK_BYTES` (a stats exchange for 4 units of a 1 KiB row costs
#: more than they gain). Measured on 4x H200 (2 of them), W=2, graph, zero-copy bf16 [S, 4096],
#: two runs each (256 / 512 bytes): all-reduce + add + RMSNorm S = 1 / 2 / 4 3.70 / 3.74 / 3.80
#: us vs 3.89 / 3.98 / 4.02, fused RS + add + RMSNorm + AG 16 / 32 KiB 4.10 / 4.25 vs 4.32 /
#: 4.41; from S = 8 the units are widened to the same size; 1 KiB rows 3.75 (fused) / 3.41
#: (all-reduce + add + RMSNorm) vs 3.44 / 3.29 in an earlier run
#: (benchmarks/results/archive/2026-11-26_d251444/row_units_256_vs_512_h200_w2.csv).
ROW_UNIT_BYTES = 256
ROW_SMALL_UNIT_MIN_ROW_BYTES = 4096


def lines_row_config(hidden: int, dtype: torch.dtype, world: int) -> LaunchConfig:
    """Config of the barrier-free row kernels for rows of ``hidden`` elements of ``dtype``:
    units start at :data:`ROW_UNIT_BYTES` (:data:`LINES_CHUNK_BYTES` for short rows;
    :func:`lines_row_split` widens them)."""
    check_count("hidden", hidden)
    long_row = hidden * dtype.itemsize > ROW_SMALL_UNIT_MIN_ROW_BYTES
    return _lines_chunks(hidden, dtype.itemsize, ROW_UNIT_BYTES if long_row else LINES_CHUNK_BYTES)


def _lines_chunks(numel: int, esize: int, chunk_bytes: int) -> LaunchConfig:
    epw = max(1, 4 // esize)  # elements per 32-bit word
    block = max(64 * epw, min(size_bucket(max(numel, 1)), chunk_bytes // esize))
    return LaunchConfig(block_size=block, num_warps=max(1, min(4, block // epw // 256)),
                        max_blocks=264)


def lines_row_split(cfg: "LaunchConfig", rows: int, hidden: int, itemsize: int, cap: int,
                    slot_lines: int, sequential: bool) -> tuple[int, int, int, int]:
    """How the barrier-free row kernels cut ``rows`` rows of ``hidden`` elements
    (kernels/lines_rows.py): ``(grid, chunk, nc, num_warps)``. A unit is ``chunk`` elements (whole
    32-bit words, at most the row's power of two): ``cfg.block_size``, doubled while there are
    more units than blocks (a block's units run one after another, each waiting twice) or their
    inboxes (``nc`` lines each) overflow a slot of ``slot_lines``, with a warp per 256 words (at
    most 4, at least ``cfg.num_warps``); ``nc`` is the power of two >= the units per row. One
    block per unit, at most ``cfg.max_blocks`` and ``cap``. When ``sequential`` (the
    interpreter, which runs blocks one after another, each unit at a high fixed cost) a row has
    at most 4 units, and one block in all runs them when a row has several (their blocks wait
    for each other). Measured on 2x H200, W=2, graph, bf16: all-reduce + add + RMSNorm [8, 4096]
    4.26 us
    (benchmarks/results/archive/2026-11-26_fbba1ea/rows_inbox_vs_counted_h200x2_w2.csv; whole
    rows 5.46, benchmarks/results/archive/2026-11-26_3ac72a2/h200x2_w2_pergpu_lines.csv), 1 MiB
    11.2 (512-byte units regardless of the grid: 44.2,
    benchmarks/results/archive/2026-11-26_3192eb6/lines_rows_split_h200x2_w2.csv)."""
    row_p2 = size_bucket(hidden)
    blocks = max(1, min(cfg.max_blocks, cap))

    chunk = lines_block(min(cfg.block_size, row_p2), itemsize)
    if sequential:
        chunk = max(chunk, row_p2 // 4)
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
    """The chunk (elements of ``itemsize`` bytes) a barrier-free kernel runs with for
    ``block_size``: at least two 32-bit words, so a chunk is whole words."""
    return max(block_size, 2 * max(1, 4 // itemsize))


def all_reduce_config(numel: int, dtype: torch.dtype, world: int, algorithm: str) -> LaunchConfig:
    """The barrier all-reduce kernel's config (untuned by the tuner): one-shot as
    :func:`default_config` over the tensor; two-shot over a rank's slice: at 2 ranks, 8 KiB
    chunks and 8 warps for slices up to 512 KiB; else 16 warps and chunks of 1/128 of the slice's
    power of two, from 16 to 64 KiB. Measured in place, graph, zero-copy bf16
    (benchmarks/results/archive/2026-11-26_fbba1ea/all_reduce_two_shot_configs_h200x2_w2.log,
    benchmarks/results/archive/2026-11-26_8265bdc/configs_h200x4_w4.log): 2x H200, W=2, 1 / 2 /
    4 / 8 / 16 MiB 10.19 / 13.16 / 19.65 / 32.20 / 56.63 us (8 KiB chunks and 8 warps to 1 MiB,
    64 KiB and 16 warps above: 10.42 / 13.67 / 20.92 / 32.79 / 56.64; torch's
    two_shot_all_reduce_ 10.68 / 13.57 / 20.62 / 32.78 / 58.74), 256 MiB 797.6 (16 KiB chunks:
    807.6); 4x H200, W=4, 256 KiB / 512 KiB / 1 MiB 10.92 / 11.62 /
    13.24 (8 KiB chunks, 8 warps: 12.45 / 13.05 / 14.40; torch 9.84 / 10.19 / 13.40)."""
    if algorithm != "two_shot":
        return default_config(numel, dtype, world)
    slice_bytes = -(-numel // world) * dtype.itemsize
    if world <= 2 and slice_bytes <= 512 * 1024:
        return LaunchConfig(block_size=max(16 // dtype.itemsize * 32, 8192 // dtype.itemsize),
                            num_warps=8, max_blocks=264)
    chunk = min(64 * 1024, max(16 * 1024, size_bucket(slice_bytes) // 128))
    return LaunchConfig(block_size=chunk // dtype.itemsize, num_warps=16, max_blocks=264)


#: all-reduce algorithms: ``lines`` (one-shot over flag-in-data lines, kernels/lines.py; chosen for
#: small tensors by ops/all_reduce.py:choose_algorithm) and the barrier kernels' two (their
#: ``TWO_SHOT`` constexpr), see :func:`all_reduce_algorithm`.
ALL_REDUCE_ALGORITHMS = ("lines", "one_shot", "two_shot")
#: largest tensor (bytes) :func:`all_reduce_algorithm` sends one-shot at 2 ranks; quartered per
#: doubling of the world (one-shot reads ``world x`` the tensor per rank, from ever more peers).
#: Measured on 4x H200, W=4, graph, zero-copy bf16: 256 KiB one-shot 13.11 us at best, two-shot
#: 10.92 (benchmarks/results/archive/2026-11-26_8265bdc/configs_h200x4_w4.log); at 2 ranks the
#: lines path covers these sizes.
ALL_REDUCE_ONE_SHOT_MAX_BYTES = 512 * 1024


def all_reduce_algorithm(nbytes: int, world: int) -> str:
    """``"one_shot"`` (every rank reduces the whole tensor: one round of loads) for small tensors
    and one rank, ``"two_shot"`` (reduce-scatter + all-gather in one launch: each rank reads and
    writes ``1/world`` of the tensor per peer) above :data:`ALL_REDUCE_ONE_SHOT_MAX_BYTES`
    scaled by the world. A pure function of values every rank shares, so every rank picks the
    same."""
    if nbytes < 0 or world < 1:
        raise ValueError(f"nbytes must be >= 0 and world >= 1, got {nbytes}, {world}")
    limit = ALL_REDUCE_ONE_SHOT_MAX_BYTES * 4 // max(2, size_bucket(world)) ** 2
    return "one_shot" if world == 1 or nbytes <= limit else "two_shot"
