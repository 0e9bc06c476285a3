"""``all_reduce`` and ``all_reduce_add_rmsnorm``: host side of kernels/all_reduce.py and
kernels/all_reduce_rmsnorm.py, for tensor parallelism without sequence parallelism::

    tensor   = sum over ranks of tensor                        # all_reduce, fp32 accumulation
    residual = residual + sum over ranks of input              # all_reduce_add_rmsnorm: in place
    out      = rmsnorm(residual) * weight                      #   (fp32 statistics)

Both run over flag-in-data lines (``"lines"``: one-shot without a barrier, kernels/lines.py; small
tensors, see :func:`choose_algorithm`), one-shot (every rank reduces the whole tensor) or two-shot
(each rank reduces ``1/world`` of it and stores the sums on every rank), chosen by size or forced
with ``algorithm=``. Zero-copy when the
input lies in the group's symmetric buffer (at the same offset on every rank), staged in the same
launch otherwise; ``torch.distributed`` (fp32 all-reduce) when symmetric memory cannot carry it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import env
from .._calls import counts_calls
from ..config import (ALL_REDUCE_ALGORITHMS, MAX_FUSED_HIDDEN, LaunchConfig, all_reduce_algorithm,
                      all_reduce_config, default_config, lines_block, lines_config,
                      lines_row_config, lines_row_split, push_config)
from ..context import (LINES_MAX_BYTES, LINES_ROWS_MAX_BYTES, aligned16, context, find_buffer,
                       lines_eligible, lines_fit, multimem_eligible, offset_in, push_eligible,
                       push_one_shot_eligible, region_after, symm_usable)
from ..kernels.all_reduce import _all_reduce_kernel, _all_reduce_lines_kernel
from ..kernels.all_reduce_rmsnorm import _all_reduce_rmsnorm_kernel, _all_reduce_rmsnorm_lines_kernel
from ..launch import Launch
from ..validation import REDUCE_DTYPES, check_disjoint, check_same, check_tensor
from ._lines import flat_lines_launch
from ._push import all_reduce_one_shot_push_launch, all_reduce_push_launch
from .driver import (TL_DTYPE, Collective, ConfigChoice, OutputPlan, call, compiling, group_name,
                     tensor_desc)
from .fallback import torch_all_reduce, torch_all_reduce_add_rmsnorm
from .fused import FusedPlan
from .fused import validate as validate_rows


class AllReduce(Collective):
    """args ``(dst, tensor, algorithm)``: ``dst`` is ``out``, or ``tensor`` (in place)."""

    name = "all_reduce"
    config_op = None  # untuned: config.default_config

    def key(self, group, config, timeout_s, args):
        dst, tensor, algorithm = args
        return (self.name, group, tensor_desc(dst), tensor_desc(tensor), algorithm, config,
                env.timeout_key(timeout_s))

    def uniform(self, args):
        return {"tensor": args[1]}

    def validate(self, group, args):
        dst, tensor, algorithm = args
        _check_flat("tensor", tensor)
        if dst is not tensor:
            _check_flat("out", dst)
            check_same(self.name, tensor=tensor, out=dst)
            if dst.shape != tensor.shape:
                raise ValueError(f"{self.name}: out shape {tuple(dst.shape)} must be tensor's "
                                 f"shape {tuple(tensor.shape)}")
            # ``out`` may be ``tensor`` itself (in place)
            check_disjoint(self.name, [("tensor", tensor), ("out", dst)], [("tensor", "out", 0)])
        _check_algorithm(algorithm)

    def prepare(self, group, config, timeout_s, args):
        dst, tensor, algorithm = args
        world = dist.get_world_size(group)
        n, esize = tensor.numel(), tensor.element_size()
        if n == 0:
            return OutputPlan()
        buf = find_buffer(group)
        algo = choose_algorithm(buf, tensor.device, algorithm, n * esize, n * esize, world,
                                LINES_MAX_BYTES)
        if algo == "lines":
            cfg = config or lines_config(n, tensor.dtype, world)
            launch = flat_lines_launch(ALL_REDUCE.name, context(buf), _all_reduce_lines_kernel, cfg,
                                       n, tensor, dst, n, tensor.dtype,
                                       lines_block(cfg.block_size, esize), timeout_s)
            return OutputPlan(launch, ConfigChoice(cfg))
        in_off, out_off = offset_in(buf, tensor), offset_in(buf, dst)
        region = in_off if in_off is not None else region_after(buf, tensor, dst)
        in_place = dst.data_ptr() == tensor.data_ptr()
        if algo == "two_shot":  # where the sums land on every rank (kernels/all_reduce.py)
            if in_place or (out_off is None and in_off is None):
                res = region  # the output itself, or the staging region (scratch)
            elif out_off is not None:
                res = out_off  # ``out`` lies in the buffer: the sums land there directly
            else:
                res = region_after(buf, tensor, dst)  # keep the zero-copy input intact
            copy_out = res != out_off
        else:  # one-shot: straight to ``dst``, unless that is the zero-copy input peers still read
            copy_out = in_place and in_off is not None
            res = region_after(buf, tensor) if copy_out else region
        if not symm_usable(buf, tensor.device, max(region, res) + n * esize):
            return OutputPlan(fallback=torch_all_reduce, group=group)
        choice = ConfigChoice(config or all_reduce_config(n, tensor.dtype, world, algo))
        ctx = context(buf)
        multimem = multimem_eligible(ctx, tensor.dtype, ctx.local_base + region,
                                     ctx.local_base + res, n * esize,
                                     choice.config.block_size * esize)
        if push_one_shot_eligible(ctx, n * esize, multimem, in_off is None, algo, algorithm):
            cfg = config or push_config(n, tensor.dtype, world)
            push = all_reduce_one_shot_push_launch(self.name, ctx, cfg, dst, tensor, timeout_s)
            if push is not None:
                return OutputPlan(push, ConfigChoice(cfg))
        per_rank = -(-n // world)
        if algo == "two_shot" and push_eligible(ctx, "all_reduce", per_rank * esize, multimem,
                                                in_off is None):
            cfg = config or push_config(per_rank, tensor.dtype, world)
            push = all_reduce_push_launch(self.name, ctx, cfg, dst, tensor, timeout_s)
            if push is not None:
                return OutputPlan(push, ConfigChoice(cfg))
        return OutputPlan(_kernel_launch(ctx, choice.config, dst, tensor, algo, region, res,
                                         in_off is None, copy_out, multimem, timeout_s), choice)


def _kernel_launch(ctx, cfg: LaunchConfig, dst, tensor, algo, region, res, stage_in, copy_out,
                   use_mm, timeout_s):
    """The launch of ``_all_reduce_kernel``: its arguments, listed here only."""
    n, esize = tensor.numel(), tensor.element_size()
    chunks = -(-n // cfg.block_size)
    cps = chunks if algo == "one_shot" else -(-chunks // ctx.world)
    base = ctx.local_base
    aligned = aligned16(tensor.data_ptr(), dst.data_ptr(), base + region, base + res, n * esize)
    return Launch(
        ALL_REDUCE.name, ctx.buf, _all_reduce_kernel, cfg.row_grid(cps, ctx.grid_cap),
        cfg.num_warps,
        (tensor.data_ptr(), dst.data_ptr(), ctx.buf_table, ctx.sig_table, ctx.mc_addr,
         ctx.err_addr, ctx.grid_cap, region, res, n, cps, env.timeout_ns(timeout_s)),
        dict(DTYPE=TL_DTYPE[tensor.dtype], RANK=ctx.rank, WORLD_SIZE=ctx.world,
             WORLD_P2=ctx.world_p2, BLOCK_SIZE=cfg.block_size, TWO_SHOT=algo == "two_shot",
             STAGE_IN=stage_in, COPY_OUT=copy_out, USE_MULTIMEM=use_mm, SCOPE=ctx.scope,
             USE_PTX=ctx.use_ptx, ALIGNED=aligned))


class AllReduceAddRmsnorm(Collective):
    """args ``(input, residual, weight, eps, out, algorithm)``."""

    name = "all_reduce_add_rmsnorm"
    config_op = None  # untuned: config.default_config

    def key(self, group, config, timeout_s, args):
        input, residual, weight, eps, out, algorithm = args
        return (self.name, group, tensor_desc(input), tensor_desc(residual), tensor_desc(weight),
                tensor_desc(out), type(eps), eps, algorithm, config, env.timeout_key(timeout_s))

    def uniform(self, args):
        return {"input": args[0], "residual": args[1], "weight": args[2]}

    def validate(self, group, args):
        input, residual, weight, eps, out, algorithm = args
        if (isinstance(input, torch.Tensor) and isinstance(residual, torch.Tensor)
                and residual.shape != input.shape):
            raise ValueError(f"{self.name}: residual shape {tuple(residual.shape)} must be "
                             f"input's shape {tuple(input.shape)}")
        validate_rows(self.name, input, residual, weight, eps, 1, out, False)  # [S, H] everywhere
        check_disjoint(self.name, [("input", input), ("out", out)])  # no out=input here
        _check_algorithm(algorithm)

    def prepare(self, group, config, timeout_s, args):
        input, residual, weight, eps, out, algorithm = args
        world = dist.get_world_size(group)
        S, H = input.shape
        esize = input.element_size()
        if config is not None and config.block_size < H:
            raise ValueError(f"{self.name}: config.block_size {config.block_size} must cover the "
                             f"row (H={H})")
        plan = FusedPlan((S, H), group)
        new_out = out is None  # a new ``out`` per call: its pointer varies (``var_index``)
        if new_out:
            out = plan.fresh_out = torch.empty_like(input)
        if S == 0 or H == 0:
            return plan
        buf = find_buffer(group)
        algo = choose_algorithm(buf, input.device, algorithm, S * H * esize, H * esize, world,
                                LINES_ROWS_MAX_BYTES)
        if algo == "lines" and H <= MAX_FUSED_HIDDEN:
            plan.choice = ConfigChoice(config or lines_row_config(H, input.dtype, world))
            plan.kernel = _fused_lines_launch(context(buf), plan.choice.config, args, out,
                                              1 if new_out else None, timeout_s)
            return plan
        in_off = offset_in(buf, input)
        region = in_off if in_off is not None else region_after(buf, input, residual, weight, out)
        # two-shot: where the reduced rows land on every rank (kernels/all_reduce_rmsnorm.py)
        res = region
        if algo == "two_shot" and in_off is not None:
            res = region_after(buf, input, residual, weight, out)
        end = max(region, res) + S * H * esize
        if H > MAX_FUSED_HIDDEN or algo == "lines" or not symm_usable(buf, input.device, end):
            plan.fallback = _torch_fused
            return plan
        rps = S if algo == "one_shot" else -(-S // world)
        plan.choice = ConfigChoice(config or default_config(rps * H, input.dtype, world, hidden=H))
        plan.kernel = _fused_launch(context(buf), plan.choice.config, args, out, algo, region, res,
                                    rps, in_off is None, 1 if new_out else None, timeout_s)
        return plan


def _fused_launch(ctx, cfg: LaunchConfig, args, out, algo, region, res, rps, stage_in, var_index,
                  timeout_s):
    """The launch of ``_all_reduce_rmsnorm_kernel``: its arguments, listed here only."""
    input, residual, weight, eps = args[:4]
    S, H = input.shape
    esize = input.element_size()
    base, row_bytes = ctx.local_base, H * esize
    aligned = (aligned16(input.data_ptr(), out.data_ptr(), residual.data_ptr(), base + region,
                         base + res, row_bytes)
               and aligned16(weight.data_ptr(), H * weight.element_size()))
    use_mm = multimem_eligible(ctx, input.dtype, base + region, base + res, row_bytes,
                               cfg.block_size * esize)
    return Launch(
        ALL_REDUCE_ADD_RMSNORM.name, ctx.buf, _all_reduce_rmsnorm_kernel,
        cfg.row_grid(rps, ctx.grid_cap), cfg.num_warps,
        (input.data_ptr(), out.data_ptr(), residual.data_ptr(), weight.data_ptr(), ctx.buf_table,
         ctx.sig_table, ctx.mc_addr, ctx.err_addr, ctx.grid_cap, region, res, S, H, rps,
         float(eps), env.timeout_ns(timeout_s)),
        dict(DTYPE=TL_DTYPE[input.dtype], W_DTYPE=TL_DTYPE[weight.dtype], RANK=ctx.rank,
             WORLD_SIZE=ctx.world, WORLD_P2=ctx.world_p2, BLOCK_H=cfg.block_size,
             TWO_SHOT=algo == "two_shot", STAGE_IN=stage_in, USE_MULTIMEM=use_mm,
             SCOPE=ctx.scope, USE_PTX=ctx.use_ptx, ALIGNED=aligned),
        var_index=var_index)


def choose_algorithm(buf, device, algorithm, nbytes: int, row_bytes: int, world: int,
                     max_bytes: int) -> str:
    """The all-reduce algorithm of a call moving ``nbytes`` in rows of ``row_bytes``:
    ``algorithm`` when given (``"lines"`` must fit the line area, ``ValueError`` otherwise);
    else ``"lines"`` where ``context.lines_eligible`` (at most ``max_bytes``), else
    :func:`symmtriton.config.all_reduce_algorithm`. Alike on every rank."""
    usable = symm_usable(buf, device, 0)
    if algorithm == "lines":
        if usable and not lines_fit(context(buf), nbytes, row_bytes):
            raise ValueError(f"algorithm='lines' needs rows of whole 32-bit words and at most "
                             f"{buf.lines_words * 4} bytes, got {nbytes} bytes in rows of "
                             f"{row_bytes}")
        return algorithm
    if algorithm is not None:
        return algorithm
    if usable and lines_eligible(context(buf), nbytes, row_bytes, max_bytes):
        return "lines"
    return all_reduce_algorithm(nbytes, world)


def _fused_lines_launch(ctx, cfg: LaunchConfig, args, out, var_index, timeout_s):
    """The launch of ``_all_reduce_rmsnorm_lines_kernel``: its arguments, listed here only."""
    input, residual, weight, eps = args[:4]
    S, H = input.shape
    aligned = (aligned16(input.data_ptr(), out.data_ptr(), residual.data_ptr(),
                         H * input.element_size())
               and aligned16(weight.data_ptr(), H * weight.element_size()))
    grid, chunk, nc, warps = lines_row_split(cfg, S, H, input.element_size(), ctx.grid_cap,
                                             ctx.lines_words, not ctx.use_ptx)
    return Launch(
        ALL_REDUCE_ADD_RMSNORM.name, ctx.buf, _all_reduce_rmsnorm_lines_kernel, grid, warps,
        (input.data_ptr(), out.data_ptr(), residual.data_ptr(), weight.data_ptr(), ctx.buf_table,
         ctx.sig_table, ctx.err_addr, ctx.grid_cap, ctx.lines_off, ctx.lines_words, S, H, float(eps),
         env.timeout_ns(timeout_s)),
        dict(DTYPE=TL_DTYPE[input.dtype], W_DTYPE=TL_DTYPE[weight.dtype], RANK=ctx.rank,
             WORLD_SIZE=ctx.world, WORLD_P2=ctx.world_p2, CHUNK=chunk, NC=nc, SCOPE=ctx.scope,
             USE_PTX=ctx.use_ptx, ALIGNED=aligned),
        var_index=var_index)


def _check_flat(name: str, t) -> None:
    """``check_tensor`` for the all-reduce, which also takes 0-d tensors."""
    if isinstance(t, torch.Tensor) and t.dim() == 0:
        t = t.view(1)
    check_tensor(name, t, dtypes=REDUCE_DTYPES)


def _check_algorithm(algorithm) -> None:
    if algorithm is not None and algorithm not in ALL_REDUCE_ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALL_REDUCE_ALGORITHMS)} or None, "
                         f"got {algorithm!r}")


def _torch_fused(input, residual, weight, eps, group, out):
    """The same computation through torch.distributed and torch ops (fp32 accumulation)."""
    acc = torch_all_reduce(torch.empty(input.shape, dtype=torch.float32, device=input.device),
                           input, group)
    return torch_all_reduce_add_rmsnorm(acc, residual, weight, eps, out)


ALL_REDUCE = AllReduce()
ALL_REDUCE_ADD_RMSNORM = AllReduceAddRmsnorm()


@counts_calls
def all_reduce(tensor: torch.Tensor, group=None, *, out: torch.Tensor | None = None,
               config: LaunchConfig | None = None, timeout_s: float | None = None,
               algorithm: str | None = None) -> torch.Tensor:
    """Sum ``tensor`` over the ranks of ``group`` (like ``torch.distributed.all_reduce`` with
    ``op=SUM``), in place, or into ``out`` (same shape and dtype; ``tensor`` is then left
    unchanged). bf16, fp16 and fp32 of any shape, accumulated in fp32. ``algorithm``:
    ``"lines"`` (one-shot over flag-in-data lines, no barrier: small tensors), ``"one_shot"`` or
    ``"two_shot"`` (default: by size and world size); the same on every rank.

    Every rank must lay out the symmetric buffer alike: a zero-copy ``tensor``, or an ``out``
    placed in the buffer, at the same offset on every rank (two-shot stores the sums there on
    every rank).

    Under ``torch.compile`` it traces as ``torch.ops.symmtriton.all_reduce_`` (in place, also for
    ``out=tensor``) or ``torch.ops.symmtriton.all_reduce_out`` (``config``/``timeout_s``: eager
    only, see :func:`.driver.compiling`)."""
    if compiling(ALL_REDUCE.name, config, timeout_s):
        _check_algorithm(algorithm)
        if out is None or out is tensor:
            torch.ops.symmtriton.all_reduce_(tensor, group_name(group), algorithm)
            return tensor
        torch.ops.symmtriton.all_reduce_out(tensor, group_name(group), out, algorithm)
        return out
    return call(ALL_REDUCE, group, config, timeout_s,
                (tensor if out is None else out, tensor, algorithm))


@counts_calls
def all_reduce_add_rmsnorm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float = 1e-6, group=None, out: torch.Tensor | None = None, *,
                           config: LaunchConfig | None = None, timeout_s: float | None = None,
                           algorithm: str | None = None) -> torch.Tensor:
    """All-reduce ``input`` [S, H] (this rank's partial sums) over ``group``, add the sum to
    ``residual`` [S, H] (the same on every rank; updated in place, rounded to its dtype), and
    return ``rmsnorm(residual) * weight`` [H] (fp32 statistics) in ``out`` [S, H] (a new tensor
    when ``None``; it must not overlap ``input``, which is only read). ``algorithm`` as for
    :func:`all_reduce`. Under ``torch.compile`` it traces as
    ``torch.ops.symmtriton.all_reduce_add_rmsnorm``."""
    if compiling(ALL_REDUCE_ADD_RMSNORM.name, config, timeout_s):
        _check_algorithm(algorithm)
        if out is None:
            out = torch.empty_like(input)
        torch.ops.symmtriton.all_reduce_add_rmsnorm(input, residual, weight, eps,
                                                    group_name(group), out, algorithm)
        return out
    return call(ALL_REDUCE_ADD_RMSNORM, group, config, timeout_s,
                (input, residual, weight, eps, out, algorithm))
