"""Bad inputs: each raises the expected error naming the bad value, before any kernel launch,
and leaves the buffer usable."""

import os

import pytest
import torch
import torch.distributed as dist

import symmtriton as st
from symmtriton import env
from symmtriton.launch import Launch
from symmtriton.tools import reference
from symmtriton.tools.testing import device, sync

from helpers import errors_without_launch, random_bits


def _cases(world):
    d = device()
    bf = dict(dtype=torch.bfloat16, device=d)
    x8, out8 = torch.zeros(8, **bf), torch.zeros(8 * world, **bf)
    S, H = 2 * world, 16
    fin, res, w = torch.zeros(S, H, **bf), torch.zeros(2, H, **bf), torch.ones(H, **bf)
    big = torch.zeros(8 * world + 1, **bf)
    fused = st.reduce_scatter_add_rmsnorm_all_gather
    cases = [
        ("AG input not a tensor", lambda: st.all_gather_into_tensor(out8, [1, 2]),
         TypeError, "input must be a torch.Tensor"),
        ("AG dtype mismatch", lambda: st.all_gather_into_tensor(out8.float(), x8),
         TypeError, "dtype"),
        ("AG non-contiguous", lambda: st.all_gather_into_tensor(out8, torch.zeros(16, **bf)[::2]),
         ValueError, "contiguous"),
        ("AG output shape", lambda: st.all_gather_into_tensor(torch.zeros(8 * world + 1, **bf), x8),
         ValueError, "must be"),
        ("AG 0-d input", lambda: st.all_gather_into_tensor(out8, torch.zeros((), **bf)),
         ValueError, "at least one dimension"),
        ("AG overlapping", lambda: st.all_gather_into_tensor(big[1:], big[:8]),
         ValueError, "overlap"),
        ("AG group type", lambda: st.all_gather_into_tensor(out8, x8, group="tp"),
         TypeError, "ProcessGroup"),
        ("RS integer dtype", lambda: st.reduce_scatter_tensor(
            torch.zeros(8, dtype=torch.int32, device=d),
            torch.zeros(8 * world, dtype=torch.int32, device=d)), TypeError, "supported"),
        ("RS output shape", lambda: st.reduce_scatter_tensor(torch.zeros(7, **bf), out8),
         ValueError, "must be"),
        ("RS output aliases input", lambda: st.reduce_scatter_tensor(out8[:8], out8),
         ValueError, "overlap"),
        ("fused 1-D input", lambda: fused(out8, res, w), ValueError, "2-D"),
        ("fused residual shape", lambda: fused(fin, torch.zeros(3, H, **bf), w),
         ValueError, "residual shape"),
        ("fused weight shape", lambda: fused(fin, res, torch.ones(H + 1, **bf)),
         ValueError, "weight shape"),
        ("fused eps", lambda: fused(fin, res, w, eps=-1.0), ValueError, "eps"),
        ("fused eps type", lambda: fused(fin, res, w, eps="small"), ValueError, "eps"),
        ("fused out shape", lambda: fused(fin, res, w, out=torch.zeros(S, H + 1, **bf)),
         ValueError, "out shape"),
        ("fused residual dtype", lambda: fused(fin, res.float(), w), TypeError, "dtype"),
        ("fused residual aliases input", lambda: fused(fin, fin[:2], w), ValueError, "overlap"),
        ("negative timeout", lambda: st.all_gather_into_tensor(out8, x8, timeout_s=-1),
         ValueError, "timeout"),
        ("manager without group", lambda: st.SymmetricMemoryManager.get_buffer("nope"),
         ValueError, "process_group"),
        ("bad LaunchConfig", lambda: st.LaunchConfig(block_size=1000, num_warps=4, max_blocks=8),
         ValueError, "power of two"),
        ("bad config value", lambda: st.LaunchConfig(block_size=1024, num_warps=0, max_blocks=8),
         ValueError, "num_warps"),
    ]
    if world > 1:
        cases.append(("fused rows not divisible",
                      lambda: fused(torch.zeros(world + 1, H, **bf), res, w), ValueError,
                      "divisible"))
    if d.type == "cuda":
        cases.append(("AG device mismatch", lambda: st.all_gather_into_tensor(out8.cpu(), x8),
                      ValueError, "is on"))
    return cases


def _bad_inputs(rank, world):
    buf = st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD, size_mb=4)
    launches = []
    real_launch = Launch.launch
    Launch.launch = lambda kl, var=None: launches.append(kl.op) or real_launch(kl, var)
    results = {}
    try:
        for name, call, exc, fragment in _cases(world):
            with pytest.raises(exc) as info:
                call()
            results[name] = fragment in str(info.value) or str(info.value)
        results["launches during bad calls"] = launches[:]
        # still usable afterwards
        n = 1000
        out = torch.empty(world * n, dtype=torch.float32, device=device())
        st.all_gather_into_tensor(out, random_bits(n, torch.float32, rank))
        sync()
        ref = reference.all_gather([random_bits(n, torch.float32, r) for r in range(world)])
        results["usable after"] = (torch.equal(out.view(torch.int32), ref.view(torch.int32))
                                   and bool(launches))
    finally:
        Launch.launch = real_launch
    return results, buf.symm_mem_hdl is not None


def test_bad_inputs_raise_before_any_launch(pool):
    for results, ok in pool.run(_bad_inputs):
        assert ok
        launches = results.pop("launches during bad calls")
        assert launches == []
        assert len(results) >= 16
        assert {k: v for k, v in results.items() if v is not True} == {}


def _mismatched_sizes(rank, world):
    os.environ[env.CHECK_UNIFORM] = "1"
    try:
        x = torch.zeros(8 + rank, device=device())
        with pytest.raises(ValueError, match="ranks disagree") as info:
            st.all_gather_into_tensor(torch.zeros(world * (8 + rank), device=device()), x)
        return "rank 1" in str(info.value)
    finally:
        os.environ.pop(env.CHECK_UNIFORM)


def test_sizes_that_differ_between_ranks_are_detected_when_checking(cpu_pool):
    assert cpu_pool(3).run(_mismatched_sizes) == [True] * 3


def _overlap_cases(world):
    """Every op with two operands that share memory (read or written): each must raise naming
    the two, before any launch; the aliases an op allows must still run."""
    d = device()
    f32 = dict(dtype=torch.float32, device=d)
    S, H = 2 * world, 16
    x, w = torch.ones(S, H, **f32), torch.ones(H, **f32)
    res_ar, out_ar = torch.zeros(S, H, **f32), torch.empty(S, H, **f32)
    res, out_ag, out_rs = torch.zeros(S // world, H, **f32), torch.empty(S, H, **f32), \
        torch.empty(S // world, H, **f32)
    big = torch.zeros(9, **f32)
    inp_v = torch.zeros(world * 2, 4, **f32)
    counts = torch.zeros(world, dtype=torch.int32, device=d)
    ag_rs = st.reduce_scatter_add_rmsnorm_all_gather
    return {
        "AR out overlaps tensor": (lambda: st.all_reduce(big[:8], out=big[1:]), "tensor and out"),
        "AR+norm weight=out[0]": (lambda: st.all_reduce_add_rmsnorm(x, res_ar, out_ar[0], 1e-6,
                                                                    out=out_ar), "weight and out"),
        "AR+norm weight=residual[0]": (lambda: st.all_reduce_add_rmsnorm(x, res_ar, res_ar[0]),
                                       "residual and weight"),
        "AR+norm weight=input[0]": (lambda: st.all_reduce_add_rmsnorm(x, res_ar, x[0]),
                                    "input and weight"),
        "AR+norm out=input": (lambda: st.all_reduce_add_rmsnorm(x, res_ar, w, out=x),
                              "input and out"),
        "RS+norm+AG weight=out[0]": (lambda: ag_rs(x, res, out_ag[0], 1e-6, out=out_ag),
                                     "weight and out"),
        "RS+norm+AG weight=residual[0]": (lambda: ag_rs(x, res, res[0]), "residual and weight"),
        "RS+norm+AG residual in out": (lambda: ag_rs(x, out_ag[:S // world], w, out=out_ag),
                                       "residual and out"),
        "RS+norm weight=out[0]": (lambda: st.reduce_scatter_add_rmsnorm(
            x, res, out_rs[0], 1e-6, out=out_rs), "weight and out"),
        "RS+norm weight=input[0]": (lambda: st.reduce_scatter_add_rmsnorm(x, res, x[0]),
                                    "input and weight"),
        "RS_v counts in input": (lambda: st.reduce_scatter_v(
            torch.empty(2, 4, **f32), inp_v, inp_v.view(torch.int32)[0, :world]),
            "input and counts"),
        "AG_v inputs overlap": (lambda: st.all_gather_v(
            [torch.empty(world * 2, 4, **f32), torch.empty(world * 2, 4, **f32)],
            [inp_v[:2], inp_v[1:3]], counts), "input[0] and input[1]"),
    }


def _overlaps(rank, world):
    st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD, size_mb=4)
    cases = {name: (call, ValueError, fragment)
             for name, (call, fragment) in _overlap_cases(world).items()}
    results = errors_without_launch(cases)
    d = device()
    S, H = 2 * world, 16
    # the aliases ops allow: all_reduce in place (out=tensor), out=input of the fused op
    t = torch.full((8,), float(rank + 1), device=d)
    results["AR out=tensor allowed"] = st.all_reduce(t, out=t) is t and \
        bool((t == world * (world + 1) / 2).all())
    x = torch.ones(S, H, device=d)
    results["RS+norm+AG out=input allowed"] = st.reduce_scatter_add_rmsnorm_all_gather(
        x, torch.zeros(2, H, device=d), torch.ones(H, device=d), out=x) is x
    return results


@pytest.mark.parametrize("world", [2, 3])
def test_overlapping_operands_raise_naming_both_before_any_launch(cpu_pool, world):
    for res in cpu_pool(world).run(_overlaps):
        assert {k: v for k, v in res.items() if v is not True} == {}


@pytest.mark.parametrize("value, exc", [("nan", ValueError), ("-1", ValueError),
                                        ("1e12", ValueError), ("soon", ValueError)])
def test_timeout_env_outside_its_range_names_the_variable_and_range(monkeypatch, value, exc):
    monkeypatch.setenv(env.TIMEOUT_S, value)
    with pytest.raises(exc, match=rf"{env.TIMEOUT_S}='{value}'.*\[0, 1e9\]"):
        env.timeout_ns()


@pytest.mark.parametrize("value, exc", [(float("nan"), ValueError), (-1.0, ValueError),
                                        (1e12, ValueError), ("5", TypeError), (True, TypeError)])
def test_timeout_argument_outside_its_range_names_the_argument_and_range(value, exc):
    with pytest.raises(exc, match=r"timeout_s.*\[0, 1e9\]"):
        env.timeout_ns(value)


def test_timeout_inf_waits_forever_and_tiny_bounds_stay_bounds(monkeypatch):
    monkeypatch.setenv(env.TIMEOUT_S, "inf")
    assert env.timeout_ns() == 0 and env.timeout_s() is None
    assert env.timeout_ns(float("inf")) == 0 and env.timeout_ns(0) == 0
    assert env.timeout_ns(1e-12) == 1  # not 0, which would mean forever
    assert env.timeout_ns(env.MAX_TIMEOUT_S) == int(env.MAX_TIMEOUT_S * 1e9)


def _bad_timeouts(rank, world):
    """A bad timeout raises before any launch on every path, the fallback included."""
    st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD, size_mb=1)
    x = torch.ones(8, device=device())
    cases = {f"timeout_s={v!r}": (lambda v=v: st.all_reduce(x, timeout_s=v), exc, "timeout_s")
             for v, exc in (("5", TypeError), (float("nan"), ValueError), (1e12, ValueError))}
    os.environ[env.TIMEOUT_S] = "1e12"
    try:
        cases["env 1e12"] = (lambda: st.all_reduce(x), ValueError, env.TIMEOUT_S)
        results = errors_without_launch(cases)
        os.environ[env.TIMEOUT_S] = "inf"
        results["env inf runs"] = st.all_reduce(x)[0].item() == world
    finally:
        os.environ.pop(env.TIMEOUT_S)
    return results


def test_bad_timeouts_raise_before_any_launch(cpu_pool):
    for res in cpu_pool(2).run(_bad_timeouts):
        assert {k: v for k, v in res.items() if v is not True} == {}
