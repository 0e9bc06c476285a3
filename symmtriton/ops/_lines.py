"""Host side shared by the flat barrier-free kernels (kernels/lines.py):
``_all_gather_lines_kernel``, ``_reduce_scatter_lines_kernel`` and ``_all_reduce_lines_kernel``
take the same arguments, listed here only."""

from __future__ import annotations

import torch

from .. import env
from ..config import LaunchConfig, aligned16
from ..context import Ctx
from ..launch import Launch
from .driver import TL_DTYPE


def flat_lines_launch(op: str, ctx: Ctx, kernel, cfg: LaunchConfig, grid_numel: int, src, dst,
                      n: int, dtype: torch.dtype, block: int, timeout_s) -> Launch:
    """The launch of a flat lines kernel moving ``n`` elements of ``dtype`` per peer from tensor
    ``src`` to ``dst`` in chunks of ``block`` elements; ``cfg.grid(grid_numel)`` blocks (the
    same count on every rank: the all-gather's ``n`` depends on per-rank alignment, its grid
    does not)."""
    nbytes = n * dtype.itemsize
    return Launch.on(
        ctx, op, kernel, cfg.grid(grid_numel, ctx.grid_cap), cfg.num_warps,
        (src.data_ptr(), dst.data_ptr(), ctx.buf_table, ctx.sig_table, ctx.err_addr,
         ctx.grid_cap, ctx.lines_off, ctx.lines_words, n, env.timeout_ns(timeout_s)),
        dict(DTYPE=TL_DTYPE[dtype], BLOCK=block,
             ALIGNED=aligned16(src.data_ptr(), dst.data_ptr(), nbytes)))
