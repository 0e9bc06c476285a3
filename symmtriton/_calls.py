"""Host side of the call-sequence protocol (kernels/barrier.py): a collective that raises on
this rank before launching still counts as a call, so the ranks' call counters tell a skipped
call from a matched one."""

from __future__ import annotations

import functools
import inspect

import torch

from .context import context
from .errors import CollectiveTimeoutError, ConcurrentCollectiveError
from .kernels import protocol as _protocol
from .memory import SymmetricMemoryManager, resolve_group


def call_failed(group) -> None:
    """A collective on ``group`` raised on this rank before launching: advance this rank's
    call-sequence counters by ``SKIP_BUMP`` calls (a stream-ordered add on the signal pad), so
    the peers' next calls see this rank out of step and every rank raises, instead of the
    next calls pairing with the wrong partner (kernels/barrier.py). A no-op without a usable
    buffer for ``group``."""
    try:
        group = resolve_group(group, "group")
    except Exception:  # the group itself was the bad argument
        return
    # the buffer the op would have used, never a new one: creating one is collective, and this
    # rank is alone here
    buf = SymmetricMemoryManager.buffer_for_group(group, create=False)
    hdl = buf.symm_mem_hdl if buf is not None else None
    if hdl is None or hdl.world_size == 1:
        return
    ctx = context(buf)
    seq = _protocol.SEQ0
    hdl.signal_pad(hdl.rank)[seq:seq + ctx.grid_cap].add_(_protocol.SKIP_BUMP)


def counts_calls(op):
    """Decorator for a public collective (``group`` among its arguments): a call that raises
    before launching still counts as a call on this rank (:func:`call_failed`). Not while
    ``torch.compile`` traces: tracing launches nothing (the traced op counts when it runs), and
    its error then reaches the caller as raised."""
    sig = inspect.signature(op)

    @functools.wraps(op)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():
            return op(*args, **kwargs)
        try:
            return op(*args, **kwargs)
        except CollectiveTimeoutError:
            raise  # the buffer is failed already; nothing to pair with
        except ConcurrentCollectiveError:
            raise  # counted by the call in flight when it returns (ops/_guard.py)
        except Exception as exc:
            if getattr(exc, "launched", False):
                raise  # raised by a call every rank made (counts.counts_error): not skipped
            try:
                group = sig.bind(*args, **kwargs).arguments.get("group")
            except TypeError:
                group = None
            call_failed(group)
            raise
    return wrapper
