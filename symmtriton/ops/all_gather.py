"""``all_gather_into_tensor``: host side of kernels/all_gather.py."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import _launch as L
from .._calls import counts_calls
from ..config import LaunchConfig
from ..tuning import lookup_config
from ..validation import check_distinct, check_gather_shapes, check_same, check_tensor
from ._common import TL_DTYPE, bit_unit, call_key, replay, torch_all_gather

OP = "all_gather_into_tensor"


@counts_calls
def all_gather_into_tensor(output: torch.Tensor, input: torch.Tensor, group=None, *,
                           config: LaunchConfig | None = None,
                           timeout_s: float | None = None) -> torch.Tensor:
    """Gather ``input`` from every rank of ``group`` into ``output`` along dim 0 (rank order),
    like ``torch.distributed.all_gather_into_tensor``. Any dtype (a bit copy).

    Zero-copy when ``output`` lies in the group's symmetric buffer (at the same offset on every
    rank); otherwise the result is staged in the buffer and copied out in the same launch. Falls
    back to ``torch.distributed`` when symmetric memory cannot carry the call.
    ``input`` may be ``output``'s own shard (in place)."""
    group = L.resolve_group(group)
    key = call_key(OP, group, config, timeout_s, output, input)
    plan = L.get_plan(key) if key is not None else None
    if plan is not None and replay(plan, OP, group, config, torch_all_gather, output, input):
        return output
    check_tensor("output", output)
    check_tensor("input", input)
    check_same(OP, output=output, input=input)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    check_gather_shapes(OP, output, input, world, "output", "input")
    nbytes = input.numel() * input.element_size()
    in_place = input.data_ptr() == output.data_ptr() + rank * nbytes
    if not in_place:
        check_distinct(OP, "output", output, "input", input)
    if plan is None:
        L.check_uniform(group, OP, output=output, input=input)
    if nbytes == 0:
        L.put_plan(key, L.Plan("empty"))
        return output
    buf = L.find_buffer(group)
    out_off = buf.byte_offset_of(output) if buf.symm_mem_hdl is not None else None
    region = out_off if out_off is not None else L.region_after(buf, input)
    if not L.symm_usable(buf, input.device, region + world * nbytes):
        L.put_plan(key, L.Plan("fallback"))
        return torch_all_gather(output, input, group)
    ctx = L.context(buf)
    unit = bit_unit(nbytes, input.data_ptr(), output.data_ptr(), region)
    n = nbytes // unit.itemsize
    lookup = (("all_gather", n, unit, world), {})
    cfg = config or lookup_config(*lookup[0])
    aligned = L.aligned16(input.data_ptr(), output.data_ptr(), ctx.local_base + region, nbytes)
    use_mm = unit == torch.int32 and L.multimem_eligible(ctx, None, ctx.local_base + region, nbytes,
                                                         input.data_ptr())
    kern = L.kernel("all_gather", "_all_gather_kernel")
    plan = L.Plan(
        "launch", buf, kern, cfg.grid(n, ctx.grid_cap), cfg.num_warps,
        (input.data_ptr(), output.data_ptr(), ctx.buf_table, ctx.sig_table, ctx.mc_addr,
         ctx.err_addr, ctx.grid_cap, region, n, L.timeout_ns(timeout_s)),
        dict(DTYPE=TL_DTYPE[unit], RANK=ctx.rank, WORLD_SIZE=world, WORLD_P2=ctx.world_p2,
             BLOCK_SIZE=cfg.block_size, COPY_OUT=out_off is None, USE_MULTIMEM=use_mm,
             SCOPE=ctx.scope, USE_PTX=ctx.use_ptx, ALIGNED=aligned),
        extra=(lookup[0], lookup[1], cfg))
    L.put_plan(key, plan)
    L.launch(buf, OP, plan)
    return output
