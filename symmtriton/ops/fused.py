"""Fused tensor-parallel collectives: host side of kernels/fused_rmsnorm.py.

``reduce_scatter_add_rmsnorm_all_gather`` is what a sequence-parallel transformer layer runs
between its row-parallel output projection and the next column-parallel matmul::

    shard    = reduce_scatter(input)            # [S/W, H], fp32 accumulation
    residual = residual + shard                 # in place, rounded to residual.dtype
    out      = all_gather(rmsnorm(residual) * weight)   # [S, H], fp32 statistics
"""

from __future__ import annotations

import numbers

import torch
import torch.distributed as dist

from .. import _launch as L
from .._calls import counts_calls
from .. import reference
from ..config import MAX_FUSED_HIDDEN, LaunchConfig
from ..tuning import lookup_config
from ..validation import REDUCE_DTYPES, check_distinct, check_same, check_tensor
from ._common import TL_DTYPE, current, torch_all_gather, torch_reduce_scatter


@counts_calls
def reduce_scatter_add_rmsnorm_all_gather(input: torch.Tensor, residual: torch.Tensor,
                                          weight: torch.Tensor, eps: float = 1e-6, group=None,
                                          out: torch.Tensor | None = None, *,
                                          config: LaunchConfig | None = None,
                                          timeout_s: float | None = None) -> torch.Tensor:
    """Reduce-scatter ``input`` [S, H] (this rank's partial sums) over ``group``, add this rank's
    slice to ``residual`` [S/W, H] in place, RMSNorm it (fp32 statistics) times ``weight`` [H],
    and all-gather the normed rows into ``out`` [S, H] (new tensor when ``None``).

    One launch when symmetric memory can carry it. Zero-copy when ``input`` lies in the group's
    symmetric buffer (e.g. written there by the GEMM); ``out=input`` then leaves the result in
    the buffer (a scratch area: the next collective may overwrite it). Otherwise falls back to
    torch.distributed + torch ops with the same result."""
    return _fused("reduce_scatter_add_rmsnorm_all_gather", input, residual, weight, eps, group,
                  out, True, config, timeout_s)


@counts_calls
def reduce_scatter_add_rmsnorm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                               eps: float = 1e-6, group=None, out: torch.Tensor | None = None, *,
                               config: LaunchConfig | None = None,
                               timeout_s: float | None = None) -> torch.Tensor:
    """As :func:`reduce_scatter_add_rmsnorm_all_gather` without the all-gather: ``out`` is this
    rank's normed shard [S/W, H], for layers that keep the sequence-sharded output."""
    return _fused("reduce_scatter_add_rmsnorm", input, residual, weight, eps, group, out, False,
                  config, timeout_s)


def _validate(op, input, residual, weight, eps, world, out, all_gather):
    check_tensor("input", input, dtypes=REDUCE_DTYPES)
    check_tensor("residual", residual, dtypes=REDUCE_DTYPES)
    check_tensor("weight", weight, dtypes=REDUCE_DTYPES)
    check_same(op, input=input, residual=residual)
    if weight.device != input.device:
        raise ValueError(f"{op}: weight is on {weight.device} but input is on {input.device}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        raise ValueError(f"{op}: eps must be a real number >= 0, got {eps!r}")
    if input.dim() != 2:
        raise ValueError(f"{op}: input must be 2-D [S, H], got shape {tuple(input.shape)}")
    S, H = input.shape
    if S % world:
        raise ValueError(f"{op}: input rows S={S} must be divisible by the world size {world}")
    if tuple(residual.shape) != (S // world, H):
        raise ValueError(f"{op}: residual shape {tuple(residual.shape)} must be "
                         f"{(S // world, H)} (input {(S, H)} over {world} ranks)")
    if tuple(weight.shape) != (H,):
        raise ValueError(f"{op}: weight shape {tuple(weight.shape)} must be ({H},)")
    check_distinct(op, "residual", residual, "input", input)
    if out is not None:
        check_tensor("out", out)
        check_same(op, input=input, out=out)
        want = (S, H) if all_gather else (S // world, H)
        if tuple(out.shape) != want:
            raise ValueError(f"{op}: out shape {tuple(out.shape)} must be {want}")
        check_distinct(op, "out", out, "residual", residual)
        if out.data_ptr() != input.data_ptr():
            check_distinct(op, "out", out, "input", input)


def _desc(t):
    return None if t is None else (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)


def _same_int_class(a: int, b: int) -> bool:
    """``a`` and ``b`` specialise a Triton int argument alike (16-divisibility, 32-bit range)."""
    return (a % 16 == 0) == (b % 16 == 0) and (-2**31 <= a < 2**31) == (-2**31 <= b < 2**31)


def _fused(op, input, residual, weight, eps, group, out, all_gather, config, timeout_s):
    group = L.resolve_group(group)
    new_out = out is None
    try:  # everything the launch decision depends on (see symmtriton._launch, launch plans)
        key = (op, group, _desc(input), _desc(residual), _desc(weight), _desc(out),
               type(eps), eps, config, L.timeout_key(timeout_s))
    except (AttributeError, TypeError):
        key = None  # not tensors: validation below raises
    plan = L.get_plan(key) if key is not None else None
    if plan is not None:
        L.check_uniform(group, op, input=input, residual=residual, weight=weight)
        out_spec = plan.extra[3]
        if out is None:
            out = torch.empty(out_spec, dtype=input.dtype, device=input.device)
        if plan.kind == "launch":
            if current(plan, config):
                if plan.var_index is None:
                    L.launch(plan.buf, op, plan)
                    return out
                optr = out.data_ptr()
                if _same_int_class(optr, plan.args[plan.var_index]):
                    L.launch(plan.buf, op, plan, optr)
                    return out
        elif plan.kind == "empty":
            return out
        else:
            return _torch_fused(input, residual, weight, eps, group, out, all_gather,
                                input.shape[0] // plan.extra[4])
    world = dist.get_world_size(group)
    _validate(op, input, residual, weight, eps, world, out, all_gather)
    if plan is None:
        L.check_uniform(group, op, input=input, residual=residual, weight=weight)
    S, H = input.shape
    s = S // world
    out_spec = (S, H) if all_gather else (s, H)
    var_index = 1 if new_out else None  # a new ``out`` per call: its pointer varies
    if out is None:
        out = torch.empty(out_spec, dtype=input.dtype, device=input.device)
    if S == 0 or H == 0:
        L.put_plan(key, L.Plan("empty", extra=(None, None, None, out_spec, world)))
        return out
    esize = input.element_size()
    buf = L.find_buffer(group)
    in_off = buf.byte_offset_of(input) if buf.symm_mem_hdl is not None else None
    out_off = buf.byte_offset_of(out) if buf.symm_mem_hdl is not None and all_gather else None
    if var_index is not None and out_off is not None:
        var_index = None  # cannot happen (a new tensor is not in the buffer); plan nothing
        key = None
    if in_off is not None:
        region = in_off
    elif out_off is not None:
        region = out_off  # stage the input where the result should land
    else:
        region = L.region_after(buf, residual, weight, out)
    copy_out = all_gather and out_off != region
    if H > MAX_FUSED_HIDDEN or not L.symm_usable(buf, input.device, region + S * H * esize):
        L.put_plan(key, L.Plan("fallback", extra=(None, None, None, out_spec, world)))
        return _torch_fused(input, residual, weight, eps, group, out, all_gather, s)
    ctx = L.context(buf)
    lookup = (("fused", s * H, input.dtype, world), {"hidden": H})
    cfg = config or lookup_config(*lookup[0], **lookup[1])
    row_bytes = H * esize
    addrs = (input.data_ptr(), out.data_ptr(), residual.data_ptr(), ctx.local_base + region)
    aligned = L.aligned16(*addrs, row_bytes) and L.aligned16(weight.data_ptr(), H * weight.element_size())
    use_mm = L.multimem_eligible(ctx, input.dtype, ctx.local_base + region, row_bytes)
    kern = L.kernel("fused_rmsnorm", "_fused_rmsnorm_kernel")
    plan = L.Plan(
        "launch", buf, kern, cfg.row_grid(s, ctx.grid_cap), cfg.num_warps,
        (input.data_ptr(), out.data_ptr(), residual.data_ptr(), weight.data_ptr(),
         ctx.buf_table, ctx.sig_table, ctx.mc_addr, ctx.err_addr, ctx.grid_cap, region, s, H,
         float(eps), L.timeout_ns(timeout_s)),
        dict(DTYPE=TL_DTYPE[input.dtype], W_DTYPE=TL_DTYPE[weight.dtype],
             RANK=ctx.rank, WORLD_SIZE=world, WORLD_P2=ctx.world_p2, BLOCK_H=cfg.block_size,
             STAGE_IN=in_off is None, ALL_GATHER=all_gather, COPY_OUT=copy_out,
             USE_MULTIMEM=use_mm, SCOPE=ctx.scope, USE_PTX=ctx.use_ptx, ALIGNED=aligned),
        extra=(lookup[0], lookup[1], cfg, out_spec, world), var_index=var_index)
    L.put_plan(key, plan)
    L.launch(buf, op, plan)
    return out


def _torch_fused(input, residual, weight, eps, group, out, all_gather, s):
    """The same computation through torch.distributed and torch ops (fp32 accumulation)."""
    shard = torch.empty((s, input.shape[1]), dtype=torch.float32, device=input.device)
    torch_reduce_scatter(shard, input.float(), group)  # input is contiguous and only read
    residual.copy_((residual.float() + shard).to(residual.dtype))
    normed = reference.rmsnorm(residual, weight, eps)
    if all_gather:
        return torch_all_gather(out, normed, group)
    return out.copy_(normed)
