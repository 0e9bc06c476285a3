"""What every collective launcher shares: the kernel module, the per-buffer launch context,
eligibility predicates, region placement and the barrier-timeout check."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .memory import SymmetricMemoryBuffer, SymmetricMemoryManager

TIMEOUT_ENV = "SYMMTRITON_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300.0
ALIGN = 16
MULTIMEM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class CollectiveTimeoutError(RuntimeError):
    """A barrier gave up waiting: some ranks did not reach the collective in time."""


def timeout_ns(timeout_s: float | None = None) -> int:
    """Barrier bound in ns: the argument, else ``$SYMMTRITON_TIMEOUT_S``, else 300 s; 0 = wait
    forever."""
    if timeout_s is None:
        raw = os.environ.get(TIMEOUT_ENV, "")
        try:
            timeout_s = float(raw) if raw else DEFAULT_TIMEOUT_S
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if timeout_s < 0:
        raise ValueError(f"timeout must be >= 0 seconds, got {timeout_s}")
    return int(timeout_s * 1e9)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def kernel(module: str, name: str):
    """``symmtriton.kernels.<module>.<name>`` (imported on first use)."""
    return getattr(importlib.import_module(f"symmtriton.kernels.{module}"), name)


def resolve_group(group):
    if group is None:
        if not dist.is_initialized():
            raise ValueError("group is None and torch.distributed is not initialized")
        return dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {group!r}")
    return group


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

    @property
    def world_p2(self) -> int:
        return 1 << (self.world - 1).bit_length()

    @property
    def use_ptx(self) -> bool:
        return self.buf.backend == "cuda" and not interpreting()


def context(buf: SymmetricMemoryBuffer) -> Ctx:
    hdl = buf.symm_mem_hdl
    cap = hdl.signal_pad_slots // hdl.world_size  # blocks * world_size barrier slots must fit
    if hdl.grid_limit is not None:
        cap = min(cap, hdl.grid_limit)
    if cap < 1:
        raise RuntimeError(f"signal pad of {hdl.signal_pad_size} bytes cannot hold one barrier "
                           f"for {hdl.world_size} ranks")
    return Ctx(buf, hdl.rank, hdl.world_size, hdl.buffer_ptrs_dev, hdl.signal_pad_ptrs_dev,
               hdl.multicast_ptr if buf.has_multicast else 0, buf.status.data_ptr(),
               cap, hdl.buffer_ptrs[hdl.rank])


# -- eligibility predicates ---------------------------------------------------------------------
def symm_usable(buf: SymmetricMemoryBuffer, device: torch.device, region_bytes_end: int) -> bool:
    """Symmetric memory can carry this call: the buffer rendezvoused, the tensors live where
    the buffer does, and the region fits."""
    return (buf.symm_mem_hdl is not None and device == buf.device
            and region_bytes_end <= buf.nbytes)


def multimem_eligible(ctx: Ctx, dtype: torch.dtype | None, *addrs_and_sizes: int) -> bool:
    """The multimem path applies: every rank has multicast, ``dtype`` reduces in multimem (None:
    a bit copy, any dtype), and every address and byte count is a multiple of 16."""
    return (ctx.mc_addr != 0 and (dtype is None or dtype in MULTIMEM_DTYPES)
            and aligned16(*addrs_and_sizes))


def aligned16(*values: int) -> bool:
    return all(v % ALIGN == 0 for v in values)


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


def find_buffer(group) -> SymmetricMemoryBuffer:
    return SymmetricMemoryManager.buffer_for_group(group)


def check_status(buf: SymmetricMemoryBuffer, op: str) -> None:
    """Raise :class:`CollectiveTimeoutError` if a barrier of ``buf`` recorded a timeout. Reads
    host memory only: no device synchronisation (a timeout shows once the kernel has ended)."""
    status = getattr(buf, "status", None)
    if status is None:
        return
    missing = int(status[0])
    if missing:
        ranks = [r for r in range(buf.world_size) if missing >> r & 1]
        raise CollectiveTimeoutError(
            f"{op}: rank {buf.rank} timed out in a barrier waiting for ranks {ranks} "
            f"({TIMEOUT_ENV} or timeout=); results of that call are invalid. Destroy the buffer "
            "(SymmetricMemoryManager.destroy) before using symmetric memory again")


def launch(buf: SymmetricMemoryBuffer, op: str, fn, grid: int, num_warps: int, *args, **constexprs):
    """Launch ``fn`` (a Triton kernel) and check the buffer's error word: before the launch for a
    timeout of an earlier call, and after it when the launch is synchronous (host backend). On
    the GPU a timeout of this call shows at the next call or at :func:`symmtriton.synchronize`."""
    check_status(buf, op)
    fn[(grid,)](*args, num_warps=num_warps, **constexprs)
    if buf.device.type == "cpu":
        check_status(buf, op)


def synchronize(group=None) -> None:
    """Wait for this rank's work on the current CUDA stream, then raise
    :class:`CollectiveTimeoutError` if a barrier of any buffer of ``group`` timed out. The way to
    see a timeout of the last call on the GPU (launches are asynchronous)."""
    group = resolve_group(group)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.current_stream().synchronize()
    for buf in list(SymmetricMemoryManager._buffers.values()):
        if buf.process_group is group:
            check_status(buf, "synchronize")


CHECK_ENV = "SYMMTRITON_CHECK_UNIFORM"


def check_uniform(group, op: str, **tensors: torch.Tensor) -> None:
    """With ``SYMMTRITON_CHECK_UNIFORM=1``: all ranks compare the shapes and dtypes of this call
    (a host collective per call: a debugging aid, not for graphs or production) and every rank
    raises ``ValueError`` naming the ranks that differ. Off by default: a mismatch is otherwise
    undetectable without communication, and corrupts or times out."""
    if os.environ.get(CHECK_ENV, "") != "1":
        return
    mine = {k: (tuple(t.shape), str(t.dtype)) for k, t in tensors.items()}
    world = dist.get_world_size(group)
    seen: list = [None] * world
    dist.all_gather_object(seen, (op, mine), group=group)
    if any(s != seen[0] for s in seen):
        raise ValueError(f"{op}: ranks disagree on the call: " +
                         "; ".join(f"rank {r}: {s[0]} {s[1]}" for r, s in enumerate(seen)))
