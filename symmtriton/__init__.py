"""symmtriton: low-latency symmetric-memory collectives for LLM inference, in Triton."""

from .memory import SymmetricMemoryBuffer, SymmetricMemoryManager

__all__ = [
    "SymmetricMemoryBuffer",
    "SymmetricMemoryManager",
]
__version__ = "0.1.0"
