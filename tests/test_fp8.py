"""FP8 output of the three RMSNorm row ops (``out_dtype=``, ``scale=``) against the pure-torch
reference quantised by torch (``reference.quantise``): every element within one FP8 step of it
(the fp32 value before the cast may differ by rounding) and bit for bit equal to the op's own
unquantised output quantised by torch; scales to the dtype's rounding; tails, rows of zeros,
saturation, staged and zero-copy inputs, a given and an allocated ``out``, both protocols, the
torch.distributed fallback, the checks, the custom ops under ``torch.compile``, graph replays."""

import pytest
import torch
import torch.distributed as dist

import symmtriton as st
from symmtriton.tools import reference
from symmtriton.tools.testing import device, protocol, sync, tagged

from helpers import buffer_without_symmetric_memory, captured, errors_without_launch

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
OPS = {"ar": st.all_reduce_add_rmsnorm, "rs": st.reduce_scatter_add_rmsnorm,
       "rs_ag": st.reduce_scatter_add_rmsnorm_all_gather}
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}
#: (dtype, rows, H, placement, out_dtype, static, out given): tails (H 1004, 37), a row of
#: zeros (row 0), saturation (the static scale is small)
CASES = ((torch.bfloat16, 3, 1004, "staged", E4M3, False, False),
         (torch.bfloat16, 2, 37, "zero_copy", E4M3, True, True),
         (torch.float32, 1, 8, "staged", E5M2, False, True),
         (torch.bfloat16, 2, 64, "zero_copy", E5M2, True, False))
SCALE = 0.004


def _operands(rank, world, op, dtype, rows, H, salt):
    """``(input, residual, weight)`` of ``rank``; ``rows``: S (``ar``) or the shard's s."""
    S = rows if op == "ar" else world * rows
    inp = tagged(S * H, dtype, rank, salt).view(S, H)
    res = tagged(rows * H, dtype, 0 if op == "ar" else rank, salt + 1, bound=3).view(rows, H)
    inp[0], res[0] = 0, 0  # a row of zeros (the shard's row 0 for the reduce-scatter family)
    if op != "ar":
        inp[rows::rows] = 0
    weight = (1 + torch.arange(H, dtype=torch.float32) % 5 / 4).to(dtype).to(device())
    return inp, res, weight


def _reference(rank, world, op, dtype, rows, H, salt):
    """(normed rows, this rank's new residual) from every rank's operands."""
    ops = [_operands(r, world, op, dtype, rows, H, salt) for r in range(world)]
    inputs = [o[0] for o in ops]
    if op == "ar":
        return reference.all_reduce_add_rmsnorm(inputs, ops[0][1], ops[0][2], 1e-6)
    per = [reference.reduce_scatter_add_rmsnorm(inputs, ops[r][1], ops[r][2], 1e-6, r)
           for r in range(world)]
    normed = torch.cat([p[0] for p in per]) if op == "rs_ag" else per[rank][0]
    return normed, per[rank][1]


def _step(x: torch.Tensor, dtype) -> torch.Tensor:
    """The FP8 grid's step at ``|x|``."""
    mant, emin = (3, -6) if dtype == E4M3 else (2, -14)
    e = torch.floor(torch.log2(x.abs().clamp_min(2.0 ** -30))).clamp_min(emin)
    return torch.exp2(e - mant)


def _fp8_case(rank, world, op, proto, case, salt):
    dtype, rows, H, placement, fp8, static, out_given = case
    buf = st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD, size_mb=4)
    inp0, res0, weight = _operands(rank, world, op, dtype, rows, H, salt)
    out_rows = inp0.shape[0] if op in ("ar", "rs_ag") else rows
    scale = torch.tensor([SCALE], device=device()) if static else None
    out = torch.zeros((out_rows, H), dtype=fp8, device=device()) if out_given else None
    bad = []
    with protocol(proto):
        for it in range(2):  # the second call runs the cached plan
            res_plain, res = res0.clone(), res0.clone()
            plain = OPS[op](inp0, res_plain, weight)
            inp = inp0
            if placement == "zero_copy":  # in the scratch: after the call above, fresh per call
                inp = buf.maybe_get_tensor(inp0.shape, dtype)["tensor"].copy_(inp0)
            got = OPS[op](inp, res, weight, out=out, out_dtype=fp8, scale=scale)
            sync()
            q, scales = (got, None) if static else got
            own = reference.quantise(plain, fp8, scale)
            own_q, own_s = (own, None) if static else own
            if not torch.equal(res, res_plain) or q.dtype != fp8 or (out_given and q is not out):
                bad.append((it, "residual/out"))
            if not torch.equal(q.float(), own_q.float()) or (
                    scales is not None and not torch.equal(scales, own_s)):
                bad.append((it, "own"))
            bad += _against_reference(rank, world, op, case, salt, q, scales, scale, res)
    return bad


def _against_reference(rank, world, op, case, salt, q, scales, scale, res):
    dtype, rows, H, placement, fp8, static, out_given = case
    normed, new_res = _reference(rank, world, op, dtype, rows, H, salt)
    want = reference.quantise(normed, fp8, scale)
    want_q, want_s = (want, None) if static else want
    bad = []
    if not torch.equal(res, new_res):
        bad.append("residual")
    diff = (q.float() - want_q.float()).abs()
    if not bool((diff <= _step(torch.maximum(q.float().abs(), want_q.float().abs()), fp8)).all()):
        bad.append(("out", float(diff.max())))
    if static and fp8 == E4M3 and not bool((want_q.float().abs() == 448).any()):
        bad.append("no saturated value")
    if not static:
        if scales.shape != (q.shape[0], 1) or scales.dtype != torch.float32:
            bad.append(("scales", tuple(scales.shape), scales.dtype))
        elif not torch.allclose(scales, want_s, rtol=TOL[dtype], atol=0):
            bad.append(("scales", float((scales / want_s - 1).abs().max())))
        elif not bool((scales[0] == 1).all()) or bool(q[0].float().any()):
            bad.append("row of zeros")
    return bad


def _fp8_cases(rank, world, op, proto):
    return [(i, b) for i, case in enumerate(CASES)
            if (b := _fp8_case(rank, world, op, proto, case, i))]


#: the (op, protocol) pairs whose W = 3 case runs in the default tier (all in the full one)
W3_DEFAULT = {("ar", "lines"), ("rs_ag", "barrier")}


@pytest.mark.parametrize("op,proto", [
    pytest.param(op, proto, id=f"{op}-{proto}",
                 marks=() if (op, proto) in W3_DEFAULT else pytest.mark.w3_full)
    for op in sorted(OPS) for proto in ("lines", "barrier")])
def test_fp8_output_matches_reference(pool, op, proto):
    assert pool.run(_fp8_cases, op, proto, timeout=600) == [[]] * pool.world_size


#: (dtype, rows, H, out_dtype, static) of the all-gather's FP8 records: whole 16-byte rows, a
#: tail (H 24), rows shorter than 16 bytes (fp16 H 8), an odd H (37: bytes at any alignment)
LINK_CASES = ((torch.bfloat16, 2, 64, E4M3, False), (torch.bfloat16, 1, 24, E5M2, False),
              (torch.float16, 2, 8, E4M3, True), (torch.float32, 1, 37, E4M3, False))


def _link_case(rank, world, case, salt):
    """The FP8 all-gather of a zero-copy input on the barrier path, with the input's rows in the
    buffer: what each peer's row ``r`` holds there after the call (the record it stored over
    its input row: kernels/quant.py, ``gather_row``) against ``out`` and ``scales``."""
    dtype, rows, H, fp8, static = case
    buf = st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD, size_mb=4)
    inp0, res0, weight = _operands(rank, world, "rs_ag", dtype, rows, H, salt)
    scale = torch.tensor([SCALE], device=device()) if static else None
    with protocol("barrier"):
        plain = OPS["rs_ag"](inp0, res0.clone(), weight)
        inp = buf.maybe_get_tensor(inp0.shape, dtype)["tensor"].copy_(inp0)
        got = OPS["rs_ag"](inp, res0.clone(), weight, out_dtype=fp8, scale=scale)
        sync()
    q, scales = (got, None) if static else got
    own = reference.quantise(plain, fp8, scale)
    own_q, own_s = (own, None) if static else own
    bad = []
    if not torch.equal(q.float(), own_q.float()) or (
            scales is not None and not torch.equal(scales, own_s)):
        bad.append("own")
    raw = inp.view(torch.uint8).view(inp.shape[0], -1)
    peers = [r for r in range(inp.shape[0]) if r // rows != rank]
    if not torch.equal(raw[peers, :H], q[peers].view(torch.uint8)):
        bad.append("FP8 rows")
    if not static and not torch.equal(raw[peers, H:H + 4], scales[peers].view(torch.uint8)):
        bad.append("scales")
    return bad


def _link_cases(rank, world):
    return [(i, b) for i, case in enumerate(LINK_CASES)
            if (b := _link_case(rank, world, case, i))]


def test_fp8_all_gather_moves_fp8_records(pool):
    """Each rank quantises its rows once and the all-gather moves FP8 rows (and dynamic scales),
    not rows in the input's dtype: the peers' rows that landed in this rank's buffer are the FP8
    output's bytes."""
    assert pool.run(_link_cases, timeout=600) == [[]] * pool.world_size


#: (dtype, rows, H, placement, out_dtype, static, out given) of the FP8 all-gather beyond
#: ``CASES``: records with a tail (H 24), shorter than 16 bytes (fp16 H 8), and dynamic rows
#: whose record would not fit the row (bf16 H 3, fp32 H 1), which travel in the input's dtype
AG_CASES = ((torch.bfloat16, 2, 24, "staged", E5M2, False, False),
            (torch.float16, 2, 8, "zero_copy", E4M3, True, True),
            (torch.bfloat16, 2, 3, "zero_copy", E4M3, False, True),
            (torch.float32, 3, 1, "staged", E5M2, False, False))


def _ag_cases(rank, world):
    return [(i, b) for i, case in enumerate(AG_CASES)
            if (b := _fp8_case(rank, world, "rs_ag", "barrier", case, 10 + i))]


@pytest.mark.w3_full
def test_fp8_all_gather_records_and_short_rows_match(pool):
    assert pool.run(_ag_cases, timeout=600) == [[]] * pool.world_size


def _fallback(rank, world):
    buffer_without_symmetric_memory()
    staged = [case[:3] + ("staged",) + case[4:] for case in CASES[:3]]
    return [(op, i, b) for op in OPS for i, case in enumerate(staged)
            if (b := _fp8_case(rank, world, op, "auto", case, i))]


def test_fp8_fallback_matches(pool):
    assert pool.run(_fallback, timeout=600) == [[]] * pool.world_size


def _checks(rank, world):
    st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD, size_mb=4)
    inp, res, w = _operands(rank, world, "ar", torch.bfloat16, 2, 8, 0)
    one = torch.ones(1, device=device())
    ar = OPS["ar"]
    cases = {
        "scale without out_dtype": (lambda: ar(inp, res, w, scale=one), ValueError,
                                    "scale needs an FP8 out_dtype"),
        "unsupported out_dtype": (lambda: ar(inp, res, w, out_dtype=torch.float16), ValueError,
                                  "not supported"),
        "out_dtype not a dtype": (lambda: ar(inp, res, w, out_dtype="fp8"), TypeError,
                                  "torch.dtype"),
        "scale dtype": (lambda: ar(inp, res, w, out_dtype=E4M3, scale=one.half()), TypeError,
                        "float32"),
        "scale shape": (lambda: ar(inp, res, w, out_dtype=E4M3, scale=one.repeat(2)),
                        ValueError, "shape"),
        "scale not a tensor": (lambda: ar(inp, res, w, out_dtype=E4M3, scale=0.5), TypeError,
                               "torch.Tensor"),
        "out dtype": (lambda: ar(inp, res, w, out=torch.empty(2, 8, dtype=E5M2,
                                                              device=device()),
                                 out_dtype=E4M3), ValueError, "float8_e5m2"),
        "bf16 out with fp8 out_dtype": (lambda: ar(inp, res, w, out=torch.empty_like(inp),
                                                   out_dtype=E4M3), ValueError, "out_dtype"),
    }
    if device().type == "cpu":
        cases["scale device"] = (lambda: ar(inp, res, w, out_dtype=E4M3,
                                            scale=torch.ones(1, device="meta")), ValueError,
                                 "meta")
    return errors_without_launch(cases)


def test_fp8_bad_arguments_raise_before_launch(pool):
    for res in pool.run(_checks):
        assert all(v is True for v in res.values()), res


# -- custom ops and torch.compile ----------------------------------------------------------------
def _layer(inp, res_ar, res_rs, weight, scale):
    q1, s1 = st.all_reduce_add_rmsnorm(inp, res_ar, weight, out_dtype=E4M3)
    q2 = st.reduce_scatter_add_rmsnorm(inp, res_rs, weight, out_dtype=E5M2, scale=scale)
    q3, s3 = st.reduce_scatter_add_rmsnorm_all_gather(inp, res_rs, weight, out_dtype=E4M3)
    return [q1.float(), s1, q2.float(), q3.float(), s3, res_ar, res_rs]


def _compiled(rank, world):
    import re

    st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD, size_mb=4)
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def args():
        inp, res_ar, w = _operands(rank, world, "ar", torch.bfloat16, 2 * world, 64, 1)
        res_rs = tagged(2 * 64, torch.bfloat16, rank, 3, bound=3).view(2, 64)
        return inp, res_ar, res_rs, w, torch.tensor([SCALE], device=device())

    eager = _layer(*args())
    got = torch.compile(_layer, backend=backend, fullgraph=True)(*args())
    sync()
    ops = sorted(m.group(1) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"
                 and (m := re.match(r"symmtriton\.(\w+)", str(n.target))))
    return len(graphs), ops, [i for i, (e, g) in enumerate(zip(eager, got))
                              if not torch.equal(e, g)]


@pytest.mark.w3_full
def test_fp8_custom_ops_compile_in_one_graph(pool):
    want = sorted(["all_reduce_add_rmsnorm_fp8", "reduce_scatter_add_rmsnorm_fp8",
                   "reduce_scatter_add_rmsnorm_all_gather_fp8"])
    assert pool.run(_compiled, timeout=600) == [(1, want, [])] * pool.world_size


def test_fp8_custom_op_schemas():
    """Each row op has an ``_fp8`` form: the plain form's arguments, then ``out_dtype``,
    ``scale`` and the written ``scales``, none with a default."""
    for name in ("all_reduce_add_rmsnorm", "reduce_scatter_add_rmsnorm",
                 "reduce_scatter_add_rmsnorm_all_gather"):
        plain = getattr(torch.ops.symmtriton, name).default._schema.arguments
        args = getattr(torch.ops.symmtriton, f"{name}_fp8").default._schema.arguments
        assert [a.name for a in args[:-3]] == [a.name for a in plain]
        assert [a.name for a in args[-3:]] == ["out_dtype", "scale", "scales"]
        assert [a.name for a in args if a.has_default_value()] == []
        assert args[-1].alias_info is not None and args[-1].alias_info.is_write


# -- CUDA graphs -------------------------------------------------------------------------------
def _graph_replays(rank, world, replays):
    st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD, size_mb=32)
    s, H = 3, 1152
    inp = torch.empty(world * s, H, dtype=torch.bfloat16, device=device())
    res = torch.empty(s, H, dtype=torch.bfloat16, device=device())
    w = torch.ones(H, dtype=torch.bfloat16, device=device())
    scale = torch.tensor([SCALE], device=device())
    outs = {}

    def step():
        outs["ag"] = st.reduce_scatter_add_rmsnorm_all_gather(inp, res, w, out_dtype=E4M3)
        outs["rs"] = st.reduce_scatter_add_rmsnorm(inp, res, w, out_dtype=E4M3, scale=scale)

    bad = []
    for proto in ("lines", "barrier"):
        with protocol(proto):
            graph = captured(step)
            for it in range(replays):
                inp.copy_(tagged(world * s * H, torch.bfloat16, rank, it).view(world * s, H))
                res.copy_(tagged(s * H, torch.bfloat16, rank, it + 1, bound=2).view(s, H))
                graph.replay()
                torch.cuda.synchronize()
                (q, scales), q2 = outs["ag"], outs["rs"]
                inputs = [tagged(world * s * H, torch.bfloat16, r, it).view(world * s, H)
                          for r in range(world)]
                shard = reference.reduce_scatter(inputs, rank).float()
                r0 = tagged(s * H, torch.bfloat16, rank, it + 1, bound=2).view(s, H)
                once = (r0.float() + shard).to(torch.bfloat16)
                new_res = (once.float() + shard).to(torch.bfloat16)
                y = reference.rmsnorm(new_res, w, 1e-6)
                own_q, own_s = reference.quantise(reference.rmsnorm(once, w, 1e-6), E4M3)
                mine = slice(rank * s, (rank + 1) * s)
                if not (torch.equal(res, new_res)
                        and torch.equal(q2.float(), reference.quantise(y, E4M3, scale).float())
                        and _close(q[mine], scales[mine], own_q, own_s)):
                    bad.append((proto, it))
    return bad


def _close(q, scales, want_q, want_s) -> bool:
    """Within one FP8 step and bf16 rounding of the scales."""
    diff = (q.float() - want_q.float()).abs()
    step = _step(torch.maximum(q.float().abs(), want_q.float().abs()), q.dtype)
    return bool((diff <= step).all()) and torch.allclose(scales, want_s, rtol=TOL[torch.bfloat16])


@pytest.mark.gpu
def test_fp8_ops_replay_in_cuda_graphs(gpu_pool):
    assert gpu_pool.run(_graph_replays, 20, timeout=600) == [[]] * gpu_pool.world_size
