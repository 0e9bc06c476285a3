"""All-gather time per call (CUDA graph) against the grid, with the barrier timeout on and off.

Every block of every rank runs the barrier, so its per-poll cost multiplies by the grid; this
shows it. Run on every rank, e.g. several ranks on one GPU under MPS:

    torchrun --nproc-per-node 2 benchmarks/barrier_probe.py
"""

import argparse

import torch
import torch.distributed as dist

import symmtriton as st
from symmtriton.config import LaunchConfig
from symmtriton.timing import graph_time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1024,1048576", help="all-gather output bytes, comma list")
    p.add_argument("--grids", default="1,4,16,32", help="grid bounds (max_blocks), comma list")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    buf = st.SymmetricMemoryManager.get_buffer("probe", dist.group.WORLD, size_mb=64)
    rows = []
    for nbytes in (int(s) for s in args.sizes.split(",")):
        n = nbytes // 2 // world
        out = buf.maybe_get_tensor((world * n,), torch.bfloat16)["tensor"]
        x = torch.ones(n, dtype=torch.bfloat16, device=dev)
        seen = set()
        for bound in (int(g) for g in args.grids.split(",")):
            cfg = LaunchConfig(256 if nbytes < 4096 else 2048, 4, bound)
            grid = cfg.grid(n, buf.symm_mem_hdl.grid_limit or bound)
            if grid in seen:
                continue
            seen.add(grid)
            times = []
            for timeout_s in (None, 0):
                t = graph_time(lambda: st.all_gather_into_tensor(out, x, config=cfg, timeout_s=timeout_s),
                               iters=10, warmup=2, graph_iters=10, device=dev, group=dist.group.WORLD)
                times.append(t * 1e6)
            rows.append((nbytes, grid, *times))
    if rank == 0:
        print(f"# W={world} {torch.cuda.get_device_name()}: all-gather bf16, us per call in a CUDA graph")
        print(f"{'bytes':>10} {'grid':>5} {'timeout on':>11} {'timeout off':>12}")
        for nbytes, grid, on, off in rows:
            print(f"{nbytes:>10} {grid:>5} {on:>11.2f} {off:>12.2f}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
