"""Pieces the collective launchers share."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

import triton.language as tl

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
