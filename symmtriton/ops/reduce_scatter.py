"""``reduce_scatter_tensor``: host side of kernels/reduce_scatter.py (validate, plan, launch)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import env
from .._calls import sequenced
from ..config import (CONFIG_OP, LaunchConfig, aligned16, lines_block, lines_config, lines_eligible,
                      multimem_eligible, push_config, push_eligible)
from ..context import context, find_buffer, offset_in, region_after, symm_usable
from ..kernels.reduce_scatter import _reduce_scatter_kernel, _reduce_scatter_lines_kernel
from ..launch import Launch
from ..validation import (REDUCE_DTYPES, check_disjoint, check_gather_shapes, check_same,
                          check_tensor)
from ._lines import flat_lines_launch
from ._operands import Flat, flat_key, flat_uniform, record
from ._push import reduce_scatter_push_launch
from .driver import (TL_DTYPE, Collective, ConfigChoice, OutputPlan, barrier_path, call,
                     choose_config, eager_only, group_name)
from .fallback import torch_reduce_scatter


class ReduceScatter(Collective):
    name = "reduce_scatter_tensor"
    config_op = CONFIG_OP[name]
    key = flat_key
    uniform = flat_uniform

    def validate(self, group, a: Flat):
        output, input = a.output, a.input
        check_tensor("output", output, dtypes=REDUCE_DTYPES)
        check_tensor("input", input, dtypes=REDUCE_DTYPES)
        check_same(self.name, output=output, input=input)
        world = dist.get_world_size(group)
        check_gather_shapes(self.name, input, output, world, "input", "output")
        check_disjoint(self.name, [("output", output), ("input", input)])

    def prepare(self, group, config, timeout_s, a: Flat):
        output, input = a.output, a.input
        world = dist.get_world_size(group)
        n = output.numel()
        if n == 0:
            return OutputPlan("empty")
        buf = find_buffer(group)
        nbytes = n * output.element_size()  # to each peer
        if symm_usable(buf, input.device, 0) and lines_eligible(context(buf), nbytes, nbytes):
            cfg = config or lines_config(n, input.dtype, world)
            launch = flat_lines_launch(self.name, context(buf), _reduce_scatter_lines_kernel, cfg,
                                       n, input, output, n, input.dtype,
                                       lines_block(cfg.block_size, input.element_size()),
                                       timeout_s)
            return OutputPlan("lines", launch, ConfigChoice(cfg))
        in_off = offset_in(buf, input)
        region = in_off if in_off is not None else region_after(buf, output)
        if not symm_usable(buf, input.device, region + world * nbytes):
            return OutputPlan("fallback", fallback=torch_reduce_scatter, group=group)
        ctx = context(buf)
        multimem = multimem_eligible(ctx, input.dtype, ctx.local_base + region, nbytes)
        if push_eligible(ctx, "reduce_scatter", nbytes, multimem, in_off is None):
            cfg = config or push_config(n, input.dtype, world)
            push = reduce_scatter_push_launch(self.name, ctx, cfg, output, input, timeout_s)
            if push is not None:
                return OutputPlan("push", push, ConfigChoice(cfg))
        choice = choose_config(config, self.config_op, n, input.dtype, world)
        return OutputPlan(barrier_path(multimem),
                          _kernel_launch(ctx, choice.config, a, n, region, in_off is None,
                                         multimem, timeout_s), choice)


def _kernel_launch(ctx, cfg: LaunchConfig, a: Flat, n, region, stage_in, use_mm, timeout_s):
    """The launch of ``_reduce_scatter_kernel``: its arguments, listed here only."""
    src, dst = a.input.data_ptr(), a.output.data_ptr()
    nbytes = n * a.output.element_size()
    return Launch.on(
        ctx, OP.name, _reduce_scatter_kernel, cfg.grid(n, ctx.grid_cap), cfg.num_warps,
        (src, dst, ctx.buf_table, ctx.sig_table, ctx.mc_addr, ctx.err_addr, ctx.grid_cap, region,
         n, env.timeout_ns(timeout_s)),
        dict(DTYPE=TL_DTYPE[a.input.dtype], BLOCK_SIZE=cfg.block_size, STAGE_IN=stage_in,
             USE_MULTIMEM=use_mm, ALIGNED=aligned16(src, dst, ctx.local_base + region, nbytes)))


OP = ReduceScatter()


def _traced(output, input, group=None, *, config=None, timeout_s=None):
    """Under ``torch.compile``: ``torch.ops.symmtriton.reduce_scatter_tensor``."""
    eager_only(OP.name, config, timeout_s)
    torch.ops.symmtriton.reduce_scatter_tensor(output, input, group_name(group))
    return output


@sequenced(_traced)
def reduce_scatter_tensor(output: torch.Tensor, input: torch.Tensor, group=None, *,
                          config: LaunchConfig | None = None,
                          timeout_s: float | None = None) -> torch.Tensor:
    """Sum ``input`` over the ranks of ``group`` and keep this rank's slice of dim 0 in
    ``output``, like ``torch.distributed.reduce_scatter_tensor`` with ``op=SUM``. bf16, fp16 and
    fp32, accumulated in fp32.

    Zero-copy when ``input`` lies in the group's symmetric buffer (at the same offset on every
    rank, e.g. written there by the preceding GEMM); otherwise it is staged into the buffer in
    the same launch. Falls back to ``torch.distributed`` when symmetric memory cannot carry it.
    Under ``torch.compile`` it traces as ``torch.ops.symmtriton.reduce_scatter_tensor``."""
    return call(OP, group, config, timeout_s, record(Flat, (output, input)))
