"""The public collectives as ``torch.library`` custom ops, for ``torch.compile`` and CUDA graphs.

Importing this module registers, under the namespace ``symmtriton``, from one table
(:data:`TABLE`: each op's schema and the public function it runs)::

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
    torch.ops.symmtriton.<row op>_fp8(<the row op's arguments>, out_dtype, scale, scales) -> ()
    torch.ops.symmtriton.moe_dispatch(x, topk_idx, num_experts, max_tokens_per_rank,
                                      group_name, recv_x, recv_counts, rowmap,
                                      recv_scales) -> ()
    torch.ops.symmtriton.moe_combine(expert_out, topk_idx, topk_weights, rowmap, num_experts,
                                     group_name, out) -> ()

where ``<row op>_fp8`` (one for each of the three row ops) is the FP8 output of that op
(``out_dtype``, ``scale`` as for the public functions, ``scale`` ``None`` for dynamic scaling;
``scales``, written, the [rows, 1] fp32 row scales of dynamic scaling, which the public
functions return beside ``out``, else ``None``). No argument of an ``_fp8`` op and no written
argument of any op has a default (``all_reduce_add_rmsnorm_fp8`` takes ``algorithm`` too, None
for the default): torch releases before 2.13 find a written argument by its position among the
arguments the caller passed, so one left to its default, or passed by name, fails there.

Each op writes its result into its output tensor (``output`` / ``out``; ``all_reduce_`` into
``tensor``; the fused ops also update ``residual`` in place; ``moe_dispatch`` into ``recv_x``
and the handle's ``recv_counts``, ``rowmap`` and, with ``use_fp8=True``, ``recv_scales`` (FP8
``recv_x`` then; ``None``: no FP8), which ``symmtriton.moe_dispatch`` allocates before it calls
the op) and returns nothing: the schema
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
from .ops.all_gather import all_gather_into_tensor as _all_gather_into_tensor
from .ops.all_gather_v import all_gather_v as _all_gather_v
from .ops.all_reduce import all_reduce as _all_reduce
from .ops._rows import rows_entry
from .ops.all_reduce import ALL_REDUCE_ADD_RMSNORM
from .ops.driver import group_name
from .ops.fused import RS_ADD_RMSNORM, RS_ADD_RMSNORM_AG
from .ops.moe_combine import combine_into as _moe_combine_into
from .ops.moe_dispatch import dispatch_into as _moe_dispatch_into
from .ops.reduce_scatter import reduce_scatter_tensor as _reduce_scatter_tensor
from .ops.reduce_scatter_v import reduce_scatter_v as _reduce_scatter_v

NAMESPACE = "symmtriton"

__all__ = [
    "NAMESPACE",
    "OPS",
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
#: the arguments of the row ops, and the tail of the variable-count ops'
_ROWS = ("Tensor input, Tensor(a1!) residual, Tensor weight, float eps, str group_name, "
         "Tensor(a5!) out")
_COUNTED = "Tensor counts, str group_name"
_FP8 = "ScalarType out_dtype, Tensor? scale, Tensor(a8!)? scales"

#: name -> (schema, the public function it runs): every op of the namespace. The schema's
#: arguments are the function's, by name, except ``group_name``, which names its ``group``;
#: ``(aN!)`` marks the arguments the op writes. The row ops run their public function's body
#: with the ``scales`` argument (``ops._rows.rows_entry``).
TABLE = {
    "all_gather_into_tensor":
        ("(Tensor(a0!) output, Tensor input, str group_name) -> ()", _all_gather_into_tensor),
    "reduce_scatter_tensor":
        ("(Tensor(a0!) output, Tensor input, str group_name) -> ()", _reduce_scatter_tensor),
    "reduce_scatter_add_rmsnorm_all_gather":
        (f"({_ROWS}) -> ()", rows_entry(RS_ADD_RMSNORM_AG)),
    "reduce_scatter_add_rmsnorm_all_gather_fp8":
        (f"({_ROWS}, {_FP8}) -> ()", rows_entry(RS_ADD_RMSNORM_AG)),
    "reduce_scatter_add_rmsnorm": (f"({_ROWS}) -> ()", rows_entry(RS_ADD_RMSNORM)),
    "reduce_scatter_add_rmsnorm_fp8": (f"({_ROWS}, {_FP8}) -> ()", rows_entry(RS_ADD_RMSNORM)),
    "all_reduce_": ("(Tensor(a0!) tensor, str group_name, str? algorithm=None) -> ()", _all_reduce),
    "all_reduce_out":
        ("(Tensor tensor, str group_name, Tensor(a2!) out, str? algorithm=None) -> ()",
         _all_reduce),
    "all_reduce_add_rmsnorm":
        (f"({_ROWS}, str? algorithm=None) -> ()", rows_entry(ALL_REDUCE_ADD_RMSNORM)),
    "all_reduce_add_rmsnorm_fp8":
        (f"({_ROWS}, str? algorithm, {_FP8}) -> ()", rows_entry(ALL_REDUCE_ADD_RMSNORM)),
    "all_gather_v": (f"(Tensor(a0!)[] output, Tensor[] input, {_COUNTED}) -> ()", _all_gather_v),
    "reduce_scatter_v":
        (f"(Tensor(a0!) output, Tensor input, {_COUNTED}) -> ()", _reduce_scatter_v),
    "moe_dispatch":
        ("(Tensor x, Tensor topk_idx, int num_experts, int max_tokens_per_rank, str group_name, "
         "Tensor(a5!) recv_x, Tensor(a6!) recv_counts, Tensor(a7!) rowmap, "
         "Tensor(a8!)? recv_scales) -> ()",
         _moe_dispatch_into),
    "moe_combine":
        ("(Tensor expert_out, Tensor topk_idx, Tensor topk_weights, Tensor rowmap, "
         "int num_experts, str group_name, Tensor(a6!) out) -> ()", _moe_combine_into),
}


def _no_result(*args, **kwargs) -> None:
    """The fake (meta) implementation of every op: they return nothing."""
    return None


def _register(name: str, schema: str, public):
    """``torch.library.custom_op`` ``symmtriton::<name>`` of ``schema``, running ``public`` on
    the group named ``group_name`` with the other arguments by name; its fake: no result."""
    parsed = torch._C.parse_schema(f"{NAMESPACE}::{name}{schema}")
    names = [a.name for a in parsed.arguments]
    written = [a.name for a in parsed.arguments
               if a.alias_info is not None and a.alias_info.is_write]

    def run(*args, **kwargs) -> None:
        kwargs.update(zip(names, args))
        group = group_from_name(kwargs.pop("group_name"))
        public(**kwargs, group=group)

    run.__name__ = run.__qualname__ = name
    run.__doc__ = f":func:`symmtriton.{public.__name__}` as ``torch.ops.{NAMESPACE}.{name}``."
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", run, mutates_args=written,
                                 schema=schema)
    op.register_fake(_no_result)
    return op


#: name -> its custom op (``torch.library.CustomOpDef``), registered from :data:`TABLE`.
OPS = {name: _register(name, schema, public) for name, (schema, public) in TABLE.items()}
all_gather_into_tensor = OPS["all_gather_into_tensor"]
reduce_scatter_tensor = OPS["reduce_scatter_tensor"]
reduce_scatter_add_rmsnorm_all_gather = OPS["reduce_scatter_add_rmsnorm_all_gather"]
reduce_scatter_add_rmsnorm = OPS["reduce_scatter_add_rmsnorm"]
all_reduce_ = OPS["all_reduce_"]
all_reduce_out = OPS["all_reduce_out"]
all_reduce_add_rmsnorm = OPS["all_reduce_add_rmsnorm"]
all_gather_v = OPS["all_gather_v"]
reduce_scatter_v = OPS["reduce_scatter_v"]
moe_dispatch = OPS["moe_dispatch"]
moe_combine = OPS["moe_combine"]


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
