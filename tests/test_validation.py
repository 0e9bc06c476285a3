"""Bad inputs: each raises the expected error naming the bad value, before any kernel launch,
and leaves the buffer usable."""

import os

import pytest
import torch
import torch.distributed as dist

import symmtriton as st
from symmtriton import env
from symmtriton.launch import Launch
from symmtriton import reference
from symmtriton.testing import device, random_bits, sync


def _cases(world):
    d = device()
    bf = dict(dtype=torch.bfloat16, device=d)
    x8, out8 = torch.zeros(8, **bf), torch.zeros(8 * world, **bf)
    S, H = 2 * world, 16
    fin, res, w = torch.zeros(S, H, **bf), torch.zeros(2, H, **bf), torch.ones(H, **bf)
    big = torch.zeros(8 * world + 1, **bf)
    fused = st.reduce_scatter_add_rmsnorm_all_gather
    cases = [
        ("AG input not a tensor", lambda: st.all_gather_into_tensor(out8, [1, 2]), TypeError, "input must be a torch.Tensor"),
        ("AG dtype mismatch", lambda: st.all_gather_into_tensor(out8.float(), x8), TypeError, "dtype"),
        ("AG non-contiguous", lambda: st.all_gather_into_tensor(out8, torch.zeros(16, **bf)[::2]), ValueError, "contiguous"),
        ("AG output shape", lambda: st.all_gather_into_tensor(torch.zeros(8 * world + 1, **bf), x8), ValueError, "must be"),
        ("AG 0-d input", lambda: st.all_gather_into_tensor(out8, torch.zeros((), **bf)), ValueError, "at least one dimension"),
        ("AG overlapping", lambda: st.all_gather_into_tensor(big[1:], big[:8]), ValueError, "overlap"),
        ("AG group type", lambda: st.all_gather_into_tensor(out8, x8, group="tp"), TypeError, "ProcessGroup"),
        ("RS integer dtype", lambda: st.reduce_scatter_tensor(torch.zeros(8, dtype=torch.int32, device=d),
                                                              torch.zeros(8 * world, dtype=torch.int32, device=d)), TypeError, "supported"),
        ("RS output shape", lambda: st.reduce_scatter_tensor(torch.zeros(7, **bf), out8), ValueError, "must be"),
        ("RS output aliases input", lambda: st.reduce_scatter_tensor(out8[:8], out8), ValueError, "overlap"),
        ("fused 1-D input", lambda: fused(out8, res, w), ValueError, "2-D"),
        ("fused residual shape", lambda: fused(fin, torch.zeros(3, H, **bf), w), ValueError, "residual shape"),
        ("fused weight shape", lambda: fused(fin, res, torch.ones(H + 1, **bf)), ValueError, "weight shape"),
        ("fused eps", lambda: fused(fin, res, w, eps=-1.0), ValueError, "eps"),
        ("fused eps type", lambda: fused(fin, res, w, eps="small"), ValueError, "eps"),
        ("fused out shape", lambda: fused(fin, res, w, out=torch.zeros(S, H + 1, **bf)), ValueError, "out shape"),
        ("fused residual dtype", lambda: fused(fin, res.float(), w), TypeError, "dtype"),
        ("fused residual aliases input", lambda: fused(fin, fin[:2], w), ValueError, "overlap"),
        ("negative timeout", lambda: st.all_gather_into_tensor(out8, x8, timeout_s=-1), ValueError, "timeout"),
        ("manager without group", lambda: st.SymmetricMemoryManager.get_buffer("nope"), ValueError, "process_group"),
        ("bad LaunchConfig", lambda: st.LaunchConfig(block_size=1000, num_warps=4, max_blocks=8), ValueError, "power of two"),
        ("bad config value", lambda: st.LaunchConfig(block_size=1024, num_warps=0, max_blocks=8), ValueError, "num_warps"),
    ]
    if world > 1:
        cases.append(("fused rows not divisible", lambda: fused(torch.zeros(world + 1, H, **bf), res, w),
                      ValueError, "divisible"))
    if d.type == "cuda":
        cases.append(("AG device mismatch", lambda: st.all_gather_into_tensor(out8.cpu(), x8), ValueError, "is on"))
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
        results["usable after"] = torch.equal(out.view(torch.int32), ref.view(torch.int32)) and bool(launches)
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
