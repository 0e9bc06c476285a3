"""The numbers behind the launch decisions: protocol thresholds and launch presets, per world
size and machine class where they differ. :mod:`symmtriton.config` decides with them; nothing
else holds such a number.

Each entry is a module constant whose :data:`SOURCES` line points at the run that justifies it:
a file under ``benchmarks/results/`` (paths here are relative to it) and the machine it ran on,
or ``"not measured: ..."`` with the reason for the value. The figures of those runs are in
docs/ARCHITECTURE.md ("Measured thresholds"); ``benchmarks/results/archive/README.md`` says how
each run was taken.

Machine classes the code tells apart: ranks on separate GPUs (barrier scope ``"sys"``), every
rank on one GPU (scope ``"gpu"``), and the ``host`` backend (shared memory, Triton's
interpreter). World classes: 2 ranks (a pair) and more (wide). Sizes are bytes.
"""

from __future__ import annotations

from typing import NamedTuple

#: where the values are justified: name -> one line (a path under :data:`RESULTS_DIR`, or
#: ``"not measured: ..."``).
SOURCES: dict[str, str] = {}
#: the folder the paths of :data:`SOURCES` are relative to, from the repository root.
RESULTS_DIR = "benchmarks/results"


def _preset(name: str, value, source: str):
    """``value``, recorded under ``name`` with its ``source`` line."""
    SOURCES[name] = source
    return value


class PushBounds(NamedTuple):
    """Smallest slice (bytes each rank reduces) pushed under ``auto``, per input placement."""

    staged: int
    zero_copy_pair: int  # a zero-copy input at 2 ranks
    zero_copy_wide: int  # a zero-copy input at more than 2 ranks


class FixedChunks(NamedTuple):
    """Chunks of ``chunk_bytes`` and ``num_warps`` for slices up to ``max_slice_bytes``."""

    max_slice_bytes: int
    chunk_bytes: int
    num_warps: int


class ScaledChunks(NamedTuple):
    """Chunks of ``1 / slice_chunks`` of the slice's power of two, within ``[min_bytes,
    max_bytes]``, and ``num_warps``."""

    slice_chunks: int
    min_bytes: int
    max_bytes: int
    num_warps: int


_KIB, _MIB = 1024, 1024 * 1024
_LINES_VS_BARRIER = "archive/2026-11-26_3ac72a2/lines_vs_barrier_h200x2_w2.csv (2x H200, W=2)"
_PUSH_VS_PULL = "archive/2026-11-26_823f5d1/push_vs_pull_h200.csv (2x and 4x H200)"
_CONFIGS_W4 = "archive/2026-11-26_8265bdc/configs_h200x4_w4.log (4x H200, W=4)"
_TWO_SHOT_W2 = "archive/2026-11-26_fbba1ea/all_reduce_two_shot_configs_h200x2_w2.log (2x H200)"

# -- protocol thresholds: lines, barrier, push (ranks on separate GPUs unless named otherwise) ---
#: most bytes a rank pushes in all (per peer x (world - 1)) that ``auto`` sends as lines (flat ops)
LINES_MAX_BYTES = _preset("LINES_MAX_BYTES", 512 * _KIB, _LINES_VS_BARRIER)
#: the same for the row ops (their norm is done per row by one block: lines win longer)
LINES_ROWS_MAX_BYTES = _preset("LINES_ROWS_MAX_BYTES", _MIB, _LINES_VS_BARRIER)
#: the same when every rank shares one GPU (barrier scope ``"gpu"``), for every op
LINES_SHARED_GPU_MAX_BYTES = _preset(
    "LINES_SHARED_GPU_MAX_BYTES", 64 * _KIB,
    "archive/2026-11-26_3ac72a2/h200_w4_shared_lines.csv (lines) and "
    "archive/2026-11-26_baf7ab2/h200_w4_shared.csv (barriers): 4 ranks on one H200, MPS; "
    "the crossover between 64 KiB and 1 MiB was not measured")
#: per op, the smallest slice ``auto`` pushes in flagged chunks rather than pulls (no multicast)
PUSH_MIN_SLICE_BYTES = _preset(
    "PUSH_MIN_SLICE_BYTES",
    {"reduce_scatter": PushBounds(512 * _KIB, 32 * _MIB, 4 * _MIB),
     "all_reduce": PushBounds(4 * _MIB, 32 * _MIB, 4 * _MIB)},
    _PUSH_VS_PULL)
#: smallest tensor ``(staged, zero-copy)`` the all-reduce at 2 ranks pushes whole in one round
#: under ``auto``; ``None``: ``auto`` never does
PUSH_ONE_SHOT_MIN_BYTES: tuple[int, int] | None = _preset(
    "PUSH_ONE_SHOT_MIN_BYTES", None,
    "not measured: off under auto until it is timed against the pull and the two-shot push")
#: largest tensor the all-reduce sends one-shot at 2 ranks; quartered per doubling of the world
ALL_REDUCE_ONE_SHOT_MAX_BYTES = _preset("ALL_REDUCE_ONE_SHOT_MAX_BYTES", 512 * _KIB, _CONFIGS_W4)

# -- launch presets of the barrier and push kernels ---------------------------------------------
#: chunk bytes of a block for large shards (the tuning cache may replace the whole config)
DEFAULT_CHUNK_BYTES = _preset(
    "DEFAULT_CHUNK_BYTES", 16 * _KIB,
    "not measured on its own: a starting point that symmtriton.tools.bench.tune's winners replace")
#: most warps per block of the default configs
DEFAULT_NUM_WARPS = _preset(
    "DEFAULT_NUM_WARPS", 8,
    "not measured on its own: 4 16-byte accesses in flight per thread and peer at 16 KiB chunks")
#: most blocks per launch (the launcher also clamps to the signal pad and co-residency)
DEFAULT_MAX_BLOCKS = _preset(
    "DEFAULT_MAX_BLOCKS", 264,
    "not measured as a bound: 2 blocks per SM of an H100 (132 SMs); 132 and 264 time alike in "
    + _TWO_SHOT_W2)
#: reduce-scatter chunk bytes at more than 2 ranks (a block pulls one from every peer)
RS_WIDE_CHUNK_BYTES = _preset("RS_WIDE_CHUNK_BYTES", 4 * _KIB, _CONFIGS_W4)
#: ``((smallest slice bytes, chunk bytes), ...)``, largest first: the pull reduce-scatter at 2
#: ranks and the push kernels at any world size
RS_LARGE_CHUNKS = _preset(
    "RS_LARGE_CHUNKS", ((128 * _MIB, 128 * _KIB), (8 * _MIB, 64 * _KIB), (2 * _MIB, 32 * _KIB)),
    _PUSH_VS_PULL + "; archive/2026-11-26_823f5d1/push_chunk_sweep_h200x2_w2.txt (2x H200)")
#: warps of a block that moves :data:`RS_LARGE_CHUNKS` chunks
RS_LARGE_NUM_WARPS = _preset("RS_LARGE_NUM_WARPS", 16, _PUSH_VS_PULL)
#: two-shot all-reduce at 2 ranks, slices up to 512 KiB
TWO_SHOT_PAIR_SMALL = _preset("TWO_SHOT_PAIR_SMALL", FixedChunks(512 * _KIB, 8 * _KIB, 8),
                              _TWO_SHOT_W2)
#: two-shot all-reduce otherwise (larger slices, or more than 2 ranks)
TWO_SHOT_CHUNKS = _preset("TWO_SHOT_CHUNKS", ScaledChunks(128, 16 * _KIB, 64 * _KIB, 16),
                          _TWO_SHOT_W2 + "; " + _CONFIGS_W4)

# -- launch presets of the lines kernels --------------------------------------------------------
#: most data bytes per chunk of the flat lines kernels (a block moves twice that, with flags)
LINES_CHUNK_BYTES = _preset(
    "LINES_CHUNK_BYTES", 512,
    "archive/2026-11-26_3ac72a2/lines_chunk_sweep_h200x2_w2.csv (2x H200, W=2)")
#: ``(low, high)``: messages of more than ``low`` and at most ``high`` bytes per peer go in
#: chunks of half :data:`LINES_CHUNK_BYTES`
LINES_HALF_CHUNK_PEER_BYTES = _preset(
    "LINES_HALF_CHUNK_PEER_BYTES", (4 * _KIB, 32 * _KIB),
    "archive/2026-11-26_fbba1ea/lines_flat_chunk256_h200x2_w2.csv (2x H200, W=2)")
_ROW_UNITS = "archive/2026-11-26_d251444/row_units_256_vs_512_h200_w2.csv (2 H200s, W=2)"
#: starting unit bytes of the row lines kernels for rows longer than
#: :data:`ROW_SMALL_UNIT_MIN_ROW_BYTES` (shorter rows start at :data:`LINES_CHUNK_BYTES`)
ROW_UNIT_BYTES = _preset("ROW_UNIT_BYTES", 256, _ROW_UNITS)
ROW_SMALL_UNIT_MIN_ROW_BYTES = _preset("ROW_SMALL_UNIT_MIN_ROW_BYTES", 4096, _ROW_UNITS)

# -- presets per backend ------------------------------------------------------------------------
#: data bytes of a source slot of the line area, per backend: the most a peer's lines carry
LINES_SLOT_BYTES = _preset(
    "LINES_SLOT_BYTES", {"cuda": _MIB, "host": 256 * _KIB},
    "not measured: cuda holds LINES_ROWS_MAX_BYTES; host is smaller as /dev/shm is often small "
    "and the interpreter gains nothing from large line messages")
#: most blocks a kernel uses on the host backend (the interpreter runs blocks one after another)
HOST_GRID_LIMIT = _preset(
    "HOST_GRID_LIMIT", 4,
    "not measured in a kept run: a few blocks exercise the chunk mapping, more only add "
    "barriers (a 2 MiB all-gather over 3 ranks took 117 s with 128 blocks)")
#: most units per row of the row lines kernels in the interpreter (a unit costs a fixed time)
SEQUENTIAL_ROW_UNITS = _preset(
    "SEQUENTIAL_ROW_UNITS", 4,
    "not measured: keeps the interpreted row kernels' unit loop short while still cutting rows")
