"""What a kernel needs from a group's buffer, computed once per buffer (:func:`context`), and
the predicates that choose a path: symmetric memory usable, multimem eligible, 16-byte aligned,
where a staging region goes.

The cross-rank launch invariant, stated once: every rank must launch the same grid with the
same constexprs for the same call (the barrier is per block). So every decision here depends
only on values alike on every rank (shapes, dtypes, the buffer layout, ``multicast_ptr`` agreed
at rendezvous, the signal-pad size) or is folded into flags the kernel tests per rank without
changing the grid (``ALIGNED``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import env
from .kernels import protocol as _protocol
from .memory import SymmetricMemoryBuffer, SymmetricMemoryManager
from .validation import REDUCE_DTYPES

ALIGN = 16


@dataclass(frozen=True)
class Ctx:
    """The integers a kernel needs from a buffer, plus the host-visible error word."""

    buf: SymmetricMemoryBuffer
    rank: int
    world: int
    buf_table: int
    sig_table: int
    mc_addr: int
    err_addr: int
    grid_cap: int
    local_base: int
    scope: str  # memory scope of the barrier's atomics (see barrier_scope)
    lines_off: int = 0  # the line area (kernels/lines.py): its offset in every rank's allocation
    lines_words: int = 0  # and its words per source slot (0: no area)

    @property
    def world_p2(self) -> int:
        return 1 << (self.world - 1).bit_length()

    @property
    def use_ptx(self) -> bool:
        return self.buf.backend == "cuda" and not env.interpreting()


def context(buf: SymmetricMemoryBuffer) -> Ctx:
    """The buffer's launch context: computed once, kept on the buffer until it is closed."""
    ctx = buf.__dict__.get("_launch_ctx")
    if ctx is not None and ctx.buf is buf:
        return ctx
    hdl = buf.symm_mem_hdl
    # a counter and world_size barrier slots per block must fit (kernels/protocol.py)
    cap = _protocol.grid_cap(hdl.signal_pad_slots, hdl.world_size)
    if hdl.grid_limit is not None:
        cap = min(cap, hdl.grid_limit)
    if cap < 1:
        raise RuntimeError(f"signal pad of {hdl.signal_pad_size} bytes cannot hold one barrier "
                           f"for {hdl.world_size} ranks")
    ctx = Ctx(buf, hdl.rank, hdl.world_size, hdl.buffer_ptrs_dev, hdl.signal_pad_ptrs_dev,
              hdl.multicast_ptr if buf.has_multicast else 0, buf.status.data_ptr(),
              cap, hdl.buffer_ptrs[hdl.rank], barrier_scope(hdl), buf.lines_off, buf.lines_words)
    buf._launch_ctx = ctx
    return ctx


def barrier_scope(hdl) -> str:
    """The barrier's memory scope: ``"gpu"`` when every rank of the group runs on this GPU (the
    smallest scope holding all their threads), else ``"sys"`` (peers on other GPUs).
    ``$SYMMTRITON_BARRIER_SCOPE=sys`` forces ``"sys"`` everywhere (e.g. to measure the
    difference: 1-2 us per op at small sizes, 4 ranks on one H100)."""
    forced_sys = env.barrier_scope_forced()
    same_gpu = hdl.backend == "cuda" and hdl.ranks_on_device == hdl.world_size
    return "gpu" if same_gpu and not forced_sys else "sys"


#: the compute capability from which kernels launch with PDL (``griddepcontrol`` is sm_90+ PTX).
PDL_MIN_CAPABILITY = (9, 0)


def pdl_enabled(buf: SymmetricMemoryBuffer) -> bool:
    """Launch ``buf``'s kernels with programmatic dependent launch (``$SYMMTRITON_PDL``, read
    when a call is planned): a CUDA buffer outside the interpreter, on a device of compute
    capability >= 9.0. With ``SYMMTRITON_PDL=on`` a CUDA device below that raises ``ValueError``
    (an A/B must not measure nothing). PDL changes neither the grid nor the protocol (the kernel
    waits for the previous grid before any memory access, kernels/ptx.py ``pdl_wait``), so ranks
    that disagree on it still pair."""
    mode = env.pdl()
    if mode == "off" or buf.backend != "cuda" or env.interpreting():
        return False
    capability = torch.cuda.get_device_capability(buf.device)
    if capability >= PDL_MIN_CAPABILITY:
        return True
    if mode == "on":
        raise ValueError(f"{env.PDL}=on needs compute capability >= 9.0; {buf.device} has "
                         f"{capability[0]}.{capability[1]}")
    return False


def find_buffer(group) -> SymmetricMemoryBuffer:
    """The buffer the collectives of ``group`` use (created on first use)."""
    return SymmetricMemoryManager.buffer_for_group(group)


# -- eligibility predicates ---------------------------------------------------------------------
def symm_usable(buf: SymmetricMemoryBuffer, device: torch.device, region_bytes_end: int) -> bool:
    """Symmetric memory can carry this call: the buffer rendezvoused, the tensors live where
    the buffer does, and the region fits."""
    return (buf.symm_mem_hdl is not None and device == buf.device
            and region_bytes_end <= buf.nbytes)


def multimem_eligible(ctx: Ctx, dtype: torch.dtype | None, *addrs_and_sizes: int) -> bool:
    """The multimem path applies: every rank has multicast, ``dtype`` reduces in multimem (None:
    a bit copy, any dtype), and every address and byte count is a multiple of 16."""
    return (ctx.mc_addr != 0 and (dtype is None or dtype in REDUCE_DTYPES)
            and aligned16(*addrs_and_sizes))


#: largest message per peer (bytes) that ``$SYMMTRITON_PROTOCOL=auto`` sends as lines
#: (kernels/lines.py) rather than with barriers: flat ops, and the row ops (their norm is done per
#: row by one block: lines win longer). Measured on 2x H200, W=2, graph, zero-copy bf16, lines /
#: barriers (benchmarks/results/archive/2026-11-26_3ac72a2/lines_vs_barrier_h200x2_w2.csv):
#: all-gather 512 KiB per peer 7.40 / 7.36 us, 1 MiB 13.8 / 8.8; reduce-scatter 512 KiB 8.9 /
#: 9.5, 1 MiB 17.4 / 10.1; all-reduce 512 KiB 7.8 / 11.3, 1 MiB 15.2 / 12.7; all-reduce + add +
#: RMSNorm 1 MiB 10.9 / 11.8; fused reduce-scatter + RMSNorm + all-gather 768 KiB per peer 10.4 /
#: 10.8.
LINES_MAX_BYTES = 512 * 1024
LINES_ROWS_MAX_BYTES = 1024 * 1024
#: the same bound when every rank shares one GPU (``scope == "gpu"``): there the barrier is cheap
#: and the lines of all ranks share one GPU's memory. Measured with 4 ranks on one H200 (MPS,
#: graph, zero-copy bf16): all-gather of 64 KiB (16 KiB to each of 3 peers) 5.6 us on lines
#: against 6.9 with barriers, of 1 MiB (256 KiB each) 29.2 against 7.1; the crossover between
#: was not measured. Lines: benchmarks/results/archive/2026-11-26_3ac72a2/h200_w4_shared_lines.csv,
#: barriers: benchmarks/results/archive/2026-11-26_baf7ab2/h200_w4_shared.csv.
LINES_SHARED_GPU_MAX_BYTES = 64 * 1024


def lines_fit(ctx: Ctx, per_peer_bytes: int, row_bytes: int) -> bool:
    """The barrier-free path (kernels/lines.py) can carry a call that sends ``per_peer_bytes`` to
    each peer in rows of ``row_bytes`` (the whole message for flat ops): the buffer has a line
    area (more than one rank), rows are whole 32-bit words, and the message fits a slot.
    Depends only on values alike on every rank."""
    return (ctx.lines_words > 0 and row_bytes % 4 == 0 and per_peer_bytes % 4 == 0
            and per_peer_bytes // 4 <= ctx.lines_words)


def lines_eligible(ctx: Ctx, per_peer_bytes: int, row_bytes: int,
                   max_bytes: int = LINES_MAX_BYTES) -> bool:
    """:func:`lines_fit`, and ``$SYMMTRITON_PROTOCOL`` chooses lines for it: ``lines`` always,
    ``barrier`` and ``push`` never, ``auto`` when what this rank pushes in all
    (``per_peer_bytes`` to each of ``world - 1`` peers) is at most ``max_bytes``
    (:data:`LINES_MAX_BYTES` or :data:`LINES_ROWS_MAX_BYTES`, measured at 2 ranks on 2 GPUs,
    where that is one peer), or :data:`LINES_SHARED_GPU_MAX_BYTES` when every rank shares one
    GPU. Alike on every rank."""
    mode = env.protocol()
    if mode in ("barrier", "push") or not lines_fit(ctx, per_peer_bytes, row_bytes):
        return False
    limit = max_bytes if ctx.scope == "sys" else min(max_bytes, LINES_SHARED_GPU_MAX_BYTES)
    return mode == "lines" or per_peer_bytes * (ctx.world - 1) <= limit


#: smallest slice (bytes each rank reduces) that ``$SYMMTRITON_PROTOCOL=auto`` pushes in flagged
#: chunks (kernels/push.py) rather than pulling, where there is no multicast, per op: ``(staged
#: input, zero-copy input at 2 ranks, zero-copy input beyond)``. Pull vs push, graph, bf16, us
#: (benchmarks/results/archive/2026-11-26_823f5d1/push_vs_pull_h200.csv). 2x H200, W=2:
#: reduce-scatter, staged 1 / 16 / 64 MiB inputs 10.07 / 36.98 / 148.4 vs 8.78 / 32.41 / 106.9,
#: zero-copy 4 / 16 / 64 / 256 MiB 12.28 / 31.15 / 108.0 / 410.6 vs 13.50 / 32.50 / 106.1 /
#: 386.8; all-reduce (two rounds of flags), staged 1 / 4 / 16 / 64 MiB 11.19 / 21.75 / 66.87 /
#: 260.0 vs 13.45 / 22.97 / 59.20 / 203.2, zero-copy in place 4 / 16 / 64 MiB 19.44 / 55.61 /
#: 208.7 vs 21.78 / 54.97 / 194.2. 4x H200, W=4, zero-copy: reduce-scatter 16 MiB 50.04 (pull)
#: vs 45.16 (push, staged); all-reduce 4 / 16 / 64 MiB 27.51 / 88.28 / 349.1 vs 29.11 / 81.71 /
#: 299.2.
PUSH_MIN_SLICE_BYTES = {"reduce_scatter": (512 * 1024, 32 * 1024 * 1024, 4 * 1024 * 1024),
                        "all_reduce": (4 * 1024 * 1024, 32 * 1024 * 1024, 4 * 1024 * 1024)}


def _push_mode(ctx: Ctx, multimem: bool) -> str | None:
    """``$SYMMTRITON_PROTOCOL`` when it lets a call push at all (more than one rank, the pull
    would use no multimem, neither ``barrier`` nor ``lines``), else ``None``."""
    mode = env.protocol()
    if ctx.world < 2 or multimem or mode in ("barrier", "lines"):
        return None
    return mode


def push_eligible(ctx: Ctx, op: str, slice_bytes: int, multimem: bool, staged: bool) -> bool:
    """``op`` (``"reduce_scatter"`` or ``"all_reduce"``) pushes slices of ``slice_bytes``: more
    than one rank, the pull has no multimem (``multimem``: what it would use), and
    ``$SYMMTRITON_PROTOCOL`` chooses it (``push`` always, ``auto`` from
    :data:`PUSH_MIN_SLICE_BYTES` for a ``staged`` or zero-copy input and the world size). The
    caller checks that the buffer has room. Alike on every rank."""
    mode = _push_mode(ctx, multimem)
    if mode is None:
        return False
    staged_min, zero_copy_pair_min, zero_copy_wide_min = PUSH_MIN_SLICE_BYTES[op]
    limit = staged_min if staged else zero_copy_pair_min if ctx.world == 2 else zero_copy_wide_min
    return mode == "push" or slice_bytes >= limit


#: smallest tensor (bytes) the all-reduce at 2 ranks pushes whole in one round of flagged
#: chunks (``_all_reduce_one_shot_push_kernel``) under ``$SYMMTRITON_PROTOCOL=auto``: ``(staged,
#: zero-copy)``, or ``None``: auto never does. At 2 ranks it sends what the two-shot sends (the
#: tensor once per rank) with one round of flags instead of two, and a staged tensor needs no
#: staging copy; beyond 2 ranks it sends ``world - 1`` tensors per rank. ``None`` until it is
#: timed against the pull and the two-shot push on 2 GPUs (so far CPU- and compile-tested
#: only).
PUSH_ONE_SHOT_MIN_BYTES: tuple[int, int] | None = None


def push_one_shot_eligible(ctx: Ctx, nbytes: int, multimem: bool, staged: bool, algo: str,
                           requested: str | None) -> bool:
    """The all-reduce of ``nbytes`` pushes the whole tensor in one round: more than one rank, the
    pull has no multimem, and ``$SYMMTRITON_PROTOCOL`` chooses it: ``push`` when the algorithm
    (``algo``, picked by size or ``requested`` by the caller) is one-shot; ``auto`` at 2 ranks,
    unless the caller requested two-shot, from :data:`PUSH_ONE_SHOT_MIN_BYTES`. The caller
    checks that the buffer has room. Alike on every rank."""
    mode = _push_mode(ctx, multimem)
    if mode is None:
        return False
    if mode == "push":
        return algo == "one_shot"
    limits = PUSH_ONE_SHOT_MIN_BYTES
    return (ctx.world == 2 and requested != "two_shot" and limits is not None
            and nbytes >= limits[0 if staged else 1])


def aligned16(*values: int) -> bool:
    return all(v % ALIGN == 0 for v in values)


def offset_in(buf: SymmetricMemoryBuffer, t: torch.Tensor) -> int | None:
    """``t``'s byte offset in ``buf`` (``None``: not in it, or the buffer has no memory)."""
    return buf.byte_offset_of(t) if buf.symm_mem_hdl is not None else None


def region_after(buf: SymmetricMemoryBuffer, *tensors: torch.Tensor) -> int:
    """First 16-byte-aligned buffer offset past every tensor that lies in the buffer (0 when
    none does), so a staging region never overlaps an operand. Deterministic across ranks when
    the ranks lay the buffer out alike, as the scratch API does."""
    end = 0
    for t in tensors:
        off = buf.byte_offset_of(t)
        if off is not None:
            end = max(end, off + t.numel() * t.element_size())
    return -(-end // ALIGN) * ALIGN
