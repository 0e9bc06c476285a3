"""Where symmetric memory comes from: ``cuda`` (torch symmetric memory) or ``host`` (POSIX shm).

Selection: ``SYMMTRITON_BACKEND=cuda|host`` wins; otherwise ``cuda`` when CUDA is available,
``host`` when it is not.
"""

from __future__ import annotations

import torch

from .. import env
from . import cuda, host

BACKENDS = ("cuda", "host")
ENV_BACKEND = env.BACKEND


def select_backend() -> str:
    """The backend new buffers use in this process."""
    forced = env.backend()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{ENV_BACKEND}={forced!r}: expected one of {', '.join(BACKENDS)}")
        if forced == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{ENV_BACKEND}=cuda but torch.cuda.is_available() is False")
        return forced
    return "cuda" if torch.cuda.is_available() else "host"


def backend_device(backend: str) -> torch.device:
    """The device whose tensors a buffer of ``backend`` holds."""
    if backend == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def allocate_local(backend: str, nbytes: int, device: torch.device):
    """This rank's memory of ``nbytes`` on ``backend``, not yet shared with the group."""
    if backend == "cuda":
        return cuda.allocate_local(nbytes, device)
    return host.allocate_local(nbytes)


def rendezvous(backend: str, local, nbytes: int, group):
    """Share ``local`` (from :func:`allocate_local`) with ``group``: the handle it returns owns
    the memory."""
    if backend == "cuda":
        return cuda.rendezvous(local, nbytes, group)
    return host.rendezvous(local, group)


def release_local(local) -> None:
    """Free memory from :func:`allocate_local` that was never shared: a host segment leaves
    ``/dev/shm`` now (a CUDA tensor goes with its last reference)."""
    if isinstance(local, host.HostSegment):
        local.close()
