"""A buffer's launch context: what a kernel needs from a group's buffer, computed once per
buffer (:func:`context`), and where operands and staging regions lie in it.

Which path a call takes and with which config is decided in :mod:`symmtriton.config`, from the
thresholds of :mod:`symmtriton.presets`.
What here decides a path or a grid (the buffer layout, ``multicast_ptr`` agreed at rendezvous,
the grid cap from the signal-pad size, the barrier scope) is alike on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import env
from .config import ALIGN
from .kernels import protocol as _protocol
from .memory import SymmetricMemoryBuffer, SymmetricMemoryManager


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
    lines_off: int = 0  # the line area: its offset in every rank's allocation
    lines_words: int = 0  # and its 32-bit words per source slot (0: no area)

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
    ``$SYMMTRITON_BARRIER_SCOPE=sys`` forces ``"sys"`` everywhere (to measure the difference,
    docs/ARCHITECTURE.md, "Measured thresholds")."""
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


# -- where operands lie in the buffer ----------------------------------------------------------
def symm_usable(buf: SymmetricMemoryBuffer, device: torch.device, region_bytes_end: int) -> bool:
    """Symmetric memory can carry this call: the buffer rendezvoused, the tensors live where
    the buffer does, and the region fits."""
    return (buf.symm_mem_hdl is not None and device == buf.device
            and region_bytes_end <= buf.nbytes)


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
