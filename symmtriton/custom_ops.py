"""The public collectives as ``torch.library`` custom ops, for ``torch.compile`` and CUDA graphs.

Importing this module registers, under the namespace ``symmtriton``::

    torch.ops.symmtriton.all_gather_into_tensor(output, input, group_name) -> ()
    torch.ops.symmtriton.reduce_scatter_tensor(output, input, group_name) -> ()
    torch.ops.symmtriton.reduce_scatter_add_rmsnorm_all_gather(input, residual, weight, eps,
                                                              group_name, out) -> ()
    torch.ops.symmtriton.reduce_scatter_add_rmsnorm(input, residual, weight, eps, group_name,
                                                   out) -> ()
    torch.ops.symmtriton.all_gather_v(output[], input[], counts, group_name) -> ()
    torch.ops.symmtriton.reduce_scatter_v(output, input, counts, group_name) -> ()
    torch.ops.symmtriton.all_reduce_(tensor, group_name, algorithm=None) -> ()
    torch.ops.symmtriton.all_reduce_out(tensor, group_name, out, algorithm=None) -> ()
    torch.ops.symmtriton.all_reduce_add_rmsnorm(input, residual, weight, eps, group_name, out,
                                               algorithm=None) -> ()
    torch.ops.symmtriton.moe_dispatch(x, topk_idx, num_experts, max_tokens_per_rank,
                                      group_name, recv_x, recv_counts, rowmap) -> ()
    torch.ops.symmtriton.moe_combine(expert_out, topk_idx, topk_weights, rowmap, num_experts,
                                     group_name, out) -> ()

Each op writes its result into its output tensor (``output`` / ``out``; ``all_reduce_`` into
``tensor``; the fused ops also update ``residual`` in place) and returns nothing: the schema
marks exactly those arguments as mutated, so ``torch.compile(fullgraph=True)`` traces a model
that calls them without graph breaks, and functionalization knows which tensors change. Fake
(meta) implementations let the compiler trace shapes without running a collective.

A process group cannot be an operator argument, so the ops take its name
(``group.group_name``, see :func:`group_name`) and look the group up when they run
(:func:`group_from_name`). Dynamo traces
``group.group_name`` and ``dist.get_world_size(group)`` as constants, so a module may keep the
group itself (as :func:`all_gather` and :func:`reduce_scatter` do) or store its name in
``__init__``.

The ops call the eager functions of :mod:`symmtriton.ops` (which, under ``torch.compile``,
dispatch back to these ops), so they take the same zero-copy / staged / ``torch.distributed``
fallback paths and raise the same errors.

Python-level conveniences that allocate their result: :func:`all_gather` and
:func:`reduce_scatter`. Under ``torch.compile`` the functionalized graph may hand an op a fresh
copy of a mutated argument instead of the original tensor, so a zero-copy ``output`` placed in
the symmetric buffer can become a staged one there (the result is the same).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from .memory import resolve_group
from .ops import all_reduce as _all_reduce
from .ops import fused
from .ops import moe as _moe
from .ops.all_gather import all_gather_into_tensor as _all_gather_into_tensor
from .ops.all_gather_v import all_gather_v as _all_gather_v
from .ops.driver import group_name
from .ops.reduce_scatter import reduce_scatter_tensor as _reduce_scatter_tensor
from .ops.reduce_scatter_v import reduce_scatter_v as _reduce_scatter_v

NAMESPACE = "symmtriton"

__all__ = [
    "NAMESPACE",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "reduce_scatter_add_rmsnorm_all_gather",
    "reduce_scatter_add_rmsnorm",
    "all_reduce_",
    "all_reduce_out",
    "all_reduce_add_rmsnorm",
    "all_gather_v",
    "reduce_scatter_v",
    "moe_dispatch",
    "moe_combine",
    "group_name",
    "group_from_name",
    "all_gather",
    "reduce_scatter",
]


# -- group names ----------------------------------------------------------------------------------
def group_from_name(name: str) -> dist.ProcessGroup:
    """The process group registered under ``name`` (the inverse of :func:`group_name`)."""
    if not isinstance(name, str):
        raise TypeError(f"group_name must be a str, got {type(name).__name__} {name!r}")
    try:
        return distributed_c10d._resolve_process_group(name)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ValueError(f"no process group is registered under group_name {name!r}: "
                         f"{exc}") from None


# -- the ops -------------------------------------------------------------------------------------
@torch.library.custom_op(f"{NAMESPACE}::all_gather_into_tensor", mutates_args=("output",))
def all_gather_into_tensor(output: torch.Tensor, input: torch.Tensor, group_name: str) -> None:
    """:func:`symmtriton.all_gather_into_tensor` on the group named ``group_name``; writes
    ``output``."""
    _all_gather_into_tensor(output, input, group_from_name(group_name))


@all_gather_into_tensor.register_fake
def _all_gather_into_tensor_fake(output, input, group_name):
    return None


@torch.library.custom_op(f"{NAMESPACE}::reduce_scatter_tensor", mutates_args=("output",))
def reduce_scatter_tensor(output: torch.Tensor, input: torch.Tensor, group_name: str) -> None:
    """:func:`symmtriton.reduce_scatter_tensor` (sum) on the group named ``group_name``; writes
    ``output``."""
    _reduce_scatter_tensor(output, input, group_from_name(group_name))


@reduce_scatter_tensor.register_fake
def _reduce_scatter_tensor_fake(output, input, group_name):
    return None


@torch.library.custom_op(f"{NAMESPACE}::reduce_scatter_add_rmsnorm_all_gather",
                         mutates_args=("residual", "out"))
def reduce_scatter_add_rmsnorm_all_gather(input: torch.Tensor, residual: torch.Tensor,
                                          weight: torch.Tensor, eps: float, group_name: str,
                                          out: torch.Tensor) -> None:
    """``symmtriton.ops.fused.reduce_scatter_add_rmsnorm_all_gather``: reduce-scatter ``input``
    ``[S, H]``, add the shard to ``residual`` ``[S/W, H]`` (updated in place), RMSNorm it with
    ``weight`` ``[H]`` and ``eps``, and all-gather the normed rows into ``out`` ``[S, H]``."""
    fused.reduce_scatter_add_rmsnorm_all_gather(input, residual, weight, eps,
                                                group_from_name(group_name), out)


@reduce_scatter_add_rmsnorm_all_gather.register_fake
def _reduce_scatter_add_rmsnorm_all_gather_fake(input, residual, weight, eps, group_name, out):
    return None


@torch.library.custom_op(f"{NAMESPACE}::reduce_scatter_add_rmsnorm",
                         mutates_args=("residual", "out"))
def reduce_scatter_add_rmsnorm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                               eps: float, group_name: str, out: torch.Tensor) -> None:
    """``symmtriton.ops.fused.reduce_scatter_add_rmsnorm``: like
    :func:`reduce_scatter_add_rmsnorm_all_gather` without the all-gather; ``out`` is the normed
    shard ``[S/W, H]``."""
    fused.reduce_scatter_add_rmsnorm(input, residual, weight, eps, group_from_name(group_name),
                                     out)


@reduce_scatter_add_rmsnorm.register_fake
def _reduce_scatter_add_rmsnorm_fake(input, residual, weight, eps, group_name, out):
    return None


# -- conveniences that allocate the result ---------------------------------------------------------
def _world_size(group) -> int:
    return dist.get_world_size(resolve_group(group, "group"))


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension, got a 0-d tensor")


def all_gather(input: torch.Tensor, group=None) -> torch.Tensor:
    """A new tensor ``[W * input.shape[0], *input.shape[1:]]`` holding every rank's ``input`` in
    rank order, through ``torch.ops.symmtriton.all_gather_into_tensor``. Traceable by
    ``torch.compile``."""
    _check_tensor("input", input)
    world = _world_size(group)
    output = input.new_empty((world * input.shape[0], *input.shape[1:]))
    all_gather_into_tensor(output, input, group_name(group))
    return output


def reduce_scatter(input: torch.Tensor, group=None) -> torch.Tensor:
    """A new tensor ``[input.shape[0] // W, *input.shape[1:]]``: this rank's slice of the sum of
    every rank's ``input``, through ``torch.ops.symmtriton.reduce_scatter_tensor``. Traceable by
    ``torch.compile``."""
    _check_tensor("input", input)
    world = _world_size(group)
    if input.shape[0] % world:
        raise ValueError(
            f"reduce_scatter: input.shape[0] = {input.shape[0]} is not divisible by the world "
            f"size {world}")
    output = input.new_empty((input.shape[0] // world, *input.shape[1:]))
    reduce_scatter_tensor(output, input, group_name(group))
    return output


# -- all-reduce (tensor parallelism without sequence parallelism) ----------------------------------
@torch.library.custom_op(f"{NAMESPACE}::all_reduce_", mutates_args=("tensor",))
def all_reduce_(tensor: torch.Tensor, group_name: str, algorithm: str | None = None) -> None:
    """:func:`symmtriton.all_reduce` (sum, in place) on the group named ``group_name``."""
    _all_reduce.all_reduce(tensor, group_from_name(group_name), algorithm=algorithm)


@all_reduce_.register_fake
def _all_reduce__fake(tensor, group_name, algorithm=None):
    return None


@torch.library.custom_op(f"{NAMESPACE}::all_reduce_out", mutates_args=("out",))
def all_reduce_out(tensor: torch.Tensor, group_name: str, out: torch.Tensor,
                   algorithm: str | None = None) -> None:
    """:func:`symmtriton.all_reduce` with ``out`` (``tensor`` is only read)."""
    _all_reduce.all_reduce(tensor, group_from_name(group_name), out=out, algorithm=algorithm)


@all_reduce_out.register_fake
def _all_reduce_out_fake(tensor, group_name, out, algorithm=None):
    return None


@torch.library.custom_op(f"{NAMESPACE}::all_reduce_add_rmsnorm", mutates_args=("residual", "out"))
def all_reduce_add_rmsnorm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float, group_name: str, out: torch.Tensor,
                           algorithm: str | None = None) -> None:
    """:func:`symmtriton.all_reduce_add_rmsnorm`: all-reduce ``input`` ``[S, H]``, add the sum to
    ``residual`` ``[S, H]`` (updated in place), RMSNorm it with ``weight`` and ``eps`` into
    ``out``."""
    _all_reduce.all_reduce_add_rmsnorm(input, residual, weight, eps=eps,
                                       group=group_from_name(group_name), out=out,
                                       algorithm=algorithm)


@all_reduce_add_rmsnorm.register_fake
def _all_reduce_add_rmsnorm_fake(input, residual, weight, eps, group_name, out, algorithm=None):
    return None


# -- variable-count collectives (expert parallelism) -------------------------------------------
@torch.library.custom_op(f"{NAMESPACE}::all_gather_v", mutates_args=("output",))
def all_gather_v(output: list[torch.Tensor], input: list[torch.Tensor], counts: torch.Tensor,
                 group_name: str) -> None:
    """:func:`symmtriton.all_gather_v` of the tensor pairs ``output[i]``/``input[i]`` (one
    launch) on the group named ``group_name``; writes every ``output[i]``."""
    _all_gather_v(list(output), list(input), counts, group_from_name(group_name))


@all_gather_v.register_fake
def _all_gather_v_fake(output, input, counts, group_name):
    return None


@torch.library.custom_op(f"{NAMESPACE}::reduce_scatter_v", mutates_args=("output",))
def reduce_scatter_v(output: torch.Tensor, input: torch.Tensor, counts: torch.Tensor,
                     group_name: str) -> None:
    """:func:`symmtriton.reduce_scatter_v` (sum) on the group named ``group_name``; writes
    ``output``."""
    _reduce_scatter_v(output, input, counts, group_from_name(group_name))


@reduce_scatter_v.register_fake
def _reduce_scatter_v_fake(output, input, counts, group_name):
    return None


# -- MoE all-to-all (expert parallelism) -----------------------------------------------------------
@torch.library.custom_op(f"{NAMESPACE}::moe_dispatch",
                         mutates_args=("recv_x", "recv_counts", "rowmap"))
def moe_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int,
                 max_tokens_per_rank: int, group_name: str, recv_x: torch.Tensor,
                 recv_counts: torch.Tensor, rowmap: torch.Tensor) -> None:
    """:func:`symmtriton.moe_dispatch` on the group named ``group_name`` into the given
    ``recv_x``, ``recv_counts`` and ``rowmap`` (the handle's)."""
    _moe.dispatch_into(x, topk_idx, num_experts, max_tokens_per_rank, recv_x, recv_counts, rowmap,
                       group_from_name(group_name))


@moe_dispatch.register_fake
def _moe_dispatch_fake(x, topk_idx, num_experts, max_tokens_per_rank, group_name, recv_x,
                       recv_counts, rowmap):
    return None


@torch.library.custom_op(f"{NAMESPACE}::moe_combine", mutates_args=("out",))
def moe_combine(expert_out: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                rowmap: torch.Tensor, num_experts: int, group_name: str,
                out: torch.Tensor) -> None:
    """:func:`symmtriton.moe_combine` with the handle's ``rowmap`` on the group named
    ``group_name``; writes ``out``."""
    _moe.combine_into(expert_out, topk_idx, topk_weights, rowmap, num_experts, out,
                      group_from_name(group_name))


@moe_combine.register_fake
def _moe_combine_fake(expert_out, topk_idx, topk_weights, rowmap, num_experts, group_name, out):
    return None
