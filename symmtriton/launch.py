"""One prepared kernel launch (:class:`Launch`) and :meth:`Launch.launch`, the one way to run it.

Eager calls are latency-bound on the host (Triton's Python launch costs ~16 us,
docs/ARCHITECTURE.md, "Host path"), so the path is thin: a :class:`Launch` is built once per
plan (see :mod:`symmtriton.ops.driver`); on the GPU its first launch returns the
``CompiledKernel``, and later launches call Triton's launcher directly with the current stream
(the interpreter keeps the normal path). Before each launch the buffer's status word is read
for a timeout of an earlier call (:mod:`symmtriton.sync`), and after it when the launch is
synchronous (host).

Programmatic dependent launch (PDL) is set here, for every kernel at once: a kernel with a
``PDL`` constexpr gets ``PDL=True`` (its ``griddepcontrol.wait`` before any memory access,
``kernels/ptx.py`` ``pdl_wait``) together with Triton's ``launch_pdl=True`` launch option (the
launch attribute ``CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION``, kept in the compiled
kernel's metadata, which the direct launcher reads too) when ``context.pdl_enabled`` says so for
the plan's buffer; never one without the other, never in the interpreter.
"""

from __future__ import annotations

import inspect
import weakref

import torch

from . import env
from .context import Ctx, pdl_enabled
from .sync import raise_timeout, status_view

#: ctx -> its :func:`ctx_constexprs` (weak: a closed buffer's context goes with it).
_CTX_CONSTEXPRS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def ctx_constexprs(ctx: Ctx) -> dict:
    """The constexprs every kernel takes from its buffer's launch context: ``RANK``,
    ``WORLD_SIZE``, ``WORLD_P2``, ``SCOPE`` and ``USE_PTX``. Built once per context and shared:
    :meth:`Launch.on` spreads it into each launch's own constexprs (never change it)."""
    shared = _CTX_CONSTEXPRS.get(ctx)
    if shared is None:
        shared = dict(RANK=ctx.rank, WORLD_SIZE=ctx.world, WORLD_P2=ctx.world_p2,
                      SCOPE=ctx.scope, USE_PTX=ctx.use_ptx)
        _CTX_CONSTEXPRS[ctx] = shared
    return shared


class Launch:
    """A kernel, its grid, warps, runtime args and constexprs, for one op on one buffer.
    ``var_index``: a runtime arg that may change per call (passed to :meth:`launch`); the plan
    key of such a launch must fix how Triton specialises it (see ops/fused.py). A kernel with a
    ``PDL`` constexpr gets it here, with ``options`` (Triton launch options: ``launch_pdl``)."""

    __slots__ = ("op", "buf", "fn", "grid", "num_warps", "args", "constexprs", "options",
                 "var_index", "status", "sync_check", "_fast", "_fast_tried")

    def __init__(self, op: str, buf, fn, grid: int, num_warps: int, args: tuple,
                 constexprs: dict, var_index: int | None = None):
        self.op = op
        self.buf = buf
        self.fn = fn
        self.grid = grid
        self.num_warps = num_warps
        self.args = args
        self.constexprs = constexprs
        self.options = {}
        if "PDL" in getattr(fn, "arg_names", ()):  # the wait and the launch option, together
            pdl = pdl_enabled(buf)
            self.constexprs = {**constexprs, "PDL": pdl}
            if pdl:
                self.options = {"launch_pdl": True}
        self.var_index = var_index
        self.status = status_view(buf)
        # the host backend launches synchronously: check the error word after the launch too
        self.sync_check = buf.device.type == "cpu"
        self._fast = None
        self._fast_tried = False

    @classmethod
    def on(cls, ctx: Ctx, op: str, fn, grid: int, num_warps: int, args: tuple, constexprs: dict,
           var_index: int | None = None) -> Launch:
        """The launch of ``fn`` on ``ctx``'s buffer, with the context's shared constexprs
        (:func:`ctx_constexprs`) and the kernel's own (``constexprs``)."""
        return cls(op, ctx.buf, fn, grid, num_warps, args, {**ctx_constexprs(ctx), **constexprs},
                   var_index)

    def launch(self, var: int | None = None) -> None:
        """Launch (``var``: the value of its variable arg, else the stored one) and check the
        buffer's error word: before the launch for a timeout of an earlier call, and after it when
        the launch is synchronous (host backend). On the GPU a timeout of this call shows at the
        next call or at :func:`symmtriton.synchronize`."""
        status = self.status
        if status is not None and status[0]:
            raise_timeout(self.buf, self.op, int(status[0]))
        fast = self._fast
        if fast is None or not fast(var):
            device = self.buf.device
            if (device.type == "cuda" and torch.cuda.is_initialized()
                    and torch.cuda.current_device() != device.index):
                with torch.cuda.device(device):  # a new thread starts on device 0
                    self._run(var)
            else:
                self._run(var)
        if self.sync_check and status[0]:
            raise_timeout(self.buf, self.op, int(status[0]))

    def _run(self, var: int | None) -> None:
        """Triton's own launch (on the current device: the buffer's)."""
        run_args = self.args
        if var is not None:
            run_args = list(run_args)
            run_args[self.var_index] = var
        kern = self.fn.run(*run_args, grid=(self.grid,), warmup=False,
                           num_warps=self.num_warps, **self.options, **self.constexprs)
        if not self._fast_tried:
            self._fast_tried = True
            self._fast = _direct_launcher(self, kern)


def bound_args(kl: Launch) -> list:
    """Every argument of ``kl``'s kernel in signature order (runtime args, constexprs, defaults):
    what Triton's compiled launcher takes after its own leading arguments."""
    bound = inspect.signature(kl.fn.fn).bind(*kl.args, **kl.constexprs)
    bound.apply_defaults()
    return list(bound.arguments.values())


def raw_launcher(kern):
    """``(launch, cooperative, pdl)``: the compiled C entry point of ``kern``'s Triton
    ``CudaLauncher`` and its two flags, when calling it directly is what ``CudaLauncher.__call__``
    would do (no global or profile scratch to allocate); else ``None``."""
    launcher = kern.run  # initialises the handles (function, launcher)
    if type(launcher).__name__ != "CudaLauncher":
        return None
    try:
        if launcher.global_scratch_size or launcher.profile_scratch_size:
            return None
        return launcher.launch, launcher.launch_cooperative_grid, launcher.launch_pdl
    except AttributeError:
        return None


def _device_getter(active):
    """The current-device query of Triton's ``active`` driver; where that is torch's, the same
    answer without its ``_lazy_init`` (CUDA is initialised once a kernel ran)."""
    get_device = active.get_current_device
    if get_device is torch.cuda.current_device:
        get_device = getattr(torch._C, "_cuda_getDevice", get_device)
    return get_device


def _direct_launcher(kl: Launch, kern):
    """A function that launches ``kl`` again through the ``CompiledKernel`` ``kern`` that its
    first launch returned, skipping Triton's argument binding and cache lookup: it does what
    ``JITFunction.run`` does once it has the kernel (the current device's current stream, launch
    hooks), so it also records into a CUDA graph under capture. It returns False, launching
    nothing, when the current device differs from the first launch's (the caller then takes the
    normal path). ``None`` where this does not apply: the interpreter, no CompiledKernel, pre-run
    hooks, an unexpected Triton, or ``SYMMTRITON_DIRECT_LAUNCH=0``.

    While no launch hook is registered (Triton's ``knobs.runtime.launch_enter_hook`` and
    ``launch_exit_hook`` are empty ``HookChain``s, the default), it calls the launcher's C entry
    point itself (:func:`raw_launcher`) with ``None`` for the hooks and their metadata: Triton 3.6
    otherwise builds the metadata dict and calls both empty chains from C on every launch. A
    hook registered later (a profiler) takes Triton's own path from the next launch on."""
    if kern is None or env.interpreting() or not env.direct_launch():
        return None
    try:
        # Triton internals, imported here so an unexpected Triton only disables this fast path
        from triton import knobs
        from triton.compiler import CompiledKernel
        from triton.knobs import HookChain
        from triton.runtime import driver

        if hasattr(kern, "result"):
            kern = kern.result()
        if not isinstance(kern, CompiledKernel) or getattr(kl.fn, "pre_run_hooks", None):
            return None
        all_args = bound_args(kl)
        var_index = kl.var_index  # positional, so the same index in all_args
        get_device, get_stream = _device_getter(driver.active), driver.active.get_current_stream
        device = get_device()
        runner = kern.run  # initialises the handles (function, launcher)
        function, packed, grid = kern.function, kern.packed_metadata, kl.grid
        rt = knobs.runtime
        enter0, exit0 = rt.launch_enter_hook, rt.launch_exit_hook
        raw = raw_launcher(kern) if type(enter0) is HookChain and type(exit0) is HookChain else None
        c_launch, coop, pdl = raw or (None, 0, 0)
        enter_calls, exit_calls = (enter0.calls, exit0.calls) if raw else ((), ())
    except Exception:  # anything unexpected: keep Triton's own path
        return None

    def fast(var) -> bool:
        if get_device() != device:
            return False
        if var is not None:
            all_args[var_index] = var
        stream = get_stream(device)
        enter, leave = rt.launch_enter_hook, rt.launch_exit_hook
        if (c_launch is not None and enter is enter0 and leave is exit0 and not enter_calls
                and not exit_calls):
            c_launch(grid, 1, 1, stream, function, coop, pdl, None, None, packed, None, None,
                     None, *all_args)
            return True
        meta = (kern.launch_metadata((grid, 1, 1), stream, *all_args)
                if enter is not None else None)
        runner(grid, 1, 1, stream, function, packed, meta, enter, leave, *all_args)
        return True

    return fast
