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

import torch
import torch.distributed as dist

from .. import env
from .._calls import sequenced
from ..config import (CONFIG_OP, MAX_FUSED_HIDDEN, LaunchConfig, lines_eligible, lines_row_config,
                      multimem_eligible)
from ..context import context, find_buffer, offset_in, region_after, symm_usable
from ..presets import LINES_ROWS_MAX_BYTES
from ..kernels.fused_rmsnorm import _fused_rmsnorm_kernel, _fused_rmsnorm_lines_kernel
from ..launch import Launch
from ._operands import Rows, record
from ._quant import NONE, check_quant, fp8_records, quant_constexprs, quant_mode, q_arg
from ._rows import (RowsPlan, rows_aligned, rows_key, rows_lines_launch, rows_out, rows_uniform,
                    traced_rows, validate_rows, var_arg)
from .driver import (TL_DTYPE, Collective, ConfigChoice, barrier_path, call, choose_config,
                     eager_only)
from .fallback import torch_fused_rmsnorm


class FusedRmsnorm(Collective):
    """One of the two ops (``all_gather``: whether the normed rows are all-gathered)."""

    key = rows_key
    uniform = rows_uniform

    def __init__(self, name: str, all_gather: bool):
        self.name = name
        self.config_op = CONFIG_OP[name]
        self.all_gather = all_gather

    def validate(self, group, a: Rows):
        world = dist.get_world_size(group)
        validate_rows(self.name, a.input, a.residual, a.weight, a.eps, world, a.out,
                      self.all_gather, a.out_dtype)
        check_quant(self.name, a, a.input.shape[0] // (1 if self.all_gather else world))

    def prepare(self, group, config, timeout_s, a: Rows):
        input, all_gather = a.input, self.all_gather
        world = dist.get_world_size(group)
        S, H = input.shape
        s, row_bytes = S // world, H * input.element_size()
        shape = (S, H) if all_gather else (s, H)
        out, scales, fresh, var_index = rows_out(a, shape)
        quant = quant_mode(a)
        if S == 0 or H == 0:
            return RowsPlan("empty", shape, group, fresh_out=fresh, quant=quant)
        buf = find_buffer(group)
        # the rows each peer gets: all S input rows and s residual rows with the all-gather
        # (kernels/fused_rmsnorm.py), else the s rows it owns
        per_peer = (S + s if all_gather else s) * row_bytes
        if (H <= MAX_FUSED_HIDDEN and symm_usable(buf, input.device, 0)
                and lines_eligible(context(buf), per_peer, row_bytes, LINES_ROWS_MAX_BYTES)):
            choice = ConfigChoice(config or lines_row_config(H, input.dtype, world))
            kernel = rows_lines_launch(self.name, context(buf), _fused_rmsnorm_lines_kernel,
                                       choice.config, a, out, scales, S if all_gather else s, s,
                                       var_index, timeout_s, dict(ALL_GATHER=all_gather))
            return RowsPlan("lines", shape, group, kernel, choice, fresh_out=fresh, quant=quant)
        in_off = offset_in(buf, input)
        # a new ``out`` is never in the buffer: its pointer varies per call (``var_index``);
        # an FP8 ``out`` cannot hold the input's rows: the region is elsewhere and the FP8
        # records (kernels/quant.py) are copied out of it
        zero_copy_out = all_gather and a.out is not None and quant == NONE
        out_off = offset_in(buf, out) if zero_copy_out else None
        if in_off is not None:
            region = in_off
        elif out_off is not None:
            region = out_off  # stage the input where the result should land
        else:
            region = region_after(buf, a.residual, a.weight, out)
        if H > MAX_FUSED_HIDDEN or not symm_usable(buf, input.device, region + S * row_bytes):
            fallback = functools.partial(torch_fused_rmsnorm, all_gather=all_gather)
            return RowsPlan("fallback", shape, group, fallback=fallback, fresh_out=fresh,
                            quant=quant)
        ctx = context(buf)
        choice = choose_config(config, self.config_op, s * H, input.dtype, world, hidden=H)
        use_mm = multimem_eligible(ctx, input.dtype, ctx.local_base + region, row_bytes)
        kernel = _kernel_launch(self.name, ctx, choice.config, a, out, scales, region,
                                in_off is None, all_gather and out_off != region, all_gather,
                                use_mm, var_index, timeout_s, all_gather and fp8_records(a, H))
        return RowsPlan(barrier_path(use_mm), shape, group, kernel, choice, fresh_out=fresh,
                        quant=quant)


def _kernel_launch(op, ctx, cfg: LaunchConfig, a: Rows, out, scales, region, stage_in,
                   copy_out, all_gather, use_mm, var_index, timeout_s, q_gather):
    """The launch of ``_fused_rmsnorm_kernel``: its arguments, listed here only. ``q_gather``:
    the all-gather moves FP8 records (kernels/quant.py, ``gather_row``)."""
    S, H = a.input.shape
    s = S // ctx.world
    args = (a.input.data_ptr(), out.data_ptr(), a.residual.data_ptr(), a.weight.data_ptr(),
            ctx.buf_table, ctx.sig_table, ctx.mc_addr, ctx.err_addr, ctx.grid_cap, region, s, H,
            float(a.eps), env.timeout_ns(timeout_s), q_arg(a, out, scales))
    return Launch.on(
        ctx, op, _fused_rmsnorm_kernel, cfg.row_grid(s, ctx.grid_cap), cfg.num_warps, args,
        dict(DTYPE=TL_DTYPE[a.input.dtype], W_DTYPE=TL_DTYPE[a.weight.dtype],
             BLOCK_H=cfg.block_size, STAGE_IN=stage_in, ALL_GATHER=all_gather,
             COPY_OUT=copy_out, USE_MULTIMEM=use_mm,
             ALIGNED=rows_aligned(a, out, ctx.local_base + region), Q_GATHER=q_gather,
             **quant_constexprs(a, TL_DTYPE[a.input.dtype])),
        var_arg(var_index, args))


RS_ADD_RMSNORM_AG = FusedRmsnorm("reduce_scatter_add_rmsnorm_all_gather", all_gather=True)
RS_ADD_RMSNORM = FusedRmsnorm("reduce_scatter_add_rmsnorm", all_gather=False)


def _tracer(op: FusedRmsnorm):
    """The path of ``op``'s public function under ``torch.compile``: the custom op
    ``torch.ops.symmtriton.<op.name>``."""

    def traced(input, residual, weight, eps=1e-6, group=None, out=None, *, config=None,
               timeout_s=None, out_dtype=None, scale=None):
        eager_only(op.name, config, timeout_s)
        world = dist.get_world_size(group)
        rows = input.shape[0] if op.all_gather else input.shape[0] // world
        return traced_rows(op.name, input, residual, weight, eps,
                           group, out, out_dtype, scale, rows)
    return traced


@sequenced(_tracer(RS_ADD_RMSNORM_AG))
def reduce_scatter_add_rmsnorm_all_gather(input: torch.Tensor, residual: torch.Tensor,
                                          weight: torch.Tensor, eps: float = 1e-6, group=None,
                                          out: torch.Tensor | None = None, *,
                                          config: LaunchConfig | None = None,
                                          timeout_s: float | None = None,
                                          out_dtype: torch.dtype | None = None,
                                          scale: torch.Tensor | None = None):
    """Reduce-scatter ``input`` [S, H] (this rank's partial sums) over ``group``, add this rank's
    slice to ``residual`` [S/W, H] in place, RMSNorm it (fp32 statistics) times ``weight`` [H],
    and all-gather the normed rows into ``out`` [S, H] (new tensor when ``None``).

    One launch when symmetric memory can carry it. Zero-copy when ``input`` lies in the group's
    symmetric buffer (e.g. written there by the GEMM); ``out=input`` then leaves the result in
    the buffer (a scratch area: the next collective may overwrite it). Otherwise falls back to
    torch.distributed + torch ops with the same result. Under ``torch.compile`` it traces as
    ``torch.ops.symmtriton.reduce_scatter_add_rmsnorm_all_gather``.

    ``out_dtype`` (``torch.float8_e4m3fn`` or ``float8_e5m2``): the normed rows quantised in the
    same launch, with the static ``scale`` (returns ``out``) or per row (``scale=None``:
    returns ``(out, scales)``, ``scales`` [rows, 1] fp32); see ``symmtriton.ops._quant``. Each
    rank quantises the rows it owns once and the all-gather moves the FP8 rows and their
    scales (half the bytes of bf16 rows) where it gathers normed rows (the barrier path; the
    barrier-free path for small inputs exchanges input rows only, in the input's dtype).
    ``out_dtype`` and whether ``scale`` is given must be the same on every rank."""
    return call(RS_ADD_RMSNORM_AG, group, config, timeout_s,
                record(Rows, (input, residual, weight, eps, out, None, out_dtype, scale, None)))


@sequenced(_tracer(RS_ADD_RMSNORM))
def reduce_scatter_add_rmsnorm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                               eps: float = 1e-6, group=None, out: torch.Tensor | None = None, *,
                               config: LaunchConfig | None = None,
                               timeout_s: float | None = None,
                               out_dtype: torch.dtype | None = None,
                               scale: torch.Tensor | None = None):
    """As :func:`reduce_scatter_add_rmsnorm_all_gather` without the all-gather: ``out`` is this
    rank's normed shard [S/W, H], for layers that keep the sequence-sharded output; FP8
    ``out_dtype`` and ``scale`` alike."""
    return call(RS_ADD_RMSNORM, group, config, timeout_s,
                record(Rows, (input, residual, weight, eps, out, None, out_dtype, scale, None)))
