"""The ceiling of SM-driven stores across GPUs: 512 MiB (``--mib``) copied into the next rank's
symmetric buffer by a Triton kernel (every rank at once, as in a collective), over block sizes,
warps, grids, load eviction policies and store cache modifiers, against the copy engine
(``tensor.copy_`` into the peer's buffer, the bench's "peer copy" ceiling). Prints GB/s of the
slowest rank per variant.

Measured on 2x H200 (NV18), one rank per GPU
(benchmarks/results/archive/2026-11-26_03dcc40/sm_store_ceiling_h200x2_w2.txt):
the copy engine 387.5 GB/s, every SM variant 362.6-365.0 GB/s (93.6-94.2% of it), whatever the
block, warps, grid or cache hints: the all-gather's 363.4 GB/s bus bandwidth at 1 GiB is this
ceiling.

Run (multicast off, as on every GPU machine here):

    TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 \\
        python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        benchmarks/sm_store_ceiling.py [--mib 512]
"""
import argparse
import sys

import torch
import torch.distributed as dist
import torch.distributed._symmetric_memory as symm_mem
import triton
import triton.language as tl


@triton.jit
def copy_kernel(src_ptr, dst_addr, n, BLOCK: tl.constexpr, LOAD_EVICT: tl.constexpr,
                STORE_CM: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    dst = dst_addr.to(tl.pointer_type(tl.bfloat16))
    dst = tl.multiple_of(dst, 16)
    c = pid
    while c * BLOCK < n:
        offs = c.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(src_ptr + offs, eviction_policy=LOAD_EVICT)
        tl.store(dst + offs, v, cache_modifier=STORE_CM)
        c += nprog


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, default=512,
                   help="MiB copied per variant (default %(default)s)")
    args = p.parse_args(argv)
    if args.mib < 1:
        p.error(f"--mib must be >= 1, got {args.mib}")
    if not torch.cuda.is_available():
        sys.exit("sm_store_ceiling.py needs one CUDA GPU per rank (NCCL group, torchrun)")
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank)
    nbytes = args.mib << 20
    buf = symm_mem.empty(nbytes // 2, dtype=torch.bfloat16, device=f"cuda:{rank}")
    hdl = symm_mem.rendezvous(buf, dist.group.WORLD.group_name)
    peer = (rank + 1) % world
    dst_addr = hdl.buffer_ptrs[peer]
    peer_t = hdl.get_buffer(peer, (nbytes // 2,), torch.bfloat16)
    src = torch.randn(nbytes // 2, device="cuda", dtype=torch.bfloat16)
    n = src.numel()
    variants = [("ce", None)]
    for block_bytes, warps, grid in ((16384, 8, 264), (65536, 16, 264), (16384, 8, 132),
                                     (32768, 8, 264), (8192, 4, 528)):
        for ev, cm in (("", ""), ("evict_first", ""), ("", ".cs"), ("evict_first", ".cs"),
                       ("", ".wt")):
            variants.append((f"sm b{block_bytes} w{warps} g{grid} {ev or '-'} {cm or '-'}",
                             (block_bytes // 2, warps, grid, ev, cm)))
    for name, v in variants:
        def op():
            if v is None:
                peer_t.copy_(src)
            else:
                block, warps, grid, ev, cm = v
                copy_kernel[(grid,)](src, dst_addr, n, BLOCK=block, LOAD_EVICT=ev, STORE_CM=cm,
                                     num_warps=warps)
        for _ in range(3):
            op()
        torch.cuda.synchronize()
        dist.barrier()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(10):
            op()
        e.record()
        torch.cuda.synchronize()
        t = s.elapsed_time(e) / 10 * 1e-3
        gbs = torch.tensor([nbytes / t / 1e9], device="cuda")
        dist.all_reduce(gbs, op=dist.ReduceOp.MIN)
        if rank == 0:
            print(f"{name:40s} {gbs.item():7.1f} GB/s", flush=True)
        dist.barrier()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
