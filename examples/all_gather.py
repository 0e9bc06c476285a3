"""All-gather with symmtriton, staged and zero-copy, checked against torch.distributed.

    torchrun --nproc-per-node=4 examples/all_gather.py --numel 65536
    SYMMTRITON_BACKEND=host torchrun --nproc-per-node=2 examples/all_gather.py --numel 1000

Every rank contributes ``--numel`` elements; ``symmtriton.all_gather_into_tensor`` gathers them
in rank order, like ``torch.distributed.all_gather_into_tensor``:

* staged: the output is an ordinary tensor; the kernel gathers through the symmetric buffer and
  copies out, in one launch.
* zero-copy: the output is a view of the symmetric buffer (``maybe_get_tensor``), at the same
  offset on every rank; peers write straight into it. The view is scratch: read or copy it
  before the next collective on the buffer.

Several ranks on one GPU need ``TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1`` (set by
examples/_common.py when unset). Rank 0 prints the time per call of each way and of
torch.distributed (the baseline), after checking that every result equals torch.distributed's
bit for bit, then what the baseline runs on and the speed-up where the two compare like for like.
"""

import torch
import torch.distributed as dist

import _common
import symmtriton as st


def main() -> None:
    p = _common.parser(__doc__.split("\n", 1)[0])
    p.add_argument("--numel", type=_common.positive_int, default=1 << 16,
                   help="elements each rank contributes (default %(default)s)")
    args = p.parse_args()
    env = _common.init_distributed()
    dtype = _common.dtype_of(args, env)
    buf = _common.buffer(env, args)
    n, world = args.numel, env.world_size

    local = _common.rank_tagged(n, dtype, env.rank, env)
    expect = torch.empty(world * n, dtype=dtype, device=env.device)
    dist.all_gather_into_tensor(expect, local, group=env.group)

    staged_out = torch.empty(world * n, dtype=dtype, device=env.device)
    zero_copy_out = buf.maybe_get_tensor((world * n,), dtype)["tensor"]  # None: unavailable
    torch_out = torch.empty_like(staged_out)
    _common.compare_variants(
        env, args,
        f"all_gather {env.describe()} numel/rank={n} {str(dtype).removeprefix('torch.')}",
        {
            "staged": lambda: st.all_gather_into_tensor(staged_out, local, env.group),
            "zero-copy": None if zero_copy_out is None else
            (lambda: st.all_gather_into_tensor(zero_copy_out, local, env.group)),
        },
        expect,
        lambda: dist.all_gather_into_tensor(torch_out, local, group=env.group))
    _common.finish(env)


if __name__ == "__main__":
    _common.main_guard(main)
