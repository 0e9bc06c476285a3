"""The errors the collectives raise beyond ``ValueError``/``TypeError`` (a leaf module: the
runtime modules that raise them import it without importing each other).
``st.CollectiveTimeoutError``, ``st.CollectiveMismatchError`` and
``st.ConcurrentCollectiveError`` are public; see
:mod:`symmtriton.sync` for when the kernels' timeouts show."""

from __future__ import annotations


class CollectiveTimeoutError(RuntimeError):
    """A barrier or a host-side collective gave up waiting: some ranks did not reach the
    collective in time."""


class CollectiveMismatchError(CollectiveTimeoutError):
    """The ranks are out of step: a rank skipped a call (e.g. one that raised on that rank only)
    or made an extra one, so calls would have paired with another rank's different call."""


class ConcurrentCollectiveError(RuntimeError):
    """A collective was called on a process group while another thread of this process was
    inside a collective on the same group (or, on the ``host`` backend, on any group): the
    ranks cannot pair such calls. See :mod:`symmtriton.ops.driver` ("Threads")."""
