"""The synchronisation protocol (kernels/barrier.py): call-sequence counters count calls on
every rank whatever the grids, a call that raised on one rank only is an error on every rank
(never silently paired with another call), a call that raised on every rank keeps the ranks in
step, and CUDA graphs replay the protocol with no host step."""

import time

import pytest
import torch
import torch.distributed as dist

import symmtriton as st
from symmtriton import context as L
from symmtriton.config import LaunchConfig
from symmtriton.kernels import protocol as P
from symmtriton.tools import reference
from symmtriton.tools.testing import device, protocol, sync, tagged

TIMEOUT_S = 20.0  # a protocol bug shows as a timeout error instead of a hang
#: how late the rank before the skipper starts its next call: time for the others to see the
#: mismatch and poison its lines first (kernels/lines.py), the order that must still read as one.
LATE_S = 1.0


def _pad_state(buf):
    """(counters, error word, barrier slots [cap, W]) of this rank's pad."""
    hdl = buf.symm_mem_hdl
    cap = L.context(buf).grid_cap
    pad = hdl.signal_pad(hdl.rank).cpu()
    slot0 = P.SEQ0 + cap
    slots = pad[slot0:slot0 + cap * hdl.world_size].view(cap, hdl.world_size)
    return pad[P.SEQ0:slot0], int(pad[P.ERR_WORD]), slots


def _ag(out, x, cfg=None):
    st.all_gather_into_tensor(out, x, config=cfg, timeout_s=TIMEOUT_S)


def _calls_across_grids(rank, world):
    with protocol("barrier"):  # the barrier's slots are checked (the lines: tests/test_lines.py)
        return _barrier_calls_across_grids(rank, world)


def _barrier_calls_across_grids(rank, world):
    buf = st.SymmetricMemoryManager.get_buffer("proto", dist.group.WORLD, size_mb=1)
    bad, calls = [], 0
    # grids 1, 3 and 2 (block 32, up to 4 blocks), and the default config
    for step, (n, cfg) in enumerate([(20, LaunchConfig(32, 1, 4)), (90, LaunchConfig(32, 1, 4)),
                                     (33, LaunchConfig(32, 1, 4)), (100, None)]):
        out = torch.empty(world * n, dtype=torch.float32, device=device())
        _ag(out, tagged(n, torch.float32, rank, step), cfg)
        rs_out = torch.empty(n, dtype=torch.float32, device=device())
        st.reduce_scatter_tensor(rs_out, tagged(world * n, torch.float32, rank, step), config=cfg,
                                 timeout_s=TIMEOUT_S)
        calls += 2
        sync()
        if not torch.equal(out, reference.all_gather([tagged(n, torch.float32, r, step)
                                                      for r in range(world)])):
            bad.append(("ag", step))
        if not torch.equal(rs_out, reference.reduce_scatter(
                [tagged(world * n, torch.float32, r, step) for r in range(world)], rank)):
            bad.append(("rs", step))
    dist.barrier()
    counters, err, slots = _pad_state(buf)
    after_calls = (set(counters.tolist()), err)
    # the last call (grid 1) left the end value of call calls - 1 in block 0's slots
    last = slots[0].tolist() == [(calls - 1) * P.BARRIERS_PER_CALL + 2] * world
    in_range = bool(((slots >= 0) & (slots <= calls * P.BARRIERS_PER_CALL)).all())
    dist.barrier()  # every rank read its pad before any rank signals again
    # a call that raises on every rank (the output is too small): the ranks stay in step
    try:
        _ag(torch.empty(3, device=device()), torch.ones(20, device=device()))
        raised = False
    except ValueError:
        raised = True
    counters, err, _ = _pad_state(buf)
    after_failure = (set(counters.tolist()), err)
    out = torch.empty(world * 20, dtype=torch.float32, device=device())
    _ag(out, tagged(20, torch.float32, rank, 9))
    sync()
    ok = torch.equal(out, reference.all_gather([tagged(20, torch.float32, r, 9)
                                                for r in range(world)]))
    return bad, after_calls, last, in_range, raised, after_failure, ok


def test_counters_count_calls_whatever_the_grids(pool):
    for bad, after_calls, last, in_range, raised, after_failure, ok in pool.run(
            _calls_across_grids):
        assert bad == []
        assert after_calls == ({8}, 0)  # every counter, every rank: 8 calls, no error
        assert last and in_range
        assert raised and after_failure == ({8 + P.SKIP_BUMP}, 0) and ok


def _skipped_call(rank, world, skipper, mode):
    with protocol(mode):
        return _skipped_call_planned(rank, world, skipper)


def _skipped_call_planned(rank, world, skipper):
    st.SymmetricMemoryManager.get_buffer("proto", dist.group.WORLD, size_mb=1)
    n = 48
    out = torch.empty(world * n, dtype=torch.float32, device=device())
    _ag(out, tagged(n, torch.float32, rank, 0))
    sync()
    first = torch.equal(out, reference.all_gather([tagged(n, torch.float32, r, 0)
                                                   for r in range(world)]))
    raised = None
    if rank == skipper:  # a local mistake on one rank, caught, and the program goes on
        try:
            _ag(torch.empty(world * n + 1, device=device()), tagged(n, torch.float32, rank, 0))
        except ValueError:
            raised = "ValueError"
    if rank == (skipper - 1) % world:
        time.sleep(LATE_S)
    after = []
    for salt in (1, 2):
        out.fill_(-100.0)
        try:
            _ag(out, tagged(n, torch.float32, rank, salt))
            st.synchronize()
            after.append("returned")
        except st.CollectiveTimeoutError as e:
            after.append(type(e).__name__)
    return first, raised, after


@pytest.mark.parametrize("mode", ["barrier", "lines"])
def test_call_skipped_on_one_rank_raises_on_every_rank(pool, mode):
    """Rank ``W - 1`` raises a ValueError on a call that the others make: their next calls must
    raise a mismatch on every rank (the ranks are out of step), never return another call's data
    nor read as a timeout; with barriers and with flag-in-data lines (kernels/lines.py). Rank
    ``W - 2`` comes late, so with lines it reads the poison of a peer that already saw the
    mismatch before (or instead of) the skipper's own lines."""
    world = pool.world_size
    res = pool.run(_skipped_call, world - 1, mode)
    for rank, (first, raised, after) in enumerate(res):
        assert first
        assert raised == ("ValueError" if rank == world - 1 else None)
        assert after == ["CollectiveMismatchError"] * 2, (rank, after)


def _graph_replays(rank, world, replays):
    dev = device()
    buf = st.SymmetricMemoryManager.get_buffer("proto", dist.group.WORLD, size_mb=8)
    n = 2048 + 8
    ag_in = torch.empty(n, dtype=torch.bfloat16, device=dev)
    # both zero-copy, side by side: a staged RS would stage at byte 0, over ag_out (scratch rule)
    views = buf.maybe_get_tensors([(world * n, torch.bfloat16)] * 2)["tensors"]
    ag_out, rs_in = (v.view(torch.bfloat16) for v, _ in views)
    rs_out = torch.empty(n, dtype=torch.bfloat16, device=dev)

    def step():
        st.all_gather_into_tensor(ag_out, ag_in)
        st.reduce_scatter_tensor(rs_out, rs_in)

    def fill(salt):
        ag_in.copy_(tagged(n, torch.bfloat16, rank, salt))
        rs_in.copy_(tagged(world * n, torch.bfloat16, rank, salt))

    fill(0)
    step()  # compiles; creates nothing new inside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    bad = []
    for it in range(replays):
        fill(it + 1)
        graph.replay()
        torch.cuda.synchronize()
        ag_ref = reference.all_gather([tagged(n, torch.bfloat16, r, it + 1) for r in range(world)])
        rs_ref = reference.reduce_scatter(
            [tagged(world * n, torch.bfloat16, r, it + 1) for r in range(world)], rank)
        if not (torch.equal(ag_out, ag_ref) and torch.equal(rs_out, rs_ref)):
            bad.append(it)
    st.synchronize()
    dist.barrier()
    counters, err, _ = _pad_state(buf)
    return bad[:5], set(counters.tolist()), err


def test_1000_graph_replays_exact_and_counted(gpu_pool):
    res = gpu_pool.run(_graph_replays, 1000, timeout=600)
    # 2 eager calls, then 2 per replay; no host step ever touched the counters
    assert res == [([], {2 + 2 * 1000}, 0)] * gpu_pool.world_size
