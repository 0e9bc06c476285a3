"""reduce_scatter_v: variable counts read on the device, exact on rank-tagged integers, overflow
clamping with an error, validation."""

import pytest
import torch
import torch.distributed as dist
import triton.language as tl

import symmtriton as st
from symmtriton.tools import reference
from symmtriton.tools.testing import WorkerPool, device, sync, tagged

from helpers import (buffer_without_symmetric_memory, captured, raised_by, replay_with_counts,
                     value_error_of)

CAP = 3  # rows each rank may receive
ROW = (2, 5)
SENTINEL = -9


def _schedule(world):
    """Counts per call, on the same tensors: uneven, zeros on some ranks, all full, all zero."""
    return [[(r + 1) % (CAP + 1) for r in range(world)],
            [CAP if r % 2 == 0 else 0 for r in range(world)],
            [CAP] * world,
            [0] * world]


def _rows(rank, salt, dtype, world):
    return tagged(world * CAP * 10, dtype, rank, salt).view(world * CAP, *ROW)


def _reduce_cases(rank, world, dtype_name, mode):
    dtype = getattr(torch, dtype_name)
    buf = st.SymmetricMemoryManager.get_buffer("ep", dist.group.WORLD, size_mb=1)
    if mode == "zero_copy":
        inp = buf.maybe_get_tensor((world * CAP, *ROW), dtype)["tensor"]
    else:
        inp = torch.empty(world * CAP, *ROW, dtype=dtype, device=device())
    out = torch.full((CAP, *ROW), SENTINEL, dtype=dtype, device=device())
    counts = torch.zeros(world, dtype=torch.int32, device=device())
    failures = []
    for salt, sched in enumerate(_schedule(world)):
        counts.copy_(torch.tensor(sched))  # same tensor every call: the plan must not bake it
        inp.copy_(_rows(rank, salt, dtype, world))
        before = out.clone()
        res = st.reduce_scatter_v(out, inp, counts)
        sync()
        ref = reference.reduce_scatter_v([_rows(r, salt, dtype, world) for r in range(world)],
                                         sched, rank)
        n = sched[rank]
        if not (res is out and torch.equal(out[:n], ref) and torch.equal(out[n:], before[n:])):
            failures.append((sched, mode))
    return failures


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_reduce_scatter_v_exact_changing_counts(pool, dtype):
    assert pool.run(_reduce_cases, dtype, "staged") == [[]] * pool.world_size


def test_reduce_scatter_v_zero_copy(pool):
    assert pool.run(_reduce_cases, "bfloat16", "zero_copy") == [[]] * pool.world_size


def _fallback(rank, world):
    """Input too large for the buffer: torch.distributed, same results and errors."""
    st.SymmetricMemoryManager.get_buffer("ep", dist.group.WORLD, size_mb=1)
    rows, width = 300, 1024
    inp = tagged(world * rows * width, torch.float32, rank).view(world * rows, width)
    out = torch.full((rows, width), float(SENTINEL))
    counts = torch.tensor([rows - 3 * r for r in range(world)])
    st.reduce_scatter_v(out, inp, counts)
    ref = reference.reduce_scatter_v(
        [tagged(world * rows * width, torch.float32, r).view(world * rows, width)
         for r in range(world)], counts.tolist(), rank)
    n = counts[rank].item()
    ok = torch.equal(out[:n], ref) and bool((out[n:] == SENTINEL).all())
    counts[0] = rows + 1
    try:
        st.reduce_scatter_v(out, inp, counts)
        raised = False
    except ValueError as exc:
        raised = "counts [" in str(exc) and "exceeds the output capacity" in str(exc)
    return ok, raised


def test_reduce_scatter_v_torch_fallback(cpu_pool):
    assert cpu_pool(2).run(_fallback) == [(True, True)] * 2


def _overflow(rank, world):
    """Counts over a capacity: clamped, nothing past the output written, the call raises naming
    the counts, and the next valid call works."""
    st.SymmetricMemoryManager.get_buffer("ep", dist.group.WORLD, size_mb=1)
    cap_in = 2 * world
    backing = torch.full((CAP + 2, 4), SENTINEL, dtype=torch.float32, device=device())
    out = backing[:CAP]
    inputs = [tagged(cap_in * 4, torch.float32, r).view(cap_in, 4) for r in range(world)]
    inp = inputs[rank].to(device())
    results = []
    for sched, why in (([3] * world, "exceeds the input capacity"),
                       ([CAP + 1] + [0] * (world - 1), "exceeds the output capacity"),
                       ([1] * (world - 1) + [-2], "is negative")):
        counts = torch.tensor(sched, dtype=torch.int64, device=device())
        out.fill_(SENTINEL)
        msg = value_error_of(lambda: st.reduce_scatter_v(out, inp, counts))
        clamped, before = [], 0  # the kernels' clamping rule
        for c in sched:
            c = min(max(c, 0), CAP)
            clamped.append(min(before + c, cap_in) - min(before, cap_in))
            before += c
        start = min(sum(min(max(c, 0), CAP) for c in sched[:rank]), cap_in)
        total = torch.stack([t.double() for t in inputs]).sum(0).float().cpu()
        ref = total[start:start + clamped[rank]]
        results.append(f"counts {sched}" in msg and why in msg
                       and torch.equal(out[:clamped[rank]].cpu(), ref)
                       and bool((out[clamped[rank]:] == SENTINEL).all())
                       and bool((backing[CAP:] == SENTINEL).all()))
    counts = torch.ones(world, dtype=torch.int64, device=device())
    cleared = value_error_of(lambda: st.reduce_scatter_v(out, inp, counts)) == ""
    results.append(cleared and torch.equal(out[:1].cpu(), total[rank:rank + 1]))
    return results


def test_reduce_scatter_v_overflow_clamps_and_raises(pool):
    assert pool.run(_overflow) == [[True] * 4] * pool.world_size


def _bad_inputs(rank, world):
    d = device()
    out, inp = torch.empty(2, 4, device=d), torch.empty(8, 4, device=d)
    counts = torch.zeros(world, dtype=torch.int64, device=d)
    cases = {
        "int dtype": (out.int(), inp.int(), counts),
        "counts dtype": (out, inp, counts.to(torch.int16)),
        "counts shape": (out, inp, counts[:1]),
        "row shape": (out, torch.empty(8, 3, device=d), counts),
        "dtype mismatch": (out, inp.half(), counts),
        "overlap": (inp[:2], inp, counts),
        "list": ([out], [inp], counts),
    }
    return raised_by(st.reduce_scatter_v, cases)


def test_reduce_scatter_v_validates_before_launch(cpu_pool):
    [r0, r1] = cpu_pool(2).run(_bad_inputs)
    assert r0 == r1 and None not in r0.values(), r0
    assert r0["int dtype"] == r0["counts dtype"] == "TypeError"


def _compile(rank, world, ones):
    from symmtriton.kernels.reduce_scatter_v import _reduce_scatter_v_kernel
    from helpers import compile_for_target

    extra = dict(cap_in=1, cap_out=1, row=1) if ones else {}
    c = compile_for_target(_reduce_scatter_v_kernel, 90, DTYPE=tl.bfloat16,
                           COUNTS_DTYPE=tl.int32, RANK=1, WORLD_SIZE=3, WORLD_P2=4,
                           BLOCK_SIZE=2048, STAGE_IN=True, SCOPE="sys", USE_PTX=True,
                           ALIGNED=not ones, **extra)
    ptx = c.asm["ptx"]  # aligned: 16-byte loads of the rows (common.row_elems)
    return len(c.asm["cubin"]) > 0 and "multimem" not in ptx and ("ld.global.v4" in ptx) != ones


def test_reduce_scatter_v_compiles_for_sm90():
    with WorkerPool(1, env={"TRITON_INTERPRET": "0", "SYMMTRITON_BACKEND": "host",
                            "CUDA_VISIBLE_DEVICES": ""}, timeout=600) as pool:
        assert pool.run(_compile, False) == [True]
        assert pool.run(_compile, True) == [True]


def _graph_replays(rank, world):
    """Captured once, replayed with new counts written into the same tensor (and new inputs)."""
    st.SymmetricMemoryManager.get_buffer("ep", dist.group.WORLD, size_mb=4)
    inp = _rows(rank, 0, torch.bfloat16, world).clone()
    out = torch.zeros(CAP, *ROW, dtype=torch.bfloat16, device=device())
    counts = torch.ones(world, dtype=torch.int32, device=device())
    graph = captured(lambda: st.reduce_scatter_v(out, inp, counts))

    def check(salt, sched):
        ref = reference.reduce_scatter_v([_rows(r, salt, torch.bfloat16, world)
                                          for r in range(world)], sched, rank)
        return torch.equal(out[:sched[rank]], ref)

    return replay_with_counts(graph, counts, _schedule(world) * 2,
                              lambda salt: inp.copy_(_rows(rank, salt, torch.bfloat16, world)),
                              check, [-1] * world)


def test_reduce_scatter_v_graph_replay_with_changing_counts(gpu_pool):
    assert gpu_pool.run(_graph_replays) == [[]] * gpu_pool.world_size



def _zero_rows(rank, world, fallback):
    """Zero rows (no input or output capacity, or rows of no elements): with counts summing to
    zero a no-op on every rank, on the kernel path and the torch.distributed fallback alike;
    positive counts over a zero capacity raise the counts error, as all_gather_v does."""
    if fallback:
        buffer_without_symmetric_memory("ep")
    else:
        st.SymmetricMemoryManager.get_buffer("ep", dist.group.WORLD, size_mb=1)
    d = device()
    zeros = torch.zeros(world, dtype=torch.int32, device=d)
    cases = {"no rows": (0, 0, 4), "no input rows": (CAP, 0, 4), "no output rows": (0, 6, 4),
             "empty rows": (CAP, 6, 0)}
    results = {}
    for name, (cap_out, cap_in, width) in cases.items():
        out = torch.full((cap_out, width), float(SENTINEL), device=d)
        inp = torch.ones(cap_in, width, device=d)
        try:
            res = st.reduce_scatter_v(out, inp, zeros)
            sync()
            results[name] = res is out and bool((out == SENTINEL).all())
        except Exception as exc:  # noqa: BLE001 - reported by the test
            results[name] = f"{type(exc).__name__}: {exc}"[:200]
    msg = value_error_of(lambda: st.reduce_scatter_v(torch.empty(0, 4, device=d),
                                                     torch.empty(0, 4, device=d),
                                                     torch.ones(world, dtype=torch.int32,
                                                                device=d)))
    results["counts over zero capacity"] = f"counts {[1] * world}" in msg or msg
    results["usable after"] = _reduce_cases(rank, world, "float32", "staged") == []
    return results


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("fallback", [False, True], ids=["kernel", "fallback"])
def test_reduce_scatter_v_zero_rows_is_a_no_op(cpu_pool, world, fallback):
    for res in cpu_pool(world).run(_zero_rows, fallback):
        assert {k: v for k, v in res.items() if v is not True} == {}
