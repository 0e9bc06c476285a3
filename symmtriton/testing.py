"""Run a function on every rank of a real multi-process group: the one launcher the tests,
benchmarks and GPU scripts share.

:class:`WorkerPool` spawns ``world_size`` processes once, each joins a process group, and then
runs submitted functions ``fn(rank, world_size, *args)`` until closed, so tests pay process and
import start-up once per world size, not per test. A function that raises on any rank fails the
call with every rank's traceback; a call that does not finish within ``timeout`` seconds kills
the pool (it restarts on the next call) and raises :class:`TimeoutError` naming the ranks that
did not answer.

Functions must be importable by name (module-level); their module is imported in the workers.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback

#: environment for CPU workers: host backend + Triton interpreter.
CPU_ENV = {"SYMMTRITON_BACKEND": "host", "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
#: environment for workers that share GPUs (several ranks per GPU allowed, multicast off).
GPU_ENV = {
    "SYMMTRITON_BACKEND": "cuda",
    "TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES": "1",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NCCL_NVLS_ENABLE": "0",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(rank: int, world_size: int, port: int, env: dict, tasks, results) -> None:
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import torch
    import torch.distributed as dist

    if env.get("SYMMTRITON_BACKEND") == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    from symmtriton.memory import SymmetricMemoryManager

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
            SymmetricMemoryManager.destroy()
        results.put(out)
    dist.destroy_process_group()


class WorkerPool:
    """``world_size`` worker processes in one gloo process group (see the module docstring)."""

    def __init__(self, world_size: int, env: dict | None = None, timeout: float = 90.0):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.env = dict(CPU_ENV if env is None else env)
        self.timeout = timeout
        self._procs: list = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(target=_worker_main, daemon=True,
                        args=(r, self.world_size, port, self.env, self._tasks[r], self._results))
            for r in range(self.world_size)
        ]
        # Children inherit the environment at start, before they import anything (a spawned
        # child re-imports __main__ first), so TRITON_INTERPRET is set before triton loads.
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
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
                why = f"ranks {dead} died" if dead else f"no answer within {timeout or self.timeout}s"
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


def run_distributed(fn, world_size: int, *args, env: dict | None = None, timeout: float = 90.0) -> list:
    """One-shot :class:`WorkerPool` run: start, run ``fn`` once, close."""
    with WorkerPool(world_size, env=env, timeout=timeout) as pool:
        return pool.run(fn, *args)


# -- helpers for functions that run on the workers ----------------------------------------------
def device():
    """The device this worker's collectives use (the backend's)."""
    from .backends import backend_device, select_backend

    return backend_device(select_backend())


def tagged(numel: int, dtype, rank: int, salt: int = 0, *, bound: int = 6):
    """Rank-tagged integer values in ``[-bound, bound]``: sums over up to ``(256 // bound)``
    ranks stay exact in bf16, fp16 and fp32, so reductions can be checked exactly."""
    import torch

    idx = torch.arange(numel, dtype=torch.int64, device="cpu")
    vals = (idx * 7 + 13 * rank + 5 * salt) % (2 * bound + 1) - bound
    return vals.to(dtype).to(device())


def random_bits(numel: int, dtype, rank: int, salt: int = 0):
    """Reproducible random bit patterns of ``dtype`` for rank ``rank`` (NaN payloads included):
    a bit copy must reproduce them exactly."""
    import torch

    esize = dtype.itemsize
    g = torch.Generator().manual_seed(1_000_003 * rank + salt)
    raw = torch.randint(0, 256, (numel * esize,), dtype=torch.uint8, generator=g, device="cpu")
    return raw.view(dtype).to(device())


def sync():
    import torch

    if torch.cuda.is_available() and device().type == "cuda":
        torch.cuda.synchronize()


#: runtime arguments that are not int64 addresses or offsets, by name.
_ARG_TYPES = {"n": "i32", "s": "i32", "H": "i32", "eps": "fp32"}


def compile_for_target(kernel, capability: int, **constexprs):
    """Compile a symmtriton kernel for ``sm_<capability>`` with Triton's bundled ptxas (works on
    a machine without a GPU, in a process without ``TRITON_INTERPRET``). With ``ALIGNED`` every
    integer argument is compiled as divisible by 16, as Triton specializes a launch whose
    addresses, offsets and counts are (the common case: element counts that are multiples of
    16). Returns the compiled kernel (``.asm["ptx"]``, ``.asm["cubin"]``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = _ARG_TYPES.get(name, "i64")
            if signature[name] != "fp32" and constexprs.get("ALIGNED"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32))
