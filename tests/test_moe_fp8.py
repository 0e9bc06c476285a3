"""moe_dispatch with ``use_fp8=True``: every token quantised once on its rank (per group of 128
channels, ``scale = amax / 448``, 1 for a group of zeros) and sent as float8_e4m3fn with its
fp32 scales. ``recv_x`` (as bytes) and ``handle.recv_scales`` equal bit for bit the pure-torch
reference (``reference.moe_dispatch_fp8``) on rank-tagged values of every magnitude (rounding,
values far beyond the FP8 range, tiny ones, groups of zeros), hidden sizes with a tail (not a
multiple of 128 or of 16), K = 1 and 8, a rank without tokens, the kernel and the
torch.distributed path; the round trip dispatch -> dequantise -> experts -> combine is exact on
values the FP8 grid holds (multiples of 0.5 up to 3.5 per group: ``scale = 2^-7``); the checks,
the custom op's schema and fake, torch.compile, CUDA graph replays with new routing."""

import pytest
import torch
import torch.distributed as dist

import symmtriton as st
from symmtriton.ops.driver import last_plan
from symmtriton.tools import reference
from symmtriton.tools.testing import device, sync, tagged

from helpers import buffer_without_symmetric_memory, captured, errors_without_launch
from moe_cases import M, TIMEOUT_S, compiled_and_eager, expert, route, scales, tokens

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
E4M3 = torch.float8_e4m3fn


def rows(kind, rank, world, H, dtype, salt, exact=False):
    """``x`` ``[T, H]`` of ``rank`` (on the CPU). ``exact``: multiples of 0.5 in [-3.5, 3.5],
    every group of 128 holding 3.5 (so FP8 holds them exactly); else normal values of a
    magnitude per token (2^-8 to 2^8), tagged by ``rank``, token 1 far beyond the FP8 range,
    token 2 tiny. Token 0's first group is zeros either way."""
    T = tokens(kind, rank, world)
    if exact:
        x = tagged(T * H, FP32, rank, salt, bound=7).cpu().view(T, H) / 2
        x[:, ::128] = 3.5
    else:
        g = torch.Generator().manual_seed(500 + 10 * rank + salt)
        mag = torch.randint(-8, 9, (T, 1), generator=g).float().exp2()
        x = torch.randn(T, H, generator=g) * mag + rank
        x[1:2] *= 1e4
        x[2:3] *= 1e-5
    x[:1, :128] = 0
    return x.to(dtype)


def inputs(kind, rank, world, K, EL, H, dtype, salt, exact=False):
    """``(x, topk_idx, topk_weights)`` of ``rank`` (on the CPU)."""
    T = tokens(kind, rank, world)
    g = torch.Generator().manual_seed(77 + rank + salt)
    w = torch.randint(-1, 1, (T, K), generator=g).float().exp2()
    return rows(kind, rank, world, H, dtype, salt, exact), route(kind, rank, world, T, K, EL,
                                                                 salt), w


def dequantise(recv, recv_scales, dtype):
    """``recv * scale`` of its group, in ``dtype`` (views and a copy: no host sync, so it runs
    inside a CUDA graph capture)."""
    per = recv_scales[..., None].expand(*recv_scales.shape, 128)
    per = per.reshape(*recv_scales.shape[:-1], -1)[..., :recv.shape[-1]]
    return (recv.float() * per).to(dtype)


def _check_recv(kind, rank, world, K, EL, H, dtype, salt, recv, handle, exact=False):
    """What differs from the reference in ``(recv, handle)``."""
    ins = [inputs(kind, r, world, K, EL, H, dtype, salt, exact) for r in range(world)]
    ref_x, ref_s, ref_counts = reference.moe_dispatch_fp8([i[0] for i in ins],
                                                          [i[1] for i in ins], world * EL, M, rank)
    bad = []
    if recv.dtype != E4M3 or handle.recv_scales.shape != (EL, world * M, -(-H // 128)):
        bad.append(("types", recv.dtype, tuple(handle.recv_scales.shape)))
    if not torch.equal(handle.recv_counts.cpu(), ref_counts):
        bad.append(("counts", salt, handle.recv_counts.tolist(), ref_counts.tolist()))
    for j, c in enumerate(ref_counts.tolist()):
        if not torch.equal(recv[j, :c].cpu().view(torch.uint8), ref_x[j, :c].view(torch.uint8)):
            bad.append(("recv_x", salt, j))
        if not torch.equal(handle.recv_scales[j, :c].cpu(), ref_s[j, :c]):
            bad.append(("recv_scales", salt, j))
    return bad


def _path() -> str:
    return {"barrier": "kernel", "fallback": "torch"}[last_plan().path]


def _one_step(kind, rank, world, K, EL, H, dtype, salt, path):
    """A dispatch of general values, checked; then dispatch -> dequantise -> experts -> combine
    of exact values, against the unquantised reference pair."""
    x, idx, _ = (t.to(device()) for t in inputs(kind, rank, world, K, EL, H, dtype, salt))
    recv, handle = st.moe_dispatch(x, idx, world * EL, max_tokens_per_rank=M, use_fp8=True,
                                   timeout_s=TIMEOUT_S)
    paths = [_path()]
    sync()
    bad = _check_recv(kind, rank, world, K, EL, H, dtype, salt, recv, handle)
    x, idx, w = (t.to(device()) for t in inputs(kind, rank, world, K, EL, H, dtype, salt, True))
    recv, handle = st.moe_dispatch(x, idx, world * EL, max_tokens_per_rank=M, use_fp8=True,
                                   timeout_s=TIMEOUT_S)
    out = expert(dequantise(recv, handle.recv_scales, dtype), rank, EL)
    y = st.moe_combine(out, idx, w, handle, timeout_s=TIMEOUT_S)
    paths.append(_path())
    sync()
    bad += _check_recv(kind, rank, world, K, EL, H, dtype, salt, recv, handle, True)
    ins = [inputs(kind, r, world, K, EL, H, dtype, salt, True) for r in range(world)]
    xs, idxs, ws = (list(z) for z in zip(*ins))
    outs = [expert(reference.moe_dispatch(xs, idxs, world * EL, M, d)[0], d, EL)
            for d in range(world)]
    if not torch.equal(y.cpu(), reference.moe_combine(outs, idxs, ws, world * EL, M, rank)):
        bad.append(("y", salt))
    if paths != [path, path]:
        bad.append(("paths", paths))
    return bad


def _steps(rank, world, kind, K, EL, H, dtype, fallback):
    if fallback:
        buffer_without_symmetric_memory("ep")
    else:
        st.SymmetricMemoryManager.get_buffer("ep", dist.group.WORLD, size_mb=1)
    path = "torch" if fallback else "kernel"
    # twice on the same shapes: the areas and the plans are reused with new routing and tokens
    bad = [b for salt in (0, 1) for b in _one_step(kind, rank, world, K, EL, H, dtype, salt,
                                                   path)]
    x, idx, _ = (t.to(device()) for t in inputs(kind, rank, world, K, EL, H, dtype, 0))
    recv, handle = st.moe_dispatch(x, idx, world * EL, max_tokens_per_rank=M)
    if recv.dtype != dtype or handle.recv_scales is not None:
        bad.append(("plain", recv.dtype))
    return bad


#: (routing, K, local experts, H, dtype): tails of 72 (H 200) and of 8 (H 136)
CASES = {
    "uniform-k2-h200": ("uniform", 2, 2, 200, BF16),
    "every_rank-k8-h256": ("every_rank", 8, 2, 256, BF16),
    "one_rank-k1-h136-fp32": ("one_rank", 1, 2, 136, FP32),
    "zero_tokens-k4-h200-fp16": ("zero", 4, 2, 200, FP16),
}


#: W = 3 runs one case in the default tier, every case in the extended matrix
@pytest.mark.parametrize("case", [c if c == "zero_tokens-k4-h200-fp16" else
                                  pytest.param(c, marks=pytest.mark.w3_full) for c in CASES])
def test_fp8_dispatch_exact(pool, case):
    assert pool.run(_steps, *CASES[case], False) == [[]] * pool.world_size


@pytest.mark.parametrize("case", ["uniform-k2-h200", "zero_tokens-k4-h200-fp16"])
def test_fp8_torch_fallback_same_results(cpu_pool, case):
    assert cpu_pool(2).run(_steps, *CASES[case], True) == [[]] * 2


def _bad_inputs(rank, world):
    st.SymmetricMemoryManager.get_buffer("ep", dist.group.WORLD, size_mb=1)
    d, E, H = device(), 2 * world, 200
    x = torch.zeros(3, H, dtype=BF16, device=d)
    idx = torch.zeros(3, 2, dtype=torch.int64, device=d)
    recv = torch.empty(2, world * M, H, dtype=E4M3, device=d)
    counts = torch.empty(2, dtype=torch.int32, device=d)
    rowmap = torch.empty(world, M, 2, dtype=torch.int32, device=d)
    sc = torch.empty(2, world * M, 2, device=d)
    op = torch.ops.symmtriton.moe_dispatch
    name = dist.group.WORLD.group_name

    def dispatch(**kw):
        return lambda: st.moe_dispatch(x, idx, E, max_tokens_per_rank=M, **kw)
    return errors_without_launch({
        "str": (dispatch(use_fp8="yes"), TypeError, "use_fp8 must be a bool, got str 'yes'"),
        "int": (dispatch(use_fp8=1), TypeError, "use_fp8 must be a bool, got int 1"),
        "scales shape": (lambda: op(x, idx, E, M, name, recv, counts, rowmap, sc[:, :, :1] + 0),
                         ValueError, f"recv_scales must be [2, {world * M}, 2]"),
        "scales dtype": (lambda: op(x, idx, E, M, name, recv, counts, rowmap, sc.double()),
                         TypeError, "recv_scales has dtype torch.float64"),
        "recv not fp8": (lambda: op(x, idx, E, M, name, recv.to(BF16), counts, rowmap, sc),
                         TypeError, "recv_x has dtype torch.bfloat16"),
        "fp8 without scales": (lambda: op(x, idx, E, M, name, recv, counts, rowmap, None),
                               TypeError, "recv_x has dtype torch.float8_e4m3fn"),
    })


def test_validation_names_the_value_before_launch(cpu_pool):
    for got in cpu_pool(2).run(_bad_inputs):
        assert all(v is True for v in got.values()), got


def test_custom_op_schema_and_fake():
    """``recv_scales`` is an optional written argument without a default (``custom_ops``); the
    fake runs without a group."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    schema = torch.ops.symmtriton.moe_dispatch.default._schema
    written = {a.name for a in schema.arguments if a.alias_info and a.alias_info.is_write}
    assert written == {"recv_x", "recv_counts", "rowmap", "recv_scales"}
    [arg] = [a for a in schema.arguments if a.name == "recv_scales"]
    assert (str(arg.type), arg.has_default_value()) == ("Optional[Tensor]", False)
    with FakeTensorMode():
        x, idx = torch.empty(3, 200, dtype=BF16), torch.zeros(3, 2, dtype=torch.int64)
        outs = (torch.empty(2, 2 * M, 200, dtype=E4M3), torch.empty(2, dtype=torch.int32),
                torch.empty(2, M, 2, dtype=torch.int32), torch.empty(2, 2 * M, 2))
        assert torch.ops.symmtriton.moe_dispatch(x, idx, 4, M, "no group", *outs) is None


def _layer(x, idx, w, num_experts, scale):
    """FP8 dispatch, dequantise, the experts (``scale`` on the device), combine."""
    recv, handle = st.moe_dispatch(x, idx, num_experts, max_tokens_per_rank=M, use_fp8=True)
    out = dequantise(recv, handle.recv_scales, x.dtype) * scale
    return st.moe_combine(out, idx, w, handle), recv, handle.recv_scales, handle.recv_counts


def _compiled(rank, world):
    """``torch.compile(fullgraph=True)`` traces ``use_fp8=True`` as the two custom ops and gives
    the eager results."""
    graphs, ops, got, eager = compiled_and_eager(_layer, rank, world, 200)
    c = eager[3].tolist()
    same = [torch.equal(got[0], eager[0]), torch.equal(got[3], eager[3])] + [
        torch.equal(a[j, :n].view(torch.uint8) if a.dtype == E4M3 else a[j, :n],
                    b[j, :n].view(torch.uint8) if b.dtype == E4M3 else b[j, :n])
        for a, b in zip(got[1:3], eager[1:3]) for j, n in enumerate(c)]
    return graphs, ops, all(same)


@pytest.mark.w3_full
def test_torch_compile_fullgraph(pool):
    ops = ["symmtriton.moe_dispatch", "symmtriton.moe_combine"]
    assert pool.run(_compiled, timeout=600) == [(1, ops, True)] * pool.world_size


def _graph_replays(rank, world, replays):
    """FP8 dispatch + dequantise + experts + combine captured once (fixed T = M, padding by -1),
    replayed with new routing and tokens; recv_x, recv_scales and y exact every replay."""
    st.SymmetricMemoryManager.get_buffer("ep", dist.group.WORLD, size_mb=64)
    EL, K, H = 2, 4, 200
    x = torch.zeros(M, H, dtype=BF16, device=device())
    idx = torch.full((M, K), -1, dtype=torch.int64, device=device())
    w = torch.zeros(M, K, device=device())
    scale = scales(rank, EL, BF16).to(device())
    out = {}

    def fill(salt):
        sx, sidx, sw = inputs("uniform", rank, world, K, EL, H, BF16, salt, exact=salt % 2 == 0)
        T = sx.shape[0]
        x.zero_()
        idx.fill_(-1)
        x[:T], idx[:T], w[:T] = sx, sidx, sw

    def body():
        out["y"], out["recv"], out["scales"], out["counts"] = _layer(x, idx, w, world * EL, scale)
    fill(0)
    graph = captured(body)
    bad = []
    for it in range(replays):
        exact = (it + 1) % 2 == 0
        fill(it + 1)
        graph.replay()
        torch.cuda.synchronize()
        handle = st.MoeHandle(out["counts"], None, world * EL, M, out["scales"])
        wrong = _check_recv("uniform", rank, world, K, EL, H, BF16, it + 1, out["recv"], handle,
                            exact)
        if exact:
            ins = [inputs("uniform", r, world, K, EL, H, BF16, it + 1, True) for r in range(world)]
            xs, idxs, ws = (list(z) for z in zip(*ins))
            outs = [expert(reference.moe_dispatch(xs, idxs, world * EL, M, d)[0], d, EL)
                    for d in range(world)]
            ref_y = reference.moe_combine(outs, idxs, ws, world * EL, M, rank)
            wrong += [] if torch.equal(out["y"][:ref_y.shape[0]].cpu(), ref_y) else ["y"]
        if wrong:
            bad.append((it, wrong[:2]))
    st.synchronize()
    return bad[:5]


@pytest.mark.gpu
def test_graph_replays_with_new_routing(gpu_pool):
    assert gpu_pool.run(_graph_replays, 200, timeout=600) == [[]] * gpu_pool.world_size
