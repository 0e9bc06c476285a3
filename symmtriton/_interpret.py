"""Choose between compiled Triton and the Triton interpreter, once, before triton is imported.

The ``host`` backend runs the kernels in the interpreter (integer pointers are host addresses
there). Triton decides per ``@triton.jit`` at decoration time, including its own library
functions, which it decorates when ``triton`` is first imported: so the choice must be in the
environment before that. A process that did not set ``TRITON_INTERPRET`` gets ``1`` when it will
use the host backend (no CUDA, or ``SYMMTRITON_BACKEND=host``).
"""

from __future__ import annotations

import logging
import os
import sys

from . import env


def ensure_interpreter_choice() -> None:
    if "TRITON_INTERPRET" in os.environ:
        return
    backend = env.backend()
    if backend == "cuda":
        return
    if backend != "host":
        import torch

        if torch.cuda.is_available():
            return
    if "triton" in sys.modules:
        logging.getLogger("symmtriton").warning(
            "triton was imported before symmtriton on a host-backend process; set "
            "TRITON_INTERPRET=1 before importing triton, or kernels cannot run on the CPU")
    os.environ["TRITON_INTERPRET"] = "1"
