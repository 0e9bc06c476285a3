"""``reduce_scatter_tensor``: host side of kernels/reduce_scatter.py."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import _launch as L
from .._calls import counts_calls
from ..config import LaunchConfig
from ..tuning import lookup_config
from ..validation import REDUCE_DTYPES, check_distinct, check_gather_shapes, check_same, check_tensor
from ._common import TL_DTYPE, call_key, replay, torch_reduce_scatter

OP = "reduce_scatter_tensor"


@counts_calls
def reduce_scatter_tensor(output: torch.Tensor, input: torch.Tensor, group=None, *,
                          config: LaunchConfig | None = None,
                          timeout_s: float | None = None) -> torch.Tensor:
    """Sum ``input`` over the ranks of ``group`` and keep this rank's slice of dim 0 in
    ``output``, like ``torch.distributed.reduce_scatter_tensor`` with ``op=SUM``. bf16, fp16 and
    fp32, accumulated in fp32.

    Zero-copy when ``input`` lies in the group's symmetric buffer (at the same offset on every
    rank, e.g. written there by the preceding GEMM); otherwise it is staged into the buffer in
    the same launch. Falls back to ``torch.distributed`` when symmetric memory cannot carry it."""
    group = L.resolve_group(group)
    key = call_key(OP, group, config, timeout_s, output, input)
    plan = L.get_plan(key) if key is not None else None
    if plan is not None and replay(plan, OP, group, config, torch_reduce_scatter, output, input):
        return output
    check_tensor("output", output, dtypes=REDUCE_DTYPES)
    check_tensor("input", input, dtypes=REDUCE_DTYPES)
    check_same(OP, output=output, input=input)
    world = dist.get_world_size(group)
    check_gather_shapes(OP, input, output, world, "input", "output")
    check_distinct(OP, "output", output, "input", input)
    if plan is None:
        L.check_uniform(group, OP, output=output, input=input)
    n = output.numel()
    if n == 0:
        L.put_plan(key, L.Plan("empty"))
        return output
    esize = output.element_size()
    buf = L.find_buffer(group)
    in_off = buf.byte_offset_of(input) if buf.symm_mem_hdl is not None else None
    region = in_off if in_off is not None else L.region_after(buf, output)
    if not L.symm_usable(buf, input.device, region + world * n * esize):
        L.put_plan(key, L.Plan("fallback"))
        return torch_reduce_scatter(output, input, group)
    ctx = L.context(buf)
    lookup = (("reduce_scatter", n, input.dtype, world), {})
    cfg = config or lookup_config(*lookup[0])
    aligned = L.aligned16(input.data_ptr(), output.data_ptr(), ctx.local_base + region, n * esize)
    use_mm = L.multimem_eligible(ctx, input.dtype, ctx.local_base + region, n * esize)
    kern = L.kernel("reduce_scatter", "_reduce_scatter_kernel")
    plan = L.Plan(
        "launch", buf, kern, cfg.grid(n, ctx.grid_cap), cfg.num_warps,
        (input.data_ptr(), output.data_ptr(), ctx.buf_table, ctx.sig_table, ctx.mc_addr,
         ctx.err_addr, ctx.grid_cap, region, n, L.timeout_ns(timeout_s)),
        dict(DTYPE=TL_DTYPE[input.dtype], RANK=ctx.rank, WORLD_SIZE=world, WORLD_P2=ctx.world_p2,
             BLOCK_SIZE=cfg.block_size, STAGE_IN=in_off is None, USE_MULTIMEM=use_mm,
             SCOPE=ctx.scope, USE_PTX=ctx.use_ptx, ALIGNED=aligned),
        extra=(lookup[0], lookup[1], cfg))
    L.put_plan(key, plan)
    L.launch(buf, OP, plan)
    return output
