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
from .._calls import sequenced
from ..config import (ALL_REDUCE_ALGORITHMS, MAX_FUSED_HIDDEN, LaunchConfig, aligned16,
                      all_reduce_algorithm, all_reduce_config, default_config, lines_block,
                      lines_config, lines_eligible, lines_fit, lines_row_config, multimem_eligible,
                      push_config, push_eligible, push_one_shot_eligible)
from ..context import context, find_buffer, offset_in, region_after, symm_usable
from ..presets import LINES_MAX_BYTES, LINES_ROWS_MAX_BYTES
from ..kernels.all_reduce import _all_reduce_kernel, _all_reduce_lines_kernel
from ..kernels.all_reduce_rmsnorm import (_all_reduce_rmsnorm_kernel,
                                          _all_reduce_rmsnorm_lines_kernel)
from ..launch import Launch
from ..validation import REDUCE_DTYPES, check_disjoint, check_same, check_tensor
from ._lines import flat_lines_launch
from ._operands import AllReduceOperands, Rows, record
from ._push import all_reduce_one_shot_push_launch, all_reduce_push_launch
from ._quant import check_quant, q_arg, quant_constexprs, quant_mode
from ._rows import (RowsPlan, rows_aligned, rows_key, rows_lines_launch, rows_out, rows_uniform,
                    traced_rows, validate_rows, var_arg)
from .driver import (TL_DTYPE, Collective, ConfigChoice, OutputPlan, barrier_path, call,
                     eager_only, group_name, tensor_desc)
from .fallback import torch_all_reduce, torch_all_reduce_rmsnorm


class AllReduce(Collective):
    name = "all_reduce"
    config_op = None  # untuned: config.default_config

    def key(self, group, config, timeout_s, a: AllReduceOperands):
        return (self.name, group, tensor_desc(a.output), tensor_desc(a.input), a.algorithm,
                config, env.timeout_key(timeout_s))

    def uniform(self, a: AllReduceOperands):
        return {"tensor": a.input}

    def validate(self, group, a: AllReduceOperands):
        dst, tensor = a.output, a.input
        _check_flat("tensor", tensor)
        if dst is not tensor:
            _check_flat("out", dst)
            check_same(self.name, tensor=tensor, out=dst)
            if dst.shape != tensor.shape:
                raise ValueError(f"{self.name}: out shape {tuple(dst.shape)} must be tensor's "
                                 f"shape {tuple(tensor.shape)}")
            # ``out`` may be ``tensor`` itself (in place)
            check_disjoint(self.name, [("tensor", tensor), ("out", dst)], [("tensor", "out", 0)])
        _check_algorithm(a.algorithm)

    def prepare(self, group, config, timeout_s, a: AllReduceOperands):
        dst, tensor = a.output, a.input
        world = dist.get_world_size(group)
        n, esize = tensor.numel(), tensor.element_size()
        if n == 0:
            return OutputPlan("empty")
        buf = find_buffer(group)
        algo = choose_algorithm(buf, tensor.device, a.algorithm, n * esize, n * esize, world,
                                LINES_MAX_BYTES)
        if algo == "lines":
            cfg = config or lines_config(n, tensor.dtype, world)
            launch = flat_lines_launch(self.name, context(buf), _all_reduce_lines_kernel, cfg, n,
                                       tensor, dst, n, tensor.dtype,
                                       lines_block(cfg.block_size, esize), timeout_s)
            return OutputPlan("lines", launch, ConfigChoice(cfg), algorithm=algo)
        in_off = offset_in(buf, tensor)
        region, res, copy_out = _layout(buf, a, algo, in_off)
        if not symm_usable(buf, tensor.device, max(region, res) + n * esize):
            return OutputPlan("fallback", fallback=torch_all_reduce, group=group, algorithm=algo)
        choice = ConfigChoice(config or all_reduce_config(n, tensor.dtype, world, algo))
        ctx = context(buf)
        multimem = multimem_eligible(ctx, tensor.dtype, ctx.local_base + region,
                                     ctx.local_base + res, n * esize,
                                     choice.config.block_size * esize)
        push = _push_plan(ctx, config, a, algo, multimem, in_off is None, timeout_s)
        if push is not None:
            return push
        return OutputPlan(barrier_path(multimem),
                          _kernel_launch(ctx, choice.config, a, algo, region, res,
                                         in_off is None, copy_out, multimem, timeout_s),
                          choice, algorithm=algo)


def _layout(buf, a: AllReduceOperands, algo: str, in_off):
    """``(region, res, copy_out)`` of a barrier all-reduce: where the input is (or is staged),
    where the sums land on every rank (kernels/all_reduce.py), and whether they are copied out
    to ``a.output`` from there."""
    dst, tensor = a.output, a.input
    out_off = offset_in(buf, dst)
    region = in_off if in_off is not None else region_after(buf, tensor, dst)
    in_place = dst.data_ptr() == tensor.data_ptr()
    if algo == "two_shot":
        if in_place or (out_off is None and in_off is None):
            res = region  # the output itself, or the staging region (scratch)
        elif out_off is not None:
            res = out_off  # ``out`` lies in the buffer: the sums land there directly
        else:
            res = region_after(buf, tensor, dst)  # keep the zero-copy input intact
        return region, res, res != out_off
    # one-shot: straight to ``dst``, unless that is the zero-copy input peers still read
    copy_out = in_place and in_off is not None
    return region, region_after(buf, tensor) if copy_out else region, copy_out


def _push_plan(ctx, config, a: AllReduceOperands, algo, multimem, staged, timeout_s):
    """The plan of a push all-reduce (kernels/push.py: one round of the whole tensor, or the
    two-shot's two rounds) where ``context`` chooses one and its areas fit, else ``None``."""
    dst, tensor = a.output, a.input
    n, world = tensor.numel(), ctx.world
    if push_one_shot_eligible(ctx, n * tensor.element_size(), multimem, staged, algo,
                              a.algorithm):
        cfg = config or push_config(n, tensor.dtype, world)
        push = all_reduce_one_shot_push_launch(ALL_REDUCE.name, ctx, cfg, dst, tensor, timeout_s)
        if push is not None:
            return OutputPlan("push", push, ConfigChoice(cfg), algorithm="one_shot")
    per_rank = -(-n // world)
    if algo == "two_shot" and push_eligible(ctx, "all_reduce", per_rank * tensor.element_size(),
                                            multimem, staged):
        cfg = config or push_config(per_rank, tensor.dtype, world)
        push = all_reduce_push_launch(ALL_REDUCE.name, ctx, cfg, dst, tensor, timeout_s)
        if push is not None:
            return OutputPlan("push", push, ConfigChoice(cfg), algorithm="two_shot")
    return None


def _kernel_launch(ctx, cfg: LaunchConfig, a: AllReduceOperands, algo, region, res, stage_in,
                   copy_out, use_mm, timeout_s):
    """The launch of ``_all_reduce_kernel``: its arguments, listed here only."""
    src, dst = a.input.data_ptr(), a.output.data_ptr()
    n, esize = a.input.numel(), a.input.element_size()
    chunks = -(-n // cfg.block_size)
    cps = chunks if algo == "one_shot" else -(-chunks // ctx.world)
    base = ctx.local_base
    return Launch.on(
        ctx, ALL_REDUCE.name, _all_reduce_kernel, cfg.row_grid(cps, ctx.grid_cap), cfg.num_warps,
        (src, dst, ctx.buf_table, ctx.sig_table, ctx.mc_addr, ctx.err_addr, ctx.grid_cap, region,
         res, n, cps, env.timeout_ns(timeout_s)),
        dict(DTYPE=TL_DTYPE[a.input.dtype], BLOCK_SIZE=cfg.block_size,
             TWO_SHOT=algo == "two_shot", STAGE_IN=stage_in, COPY_OUT=copy_out,
             USE_MULTIMEM=use_mm,
             ALIGNED=aligned16(src, dst, base + region, base + res, n * esize)))


class AllReduceAddRmsnorm(Collective):
    name = "all_reduce_add_rmsnorm"
    config_op = None  # untuned: config.default_config
    key = rows_key
    uniform = rows_uniform

    def validate(self, group, a: Rows):
        input, residual = a.input, a.residual
        if (isinstance(input, torch.Tensor) and isinstance(residual, torch.Tensor)
                and residual.shape != input.shape):
            raise ValueError(f"{self.name}: residual shape {tuple(residual.shape)} must be "
                             f"input's shape {tuple(input.shape)}")
        # [S, H] everywhere: the rows of one rank
        validate_rows(self.name, input, residual, a.weight, a.eps, 1, a.out, False, a.out_dtype)
        check_quant(self.name, a, input.shape[0])
        check_disjoint(self.name, [("input", input), ("out", a.out)])  # no out=input here
        _check_algorithm(a.algorithm)

    def prepare(self, group, config, timeout_s, a: Rows):
        input = a.input
        world = dist.get_world_size(group)
        S, H = input.shape
        esize = input.element_size()
        if config is not None and config.block_size < H:
            raise ValueError(f"{self.name}: config.block_size {config.block_size} must cover "
                             f"the row (H={H})")
        out, scales, fresh, var_index = rows_out(a, (S, H))  # new ones: their pointers vary
        quant = quant_mode(a)
        if S == 0 or H == 0:
            return RowsPlan("empty", (S, H), group, fresh_out=fresh, quant=quant)
        buf = find_buffer(group)
        algo = choose_algorithm(buf, input.device, a.algorithm, S * H * esize, H * esize, world,
                                LINES_ROWS_MAX_BYTES)
        if algo == "lines" and H <= MAX_FUSED_HIDDEN:
            choice = ConfigChoice(config or lines_row_config(H, input.dtype, world))
            kernel = rows_lines_launch(self.name, context(buf), _all_reduce_rmsnorm_lines_kernel,
                                       choice.config, a, out, scales, S, S, var_index,
                                       timeout_s, {})
            return RowsPlan("lines", (S, H), group, kernel, choice, fresh_out=fresh,
                            algorithm=algo, quant=quant)
        in_off = offset_in(buf, input)
        region = (in_off if in_off is not None
                  else region_after(buf, input, a.residual, a.weight, out))
        # two-shot: where the reduced rows land on every rank (kernels/all_reduce_rmsnorm.py)
        res = region
        if algo == "two_shot" and in_off is not None:
            res = region_after(buf, input, a.residual, a.weight, out)
        end = max(region, res) + S * H * esize
        if H > MAX_FUSED_HIDDEN or algo == "lines" or not symm_usable(buf, input.device, end):
            return RowsPlan("fallback", (S, H), group, fallback=torch_all_reduce_rmsnorm,
                            fresh_out=fresh, algorithm=algo, quant=quant)
        rps = S if algo == "one_shot" else -(-S // world)
        choice = ConfigChoice(config or default_config(rps * H, input.dtype, world, hidden=H))
        ctx = context(buf)
        use_mm = multimem_eligible(ctx, input.dtype, ctx.local_base + region,
                                   ctx.local_base + res, H * esize,
                                   choice.config.block_size * esize)
        kernel = _fused_launch(ctx, choice.config, a, out, scales, algo, region, res, rps,
                               in_off is None, use_mm, var_index, timeout_s)
        return RowsPlan(barrier_path(use_mm), (S, H), group, kernel, choice, fresh_out=fresh,
                        algorithm=algo, quant=quant)


def _fused_launch(ctx, cfg: LaunchConfig, a: Rows, out, scales, algo, region, res, rps,
                  stage_in, use_mm, var_index, timeout_s):
    """The launch of ``_all_reduce_rmsnorm_kernel``: its arguments, listed here only."""
    S, H = a.input.shape
    base = ctx.local_base
    args = (a.input.data_ptr(), out.data_ptr(), a.residual.data_ptr(), a.weight.data_ptr(),
            ctx.buf_table, ctx.sig_table, ctx.mc_addr, ctx.err_addr, ctx.grid_cap, region, res,
            S, H, rps, float(a.eps), env.timeout_ns(timeout_s), q_arg(a, out, scales))
    return Launch.on(
        ctx, ALL_REDUCE_ADD_RMSNORM.name, _all_reduce_rmsnorm_kernel,
        cfg.row_grid(rps, ctx.grid_cap), cfg.num_warps, args,
        dict(DTYPE=TL_DTYPE[a.input.dtype], W_DTYPE=TL_DTYPE[a.weight.dtype],
             BLOCK_H=cfg.block_size, TWO_SHOT=algo == "two_shot", STAGE_IN=stage_in,
             USE_MULTIMEM=use_mm, ALIGNED=rows_aligned(a, out, base + region, base + res),
             **quant_constexprs(a, TL_DTYPE[a.input.dtype])),
        var_arg(var_index, args))


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


def _check_flat(name: str, t) -> None:
    """``check_tensor`` for the all-reduce, which also takes 0-d tensors."""
    if isinstance(t, torch.Tensor) and t.dim() == 0:
        t = t.view(1)
    check_tensor(name, t, dtypes=REDUCE_DTYPES)


def _check_algorithm(algorithm) -> None:
    if algorithm is not None and algorithm not in ALL_REDUCE_ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALL_REDUCE_ALGORITHMS)} or None, "
                         f"got {algorithm!r}")


ALL_REDUCE = AllReduce()
ALL_REDUCE_ADD_RMSNORM = AllReduceAddRmsnorm()


def _traced_all_reduce(tensor, group=None, *, out=None, config=None, timeout_s=None,
                       algorithm=None):
    """Under ``torch.compile``: ``torch.ops.symmtriton.all_reduce_`` or ``all_reduce_out``."""
    eager_only(ALL_REDUCE.name, config, timeout_s)
    _check_algorithm(algorithm)
    if out is None or out is tensor:
        torch.ops.symmtriton.all_reduce_(tensor, group_name(group), algorithm)
        return tensor
    torch.ops.symmtriton.all_reduce_out(tensor, group_name(group), out, algorithm)
    return out


@sequenced(_traced_all_reduce)
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
    only, see :func:`.driver.eager_only`)."""
    return call(ALL_REDUCE, group, config, timeout_s,
                record(AllReduceOperands, (tensor if out is None else out, tensor, algorithm)))


def _traced_all_reduce_add_rmsnorm(input, residual, weight, eps=1e-6, group=None, out=None, *,
                                   config=None, timeout_s=None, algorithm=None, out_dtype=None,
                                   scale=None):
    """Under ``torch.compile``: ``torch.ops.symmtriton.all_reduce_add_rmsnorm``."""
    eager_only(ALL_REDUCE_ADD_RMSNORM.name, config, timeout_s)
    _check_algorithm(algorithm)
    return traced_rows(ALL_REDUCE_ADD_RMSNORM.name, input, residual, weight, eps,
                       group, out, out_dtype, scale, input.shape[0], algorithm)


@sequenced(_traced_all_reduce_add_rmsnorm)
def all_reduce_add_rmsnorm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float = 1e-6, group=None, out: torch.Tensor | None = None, *,
                           config: LaunchConfig | None = None, timeout_s: float | None = None,
                           algorithm: str | None = None, out_dtype: torch.dtype | None = None,
                           scale: torch.Tensor | None = None):
    """All-reduce ``input`` [S, H] (this rank's partial sums) over ``group``, add the sum to
    ``residual`` [S, H] (the same on every rank; updated in place, rounded to its dtype), and
    return ``rmsnorm(residual) * weight`` [H] (fp32 statistics) in ``out`` [S, H] (a new tensor
    when ``None``; it must not overlap ``input``, which is only read). ``algorithm`` as for
    :func:`all_reduce`. Under ``torch.compile`` it traces as
    ``torch.ops.symmtriton.all_reduce_add_rmsnorm``. ``out_dtype``/``scale``: an FP8 ``out``
    quantised in the same launch, as :func:`reduce_scatter_add_rmsnorm_all_gather`'s."""
    return call(ALL_REDUCE_ADD_RMSNORM, group, config, timeout_s,
                record(Rows, (input, residual, weight, eps, out, algorithm, out_dtype, scale,
                              None)))
