"""Fused tensor-parallel collectives: host side of kernels/fused_rmsnorm.py (validate, plan,
launch); config name ``"fused"`` (both ops share the kernel).

``reduce_scatter_add_rmsnorm_all_gather`` is what a sequence-parallel transformer layer runs
between its row-parallel output projection and the next column-parallel matmul::

    shard    = reduce_scatter(input)            # [S/W, H], fp32 accumulation
    residual = residual + shard                 # in place, rounded to residual.dtype
    out      = all_gather(rmsnorm(residual) * weight)   # [S, H], fp32 statistics

``reduce_scatter_add_rmsnorm`` stops before the all-gather (``out`` = the normed shard).
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from .. import env
from .._calls import counts_calls
from ..config import CONFIG_OP, MAX_FUSED_HIDDEN, LaunchConfig, lines_row_config, lines_row_split
from ..context import (LINES_ROWS_MAX_BYTES, aligned16, context, find_buffer, lines_eligible,
                       multimem_eligible, offset_in, region_after, symm_usable)
from ..kernels.fused_rmsnorm import _fused_rmsnorm_kernel, _fused_rmsnorm_lines_kernel
from ..launch import Launch
from ..validation import REDUCE_DTYPES, check_disjoint, check_same, check_tensor
from .driver import (STALE, TL_DTYPE, Collective, ConfigChoice, bump_versions, call,
                     choose_config, compiling, group_name, tensor_desc)
from .fallback import torch_fused_rmsnorm


def validate(op: str, input, residual, weight, eps, world: int, out, all_gather: bool) -> None:
    """Raise ``TypeError``/``ValueError`` naming the bad value (before any launch)."""
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
    if out is not None:
        check_tensor("out", out)
        check_same(op, input=input, out=out)
        want = (S, H) if all_gather else (S // world, H)
        if tuple(out.shape) != want:
            raise ValueError(f"{op}: out shape {tuple(out.shape)} must be {want}")
    # ``out=input``: the result replaces the (zero-copy) input
    check_disjoint(op, [("input", input), ("residual", residual), ("weight", weight),
                        ("out", out)], [("input", "out", 0)])


def _same_int_class(a: int, b: int) -> bool:
    """``a`` and ``b`` specialise a Triton int argument alike (16-divisibility, 32-bit range)."""
    return (a % 16 == 0) == (b % 16 == 0) and (-2**31 <= a < 2**31) == (-2**31 <= b < 2**31)


@dataclass(eq=False)
class FusedPlan:
    """The plan of a row-wise RMSNorm call (args ``(input, residual, weight, eps, out, ...)``:
    the fused ops here, ``all_reduce_add_rmsnorm``): launch ``kernel``, or run
    ``fallback(input, residual, weight, eps, group, out)``, or neither (empty input). With
    ``out=None`` the call allocates ``out_shape`` per call and passes its pointer to the kernel
    (``kernel.var_index``); ``fresh_out`` is the ``out`` that ``prepare`` allocated to decide
    the plan, used by the first run."""

    out_shape: tuple
    group: object
    kernel: Launch | None = None
    choice: ConfigChoice | None = None
    fallback: Callable | None = None
    fresh_out: torch.Tensor | None = None

    def run(self, args, config):
        input, residual, weight, eps, out = args[:5]
        if out is None:
            bump_versions((residual,))
            out, self.fresh_out = self.fresh_out, None
            if out is None:
                out = torch.empty(self.out_shape, dtype=input.dtype, device=input.device)
        else:
            bump_versions((residual, out))
        kl = self.kernel
        if kl is not None:
            if not self.choice.current():
                return STALE
            if kl.var_index is None:
                kl.launch()
            elif _same_int_class(out.data_ptr(), kl.args[kl.var_index]):
                kl.launch(out.data_ptr())
            else:
                return STALE
        elif self.fallback is not None:
            self.fallback(input, residual, weight, eps, self.group, out)
        return out


class FusedRmsnorm(Collective):
    def __init__(self, name: str, all_gather: bool):
        self.name = name
        self.config_op = CONFIG_OP[name]
        self.all_gather = all_gather

    def key(self, group, config, timeout_s, args):
        input, residual, weight, eps, out = args
        return (self.name, group, tensor_desc(input), tensor_desc(residual), tensor_desc(weight),
                tensor_desc(out), type(eps), eps, config, env.timeout_key(timeout_s))

    def uniform(self, args):
        return {"input": args[0], "residual": args[1], "weight": args[2]}

    def validate(self, group, args):
        input, residual, weight, eps, out = args
        validate(self.name, input, residual, weight, eps, dist.get_world_size(group), out,
                 self.all_gather)

    def prepare(self, group, config, timeout_s, args):
        input, residual, weight, eps, out = args
        world = dist.get_world_size(group)
        S, H = input.shape
        plan = FusedPlan((S, H) if self.all_gather else (S // world, H), group)
        new_out = out is None
        if new_out:
            out = plan.fresh_out = torch.empty(plan.out_shape, dtype=input.dtype, device=input.device)
        if S == 0 or H == 0:
            return plan
        buf = find_buffer(group)
        s, row_bytes = S // world, H * input.element_size()
        # the rows each peer gets: all S input rows and s residual rows with the all-gather
        # (kernels/fused_rmsnorm.py), else the s rows it owns
        per_peer = (S + s if self.all_gather else s) * row_bytes
        if (H <= MAX_FUSED_HIDDEN and symm_usable(buf, input.device, 0)
                and lines_eligible(context(buf), per_peer, row_bytes, LINES_ROWS_MAX_BYTES)):
            plan.choice = ConfigChoice(config or lines_row_config(H, input.dtype, world))
            plan.kernel = _lines_launch(self.name, context(buf), plan.choice.config, args, out,
                                        self.all_gather, 1 if new_out else None, timeout_s)
            return plan
        in_off = offset_in(buf, input)
        # a new ``out`` is never in the buffer: its pointer varies per call (``var_index``)
        out_off = offset_in(buf, out) if self.all_gather and not new_out else None
        if in_off is not None:
            region = in_off
        elif out_off is not None:
            region = out_off  # stage the input where the result should land
        else:
            region = region_after(buf, residual, weight, out)
        if H > MAX_FUSED_HIDDEN or not symm_usable(buf, input.device,
                                                   region + S * H * input.element_size()):
            plan.fallback = functools.partial(torch_fused_rmsnorm, all_gather=self.all_gather)
            return plan
        ctx = context(buf)
        plan.choice = choose_config(config, self.config_op, (S // world) * H, input.dtype, world,
                                    hidden=H)
        plan.kernel = _kernel_launch(self.name, ctx, plan.choice.config, args, out, region,
                                     in_off is None, self.all_gather and out_off != region,
                                     self.all_gather, 1 if new_out else None, timeout_s)
        return plan


def _kernel_launch(op, ctx, cfg: LaunchConfig, args, out, region, stage_in, copy_out, all_gather,
                   var_index, timeout_s):
    """The launch of ``_fused_rmsnorm_kernel``: its arguments, listed here only."""
    input, residual, weight, eps, _ = args
    S, H = input.shape
    row_bytes = H * input.element_size()
    addrs = (input.data_ptr(), out.data_ptr(), residual.data_ptr(), ctx.local_base + region)
    aligned = aligned16(*addrs, row_bytes) and aligned16(weight.data_ptr(), H * weight.element_size())
    use_mm = multimem_eligible(ctx, input.dtype, ctx.local_base + region, row_bytes)
    s = S // ctx.world
    return Launch(
        op, ctx.buf, _fused_rmsnorm_kernel, cfg.row_grid(s, ctx.grid_cap), cfg.num_warps,
        (input.data_ptr(), out.data_ptr(), residual.data_ptr(), weight.data_ptr(),
         ctx.buf_table, ctx.sig_table, ctx.mc_addr, ctx.err_addr, ctx.grid_cap, region, s, H, float(eps),
         env.timeout_ns(timeout_s)),
        dict(DTYPE=TL_DTYPE[input.dtype], W_DTYPE=TL_DTYPE[weight.dtype],
             RANK=ctx.rank, WORLD_SIZE=ctx.world, WORLD_P2=ctx.world_p2, BLOCK_H=cfg.block_size,
             STAGE_IN=stage_in, ALL_GATHER=all_gather, COPY_OUT=copy_out,
             USE_MULTIMEM=use_mm, SCOPE=ctx.scope, USE_PTX=ctx.use_ptx, ALIGNED=aligned),
        var_index=var_index)


def _lines_launch(op, ctx, cfg: LaunchConfig, args, out, all_gather, var_index, timeout_s):
    """The launch of ``_fused_rmsnorm_lines_kernel`` (small inputs, no barrier): its arguments,
    listed here only."""
    input, residual, weight, eps, _ = args
    S, H = input.shape
    aligned = (aligned16(input.data_ptr(), out.data_ptr(), residual.data_ptr(),
                         H * input.element_size())
               and aligned16(weight.data_ptr(), H * weight.element_size()))
    s = S // ctx.world
    grid, chunk, nc, warps = lines_row_split(cfg, S if all_gather else s, H,
                                             input.element_size(), ctx.grid_cap, ctx.lines_words,
                                             not ctx.use_ptx)
    return Launch(
        op, ctx.buf, _fused_rmsnorm_lines_kernel, grid, warps,
        (input.data_ptr(), out.data_ptr(), residual.data_ptr(), weight.data_ptr(), ctx.buf_table,
         ctx.sig_table, ctx.err_addr, ctx.grid_cap, ctx.lines_off, ctx.lines_words, s, H, float(eps),
         env.timeout_ns(timeout_s)),
        dict(DTYPE=TL_DTYPE[input.dtype], W_DTYPE=TL_DTYPE[weight.dtype], RANK=ctx.rank,
             WORLD_SIZE=ctx.world, WORLD_P2=ctx.world_p2, CHUNK=chunk, NC=nc,
             ALL_GATHER=all_gather, SCOPE=ctx.scope, USE_PTX=ctx.use_ptx, ALIGNED=aligned),
        var_index=var_index)


RS_ADD_RMSNORM_AG = FusedRmsnorm("reduce_scatter_add_rmsnorm_all_gather", all_gather=True)
RS_ADD_RMSNORM = FusedRmsnorm("reduce_scatter_add_rmsnorm", all_gather=False)


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
    torch.distributed + torch ops with the same result. Under ``torch.compile`` it traces as
    ``torch.ops.symmtriton.reduce_scatter_add_rmsnorm_all_gather``."""
    if compiling(RS_ADD_RMSNORM_AG.name, config, timeout_s):
        return _traced(RS_ADD_RMSNORM_AG, input, residual, weight, eps, group, out)
    return call(RS_ADD_RMSNORM_AG, group, config, timeout_s, (input, residual, weight, eps, out))


@counts_calls
def reduce_scatter_add_rmsnorm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                               eps: float = 1e-6, group=None, out: torch.Tensor | None = None, *,
                               config: LaunchConfig | None = None,
                               timeout_s: float | None = None) -> torch.Tensor:
    """As :func:`reduce_scatter_add_rmsnorm_all_gather` without the all-gather: ``out`` is this
    rank's normed shard [S/W, H], for layers that keep the sequence-sharded output."""
    if compiling(RS_ADD_RMSNORM.name, config, timeout_s):
        return _traced(RS_ADD_RMSNORM, input, residual, weight, eps, group, out)
    return call(RS_ADD_RMSNORM, group, config, timeout_s, (input, residual, weight, eps, out))


def _traced(op: FusedRmsnorm, input, residual, weight, eps, group, out):
    """Under ``torch.compile``: the custom op ``torch.ops.symmtriton.<op.name>``."""
    if out is None:
        world = dist.get_world_size(group)
        rows = input.shape[0] if op.all_gather else input.shape[0] // world
        out = input.new_empty((rows, input.shape[1]))
    getattr(torch.ops.symmtriton, op.name)(input, residual, weight, eps, group_name(group), out)
    return out
