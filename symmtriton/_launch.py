"""What every collective launcher shares: the kernel module, the per-buffer launch context,
eligibility predicates, region placement, the barrier-timeout check, and the launch-plan cache.

Eager calls are latency-bound on the host, so the host path is kept thin:

* :func:`context` is computed once per buffer and kept on it (dropped by ``close``);
* :func:`kernel` imports a kernel module once; :func:`timeout_ns` parses the environment
  once per distinct value of ``$SYMMTRITON_TIMEOUT_S``;
* the status word is read through a numpy view of the (pinned) status tensor;
* each op keeps a :class:`Plan` per call key (:func:`get_plan` / :func:`put_plan`): after the
  first call with given tensors (pointer, shape, stride, dtype, device), group, config and
  timeout, a repeated call skips validation and re-derivation and launches the stored plan. Plans
  exist only for calls that validated; the key holds everything the decision depends on; the cache
  is a small LRU, dropped whenever a buffer is created, closed or destroyed;
* on the GPU, a plan keeps the ``CompiledKernel`` its first launch returned and later launches
  call Triton's launcher directly with the current stream (the interpreter keeps the normal path).
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import counts as _counts
from . import memory as _memory
from .kernels import protocol as _protocol
from .memory import SymmetricMemoryBuffer, SymmetricMemoryManager

TIMEOUT_ENV = "SYMMTRITON_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300.0
ALIGN = 16
SCOPE_ENV = "SYMMTRITON_BARRIER_SCOPE"
MULTIMEM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class CollectiveTimeoutError(RuntimeError):
    """A barrier gave up waiting: some ranks did not reach the collective in time."""


class CollectiveMismatchError(CollectiveTimeoutError):
    """The ranks are out of step: a rank skipped a call (e.g. one that raised on that rank only)
    or made an extra one, so calls would have paired with another rank's different call."""


_ENV_DATA = getattr(os.environ, "_data", None)
if os.name == "posix" and isinstance(_ENV_DATA, dict):
    def env_raw(name: str):
        """The raw value of environment variable ``name`` (bytes) or ``None``: a change
        detector for per-call paths. ``os.environ.get`` of a missing variable raises and catches
        a KeyError inside (microseconds); this is one dict lookup."""
        return _ENV_DATA.get(name.encode())
else:  # pragma: no cover - non-CPython/POSIX environ
    def env_raw(name: str):
        return os.environ.get(name)

#: (raw value of $SYMMTRITON_TIMEOUT_S, its bound in ns): the last parse, reused while the value
#: stays the same.
_ENV_TIMEOUT: list = [object(), 0]


def timeout_key(timeout_s: float | None):
    """What a call's barrier bound depends on, for plan keys: the argument, else the environment
    value (not parsed: parsing, and its errors, stay where the bound is computed)."""
    return timeout_s if timeout_s is not None else ("env", env_raw(TIMEOUT_ENV))


def timeout_ns(timeout_s: float | None = None) -> int:
    """Barrier bound in ns: the argument, else ``$SYMMTRITON_TIMEOUT_S``, else 300 s; 0 = wait
    forever."""
    if timeout_s is None:
        key = env_raw(TIMEOUT_ENV)
        if key == _ENV_TIMEOUT[0]:
            return _ENV_TIMEOUT[1]
        raw = os.environ.get(TIMEOUT_ENV, "")
        try:
            timeout_s = float(raw) if raw else DEFAULT_TIMEOUT_S
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
        if timeout_s < 0:
            raise ValueError(f"timeout must be >= 0 seconds, got {timeout_s}")
        _ENV_TIMEOUT[:] = [key, int(timeout_s * 1e9)]
        return _ENV_TIMEOUT[1]
    if timeout_s < 0:
        raise ValueError(f"timeout must be >= 0 seconds, got {timeout_s}")
    return int(timeout_s * 1e9)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


_KERNELS: dict = {}


def kernel(module: str, name: str):
    """``symmtriton.kernels.<module>.<name>`` (imported on first use, then cached)."""
    fn = _KERNELS.get((module, name))
    if fn is None:
        fn = _KERNELS[(module, name)] = getattr(
            importlib.import_module(f"symmtriton.kernels.{module}"), name)
    return fn


def resolve_group(group):
    """The collectives' ``group`` argument: a ProcessGroup, or ``None`` for the default group."""
    return _memory.resolve_group(group, "group")


@dataclass(frozen=True)
class Ctx:
    """The integers a kernel needs from a buffer, plus the host-visible error word."""

    buf: SymmetricMemoryBuffer
    rank: int
    world: int
    buf_table: int
    sig_table: int
    mc_addr: int
    err_addr: int
    grid_cap: int
    local_base: int
    scope: str  # memory scope of the barrier's atomics (see barrier_scope)

    @property
    def world_p2(self) -> int:
        return 1 << (self.world - 1).bit_length()

    @property
    def use_ptx(self) -> bool:
        return self.buf.backend == "cuda" and not interpreting()


def context(buf: SymmetricMemoryBuffer) -> Ctx:
    """The buffer's launch context: computed once, kept on the buffer until it is closed."""
    ctx = buf.__dict__.get("_launch_ctx")
    if ctx is not None and ctx.buf is buf:
        return ctx
    hdl = buf.symm_mem_hdl
    # a counter and world_size barrier slots per block must fit (kernels/protocol.py)
    cap = _protocol.grid_cap(hdl.signal_pad_slots, hdl.world_size)
    if hdl.grid_limit is not None:
        cap = min(cap, hdl.grid_limit)
    if cap < 1:
        raise RuntimeError(f"signal pad of {hdl.signal_pad_size} bytes cannot hold one barrier "
                           f"for {hdl.world_size} ranks")
    ctx = Ctx(buf, hdl.rank, hdl.world_size, hdl.buffer_ptrs_dev, hdl.signal_pad_ptrs_dev,
              hdl.multicast_ptr if buf.has_multicast else 0, buf.status.data_ptr(),
              cap, hdl.buffer_ptrs[hdl.rank], barrier_scope(hdl))
    buf._launch_ctx = ctx
    return ctx


def barrier_scope(hdl) -> str:
    """The barrier's memory scope: ``"gpu"`` when every rank of the group runs on this GPU (the
    smallest scope holding all their threads), else ``"sys"`` (peers on other GPUs).
    ``$SYMMTRITON_BARRIER_SCOPE=sys`` forces ``"sys"`` everywhere (e.g. to measure the
    difference: 1-2 us per op at small sizes, 4 ranks on one H100, benchmarks/results/NOTES.md)."""
    forced = os.environ.get(SCOPE_ENV, "auto")
    if forced not in ("auto", "sys"):
        raise ValueError(f"{SCOPE_ENV} must be 'auto' or 'sys', got {forced!r}")
    same_gpu = hdl.backend == "cuda" and hdl.ranks_on_device == hdl.world_size
    return "gpu" if same_gpu and forced == "auto" else "sys"


# -- eligibility predicates ---------------------------------------------------------------------
def symm_usable(buf: SymmetricMemoryBuffer, device: torch.device, region_bytes_end: int) -> bool:
    """Symmetric memory can carry this call: the buffer rendezvoused, the tensors live where
    the buffer does, and the region fits."""
    return (buf.symm_mem_hdl is not None and device == buf.device
            and region_bytes_end <= buf.nbytes)


def multimem_eligible(ctx: Ctx, dtype: torch.dtype | None, *addrs_and_sizes: int) -> bool:
    """The multimem path applies: every rank has multicast, ``dtype`` reduces in multimem (None:
    a bit copy, any dtype), and every address and byte count is a multiple of 16."""
    return (ctx.mc_addr != 0 and (dtype is None or dtype in MULTIMEM_DTYPES)
            and aligned16(*addrs_and_sizes))


def aligned16(*values: int) -> bool:
    return all(v % ALIGN == 0 for v in values)


def region_after(buf: SymmetricMemoryBuffer, *tensors: torch.Tensor) -> int:
    """First 16-byte-aligned buffer offset past every tensor that lies in the buffer (0 when
    none does), so a staging region never overlaps an operand. Deterministic across ranks when
    the ranks lay the buffer out alike, as the scratch API does."""
    end = 0
    for t in tensors:
        off = buf.byte_offset_of(t)
        if off is not None:
            end = max(end, off + t.numel() * t.element_size())
    return -(-end // ALIGN) * ALIGN


def find_buffer(group) -> SymmetricMemoryBuffer:
    return SymmetricMemoryManager.buffer_for_group(group)


def status_view(buf: SymmetricMemoryBuffer):
    """A cheap view of ``buf.status`` (numpy over the same host memory; the tensor itself where
    numpy cannot view it), or ``None`` when the buffer has no status word."""
    status = getattr(buf, "status", None)
    if status is None:
        return None
    view = buf.__dict__.get("_status_np")
    if view is None or view[1] is not status:
        try:
            arr = status.numpy()
        except Exception:  # pragma: no cover - numpy missing or an unviewable tensor
            arr = status
        view = buf._status_np = (arr, status)
    return view[0]


def check_status(buf: SymmetricMemoryBuffer, op: str) -> None:
    """Raise :class:`CollectiveTimeoutError` if a barrier of ``buf`` recorded a timeout. Reads
    host memory only: no device synchronisation (a timeout shows once the kernel has ended)."""
    status = status_view(buf)
    if status is None:
        return
    missing = int(status[0])
    if missing:
        _raise_timeout(buf, op, missing)
    _counts.check_error(buf, status, op)


def _raise_timeout(buf: SymmetricMemoryBuffer, op: str, missing: int) -> None:
    ranks = [r for r in range(buf.world_size) if missing >> r & 1]
    if missing & _protocol.MISMATCH_BIT:
        raise CollectiveMismatchError(
            f"{op}: rank {buf.rank} is out of step with ranks {ranks}: a rank skipped a call "
            "(one that raised on that rank only) or made an extra one; results of that call are "
            "invalid. Destroy the buffer (SymmetricMemoryManager.destroy) before using "
            "symmetric memory again")
    raise CollectiveTimeoutError(
        f"{op}: rank {buf.rank} timed out in a barrier waiting for ranks {ranks} "
        f"({TIMEOUT_ENV} or timeout=); results of that call are invalid. Destroy the buffer "
        "(SymmetricMemoryManager.destroy) before using symmetric memory again")


# -- launch plans ------------------------------------------------------------------------------
class Plan:
    """A prepared launch: the kernel, its grid, warps, runtime args and constexprs, for one call
    key of one op (see :func:`get_plan`). ``kind`` is ``"launch"``, or an op-specific marker for
    calls that launch nothing (``"empty"``, ``"fallback"``); ``extra`` holds what the op needs
    to re-check or finish a call (e.g. the config lookup the plan was made with)."""

    __slots__ = ("kind", "buf", "fn", "grid", "num_warps", "args", "constexprs", "extra",
                 "var_index", "status", "sync_check", "_fast", "_fast_tried")

    def __init__(self, kind: str, buf=None, fn=None, grid: int = 0, num_warps: int = 0,
                 args: tuple = (), constexprs: dict | None = None, extra=None,
                 var_index: int | None = None):
        self.kind = kind
        self.buf = buf
        self.fn = fn
        self.grid = grid
        self.num_warps = num_warps
        self.args = args
        self.constexprs = constexprs or {}
        self.extra = extra
        # index of a runtime arg that may change per call (passed to launch); the key of such a
        # plan must fix how Triton specialises it (see ops/fused.py)
        self.var_index = var_index
        self.status = status_view(buf) if buf is not None else None
        # the host backend launches synchronously: check the error word after the launch too
        self.sync_check = buf is not None and buf.device.type == "cpu"
        self._fast = None
        self._fast_tried = False


#: most plans kept (all ops together); least recently used ones go first.
PLAN_CACHE_MAX = 256
_PLANS: OrderedDict = OrderedDict()


def get_plan(key):
    """The plan stored for ``key``, or ``None`` (also for an unhashable key)."""
    try:
        plan = _PLANS.get(key)
    except TypeError:
        return None
    if plan is not None:
        _PLANS.move_to_end(key)
    return plan


def put_plan(key, plan: Plan) -> Plan:
    """Store ``plan`` for ``key`` (only for a call that validated), evicting the least recently
    used plan beyond :data:`PLAN_CACHE_MAX`."""
    if key is None:
        return plan
    try:
        _PLANS[key] = plan
    except TypeError:
        return plan
    _PLANS.move_to_end(key)
    while len(_PLANS) > PLAN_CACHE_MAX:
        _PLANS.popitem(last=False)
    return plan


def clear_plans(buf=None) -> None:
    """Drop every launch plan. Called whenever a buffer is created, closed or destroyed: which
    buffer a group's collectives use, and its pointers, may change."""
    _PLANS.clear()


_memory.register_invalidation_hook(clear_plans)


def launch(buf: SymmetricMemoryBuffer, op: str, fn, *args, **constexprs):
    """Launch and check the buffer's error word: before the launch for a timeout of an earlier
    call, and after it when the launch is synchronous (host backend). On the GPU a timeout of
    this call shows at the next call or at :func:`symmtriton.synchronize`.

    ``launch(buf, op, kernel, grid, num_warps, *args, **constexprs)`` launches a Triton kernel;
    ``launch(buf, op, plan[, value])`` launches a :class:`Plan` (``value``: its variable arg)."""
    if fn.__class__ is Plan:
        plan = fn
        var = args[0] if args else None
        if var is None and plan.var_index is not None:
            var = plan.args[plan.var_index]
    else:
        plan = Plan("launch", buf, fn, args[0], args[1], args[2:], constexprs)
        var = None
    status = plan.status
    if status is not None and status[0]:
        _raise_timeout(buf, op, int(status[0]))
    fast = plan._fast
    if fast is None or not fast(var):
        run_args = plan.args
        if var is not None:
            run_args = list(run_args)
            run_args[plan.var_index] = var
        kern = plan.fn.run(*run_args, grid=(plan.grid,), warmup=False, num_warps=plan.num_warps,
                           **plan.constexprs)
        if not plan._fast_tried:
            plan._fast_tried = True
            plan._fast = _direct_launcher(plan, kern)
    if plan.sync_check and status[0]:
        _raise_timeout(buf, op, int(status[0]))


def _direct_launcher(plan: Plan, kern):
    """A function that launches ``plan`` again through the ``CompiledKernel`` ``kern`` that its
    first launch returned, skipping Triton's argument binding and cache lookup: it does what
    ``JITFunction.run`` does once it has the kernel (the current device's current stream, launch
    hooks), so it also records into a CUDA graph under capture. It returns False, launching
    nothing, when the current device differs from the first launch's (the caller then takes the
    normal path). ``None`` where this does not apply: the interpreter, no CompiledKernel, pre-run
    hooks, an unexpected Triton, or ``SYMMTRITON_DIRECT_LAUNCH=0``."""
    if kern is None or interpreting() or os.environ.get("SYMMTRITON_DIRECT_LAUNCH", "1") == "0":
        return None
    try:
        from triton import knobs
        from triton.compiler import CompiledKernel
        from triton.runtime import driver

        if hasattr(kern, "result"):
            kern = kern.result()
        if not isinstance(kern, CompiledKernel) or getattr(plan.fn, "pre_run_hooks", None):
            return None
        bound = inspect.signature(plan.fn.fn).bind(*plan.args, **plan.constexprs)
        bound.apply_defaults()
        all_args = list(bound.arguments.values())
        var_index = plan.var_index  # positional, so the same index in all_args
        active = driver.active
        get_device, get_stream = active.get_current_device, active.get_current_stream
        device = get_device()
        runner = kern.run  # initialises the handles (function, launcher)
        function, packed = kern.function, kern.packed_metadata
        grid = (plan.grid, 1, 1)
        rt = knobs.runtime
    except Exception:  # anything unexpected: keep Triton's own path
        return None

    def fast(var) -> bool:
        if get_device() != device:
            return False
        if var is not None:
            all_args[var_index] = var
        stream = get_stream(device)
        enter = rt.launch_enter_hook
        meta = kern.launch_metadata(grid, stream, *all_args) if enter is not None else None
        runner(grid[0], 1, 1, stream, function, packed, meta, enter, rt.launch_exit_hook, *all_args)
        return True

    return fast


def synchronize(group=None) -> None:
    """Wait for this rank's work on the current CUDA stream, then raise
    :class:`CollectiveTimeoutError` if a barrier of any buffer of ``group`` timed out. The way to
    see a timeout of the last call on the GPU (launches are asynchronous)."""
    group = resolve_group(group)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.current_stream().synchronize()
    for buf in list(SymmetricMemoryManager._buffers.values()):
        if buf.process_group is group:
            check_status(buf, "synchronize")


CHECK_ENV = "SYMMTRITON_CHECK_UNIFORM"


def check_uniform(group, op: str, **tensors: torch.Tensor) -> None:
    """With ``SYMMTRITON_CHECK_UNIFORM=1``: all ranks compare the shapes and dtypes of this call
    (a host collective per call: a debugging aid, not for graphs or production) and every rank
    raises ``ValueError`` naming the ranks that differ. Off by default: a mismatch is otherwise
    undetectable without communication, and corrupts or times out."""
    if env_raw(CHECK_ENV) is None or os.environ.get(CHECK_ENV, "") != "1":
        return
    mine = {k: (tuple(t.shape), str(t.dtype)) for k, t in tensors.items()}
    world = dist.get_world_size(group)
    seen: list = [None] * world
    dist.all_gather_object(seen, (op, mine), group=group)
    if any(s != seen[0] for s in seen):
        raise ValueError(f"{op}: ranks disagree on the call: " +
                         "; ".join(f"rank {r}: {s[0]} {s[1]}" for r, s in enumerate(seen)))
