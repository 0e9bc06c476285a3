"""Threads: collectives on one group called from several threads of a process at once cannot be
paired by the ranks, so the second call raises ConcurrentCollectiveError at once (and counts as
skipped); on the host backend (one Triton interpreter per process) that holds across groups too
(symmtriton/ops/_guard.py)."""

import contextlib
import threading

import pytest
import torch
import torch.distributed as dist

import symmtriton as st
from symmtriton.errors import ConcurrentCollectiveError
from symmtriton.launch import Launch
from symmtriton.tools.testing import device

HOLDER = "symmtriton-test-holder"


@contextlib.contextmanager
def _holder_inside(call):
    """Run ``call()`` in a thread that stops inside its first launch until the body is done:
    the body runs while that thread is inside a collective. Yields a dict holding the
    thread's result (``"result"``) or its exception (``"error"``) once the block has exited."""
    entered, leave, out = threading.Event(), threading.Event(), {}
    real = Launch.launch

    def launch(kl, var=None):
        if threading.current_thread().name == HOLDER and not entered.is_set():
            entered.set()
            leave.wait(60)
        return real(kl, var)

    def run():
        try:
            out["result"] = call()
        except Exception as exc:  # noqa: BLE001 - reported to the test
            out["error"] = exc

    Launch.launch = launch
    thread = threading.Thread(target=run, name=HOLDER)
    try:
        thread.start()
        if not entered.wait(60):
            raise RuntimeError(f"the holder thread never launched: {out}")
        yield out
    finally:
        leave.set()
        thread.join(60)
        Launch.launch = real


def _second_call(fn) -> str:
    try:
        fn()
        return "no error"
    except ConcurrentCollectiveError as exc:
        return str(exc)


def _one_group(rank, world, every_rank):
    """A thread is inside an all-reduce while another calls one on the same group: the second
    raises at once. When every rank turned one away the ranks stay in step; when only rank 0
    did, the next call raises CollectiveMismatchError on every rank instead of pairing."""
    st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD, size_mb=1)
    total = world * (world + 1) / 2
    held = torch.full((64,), float(rank + 1), device=device())
    with _holder_inside(lambda: st.all_reduce(held)) as holder:
        if every_rank or rank == 0:
            second = _second_call(lambda: st.all_reduce(torch.ones(64, device=device())))
        else:
            second = "another thread of this process"  # nothing turned away on this rank
    results = {"second raised": "another thread of this process" in second or second,
               "holder summed": bool((held == total).all()) if "result" in holder else holder}
    nxt = torch.full((64,), float(rank + 1), device=device())
    try:
        st.all_reduce(nxt)
        st.synchronize()
        results["next call"] = "summed" if bool((nxt == total).all()) else "wrong sum"
    except st.CollectiveMismatchError:
        results["next call"] = "mismatch"
    return results


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("every_rank", [True, False], ids=["every-rank", "rank-0-only"])
def test_concurrent_calls_on_one_group_raise(cpu_pool, world, every_rank):
    nxt = "summed" if every_rank else "mismatch"
    assert cpu_pool(world).run(_one_group, every_rank) == [
        {"second raised": True, "holder summed": True, "next call": nxt}] * world


def _two_groups(rank, world):
    """Host backend: a call on another group while a thread is inside one raises too (the
    Triton interpreter runs one kernel at a time per process)."""
    ranks = list(range(world))
    g1, g2 = dist.new_group(ranks), dist.new_group(ranks)
    st.SymmetricMemoryManager.get_buffer("g1", g1, size_mb=1)
    st.SymmetricMemoryManager.get_buffer("g2", g2, size_mb=1)
    held = torch.full((64,), float(rank + 1), device=device())
    with _holder_inside(lambda: st.all_reduce(held, group=g1)) as holder:
        second = _second_call(lambda: st.all_reduce(torch.ones(64, device=device()), group=g2))
    return ("any group" in second or second,
            bool((held == world * (world + 1) / 2).all()) if "result" in holder else holder)


@pytest.mark.parametrize("world", [2, 3])
def test_host_backend_calls_on_two_groups_from_two_threads_raise(cpu_pool, world):
    assert cpu_pool(world).run(_two_groups) == [(True, True)] * world
