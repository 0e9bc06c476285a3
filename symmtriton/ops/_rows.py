"""Host side shared by the RMSNorm row ops, both families: the reduce-scatter family
(``reduce_scatter_add_rmsnorm[_all_gather]``, ops/fused.py) and ``all_reduce_add_rmsnorm``
(ops/all_reduce.py). Their operands (:class:`~._operands.Rows`): the row checks, the plan key,
the plan (:class:`RowsPlan`, with the ``out`` a call allocates), and the launch of the
barrier-free row kernels (kernels/lines_rows.py: rows cut into units that several blocks share),
whose arguments are listed here only."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace
from typing import Callable

import torch

from .. import env
from .._calls import sequenced
from ..config import LaunchConfig, aligned16, lines_row_split, size_bucket
from ..context import Ctx
from ..launch import Launch
from ..validation import REDUCE_DTYPES, check_disjoint, check_same, check_tensor
from ._operands import Rows, record
from ._quant import NONE, new_outputs, q_arg, quant_constexprs, quant_mode, torch_quantise
from .driver import STALE, TL_DTYPE, ConfigChoice, bump_versions, call, group_name, tensor_desc

#: the index of ``out``'s pointer in every row kernel's arguments: a launch for a call that
#: allocates ``out`` passes it per call (``Launch.var_index``).
OUT_ARG = 1
#: the scale argument's index (the last; kernels/quant.py): a call that allocates only the
#: dynamic scales passes their offset from ``out`` per call.
Q_ARG = -1


def validate_rows(op: str, input, residual, weight, eps, world: int, out,
                  all_gather: bool, out_dtype=None) -> None:
    """Raise ``TypeError``/``ValueError`` naming the bad value (before any launch): ``input``
    [S, H] with S divisible by ``world``, ``residual`` [S/world, H], ``weight`` [H], ``eps`` a
    real >= 0, ``out`` [S, H] (``all_gather``) or [S/world, H], or ``None``; ``out``'s dtype
    ``input``'s, or ``out_dtype`` when given (checked by ops/_quant.py)."""
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
        if out_dtype is None:
            check_same(op, input=input, out=out)
        elif out.device != input.device:
            raise ValueError(f"{op}: out is on {out.device} but input is on {input.device}")
        want = (S, H) if all_gather else (S // world, H)
        if tuple(out.shape) != want:
            raise ValueError(f"{op}: out shape {tuple(out.shape)} must be {want}")
    # ``out=input``: the result replaces the (zero-copy) input
    check_disjoint(op, [("input", input), ("residual", residual), ("weight", weight),
                        ("out", out)], [("input", "out", 0)])


def rows_key(op, group, config, timeout_s, a: Rows) -> tuple:
    """``key`` of a row op (see :class:`.driver.Collective`)."""
    key = (op.name, group, tensor_desc(a.input), tensor_desc(a.residual),
           tensor_desc(a.weight), tensor_desc(a.out), type(a.eps), a.eps, a.algorithm, config,
           env.timeout_key(timeout_s))
    if a.out_dtype is None and a.scale is None and a.scales is None:  # no FP8: today's key
        return key
    return key + (a.out_dtype, tensor_desc(a.scale), tensor_desc(a.scales))


def rows_uniform(op, a: Rows) -> dict:
    """``uniform`` of a row op."""
    return {"input": a.input, "residual": a.residual, "weight": a.weight}


def _same_int_class(a: int, b: int) -> bool:
    """``a`` and ``b`` specialise a Triton int argument alike (16-divisibility, 32-bit range)."""
    return (a % 16 == 0) == (b % 16 == 0) and (-2**31 <= a < 2**31) == (-2**31 <= b < 2**31)


@dataclass(eq=False)
class RowsPlan:
    """The plan of a row op: launch ``kernel``, or run ``fallback(input, residual, weight, eps,
    group, out)``, or neither (``path`` ``"empty"``). A call's new outputs (``out=None``; the
    dynamic FP8 scales) have ``out_shape`` (:func:`._quant.new_outputs`) and the kernel takes
    the one argument that varies with them per call (``kernel.var_index``: ``out``'s pointer,
    or the scales' offset); ``fresh_out`` is the ``(out, scales)`` that ``prepare`` allocated to
    decide the plan, used by the first run. ``algorithm``: the all-reduce's, for
    ``all_reduce_add_rmsnorm``; ``quant``: the FP8 mode (ops/_quant.py). Returns ``out``, or
    ``(out, scales)`` with dynamic scaling."""

    path: str
    out_shape: tuple
    group: object
    kernel: Launch | None = None
    choice: ConfigChoice | None = None
    fallback: Callable | None = None
    fresh_out: tuple | None = None
    algorithm: str | None = None
    quant: int = NONE

    def run(self, a: Rows, config):
        out, scales = a.out, None
        if out is not None and self.quant == NONE:  # the common call: nothing to allocate
            bump_versions((a.residual, out))
        else:
            out, scales = self._outputs(a)
        kl = self.kernel
        if kl is not None:
            if not self.choice.current():
                return STALE
            if kl.var_index is None:
                kl.launch()
            else:
                var = out.data_ptr() if kl.var_index == OUT_ARG else q_arg(a, out, scales)
                if not _same_int_class(var, kl.args[kl.var_index]):
                    return STALE
                kl.launch(var)
        elif self.fallback is not None:
            if self.quant == NONE:
                self.fallback(a.input, a.residual, a.weight, a.eps, self.group, out)
            else:
                normed = torch.empty(out.shape, dtype=a.input.dtype, device=out.device)
                self.fallback(a.input, a.residual, a.weight, a.eps, self.group, normed)
                torch_quantise(normed, out, a.scale, scales)
        return out if scales is None else (out, scales)

    def _outputs(self, a: Rows) -> tuple:
        """``(out, scales)`` of a call that allocates (a new ``out``, or dynamic scales), the
        versions of what it writes bumped; the first run takes the ones ``prepare`` made."""
        fresh, self.fresh_out = self.fresh_out, None
        bump_versions((a.residual,) if a.out is None else (a.residual, a.out))
        if a.scales is not None:
            bump_versions((a.scales,))
        return fresh if fresh is not None else new_outputs(a, self.out_shape, self.quant)


def rows_out(a: Rows, shape: tuple) -> tuple:
    """``(out, scales, fresh, var_index)`` of a call: its outputs (:func:`._quant.new_outputs`),
    those it allocated (the plan's ``fresh_out``, or ``None``), and the kernel argument that
    varies with them per call (:data:`OUT_ARG`, :data:`Q_ARG`, or ``None``)."""
    out, scales = new_outputs(a, shape, quant_mode(a))
    if a.out is None:
        return out, scales, (out, scales), OUT_ARG
    if scales is not None and a.scales is None:
        return out, scales, (out, scales), Q_ARG
    return out, scales, None, None


def rows_aligned(a: Rows, out: torch.Tensor, *addrs: int) -> bool:
    """Every row of the operands (and the buffer ``addrs``) starts on 16 bytes."""
    H = a.input.shape[1]
    return (aligned16(a.input.data_ptr(), out.data_ptr(), a.residual.data_ptr(), *addrs,
                      H * a.input.element_size(), H * out.element_size())
            and aligned16(a.weight.data_ptr(), H * a.weight.element_size()))


def rows_lines_launch(op: str, ctx: Ctx, kernel, cfg: LaunchConfig, a: Rows, out, scales,
                      split_rows: int, rows: int, var_index: int | None, timeout_s,
                      constexprs: dict) -> Launch:
    """The launch of a barrier-free row kernel (``_fused_rmsnorm_lines_kernel``,
    ``_all_reduce_rmsnorm_lines_kernel``: the same arguments), its grid, units and warps from
    ``lines_row_split`` of ``split_rows`` rows (whole rows with an FP8 output: kernels/quant.py);
    ``rows``: the kernel's row argument; ``constexprs``: the kernel's own beyond the common
    ones."""
    H = a.input.shape[1]
    if a.out_dtype is not None:
        cfg = replace(cfg, block_size=max(cfg.block_size, size_bucket(H)))
    grid, chunk, nc, warps = lines_row_split(cfg, split_rows, H, a.input.element_size(),
                                             ctx.grid_cap, ctx.lines_words, not ctx.use_ptx)
    args = (a.input.data_ptr(), out.data_ptr(), a.residual.data_ptr(), a.weight.data_ptr(),
            ctx.buf_table, ctx.sig_table, ctx.err_addr, ctx.grid_cap, ctx.lines_off,
            ctx.lines_words, rows, H, float(a.eps), env.timeout_ns(timeout_s),
            q_arg(a, out, scales))
    return Launch.on(
        ctx, op, kernel, grid, warps, args,
        dict(DTYPE=TL_DTYPE[a.input.dtype], W_DTYPE=TL_DTYPE[a.weight.dtype], CHUNK=chunk, NC=nc,
             ALIGNED=rows_aligned(a, out), **quant_constexprs(a, TL_DTYPE[a.input.dtype]),
             **constexprs),
        var_arg(var_index, args))


def var_arg(var_index: int | None, args: tuple) -> int | None:
    """The launch's ``var_index`` for ``rows_out``'s: :data:`Q_ARG` is the last argument."""
    return len(args) - 1 if var_index == Q_ARG else var_index


def traced_rows(name: str, input, residual, weight, eps, group, out, out_dtype, scale,
                rows: int, *extra):
    """A row op's public function under ``torch.compile``: the custom op ``name`` (its ``_fp8``
    form with an FP8 ``out_dtype``) on ``out`` (new when ``None``: ``rows`` rows of
    ``out_dtype`` or the input's) and, with dynamic FP8 scaling, new ``scales`` [rows, 1];
    returns ``out`` or ``(out, scales)``. Every argument goes by position (``custom_ops``)."""
    if out is None:
        out = input.new_empty((rows, input.shape[1]), dtype=out_dtype or input.dtype)
    args = (input, residual, weight, eps, group_name(group), out, *extra)
    if out_dtype is None:
        getattr(torch.ops.symmtriton, name)(*args)
        return out
    scales = None
    if scale is None:
        scales = input.new_empty((rows, 1), dtype=torch.float32)
    getattr(torch.ops.symmtriton, f"{name}_fp8")(*args, out_dtype, scale, scales)
    return out if scales is None else (out, scales)


def rows_entry(op):
    """What the custom op of row op ``op`` runs: its public function with ``scales`` (where
    dynamic FP8 scaling stores the row scales) among the operands."""

    def entry(input, residual, weight, eps, group, out, algorithm=None, out_dtype=None,
              scale=None, scales=None):
        call(op, group, None, None, record(Rows, (input, residual, weight, eps, out, algorithm,
                                                  out_dtype, scale, scales)))

    entry.__name__ = entry.__qualname__ = op.name
    return sequenced(entry)(entry)
