"""Reduce-scatter (sum) with symmtriton, staged and zero-copy, checked against torch.distributed.

    torchrun --nproc-per-node=4 examples/reduce_scatter.py --numel 65536
    SYMMTRITON_BACKEND=host torchrun --nproc-per-node=2 examples/reduce_scatter.py --numel 1000

Every rank holds ``world * --numel`` partial sums (e.g. the output of a row-parallel matmul);
``symmtriton.reduce_scatter_tensor`` sums them over the ranks (fp32 accumulation) and keeps this
rank's slice, like ``torch.distributed.reduce_scatter_tensor``:

* staged: the input is an ordinary tensor; the kernel stages it into the symmetric buffer and
  reduces, in one launch.
* zero-copy: the input already lies in the symmetric buffer (``maybe_get_tensor``; in a model,
  the matmul writes there with ``out=``), so peers read it directly.

The inputs are small integers, so every summation order gives the same bits. Several ranks on
one GPU need ``TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1`` (set by examples/_common.py when
unset). Rank 0 prints the time per call of each way and of torch.distributed (the baseline),
then what the baseline runs on and the speed-up where the two compare like for like.
"""

import torch
import torch.distributed as dist

import _common
import symmtriton as st


def main() -> None:
    p = _common.parser(__doc__.split("\n", 1)[0])
    p.add_argument("--numel", type=_common.positive_int, default=1 << 16,
                   help="elements of each rank's output slice (default %(default)s)")
    args = p.parse_args()
    env = _common.init_distributed()
    dtype = _common.dtype_of(args, env)
    buf = _common.buffer(env, args)
    n, world = args.numel, env.world_size

    partials = _common.rank_tagged(world * n, dtype, env.rank, env)
    expect = torch.empty(n, dtype=dtype, device=env.device)
    dist.reduce_scatter_tensor(expect, partials.clone(), group=env.group)

    staged_out = torch.empty(n, dtype=dtype, device=env.device)
    zero_copy_in = buf.maybe_get_tensor((world * n,), dtype)["tensor"]  # None: unavailable
    if zero_copy_in is not None:
        zero_copy_in.copy_(partials)  # stands for a matmul writing its output there
    zero_copy_out = torch.empty_like(staged_out)
    torch_in, torch_out = partials.clone(), torch.empty_like(staged_out)
    # Zero-copy runs first: the buffer is scratch, and the staged calls stage their input at
    # the same bytes, overwriting zero_copy_in.
    _common.compare_variants(
        env, args,
        f"reduce_scatter {env.describe()} numel/rank={n} {str(dtype).removeprefix('torch.')}",
        {
            "zero-copy": None if zero_copy_in is None else
            (lambda: st.reduce_scatter_tensor(zero_copy_out, zero_copy_in, env.group)),
            "staged": lambda: st.reduce_scatter_tensor(staged_out, partials, env.group),
        },
        expect,
        lambda: dist.reduce_scatter_tensor(torch_out, torch_in, group=env.group))
    _common.finish(env)


if __name__ == "__main__":
    _common.main_guard(main)
