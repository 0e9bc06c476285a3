"""``all_reduce`` and ``all_reduce_add_rmsnorm``: host side of kernels/all_reduce.py and
kernels/all_reduce_rmsnorm.py, for tensor parallelism without sequence parallelism::

    tensor   = sum over ranks of tensor                        # all_reduce, fp32 accumulation
    residual = residual + sum over ranks of input              # all_reduce_add_rmsnorm: in place
    out      = rmsnorm(residual) * weight                      #   (fp32 statistics)

Both run one-shot (every rank reduces the whole tensor) or two-shot (each rank reduces
``1/world`` of it and stores the sums on every rank), chosen by
:func:`symmtriton.config.all_reduce_algorithm` or forced with ``algorithm=``. Zero-copy when the
input lies in the group's symmetric buffer (at the same offset on every rank), staged in the same
launch otherwise; ``torch.distributed`` (fp32 all-reduce) when symmetric memory cannot carry it.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from .. import env
from .._calls import counts_calls
from .. import context as L
from ..kernels.all_reduce import _all_reduce_kernel
from ..kernels.all_reduce_rmsnorm import _all_reduce_rmsnorm_kernel
from ..launch import Launch
from ..memory import resolve_group
from ..config import (ALL_REDUCE_ALGORITHMS, MAX_FUSED_HIDDEN, LaunchConfig, all_reduce_algorithm,
                      default_config)
from ..validation import REDUCE_DTYPES, check_distinct, check_same, check_tensor
from .driver import TL_DTYPE, check_uniform, get_plan, put_plan
from .driver import tensor_desc as _desc
from .fallback import torch_all_reduce_add_rmsnorm
from .fused import _same_int_class
from .fused import validate as _validate

OP = "all_reduce"
OP_FUSED = "all_reduce_add_rmsnorm"


@counts_calls
def all_reduce(tensor: torch.Tensor, group=None, *, out: torch.Tensor | None = None,
               config: LaunchConfig | None = None, timeout_s: float | None = None,
               algorithm: str | None = None) -> torch.Tensor:
    """Sum ``tensor`` over the ranks of ``group`` (like ``torch.distributed.all_reduce`` with
    ``op=SUM``), in place, or into ``out`` (same shape and dtype; ``tensor`` is then left
    unchanged). bf16, fp16 and fp32 of any shape, accumulated in fp32. ``algorithm``:
    ``"one_shot"`` or ``"two_shot"`` (default: by size and world size); the same on every rank.

    Every rank must lay out the symmetric buffer alike: a zero-copy ``tensor``, or an ``out``
    placed in the buffer, at the same offset on every rank (two-shot stores the sums there on
    every rank)."""
    group = resolve_group(group, "group")
    try:  # everything the launch decision depends on (see symmtriton.ops.driver, plans)
        key = (OP, group, _desc(tensor), _desc(out), config, algorithm, env.timeout_key(timeout_s))
    except (AttributeError, TypeError):
        key = None  # not tensors: validation below raises
    plan = get_plan(key)
    dst = tensor if out is None else out
    if plan is not None:
        _check_uniform(group, OP, tensor=tensor)
        if plan.__class__ is Launch:
            plan.launch()
        elif plan == "fallback":
            _torch_all_reduce(dst, tensor, group)
        return dst
    _check_flat("tensor", tensor)
    if out is not None:
        _check_flat("out", out)
        check_same(OP, tensor=tensor, out=out)
        if out.shape != tensor.shape:
            raise ValueError(f"{OP}: out shape {tuple(out.shape)} must be tensor's shape "
                             f"{tuple(tensor.shape)}")
        if out.data_ptr() != tensor.data_ptr():
            check_distinct(OP, "out", out, "tensor", tensor)
    _check_uniform(group, OP, tensor=tensor)
    world = dist.get_world_size(group)
    n, esize = tensor.numel(), tensor.element_size()
    algo = _algorithm(algorithm, n * esize, world)
    if n == 0:
        put_plan(key, "empty")
        return dst
    buf = L.find_buffer(group)
    in_off = buf.byte_offset_of(tensor) if buf.symm_mem_hdl is not None else None
    out_off = buf.byte_offset_of(dst) if buf.symm_mem_hdl is not None else None
    region = in_off if in_off is not None else L.region_after(buf, tensor, dst)
    in_place = dst.data_ptr() == tensor.data_ptr()
    if algo == "two_shot":  # where the sums land on every rank (kernels/all_reduce.py)
        if in_place or (out_off is None and in_off is None):
            res = region  # the output itself, or the staging region (scratch)
        elif out_off is not None:
            res = out_off  # ``out`` lies in the buffer: the sums land there directly
        else:
            res = L.region_after(buf, tensor, dst)  # keep the zero-copy input intact
        copy_out = res != out_off
    else:  # one-shot: straight to ``dst``, unless that is the zero-copy input peers still read
        copy_out = in_place and in_off is not None
        res = L.region_after(buf, tensor) if copy_out else region
    if not L.symm_usable(buf, tensor.device, max(region, res) + n * esize):
        put_plan(key, "fallback")
        return _torch_all_reduce(dst, tensor, group)
    ctx = L.context(buf)
    cfg = config or default_config(n if algo == "one_shot" else -(-n // world), tensor.dtype, world)
    chunks = -(-n // cfg.block_size)
    cps = chunks if algo == "one_shot" else -(-chunks // world)
    base = ctx.local_base
    aligned = L.aligned16(tensor.data_ptr(), dst.data_ptr(), base + region, base + res, n * esize)
    use_mm = L.multimem_eligible(ctx, tensor.dtype, base + region, base + res, n * esize,
                                 cfg.block_size * esize)
    plan = Launch(
        OP, buf, _all_reduce_kernel,
        cfg.row_grid(cps, ctx.grid_cap), cfg.num_warps,
        (tensor.data_ptr(), dst.data_ptr(), ctx.buf_table, ctx.sig_table, ctx.mc_addr,
         ctx.err_addr, ctx.grid_cap, region, res, n, cps, env.timeout_ns(timeout_s)),
        dict(DTYPE=TL_DTYPE[tensor.dtype], RANK=ctx.rank, WORLD_SIZE=world, WORLD_P2=ctx.world_p2,
             BLOCK_SIZE=cfg.block_size, TWO_SHOT=algo == "two_shot", STAGE_IN=in_off is None,
             COPY_OUT=copy_out, USE_MULTIMEM=use_mm, SCOPE=ctx.scope, USE_PTX=ctx.use_ptx,
             ALIGNED=aligned))
    put_plan(key, plan)
    plan.launch()
    return dst


@counts_calls
def all_reduce_add_rmsnorm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float = 1e-6, group=None, out: torch.Tensor | None = None, *,
                           config: LaunchConfig | None = None, timeout_s: float | None = None,
                           algorithm: str | None = None) -> torch.Tensor:
    """All-reduce ``input`` [S, H] (this rank's partial sums) over ``group``, add the sum to
    ``residual`` [S, H] (the same on every rank; updated in place, rounded to its dtype), and
    return ``rmsnorm(residual) * weight`` [H] (fp32 statistics) in ``out`` [S, H] (a new tensor
    when ``None``; it must not overlap ``input``, which is only read). ``algorithm`` as for
    :func:`all_reduce`."""
    group = resolve_group(group, "group")
    new_out = out is None
    try:  # everything the launch decision depends on (see symmtriton.ops.driver, plans)
        key = (OP_FUSED, group, _desc(input), _desc(residual), _desc(weight), _desc(out),
               type(eps), eps, config, algorithm, env.timeout_key(timeout_s))
    except (AttributeError, TypeError):
        key = None
    plan = get_plan(key)
    if plan is not None:
        _check_uniform(group, OP_FUSED, input=input, residual=residual, weight=weight)
        if out is None:
            out = torch.empty_like(input)
        if plan.__class__ is Launch:
            if plan.var_index is None:
                plan.launch()
                return out
            if _same_int_class(out.data_ptr(), plan.args[plan.var_index]):
                plan.launch(out.data_ptr())
                return out
        elif plan == "empty":
            return out
        else:
            return _torch_fused(input, residual, weight, eps, group, out)
    if (isinstance(input, torch.Tensor) and isinstance(residual, torch.Tensor)
            and residual.shape != input.shape):
        raise ValueError(f"{OP_FUSED}: residual shape {tuple(residual.shape)} must be input's "
                         f"shape {tuple(input.shape)}")
    _validate(OP_FUSED, input, residual, weight, eps, 1, out, False)  # [S, H] on every rank
    if out is not None:
        check_distinct(OP_FUSED, "out", out, "input", input)
    _check_uniform(group, OP_FUSED, input=input, residual=residual, weight=weight)
    world = dist.get_world_size(group)
    S, H = input.shape
    esize = input.element_size()
    algo = _algorithm(algorithm, S * H * esize, world)
    if config is not None and config.block_size < H:
        raise ValueError(f"{OP_FUSED}: config.block_size {config.block_size} must cover the row "
                         f"(H={H})")
    var_index = 1 if new_out else None  # a new ``out`` per call: its pointer varies
    if out is None:
        out = torch.empty_like(input)
    if S == 0 or H == 0:
        put_plan(key, "empty")
        return out
    buf = L.find_buffer(group)
    in_off = buf.byte_offset_of(input) if buf.symm_mem_hdl is not None else None
    region = in_off if in_off is not None else L.region_after(buf, input, residual, weight, out)
    # two-shot: where the reduced rows land on every rank (kernels/all_reduce_rmsnorm.py)
    res = region
    if algo == "two_shot" and in_off is not None:
        res = L.region_after(buf, input, residual, weight, out)
    end = max(region, res) + S * H * esize
    if H > MAX_FUSED_HIDDEN or not L.symm_usable(buf, input.device, end):
        put_plan(key, "fallback")
        return _torch_fused(input, residual, weight, eps, group, out)
    ctx = L.context(buf)
    rps = S if algo == "one_shot" else -(-S // world)
    cfg = config or default_config(rps * H, input.dtype, world, hidden=H)
    base, row_bytes = ctx.local_base, H * esize
    aligned = (L.aligned16(input.data_ptr(), out.data_ptr(), residual.data_ptr(), base + region,
                           base + res, row_bytes)
               and L.aligned16(weight.data_ptr(), H * weight.element_size()))
    use_mm = L.multimem_eligible(ctx, input.dtype, base + region, base + res, row_bytes,
                                 cfg.block_size * esize)
    plan = Launch(
        OP_FUSED, buf, _all_reduce_rmsnorm_kernel,
        cfg.row_grid(rps, ctx.grid_cap), cfg.num_warps,
        (input.data_ptr(), out.data_ptr(), residual.data_ptr(), weight.data_ptr(), ctx.buf_table,
         ctx.sig_table, ctx.mc_addr, ctx.err_addr, ctx.grid_cap, region, res, S, H, rps,
         float(eps), env.timeout_ns(timeout_s)),
        dict(DTYPE=TL_DTYPE[input.dtype], W_DTYPE=TL_DTYPE[weight.dtype], RANK=ctx.rank,
             WORLD_SIZE=world, WORLD_P2=ctx.world_p2, BLOCK_H=cfg.block_size,
             TWO_SHOT=algo == "two_shot", STAGE_IN=in_off is None, USE_MULTIMEM=use_mm,
             SCOPE=ctx.scope, USE_PTX=ctx.use_ptx, ALIGNED=aligned),
        var_index=var_index)
    put_plan(key, plan)
    plan.launch()
    return out


def _check_flat(name: str, t) -> None:
    """``check_tensor`` for the all-reduce, which also takes 0-d tensors."""
    if isinstance(t, torch.Tensor) and t.dim() == 0:
        t = t.view(1)
    check_tensor(name, t, dtypes=REDUCE_DTYPES)


def _algorithm(algorithm, nbytes: int, world: int) -> str:
    if algorithm is None:
        return all_reduce_algorithm(nbytes, world)
    if algorithm not in ALL_REDUCE_ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALL_REDUCE_ALGORITHMS)} or None, "
                         f"got {algorithm!r}")
    return algorithm


def _torch_all_reduce(dst: torch.Tensor, tensor: torch.Tensor, group) -> torch.Tensor:
    """The same sum through ``torch.distributed`` (an fp32 all-reduce; ``tensor`` only read)."""
    acc = tensor.to(torch.float32, copy=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        dist.all_reduce(acc, group=group)
    return dst.copy_(acc)


def _torch_fused(input, residual, weight, eps, group, out):
    """The same computation through torch.distributed and torch ops (fp32 accumulation)."""
    acc = _torch_all_reduce(torch.empty(input.shape, dtype=torch.float32, device=input.device),
                            input, group)
    return torch_all_reduce_add_rmsnorm(acc, residual, weight, eps, out)


def _check_uniform(group, op, **tensors):
    # plans here are a Launch or the markers "empty" / "fallback" until this module moves onto
    # the plan driver (ops/driver.py)
    if env.check_uniform():
        check_uniform(group, op, **tensors)
