"""Set-up the examples share: command-line flags, the process group from torchrun's
environment, the device, timing and the rank-0 report.

Each example runs as ``torchrun --nproc-per-node=N examples/<name>.py [flags]`` (from the
repository root; ``python examples/<name>.py`` alone runs one rank). Where things run:

* GPU: one rank per GPU, an NCCL process group, symmetric memory from PyTorch (``cuda``
  backend).
* Several ranks on one GPU (N larger than the visible GPUs): a gloo process group (NCCL refuses
  such groups) and ``TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1`` (set here when unset), which
  PyTorch's symmetric memory needs to rendezvous several processes on one device. Start MPS for
  meaningful timings: without it the processes time-slice the GPU.
* No GPU, or ``SYMMTRITON_BACKEND=host``: CPU tensors in POSIX shared memory (``host``
  backend), a gloo process group, and the same Triton kernels in the Triton interpreter
  (``import symmtriton`` sets ``TRITON_INTERPRET=1``). Slow, but exact: use small sizes.

Timings: each example times symmtriton next to torch.distributed on the same process group,
the baseline, and says what that runs on. It quotes a speed-up only where the two compare like
for like: one rank per GPU with an NCCL group. With ranks sharing one GPU (the baseline on gloo,
a CPU transport) or on the CPU host backend (symmtriton in the Triton interpreter) it prints
both times and says why they do not compare.

On machines with NVLink multicast hardware that must not use it, export
``TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1``.

Every example ends with :func:`finish` (``symmtriton.tools.testing.teardown``): CUDA graphs
made with :func:`cuda_graph` are reset first (a graph that captured an NCCL collective keeps its
communicator alive, and destroying the process group would wait for it forever), then the
symmetric buffers are destroyed, then the process group.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

import symmtriton as st
from symmtriton.backends import backend_device, select_backend
from symmtriton.tools.testing import OVERLAP_ENV, teardown

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
#: the default buffer key of the examples
BUFFER_KEY = "examples"


@dataclass(frozen=True)
class Env:
    """Where this rank runs."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    group: dist.ProcessGroup
    dist_backend: str  #: "nccl" or "gloo"
    shared_gpu: bool = False  #: more ranks on this node than GPUs: they share one

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> str:
        where = (torch.cuda.get_device_name(self.device) if self.on_gpu
                 else "cpu (host backend, Triton interpreter)")
        return f"world={self.world_size} {self.dist_backend} {where}"


# -- flags --------------------------------------------------------------------------------------
def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def parser(description: str, *, timing: bool = True, iters: int = 20,
           warmup: int = 3) -> argparse.ArgumentParser:
    """An argument parser with the flags the examples share: ``--dtype``, ``--buffer-mb`` and,
    with ``timing``, ``--iters`` and ``--warmup``. The launch notes of this module go into
    ``--help``."""
    p = argparse.ArgumentParser(
        description=description, epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="element type (auto: bfloat16 on GPU, float32 on CPU)")
    if timing:
        p.add_argument("--iters", type=positive_int, default=iters,
                       help="timed iterations (default %(default)s)")
        p.add_argument("--warmup", type=non_negative_int, default=warmup,
                       help="untimed iterations first (default %(default)s)")
    p.add_argument("--buffer-mb", type=positive_int, default=64,
                   help="symmetric buffer size in MiB (default %(default)s)")
    return p


def dtype_of(args, env: Env) -> torch.dtype:
    """``--dtype``, with ``auto`` resolved for the device."""
    if args.dtype == "auto":
        return torch.bfloat16 if env.on_gpu else torch.float32
    return DTYPES[args.dtype]


def pick(value, env: Env, gpu_default, cpu_default):
    """``value`` unless it is ``None``; else the default for where this rank runs."""
    if value is not None:
        return value
    return gpu_default if env.on_gpu else cpu_default


# -- process group --------------------------------------------------------------------------------
def init_distributed() -> Env:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``MASTER_PORT``; a one-rank group when they are absent) on the device
    symmtriton's backend uses: NCCL for one rank per GPU, gloo for CPU or several ranks per GPU."""
    under_torchrun = "RANK" in os.environ
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    # torch >= 2.11 deprecates the *_tensor collectives' names; the examples keep the names
    # every supported torch has.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated",
                            category=FutureWarning)
    backend = select_backend()
    shared_gpu = False
    if backend == "cuda":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        shared_gpu = local_world > torch.cuda.device_count()
        if shared_gpu:
            os.environ.setdefault(OVERLAP_ENV, "1")
        dist_backend = "gloo" if shared_gpu else "nccl"
    else:
        dist_backend = "gloo"
    device = backend_device(backend)
    dist.init_process_group(dist_backend, rank=rank, world_size=world,
                            store=None if under_torchrun else dist.HashStore(),
                            device_id=device if dist_backend == "nccl" else None)
    env = Env(rank, world, local_rank, device, dist.group.WORLD, dist_backend, shared_gpu)
    _ENV[:] = [env]
    return env


#: the graphs :func:`cuda_graph` made; :func:`finish` resets them before anything else goes.
_GRAPHS: list = []
#: this process's :class:`Env` (set by :func:`init_distributed`), for :func:`main_guard`.
_ENV: list = []


def cuda_graph() -> torch.cuda.CUDAGraph:
    """A new ``torch.cuda.CUDAGraph`` that :func:`finish` resets before it destroys the
    symmetric buffers and the process group."""
    graph = torch.cuda.CUDAGraph()
    _GRAPHS.append(graph)
    return graph


def finish(env: Env) -> None:
    """Reset the graphs of :func:`cuda_graph`, free every symmetric buffer, leave the process
    group (``symmtriton.tools.testing.teardown``: synchronize, graphs, buffers, CUDA cache, barrier,
    ``destroy_process_group``). Every rank calls it after its last collective."""
    graphs = list(_GRAPHS)
    _GRAPHS.clear()
    teardown(*graphs, group=env.group)


def main_guard(main) -> None:
    """Run ``main()``. On a failed check (every rank raises it: the check is agreed) tear down
    as :func:`finish` does and exit with status 1; on any other error print the traceback and
    exit at once with status 1 (peers may be waiting in a collective that will not come, so no
    barrier: torchrun then stops the other ranks)."""
    try:
        main()
    except CheckFailed as exc:
        print(f"rank {os.environ.get('RANK', 0)}: {exc}", file=sys.stderr, flush=True)
        if _ENV:
            finish(_ENV[0])
        sys.exit(1)
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


# -- reporting and checks --------------------------------------------------------------------------
class CheckFailed(RuntimeError):
    """A result did not match its reference (on any rank)."""


def log(env: Env, message: str) -> None:
    """Print on rank 0."""
    if env.rank == 0:
        print(message, flush=True)


def all_ranks_agree(env: Env, ok: bool, what: str) -> None:
    """Raise :class:`CheckFailed` on every rank when ``ok`` is false on any rank."""
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32,
                        device=env.device if env.dist_backend == "nccl" else "cpu")
    dist.all_reduce(flag, group=env.group)
    if int(flag.item()):
        raise CheckFailed(f"{what}: mismatch on {int(flag.item())} of {env.world_size} ranks")


def max_over_ranks(env: Env, value: float) -> float:
    """The largest ``value`` over the ranks (timings: the slowest rank)."""
    t = torch.tensor([value], dtype=torch.float64,
                     device=env.device if env.dist_backend == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=env.group)
    return float(t.item())


def rank_tagged(numel: int, dtype: torch.dtype, rank: int, env: Env, salt: int = 0) -> torch.Tensor:
    """Small rank-dependent integers (|v| <= 6): their sums over ranks are exact in every float
    type, so a reduction's result can be compared bit for bit."""
    idx = torch.arange(numel, dtype=torch.int64, device=env.device)
    return ((idx * 7 + rank + 5 * salt) % 13 - 6).to(dtype)


# -- timing -------------------------------------------------------------------------------------
def synchronize(env: Env) -> None:
    if env.on_gpu:
        torch.cuda.synchronize(env.device)


def time_per_call(env: Env, fn, iters: int, warmup: int) -> float:
    """Seconds per call of ``fn`` (the slowest rank's mean over ``iters`` calls, after
    ``warmup`` calls and a barrier)."""
    for _ in range(warmup):
        fn()
    synchronize(env)
    dist.barrier(group=env.group)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(env)
    return max_over_ranks(env, (time.perf_counter() - start) / iters)


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us"


# -- the baseline --------------------------------------------------------------------------------
def baseline(env: Env) -> str:
    """What the torch.distributed side of the comparison runs on, in words."""
    if env.dist_backend == "nccl":
        return "baseline: torch.distributed on an NCCL group (GPU to GPU)"
    if env.on_gpu:
        return ("baseline: torch.distributed on a gloo group (CPU transport: GPU tensors go "
                "through host memory)")
    return "baseline: torch.distributed on a gloo group (CPU transport)"


def not_comparable(env: Env) -> list[str]:
    """Why symmtriton's times and the baseline's do not compare like for like here (empty: they
    do, one rank per GPU and the baseline on NCCL)."""
    why = []
    if not env.on_gpu:
        why.append("CPU host backend: symmtriton's kernels run in the Triton interpreter")
    if env.shared_gpu:
        why.append(f"{env.world_size} ranks share one GPU")
    if env.on_gpu and env.dist_backend != "nccl":
        why.append("the baseline moves data through the CPU (gloo), symmtriton through GPU memory")
    return why


def versus_baseline(env: Env, ours: dict, theirs: float) -> str:
    """The line that follows a timing: :func:`baseline`, then each of ``ours`` (name ->
    seconds) as a speed-up over ``theirs`` (seconds) where the comparison is like for like,
    else a note saying why no ratio is given (both times are printed already)."""
    why = not_comparable(env)
    if why:
        return f"  {baseline(env)}; times not comparable, no ratio given: {'; '.join(why)}"
    ratios = ", ".join(f"{name} {theirs / t:.2f}x" for name, t in ours.items())
    return f"  {baseline(env)}; speed-up over it: {ratios}"


def buffer(env: Env, args) -> st.SymmetricMemoryBuffer:
    """The examples' symmetric buffer on ``env.group`` (``--buffer-mb``); collectives on the
    group use it (``SymmetricMemoryManager.buffer_for_group``)."""
    return st.SymmetricMemoryManager.get_buffer(BUFFER_KEY, process_group=env.group,
                                                size_mb=args.buffer_mb)


def compare_variants(env: Env, args, title: str, variants: dict, expect: torch.Tensor,
                     reference) -> None:
    """Check and time the ways of running one collective; print on rank 0 one line of times
    and one of :func:`versus_baseline`.

    ``variants`` maps a name to a function that runs the collective and returns its result (or
    to ``None`` when that way is unavailable); each result must equal ``expect`` bit for bit on
    every rank. ``reference`` runs the same collective through ``torch.distributed`` (timed
    too). Raises :class:`CheckFailed` on a mismatch."""
    parts, times = [], {}
    for name, fn in variants.items():
        if fn is None:
            parts.append(f"{name} unavailable")
            continue
        got = fn()
        synchronize(env)
        all_ranks_agree(env, torch.equal(got, expect), f"{title} {name}")
        times[name] = time_per_call(env, fn, args.iters, args.warmup)
        parts.append(f"{name} {us(times[name])}")
    theirs = time_per_call(env, reference, args.iters, args.warmup)
    parts.append(f"torch.distributed {us(theirs)}")
    log(env, f"{title}: {', '.join(parts)}; results match torch.distributed")
    log(env, versus_baseline(env, times, theirs))
