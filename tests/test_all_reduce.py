"""all_reduce against the pure-torch reference on CPU and GPU pools, both algorithms.

Inputs are rank-tagged small integers, so every sum is exact in bf16, fp16 and fp32."""

import pytest
import torch
import torch.distributed as dist

import symmtriton as st
from symmtriton import custom_ops as co
from symmtriton.config import LaunchConfig, all_reduce_algorithm, all_reduce_config
from symmtriton import presets
from symmtriton.presets import LINES_MAX_BYTES
from symmtriton.kernels.all_reduce import _all_reduce_one_shot_push_kernel, _all_reduce_push_kernel
from symmtriton.ops import driver
from symmtriton.tools import reference
from symmtriton.tools.testing import device, protocol, sync, tagged

from helpers import buffer_without_symmetric_memory, captured, errors_without_launch

#: odd counts, a tail inside one chunk, several chunks per slice (with the small config below)
SIZES = (1, 7, 37, 1000, 2 * 1024 + 3)
SMALL = LaunchConfig(block_size=256, num_warps=1, max_blocks=3)  # several chunks per block
MODES = ("staged", "staged_out", "zero_copy_in_place", "zero_copy_out", "out_in_buffer")


def _ar_cases(rank, world, dtype_name, algorithm, modes, sizes, config):
    dtype = getattr(torch, dtype_name)
    buf = st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD, size_mb=4)
    bad = []
    for salt, n in enumerate(sizes):
        shape = (n,) if n % 3 else (3, n // 3)
        ref = reference.all_reduce([tagged(n, dtype, r, salt).view(shape) for r in range(world)])
        for mode in modes:
            x = tagged(n, dtype, rank, salt).view(shape)
            out = None
            if mode.startswith("zero_copy"):
                specs = buf.maybe_get_tensors([(n, dtype), (n, dtype)])["tensors"]
                x = specs[0][0].view(dtype).view(shape).copy_(x)
                if mode == "zero_copy_out":
                    out = torch.full(shape, 99, dtype=dtype, device=device())
            elif mode == "out_in_buffer":
                out = buf.maybe_get_tensor(shape, dtype)["tensor"]
            elif mode == "staged_out":
                out = torch.full(shape, 99, dtype=dtype, device=device())
            before = x.clone()
            got = st.all_reduce(x, out=out, config=config, algorithm=algorithm)
            sync()
            want_obj = x if out is None else out
            ok = got is want_obj and torch.equal(got, ref)
            if out is not None:
                ok = ok and torch.equal(x, before)  # tensor unchanged
            if not ok:
                bad.append((n, mode))
    return bad


@pytest.mark.parametrize("algorithm", ["one_shot", "two_shot"])
def test_all_reduce_exact(pool, algorithm):
    assert pool.run(_ar_cases, "bfloat16", algorithm, MODES, SIZES, SMALL) == [[]] * pool.world_size


def test_all_reduce_lines_exact(pool):
    """The barrier-free one-shot (kernels/lines.py): sizes of whole 32-bit words, several chunks per
    block, every placement."""
    sizes = (2, 38, 1000, 2 * 1024 + 4)
    assert pool.run(_ar_cases, "bfloat16", "lines", MODES, sizes, SMALL) == [[]] * pool.world_size


@pytest.mark.w3_full
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_all_reduce_other_dtypes_default_config(pool, dtype):
    for algorithm in ("lines", "one_shot", "two_shot"):
        modes = ("staged", "zero_copy_in_place")
        got = pool.run(_ar_cases, dtype, algorithm, modes, (6, 1000), None)
        assert got == [[]] * pool.world_size, algorithm


def _repeat_and_default(rank, world):
    """A repeated call replays its plan; the default algorithm works; empty and 0-d tensors."""
    x0 = tagged(4099, torch.float32, rank)
    ref = reference.all_reduce([tagged(4099, torch.float32, r) for r in range(world)])
    x = x0.clone()
    out = torch.empty_like(x)
    ok = []
    for _ in range(3):
        st.all_reduce(x, out=out)
        sync()
        ok.append(torch.equal(out, ref))
    scalar = torch.tensor(float(rank + 1), device=device())
    st.all_reduce(scalar)
    empty = torch.empty(0, 4, device=device())
    ok.append(st.all_reduce(empty) is empty)
    sync()
    ok.append(scalar.item() == world * (world + 1) / 2)
    return ok


@pytest.mark.w3_full
def test_all_reduce_replay_and_default(pool):
    for ok in pool.run(_repeat_and_default):
        assert all(ok), ok


def _fallback(rank, world):
    buffer_without_symmetric_memory()
    out = []
    for n in (7, 1000):
        ref = reference.all_reduce([tagged(n, torch.bfloat16, r) for r in range(world)])
        x = tagged(n, torch.bfloat16, rank)
        y = torch.empty_like(x)
        out.append(torch.equal(st.all_reduce(x, out=y), ref) and torch.equal(st.all_reduce(x), ref))
    return out


def test_all_reduce_fallback_matches(pool):
    for res in pool.run(_fallback):
        assert res == [True, True]


def _bad_inputs(rank, world):
    st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD, size_mb=4)
    x = torch.zeros(8, device=device())
    cases = {
        "not a tensor": (lambda: st.all_reduce([1.0]), TypeError, "tensor must be a torch.Tensor"),
        "int dtype": (lambda: st.all_reduce(torch.zeros(4, dtype=torch.int32)), TypeError, "int32"),
        "strided": (lambda: st.all_reduce(torch.zeros(4, 4)[:, 0]), ValueError, "contiguous"),
        "out dtype": (lambda: st.all_reduce(x, out=torch.zeros(8, dtype=torch.float16)), TypeError,
                      "out.dtype"),
        "out shape": (lambda: st.all_reduce(x, out=torch.zeros(9)), ValueError, "out shape (9,)"),
        "overlap": (lambda: st.all_reduce(x[:4], out=x[2:6]), ValueError, "overlap"),
        "algorithm": (lambda: st.all_reduce(x, algorithm="three_shot"), ValueError, "'three_shot'"),
        "lines, odd bytes": (lambda: st.all_reduce(torch.zeros(7, dtype=torch.bfloat16),
                                                   algorithm="lines"), ValueError, "14 bytes"),
        "lines, too big": (lambda: st.all_reduce(torch.zeros(1 << 20), algorithm="lines"),
                           ValueError, "4194304 bytes"),
    }
    return errors_without_launch(cases)


def test_all_reduce_bad_inputs_raise_before_launch(cpu_pool):
    for res in cpu_pool(2).run(_bad_inputs):
        assert {k: v for k, v in res.items() if v is not True} == {}


def test_algorithm_choice():
    assert all_reduce_algorithm(4096, 2) == "one_shot"
    assert all_reduce_algorithm(256 << 20, 2) == "two_shot"
    assert all_reduce_algorithm(256 << 20, 1) == "one_shot"
    assert all_reduce_algorithm(400 << 10, 8) == "two_shot"  # one-shot reads world x the tensor
    assert all_reduce_algorithm(128 << 10, 4) == "one_shot"
    assert all_reduce_algorithm(256 << 10, 4) == "two_shot"
    with pytest.raises(ValueError, match="nbytes"):
        all_reduce_algorithm(-1, 2)


@pytest.mark.parametrize("mib, chunk_kib, warps", [(1, 8, 8), (2, 16, 16), (4, 16, 16), (8, 32, 16),
                                                   (16, 64, 16), (256, 64, 16)])
def test_two_shot_chunks_grow_with_the_slice(mib, chunk_kib, warps):
    """config.all_reduce_config: two-shot chunks by the slice's size (bf16, 2 ranks)."""
    cfg = all_reduce_config((mib << 20) // 2, torch.bfloat16, 2, "two_shot")
    assert (cfg.block_size * 2, cfg.num_warps) == (chunk_kib << 10, warps)
    assert all_reduce_config(1000, torch.float32, 2, "one_shot").block_size == 1024
    # beyond 2 ranks small slices take 16 KiB chunks and 16 warps too (a slice is a quarter)
    cfg = all_reduce_config((mib << 20) // 2, torch.bfloat16, 4, "two_shot")
    assert (cfg.block_size * 2, cfg.num_warps) == (min(64, max(16, mib * 2)) << 10, 16)


def _graph_replays(rank, world, replays):
    buf = st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD, size_mb=64)
    n = (1 << 20) + 5
    x = torch.empty(n, dtype=torch.bfloat16, device=device())
    refs = {salt: reference.all_reduce([tagged(n, torch.bfloat16, r, salt) for r in range(world)])
            for salt in range(2)}
    sym = buf.maybe_get_tensor((n,), torch.bfloat16)["tensor"]
    outs = {a: torch.empty_like(x) for a in ("one_shot", "two_shot")}

    def staged():
        for algo, out in outs.items():
            st.all_reduce(x, out=out, algorithm=algo)

    def in_place():  # zero-copy; a graph of its own: the staged calls stage at byte 0, over sym
        st.all_reduce(sym)

    graphs = captured(staged), captured(in_place)
    bad = []
    for i in range(replays):
        salt = i % 2
        x.copy_(tagged(n, torch.bfloat16, rank, salt))
        graphs[0].replay()
        sym.copy_(x)
        graphs[1].replay()
        torch.cuda.synchronize()
        for algo, out in outs.items():
            if not torch.equal(out, refs[salt]):
                bad.append((i, algo))
        if not torch.equal(sym, refs[salt]):
            bad.append((i, "in place"))
    st.synchronize()
    return bad


def test_all_reduce_cuda_graph_replay(gpu_pool):
    assert gpu_pool.run(_graph_replays, 20, timeout=600) == [[]] * gpu_pool.world_size


# -- custom ops (torch.library) and torch.compile ----------------------------------------------
@pytest.mark.parametrize("name,mutated", [("all_reduce_", {"tensor"}), ("all_reduce_out", {"out"}),
                                          ("all_reduce_add_rmsnorm", {"residual", "out"}),
                                          ("all_reduce_add_rmsnorm_fp8",
                                           {"residual", "out", "scales"})])
def test_custom_ops_registered_with_mutation_annotations(name, mutated):
    schema = getattr(torch.ops.symmtriton, name).default._schema
    written = {a.name for a in schema.arguments
               if a.alias_info is not None and a.alias_info.is_write}
    assert written == mutated
    assert len(schema.returns) == 0


def _layer(x, residual, weight, group_name):
    """A tensor-parallel boundary as a model writes it: fused all-reduce + add + RMSNorm, then an
    in-place all-reduce and an out-of-place one."""
    out = torch.empty_like(x)
    torch.ops.symmtriton.all_reduce_add_rmsnorm(x * 2, residual, weight, 1e-6, group_name, out)
    y = out + 1
    torch.ops.symmtriton.all_reduce_(y, group_name)
    z = torch.empty_like(y)
    torch.ops.symmtriton.all_reduce_out(y, group_name, z)
    return z


def _compiled_matches_eager(rank, world):
    torch._dynamo.reset()
    st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD, size_mb=4)
    name = co.group_name(dist.group.WORLD)
    S, H = 3, 40
    x = tagged(S * H, torch.float32, rank).view(S, H)
    res0 = tagged(S * H, torch.float32, 0, 1, bound=3).view(S, H)
    weight = torch.ones(H, device=device())
    res_eager, res_compiled = res0.clone(), res0.clone()
    eager = _layer(x, res_eager, weight, name)
    layer = torch.compile(_layer, backend="aot_eager", fullgraph=True)
    compiled = layer(x, res_compiled, weight, name)
    sync()
    inputs = [2 * tagged(S * H, torch.float32, r).view(S, H) for r in range(world)]
    normed, new_res = reference.all_reduce_add_rmsnorm(inputs, res0, weight, 1e-6)
    expect = (normed + 1) * world * world
    return (torch.equal(res_eager, new_res) and torch.equal(res_compiled, new_res),
            torch.allclose(eager, expect, rtol=1e-5, atol=1e-4), torch.equal(compiled, eager))


def test_custom_ops_eager_and_compiled_fullgraph(cpu_pool):
    for res in cpu_pool(2).run(_compiled_matches_eager):
        assert res == (True, True, True)


def _ar_push_cases(rank, world, sizes, config, algorithm="two_shot"):
    """The push (``$SYMMTRITON_PROTOCOL=push``, kernels/push.py) in every placement, on a buffer
    whose bytes past the operands (slots, gather area, flags) hold garbage first: the two-shot,
    or the one-shot with ``algorithm="one_shot"``."""
    buf = st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD, size_mb=4)
    buf.symm_buffer.fill_(0x7F)
    sync()
    with protocol("push"):
        bad = _ar_cases(rank, world, "bfloat16", algorithm, MODES, sizes, config)
        want = (_all_reduce_push_kernel if algorithm == "two_shot"
                else _all_reduce_one_shot_push_kernel)
        if driver.last_plan().kernel.fn is not want:
            bad.append(("not pushed", driver.last_plan().kernel.fn))
    return bad


@pytest.mark.w3_full
def test_all_reduce_push_exact(pool):
    assert pool.run(_ar_push_cases, SIZES, SMALL) == [[]] * pool.world_size


@pytest.mark.w3_full
def test_all_reduce_one_shot_push_exact(pool):
    assert pool.run(_ar_push_cases, SIZES, SMALL, "one_shot") == [[]] * pool.world_size


def _auto_push_kernel(rank, world, n, protocol_mode, limits):
    """The kernel the default algorithm picks for ``n`` bf16 (staged, in place) under
    ``protocol_mode``, with ``presets.PUSH_ONE_SHOT_MIN_BYTES`` set to ``limits``."""
    st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD, size_mb=8)
    x = torch.ones(n, dtype=torch.bfloat16, device=device())
    saved, presets.PUSH_ONE_SHOT_MIN_BYTES = presets.PUSH_ONE_SHOT_MIN_BYTES, limits
    try:
        with protocol(protocol_mode):
            st.all_reduce(x)
            sync()
            name = driver.last_plan().kernel.fn.__name__  # the plans go with the context
    finally:
        presets.PUSH_ONE_SHOT_MIN_BYTES = saved
    return name, bool((x == world).all())


def test_one_shot_push_picked_by_algorithm_and_limits(cpu_pool):
    """``push`` pushes the algorithm the size picks (one-shot for small tensors, two-shot
    above); ``auto`` pushes one-shot at 2 ranks from ``PUSH_ONE_SHOT_MIN_BYTES`` (by default
    ``None``: never) and never beyond 2 ranks."""
    one, two = "_all_reduce_one_shot_push_kernel", "_all_reduce_push_kernel"
    small, large = 1000, LINES_MAX_BYTES  # elements: one-shot / two-shot by size at 2 ranks
    assert cpu_pool(2).run(_auto_push_kernel, small, "push", None) == [(one, True)] * 2
    assert cpu_pool(2).run(_auto_push_kernel, large, "push", None) == [(two, True)] * 2
    assert cpu_pool(2).run(_auto_push_kernel, large, "auto", None)[0][0] not in (one, two)
    limits = (large * 2, large * 2)
    assert cpu_pool(2).run(_auto_push_kernel, large, "auto", limits) == [(one, True)] * 2
    assert cpu_pool(2).run(_auto_push_kernel, large - 8, "auto", limits)[0][0] != one
    assert cpu_pool(3).run(_auto_push_kernel, large, "auto", (0, 0))[0][0] != one


@pytest.mark.w3_full
def test_all_reduce_push_default_config(pool):
    assert pool.run(_ar_push_cases, (3, 70000), None) == [[]] * pool.world_size
