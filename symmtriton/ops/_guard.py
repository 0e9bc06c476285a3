"""The in-flight guard of each process group: one thread at a time inside the collectives of a
group (:func:`symmtriton.ops.driver.call` holds it from entry to return).

The ranks pair calls by their order on a group, which concurrent calls from several
threads of one process do not have. So each call holds its group's in-flight guard from entry to
return (a lock taken without waiting, ~0.1 us): a call that finds it held raises
:class:`~symmtriton.errors.ConcurrentCollectiveError` at once, and the call is counted as skipped
(``_calls.call_failed``, applied by the holder when it returns), so unless every rank turned a
call away alike, the ranks' next calls on that group raise
:class:`~symmtriton.errors.CollectiveMismatchError` instead of pairing wrongly (the call in
flight may already have paired with a peer's other call: destroy the buffer). Calls on
different groups from different threads run concurrently on the ``cuda`` backend (plans, buffers
and launch contexts are per group; the shared plan cache is locked where it changes; a thread
still on another CUDA device, as new threads are, launches on the buffer's, through Triton's
slower path: set the device in the thread for the fast one). On the
``host`` backend one guard covers every group: the Triton interpreter runs one kernel at a time
per process (it patches ``triton.language`` and keeps the block index in module globals), so two
collectives there raise the same error even on different groups.
"""

from __future__ import annotations

import threading

from .. import env
from .._calls import call_failed
from ..errors import ConcurrentCollectiveError


class Guard:
    """A group's in-flight lock, and the groups whose calls it turned away meanwhile (counted
    as skipped by the holder on its way out: a skip counted while a kernel of the same buffer
    runs would race with the kernel's own counter updates)."""

    __slots__ = ("lock", "skipped")

    def __init__(self):
        self.lock = threading.Lock()
        self.skipped: list = []


#: group -> its guard (every group's is the one process guard under the Triton interpreter).
GUARDS: dict = {}
_PROCESS_GUARD = Guard()


def new_guard(group) -> Guard:
    return GUARDS.setdefault(group, _PROCESS_GUARD if env.interpreting() else Guard())


def concurrent_error(op: str, group, guard: Guard) -> ConcurrentCollectiveError:
    guard.skipped.append(group)
    where = ("any group (the host backend's Triton interpreter runs one kernel at a time per "
             "process)" if guard is _PROCESS_GUARD else f"group {group.group_name!r}")
    return ConcurrentCollectiveError(
        f"{op}: another thread of this process is inside a collective on {where}; the ranks "
        "pair calls by their order on a group, which calls from several threads at once do not "
        "have. Call the collectives of a group from one thread at a time. This call counts as "
        "skipped here, so unless every rank skipped one, the next calls on the group raise "
        "CollectiveMismatchError on every rank (then destroy its buffer before using it again)")


def count_skipped(guard: Guard) -> None:
    while guard.skipped:
        call_failed(guard.skipped.pop())
