"""Megatron-Core drop-in: ``megatron.core.inference.communication.torch_symm_triton`` on symmtriton.

The functions of that module (megatron-core 0.16.1), with its names, signatures and semantics,
on the handle of a symmtriton buffer (``buf.maybe_get_tensor(shape, dtype)["handle"]``, ``buf``
a buffer of :class:`~symmtriton.SymmetricMemoryManager`; its group is the collective's group).
Each returns its first argument:

* ``multimem_all_gather(output_tensor, input_tensor, symm_mem_hdl, **kwargs)``: every rank's
  ``input_tensor``, flat and in rank order, into ``output_tensor`` (``world`` times as many
  elements).
* ``multimem_reduce_scatter(output_tensor, input_tensor, symm_mem_hdl, **kwargs)``: slice
  ``rank`` of ``input_tensor`` (flat, ``world`` equal slices) summed over the ranks, into
  ``output_tensor``.
* ``fused_multimem_rs_add_norm_ag(residual_output_tensor, input_tensor, symm_mem_hdl,
  residual_input_tensor, rms_norm_weights, eps)``: ``input_tensor`` holds ``S`` rows of ``H =
  input_tensor.shape[-1]``; ``residual_output_tensor`` = ``residual_input_tensor`` (may be the
  same tensor, as Megatron passes it) + this rank's ``S / world`` rows of the reduce-scatter;
  then RMSNorm of those rows (fp32 statistics) times ``rms_norm_weights`` is all-gathered into
  ``input_tensor``, in place: the rows land where the input rows were.

Megatron needs the tensor its kernels reach through multicast (the all-gather's output, the
other two's input) at the start of its symmetric buffer, bf16, a multiple of 16 bytes, and
NVLink multicast. Here any tensors work: zero-copy when that tensor lies in the group's buffer
(as ``maybe_get_tensor`` gives it), else staged; any dtype symmtriton takes (the all-gather any,
the reductions bf16, fp16, fp32); any size; with or without multicast; on the CPU ``host``
backend too. Megatron's launch keywords (:data:`LAUNCH_KEYWORDS`) are accepted and ignored
(symmtriton picks its launch config); another keyword raises ``TypeError``. Where Megatron's
layout cannot be met (rows that do not split evenly over the ranks: Megatron's last rank would
read past them) a ``ValueError`` names it. Checks that raise on one rank count as a call, as a
collective's own do (``symmtriton._calls``).

:func:`install` makes an installed megatron-core use them: the three names, in
``torch_symm_triton``, its submodules and every loaded Megatron module that imported them, and
``GlobalSymmetricMemoryBuffer`` (``megatron.core.utils``, used by
``parallel_state._set_global_symmetric_memory_buffer``) resolve to symmtriton's;
:func:`uninstall` puts Megatron's back. megatron-core is imported by :func:`install` only.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import numbers
import sys

import torch.distributed as dist

from .._calls import call_failed
from ..backends.base import SymmHandle
from ..memory import SymmetricMemoryBuffer, SymmetricMemoryManager, resolve_group
from ..ops import fused
from ..ops._rows import validate_rows
from ..ops.all_gather import all_gather_into_tensor
from ..ops.reduce_scatter import reduce_scatter_tensor
from ..validation import REDUCE_DTYPES, check_disjoint, check_same, check_tensor

logger = logging.getLogger("symmtriton")

#: the Megatron modules :func:`install` changes (the functions, the buffer class) or reads.
FUNCTIONS_MODULE = "megatron.core.inference.communication.torch_symm_triton"
BUFFER_MODULE = "megatron.core.utils"
PARALLEL_STATE_MODULE = "megatron.core.parallel_state"
#: keywords Megatron's collectives take for their kernels' launch: accepted, ignored.
LAUNCH_KEYWORDS = ("max_num_blocks", "num_warps", "BLOCK_SIZE")


def _group_of(op: str, hdl):
    """The process group of the registered buffer whose handle ``hdl`` is."""
    if hdl is not None:
        for buf in SymmetricMemoryManager._buffers.values():
            if buf.symm_mem_hdl is hdl:
                return buf.process_group
    if hdl is None:
        raise ValueError(f"{op}: symm_mem_hdl is None (the buffer has no symmetric memory: "
                         "maybe_get_tensor gave its None form)")
    if isinstance(hdl, SymmHandle):
        raise ValueError(
            f"{op}: symm_mem_hdl belongs to no buffer of SymmetricMemoryManager: its buffer was "
            "destroyed, or replaced by a larger one (get_buffer), or made directly as a "
            "SymmetricMemoryBuffer; take the handle of a current buffer")
    raise TypeError(f"{op}: symm_mem_hdl must be the handle of a symmtriton buffer, got "
                    f"{type(hdl).__name__} (a buffer of Megatron's own, made before install()?)")


@contextlib.contextmanager
def _counted(group):
    """A check that raises here counts as a call on this rank (``symmtriton._calls``)."""
    try:
        yield
    except Exception:
        call_failed(group)
        raise


def _launch_keywords(op: str, kwargs: dict) -> None:
    unknown = sorted(set(kwargs) - set(LAUNCH_KEYWORDS))
    if unknown:
        raise TypeError(f"{op}: unexpected keyword arguments {unknown}; Megatron's are "
                        f"{list(LAUNCH_KEYWORDS)} (its kernels' launch shape, ignored here)")


def _flat_pair(op: str, big_name: str, big, small_name: str, small, world: int):
    """``big`` viewed as ``[world, small.numel()]`` and ``small`` flat: Megatron's layout, in
    the stacked form of the symmtriton collectives."""
    check_tensor(big_name, big)
    check_tensor(small_name, small)
    if big.numel() != world * small.numel():
        raise ValueError(f"{op}: {big_name} has {big.numel()} elements; Megatron's layout needs "
                         f"world size {world} x the {small.numel()} of {small_name}")
    return big.view(world, small.numel()), small.view(-1)


def multimem_all_gather(output_tensor, input_tensor, symm_mem_hdl, **kwargs):
    """Megatron's ``multimem_all_gather`` on symmtriton (see the module docstring)."""
    group = _group_of("multimem_all_gather", symm_mem_hdl)
    with _counted(group):
        _launch_keywords("multimem_all_gather", kwargs)
        out, inp = _flat_pair("multimem_all_gather", "output_tensor", output_tensor,
                              "input_tensor", input_tensor, dist.get_world_size(group))
    all_gather_into_tensor(out, inp, group=group)
    return output_tensor


def multimem_reduce_scatter(output_tensor, input_tensor, symm_mem_hdl, **kwargs):
    """Megatron's ``multimem_reduce_scatter`` on symmtriton (see the module docstring)."""
    group = _group_of("multimem_reduce_scatter", symm_mem_hdl)
    with _counted(group):
        _launch_keywords("multimem_reduce_scatter", kwargs)
        inp, out = _flat_pair("multimem_reduce_scatter", "input_tensor", input_tensor,
                              "output_tensor", output_tensor, dist.get_world_size(group))
    reduce_scatter_tensor(out, inp, group=group)
    return output_tensor


def fused_multimem_rs_add_norm_ag(residual_output_tensor, input_tensor, symm_mem_hdl,
                                  residual_input_tensor, rms_norm_weights, eps):
    """Megatron's ``fused_multimem_rs_add_norm_ag`` on symmtriton (see the module docstring)."""
    op = "fused_multimem_rs_add_norm_ag"
    group = _group_of(op, symm_mem_hdl)
    with _counted(group):
        world = dist.get_world_size(group)
        res_in = residual_input_tensor
        for name, t in (("input_tensor", input_tensor), ("residual_input_tensor", res_in),
                        ("residual_output_tensor", residual_output_tensor),
                        ("rms_norm_weights", rms_norm_weights)):
            check_tensor(name, t, dtypes=REDUCE_DTYPES)
        check_same(op, residual_output_tensor=residual_output_tensor, residual_input_tensor=res_in)
        H = input_tensor.shape[-1]
        rows = input_tensor.numel() // H if H else 0
        if rows % world:
            raise ValueError(f"{op}: input_tensor has {rows} rows of {H}, which do not split "
                             f"evenly over the world size {world} (Megatron's last rank would "
                             "read rows past them)")
        shard = (rows // world, H)
        for name, t in (("residual_output_tensor", residual_output_tensor),
                        ("residual_input_tensor", res_in)):
            if t.numel() != shard[0] * H:
                raise ValueError(f"{op}: {name} has {t.numel()} elements; this rank's rows of "
                                 f"input_tensor ({rows}, {H}) over {world} ranks are {shard}")
        x, res = input_tensor.view(rows, H), residual_output_tensor.view(shard)
        weight = rms_norm_weights.view(-1)
        validate_rows(op, x, res, weight, eps, world, x, True)
        if res_in.data_ptr() != res.data_ptr():
            check_disjoint(op, [("residual_output_tensor", res), ("residual_input_tensor", res_in)])
            res.copy_(res_in.view(shard))
    fused.reduce_scatter_add_rmsnorm_all_gather(x, res, weight, eps, group=group, out=x)
    return residual_output_tensor


class GlobalSymmetricMemoryBuffer:
    """Megatron's ``GlobalSymmetricMemoryBuffer(size_in_mb, process_group)`` on symmtriton.

    Constructing it returns a :class:`~symmtriton.SymmetricMemoryBuffer`: the one the
    collectives of ``process_group`` use when it is usable and holds ``size_in_mb``, else the
    buffer of key ``"megatron_<group name>"`` of SymmetricMemoryManager, created or grown to
    ``size_in_mb`` (collective). So Megatron's views of it are zero-copy operands of the
    functions above and of every symmtriton collective on the group."""

    def __new__(cls, size_in_mb, process_group):
        group = resolve_group(process_group)
        buf = SymmetricMemoryManager.buffer_for_group(group, create=False)
        if (buf is not None and buf.symm_mem_hdl is not None
                and isinstance(size_in_mb, numbers.Real) and buf.size_in_mb >= size_in_mb):
            return buf
        return SymmetricMemoryManager.get_buffer(f"megatron_{group.group_name}", group,
                                                 size_mb=size_in_mb)


#: what :func:`install` puts in Megatron's place, by name.
FUNCTIONS = {"multimem_all_gather": multimem_all_gather,
             "multimem_reduce_scatter": multimem_reduce_scatter,
             "fused_multimem_rs_add_norm_ag": fused_multimem_rs_add_norm_ag}
REPLACEMENTS = {**FUNCTIONS, "GlobalSymmetricMemoryBuffer": GlobalSymmetricMemoryBuffer}
#: ``(module, attribute, Megatron's object, symmtriton's)`` for every attribute install() replaced.
_installed: list = []


def parameters(obj) -> list:
    """``obj``'s parameters as (name, kind, default): its signature without annotations."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(obj).parameters.values()]


def _megatron():
    """Megatron's objects that :func:`install` replaces, by name (those this megatron-core has),
    after checking that each takes the parameters of symmtriton's."""
    try:
        funcs = importlib.import_module(FUNCTIONS_MODULE)
        utils = importlib.import_module(BUFFER_MODULE)
        importlib.import_module(PARALLEL_STATE_MODULE)
    except ImportError as exc:
        raise ImportError(f"symmtriton.integrations.megatron.install() needs megatron-core "
                          f"(pip install megatron-core): {exc}") from exc
    theirs = {name: getattr(funcs, name) for name in FUNCTIONS if hasattr(funcs, name)}
    theirs["GlobalSymmetricMemoryBuffer"] = utils.GlobalSymmetricMemoryBuffer
    for name, obj in theirs.items():
        if parameters(obj) != parameters(REPLACEMENTS[name]):
            raise RuntimeError(
                f"megatron-core's {name}{inspect.signature(obj)} does not take the parameters "
                f"of symmtriton's {name}{inspect.signature(REPLACEMENTS[name])}")
    others = sorted(n for n, v in vars(funcs).items()
                    if inspect.isfunction(v) and not n.startswith("_") and n not in FUNCTIONS)
    if others:
        logger.warning("symmtriton does not provide %s of %s: they stay Megatron's", others,
                       FUNCTIONS_MODULE)
    return theirs


def install() -> None:
    """Make megatron-core use symmtriton's collectives and buffer (see the module docstring).

    Replaces the names in every loaded ``megatron`` module that holds Megatron's objects
    (``from ... import name`` included); modules imported later find symmtriton's through
    ``torch_symm_triton``. Idempotent. Raises ``RuntimeError`` when Megatron's global symmetric
    buffer exists already (made with torch's symmetric memory, its handle is not symmtriton's:
    call ``parallel_state.destroy_global_symmetric_memory_buffer()`` first, or install before
    ``_set_global_symmetric_memory_buffer``), or when a function's parameters differ."""
    if _installed:
        return
    theirs = _megatron()
    existing = getattr(sys.modules[PARALLEL_STATE_MODULE], "_GLOBAL_SYMMETRIC_MEMORY_BUFFER", None)
    if existing is not None and not isinstance(existing, SymmetricMemoryBuffer):
        raise RuntimeError(
            "Megatron's global symmetric memory buffer exists already, made by Megatron (its "
            "handle is torch's, not symmtriton's): call parallel_state."
            "destroy_global_symmetric_memory_buffer() first, or install() before "
            "parallel_state._set_global_symmetric_memory_buffer()")
    pairs = {id(obj): (obj, REPLACEMENTS[name]) for name, obj in theirs.items()}
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").partition(".")[0] != "megatron":
            continue
        for attr, value in list(vars(module).items()):
            pair = pairs.get(id(value))
            if pair is not None and pair[0] is value:
                _installed.append((module, attr, value, pair[1]))
                setattr(module, attr, pair[1])


def uninstall() -> None:
    """Put Megatron's objects back where :func:`install` replaced them (unless replaced since).
    A global symmetric buffer Megatron got from symmtriton is dropped
    (``parallel_state.destroy_global_symmetric_memory_buffer``), as it was before install():
    ``_set_global_symmetric_memory_buffer`` then makes Megatron's own. The buffer itself stays
    in SymmetricMemoryManager until destroyed. Without a previous install(), nothing."""
    if not _installed:
        return
    while _installed:
        module, attr, value, new = _installed.pop()
        if getattr(module, attr, None) is new:
            setattr(module, attr, value)
    state = sys.modules.get(PARALLEL_STATE_MODULE)
    if isinstance(getattr(state, "_GLOBAL_SYMMETRIC_MEMORY_BUFFER", None), SymmetricMemoryBuffer):
        state.destroy_global_symmetric_memory_buffer()


def installed() -> bool:
    return bool(_installed)
