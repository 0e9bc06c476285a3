"""The torch.distributed fallback of every collective, for calls symmetric memory cannot carry
(no buffer, tensors elsewhere, too large). Its own torch implementation: the tests check it
against :mod:`symmtriton.reference`, a separate oracle."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F


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


def torch_all_reduce(output: torch.Tensor, input: torch.Tensor, group) -> torch.Tensor:
    """The sum of ``input`` over ``group`` into ``output`` (an fp32 all-reduce; ``input`` only
    read)."""
    acc = input.to(torch.float32, copy=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        dist.all_reduce(acc, group=group)
    return output.copy_(acc)


def torch_fused_rmsnorm(input, residual, weight, eps, group, out, all_gather: bool):
    """Reduce-scatter ``input`` (fp32), add to ``residual`` in place, RMSNorm with fp32
    statistics (``torch.nn.functional.rms_norm``), then all-gather into ``out`` (or copy)."""
    world = dist.get_world_size(group)
    shard = torch.empty((input.shape[0] // world, input.shape[1]), dtype=torch.float32,
                        device=input.device)
    torch_reduce_scatter(shard, input.float(), group)  # input is contiguous and only read
    normed = _add_rmsnorm(shard, residual, weight, eps)
    if all_gather:
        return torch_all_gather(out, normed, group)
    return out.copy_(normed)


def _add_rmsnorm(total, residual, weight, eps):
    """``residual += total`` (in place, rounded to its dtype), then RMSNorm with fp32
    statistics (``torch.nn.functional.rms_norm``), in the residual's dtype."""
    residual.copy_((residual.float() + total).to(residual.dtype))
    normed = F.rms_norm(residual.float(), (residual.shape[-1],), weight.float(), eps)
    return normed.to(residual.dtype)


def torch_all_reduce_add_rmsnorm(total, residual, weight, eps, out):
    """The all-reduce fused op's tail, after the fp32 sum ``total``: add, RMSNorm, into ``out``."""
    return out.copy_(_add_rmsnorm(total, residual, weight, eps))


def torch_all_reduce_rmsnorm(input, residual, weight, eps, group, out):
    """``all_reduce_add_rmsnorm`` through torch.distributed and torch ops (fp32
    accumulation)."""
    acc = torch_all_reduce(torch.empty(input.shape, dtype=torch.float32, device=input.device),
                           input, group)
    return torch_all_reduce_add_rmsnorm(acc, residual, weight, eps, out)
