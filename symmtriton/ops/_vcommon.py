"""Pieces the variable-count collectives (all_gather_v, reduce_scatter_v) share on the host."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import triton.language as tl

from .. import counts as C
from ..launch import Launch
from ._operands import VarOperands
from .driver import STALE, ConfigChoice, bump_versions

TL_COUNTS = {torch.int32: tl.int32, torch.int64: tl.int64}


@dataclass(eq=False)
class CountsPlan:
    """The plan of a variable-count op (operands :class:`~._operands.VarOperands`): launch
    ``kernel`` (``path`` ``"barrier"``, keeping ``table``, the tensor table it reads, alive), or
    run ``fallback(output, input, counts, group)`` (``"fallback"``). ``each``/``total`` name
    the capacities in a counts error."""

    path: str
    kernel: Launch | None = None
    choice: ConfigChoice | None = None
    fallback: Callable | None = None
    group: object = None
    each: str = ""
    total: str = ""
    table: torch.Tensor | None = None

    def run(self, a: VarOperands, config):
        """Raises the counts error of an earlier call before launching (GPU), and of this one
        after (host backend: synchronous)."""
        out = a.output
        bump_versions(tuple(out) if isinstance(out, (list, tuple)) else (out,))
        if self.fallback is not None:
            self.fallback(out, a.input, a.counts, self.group)
            return out
        if not self.choice.current():
            return STALE
        kern = self.kernel
        C.check_error(kern.buf, kern.status)
        C.remember(kern.buf, kern.op, a.counts, self.each, self.total)
        kern.launch()
        if kern.sync_check:
            C.check_error(kern.buf, kern.status, launched=True)
        return out


def clamp_or_raise(op: str, counts: torch.Tensor, cap_each: int, cap_total: int, each: str,
                   total: str):
    """The fallbacks' clamping: ``(starts, ns, raise_after)`` where ``raise_after()`` raises
    the counts error, if any, once the clamped rows have moved (as the kernels do)."""
    starts, ns, code = C.clamp(counts.tolist(), cap_each, cap_total)

    def raise_after():
        if code:
            raise C.counts_error(op, counts, code, each, total, launched=True)
    return starts, ns, raise_after


def pairs(op: str, output, input):
    """``output``/``input`` as equal-length lists (a tensor each, or equal-length lists)."""
    if isinstance(output, (list, tuple)) and isinstance(input, (list, tuple)):
        if len(output) != len(input):
            raise ValueError(f"{op}: output has {len(output)} tensors but input has {len(input)}")
        return list(output), list(input)
    if isinstance(output, (list, tuple)) or isinstance(input, (list, tuple)):
        raise TypeError(f"{op}: output and input must both be tensors or both be lists, got "
                        f"{type(output).__name__} and {type(input).__name__}")
    return [output], [input]
