"""SymmetricMemoryBuffer / SymmetricMemoryManager on real process groups (CPU and GPU pools);
the host backend's segments: tests/test_host_backend.py."""

import math
import os
import re

import numpy as np
import pytest
import torch
import torch.distributed as dist

import symmtriton as st
from symmtriton.ops import driver
from symmtriton.backends.host import SHM_PREFIX, list_segments

M = st.SymmetricMemoryManager


def _shm_files():
    """This worker's segments in /dev/shm (a concurrent job's are none of this test's business)."""
    return list_segments(pid=os.getpid())


def _mapped_shm():
    with open("/proc/self/maps") as f:
        return [line for line in f if SHM_PREFIX in line]


def _lazy_cache_and_errors(rank, world):
    group = dist.group.WORLD
    out = {"init_before": M.is_initialized("tp"), "default": M._default_size_mb}
    with pytest.raises(ValueError, match="process_group"):
        M.get_buffer("tp")
    buf = M.get_buffer("tp", process_group=group, size_mb=1)
    out["init_after"] = M.is_initialized("tp")
    out["same"] = M.get_buffer("tp") is buf and M.get_buffer("tp", group, size_mb=1) is buf
    out["smaller_ok"] = M.get_buffer("tp", size_mb=0.5) is buf
    # another group without a larger size: the cached buffer (upstream Megatron-LM)
    other = dist.new_group(list(range(world)), backend="gloo")
    out["other_group_cached"] = M.get_buffer("tp", process_group=other) is buf
    with pytest.raises(TypeError):
        M.get_buffer(3, group)
    out["ok"] = buf.symm_mem_hdl is not None and buf.init_failure_reason is None
    out["rank"], out["world"] = buf.symm_mem_hdl.rank, buf.symm_mem_hdl.world_size
    M.destroy("tp")
    out["init_destroyed"] = M.is_initialized("tp")
    return out


def test_manager_lazy_cache_and_clear_errors(pool):
    res = pool.run(_lazy_cache_and_errors)
    for rank, r in enumerate(res):
        assert r == {"init_before": False, "default": 256, "init_after": True, "same": True,
                     "smaller_ok": True, "other_group_cached": True, "ok": True, "rank": rank,
                     "world": pool.world_size, "init_destroyed": False}


def _growth(rank, world):
    """A larger size_mb replaces the buffer under the same key (collectively); the next
    collective uses the new one, and a view of the old one raises instead of being used."""
    group = dist.group.WORLD
    out = {}
    M.get_buffer("first", group, size_mb=1)  # another key of the group, registered first
    old = M.get_buffer("grow", group, size_mb=1)
    stale = old.maybe_get_tensor((2 * world, 3), torch.float32)["tensor"]
    inp = torch.full((2, 3), float(rank + 1))
    want = torch.arange(1, world + 1, dtype=torch.float32).repeat_interleave(2)
    want = want[:, None].expand(-1, 3)
    st.all_gather_into_tensor(stale, inp)  # a plan on the old buffer
    out["before"] = torch.equal(stale, want)
    M.destroy("first")  # "grow" is now the group's collective buffer
    new = M.get_buffer("grow", size_mb=2.5)
    out["replaced"] = (new is not old, new.size_in_mb, new.process_group is group,
                       old.symm_mem_hdl, old.init_failure_reason, M.get_buffer("grow") is new,
                       M.get_buffer("grow", size_mb=2) is new, M.buffer_for_group(group) is new)
    fresh = new.maybe_get_tensor((2 * world, 3), torch.float32)["tensor"]
    fresh.zero_()
    st.all_gather_into_tensor(fresh, inp)
    plan = driver.last_plan()
    out["after"] = (torch.equal(fresh, want), plan.kernel.buf is new)
    for call in (lambda: st.all_gather_into_tensor(stale, inp),
                 lambda: st.reduce_scatter_tensor(torch.empty(1, 3), stale[:world]),
                 lambda: st.all_gather_into_tensor(torch.empty(2 * world, 3), stale[:2])):
        with pytest.raises(ValueError, match="destroyed or replaced by a larger one"):
            call()
    dist.barrier()
    # a larger size on a process_group passed with it: that group wins
    other = dist.new_group(list(range(world)), backend="gloo")
    third = M.get_buffer("grow", other, size_mb=3)
    out["other_group"] = (third is not new, third.process_group is other, third.size_in_mb)
    # destroy forgets the key: the next get_buffer creates a fresh one (process_group needed)
    M.destroy("grow")
    with pytest.raises(ValueError, match="process_group"):
        M.get_buffer("grow", size_mb=1)
    again = M.get_buffer("grow", group, size_mb=1)
    out["fresh"] = (again is not third, again.size_in_mb, again.symm_mem_hdl is not None)
    M.destroy("grow")
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_larger_size_replaces_the_buffer(cpu_pool, world):
    for out in cpu_pool(world).run(_growth):
        assert out["before"]
        assert out["replaced"] == (True, 2.5, True, None, "destroyed", True, True, True)
        assert out["after"] == (True, True)
        assert out["other_group"] == (True, True, 3)
        assert out["fresh"] == (True, 1, True)


def _failed_never_grown(rank, world):
    os.environ["SYMMTRITON_DISABLE"] = "1"
    try:
        buf = M.get_buffer("failed", dist.group.WORLD, size_mb=1)
        grown = M.get_buffer("failed", size_mb=4)
    finally:
        os.environ.pop("SYMMTRITON_DISABLE", None)
    out = (grown is buf, buf.size_in_mb, buf.init_failure_reason is not None)
    M.destroy("failed")
    return out


def _bad_sizes(rank, world):
    M.get_buffer("sized", dist.group.WORLD, size_mb=1)
    for bad, exc in ((float("inf"), ValueError), (float("nan"), ValueError), (0, ValueError),
                     (-1, ValueError), (-0.5, ValueError), ("8", TypeError), (True, TypeError),
                     ([8], TypeError)):
        for key in ("sized", "unborn"):  # an existing key and a new one: checked alike
            with pytest.raises(exc, match=re.escape("size_mb must be a ") + r".*"
                               + re.escape(f"got {bad!r}")):
                M.get_buffer(key, dist.group.WORLD, size_mb=bad)
    out = (M.is_initialized("unborn"), M.get_buffer("sized", size_mb=np.float64(0.5)).size_in_mb)
    M.destroy("sized")
    return out


def test_failed_buffer_is_never_grown_and_sizes_are_checked(cpu_pool):
    pool = cpu_pool(2)
    assert pool.run(_failed_never_grown) == [(True, 1, True)] * 2
    assert pool.run(_bad_sizes) == [(False, 1)] * 2


def _peer_visibility(rank, world):
    buf = M.get_buffer("vis", dist.group.WORLD, size_mb=1)
    hdl = buf.symm_mem_hdl
    mine = buf._allocate(1000, torch.int32)
    mine.copy_(torch.arange(1000, dtype=torch.int32) + 10_000 * rank)
    if buf.device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    seen = []
    for peer in range(world):
        view = hdl.get_buffer(peer, (1000,), torch.int32)
        expect = torch.arange(1000, dtype=torch.int32, device=view.device) + 10_000 * peer
        seen.append(bool(torch.equal(view, expect)))
        # offset views address the same bytes
        tail = hdl.get_buffer(peer, (10,), torch.int32, storage_offset=990)
        seen.append(bool(torch.equal(tail, expect[990:])))
    with pytest.raises(ValueError, match="buffer holds"):  # past the whole allocation
        hdl.get_buffer(0, (hdl.buffer_size // 4 + 1,), torch.int32)
    dist.barrier()
    return seen, len(hdl.buffer_ptrs), len(hdl.signal_pad_ptrs), hdl.multicast_ptr


def test_every_rank_sees_every_peer(pool):
    for seen, nb, ns, mc in pool.run(_peer_visibility):
        assert all(seen) and nb == ns == pool.world_size and mc == 0


def _layout(rank, world):
    buf = M.get_buffer("lay", dist.group.WORLD, size_mb=1)
    specs = [(3, torch.float16), (5, torch.float32), (1, torch.uint8), (7, torch.bfloat16)]
    out = {}
    for align in (16, 64, 1, 2):
        r = buf.maybe_get_tensors(specs, alignment=align)
        assert r["handle"] is buf.symm_mem_hdl
        out[align] = [(o, t.numel(), t.dtype == torch.uint8,
                       t.data_ptr() - buf.symm_buffer.data_ptr()) for t, o in r["tensors"]]
    default = buf.maybe_get_tensors(specs)
    out["default_16"] = [o for _, o in default["tensors"]]
    t = buf.maybe_get_tensor((4, 6), torch.bfloat16)
    out["tensor"] = (tuple(t["tensor"].shape), t["tensor"].dtype, t["handle"] is buf.symm_mem_hdl,
                     t["tensor"].data_ptr() == buf.symm_buffer.data_ptr())
    a = buf._allocate(10, torch.float32)
    out["allocate"] = (a.shape, a.dtype, a.data_ptr() == buf.symm_buffer.data_ptr())
    out["can"] = (buf._can_allocate(262144, torch.float32),
                  buf._can_allocate(262145, torch.float32))
    out["too_big"] = (buf.maybe_get_tensor((1024, 1025), torch.uint8),
                      buf.maybe_get_tensors([(2**20 - 8, torch.uint8), (16, torch.uint8)]))
    with pytest.raises(ValueError, match="buffer holds"):
        buf._allocate(2**20 + 1, torch.uint8)
    for bad in (0, 3, 12, -16):
        with pytest.raises(ValueError, match=f"power of two, got {bad}"):
            buf.maybe_get_tensors(specs, alignment=bad)
    with pytest.raises(TypeError, match="alignment must be an int, got 16.0"):
        buf.maybe_get_tensors(specs, alignment=16.0)
    with pytest.raises(ValueError, match="numel, dtype"):
        buf.maybe_get_tensors([(3,)])
    return out


def test_packing_alignment_and_none_forms(pool):
    for out in pool.run(_layout):
        assert out[16] == [(0, 6, True, 0), (16, 20, True, 16), (48, 1, True, 48),
                           (64, 14, True, 64)]
        assert out[64] == [(0, 6, True, 0), (64, 20, True, 64), (128, 1, True, 128),
                           (192, 14, True, 192)]
        # below a dtype's size, each start is rounded up to the dtype's size
        assert out[1] == [(0, 6, True, 0), (8, 20, True, 8), (28, 1, True, 28), (30, 14, True, 30)]
        assert out[2] == out[1]
        assert out["default_16"] == [0, 16, 48, 64]
        assert out["tensor"] == ((4, 6), torch.bfloat16, True, True)
        assert out["allocate"] == (torch.Size([10]), torch.float32, True)
        assert out["can"] == (True, False)
        assert out["too_big"] == ({"tensor": None, "handle": None},
                                  {"handle": None, "tensors": None})


def _destroy_frees(rank, world):
    before_maps = len(_mapped_shm())
    M.get_buffer("a", dist.group.WORLD, size_mb=1)
    M.get_buffer("b", dist.group.WORLD, size_mb=2)
    files_while_alive = _shm_files()
    maps_alive = len(_mapped_shm())
    M.destroy("a")
    one_left = (M.is_initialized("a"), M.is_initialized("b"))
    M.destroy()
    dist.barrier()
    return (before_maps, files_while_alive, maps_alive, len(_mapped_shm()), one_left,
            M.is_initialized("b"), os.getpid())


def test_destroy_frees_mappings_and_files(cpu_pool):
    pool = cpu_pool(3)
    pids = []
    for before, files, alive, after, one_left, b_left, pid in pool.run(_destroy_frees):
        assert files == []  # unlinked as soon as every rank mapped them
        assert alive == before + 2 * 3 and after == before
        assert one_left == (False, True) and b_left is False
        pids.append(pid)
    assert [f for f in list_segments() if f[1] in pids] == []


def _failure_agreed(rank, world):
    if rank == world - 1:
        os.environ["SYMMTRITON_DISABLE"] = "1"
    try:
        buf = M.get_buffer("fail", dist.group.WORLD, size_mb=1)
    finally:
        os.environ.pop("SYMMTRITON_DISABLE", None)
    dist.barrier()  # every rank has released its segment
    return (buf.init_failure_reason, buf.symm_buffer, buf.symm_mem_hdl,
            buf.maybe_get_tensor((4,), torch.float32), buf.maybe_get_tensors([(4, torch.float32)]),
            buf._can_allocate(1, torch.uint8), _shm_files())


def test_one_rank_failing_gives_none_forms_everywhere(pool):
    res = pool.run(_failure_agreed)
    reasons = {r[0] for r in res}
    assert len(reasons) == 1
    reason = reasons.pop()
    assert f"rank {pool.world_size - 1}: RuntimeError: disabled by SYMMTRITON_DISABLE=1" in reason
    for r in res:
        assert r[1:6] == (None, None, {"tensor": None, "handle": None},
                          {"handle": None, "tensors": None}, False)
        assert r[6] == []


def _sizes_disagree(rank, world):
    with pytest.raises(ValueError, match="ranks disagree"):
        st.SymmetricMemoryBuffer(1 + rank, dist.group.WORLD)
    with pytest.raises(ValueError, match="size_in_mb"):
        st.SymmetricMemoryBuffer(0, dist.group.WORLD)
    with pytest.raises(TypeError, match="ProcessGroup"):
        st.SymmetricMemoryBuffer(1, "tp")
    return True


def test_size_disagreement_raises_on_every_rank(cpu_pool):
    assert cpu_pool(2).run(_sizes_disagree) == [True, True]


def _api_edges(rank, world):
    buf = M.get_buffer("edges", dist.group.WORLD, size_mb=1)
    out = {}
    # a float64 after one byte, even at alignment 1, starts on 8 bytes: viewable as float64
    r = buf.maybe_get_tensors([(1, torch.uint8), (3, torch.float64)], alignment=1)
    view, offset = r["tensors"][1]
    view.view(torch.float64).copy_(torch.tensor([1.5, -2.0, 3.25], dtype=torch.float64))
    out["float64"] = (offset, buf._allocate(4, torch.float64)[1:].tolist())
    with pytest.raises(ValueError, match=r"tensor_shape entry must be >= 0, got -1"):
        buf.maybe_get_tensor((-1, 4), torch.float32)
    for bad in ((2.0, 4), (2, 4.5)):
        with pytest.raises(TypeError, match="tensor_shape entry must be an integer"):
            buf.maybe_get_tensor(bad, torch.float32)
    with pytest.raises(TypeError, match="tensor_shape must be a tuple"):
        buf.maybe_get_tensor(8, torch.float32)
    for numel in (10.5, 10.0, np.float64(10.0), True):
        for call in (lambda: buf._can_allocate(numel, torch.float32),
                     lambda: buf._allocate(numel, torch.float32),
                     lambda: buf.maybe_get_tensors([(numel, torch.float32)])):
            message = re.escape(f"numel must be an integer, got {numel!r}")
            with pytest.raises(TypeError, match=message):
                call()
    for call in (lambda: buf._can_allocate(-1, torch.float32),
                 lambda: buf._allocate(-1, torch.float32),
                 lambda: buf.maybe_get_tensors([(-1, torch.float32)])):
        with pytest.raises(ValueError, match="numel must be >= 0, got -1"):
            call()
    shape = torch.Size([3, 4])
    f32 = torch.float32
    out["integer_like"] = (
        buf._can_allocate(np.int64(10), f32), buf._can_allocate(math.prod(shape), f32),
        buf._can_allocate(torch.tensor(10), f32), buf._allocate(np.int32(6), f32).numel(),
        tuple(buf.maybe_get_tensor(shape, torch.float32)["tensor"].shape),
        tuple(buf.maybe_get_tensor((np.int64(2), 5), torch.float32)["tensor"].shape),
        buf.maybe_get_tensors([(shape.numel(), torch.float32)])["tensors"][0][0].numel())
    # meta tensors report their device, not an overlap (both would sit at address 0)
    meta = dict(dtype=torch.float32, device="meta")
    S, H = 2 * world, 8
    small, big = torch.empty(2, **meta), torch.empty(2 * world, **meta)
    for call in (lambda: st.reduce_scatter_tensor(small, big),
                 lambda: st.all_gather_into_tensor(big, small),
                 lambda: st.reduce_scatter_add_rmsnorm_all_gather(
                     torch.empty(S, H, **meta), torch.empty(2, H, **meta), torch.empty(H, **meta))):
        with pytest.raises(ValueError, match="is on the meta device"):
            call()
    return out


def test_api_edges_raise_clear_errors(cpu_pool):
    for out in cpu_pool(2).run(_api_edges):
        assert out["float64"] == (8, [1.5, -2.0, 3.25])
        assert out["integer_like"] == (True, True, True, 6, (3, 4), (2, 5), 48)
