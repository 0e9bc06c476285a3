"""all_reduce_add_rmsnorm against the pure-torch reference, both algorithms.

Inputs and residuals are rank-tagged small integers: the updated residual is exact and checked
bit for bit; the normed output is checked with per-dtype tolerances (rsqrt and the row sum are
rounded)."""

import pytest
import torch
import torch.distributed as dist

import symmtriton as st
from symmtriton.tools import reference
from symmtriton.tools.testing import device, sync, tagged

from helpers import buffer_without_symmetric_memory, captured, errors_without_launch

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1.6e-2, 1e-2)}
#: (S, H): odd rows (fewer rows than ranks too) and odd hidden sizes
SHAPES = ((1, 8), (3, 1000), (5, 37), (7, 1152))


def _weight(H, dtype):
    return (1 + torch.arange(H, dtype=torch.float32) % 5 / 4).to(dtype).to(device())


def _case(rank, world, dtype, S, H, salt, mode, algorithm):
    buf = st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD, size_mb=4)
    inp = tagged(S * H, dtype, rank, salt).view(S, H)
    res0 = tagged(S * H, dtype, 0, salt + 1, bound=3).view(S, H)  # the same on every rank
    residual, weight = res0.clone(), _weight(H, dtype)
    out = None
    if mode == "zero_copy":
        inp = buf.maybe_get_tensor((S, H), dtype)["tensor"].copy_(inp)
    elif mode == "out":
        out = torch.full((S, H), 99, dtype=dtype, device=device())
    before = inp.clone()
    got = st.all_reduce_add_rmsnorm(inp, residual, weight, eps=1e-6, out=out, algorithm=algorithm)
    sync()
    inputs = [tagged(S * H, dtype, r, salt).view(S, H) for r in range(world)]
    normed, new_res = reference.all_reduce_add_rmsnorm(inputs, res0, weight, 1e-6)
    rtol, atol = TOL[dtype]
    try:
        torch.testing.assert_close(got, normed, rtol=rtol, atol=atol)
        ok_out = True
    except AssertionError as e:
        ok_out = str(e)[:300]
    return (torch.equal(residual, new_res), ok_out, out is None or got is out,
            torch.equal(inp, before))


def _cases(rank, world, dtype_name, mode, algorithm, shapes=SHAPES):
    dtype = getattr(torch, dtype_name)
    bad = []
    for salt, (S, H) in enumerate(shapes):
        r = _case(rank, world, dtype, S, H, salt, mode, algorithm)
        if r != (True, True, True, True):
            bad.append((S, H, r))
    return bad


@pytest.mark.parametrize("algorithm", ["one_shot", "two_shot"])
@pytest.mark.parametrize("mode", ["staged", pytest.param("zero_copy", marks=pytest.mark.w3_full),
                                  pytest.param("out", marks=pytest.mark.w3_full)])
def test_all_reduce_rmsnorm_bf16(pool, mode, algorithm):
    assert pool.run(_cases, "bfloat16", mode, algorithm) == [[]] * pool.world_size


@pytest.mark.parametrize("mode", ["staged", pytest.param("zero_copy", marks=pytest.mark.w3_full),
                                  pytest.param("out", marks=pytest.mark.w3_full)])
def test_all_reduce_rmsnorm_lines_bf16(pool, mode):
    """The barrier-free one-shot (kernels/lines.py): rows of whole 32-bit words."""
    shapes = ((1, 8), (3, 1000), (5, 38), (7, 1152))
    assert pool.run(_cases, "bfloat16", mode, "lines", shapes) == [[]] * pool.world_size


@pytest.mark.parametrize("dtype", [pytest.param("float16", marks=pytest.mark.w3_full), "float32"])
def test_all_reduce_rmsnorm_other_dtypes(pool, dtype):
    for algorithm in ("lines", "one_shot", "two_shot", None):
        got = pool.run(_cases, dtype, "staged", algorithm, ((3, 1000), (2, 24)))
        assert got == [[]] * pool.world_size, algorithm


def _replay(rank, world):
    """Repeated calls (new ``out`` per call, then a fixed one) replay their plans."""
    S, H = 4, 40
    inputs = [tagged(S * H, torch.float32, r).view(S, H) for r in range(world)]
    x, weight = inputs[rank], _weight(H, torch.float32)
    residual = torch.zeros(S, H, device=device())
    expect = torch.zeros(S, H, device=device())
    fixed = torch.empty(S, H, device=device())
    ok = []
    for i in range(4):
        out = st.all_reduce_add_rmsnorm(x, residual, weight, out=fixed if i >= 2 else None)
        sync()
        normed, expect = reference.all_reduce_add_rmsnorm(inputs, expect, weight, 1e-6)
        ok.append(torch.equal(residual, expect)
                  and torch.allclose(out, normed, rtol=1e-5, atol=1e-5))
    return ok


@pytest.mark.w3_full
def test_all_reduce_rmsnorm_replay(pool):
    for ok in pool.run(_replay):
        assert ok == [True] * 4


def _fallback(rank, world):
    buffer_without_symmetric_memory()
    return [_case(rank, world, dtype, 3, 1000, 2, mode, None)
            for dtype in (torch.float32, torch.bfloat16) for mode in ("staged", "out")]


def test_all_reduce_rmsnorm_fallback_matches(pool):
    for res in pool.run(_fallback):
        assert res == [(True, True, True, True)] * 4


def _bad_inputs(rank, world):
    st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD, size_mb=4)
    x, r, w = torch.zeros(4, 8), torch.zeros(4, 8), torch.ones(8)
    f = st.all_reduce_add_rmsnorm
    cases = {
        "input type": (lambda: f("x", r, w), TypeError, "input must be a torch.Tensor"),
        "residual shape": (lambda: f(x, torch.zeros(2, 8), w), ValueError, "residual shape (2, 8)"),
        "weight shape": (lambda: f(x, r, torch.ones(7)), ValueError, "weight shape (7,)"),
        "eps negative": (lambda: f(x, r, w, eps=-1.0), ValueError, "-1.0"),
        "eps str": (lambda: f(x, r, w, eps="1e-6"), ValueError, "'1e-6'"),
        "1-d input": (lambda: f(x.view(-1), r.view(-1), w), ValueError, "2-D"),
        "dtype": (lambda: f(x, r.half(), w), TypeError, "residual.dtype"),
        "out shape": (lambda: f(x, r, w, out=torch.zeros(4, 9)), ValueError, "out shape (4, 9)"),
        "out is input": (lambda: f(x, r, w, out=x), ValueError, "overlap"),
        "residual is input": (lambda: f(x, x, w), ValueError, "overlap"),
        "algorithm": (lambda: f(x, r, w, algorithm="ring"), ValueError, "'ring'"),
        "lines, odd row": (lambda: f(torch.zeros(2, 7, dtype=torch.bfloat16),
                                     torch.zeros(2, 7, dtype=torch.bfloat16),
                                     torch.ones(7, dtype=torch.bfloat16), algorithm="lines"),
                           ValueError, "rows of 14"),
        "block too small": (lambda: f(x, r, w, config=st.LaunchConfig(4, 1, 1)), ValueError,
                            "block_size 4"),
    }
    return errors_without_launch(cases)


def test_all_reduce_rmsnorm_bad_inputs_raise_before_launch(cpu_pool):
    for res in cpu_pool(2).run(_bad_inputs):
        assert {k: v for k, v in res.items() if v is not True} == {}


def _graph_replays(rank, world, replays):
    st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD, size_mb=64)
    S, H = 16, 4096
    x = torch.empty(S, H, dtype=torch.bfloat16, device=device())
    residual = torch.empty_like(x)
    weight = _weight(H, torch.bfloat16)
    outs = {a: torch.empty_like(x) for a in ("one_shot", "two_shot")}

    def body():
        for algo, out in outs.items():
            st.all_reduce_add_rmsnorm(x, residual, weight, out=out, algorithm=algo)

    graph = captured(body)
    bad = []
    for i in range(replays):
        inputs = [tagged(S * H, torch.bfloat16, r, i).view(S, H) for r in range(world)]
        res0 = tagged(S * H, torch.bfloat16, 0, i + 1, bound=2).view(S, H)
        x.copy_(inputs[rank])
        residual.copy_(res0)
        graph.replay()
        torch.cuda.synchronize()
        normed1, res1 = reference.all_reduce_add_rmsnorm(inputs, res0, weight, 1e-6)
        normed2, res2 = reference.all_reduce_add_rmsnorm(inputs, res1, weight, 1e-6)
        ok = (torch.equal(residual, res2)
              and torch.allclose(outs["one_shot"], normed1, rtol=1.6e-2, atol=1e-2)
              and torch.allclose(outs["two_shot"], normed2, rtol=1.6e-2, atol=1e-2))
        if not ok:
            bad.append(i)
    st.synchronize()
    return bad


def test_all_reduce_rmsnorm_cuda_graph_replay(gpu_pool):
    assert gpu_pool.run(_graph_replays, 20, timeout=600) == [[]] * gpu_pool.world_size
