"""Host side of the call-sequence protocol (kernels/barrier.py): a collective that raises on
this rank before launching still takes its place in the call sequence (:func:`sequenced`), so
the ranks' call counters tell a skipped call from a matched one."""

from __future__ import annotations

import functools
import inspect

import torch

from .context import context
from .errors import CollectiveTimeoutError, ConcurrentCollectiveError
from .kernels import protocol as _protocol
from .memory import SymmetricMemoryManager, resolve_group

#: ``torch.compiler.is_compiling`` (Dynamo knows the function, under any name), one lookup less.
_is_compiling = torch.compiler.is_compiling


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


def _parameters(fn) -> list:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def sequenced(traced):
    """Decorator of a public collective's eager path (``group`` among its parameters), given
    ``traced``, the path that runs instead while ``torch.compile`` traces (its custom op), with
    the same parameters (checked here): one ``torch.compiler.is_compiling`` per call picks the
    path. In eager, a call that raises before launching still takes its place in this rank's
    call sequence (:func:`call_failed`). While tracing, nothing launches (the traced op is
    sequenced when it runs) and an error reaches the caller as raised."""

    def decorate(op):
        if _parameters(traced) != _parameters(op):
            raise TypeError(f"{traced.__qualname__} must take the parameters of "
                            f"{op.__qualname__}")
        sig = inspect.signature(op)

        @functools.wraps(op)
        def wrapper(*args, **kwargs):
            if _is_compiling():
                return traced(*args, **kwargs)
            try:
                return op(*args, **kwargs)
            except CollectiveTimeoutError:
                raise  # the buffer is failed already; nothing to pair with
            except ConcurrentCollectiveError:
                raise  # sequenced by the call in flight when it returns (ops/_guard.py)
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
    return decorate
