"""symmtriton.integrations.megatron against the installed megatron-core (the test extra pins
megatron-core==0.16.1): after install(), Megatron's own names (torch_symm_triton's functions,
parallel_state's global symmetric buffer) run symmtriton, checked against the pure-torch
references (symmtriton.tools.reference) with Megatron's layout; uninstall() puts Megatron's
objects back.

megatron-core is imported in the workers only (it takes seconds); without it the tests skip."""

import importlib.util

import pytest
import torch
import torch.distributed as dist

if importlib.util.find_spec("megatron") is None or not importlib.util.find_spec("megatron.core"):
    pytest.skip("megatron-core is not installed (pip install -e '.[test]' installs it)",
                allow_module_level=True)

import symmtriton as st  # noqa: E402
from symmtriton.integrations import megatron as smg  # noqa: E402
from symmtriton.tools import reference  # noqa: E402
from symmtriton.tools.testing import device, sync, tagged  # noqa: E402

M = st.SymmetricMemoryManager
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2)}
TSM = "megatron.core.inference.communication.torch_symm_triton"


def _megatron_modules():
    import importlib
    import warnings
    warnings.simplefilter("ignore")  # Megatron warns about absent Transformer Engine and Apex
    names = (TSM, f"{TSM}.collectives", f"{TSM}.fused_collectives", "megatron.core.utils",
             "megatron.core.parallel_state", "megatron.core.tensor_parallel.inference_layers")
    return [importlib.import_module(n) for n in names]


def _names(mods) -> dict:
    """Where each replaced name lives in Megatron: (module, attribute) -> object."""
    tsm, coll, fused, utils, state, layers = mods
    where = {(tsm, n): None for n in smg.FUNCTIONS}
    where.update({(coll, "multimem_all_gather"): None, (coll, "multimem_reduce_scatter"): None,
                  (fused, "fused_multimem_rs_add_norm_ag"): None,
                  (utils, "GlobalSymmetricMemoryBuffer"): None,
                  (state, "GlobalSymmetricMemoryBuffer"): None})
    # imported the functions by name before install(): patched in place
    where.update({(layers, n): None for n in smg.FUNCTIONS})
    return {k: getattr(*k) for k in where}


def _through_megatron(rank, world, dtype):
    """Megatron's parallel_state sets up its TP group and global buffer; then Megatron's names
    run each collective the way its inference layers call them."""
    mods = _megatron_modules()
    tsm, state = mods[0], mods[4]
    theirs = _names(mods)
    smg.install()
    smg.install()  # idempotent
    out = {"replaced": all(getattr(m, a) is smg.REPLACEMENTS[getattr(o, "__name__")]
                           for (m, a), o in theirs.items())}
    state.initialize_model_parallel(tensor_model_parallel_size=world)
    tp = state.get_tensor_model_parallel_group()
    state._set_global_symmetric_memory_buffer()
    buf = state.get_global_symmetric_memory_buffer()
    out["buffer"] = (type(buf) is st.SymmetricMemoryBuffer, buf.process_group is tp,
                     buf.size_in_mb, buf.symm_mem_hdl is not None, M.buffer_for_group(tp) is buf)
    n, H, eps = 4, 24, 1e-5

    # all-gather: Megatron's output is the symmetric tensor, its input an ordinary one
    x = tagged(n * H, dtype, rank).view(n, H)
    sym = buf.maybe_get_tensor([n * world, H], dtype=dtype)
    got = tsm.multimem_all_gather(sym["tensor"], x, sym["handle"], num_warps=32)
    want = reference.all_gather([tagged(n * H, dtype, r).view(n, H) for r in range(world)])
    out["all_gather"] = (got is sym["tensor"], torch.equal(got, want))

    # reduce-scatter: the matmul writes the symmetric tensor, the output is an ordinary one
    partial = tagged(world * n * H, dtype, rank, 1).view(world * n, H)
    sym = buf.maybe_get_tensor([world * n, H], dtype=dtype)
    sym["tensor"].copy_(partial)
    shard = torch.empty(n, H, dtype=dtype, device=x.device)
    got = tsm.multimem_reduce_scatter(shard, sym["tensor"], sym["handle"], max_num_blocks=24,
                                      BLOCK_SIZE=1024)
    want = reference.reduce_scatter(
        [tagged(world * n * H, dtype, r, 1).view(world * n, H) for r in range(world)], rank)
    out["reduce_scatter"] = (got is shard, torch.equal(shard, want))

    # fused: residual (this rank's n rows) updated in place, the normed rows gathered into the
    # symmetric tensor in place (InferenceRowParallelLinear passes the residual twice)
    S = world * n
    inputs = [tagged(S * H, dtype, r, 2).view(S, H) for r in range(world)]
    residuals = [tagged(n * H, dtype, r, 3, bound=3).view(n, H) for r in range(world)]
    weight = (1 + torch.arange(H, dtype=torch.float32) % 5 / 4).to(dtype).to(device())
    normed = [reference.reduce_scatter_add_rmsnorm(inputs, residuals[r], weight, eps, r)
              for r in range(world)]
    rtol, atol = TOL[dtype]
    results = []
    for separate in (False, True):
        sym = buf.maybe_get_tensor([S, H], dtype=dtype)
        sym["tensor"].copy_(inputs[rank])
        residual = residuals[rank].clone()
        res_out = torch.empty_like(residual) if separate else residual
        got = tsm.fused_multimem_rs_add_norm_ag(res_out, sym["tensor"], sym["handle"], residual,
                                                weight, eps)
        sync()
        gathered = torch.cat([normed[r][0] for r in range(world)])
        results.append((got is res_out, torch.equal(res_out, normed[rank][1]),
                        torch.allclose(sym["tensor"], gathered, rtol=rtol, atol=atol),
                        separate and torch.equal(residual, residuals[rank])))
    out["fused"] = results

    # where Megatron's layout or the handle cannot be met: clear errors, on every rank alike
    sym = buf.maybe_get_tensor([world * n + 1, H], dtype=dtype)
    errors = {}
    for name, call in {
        "rows": lambda: tsm.fused_multimem_rs_add_norm_ag(
            residual[:1], sym["tensor"], sym["handle"], residual[:1], weight, eps),
        "numel": lambda: tsm.multimem_all_gather(sym["tensor"], x, sym["handle"]),
        "keyword": lambda: tsm.multimem_reduce_scatter(shard, partial, sym["handle"], blocks=2),
        "none": lambda: tsm.multimem_all_gather(sym["tensor"], x, None),
        "foreign": lambda: tsm.multimem_all_gather(sym["tensor"], x, object()),
    }.items():
        try:
            call()
        except (TypeError, ValueError) as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
    out["errors"] = errors

    smg.uninstall()
    out["restored"] = all(getattr(m, a) is o for (m, a), o in theirs.items())
    out["global_dropped"] = state._GLOBAL_SYMMETRIC_MEMORY_BUFFER is None
    state.destroy_model_parallel()
    M.destroy()
    return out


def _check(results, world, dtype):
    for out in results:
        assert out["replaced"] and out["restored"] and out["global_dropped"]
        assert out["buffer"] == (True, True, 256, True, True)
        assert out["all_gather"] == (True, True)
        assert out["reduce_scatter"] == (True, True)
        assert out["fused"] == [(True, True, True, False), (True, True, True, True)]
        errors = out["errors"]
        assert "rows" in errors and "do not split evenly over the world size" in errors["rows"]
        assert "Megatron's layout needs world size" in errors["numel"]
        assert errors["keyword"].startswith("TypeError") and "['blocks']" in errors["keyword"]
        assert errors["none"].startswith("ValueError: multimem_all_gather: symm_mem_hdl is None")
        assert errors["foreign"].startswith("TypeError") and "object" in errors["foreign"]


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.full)])
def test_megatron_names_run_symmtriton(cpu_pool, world):
    _check(cpu_pool(world).run(_through_megatron, torch.float32), world, torch.float32)


def test_megatron_names_run_symmtriton_gpu(gpu_pool):
    _check(gpu_pool.run(_through_megatron, torch.bfloat16), gpu_pool.world_size, torch.bfloat16)


def _signatures_and_state(rank, world):
    """Every replacement takes the parameters of Megatron's object (names, kinds, defaults;
    annotations aside: the handle is symmtriton's, not torch's _SymmetricMemory)."""
    mods = _megatron_modules()
    tsm, utils, state = mods[0], mods[3], mods[4]
    theirs = {n: getattr(tsm, n) for n in smg.FUNCTIONS}
    theirs["GlobalSymmetricMemoryBuffer"] = utils.GlobalSymmetricMemoryBuffer
    out = {n: smg.parameters(obj) == smg.parameters(smg.REPLACEMENTS[n])
           for n, obj in theirs.items()}
    # Megatron's own global buffer made first: install() refuses, naming the way out
    state.initialize_model_parallel(tensor_model_parallel_size=world)
    state._set_global_symmetric_memory_buffer()
    with pytest.raises(RuntimeError, match="destroy_global_symmetric_memory_buffer"):
        smg.install()
    out["nothing_replaced"] = (not smg.installed()
                               and tsm.multimem_all_gather is theirs["multimem_all_gather"])
    state.destroy_global_symmetric_memory_buffer()
    smg.install()
    out["after_destroy"] = tsm.multimem_all_gather is smg.multimem_all_gather
    smg.uninstall()
    state.destroy_model_parallel()
    return out


def test_signatures_equal_megatrons_and_install_guards_its_buffer(cpu_pool):
    for out in cpu_pool(2).run(_signatures_and_state):
        assert all(out.values()), out


def _stale_handle(rank, world):
    """A handle of a buffer replaced by a larger one: a clear error, never freed memory."""
    group = dist.group.WORLD
    old = M.get_buffer("mg", group, size_mb=1)
    sym = old.maybe_get_tensor([2 * world, 4], torch.float32)
    x = torch.full((2, 4), float(rank))
    M.get_buffer("mg", size_mb=2)
    with pytest.raises(ValueError, match="destroyed, or replaced by a larger one"):
        smg.multimem_all_gather(sym["tensor"], x, sym["handle"])
    new = M.get_buffer("mg").maybe_get_tensor([2 * world, 4], torch.float32)
    with pytest.raises(ValueError, match="destroyed or replaced by a larger one"):
        smg.multimem_all_gather(sym["tensor"], x, new["handle"])  # the old view
    got = smg.multimem_all_gather(new["tensor"], x, new["handle"])
    want = torch.arange(world, dtype=torch.float32).repeat_interleave(2)[:, None].expand(-1, 4)
    M.destroy("mg")
    return torch.equal(got, want)


def test_stale_handle_and_view_raise(cpu_pool):
    assert cpu_pool(2).run(_stale_handle) == [True, True]
