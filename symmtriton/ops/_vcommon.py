"""Pieces the variable-count collectives (all_gather_v, reduce_scatter_v) share on the host."""

from __future__ import annotations

import torch
import triton.language as tl

from .. import _launch as L
from .. import counts as C
from ._common import current

TL_COUNTS = {torch.int32: tl.int32, torch.int64: tl.int64}


def desc(t: torch.Tensor):
    """What a plan depends on of tensor ``t``."""
    return (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)


def run(plan, op: str, config, counts: torch.Tensor, fallback, *args) -> bool:
    """Run a variable-count plan (``plan.extra = (lookup args, kwargs, config, each, total)``);
    ``False`` when it is stale (a config tuned since) and must be rebuilt. Raises the counts
    error of an earlier call before launching (GPU), and of this one after (host backend)."""
    if plan.kind == "fallback":
        fallback(*args)
        return True
    if not current(plan, config):
        return False
    buf, status = plan.buf, plan.status
    C.check_error(buf, status)
    C.remember(buf, op, counts, plan.extra[3], plan.extra[4])
    L.launch(buf, op, plan)
    if plan.sync_check:
        C.check_error(buf, status)
    return True


def clamp_or_raise(op: str, counts: torch.Tensor, cap_each: int, cap_total: int, each: str,
                   total: str):
    """The fallbacks' clamping: ``(starts, ns, raise_after)`` where ``raise_after()`` raises
    the counts error, if any, once the clamped rows have moved (as the kernels do)."""
    starts, ns, code = C.clamp(counts.tolist(), cap_each, cap_total)

    def raise_after():
        if code:
            raise C.counts_error(op, counts, code, each, total)
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
