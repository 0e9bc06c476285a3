"""``all_gather_into_tensor``: host side of kernels/all_gather.py (validate, plan, launch)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import env
from .._calls import sequenced
from ..config import (CONFIG_OP, LaunchConfig, aligned16, bit_unit, lines_block, lines_config,
                      lines_eligible, multimem_eligible)
from ..context import context, find_buffer, offset_in, region_after, symm_usable
from ..kernels.all_gather import _all_gather_kernel, _all_gather_lines_kernel
from ..launch import Launch
from ..validation import check_disjoint, check_gather_shapes, check_same, check_tensor
from ._lines import flat_lines_launch
from ._operands import Flat, flat_key, flat_uniform, record
from .driver import (TL_DTYPE, Collective, ConfigChoice, OutputPlan, barrier_path, call,
                     choose_config, eager_only, group_name)
from .fallback import torch_all_gather


class AllGather(Collective):
    name = "all_gather_into_tensor"
    config_op = CONFIG_OP[name]
    key = flat_key
    uniform = flat_uniform

    def validate(self, group, a: Flat):
        output, input = a.output, a.input
        check_tensor("output", output)
        check_tensor("input", input)
        check_same(self.name, output=output, input=input)
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        check_gather_shapes(self.name, output, input, world, "output", "input")
        nbytes = input.numel() * input.element_size()
        # in place: ``input`` may be this rank's shard of ``output``
        check_disjoint(self.name, [("output", output), ("input", input)],
                       [("output", "input", rank * nbytes)])

    def prepare(self, group, config, timeout_s, a: Flat):
        output, input = a.output, a.input
        world = dist.get_world_size(group)
        nbytes = input.numel() * input.element_size()
        if nbytes == 0:
            return OutputPlan("empty")
        buf = find_buffer(group)
        if symm_usable(buf, input.device, 0) and lines_eligible(context(buf), nbytes, nbytes):
            cfg = config or lines_config(nbytes // 4, torch.int32, world)
            # the widest unit both addresses allow (a per-rank constexpr); ``cfg.block_size``
            # counts 32-bit words, so every rank launches the same grid
            unit = bit_unit(nbytes, input.data_ptr(), output.data_ptr())
            launch = flat_lines_launch(self.name, context(buf), _all_gather_lines_kernel, cfg,
                                       nbytes // 4, input, output, nbytes // unit.itemsize, unit,
                                       lines_block(cfg.block_size, 4) * (4 // unit.itemsize),
                                       timeout_s)
            return OutputPlan("lines", launch, ConfigChoice(cfg))
        out_off = offset_in(buf, output)
        region = out_off if out_off is not None else region_after(buf, input)
        if not symm_usable(buf, input.device, region + world * nbytes):
            return OutputPlan("fallback", fallback=torch_all_gather, group=group)
        # the config is keyed by the unit of values alike on every rank (tuning.launch_key),
        # its grid counted in that unit; this rank's tensors may allow only a narrower one
        key_unit = bit_unit(nbytes, region)
        choice = choose_config(config, self.config_op, nbytes // key_unit.itemsize, key_unit,
                               world)
        ctx = context(buf)
        unit = bit_unit(nbytes, input.data_ptr(), output.data_ptr(), region)
        use_mm = unit == torch.int32 and multimem_eligible(ctx, None, ctx.local_base + region,
                                                           nbytes, input.data_ptr())
        return OutputPlan(barrier_path(use_mm),
                          _kernel_launch(ctx, choice.config, a, unit, key_unit, nbytes, region,
                                         out_off is None, use_mm, timeout_s), choice)


def _kernel_launch(ctx, cfg: LaunchConfig, a: Flat, unit, key_unit, nbytes, region, copy_out,
                   use_mm, timeout_s):
    """The launch of ``_all_gather_kernel``: its arguments, listed here only. ``cfg`` counts
    ``key_unit``s (the same on every rank); the kernel copies in ``unit``s, the widest this
    rank's addresses allow, with its block scaled to the same bytes, so every rank launches the
    same grid (the barrier is per block)."""
    src, dst = a.input.data_ptr(), a.output.data_ptr()
    return Launch.on(
        ctx, OP.name, _all_gather_kernel,
        cfg.grid(nbytes // key_unit.itemsize, ctx.grid_cap), cfg.num_warps,
        (src, dst, ctx.buf_table, ctx.sig_table, ctx.mc_addr, ctx.err_addr, ctx.grid_cap, region,
         nbytes // unit.itemsize, env.timeout_ns(timeout_s)),
        dict(DTYPE=TL_DTYPE[unit], BLOCK_SIZE=cfg.block_size * (key_unit.itemsize // unit.itemsize),
             COPY_OUT=copy_out, USE_MULTIMEM=use_mm,
             ALIGNED=aligned16(src, dst, ctx.local_base + region, nbytes)))


OP = AllGather()


def _traced(output, input, group=None, *, config=None, timeout_s=None):
    """Under ``torch.compile``: ``torch.ops.symmtriton.all_gather_into_tensor``."""
    eager_only(OP.name, config, timeout_s)
    torch.ops.symmtriton.all_gather_into_tensor(output, input, group_name(group))
    return output


@sequenced(_traced)
def all_gather_into_tensor(output: torch.Tensor, input: torch.Tensor, group=None, *,
                           config: LaunchConfig | None = None,
                           timeout_s: float | None = None) -> torch.Tensor:
    """Gather ``input`` from every rank of ``group`` into ``output`` along dim 0 (rank order),
    like ``torch.distributed.all_gather_into_tensor``. Any dtype (a bit copy).

    Zero-copy when ``output`` lies in the group's symmetric buffer (at the same offset on every
    rank); otherwise the result is staged in the buffer and copied out in the same launch. Falls
    back to ``torch.distributed`` when symmetric memory cannot carry the call.
    ``input`` may be ``output``'s own shard (in place). Under ``torch.compile`` it traces as
    ``torch.ops.symmtriton.all_gather_into_tensor`` (``config``/``timeout_s``: eager only,
    see :func:`.driver.eager_only`)."""
    return call(OP, group, config, timeout_s, record(Flat, (output, input)))
