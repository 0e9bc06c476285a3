"""Run a function on every rank of a real multi-process group, and tear a finished program down:
the one launcher and the one teardown the tests, benchmarks, examples and GPU scripts share.

:class:`WorkerPool` spawns ``world_size`` processes once, each joins a process group, and then
runs submitted functions ``fn(rank, world_size, *args)`` until closed, so tests pay process and
import start-up once per world size, not per test. A function that raises on any rank fails the
call with every rank's traceback; a call that does not finish within ``timeout`` seconds kills
the pool (it restarts on the next call) and raises :class:`TimeoutError` naming the ranks that
did not answer.

Where the workers run: CPU (:data:`CPU_ENV`: host backend, Triton interpreter, gloo group);
several ranks sharing GPU 0 (:data:`GPU_ENV`: gloo group, since NCCL refuses such groups, and
``TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1``); or one rank per GPU
(:data:`GPU_PER_RANK_ENV` with ``one_rank_per_gpu=True``: rank ``r`` on GPU ``r``, an NCCL or a
gloo group, and the overlapping-devices variable removed).

Functions must be importable by name (module-level); their module is imported in the workers.
They build their operands with :func:`device`, :func:`tagged` and :func:`sync` (the bench's
workloads too) and pin the synchronisation protocol with :func:`protocol`.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import os
import queue
import socket
import sys
import time
import traceback

import torch
import torch.distributed as dist

from symmtriton import env as _env
from symmtriton.backends import backend_device, select_backend
from symmtriton.memory import SymmetricMemoryManager
from symmtriton.ops.driver import clear_plans

#: lets several processes rendezvous symmetric memory on one GPU (torch then skips multicast).
OVERLAP_ENV = "TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES"
#: environment for CPU workers: host backend + Triton interpreter.
CPU_ENV = {"SYMMTRITON_BACKEND": "host", "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
#: environment for workers with one GPU each (multicast off: docs/ARCHITECTURE.md, "GPU machines").
GPU_PER_RANK_ENV = {
    "SYMMTRITON_BACKEND": "cuda",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NCCL_NVLS_ENABLE": "0",
    "NVSHMEM_DISABLE_NVLS": "1",
}
#: environment for workers that share GPU 0 (several ranks per GPU allowed, multicast off).
GPU_ENV = {**GPU_PER_RANK_ENV, OVERLAP_ENV: "1"}
#: when set (to anything), :func:`teardown` prints ``symmtriton-exit-mark <unix time>`` on
#: stderr as it starts, so a script can measure how long a program takes to exit after its
#: last operation (benchmarks/gpu_run.sh).
EXIT_MARK_ENV = "SYMMTRITON_EXIT_MARK"
#: seconds :func:`teardown` sleeps (GIL released) after its barrier: gloo's worker thread frees
#: the barrier's work (and the works it waited on, whose tensors have Python objects) only after
#: waking the caller, and it needs the GIL for that; if the interpreter is finalizing by then,
#: the thread exits inside a destructor and the process aborts ("terminate called without an
#: active exception"; gdb: ``~AsyncBarrierWork`` -> ``decref_pyobject`` -> ``take_gil`` ->
#: ``pthread_exit`` in ``ProcessGroupGloo::runLoop``). examples/symmetric_buffers.py on the host
#: backend (torch 2.13, 2 CPU cores, ``PYTHONFAULTHANDLER=1``): 4 of 40 runs aborted without the
#: pause, 0 of 40 with it.
GLOO_DRAIN_S = 0.05
DIST_BACKENDS = ("gloo", "nccl")



# -- operands and plans for the functions the workers run ---------------------------------------
def device():
    """The device this worker's collectives use (the backend's)."""
    return backend_device(select_backend())


def tagged(numel: int, dtype, rank: int, salt: int = 0, *, bound: int = 6):
    """Rank-tagged integer values in ``[-bound, bound]``: sums over up to ``(256 // bound)``
    ranks stay exact in bf16, fp16 and fp32, so reductions can be checked exactly.

    Element ``i`` is ``(7 i + rank + 5 salt) mod (2 bound + 1) - bound``: periodic in ``i``,
    so one period is built and tiled on the device (no ``numel``-sized int64 temporaries: the
    bench fills GiB-sized operands with it)."""
    period = 2 * bound + 1
    one = torch.arange(period, dtype=torch.int64, device="cpu")
    one = (one * 7 + rank + 5 * salt) % period - bound
    return one.to(dtype).to(device()).repeat(-(-numel // period))[:numel]


def sync():
    """Wait for this worker's GPU work (nothing to wait for on the CPU)."""
    if torch.cuda.is_available() and device().type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def protocol(mode: str):
    """Plan the calls inside with ``$SYMMTRITON_PROTOCOL=mode`` (``lines``, ``barrier``, ``auto``),
    then restore it; the plans are dropped on entry and exit, so each side plans afresh."""
    old = os.environ.get(_env.PROTOCOL)
    os.environ[_env.PROTOCOL] = mode
    clear_plans()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_env.PROTOCOL, None)
        else:
            os.environ[_env.PROTOCOL] = old
        clear_plans()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(rank: int, world_size: int, port: int, env: dict, dist_backend: str,
                 one_rank_per_gpu: bool, tasks, results) -> None:
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dev = None
    if one_rank_per_gpu:
        dev = torch.device("cuda", rank)
    elif env.get("SYMMTRITON_BACKEND") == "cuda":
        dev = torch.device("cuda", 0)
    if dev is not None:
        torch.cuda.set_device(dev)
    dist.init_process_group(dist_backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size,
                            device_id=dev if dist_backend == "nccl" else None)
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            out = (rank, True, fn(rank, world_size, *args))
        except BaseException:  # report, keep serving
            out = (rank, False, traceback.format_exc())
        finally:
            release()
        results.put(out)
    teardown()


class WorkerPool:
    """``world_size`` worker processes in one process group (see the module docstring).

    ``dist_backend``: ``"gloo"`` or ``"nccl"`` (NCCL needs ``one_rank_per_gpu``: it refuses
    several ranks on one GPU). ``one_rank_per_gpu``: rank ``r`` uses GPU ``r`` (at least
    ``world_size`` GPUs must be visible); otherwise every GPU worker uses GPU 0."""

    def __init__(self, world_size: int, env: dict | None = None, timeout: float = 90.0, *,
                 dist_backend: str = "gloo", one_rank_per_gpu: bool = False):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.env = dict(CPU_ENV if env is None else env)
        if dist_backend not in DIST_BACKENDS:
            raise ValueError(f"dist_backend must be one of {', '.join(DIST_BACKENDS)}, "
                             f"got {dist_backend!r}")
        on_gpu = self.env.get("SYMMTRITON_BACKEND") == "cuda"
        if one_rank_per_gpu and not (on_gpu and torch.cuda.device_count() >= world_size):
            raise ValueError(f"one_rank_per_gpu needs SYMMTRITON_BACKEND=cuda and {world_size} "
                             f"GPUs; env has {self.env.get('SYMMTRITON_BACKEND')!r}, "
                             f"{torch.cuda.device_count()} GPUs visible")
        if dist_backend == "nccl" and not one_rank_per_gpu:
            raise ValueError("dist_backend 'nccl' needs one_rank_per_gpu=True (NCCL refuses "
                             "several ranks on one GPU)")
        self.world_size = world_size
        self.dist_backend = dist_backend
        self.one_rank_per_gpu = one_rank_per_gpu
        self.timeout = timeout
        self._procs: list = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(target=_worker_main, daemon=True,
                        args=(r, self.world_size, port, self.env, self.dist_backend,
                              self.one_rank_per_gpu, self._tasks[r], self._results))
            for r in range(self.world_size)
        ]
        # Children inherit the environment at start, before they import anything (a spawned
        # child re-imports __main__ first), so TRITON_INTERPRET is set before triton loads. One
        # rank per GPU must not inherit the overlapping-devices variable from this process.
        saved = {k: os.environ.get(k) for k in (*self.env, OVERLAP_ENV)}
        os.environ.update(self.env)
        if self.one_rank_per_gpu:
            os.environ.pop(OVERLAP_ENV, None)
        try:
            for p in self._procs:
                p.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def run(self, fn, *args, timeout: float | None = None) -> list:
        """Run ``fn(rank, world_size, *args)`` on every rank; return the results by rank."""
        if self._procs and not all(p.is_alive() for p in self._procs):
            self.close(force=True)  # a rank exited (e.g. a test killed it): start afresh
        if not self._procs:
            self._start()
        for q in self._tasks:
            q.put((fn, args))
        limit = time.monotonic() + (self.timeout if timeout is None else timeout)
        got: dict[int, tuple] = {}
        while len(got) < self.world_size:
            left = limit - time.monotonic()
            dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in got]
            if left <= 0 or dead:
                missing = sorted(set(range(self.world_size)) - set(got))
                self.close(force=True)
                errors = [f"rank {r}:\n{res}" for r, (ok, res) in sorted(got.items()) if not ok]
                why = (f"ranks {dead} died" if dead
                       else f"no answer within {timeout or self.timeout}s")
                raise TimeoutError(f"{getattr(fn, '__name__', fn)}: {why} from ranks {missing}"
                                   + ("\n" + "\n".join(errors) if errors else ""))
            try:
                rank, ok, res = self._results.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            got[rank] = (ok, res)
        errors = [f"rank {r}:\n{res}" for r, (ok, res) in sorted(got.items()) if not ok]
        if errors:
            raise AssertionError(f"{getattr(fn, '__name__', fn)} failed\n" + "\n".join(errors))
        return [got[r][1] for r in range(self.world_size)]

    def close(self, force: bool = False) -> None:
        if not self._procs:
            return
        if not force:
            for q in self._tasks:
                q.put(None)
            for p in self._procs:
                p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._procs = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_distributed(fn, world_size: int, *args, env: dict | None = None, timeout: float = 90.0,
                    **pool_options) -> list:
    """One-shot :class:`WorkerPool` run: start, run ``fn`` once, close (``pool_options``:
    ``dist_backend``, ``one_rank_per_gpu``)."""
    with WorkerPool(world_size, env=env, timeout=timeout, **pool_options) as pool:
        return pool.run(fn, *args)


# -- teardown -----------------------------------------------------------------------------------
def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def release(*graphs, keys=None) -> None:
    """Free what a finished piece of work holds, without leaving the process group: wait for
    this rank's GPU work, reset ``graphs`` (``torch.cuda.CUDAGraph`` or anything with
    ``reset()``), collect garbage (graphs and buffer views held in reference cycles), destroy
    the symmetric buffers of ``keys`` (default: every buffer), and return cached GPU memory to
    the driver.

    The order matters. A CUDA graph that captured an NCCL collective holds a reference on its
    communicator until the graph is destroyed, and NCCL's communicator teardown waits for
    those references to go (``ncclCommDestroy`` polls until no graph holds the communicator):
    destroying the process group while such a graph lives hangs forever. Graphs that replay
    symmtriton kernels hold the symmetric buffers' addresses: they go before the buffers."""
    if _cuda_in_use():
        torch.cuda.synchronize()
    for graph in graphs:
        if graph is not None:
            graph.reset()
    if _cuda_in_use():
        gc.collect()  # a graph or a buffer view in a reference cycle (rare; costs ~0.1 s)
    for key in [None] if keys is None else keys:
        SymmetricMemoryManager.destroy(key)
    if _cuda_in_use():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def teardown(*graphs, group=None, destroy_group: bool = True, keys=None) -> None:
    """End a program's distributed work so the process exits promptly: :func:`release`
    (``graphs`` first), ``dist.barrier`` on ``group`` (default: WORLD) so no rank leaves while a
    peer still needs it, then ``destroy_process_group`` (unless ``destroy_group`` is false: the
    caller did not create the group; ``keys``: see :func:`release`). Call it on every rank,
    after the last collective. The bench, the worker pool and every example end this way.

    After the barrier the process sleeps :data:`GLOO_DRAIN_S` so gloo's worker threads can
    free their last works while the interpreter is still alive (see there)."""
    if os.environ.get(EXIT_MARK_ENV):
        print(f"symmtriton-exit-mark {time.time():.3f}", file=sys.stderr, flush=True)
    release(*graphs, keys=keys)
    if dist.is_initialized():
        dist.barrier(group=dist.group.WORLD if group is None else group)
        time.sleep(GLOO_DRAIN_S)
        if destroy_group:
            dist.destroy_process_group()
