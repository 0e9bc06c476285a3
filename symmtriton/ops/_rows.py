"""Host side shared by the RMSNorm row ops, both families: the reduce-scatter family
(``reduce_scatter_add_rmsnorm[_all_gather]``, ops/fused.py) and ``all_reduce_add_rmsnorm``
(ops/all_reduce.py). Their operands (:class:`~._operands.Rows`): the row checks, the plan key,
the plan (:class:`RowsPlan`, with the ``out`` a call allocates), and the launch of the
barrier-free row kernels (kernels/lines_rows.py: rows cut into units that several blocks share),
whose arguments are listed here only."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable

import torch

from .. import env
from ..config import LaunchConfig, aligned16, lines_row_split
from ..context import Ctx
from ..launch import Launch
from ..validation import REDUCE_DTYPES, check_disjoint, check_same, check_tensor
from ._operands import Rows
from .driver import STALE, TL_DTYPE, ConfigChoice, bump_versions, tensor_desc

#: the index of ``out``'s pointer in every row kernel's arguments: a launch for a call that
#: allocates ``out`` passes it per call (``Launch.var_index``).
OUT_ARG = 1


def validate_rows(op: str, input, residual, weight, eps, world: int, out,
                  all_gather: bool) -> None:
    """Raise ``TypeError``/``ValueError`` naming the bad value (before any launch): ``input``
    [S, H] with S divisible by ``world``, ``residual`` [S/world, H], ``weight`` [H], ``eps`` a
    real >= 0, ``out`` [S, H] (``all_gather``) or [S/world, H], or ``None``."""
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


def rows_key(op, group, config, timeout_s, a: Rows) -> tuple:
    """``key`` of a row op (see :class:`.driver.Collective`)."""
    return (op.name, group, tensor_desc(a.input), tensor_desc(a.residual),
            tensor_desc(a.weight), tensor_desc(a.out), type(a.eps), a.eps, a.algorithm, config,
            env.timeout_key(timeout_s))


def rows_uniform(op, a: Rows) -> dict:
    """``uniform`` of a row op."""
    return {"input": a.input, "residual": a.residual, "weight": a.weight}


def _same_int_class(a: int, b: int) -> bool:
    """``a`` and ``b`` specialise a Triton int argument alike (16-divisibility, 32-bit range)."""
    return (a % 16 == 0) == (b % 16 == 0) and (-2**31 <= a < 2**31) == (-2**31 <= b < 2**31)


@dataclass(eq=False)
class RowsPlan:
    """The plan of a row op: launch ``kernel``, or run ``fallback(input, residual, weight, eps,
    group, out)``, or neither (``path`` ``"empty"``). With ``out=None`` the call allocates
    ``out_shape`` per call and passes its pointer to the kernel (``kernel.var_index``);
    ``fresh_out`` is the ``out`` that ``prepare`` allocated to decide the plan, used by the
    first run. ``algorithm``: the all-reduce's, for ``all_reduce_add_rmsnorm``."""

    path: str
    out_shape: tuple
    group: object
    kernel: Launch | None = None
    choice: ConfigChoice | None = None
    fallback: Callable | None = None
    fresh_out: torch.Tensor | None = None
    algorithm: str | None = None

    def run(self, a: Rows, config):
        out = a.out
        if out is None:
            bump_versions((a.residual,))
            out, self.fresh_out = self.fresh_out, None
            if out is None:
                out = torch.empty(self.out_shape, dtype=a.input.dtype, device=a.input.device)
        else:
            bump_versions((a.residual, out))
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
            self.fallback(a.input, a.residual, a.weight, a.eps, self.group, out)
        return out


def rows_out(a: Rows, shape: tuple) -> tuple:
    """``(out, var_index)`` of a call: its ``out``, or a new ``shape`` tensor (the plan's
    ``fresh_out``) whose pointer the launch then takes per call (:data:`OUT_ARG`)."""
    if a.out is not None:
        return a.out, None
    return torch.empty(shape, dtype=a.input.dtype, device=a.input.device), OUT_ARG


def rows_aligned(a: Rows, out: torch.Tensor, *addrs: int) -> bool:
    """Every row of the operands (and the buffer ``addrs``) starts on 16 bytes."""
    H = a.input.shape[1]
    return (aligned16(a.input.data_ptr(), out.data_ptr(), a.residual.data_ptr(), *addrs,
                      H * a.input.element_size())
            and aligned16(a.weight.data_ptr(), H * a.weight.element_size()))


def rows_lines_launch(op: str, ctx: Ctx, kernel, cfg: LaunchConfig, a: Rows, out, split_rows: int,
                      rows: int, var_index: int | None, timeout_s, constexprs: dict) -> Launch:
    """The launch of a barrier-free row kernel (``_fused_rmsnorm_lines_kernel``,
    ``_all_reduce_rmsnorm_lines_kernel``: the same arguments), its grid, units and warps from
    ``lines_row_split`` of ``split_rows`` rows; ``rows``: the kernel's row argument;
    ``constexprs``: the kernel's own beyond the common ones."""
    S, H = a.input.shape
    grid, chunk, nc, warps = lines_row_split(cfg, split_rows, H, a.input.element_size(),
                                             ctx.grid_cap, ctx.lines_words, not ctx.use_ptx)
    return Launch.on(
        ctx, op, kernel, grid, warps,
        (a.input.data_ptr(), out.data_ptr(), a.residual.data_ptr(), a.weight.data_ptr(),
         ctx.buf_table, ctx.sig_table, ctx.err_addr, ctx.grid_cap, ctx.lines_off, ctx.lines_words,
         rows, H, float(a.eps), env.timeout_ns(timeout_s)),
        dict(DTYPE=TL_DTYPE[a.input.dtype], W_DTYPE=TL_DTYPE[a.weight.dtype], CHUNK=chunk, NC=nc,
             ALIGNED=rows_aligned(a, out), **constexprs),
        var_index)
