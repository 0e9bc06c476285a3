"""symmtriton: low-latency symmetric-memory collectives for LLM inference, in Triton."""

from ._interpret import ensure_interpreter_choice

ensure_interpreter_choice()  # before anything imports triton


from .config import LaunchConfig, default_config
from .memory import SymmetricMemoryBuffer, SymmetricMemoryManager
from .ops.all_gather import all_gather_into_tensor
from .ops.all_reduce import all_reduce, all_reduce_add_rmsnorm
from .ops.fused import reduce_scatter_add_rmsnorm, reduce_scatter_add_rmsnorm_all_gather
from .ops.reduce_scatter import reduce_scatter_tensor
from .ops.all_gather_v import all_gather_v
from .ops.reduce_scatter_v import reduce_scatter_v
from .ops._moe import MoeHandle
from .ops.moe_combine import moe_combine
from .ops.moe_dispatch import moe_dispatch
from .errors import ConcurrentCollectiveError
from .sync import CollectiveMismatchError, CollectiveTimeoutError, synchronize
from . import custom_ops  # noqa: E402,F401 - registers torch.ops.symmtriton.* for torch.compile

__all__ = [
    "SymmetricMemoryBuffer",
    "SymmetricMemoryManager",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "reduce_scatter_add_rmsnorm_all_gather",
    "reduce_scatter_add_rmsnorm",
    "LaunchConfig",
    "default_config",
    "CollectiveTimeoutError",
    "synchronize",
    "CollectiveMismatchError",
    "ConcurrentCollectiveError",
    "all_reduce",
    "all_reduce_add_rmsnorm",
    "all_gather_v",
    "reduce_scatter_v",
    "moe_dispatch",
    "moe_combine",
    "MoeHandle",
]
__version__ = "0.1.0"
