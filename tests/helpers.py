"""Helpers for the tests' functions (most run on the workers of
:class:`symmtriton.tools.testing.WorkerPool`, which import this module by name): random bit
patterns, the sm_90/sm_100 compile check, buffers without symmetric memory, validation and
CUDA-graph checks."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import symmtriton as st
from symmtriton.launch import Launch
from symmtriton.memory import SymmetricMemoryManager
from symmtriton.tools.testing import device, sync


def random_bits(numel: int, dtype, rank: int, salt: int = 0):
    """Reproducible random bit patterns of ``dtype`` for rank ``rank`` (NaN payloads included):
    a bit copy must reproduce them exactly."""
    esize = dtype.itemsize
    g = torch.Generator().manual_seed(1_000_003 * rank + salt)
    raw = torch.randint(0, 256, (numel * esize,), dtype=torch.uint8, generator=g, device="cpu")
    return raw.view(dtype).to(device())


#: runtime arguments that are not int64 addresses or offsets, by name.
_ARG_TYPES = {"n": "i32", "s": "i32", "H": "i32", "eps": "fp32"}


def compile_for_target(kernel, capability: int, num_warps: int = 4, **constexprs):
    """Compile a symmtriton kernel for ``sm_<capability>`` with Triton's bundled ptxas (works on
    a machine without a GPU, in a process without ``TRITON_INTERPRET``). With ``ALIGNED`` every
    integer argument is compiled as divisible by 16, as Triton specializes a launch whose
    addresses, offsets and counts are (the common case: element counts that are multiples of
    16). ``PDL`` (the kernels' programmatic-dependent-launch wait) is ``False`` unless given,
    the row kernels' ``QUANT`` 0 (no FP8 output, ``Q_GATHER`` off); ``num_warps`` as the
    launch's. Returns the compiled kernel (``.asm["ptx"]``, ``.asm["cubin"]``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "PDL" in kernel.arg_names:
        constexprs.setdefault("PDL", False)
    if "QUANT" in kernel.arg_names:  # the row kernels' FP8 output (kernels/quant.py): none
        constexprs.setdefault("QUANT", 0)
        constexprs.setdefault("Q_DTYPE", constexprs["DTYPE"])
        constexprs.setdefault("Q_MAX", 0.0)
    if "Q_GATHER" in kernel.arg_names:  # FP8 records on the fused all-gather: not without QUANT
        constexprs.setdefault("Q_GATHER", False)

    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = _ARG_TYPES.get(name, "i64")
            if signature[name] != "fp32" and constexprs.get("ALIGNED"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps})


def buffer_without_symmetric_memory(key: str = "tp", group=None):
    """``SymmetricMemoryManager.get_buffer(key)`` created with symmetric memory switched off
    (``SYMMTRITON_DISABLE=1`` while it is made): the collectives then take their
    torch.distributed fallback."""
    os.environ["SYMMTRITON_DISABLE"] = "1"
    try:
        return SymmetricMemoryManager.get_buffer(key, group or dist.group.WORLD)
    finally:
        os.environ.pop("SYMMTRITON_DISABLE")


def errors_without_launch(cases: dict) -> dict:
    """Run ``cases`` (name -> (call, exception type, text the message must hold)); returns name ->
    ``True`` or what went wrong, plus ``"no launch"``: whether no kernel was launched meanwhile."""
    launches = []
    real = Launch.launch
    Launch.launch = lambda kl, var=None: launches.append(kl.op) or real(kl, var)
    res = {}
    try:
        for name, (call, exc, fragment) in cases.items():
            try:
                call()
                res[name] = "no error"
            except exc as e:
                res[name] = fragment in str(e) or str(e)
    finally:
        Launch.launch = real
    res["no launch"] = launches == []
    return res


def captured(body):
    """``body()`` run once on a side stream (compiles kernels, makes plans), then captured in a
    new CUDA graph, which is returned (``graph.replay()`` runs ``body`` again)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        body()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        body()
    torch.cuda.current_stream().wait_stream(stream)
    return graph


def replay_with_counts(graph, counts, schedules, refill, check, bad_counts) -> list:
    """Replay ``graph`` (a variable-count collective captured once) for each schedule: write it
    into ``counts``, ``refill(i)`` the inputs, replay, and ``check(i, schedule)`` the results;
    then replay with ``bad_counts``, which ``symmtriton.synchronize`` must report as a
    ``ValueError`` naming them. Returns the failures (empty when all went right)."""
    failures = []
    for i, sched in enumerate(schedules):
        counts.copy_(torch.tensor(sched))
        refill(i)
        graph.replay()
        torch.cuda.synchronize()
        if not check(i, sched):
            failures.append(sched)
    counts.copy_(torch.tensor(bad_counts))
    graph.replay()
    try:
        st.synchronize()
        failures.append("no counts error")
    except ValueError as exc:
        if f"counts {list(bad_counts)}" not in str(exc):
            failures.append(str(exc))
    return failures


def raised_by(fn, cases: dict) -> dict:
    """``{name: exception class name or None}`` for ``fn(*args)`` over ``cases`` ``{name: args}``
    (validation tests: each call must raise before launching anything)."""
    raised = {}
    for name, args in cases.items():
        try:
            fn(*args)
            raised[name] = None
        except (TypeError, ValueError) as exc:
            raised[name] = type(exc).__name__
    return raised


def value_error_of(fn) -> str:
    """The message of the ``ValueError`` that ``fn()`` raises, at once or (GPU: launches are
    asynchronous) at the following ``symmtriton.synchronize()``; ``""`` when none does."""
    try:
        fn()
        sync()
        st.synchronize()
    except ValueError as exc:
        return str(exc)
    return ""
