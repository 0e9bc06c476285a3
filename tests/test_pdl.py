"""Programmatic dependent launch (PDL): ``$SYMMTRITON_PDL`` and its parse; every kernel entry point
waits (``ptx.pdl_wait``) first, through its first statement, and compiled with ``PDL`` its PTX holds
one ``griddepcontrol.wait`` before any memory access and never an early trigger; the launch layer
passes ``launch_pdl`` and ``PDL`` together, only when PDL is on (stand-ins for Triton on the CPU);
on a GPU the ops give the same results with PDL on and off, eager and in a CUDA graph."""

import ast
import os
import pathlib
import re
from types import SimpleNamespace as NS

import pytest
import torch
import torch.distributed as dist
import triton.language as tl

import symmtriton as st
from symmtriton import context, env
from symmtriton.launch import Launch
from symmtriton.ops import driver
from symmtriton.tools import reference
from symmtriton.tools.testing import device, tagged

from helpers import captured

KERNELS = pathlib.Path(__file__).resolve().parents[1] / "kernels"


@pytest.mark.parametrize("text, mode", [(None, "auto"), ("", "auto"), ("auto", "auto"),
                                        ("on", "on"), ("1", "on"), (" ON ", "on"),
                                        ("off", "off"), ("0", "off")])
def test_pdl_mode_parses(monkeypatch, text, mode):
    if text is None:
        monkeypatch.delenv(env.PDL, raising=False)
    else:
        monkeypatch.setenv(env.PDL, text)
    assert env.pdl() == mode


@pytest.mark.parametrize("text", ["yes", "2", "true"])
def test_pdl_bad_value_raises_naming_it(monkeypatch, text):
    monkeypatch.setenv(env.PDL, text)
    with pytest.raises(ValueError, match=f"SYMMTRITON_PDL.*{text}"):
        env.pdl()


# -- the launch layer -----------------------------------------------------------------------------
def _launch_kwargs(monkeypatch, mode, *, backend="cuda", capability=(9, 0), interpret="0",
                   params=("a", "PDL")):
    """The kwargs a Launch of a stand-in kernel with ``params`` hands to ``fn.run``."""
    monkeypatch.setenv(env.PDL, mode)
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: capability)
    calls = []
    fn = NS(arg_names=params, run=lambda *args, **kw: calls.append(kw))
    buf = NS(backend=backend, device=torch.device(backend if backend == "cuda" else "cpu"),
             status=torch.zeros(1, dtype=torch.int32))
    kl = Launch("op", buf, fn, 2, 4, (1,), {"C": 3})
    kl.launch()
    [kw] = calls
    return kw


@pytest.mark.parametrize("mode", ["auto", "on", "1"])
def test_launch_sets_pdl_and_launch_pdl_together_when_on(monkeypatch, mode):
    kw = _launch_kwargs(monkeypatch, mode)
    assert kw["launch_pdl"] is True and kw["PDL"] is True and kw["C"] == 3


@pytest.mark.parametrize("mode, where", [
    ("off", {}), ("0", {}), ("auto", {"capability": (8, 0)}), ("auto", {"backend": "host"}),
    ("auto", {"interpret": "1"}), ("on", {"backend": "host"}), ("on", {"interpret": "1"})])
def test_launch_passes_no_launch_pdl_when_off(monkeypatch, mode, where):
    kw = _launch_kwargs(monkeypatch, mode, **where)
    assert "launch_pdl" not in kw and kw["PDL"] is False


def test_kernel_without_pdl_parameter_gets_neither(monkeypatch):
    kw = _launch_kwargs(monkeypatch, "on", params=("a", "C"))
    assert "launch_pdl" not in kw and "PDL" not in kw


def test_pdl_on_below_sm90_raises(monkeypatch):
    monkeypatch.setenv(env.PDL, "on")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (8, 6))
    with pytest.raises(ValueError, match="SYMMTRITON_PDL=on.*8.6"):
        context.pdl_enabled(NS(backend="cuda", device=torch.device("cuda", 0)))


# -- the kernels ----------------------------------------------------------------------------------
def _device_functions():
    """Every top-level function of kernels/, by name."""
    return {node.name: node for path in KERNELS.glob("*.py")
            for node in ast.parse(path.read_text()).body if isinstance(node, ast.FunctionDef)}


def _waits_first(fn, functions, seen=()):
    """``fn`` takes ``PDL: tl.constexpr`` and its first statement (after its docstring) is
    ``pdl_wait(PDL)``, or a call (its value possibly assigned) of a function of kernels/ that
    waits first, given ``PDL``."""
    args = [a.arg for a in fn.args.args]
    notes = {a.arg: ast.unparse(a.annotation) if a.annotation else "" for a in fn.args.args}
    body = fn.body[1:] if ast.get_docstring(fn) is not None else fn.body
    if notes.get("PDL") != "tl.constexpr" or not body or fn.name in seen:
        return False
    first = body[0]
    call = first.value if isinstance(first, (ast.Expr, ast.Assign)) else None
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
        return False
    if ast.unparse(call) == "pdl_wait(PDL)":
        return True
    callee = functions.get(call.func.id)
    if callee is None or "PDL" not in [a.arg for a in callee.args.args]:
        return False
    i = [a.arg for a in callee.args.args].index("PDL")
    given = {k.arg: k.value for k in call.keywords}
    passed = call.args[i] if i < len(call.args) else given.get("PDL")
    return (isinstance(passed, ast.Name) and passed.id == "PDL" and "PDL" in args
            and _waits_first(callee, functions, seen + (fn.name,)))


def test_every_kernel_waits_first():
    """Every ``@triton.jit`` ``_<op>_kernel`` in kernels/ takes ``PDL: tl.constexpr`` and waits
    (``pdl_wait(PDL)``) first, before any memory access: its first statement is the wait or a
    call of a device function that waits first (``barrier.call_begin``, ``lines.lines_begin``,
    ``push.push_reduce_call``), given ``PDL``."""
    functions = _device_functions()
    found = {name for name in functions if re.fullmatch(r"_\w+_kernel", name)}
    bad = sorted(name for name in found if not _waits_first(functions[name], functions))
    assert {"_all_gather_kernel", "_all_gather_lines_kernel", "_reduce_scatter_kernel",
            "_fused_rmsnorm_kernel", "_all_reduce_kernel", "_all_gather_v_kernel"} <= found
    assert bad == []


COMMON = dict(RANK=1, WORLD_SIZE=3, WORLD_P2=4, SCOPE="sys", USE_PTX=True, ALIGNED=True)
PTX_KERNELS = {
    "all_gather_lines": ("all_gather", "_all_gather_lines_kernel",
                         dict(DTYPE=tl.int32, BLOCK=1024)),
    "reduce_scatter": ("reduce_scatter", "_reduce_scatter_kernel",
                       dict(DTYPE=tl.bfloat16, BLOCK_SIZE=2048, STAGE_IN=True,
                            USE_MULTIMEM=False)),
    "fused": ("fused_rmsnorm", "_fused_rmsnorm_kernel",
              dict(DTYPE=tl.bfloat16, W_DTYPE=tl.bfloat16, BLOCK_H=4096, STAGE_IN=True,
                   ALL_GATHER=True, COPY_OUT=True, USE_MULTIMEM=True)),
}
#: a PTX instruction that touches memory (kernel parameters aside).
MEMORY_OP = re.compile(r"^\s*(?:@!?%\w+\s+)?(?:ld|st|atom|red|multimem|cp\.async)\.(?!param)",
                       re.MULTILINE)


def _pdl_ptx(rank, world, which, capability):
    import importlib

    from helpers import compile_for_target

    module, name, extra = PTX_KERNELS[which]
    kern = getattr(importlib.import_module(f"symmtriton.kernels.{module}"), name)
    ptx = compile_for_target(kern, capability, **COMMON, **extra, PDL=True).asm["ptx"]
    body = ptx[ptx.index(".entry"):]
    first_access = MEMORY_OP.search(body)
    return {"waits": body.count("griddepcontrol.wait"),
            "triggers": body.count("griddepcontrol.launch_dependents"),
            "wait_first": first_access is not None
            and body.index("griddepcontrol.wait") < first_access.start()}


@pytest.mark.parametrize("which, capability", [(k, 90) for k in sorted(PTX_KERNELS)]
                         + [("all_gather_lines", 100)])
def test_pdl_kernels_wait_once_before_any_memory_access(compiler, which, capability):
    """Compiled with ``PDL``: one ``griddepcontrol.wait``, ahead of every load, store, atomic
    and multimem access; no early trigger. (Without ``PDL`` there is none: tests/test_compile.py
    and test_compile_lines.py.)"""
    [r] = compiler.run(_pdl_ptx, which, capability)
    assert r == {"waits": 1, "triggers": 0, "wait_first": True}


# -- GPU: the same results with PDL on and off ----------------------------------------------------
H = 1152
#: per size: (all-gather / reduce-scatter / all-reduce elements per rank, fused rows per rank):
#: small enough for the lines at W=2, and large enough for the barrier kernels.
GPU_SIZES = ((2048 + 8, 3), (2**19 + 8, 520))


class _Ops:
    """Operands and outputs of one step: all-gather, reduce-scatter, all-reduce and the fused op
    at every size of :data:`GPU_SIZES` (bf16, integer-valued)."""

    def __init__(self, rank, world):
        self.rank, self.world, dev = rank, world, device()
        new = lambda *shape: torch.empty(*shape, dtype=torch.bfloat16, device=dev)  # noqa: E731
        self.sizes = [dict(n=n, s=s, ag_in=new(n), ag_out=new(world * n), rs_in=new(world * n),
                           rs_out=new(n), ar_in=new(n), ar_out=new(n), f_in=new(world * s, H),
                           f_res=new(s, H), f_w=torch.ones(H, dtype=torch.bfloat16, device=dev),
                           f_out=new(world * s, H)) for n, s in GPU_SIZES]

    def step(self):
        for t in self.sizes:
            st.all_gather_into_tensor(t["ag_out"], t["ag_in"])
            st.reduce_scatter_tensor(t["rs_out"], t["rs_in"])
            st.all_reduce(t["ar_in"], out=t["ar_out"])
            st.reduce_scatter_add_rmsnorm_all_gather(t["f_in"], t["f_res"], t["f_w"],
                                                     out=t["f_out"])

    def fill(self, salt):
        r, w = self.rank, self.world
        for t in self.sizes:
            n, s = t["n"], t["s"]
            t["ag_in"].copy_(tagged(n, torch.bfloat16, r, salt))
            t["rs_in"].copy_(tagged(w * n, torch.bfloat16, r, salt))
            t["ar_in"].copy_(tagged(n, torch.bfloat16, r, salt + 1))
            t["f_in"].copy_(tagged(w * s * H, torch.bfloat16, r, salt).view(w * s, H))
            t["f_res"].copy_(tagged(s * H, torch.bfloat16, r, salt, bound=2).view(s, H))

    def check(self, salt):
        """(the sizes whose all-gather, reduce-scatter, all-reduce or fused residual differ
        from the reference, the fused op's outputs to compare between modes)."""
        w, wrong, outs = self.world, [], []
        for t in self.sizes:
            n = t["n"]
            ok = (torch.equal(t["ag_out"], reference.all_gather(
                      [tagged(n, torch.bfloat16, r, salt) for r in range(w)]))
                  and torch.equal(t["rs_out"], reference.reduce_scatter(
                      [tagged(w * n, torch.bfloat16, r, salt) for r in range(w)], self.rank))
                  and torch.equal(t["ar_out"], reference.all_reduce(
                      [tagged(n, torch.bfloat16, r, salt + 1) for r in range(w)]))
                  and torch.equal(t["f_res"], self._residual(t["s"], salt)))
            if not ok:
                wrong.append(n)
            outs += [t["f_out"].clone(), t["f_res"].clone()]
        return wrong, outs

    def _residual(self, s, salt):
        """The fused op's updated residual (exact: integer values)."""
        w, dev = self.world, device()
        inputs = [tagged(w * s * H, torch.bfloat16, r, salt).view(w * s, H) for r in range(w)]
        res0 = tagged(s * H, torch.bfloat16, self.rank, salt, bound=2).view(s, H)
        return reference.reduce_scatter_add_rmsnorm(inputs, res0, torch.ones(H, device=dev), 1e-6,
                                                    self.rank)[1]


def _pdl_on_and_off(rank, world, replays):
    st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD, size_mb=64)
    expect = {"0": False, "auto": torch.cuda.get_device_capability() >= (9, 0)}
    ops, seen, bad = _Ops(rank, world), {}, []
    launched, real = [], Launch.launch
    Launch.launch = lambda kl, var=None: launched.append(kl) or real(kl, var)
    try:
        for mode in ("0", "auto"):
            os.environ[env.PDL] = mode
            driver.clear_plans()  # read at plan time
            launched.clear()
            runs = [("eager", salt, ops.step) for salt in (1, 2)]
            graph = None
            for phase, salt, run in runs + [("graph", 10 + i, None) for i in range(replays)]:
                ops.fill(salt)
                if phase == "graph":
                    graph = graph or captured(ops.step)
                    ops.fill(salt)  # capturing ran the step once
                    graph.replay()
                else:
                    run()
                torch.cuda.synchronize()
                wrong, outs = ops.check(salt)
                if wrong:
                    bad.append(f"SYMMTRITON_PDL={mode} {phase} salt {salt}: sizes {wrong} wrong")
                other = seen.setdefault((phase, salt), outs)
                if other is not outs and not all(map(torch.equal, other, outs)):
                    bad.append(f"{phase} salt {salt}: PDL on and off differ")
            flags = {(kl.constexprs["PDL"], kl.options.get("launch_pdl", False)) for kl in launched}
            if flags != {(expect[mode], expect[mode])}:
                bad.append(f"SYMMTRITON_PDL={mode}: launches had PDL, launch_pdl {flags}")
    finally:
        Launch.launch = real
        os.environ.pop(env.PDL, None)
        driver.clear_plans()
    return bad


@pytest.mark.gpu
def test_pdl_on_and_off_give_the_same_results(gpu_pool):
    assert gpu_pool.run(_pdl_on_and_off, 40, timeout=600) == [[]] * gpu_pool.world_size
