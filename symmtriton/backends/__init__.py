"""Where symmetric memory comes from: ``cuda`` (torch symmetric memory) or ``host`` (POSIX shm).

Selection: ``SYMMTRITON_BACKEND=cuda|host`` wins; otherwise ``cuda`` when CUDA is available,
``host`` when it is not.
"""

from __future__ import annotations

import torch

from .. import env

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
