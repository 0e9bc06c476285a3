"""A tour of symmetric buffers: get_buffer, maybe_get_tensor, maybe_get_tensors, the scratch
rule, and zero-copy collectives on views of the buffer.

    torchrun --nproc-per-node=2 examples/symmetric_buffers.py
    SYMMTRITON_BACKEND=host torchrun --nproc-per-node=2 examples/symmetric_buffers.py --numel 256

A symmetric buffer is one allocation of the same size on every rank of a process group that
every peer can address. ``SymmetricMemoryManager.get_buffer(key, process_group)`` creates it on
first use (all ranks must call it) and returns the cached one afterwards.

The buffer is a scratch area: ``maybe_get_tensor`` and ``maybe_get_tensors`` lay out from byte 0
on every call, so the views of one call alias those of the previous one, and a collective on
the buffer may overwrite them. Take views, fill them, run the collective, read (or copy out) the
result before the next call. When symmetric memory is unavailable, or a request does not fit,
the calls return ``None`` forms and the collectives fall back to torch.distributed.

Several ranks on one GPU need ``TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1`` (set by
examples/_common.py when unset).
"""

import torch
import torch.distributed as dist

import _common
import symmtriton as st


def packing(env, buf) -> None:
    """maybe_get_tensors: specs packed from byte 0, each start rounded up to ``alignment``."""
    specs = [(7, torch.bfloat16), (5, torch.float32), (3, torch.uint8), (10, torch.float16)]
    packed = buf.maybe_get_tensors(specs, alignment=16)
    offsets = [off for _, off in packed["tensors"]]
    _common.all_ranks_agree(env, offsets == [0, 16, 48, 64], "maybe_get_tensors offsets")
    views = [raw.view(dtype) for (raw, _), (_, dtype) in zip(packed["tensors"], specs)]
    _common.all_ranks_agree(env, [v.numel() for v in views] == [n for n, _ in specs],
                            "maybe_get_tensors sizes")
    names = [(n, str(d).removeprefix('torch.')) for n, d in specs]
    _common.log(env, f"  maybe_get_tensors({names}, alignment=16) -> byte offsets {offsets}")


def scratch_rule(env, buf) -> None:
    """Each call lays out from byte 0: a later view aliases an earlier one."""
    first = buf.maybe_get_tensor((4,), torch.float32)["tensor"]
    first.fill_(1.0)
    second = buf.maybe_get_tensor((2, 2), torch.float32)["tensor"]
    second.fill_(2.0)
    aliased = first.data_ptr() == second.data_ptr() and bool((first == 2.0).all())
    _common.all_ranks_agree(env, aliased, "scratch aliasing")
    _common.log(env, "  scratch rule: a second maybe_get_tensor view starts at byte 0 too; the "
                     "first view now reads 2.0 (copy out what must outlive the next call)")


def zero_copy_collectives(env, buf, n: int, dtype) -> None:
    """Reduce-scatter from, and all-gather into, packed views of the buffer (no staging copy),
    checked against torch.distributed."""
    world = env.world_size
    packed = buf.maybe_get_tensors([(world * n, dtype), (world * n, dtype)], alignment=16)
    (rs_raw, rs_off), (ag_raw, ag_off) = packed["tensors"]
    rs_in, ag_out = rs_raw.view(dtype), ag_raw.view(dtype)
    rs_in.copy_(_common.rank_tagged(world * n, dtype, env.rank, env))  # e.g. a matmul's out=
    shard = torch.empty(n, dtype=dtype, device=env.device)
    st.reduce_scatter_tensor(shard, rs_in, env.group)      # zero-copy input
    st.all_gather_into_tensor(ag_out, shard, env.group)    # zero-copy output
    _common.synchronize(env)

    ref_shard = torch.empty_like(shard)
    dist.reduce_scatter_tensor(ref_shard, _common.rank_tagged(world * n, dtype, env.rank, env),
                               group=env.group)
    ref = torch.empty(world * n, dtype=dtype, device=env.device)
    dist.all_gather_into_tensor(ref, ref_shard, group=env.group)
    _common.all_ranks_agree(env, torch.equal(shard, ref_shard) and torch.equal(ag_out, ref),
                            "zero-copy reduce-scatter + all-gather")
    _common.log(env, f"  zero-copy: reduce_scatter_tensor from byte {rs_off}, "
                     f"all_gather_into_tensor into byte {ag_off}: equal to torch.distributed "
                     f"(checked, not timed; {_common.baseline(env)})")


def main() -> None:
    p = _common.parser(__doc__.split("\n\n", 1)[0], timing=False)
    p.add_argument("--numel", type=_common.positive_int, default=4096,
                   help="elements per rank in the collective part (default %(default)s)")
    args = p.parse_args()
    env = _common.init_distributed()
    dtype = _common.dtype_of(args, env)

    buf = _common.buffer(env, args)
    again = st.SymmetricMemoryManager.get_buffer(_common.BUFFER_KEY)  # cached: no group needed
    cached = again is buf and st.SymmetricMemoryManager.is_initialized(_common.BUFFER_KEY)
    _common.all_ranks_agree(env, cached, "get_buffer cache")
    _common.log(env, f"symmetric_buffers {env.describe()}: {buf!r}")
    if buf.symm_mem_hdl is None:
        none_form = buf.maybe_get_tensor((1,), dtype) == {"tensor": None, "handle": None}
        _common.all_ranks_agree(env, none_form, "None form")
        _common.log(env, f"  symmetric memory unavailable ({buf.init_failure_reason}): the maybe_* "
                         "calls return None forms and collectives fall back to torch.distributed")
    else:
        got = buf.maybe_get_tensor((8, 16), dtype)
        _common.log(env, f"  maybe_get_tensor((8, 16), {dtype}) -> tensor "
                         f"{tuple(got['tensor'].shape)} "
                         f"at byte 0, handle rank {got['handle'].rank}/{got['handle'].world_size}")
        too_big = buf.maybe_get_tensor((buf.nbytes + 1,), torch.uint8)
        _common.all_ranks_agree(env, too_big["tensor"] is None and too_big["handle"] is None,
                                "too large a request")
        _common.log(env, f"  maybe_get_tensor of {buf.nbytes + 1} bytes -> None form "
                         "(does not fit)")
        packing(env, buf)
        scratch_rule(env, buf)
        zero_copy_collectives(env, buf, args.numel, dtype)
    st.SymmetricMemoryManager.destroy(_common.BUFFER_KEY)
    _common.all_ranks_agree(env, not st.SymmetricMemoryManager.is_initialized(_common.BUFFER_KEY),
                            "destroy")
    _common.log(env, "symmetric_buffers: all checks passed")
    _common.finish(env)


if __name__ == "__main__":
    _common.main_guard(main)
