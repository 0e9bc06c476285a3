"""The barrier-timeout status word of a buffer, and what users see of it:
:class:`CollectiveTimeoutError` and :func:`synchronize` (both public: ``st.synchronize``,
``st.CollectiveTimeoutError``).

A barrier that waits longer than its bound (:func:`symmtriton.env.timeout_ns`) sets the bit of
every rank it still missed in the buffer's pinned host status word and gives up. The host reads
that word without synchronising the device: before each launch (a timeout of an earlier call),
after a synchronous launch (host backend), and in :func:`synchronize`.
"""

from __future__ import annotations

import torch

from . import counts as _counts
from . import env
from .errors import CollectiveMismatchError, CollectiveTimeoutError
from .kernels import protocol as _protocol
from .memory import SymmetricMemoryBuffer, SymmetricMemoryManager, resolve_group

__all__ = ["CollectiveMismatchError", "CollectiveTimeoutError", "check_status", "raise_timeout",
           "status_view", "synchronize"]


def status_view(buf: SymmetricMemoryBuffer):
    """A cheap view of ``buf.status`` (numpy over the same host memory; the tensor itself where
    numpy cannot view it), or ``None`` when the buffer has no status word."""
    status = getattr(buf, "status", None)
    if status is None:
        return None
    view = buf.__dict__.get("_status_np")
    if view is None or view[1] is not status:
        try:
            arr = status.numpy()
        except Exception:  # pragma: no cover - numpy missing or an unviewable tensor
            arr = status
        view = buf._status_np = (arr, status)
    return view[0]


def check_status(buf: SymmetricMemoryBuffer, op: str) -> None:
    """Raise :class:`CollectiveTimeoutError` if a barrier of ``buf`` recorded a timeout. Reads
    host memory only: no device synchronisation (a timeout shows once the kernel has ended)."""
    status = status_view(buf)
    if status is not None and status[0]:
        raise_timeout(buf, op, int(status[0]))
    if status is not None:
        _counts.check_error(buf, status, op)


def raise_timeout(buf: SymmetricMemoryBuffer, op: str, missing: int) -> None:
    """Raise the error for status word ``missing`` (one bit per rank the barrier missed)."""
    ranks = [r for r in range(buf.world_size) if missing >> r & 1]
    if missing & _protocol.MISMATCH_BIT:
        raise CollectiveMismatchError(
            f"{op}: rank {buf.rank} is out of step with ranks {ranks}: a rank skipped a call "
            "(one that raised on that rank only) or made an extra one; results of that call are "
            "invalid. Destroy the buffer (SymmetricMemoryManager.destroy) before using "
            "symmetric memory again")
    if missing & _protocol.GAVE_UP_BIT:
        raise CollectiveTimeoutError(
            f"{op}: rank {buf.rank}'s call failed: ranks {ranks} gave up on it (they timed out "
            "waiting for a rank or saw a mismatch) or did not arrive in time; results of that "
            "call are invalid. Destroy the buffer (SymmetricMemoryManager.destroy) before using "
            "symmetric memory again")
    raise CollectiveTimeoutError(
        f"{op}: rank {buf.rank} timed out in a barrier waiting for ranks {ranks} "
        f"({env.TIMEOUT_S} or timeout=); results of that call are invalid. Destroy the buffer "
        "(SymmetricMemoryManager.destroy) before using symmetric memory again")


def synchronize(group=None) -> None:
    """Wait for this rank's work on the current CUDA stream, then raise
    :class:`CollectiveTimeoutError` if a barrier of any buffer of ``group`` timed out. The way to
    see a timeout of the last call on the GPU (launches are asynchronous)."""
    group = resolve_group(group, "group")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.current_stream().synchronize()
    for buf in list(SymmetricMemoryManager._buffers.values()):
        if buf.process_group is group:
            check_status(buf, "synchronize")
