"""The operand records of the collectives: what a public function hands the plan driver
(:func:`.driver.call`) and what the ops' ``key``, ``uniform``, ``validate`` and ``prepare`` and
the plans' ``run`` read, by field name. Immutable tuples with typed, named fields
(``typing.NamedTuple``: the cheapest typed record to build on the hot path).

One record per operand layout: :class:`Flat` (``all_gather_into_tensor``,
``reduce_scatter_tensor``), :class:`AllReduceOperands` (``all_reduce``), :class:`Rows` (the
RMSNorm row ops), :class:`VarOperands` (``all_gather_v``, ``reduce_scatter_v``),
:class:`DispatchOperands` (``moe_dispatch``), :class:`CombineOperands` (``moe_combine``). The
public functions build theirs with :func:`record`. Also the ``key`` and ``uniform`` methods the two
:class:`Flat` ops share (plain functions, bound as methods by each op's class: no op inherits
another).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import env

#: ``record(Record, (field, ...))``: a record built in C, every field given, in order (no
#: defaults, no count check). The public functions build theirs so on every call: the
#: generated ``Record(...)``, a Python frame, costs ~0.1 us more (benchmarks/host_path.py).
record = tuple.__new__


class Flat(NamedTuple):
    """``output`` written from ``input`` (``all_gather_into_tensor``,
    ``reduce_scatter_tensor``)."""

    output: torch.Tensor
    input: torch.Tensor


class AllReduceOperands(NamedTuple):
    """``all_reduce``: the sum of ``input`` (the ``tensor`` argument) lands in ``output``:
    ``out``, or ``input`` itself (in place)."""

    output: torch.Tensor
    input: torch.Tensor
    algorithm: str | None


class Rows(NamedTuple):
    """The row ops (``reduce_scatter_add_rmsnorm[_all_gather]``, ``all_reduce_add_rmsnorm``):
    ``input`` [S, H] reduced, added to ``residual`` in place, RMSNorm with ``weight`` and
    ``eps`` into ``out`` (``None``: a new tensor per call). ``algorithm``: the all-reduce's
    (``all_reduce_add_rmsnorm``; ``None`` for the reduce-scatter family). ``out_dtype``,
    ``scale``: the FP8 output (ops/_quant.py); ``scales``: where dynamic scaling stores the
    row scales (``None``: a new tensor per call)."""

    input: torch.Tensor
    residual: torch.Tensor
    weight: torch.Tensor
    eps: float
    out: torch.Tensor | None
    algorithm: str | None = None
    out_dtype: torch.dtype | None = None
    scale: torch.Tensor | None = None
    scales: torch.Tensor | None = None


class VarOperands(NamedTuple):
    """The variable-count ops (``all_gather_v``, ``reduce_scatter_v``): ``output`` and
    ``input`` (tensors, or equal-length lists for ``all_gather_v``) and the device-resident
    row ``counts`` [W]."""

    output: torch.Tensor | list[torch.Tensor]
    input: torch.Tensor | list[torch.Tensor]
    counts: torch.Tensor


class DispatchOperands(NamedTuple):
    """A dispatch of ``x`` routed by ``topk_idx`` into ``recv_x``, ``recv_counts`` and
    ``rowmap`` (``max_tokens``: ``max_tokens_per_rank``); ``recv_scales``: the FP8 rows' group
    scales (``use_fp8=True``: ``recv_x`` is FP8), else ``None``."""

    x: torch.Tensor
    topk_idx: torch.Tensor
    num_experts: int
    max_tokens: int
    recv_x: torch.Tensor
    recv_counts: torch.Tensor
    rowmap: torch.Tensor
    recv_scales: torch.Tensor | None


class CombineOperands(NamedTuple):
    """A combine of ``expert_out`` by the dispatch's ``rowmap`` into ``out``."""

    expert_out: torch.Tensor
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    rowmap: torch.Tensor
    num_experts: int
    out: torch.Tensor


def flat_key(op, group, config, timeout_s, a: Flat) -> tuple:
    """``key`` of a :class:`Flat` op (see :class:`.driver.Collective`): one flat tuple, no
    helper calls (it runs on every call)."""
    output, input = a.output, a.input
    return (op.name, group, output.data_ptr(), output.shape, output.stride(), output.dtype,
            output.device, input.data_ptr(), input.shape, input.stride(), input.dtype,
            input.device, config, env.timeout_key(timeout_s))


def flat_uniform(op, a: Flat) -> dict:
    """``uniform`` of a :class:`Flat` op."""
    return {"output": a.output, "input": a.input}
