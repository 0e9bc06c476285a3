"""all_gather_v: variable counts read on the device, several tensors per launch, overflow
clamping with an error, validation; against the pure-torch reference, bit-exact."""

import pytest
import torch
import torch.distributed as dist
import triton.language as tl

import symmtriton as st
from symmtriton.config import LaunchConfig
from symmtriton.tools import reference
from symmtriton.tools.testing import WorkerPool, device, sync, tagged

from helpers import captured, raised_by, random_bits, replay_with_counts, value_error_of

CAP = 4  # rows each rank may send
SENTINEL = -7


def _schedule(world):
    """Counts per call, on the same tensors: uneven, zeros on some ranks, all full, all zero."""
    return [[(2 * r + 1) % (CAP + 1) for r in range(world)],
            [0 if r % 2 == 0 else CAP for r in range(world)],
            [CAP] * world,
            [0] * world,
            [r % 3 for r in range(world)]]


def _inputs(rank, salt):
    """hidden bf16 [CAP, 6], routing int64 [CAP, 2], probs fp32 [CAP, 3]: bit patterns."""
    return [random_bits(CAP * 6, torch.bfloat16, rank, salt).view(CAP, 6),
            random_bits(CAP * 2, torch.int64, rank, salt).view(CAP, 2),
            random_bits(CAP * 3, torch.float32, rank, salt).view(CAP, 3)]


def _outputs(buf, world, mode):
    shapes = [((world * CAP, 6), torch.bfloat16), ((world * CAP, 2), torch.int64),
              ((world * CAP, 3), torch.float32)]
    if mode == "zero_copy":
        views = buf.maybe_get_tensors([(s[0] * s[1], d) for s, d in shapes])["tensors"]
        outs = [v.view(d).view(s) for (v, _), (s, d) in zip(views, shapes)]
    else:
        outs = [torch.empty(s, dtype=d, device=device()) for s, d in shapes]
    for o in outs:
        o.view(torch.uint8).fill_(0xA5)
    return outs


def _equal_bits(a, b):
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _gather_cases(rank, world, mode, single):
    buf = st.SymmetricMemoryManager.get_buffer("ep", dist.group.WORLD, size_mb=1)
    outs = _outputs(buf, world, mode)
    guard = [o.clone() for o in outs]
    counts = torch.zeros(world, dtype=torch.int64, device=device())
    failures = []
    for salt, sched in enumerate(_schedule(world)):
        counts.copy_(torch.tensor(sched))  # same tensor every call: the plan must not bake it
        ins = _inputs(rank, salt)
        if single:
            res = st.all_gather_v(outs[0], ins[0], counts)
            ok_ret = res is outs[0]
        else:
            res = st.all_gather_v(outs, ins, counts)
            ok_ret = res is outs
        sync()
        total = sum(sched)
        for i, o in enumerate(outs[:1] if single else outs):
            ref = reference.all_gather_v([_inputs(r, salt)[i] for r in range(world)], sched)
            if not (ok_ret and _equal_bits(o[:total], ref)
                    and _equal_bits(o[total:], guard[i][total:])):
                failures.append((sched, i, mode))
            guard[i] = o.clone()  # rows past the sum keep whatever the last call left
    return failures


@pytest.mark.parametrize("mode", ["staged", "zero_copy"])
def test_all_gather_v_three_tensors_changing_counts(pool, mode):
    assert pool.run(_gather_cases, mode, False) == [[]] * pool.world_size


def test_all_gather_v_single_tensor(pool):
    assert pool.run(_gather_cases, "staged", True) == [[]] * pool.world_size


def _unit_differs_by_rank(rank, world, tuned):
    """Rank 0's input starts 2 bytes past a 4-byte boundary, so it copies in 16-bit units where
    the other ranks copy 32-bit words: every rank must still launch the same grid and move the
    same bytes per block (as tests/test_all_gather.py checks for all_gather_into_tensor)."""
    rows = 64

    def shard(r):  # rank 0's starts one bf16 element into its allocation
        bits = random_bits(rows * 6 + 1, torch.bfloat16, r)
        return (bits[1:] if r == 0 else bits[:-1]).view(rows, 6)

    inp = shard(rank)
    out = torch.empty(world * rows, 6, dtype=torch.bfloat16, device=device())
    counts = torch.tensor([rows - r for r in range(world)], device=device())
    st.all_gather_v(out, inp, counts, config=LaunchConfig(16, 1, 264) if tuned else None,
                    timeout_s=20)
    st.synchronize()
    total = sum(counts.tolist())
    ref = reference.all_gather_v([shard(r) for r in range(world)], counts.tolist())
    return _equal_bits(out[:total], ref)


@pytest.mark.parametrize("tuned", [True, False], ids=["forced_config", "default"])
def test_ranks_copying_in_different_units_launch_one_grid(pool, tuned):
    assert pool.run(_unit_differs_by_rank, tuned) == [True] * pool.world_size


def _fallback(rank, world):
    """Outputs too large for the buffer: torch.distributed, same results and errors."""
    st.SymmetricMemoryManager.get_buffer("ep", dist.group.WORLD, size_mb=1)
    rows = 300
    inp = torch.arange(rows * 1024, dtype=torch.float32).view(rows, 1024) + 1e6 * rank
    out = torch.full((world * rows, 1024), float(SENTINEL))
    counts = torch.tensor([rows - 3 * r for r in range(world)])
    st.all_gather_v(out, inp, counts)
    ref = reference.all_gather_v([torch.arange(rows * 1024, dtype=torch.float32).view(rows, 1024)
                                  + 1e6 * r for r in range(world)], counts.tolist())
    ok = torch.equal(out[:ref.shape[0]], ref) and bool((out[ref.shape[0]:] == SENTINEL).all())
    counts[0] = rows + 1
    try:
        st.all_gather_v(out, inp, counts)
        raised = False
    except ValueError as exc:
        raised = "counts [" in str(exc) and "exceeds the input capacity" in str(exc)
    return ok, raised


def test_all_gather_v_torch_fallback(cpu_pool):
    pool = cpu_pool(2)
    assert pool.run(_fallback) == [(True, True)] * 2


def _overflow(rank, world):
    """Counts over a capacity: the kernel clamps, nothing past the output is written, the call
    raises naming the counts, and the next valid call works."""
    st.SymmetricMemoryManager.get_buffer("ep", dist.group.WORLD, size_mb=1)
    cap_out = 3
    backing = torch.full((cap_out + 2, 5), SENTINEL, dtype=torch.int32, device=device())
    out = backing[:cap_out]
    inp = torch.arange(CAP * 5, dtype=torch.int32, device=device()).view(CAP, 5) + 100 * rank
    inputs = [torch.arange(CAP * 5, dtype=torch.int32).view(CAP, 5) + 100 * r for r in range(world)]
    results = []
    for sched, why in (([2] * world, "exceeds the output capacity"),
                       ([CAP + 1] + [0] * (world - 1), "exceeds the input capacity"),
                       ([-1] + [1] * (world - 1), "is negative")):
        counts = torch.tensor(sched, dtype=torch.int32, device=device())
        msg = value_error_of(lambda: st.all_gather_v(out, inp, counts))
        clamped = [min(max(c, 0), CAP) for c in sched]
        ref = reference.all_gather_v(inputs, clamped)[:cap_out]
        results.append(f"counts {sched}" in msg and why in msg
                       and torch.equal(out[:ref.shape[0]].cpu(), ref)
                       and bool((backing[cap_out:] == SENTINEL).all()))
    counts = torch.ones(world, dtype=torch.int32, device=device())
    first_rows = torch.empty(world, 5, dtype=torch.int32, device=device())
    cleared = value_error_of(lambda: st.all_gather_v(first_rows, inp, counts)) == ""
    results.append(cleared and torch.equal(first_rows.cpu(), torch.stack([t[0] for t in inputs])))
    return results


def test_all_gather_v_overflow_clamps_and_raises(pool):
    assert pool.run(_overflow) == [[True] * 4] * pool.world_size


def _bad_inputs(rank, world):
    d = device()
    out, inp = torch.empty(8, 4, device=d), torch.empty(2, 4, device=d)
    counts = torch.zeros(world, dtype=torch.int64, device=d)
    cases = {
        "counts dtype": (out, inp, counts.float()),
        "counts shape": (out, inp, torch.zeros(world + 1, dtype=torch.int64, device=d)),
        "counts type": (out, inp, [0] * world),
        "row shape": (out, torch.empty(2, 5, device=d), counts),
        "dtype": (out, inp.double(), counts),
        "list lengths": ([out], [inp, inp], counts),
        "list and tensor": ([out], inp, counts),
        "capacities": ([out, torch.empty(8, 4, device=d)], [inp, torch.empty(3, 4, device=d)],
                       counts),
        "too many": ([torch.empty(8, 4, device=d) for _ in range(5)],
                     [torch.empty(2, 4, device=d) for _ in range(5)], counts),
        "overlap": (out, out[:2], counts),
        "non-contiguous": (out, torch.empty(4, 2, device=d).t(), counts),
    }
    return raised_by(st.all_gather_v, cases)


def test_all_gather_v_validates_before_launch(cpu_pool):
    [r0, r1] = cpu_pool(2).run(_bad_inputs)
    assert r0 == r1 and None not in r0.values(), r0
    assert r0["counts dtype"] == r0["dtype"] == r0["counts type"] == "TypeError"


def _compile(rank, world, ones):
    from symmtriton.kernels.all_gather_v import _all_gather_v_kernel
    from helpers import compile_for_target

    extra = dict(cap_in=1, cap_out=1) if ones else {}
    c = compile_for_target(_all_gather_v_kernel, 90, NT=3, DTYPE=tl.int32, COUNTS_DTYPE=tl.int64,
                           RANK=1, WORLD_SIZE=3, WORLD_P2=4, BLOCK_SIZE=1024, SCOPE="sys",
                           USE_PTX=True, ALIGNED=not ones, **extra)
    ptx = c.asm["ptx"]  # aligned: 16-byte loads of the rows (common.row_elems)
    return len(c.asm["cubin"]) > 0 and "multimem" not in ptx and ("ld.global.v4" in ptx) != ones


def test_all_gather_v_compiles_for_sm90():
    with WorkerPool(1, env={"TRITON_INTERPRET": "0", "SYMMTRITON_BACKEND": "host",
                            "CUDA_VISIBLE_DEVICES": ""}, timeout=600) as pool:
        assert pool.run(_compile, False) == [True]
        assert pool.run(_compile, True) == [True]


def _graph_replays(rank, world):
    """Captured once, replayed with new counts written into the same tensor (and new inputs)."""
    buf = st.SymmetricMemoryManager.get_buffer("ep", dist.group.WORLD, size_mb=4)
    outs, ins = _outputs(buf, world, "staged"), _inputs(rank, 0)
    counts = torch.ones(world, dtype=torch.int64, device=device())
    graph = captured(lambda: st.all_gather_v(outs, ins, counts))

    def refill(salt):
        for t, new in zip(ins, _inputs(rank, salt)):
            t.copy_(new)

    def check(salt, sched):
        return all(_equal_bits(o[:sum(sched)], reference.all_gather_v(
            [_inputs(r, salt)[i] for r in range(world)], sched)) for i, o in enumerate(outs))

    return replay_with_counts(graph, counts, _schedule(world) * 2, refill, check,
                              [CAP + 1] * world)


def test_all_gather_v_graph_replay_with_changing_counts(gpu_pool):
    assert gpu_pool.run(_graph_replays) == [[]] * gpu_pool.world_size


def _compiled(rank, world):
    """Dispatch and combine as ``torch.ops.symmtriton.{all_gather_v, reduce_scatter_v}`` under
    ``torch.compile(fullgraph=True)``."""
    from symmtriton import custom_ops as co

    name = co.group_name(dist.group.WORLD)
    st.SymmetricMemoryManager.get_buffer("ep", dist.group.WORLD, size_mb=1)

    def fn(outs, ins, counts):
        torch.ops.symmtriton.all_gather_v(outs, ins, counts, name)
        back = torch.zeros(CAP, 2, dtype=torch.float32, device=outs[0].device)
        torch.ops.symmtriton.reduce_scatter_v(back, outs[1].float(), counts, name)
        return outs[0].clone(), outs[1].clone(), back

    outs = _outputs(None, world, "staged")
    sched = _schedule(world)[0]
    ins = [_inputs(rank, 0)[0], tagged(CAP * 2, torch.int64, rank).view(CAP, 2)]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = compiled(outs[:2], ins, torch.tensor(sched, device=device()))
    refs = [reference.all_gather_v([_inputs(r, 0)[0] for r in range(world)], sched),
            reference.all_gather_v([tagged(CAP * 2, torch.int64, r).view(CAP, 2)
                                    for r in range(world)], sched)]
    # every rank sent the same gathered rows back: the sum is world x this rank's slice
    start = sum(sched[:rank])
    combined = world * refs[1][start:start + sched[rank]].float()
    return [_equal_bits(g[:sum(sched)], ref) for g, ref in zip(got, refs)] + \
        [torch.equal(got[2][:sched[rank]], combined)]


@pytest.mark.parametrize("op", ["all_gather_v", "reduce_scatter_v"])
def test_v_custom_ops_mark_output_mutated(op):
    schema = getattr(torch.ops.symmtriton, op).default._schema
    written = [a.name for a in schema.arguments
               if a.alias_info is not None and a.alias_info.is_write]
    assert written == ["output"]
    assert len(schema.returns) == 0


def test_v_custom_ops_compile_fullgraph(cpu_pool):
    assert cpu_pool(2).run(_compiled) == [[True, True, True]] * 2
