"""torch.library custom ops (symmtriton.custom_ops): same results as the plain functions, and
``torch.compile(fullgraph=True)`` traces a module calling them with no graph break.

On CPU the compile tests use ``backend="aot_eager"`` (dynamo + functionalization, i.e. the full
tracing path of the custom ops, without inductor's C++ code generation, which costs ~10 s per
graph on a 2-core CI machine); GPU pools compile with inductor. The public functions under
``torch.compile`` (each traced as its op): tests/test_torch_compile.py."""

import pytest
import torch
import torch.distributed as dist

import symmtriton as st
from symmtriton import custom_ops as co
from symmtriton.ops import fused
from symmtriton.tools import reference
from symmtriton.tools.testing import device, sync, tagged

from helpers import random_bits

OPS = ("all_gather_into_tensor", "reduce_scatter_tensor", "reduce_scatter_add_rmsnorm_all_gather",
       "reduce_scatter_add_rmsnorm")
MUTATED = {"all_gather_into_tensor": {"output"}, "reduce_scatter_tensor": {"output"},
           "reduce_scatter_add_rmsnorm_all_gather": {"residual", "out"},
           "reduce_scatter_add_rmsnorm": {"residual", "out"}}


# -- registration (no process group needed) -------------------------------------------------------
@pytest.mark.parametrize("name", OPS)
def test_op_registered_with_mutation_annotations(name):
    schema = getattr(torch.ops.symmtriton, name).default._schema
    mutated = {a.name for a in schema.arguments
               if a.alias_info is not None and a.alias_info.is_write}
    assert mutated == MUTATED[name]
    assert len(schema.returns) == 0
    assert [a.name for a in schema.arguments if str(a.type) == "str"] == ["group_name"]


@pytest.mark.parametrize("name", sorted(co.TABLE))
def test_no_written_argument_has_a_default(name):
    """torch releases before 2.13 find a written argument by its position among the arguments
    the caller passed (ADInplaceOrView): one left to its default raises ``IndexError`` there."""
    schema = getattr(torch.ops.symmtriton, name).default._schema
    written = [a.name for a in schema.arguments
               if a.alias_info is not None and a.alias_info.is_write]
    assert written
    assert [a.name for a in schema.arguments if a.name in written and a.has_default_value()] == []


@pytest.mark.parametrize("name", ["all_reduce_", "all_reduce_out", "all_reduce_add_rmsnorm"])
def test_all_reduce_ops_take_an_optional_algorithm(name):
    args = getattr(torch.ops.symmtriton, name).default._schema.arguments
    [algo] = [a for a in args if a.name == "algorithm"]
    assert (str(algo.type), algo.default_value) == ("Optional[str]", None)


def test_group_name_arguments_are_validated():
    with pytest.raises(TypeError, match="group_name must be a str"):
        co.group_from_name(3)
    with pytest.raises(TypeError, match="ProcessGroup"):
        co.group_name("tp")
    with pytest.raises(TypeError, match="ProcessGroup"):
        co.all_gather(torch.zeros(2), group="tp")


# -- eager: the ops give the plain functions' results --------------------------------------------
def _eager_cases(rank, world):
    group = dist.group.WORLD
    name = co.group_name(group)
    buf = st.SymmetricMemoryManager.get_buffer("tp", group, size_mb=4)
    ok = {}
    # all-gather: staged, multi-dim, bit patterns of every kind
    x = random_bits(3 * 37, torch.bfloat16, rank).view(3, 37)
    ref = reference.all_gather([random_bits(3 * 37, torch.bfloat16, r).view(3, 37)
                                for r in range(world)])
    out = torch.empty(world * 3, 37, dtype=torch.bfloat16, device=device())
    ok["ag_op_returns_none"] = torch.ops.symmtriton.all_gather_into_tensor(out, x, name) is None
    plain = st.all_gather_into_tensor(torch.empty_like(out), x, group)
    sync()
    ok["ag_staged"] = torch.equal(out.view(torch.int16), plain.view(torch.int16)) and \
        torch.equal(out.view(torch.int16), ref.view(torch.int16))
    # all-gather zero-copy: the output lies in the symmetric buffer
    zc = buf.maybe_get_tensor((world * 3, 37), torch.bfloat16)["tensor"]
    co.all_gather_into_tensor(zc, x, name)
    sync()
    ok["ag_zero_copy"] = torch.equal(zc.view(torch.int16), ref.view(torch.int16))
    # reduce-scatter: staged and zero-copy (input in the buffer); small integers sum exactly
    n = 5 * world
    inp = tagged(n * 9, torch.float32, rank).view(n, 9)
    expect = reference.reduce_scatter([tagged(n * 9, torch.float32, r).view(n, 9)
                                       for r in range(world)], rank)
    rs = torch.empty(5, 9, device=device())
    torch.ops.symmtriton.reduce_scatter_tensor(rs, inp, name)
    plain = st.reduce_scatter_tensor(torch.empty_like(rs), inp, group)
    staged_in = buf.maybe_get_tensor((n, 9), torch.float32)["tensor"]
    staged_in.copy_(inp)
    rs_zc = torch.empty_like(rs)
    co.reduce_scatter_tensor(rs_zc, staged_in, name)
    sync()
    ok["rs_staged"] = torch.equal(rs, plain) and torch.equal(rs, expect)
    ok["rs_zero_copy"] = torch.equal(rs_zc, expect)
    return ok


def test_custom_ops_match_plain_functions(pool):
    for rank, ok in enumerate(pool.run(_eager_cases)):
        assert all(ok.values()), f"rank {rank}: {ok}"


def _fused_eager_cases(rank, world, dtype_name):

    dtype = getattr(torch, dtype_name)
    group = dist.group.WORLD
    name = co.group_name(group)
    s, H = 3, 40
    S = world * s
    inp = tagged(S * H, dtype, rank).view(S, H)
    weight = (1 + torch.arange(H, dtype=torch.float32) % 5 / 4).to(dtype).to(device())
    res0 = tagged(s * H, dtype, rank, 1, bound=3).view(s, H)
    ok = {}
    for op in ("reduce_scatter_add_rmsnorm_all_gather", "reduce_scatter_add_rmsnorm"):
        rows = S if op.endswith("all_gather") else s
        res_op, res_plain = res0.clone(), res0.clone()
        out_op = torch.empty(rows, H, dtype=dtype, device=device())
        getattr(torch.ops.symmtriton, op)(inp, res_op, weight, 1e-6, name, out_op)
        out_plain = getattr(fused, op)(inp, res_plain, weight, eps=1e-6, group=group)
        sync()
        ok[op] = torch.equal(out_op, out_plain) and torch.equal(res_op, res_plain) \
            and not torch.equal(res_op, res0)
    return ok


@pytest.mark.w3_full
def test_fused_custom_ops_match_plain_functions(pool):
    for rank, ok in enumerate(pool.run(_fused_eager_cases, "bfloat16")):
        assert all(ok.values()), f"rank {rank}: {ok}"


def _errors(rank, world):
    """Bad input raises the plain function's ValueError/TypeError through the op."""
    name = co.group_name(dist.group.WORLD)
    x = torch.zeros(4, device=device())
    i32 = dict(dtype=torch.int32, device=device())
    caught = {}
    for key, call in {
        "unknown_group": lambda: co.all_gather_into_tensor(torch.zeros(4 * world, device=device()),
                                                           x, "no-such-group"),
        "ag_shape": lambda: co.all_gather_into_tensor(torch.zeros(4 * world + 1, device=device()),
                                                      x, name),
        "rs_dtype": lambda: co.reduce_scatter_tensor(torch.zeros(1, **i32),
                                                     torch.zeros(world, **i32), name),
        "rs_divisible": lambda: co.reduce_scatter(torch.zeros(world + 1, device=device())),
    }.items():
        try:
            call()
            caught[key] = None
        except (ValueError, TypeError) as exc:
            caught[key] = type(exc).__name__
    return caught


def test_bad_input_raises_through_the_ops(cpu_pool):
    got = cpu_pool(2).run(_errors)
    assert got[0] == {"unknown_group": "ValueError", "ag_shape": "ValueError",
                      "rs_dtype": "TypeError", "rs_divisible": "ValueError"}


# -- torch.compile(fullgraph=True) ---------------------------------------------------------------
class _SeqParallelBlock(torch.nn.Module):
    """Column-parallel matmul, row-parallel matmul, reduce-scatter, all-gather and (when
    ``fused``) the fused reduce-scatter + add + RMSNorm + all-gather, as a sequence-parallel layer
    calls them."""

    def __init__(self, group, hidden: int, fused: bool):
        super().__init__()
        self.group = group
        self.group_name = co.group_name(group)
        self.fused = fused
        rank = dist.get_rank(group)
        # small integers: matmuls and sums stay exact in fp32, so compiled == eager bit for bit
        square = torch.arange(hidden * hidden).view(hidden, hidden)
        self.w_col = torch.nn.Parameter((square % 3 - 1.0 + rank).to(device()),
                                        requires_grad=False)
        self.w_row = torch.nn.Parameter((square % 5 - 2.0).to(device()), requires_grad=False)
        self.norm_weight = torch.nn.Parameter(1 + torch.arange(hidden, device=device()) % 4 / 4.0,
                                              requires_grad=False)

    def forward(self, x_shard: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        x = co.all_gather(x_shard, self.group)                 # [S, H]
        partial = (x @ self.w_col) @ self.w_row                # this rank's partial sums
        shard = co.reduce_scatter(partial, self.group) + 1.0   # [S/W, H]
        y = co.all_gather(shard, self.group)
        if self.fused:
            out = torch.empty_like(y)
            torch.ops.symmtriton.reduce_scatter_add_rmsnorm_all_gather(
                y, residual, self.norm_weight, 1e-6, self.group_name, out)
            y = out
        return y * 2


def _compile_case(rank, world, fused):
    torch._dynamo.reset()
    s, H = 2, 16
    block = _SeqParallelBlock(dist.group.WORLD, H, fused)
    x = tagged(s * H, torch.float32, rank, bound=2).view(s, H)
    res0 = tagged(s * H, torch.float32, rank, 1, bound=3).view(s, H)
    backend = "inductor" if device().type == "cuda" else "aot_eager"

    explain = torch._dynamo.explain(block)(x, res0.clone())
    torch._dynamo.reset()
    compiled = torch.compile(block, backend=backend, fullgraph=True)
    res_eager, res_compiled = res0.clone(), res0.clone()
    eager = block(x, res_eager)
    got = compiled(x, res_compiled)
    sync()
    text = "\n".join(str(g.graph) for g in explain.graphs)
    ops_seen = {op: text.count(f"symmtriton.{op}") for op in OPS}
    atol = 0 if not fused else 1e-5
    return {
        "graph_breaks": explain.graph_break_count,
        "graphs": explain.graph_count,
        "ops_seen": ops_seen,
        "matches_eager": torch.allclose(got, eager, rtol=0, atol=atol),
        "residual_updated": (torch.equal(res_compiled, res_eager)
                             and (not fused or not torch.equal(res_eager, res0))),
    }


@pytest.mark.w3_full
def test_compile_fullgraph_all_gather_reduce_scatter(pool):
    for rank, r in enumerate(pool.run(_compile_case, False)):
        assert r["graph_breaks"] == 0 and r["graphs"] == 1, f"rank {rank}: {r}"
        assert r["ops_seen"]["all_gather_into_tensor"] == 2, r["ops_seen"]
        assert r["ops_seen"]["reduce_scatter_tensor"] == 1, r["ops_seen"]
        assert r["matches_eager"] and r["residual_updated"], f"rank {rank}: {r}"


@pytest.mark.w3_full
def test_compile_fullgraph_fused(pool):
    for rank, r in enumerate(pool.run(_compile_case, True)):
        assert r["graph_breaks"] == 0 and r["graphs"] == 1, f"rank {rank}: {r}"
        assert r["ops_seen"]["reduce_scatter_add_rmsnorm_all_gather"] == 1, r["ops_seen"]
        assert r["matches_eager"] and r["residual_updated"], f"rank {rank}: {r}"
