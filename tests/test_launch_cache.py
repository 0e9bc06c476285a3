"""Launch plans (symmtriton.ops.driver): a repeated call reuses its plan and gives the same result;
a call that differs in anything the plan depends on gets a new plan; bad input still raises after
a plan was cached; destroying buffers drops the plans; the cache keeps the most recently used;
a plan's config goes stale when the tuning table's answer changes; the direct launcher's fast
path (stand-ins for Triton on the CPU)."""

from types import SimpleNamespace as NS

import pytest
import torch
import torch.distributed as dist
from triton import knobs
from triton.compiler import CompiledKernel
from triton.runtime import driver as triton_driver

import symmtriton as st
from symmtriton import env, tuning
from symmtriton import launch as LA
from symmtriton.context import context
from symmtriton.launch import Launch
from symmtriton.ops import driver as L
from symmtriton.tools import reference
from symmtriton.tools.testing import device, protocol, sync

from helpers import random_bits


def _count_launches():
    launches = []
    real = Launch.launch
    Launch.launch = lambda kl, var=None: launches.append(kl) or real(kl, var)
    return launches, real


def _repeat_and_change(rank, world):
    st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD, size_mb=4)
    d = device()
    launches, real = _count_launches()
    results = {}
    try:
        n = 40
        x = random_bits(n, torch.float32, rank)
        out = torch.empty(world * n, dtype=torch.float32, device=d)
        ref = reference.all_gather([random_bits(n, torch.float32, r) for r in range(world)])
        for i in range(3):
            out.zero_()
            st.all_gather_into_tensor(out, x)
            sync()
            results[f"ag {i}"] = torch.equal(out.view(torch.int32), ref.view(torch.int32))
        plans = launches[:]
        results["one plan reused"] = len(plans) == 3 and plans[0] is plans[1] is plans[2]
        results["plans cached"] = len(L._PLANS) == 1
        # changed shape / pointer / dtype / timeout / config: each a new plan
        x2 = random_bits(n + 2, torch.float32, rank)
        out2 = torch.empty(world * (n + 2), dtype=torch.float32, device=d)
        st.all_gather_into_tensor(out2, x2)
        st.all_gather_into_tensor(out2[: world * n], x)            # same shape, new pointer
        st.all_gather_into_tensor(out.view(torch.int32), x.view(torch.int32))  # new dtype
        st.all_gather_into_tensor(out, x, timeout_s=100.0)
        st.all_gather_into_tensor(out, x, config=st.LaunchConfig(block_size=64, num_warps=1,
                                                                 max_blocks=2))
        sync()
        results["ag still right"] = torch.equal(out.view(torch.int32), ref.view(torch.int32))
        new = launches[3:]
        results["new plans"] = (len({id(p) for p in new}) == 5
                                and all(p is not plans[0] for p in new))
        results["ptr arg"] = (new[1].args[1] == out2.data_ptr()
                              and plans[0].args[1] == out.data_ptr())
        results["dtype arg"] = (str(new[2].constexprs["DTYPE"]) != ""
                                and new[2].constexprs["DTYPE"] == plans[0].constexprs["DTYPE"])
        results["timeout arg"] = new[3].args[-1] == 100 * 10**9
        # the config's block (the lines kernel's BLOCK at this size, else BLOCK_SIZE)
        block = new[4].constexprs.get("BLOCK", new[4].constexprs.get("BLOCK_SIZE"))
        results["config"] = block == 64
        # reduce-scatter and fused reuse plans too
        rs_in = torch.stack([random_bits(world * 16, torch.float32, r)
                             for r in range(world)])[rank].contiguous()
        rs_out = torch.empty(16, dtype=torch.float32, device=d)
        k = len(launches)
        for _ in range(2):
            st.reduce_scatter_tensor(rs_out, rs_in.to(d))
        results["rs reused"] = launches[k] is launches[k + 1]
        S, H = 2 * world, 24
        fin = torch.randn(S, H, generator=torch.Generator().manual_seed(rank)).to(d)
        w = torch.ones(H, device=d)
        res = torch.zeros(S // world, H, device=d)
        outs = []
        k = len(launches)
        for _ in range(2):
            res.zero_()
            outs.append(st.reduce_scatter_add_rmsnorm_all_gather(fin, res, w))  # new out each call
        sync()
        results["fused out=None reused"] = launches[k] is launches[k + 1]
        results["fused outs equal"] = (torch.equal(outs[0], outs[1])
                                       and outs[0].data_ptr() != outs[1].data_ptr())
        # bad input after a cached plan still raises, before any launch
        k = len(launches)
        for call, exc in [
            (lambda: st.all_gather_into_tensor(out, x.view(torch.int32)), TypeError),
            (lambda: st.all_gather_into_tensor(out[:-1], x[:-1]), ValueError),
            (lambda: st.all_gather_into_tensor(out, x, timeout_s=-1.0), ValueError),
            (lambda: st.reduce_scatter_tensor(rs_out, rs_out), ValueError),
            (lambda: st.reduce_scatter_add_rmsnorm_all_gather(fin, res, w, eps=-1.0), ValueError),
            (lambda: st.reduce_scatter_add_rmsnorm_all_gather(fin, res, w, eps=True), ValueError),
            (lambda: st.all_gather_into_tensor(out, x, group="tp"), TypeError),
        ]:
            with pytest.raises(exc):
                call()
        results["bad input: no launch"] = len(launches) == k
        # destroy drops plans and the cached context
        buf = st.SymmetricMemoryManager.get_buffer("tp")
        results["ctx cached"] = buf.__dict__.get("_launch_ctx") is not None
        st.SymmetricMemoryManager.destroy("tp")
        results["destroy drops plans"] = len(L._PLANS) == 0 and "_launch_ctx" not in buf.__dict__
        # a new buffer: a new plan (its pointers), still right
        st.SymmetricMemoryManager.get_buffer("tp2", dist.group.WORLD, size_mb=4)
        k = len(launches)
        out.zero_()
        st.all_gather_into_tensor(out, x)
        sync()
        results["after destroy"] = (torch.equal(out.view(torch.int32), ref.view(torch.int32))
                                    and launches[k] is not plans[0] and launches[k].buf is not buf)
    finally:
        Launch.launch = real
    return results


def test_plans_reused_and_renewed(cpu_pool):
    for results in cpu_pool(2).run(_repeat_and_change):
        assert {k: v for k, v in results.items() if v is not True} == {}


def _groups(rank, world):
    """A changed group gets another plan (and another buffer)."""
    sub = dist.new_group(list(range(world)))
    launches, real = _count_launches()
    try:
        n = 8
        x = random_bits(n, torch.float32, rank)
        out = torch.empty(world * n, dtype=torch.float32, device=device())
        st.all_gather_into_tensor(out, x)
        st.all_gather_into_tensor(out, x, group=sub)
        st.all_gather_into_tensor(out, x, group=sub)
        sync()
        ref = reference.all_gather([random_bits(n, torch.float32, r) for r in range(world)])
        return (torch.equal(out.view(torch.int32), ref.view(torch.int32)),
                launches[0] is not launches[1], launches[1] is launches[2],
                launches[0].buf is not launches[1].buf)
    finally:
        Launch.launch = real
        st.SymmetricMemoryManager.destroy()
        dist.destroy_process_group(sub)


def test_changed_group_gets_a_new_plan(cpu_pool):
    for r in cpu_pool(2).run(_groups):
        assert r == (True, True, True, True)


def _paths(rank, world):
    """(case, the last plan's path and algorithm) for calls that take each path; and whether
    the launch's constexprs hold its context's shared block, built once."""
    buf = st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD, size_mb=4)
    d = device()
    got = {}

    def take(case, fn, *args, **kwargs):
        fn(*args, **kwargs)
        sync()
        plan = L.last_plan()
        got[case] = (plan.path, plan.algorithm if hasattr(plan, "algorithm") else "-")

    x, out = torch.ones(64, device=d), torch.empty(64 * world, device=d)
    big = torch.ones(1 << 20, device=d)  # 4 MiB per rank: a staged all-gather does not fit
    rows, w = torch.ones(2 * world, 8, device=d), torch.ones(8, device=d)
    res = torch.zeros(2, 8, device=d)
    take("empty", st.all_gather_into_tensor, torch.empty(0, device=d), torch.empty(0, device=d))
    take("fallback", st.all_gather_into_tensor, torch.empty(world << 20, device=d), big)
    with protocol("lines"):
        take("lines", st.all_gather_into_tensor, out, x)
        take("rows lines", st.reduce_scatter_add_rmsnorm_all_gather, rows, res, w)
    with protocol("barrier"):
        take("barrier", st.all_gather_into_tensor, out, x)
        take("ar barrier", st.all_reduce, x.clone(), algorithm="two_shot")
        take("rows barrier", st.all_reduce_add_rmsnorm, rows, rows.clone(), w,
             algorithm="one_shot")
        take("v", st.reduce_scatter_v, x[:8].clone(), out.clone(),
             torch.full((world,), 8, dtype=torch.int32, device=d))
        kl = L.last_plan().kernel
        shared = LA.ctx_constexprs(context(buf))
    with protocol("push"):
        take("push", st.reduce_scatter_tensor, x.clone(), out.clone())
        take("ar push one", st.all_reduce, x.clone(), algorithm="one_shot")
        take("ar push two", st.all_reduce, x.clone(), algorithm="two_shot")
    got["shared"] = (shared is LA.ctx_constexprs(context(buf))
                     and {k: kl.constexprs[k] for k in shared} == shared)
    st.SymmetricMemoryManager.destroy("tp")
    return got


def test_plans_name_their_path(cpu_pool):
    """A plan's ``path`` (driver.PATHS) and, for the all-reduce family, ``algorithm``: what
    tools report of a call."""
    want = {"empty": ("empty", None), "fallback": ("fallback", None), "lines": ("lines", None),
            "rows lines": ("lines", None), "barrier": ("barrier", None),
            "ar barrier": ("barrier", "two_shot"), "rows barrier": ("barrier", "one_shot"),
            "v": ("barrier", "-"), "push": ("push", None), "ar push one": ("push", "one_shot"),
            "ar push two": ("push", "two_shot"), "shared": True}
    assert cpu_pool(2).run(_paths) == [want] * 2


def test_plan_cache_is_bounded():
    L.clear_plans()
    try:
        for i in range(L.PLAN_CACHE_MAX + 10):
            L.put_plan(("k", i), L.OutputPlan("empty"))
        assert len(L._PLANS) == L.PLAN_CACHE_MAX
        assert L.get_plan(("k", 0)) is None and L.get_plan(("k", L.PLAN_CACHE_MAX + 9)) is not None
        assert L.get_plan((["unhashable"],)) is None
    finally:
        L.clear_plans()


def test_timeout_env_is_reparsed_when_it_changes(monkeypatch):
    monkeypatch.delenv(env.TIMEOUT_S, raising=False)
    assert env.timeout_ns() == int(env.DEFAULT_TIMEOUT_S * 1e9)
    monkeypatch.setenv(env.TIMEOUT_S, "2.5")
    assert env.timeout_ns() == 2_500_000_000
    assert env.timeout_key(None) != env.timeout_key(1.0)
    monkeypatch.setenv(env.TIMEOUT_S, "abc")
    with pytest.raises(ValueError, match="not a number"):
        env.timeout_ns()
    monkeypatch.setenv(env.TIMEOUT_S, "0")
    assert env.timeout_ns() == 0


def test_plan_cache_evicts_the_least_recently_used():
    L.clear_plans()
    try:
        for i in range(L.PLAN_CACHE_MAX):
            L.put_plan(("k", i), L.OutputPlan("empty"))
        used = L.get_plan(("k", 0))
        assert used is not None and L.last_plan() is used  # used: now the most recent
        L.put_plan(("k", "new"), L.OutputPlan("empty"))
        assert L.get_plan(("k", 1)) is None  # the least recently used went
        assert L.get_plan(("k", 0)) is not None and L.get_plan(("k", "new")) is not None
    finally:
        L.clear_plans()


def test_config_choice_is_current_until_its_tuned_config_changes(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path / "tuning.json"))
    tuning.reload_cache()
    try:
        args = ("reduce_scatter", 1000, torch.bfloat16, 4)
        choice = L.choose_config(None, *args)
        assert choice.current() and choice.config == tuning.lookup_config(*args)
        tuning.reload_cache()  # the stamp moves, the answer does not: still current, stamp renewed
        assert choice.current() and choice.stamp == tuning.stamp()
        other = st.LaunchConfig(block_size=256, num_warps=1, max_blocks=3)
        assert other != choice.config
        tuning.store_winner(tuning.cache_key(*args), other, write=False)
        assert not choice.current()  # a plan made with it answers STALE and is rebuilt
        tuned = L.choose_config(None, *args)
        assert tuned.config == other and tuned.current()
        monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path / "other.json"))  # no entry there
        assert not tuned.current() and choice.current()  # the default again
        assert L.choose_config(other, *args).current()  # forced: always current
    finally:
        monkeypatch.undo()
        tuning.reload_cache()


def test_uniform_check_follows_the_environment(monkeypatch):
    monkeypatch.delenv(env.CHECK_UNIFORM, raising=False)
    assert not env.check_uniform()
    monkeypatch.setenv(env.CHECK_UNIFORM, "1")
    assert env.check_uniform()
    monkeypatch.setenv(env.CHECK_UNIFORM, "0")
    assert not env.check_uniform()


def test_direct_launcher_calls_the_c_entry_point_until_a_hook_is_registered(monkeypatch):
    """The GPU fast path (launch._direct_launcher), on stand-ins for Triton's compiled kernel,
    its CUDA launcher and driver: without hooks it calls the C entry point with None for the
    hooks and metadata; with a hook, Triton's launcher with both (as JITFunction.run does)."""
    calls = []

    class CudaLauncher:  # raw_launcher takes Triton's CUDA launcher by its class name
        global_scratch_size = profile_scratch_size = 0
        launch_cooperative_grid, launch_pdl = 0, 1

        def launch(self, *args):
            calls.append(("C", args))

        def __call__(self, *args):
            calls.append(("triton", args))

    kern = CompiledKernel.__new__(CompiledKernel)
    kern._run, kern.function, kern.packed_metadata = CudaLauncher(), 7, (4, 1, 0)
    kern.launch_metadata = lambda grid, stream, *args: "meta"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(triton_driver, "_active",
                        NS(get_current_device=lambda: 0, get_current_stream=lambda device: 99))
    kl = NS(grid=3, args=(11, 12), constexprs={"C": 5}, var_index=1,
            fn=NS(fn=lambda a, b, C, D=9: None))
    fast = LA._direct_launcher(kl, kern)
    assert fast(None) and calls[-1] == ("C", (3, 1, 1, 99, 7, 0, 1, None, None, (4, 1, 0), None,
                                              None, None, 11, 12, 5, 9))
    assert fast(42) and calls[-1][1][-3:] == (42, 5, 9)  # the variable argument
    hook = lambda meta: None  # noqa: E731
    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    enter.add(hook)
    try:
        assert fast(None) and calls[-1] == ("triton", (3, 1, 1, 99, 7, (4, 1, 0), "meta", enter,
                                                       leave, 11, 42, 5, 9))
    finally:
        enter.remove(hook)
    assert fast(None) and calls[-1][0] == "C"
