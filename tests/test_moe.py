"""moe_dispatch / moe_combine: routing read on the device, rows packed per local expert, one
pre-reduced row back per (token, rank); against the pure-torch reference, exactly (rank-tagged
integer tokens in [-2, 2], experts scaling them by 1 or 2, weights 0.5 or 1: every sum over up to
8 slots is a multiple of 0.5 below 32, exact in fp32 and in bf16, whose rounding the interpreter
does not share). Kernel path, torch.distributed path and the two mixed; expert ids out of range;
validation; a rank that raised alone; torch.compile; CUDA graph replays with new routing."""

import csv

import pytest
import torch
import torch.distributed as dist

import symmtriton as st
from symmtriton.ops.driver import last_plan
from symmtriton.tools.bench import cli
from symmtriton.tools import reference
from symmtriton.tools.testing import device, sync

from helpers import buffer_without_symmetric_memory, captured, raised_by, value_error_of
from moe_cases import M, TIMEOUT_S, compiled_and_eager, expert, inputs, scales

def references(kind, rank, world, K, EL, H, dtype, salt=0):
    """``(recv_x, recv_counts, y)`` of ``rank`` from every rank's inputs."""
    ins = [inputs(kind, r, world, K, EL, H, dtype, salt) for r in range(world)]
    xs, idxs, ws = zip(*ins)
    recv = [reference.moe_dispatch(list(xs), list(idxs), world * EL, M, d) for d in range(world)]
    outs = [expert(recv[d][0], d, EL) for d in range(world)]
    y = reference.moe_combine(outs, list(idxs), list(ws), world * EL, M, rank)
    return recv[rank][0], recv[rank][1], y


def _one_step(kind, rank, world, K, EL, H, dtype, salt, idx_dtype=torch.int64,
              want_paths=("kernel", "kernel")):
    """One dispatch + experts + combine; which results differ from the reference (or which
    paths differ from ``want_paths``)."""
    x, idx, w = (t.to(device()) for t in inputs(kind, rank, world, K, EL, H, dtype, salt))
    recv, handle = st.moe_dispatch(x, idx.to(idx_dtype), world * EL, max_tokens_per_rank=M,
                                   timeout_s=TIMEOUT_S)
    paths = [_path()]
    y = st.moe_combine(expert(recv, rank, EL), idx.to(idx_dtype), w, handle, timeout_s=TIMEOUT_S)
    paths.append(_path())
    sync()
    ref_x, ref_counts, ref_y = references(kind, rank, world, K, EL, H, dtype, salt)
    bad = []
    if not torch.equal(handle.recv_counts.cpu(), ref_counts):
        bad.append(("counts", salt, handle.recv_counts.tolist(), ref_counts.tolist()))
    if not all(torch.equal(recv[j, :c].cpu(), ref_x[j, :c]) for j, c in enumerate(ref_counts)):
        bad.append(("recv_x", salt))
    if recv.dtype != dtype or y.dtype != dtype or not torch.equal(y.cpu(), ref_y):
        bad.append(("y", salt))
    if paths != list(want_paths):
        bad.append(("paths", paths))
    return bad


def _path() -> str:
    """The path the last call took: ``"kernel"`` or ``"torch"``."""
    return {"barrier": "kernel", "fallback": "torch"}[last_plan().path]


def _steps(rank, world, kind, K, EL, H, dtype, idx_dtype, fallback):
    if fallback:
        buffer_without_symmetric_memory("ep")
    else:
        st.SymmetricMemoryManager.get_buffer("ep", dist.group.WORLD, size_mb=1)
    # twice on the same shapes: the areas and the plans are reused with new routing and tokens
    paths = ("torch", "torch") if fallback else ("kernel", "kernel")
    return [b for salt in (0, 1) for b in _one_step(kind, rank, world, K, EL, H, dtype, salt,
                                                      idx_dtype, paths)]


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
#: (routing, K, local experts, H, dtype, topk_idx dtype)
CASES = {
    "uniform-k2-tail": ("uniform", 2, 2, 13, BF16, torch.int64),
    "uniform-k8-fp32": ("uniform", 8, 4, 16, FP32, torch.int32),
    "skewed-k8-tail": ("skewed", 8, 2, 13, BF16, torch.int64),
    "one_rank-k1-fp16": ("one_rank", 1, 2, 24, FP16, torch.int32),
    "every_rank-k8": ("every_rank", 8, 2, 24, BF16, torch.int64),
    "zero_tokens-k4": ("zero", 4, 2, 9, BF16, torch.int64),
}


@pytest.mark.parametrize("case", [c if c == "skewed-k8-tail" else
                                  pytest.param(c, marks=pytest.mark.w3_full) for c in CASES])
def test_dispatch_combine_exact(pool, case):
    assert pool.run(_steps, *CASES[case], False) == [[]] * pool.world_size


@pytest.mark.parametrize("case", ["uniform-k2-tail", "every_rank-k8", "zero_tokens-k4"])
def test_torch_fallback_same_results(cpu_pool, case):
    pool = cpu_pool(2)
    assert pool.run(_steps, *CASES[case], True) == [[]] * 2


def _mixed_paths(rank, world):
    """A 1 MiB buffer holds the dispatch's bf16 staging but not the combine's fp32 partials:
    the kernel's handle feeds the torch.distributed combine."""
    st.SymmetricMemoryManager.get_buffer("ep", dist.group.WORLD, size_mb=1)
    return _one_step("uniform", rank, world, 2, 2, 40000, BF16, 3, want_paths=("kernel", "torch"))


def test_kernel_dispatch_with_fallback_combine(cpu_pool):
    assert cpu_pool(2).run(_mixed_paths) == [[]] * 2


def _in_buffer(rank, world):
    """Zero-copy: ``x``, ``topk_idx``, ``expert_out`` and ``out`` lie in the symmetric buffer,
    laid out alike on every rank (capacity ``M`` rows each, ``T`` used); both ops read and write
    them where they lie and place their areas past them, so the operands stay intact."""
    buf = st.SymmetricMemoryManager.get_buffer("ep", dist.group.WORLD, size_mb=1)
    K, EL, H = 4, 2, 24
    specs = [(M * H, BF16), (M * K, torch.int64), (EL * world * M * H, BF16), (M * H, BF16)]
    views = [v.view(dt) for (v, _), (_, dt) in zip(buf.maybe_get_tensors(specs)["tensors"], specs)]
    bad = []
    for salt in (0, 1):
        x0, idx0, w = inputs("uniform", rank, world, K, EL, H, BF16, salt)
        T = x0.shape[0]
        x, idx = views[0][:T * H].view(T, H), views[1][:T * K].view(T, K)
        x.copy_(x0)
        idx.copy_(idx0)
        recv, handle = st.moe_dispatch(x, idx, world * EL, max_tokens_per_rank=M,
                                       timeout_s=TIMEOUT_S)
        paths = [_path()]
        expert_out = views[2].view(EL, world * M, H)
        torch.mul(recv, scales(rank, EL, BF16).to(device()), out=expert_out)
        out = views[3][:T * H].view(T, H)
        y = st.moe_combine(expert_out, idx, w.to(device()), handle, out=out, timeout_s=TIMEOUT_S)
        paths.append(_path())
        sync()
        ref_x, ref_counts, ref_y = references("uniform", rank, world, K, EL, H, BF16, salt)
        if not all(torch.equal(recv[j, :c].cpu(), ref_x[j, :c]) for j, c in enumerate(ref_counts)):
            bad.append(("recv_x", salt))
        if y.data_ptr() != out.data_ptr() or not torch.equal(out.cpu(), ref_y):
            bad.append(("y", salt))
        if not (torch.equal(x.cpu(), x0) and torch.equal(idx.cpu(), idx0)):
            bad.append(("operands changed", salt))
        if paths != ["kernel", "kernel"]:
            bad.append(("paths", paths))
    return bad


@pytest.mark.w3_full
def test_operands_in_the_buffer(pool):
    assert pool.run(_in_buffer) == [[]] * pool.world_size


def _bad_expert(rank, world):
    """Rank 0 names expert ``E`` (out of range): its call raises (host backend: at once; GPU: at
    the next call or synchronize) naming it, nothing lands out of bounds, and the ranks stay in
    step: the next calls work on every rank."""
    st.SymmetricMemoryManager.get_buffer("ep", dist.group.WORLD, size_mb=1)
    EL, K, H = 2, 2, 8
    x, idx, w = (t.to(device()) for t in inputs("uniform", rank, world, K, EL, H, BF16))
    if rank == 0:
        idx[0, 0] = world * EL
    state = {}

    def dispatch():
        state["recv"], state["handle"] = st.moe_dispatch(x, idx, world * EL, max_tokens_per_rank=M,
                                                         timeout_s=TIMEOUT_S)
    msg = value_error_of(dispatch)
    ok = ("expert id outside [-1, " in msg) == (rank == 0)
    return ok, _one_step("uniform", rank, world, K, EL, H, BF16, 1)


def test_expert_out_of_range_raises_and_ranks_stay_in_step(pool):
    assert pool.run(_bad_expert) == [(True, [])] * pool.world_size


def _bad_inputs(rank, world):
    st.SymmetricMemoryManager.get_buffer("ep", dist.group.WORLD, size_mb=1)
    d, E = device(), 2 * world
    x = torch.zeros(3, 8, dtype=BF16, device=d)
    idx = torch.zeros(3, 2, dtype=torch.int64, device=d)
    w = torch.ones(3, 2, device=d)
    w1 = w[:, :1].contiguous()

    def dispatch(*args, **kw):
        return st.moe_dispatch(*args, **{"max_tokens_per_rank": M, **kw})
    cases = {
        "x dtype": (x.int(), idx, E), "x shape": (x[0], idx, E),
        "idx dtype": (x, idx.float(), E), "idx tokens": (x, idx[:2], E),
        "experts % W": (x, idx, E + 1), "experts type": (x, idx, 2.0),
        "too many tokens": (torch.zeros(M + 1, 8, dtype=BF16, device=d),
                            torch.zeros(M + 1, 2, dtype=torch.int64, device=d), E),
    }
    got = raised_by(dispatch, cases)
    got["fp8"] = raised_by(lambda: dispatch(x, idx, E, use_fp8="yes"), {"": ()})[""]
    got["max tokens"] = raised_by(lambda: dispatch(x, idx, E, max_tokens_per_rank=0), {"": ()})[""]
    recv, handle = dispatch(x, idx, E)
    combine = {
        "K mismatch": (recv, idx, w1, handle), "idx K": (recv, idx[:, :1].contiguous(), w1, handle),
        "weights dtype": (recv, idx, w.int(), handle), "out shape": (recv[:1], idx, w, handle),
        "handle": (recv, idx, w, (handle.recv_counts, handle.rowmap)),
    }
    got.update(raised_by(st.moe_combine, combine))
    got["out"] = raised_by(lambda: st.moe_combine(recv, idx, w, handle, out=x[:, :4]), {"": ()})[""]
    msgs = {}
    for name, fn in (("tokens", lambda: dispatch(torch.zeros(M + 1, 8, dtype=BF16, device=d),
                                                 torch.zeros(M + 1, 2, dtype=torch.int64,
                                                             device=d), E)),
                     ("experts", lambda: dispatch(x, idx, E + 1)),
                     ("K", lambda: st.moe_combine(recv, idx, w1, handle))):
        msgs[name] = value_error_of(fn)
    try:
        dispatch(x, idx, E, use_fp8=1)
    except TypeError as exc:
        msgs["fp8"] = str(exc)
    return got, msgs


def test_validation_names_the_value_before_launch(cpu_pool):
    for got, msgs in cpu_pool(2).run(_bad_inputs):
        assert None not in got.values(), got
        assert got["x dtype"] == got["idx dtype"] == got["handle"] == got["fp8"] == "TypeError", got
        assert f"more than max_tokens_per_rank={M}" in msgs["tokens"]
        assert "num_experts=5 is not divisible by the group size 2" in msgs["experts"]
        assert msgs.get("fp8") == "moe_dispatch: use_fp8 must be a bool, got int 1"
        assert "topk_weights shape (3, 1) differs from topk_idx shape (3, 2)" in msgs["K"]


def _raised_alone(rank, world):
    """The last rank passes too many tokens (a ValueError there only): every rank's next calls
    raise CollectiveMismatchError, none hangs."""
    st.SymmetricMemoryManager.get_buffer("ep", dist.group.WORLD, size_mb=1)
    first = _one_step("uniform", rank, world, 2, 2, 8, BF16, 0)
    if rank == world - 1:
        big = torch.zeros(M + 1, 8, dtype=BF16, device=device())
        try:
            st.moe_dispatch(big, torch.zeros(M + 1, 2, dtype=torch.int64, device=device()),
                            2 * world, max_tokens_per_rank=M)
        except ValueError:
            pass
    after = []
    for salt in (1, 2):
        try:
            _one_step("uniform", rank, world, 2, 2, 8, BF16, salt)
            st.synchronize()
            after.append("returned")
        except st.CollectiveTimeoutError as exc:
            after.append(type(exc).__name__)
    return first, after


def test_a_rank_that_raised_alone_does_not_hang_its_peers(pool):
    for first, after in pool.run(_raised_alone):
        assert first == [] and after == ["CollectiveMismatchError"] * 2, (first, after)


def _layer(x, idx, w, num_experts, scale):
    """Dispatch, the experts (``scale``: :func:`scales` on the device), combine."""
    recv, handle = st.moe_dispatch(x, idx, num_experts, max_tokens_per_rank=M)
    return st.moe_combine(recv * scale, idx, w, handle), handle.recv_counts


def _compiled(rank, world):
    """``torch.compile(fullgraph=True)`` traces the pair as its two custom ops and gives the
    eager results."""
    graphs, ops, got, eager = compiled_and_eager(_layer, rank, world, 12)
    (y, counts), (y_eager, counts_eager) = got, eager
    return graphs, ops, torch.equal(y, y_eager) and torch.equal(counts, counts_eager)


@pytest.mark.w3_full
def test_torch_compile_fullgraph(pool):
    ops = ["symmtriton.moe_dispatch", "symmtriton.moe_combine"]
    assert pool.run(_compiled, timeout=600) == [(1, ops, True)] * pool.world_size


def _graph_replays(rank, world, replays):
    """Dispatch + experts + combine captured once (fixed T = M, padding by -1), replayed with new
    routing and tokens each time; exact every replay."""
    st.SymmetricMemoryManager.get_buffer("ep", dist.group.WORLD, size_mb=64)
    EL, K, H = 2, 4, 200
    x = torch.zeros(M, H, dtype=BF16, device=device())
    idx = torch.full((M, K), -1, dtype=torch.int64, device=device())
    w = torch.zeros(M, K, device=device())
    scale = scales(rank, EL, BF16).to(device())  # made before the capture (no host copy in it)
    out = {}

    def fill(salt):
        sx, sidx, sw = inputs("uniform", rank, world, K, EL, H, BF16, salt)
        T = sx.shape[0]
        x.zero_()
        idx.fill_(-1)
        x[:T], idx[:T], w[:T] = sx, sidx, sw

    def body():
        out["y"], out["counts"] = _layer(x, idx, w, world * EL, scale)
    fill(0)
    graph = captured(body)
    bad = []
    for it in range(replays):
        fill(it + 1)
        graph.replay()
        torch.cuda.synchronize()
        _, ref_counts, ref_y = references("uniform", rank, world, K, EL, H, BF16, it + 1)
        T = ref_y.shape[0]
        if not (torch.equal(out["y"][:T].cpu(), ref_y) and
                torch.equal(out["counts"].cpu(), ref_counts)):
            bad.append(it)
    st.synchronize()
    return bad[:5]


@pytest.mark.gpu
def test_graph_replays_with_new_routing(gpu_pool):
    assert gpu_pool.run(_graph_replays, 1000, timeout=600) == [[]] * gpu_pool.world_size


def _bench(rank, world, out_dir):
    return cli.main(["--ops", "moe_dispatch,moe_combine", "--tokens", "4", "--hidden", "24",
                     "--topk", "2", "--experts", str(2 * world), "--iters", "1", "--warmup", "0",
                     "--fp8", "none,dynamic", "--no-plot", "--out-dir", out_dir, "--name", "moe"])


def test_bench_rows_checked_with_their_baseline(cpu_pool, tmp_path):
    assert cpu_pool(2).run(_bench, str(tmp_path), timeout=300) == [0, 0]
    with open(tmp_path / "moe.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["op"], r["fp8"], r["variant"], r["placement"], r["check"]) for r in rows] == [
        ("moe_dispatch", "", "barrier", "staged", "ok"),
        ("moe_dispatch", "dynamic", "barrier", "staged", "ok"),
        ("moe_combine", "", "barrier", "staged", "ok")]
    assert all(float(r["time_us"]) > 0 and float(r["baseline_us"]) > 0 for r in rows)
    assert {r["size_bytes"] for r in rows} == {str(4 * 24 * 2)}
