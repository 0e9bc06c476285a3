"""Pieces the collective launchers share."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

import triton.language as tl

from .. import _launch as L
from ..tuning import lookup_config

TL_DTYPE = {
    torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32,
    torch.int8: tl.int8, torch.uint8: tl.uint8, torch.int16: tl.int16, torch.int32: tl.int32,
}


def bit_unit(nbytes: int, *addrs: int) -> torch.dtype:
    """The widest integer type (<= 4 bytes) that divides ``nbytes`` and every address: the unit a
    bit copy moves."""
    for dtype, size in ((torch.int32, 4), (torch.int16, 2)):
        if nbytes % size == 0 and all(a % size == 0 for a in addrs):
            return dtype
    return torch.uint8


def torch_all_gather(output: torch.Tensor, input: torch.Tensor, group) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        dist.all_gather_into_tensor(output, input, group=group)
    return output


def torch_reduce_scatter(output: torch.Tensor, input: torch.Tensor, group) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        dist.reduce_scatter_tensor(output, input, group=group)
    return output


def call_key(op: str, group, config, timeout_s, output: torch.Tensor, input: torch.Tensor):
    """Everything the launch decision of a two-tensor collective depends on (the plan-cache key,
    see symmtriton._launch), or ``None`` when an argument is not a tensor (validation raises)."""
    try:
        return (op, group, output.data_ptr(), output.shape, output.stride(), output.dtype,
                output.device, input.data_ptr(), input.shape, input.stride(), input.dtype,
                input.device, config, L.timeout_key(timeout_s))
    except (AttributeError, TypeError):
        return None


def current(plan, config) -> bool:
    """A launch plan still holds the config a call would get: ``config`` was forced, or the
    tuner's answer is the one the plan was made with (``plan.extra = (args, kwargs, config)``
    of that lookup)."""
    return config is not None or lookup_config(*plan.extra[0], **plan.extra[1]) is plan.extra[2]


def replay(plan, op: str, group, config, fallback, output: torch.Tensor, input: torch.Tensor) -> bool:
    """Serve a call from its stored ``plan``; ``False`` when the plan is stale (a config tuned
    since it was made) and the caller must rebuild it."""
    L.check_uniform(group, op, output=output, input=input)
    if plan.kind == "launch":
        if not current(plan, config):
            return False
        L.launch(plan.buf, op, plan)
    elif plan.kind == "fallback":
        fallback(output, input, group)
    return True
