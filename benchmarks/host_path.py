"""Host path probe: what an eager call costs on the host, layer by layer, before the kernel runs.

An eager collective is host-bound at small sizes (the aim: at most 12 us per call on the host), so
this measures the Python layers every call crosses, each timed alone on its own operands:

  ``sequenced`` wrapper (symmtriton/_calls.py: ``is_compiling()``) -> public function ->
  ``driver.call``: ``resolve_group``, ``op.key``, ``get_plan``, the uniform-check switch, then
  ``plan.run``: ``choice.current()`` (the tuned config still holds) -> ``Launch.launch``: the
  buffer's status word, then Triton's launcher.

Rows are microseconds per call, the best of ``--repeats`` batches of ``--calls`` calls (host
timing noise only adds). Every Python row runs with the kernel launch replaced by a no-op (the
plan's launcher answers "launched"; the status-word checks stay), so it is the cost of our layers
alone; "loop" is the empty timing loop, included in every row. Then one row per public
collective: the same no-op call through its public function. On a GPU (``cuda`` backend, one
rank per GPU) each op's row adds:

  real eager  ``--calls`` real calls, one ``torch.cuda.synchronize`` at the end: wall time per
              call (the larger of the host's and the GPU's rate)
  direct      the launcher our plans call alone (``launch._direct_launcher``'s closure: device
              check, current stream, Triton's C entry point)
  C launch    Triton's compiled C launcher alone (``launch.raw_launcher``), the floor
  ours        real eager - C launch: everything above Triton's own launcher (target <= 3 us)
  fn.run      Triton's ``JITFunction.run`` of the same kernel (the normal path)

direct, C launch and fn.run synchronise between batches, untimed, so a launch never waits for a
full launch queue: they are host costs.

Run (rank 0 prints; the other ranks time too, concurrently):

    # CPU (host backend, Triton interpreter): starts a gloo world of 2 itself
    python benchmarks/host_path.py
    # 2 GPUs, one rank per GPU, NCCL group
    TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 \\
        python -m torch.distributed.run --nproc-per-node 2 benchmarks/host_path.py
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

import symmtriton as st
from symmtriton import env, launch
from symmtriton.launch import Launch
from symmtriton.memory import resolve_group
from symmtriton.ops import driver
from symmtriton.ops._operands import Flat
from symmtriton.ops.all_gather import OP as AG
from symmtriton.tools import testing
from symmtriton.tools.bench import cli

#: public collectives timed end to end; shapes are built by :func:`_cases`.
OPS = ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce",
       "reduce_scatter_add_rmsnorm_all_gather", "reduce_scatter_add_rmsnorm",
       "all_reduce_add_rmsnorm", "all_gather_v", "reduce_scatter_v")


def per_call_us(fn, calls: int, repeats: int, between=None) -> float:
    """Best of ``repeats`` batches: microseconds per call of ``fn()``; ``between()`` runs after
    each batch, untimed (a GPU sync, so launches never wait for a full launch queue)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - t0)
        if between is not None:
            between()
    return best / calls * 1e6


def _launches(plan) -> list:
    return [v for v in vars(plan).values() if isinstance(v, Launch)]


def _noop(var=None) -> bool:
    return True


class _NoLaunch:
    """Within: the plan's launches answer "launched" without launching (status checks stay)."""

    def __init__(self, plan):
        self.kls = _launches(plan)

    def __enter__(self):
        self.saved = [(kl._fast, kl._fast_tried) for kl in self.kls]
        for kl in self.kls:
            kl._fast, kl._fast_tried = _noop, True

    def __exit__(self, *exc):
        for kl, (fast, tried) in zip(self.kls, self.saved):
            kl._fast, kl._fast_tried = fast, tried


def _cases(nbytes: int, world: int, rank: int, dtype, dev) -> dict:
    """name -> the public call (a no-argument function) for a shard of ``nbytes`` per rank."""
    n = max(nbytes // dtype.itemsize, 1)
    H = 256 if n >= 256 else n
    rows = max(n // H, 1) * world  # fused input [rows, H]: each rank's output shard is n elements
    ag_in = torch.ones(n, dtype=dtype, device=dev)
    ag_out = torch.empty(n * world, dtype=dtype, device=dev)
    rs_in = torch.ones(n * world, dtype=dtype, device=dev)
    rs_out = torch.empty(n, dtype=dtype, device=dev)
    ar = torch.ones(n, dtype=dtype, device=dev)
    x = torch.ones(rows, H, dtype=dtype, device=dev)
    res_s = torch.zeros(rows // world, H, dtype=dtype, device=dev)
    res_f = torch.zeros(rows, H, dtype=dtype, device=dev)
    w = torch.ones(H, dtype=dtype, device=dev)
    out_f = torch.empty(rows, H, dtype=dtype, device=dev)
    out_s = torch.empty(rows // world, H, dtype=dtype, device=dev)
    counts = torch.full((world,), n, dtype=torch.int32, device=dev)
    return {
        "all_gather_into_tensor": lambda: st.all_gather_into_tensor(ag_out, ag_in),
        "reduce_scatter_tensor": lambda: st.reduce_scatter_tensor(rs_out, rs_in),
        "all_reduce": lambda: st.all_reduce(ar),
        "reduce_scatter_add_rmsnorm_all_gather":
            lambda: st.reduce_scatter_add_rmsnorm_all_gather(x, res_s, w, out=out_f),
        "reduce_scatter_add_rmsnorm": lambda: st.reduce_scatter_add_rmsnorm(x, res_s, w, out=out_s),
        "all_reduce_add_rmsnorm": lambda: st.all_reduce_add_rmsnorm(x, res_f, w, out=out_f),
        "all_gather_v": lambda: st.all_gather_v(ag_out, ag_in, counts),
        "reduce_scatter_v": lambda: st.reduce_scatter_v(rs_out, rs_in, counts),
    }, Flat(ag_out, ag_in)


def _layers(ag_args, calls: int, repeats: int) -> list:
    """(row, us) for the all-gather path split by layer (no-op launch)."""
    out, inp = ag_args.output, ag_args.input
    pub = st.all_gather_into_tensor
    group = resolve_group(None, "group")
    key = AG.key(group, None, None, ag_args)
    plan = driver.get_plan(key)
    kl = plan.kernel
    rows = [
        ("loop (empty lambda)", lambda: None),
        ("all_gather_into_tensor (all layers)", lambda: pub(out, inp)),
        ("  without sequenced", lambda: pub.__wrapped__(out, inp)),
        ("  is_compiling()", torch.compiler.is_compiling),
        ("  driver.call", lambda: driver.call(AG, None, None, None, ag_args)),
        ("    group=None -> WORLD", lambda: driver._GroupMember.WORLD),
        ("    op.key", lambda: AG.key(group, None, None, ag_args)),
        ("    get_plan", lambda: driver.get_plan(key)),
        ("    env.check_uniform()", env.check_uniform),
        ("    plan.run", lambda: plan.run(ag_args, None)),
        ("      choice.current", plan.choice.current),
        ("      Launch.launch (status word)", kl.launch),
    ]
    with _NoLaunch(plan):
        return [(name, per_call_us(fn, calls, repeats)) for name, fn in rows]


def measure(rank: int, world: int, nbytes: int, calls: int, repeats: int, ops) -> str:
    """Every rank times; returns the report text (rank 0's is printed)."""
    dev = testing.device()
    on_gpu = dev.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    cases, ag_args = _cases(nbytes, world, rank, dtype, dev)
    plans = {}
    for name in ops:  # first call: validate, plan, compile, launch (the interpreter on the CPU)
        cases[name]()
        cases[name]()  # the GPU's second launch builds the direct launcher
        plans[name] = driver.last_plan()
    testing.sync()
    dist.barrier()
    lines = [f"host path, {dev.type} backend, W={world}, {nbytes} B per rank shard, "
             f"{dtype}, best of {repeats} x {calls} calls, rank {rank}; us per call", ""]
    cases["all_gather_into_tensor"]()  # the plan _layers reads is the all-gather's
    lines += [f"{name:<44}{us:8.2f}" for name, us in _layers(ag_args, calls, repeats)]
    lines += ["", f"{'op':<40}{'no-op launch':>13}" +
              (f"{'real eager':>12}{'direct':>10}{'C launch':>10}{'ours':>8}{'fn.run':>9}"
               if on_gpu else "")]
    for name in ops:
        with _NoLaunch(plans[name]):
            noop = per_call_us(cases[name], calls, repeats)
        row = f"{name:<40}{noop:13.2f}"
        if on_gpu:
            row += _gpu_row(cases[name], plans[name], calls, repeats)
        lines.append(row)
    dist.barrier()
    return "\n".join(lines)


def _gpu_row(call, plan, calls: int, repeats: int) -> str:
    """Real eager calls (one sync per batch, timed), then, synchronised between batches
    (untimed): the plan's direct launcher alone, Triton's C launcher alone, JITFunction.run."""
    sync = torch.cuda.synchronize

    def eager():
        for _ in range(calls):
            call()
        sync()
    dist.barrier()
    real = per_call_us(eager, 1, repeats) / calls
    kls = _launches(plan)
    kl = kls[0] if kls else None
    if kl is None or kl._fast is None:
        return f"{real:12.2f}" + "".join(f"{'-':>{w}}" for w in (10, 10, 8, 9))
    # every rank launches the same kernels the same number of times (they pair in barriers)
    fast, grid = kl._fast, (kl.grid,)
    direct = per_call_us(lambda: fast(None), calls, repeats, sync)

    def jit_run():
        return kl.fn.run(*kl.args, grid=grid, warmup=False, num_warps=kl.num_warps, **kl.constexprs)
    run = per_call_us(jit_run, calls, repeats, sync)
    kern = jit_run()
    raw = launch.raw_launcher(kern)
    c_us = float("nan")
    if raw is not None:
        c_launch, coop, pdl = raw
        args, stream = launch.bound_args(kl), torch.cuda.current_stream().cuda_stream
        fn_, packed = kern.function, kern.packed_metadata
        c_us = per_call_us(lambda: c_launch(kl.grid, 1, 1, stream, fn_, coop, pdl, None, None,
                                            packed, None, None, None, *args),
                           calls, repeats, sync)
    sync()
    dist.barrier()
    return f"{real:12.2f}{direct:10.2f}{c_us:10.2f}{real - c_us:8.2f}{run:9.2f}"


def _worker(rank: int, world: int, *args) -> str:
    return measure(rank, world, *args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bytes", type=int, default=4096, help="bytes per rank's shard (default 4096)")
    p.add_argument("--calls", type=int, default=500, help="calls per batch (default 500)")
    p.add_argument("--repeats", type=int, default=20,
                   help="batches; the best counts (default 20: short batches, so a busy host "
                        "spoils a few, not the row)")
    p.add_argument("--ops", default=",".join(OPS), help="comma list of public collectives")
    p.add_argument("--world", type=int, default=2, help="ranks when not under torchrun")
    args = p.parse_args()
    ops = [o for o in args.ops.split(",") if o]
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise ValueError(f"--ops: unknown {unknown}; choose from {', '.join(OPS)}")
    ops = ["all_gather_into_tensor"] + [o for o in ops if o != "all_gather_into_tensor"]
    cuda = env.backend() != "host" and torch.cuda.is_available()
    calls = args.calls
    if "RANK" in os.environ:  # under torchrun
        group, created = cli.init_distributed()
        try:
            text = measure(dist.get_rank(), dist.get_world_size(), args.bytes, calls,
                           args.repeats, ops)
            if dist.get_rank() == 0:
                print(text, flush=True)
        finally:
            testing.teardown(destroy_group=created)
        return
    if cuda and torch.cuda.device_count() >= args.world:
        out = testing.run_distributed(_worker, args.world, args.bytes, calls, args.repeats, ops,
                                      env=testing.GPU_PER_RANK_ENV, timeout=600,
                                      dist_backend="nccl", one_rank_per_gpu=True)
    else:
        out = testing.run_distributed(_worker, args.world, args.bytes, calls, args.repeats, ops,
                                      env=testing.CPU_ENV, timeout=600)
    print(out[0], flush=True)


if __name__ == "__main__":
    main()
