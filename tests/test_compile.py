"""Compile tier: the kernels compiled for sm_90 and sm_100 by Triton's bundled ptxas on this
(GPU-less) machine. The multimem path must contain the multimem instructions; the peer path
must use 16-byte accesses when the launcher promises alignment; every barrier is one
signal-and-wait loop whose clock read sits behind the miss counter (never on the fast path), at
the scope asked for.

Compilation runs in a worker without TRITON_INTERPRET (kernels must be real JIT functions)."""

import re

import pytest
import triton
import triton.language as tl



COMMON = dict(RANK=1, WORLD_SIZE=3, WORLD_P2=4, SCOPE="sys", USE_PTX=True)
KERNELS = {
    "all_gather": ("all_gather", "_all_gather_kernel",
                   dict(DTYPE=tl.int32, BLOCK_SIZE=1024, COPY_OUT=True)),
    "reduce_scatter": ("reduce_scatter", "_reduce_scatter_kernel",
                       dict(DTYPE=tl.bfloat16, BLOCK_SIZE=2048, STAGE_IN=True)),
    "fused": ("fused_rmsnorm", "_fused_rmsnorm_kernel",
              dict(DTYPE=tl.bfloat16, W_DTYPE=tl.bfloat16, BLOCK_H=4096, STAGE_IN=True,
                   ALL_GATHER=True, COPY_OUT=True)),
}


def _compile(rank, world, which, capability, multimem, aligned, world_size=3, scope="sys"):
    import importlib

    from helpers import compile_for_target

    module, name, extra = KERNELS[which]
    kern = getattr(importlib.import_module(f"symmtriton.kernels.{module}"), name)
    group = dict(COMMON, WORLD_SIZE=world_size, WORLD_P2=triton.next_power_of_2(world_size),
                 SCOPE=scope, RANK=min(COMMON["RANK"], world_size - 1))
    c = compile_for_target(kern, capability, **group, **extra, USE_MULTIMEM=multimem,
                           ALIGNED=aligned)
    ptx = c.asm["ptx"]
    return {
        "ld_reduce": ptx.count("multimem.ld_reduce"),
        "st": ptx.count("multimem.st"),
        "v4_loads": ptx.count("ld.global.v4") + ptx.count("ld.global.L1::evict_last.v4"),
        "globaltimer": "%globaltimer" in ptx,
        # the barrier (kernels/barrier.py): a release exchange, acquire polls, at the scope asked
        # for; one poll site per barrier
        "signals": (f"atom.global.{scope}.release.exch" in ptx
                    and f"atom.global.{scope}.acquire.add" in ptx),
        "waits": ptx.count(f"atom.global.{scope}.acquire.add")
        + ptx.count(f"atom.global.{scope}.relaxed.add"),
        "relaxed_signals": ptx.count(f"atom.global.{scope}.relaxed.exch"),
        # every clock read comes after a poll and behind the miss counter's test (% 64)
        "clock_gated": len(re.findall(r"\.add\.u32 [^;]*;(?:(?!\.add\.u32 )[\s\S])*?"
                                      r"and\.b32 [^;]*, 63;(?:(?!\.add\.u32 )[\s\S])*?%globaltimer",
                                      ptx)),
        "clock_reads": ptx.count("%globaltimer"),
        "sys_atoms": ptx.count(".sys."),
        "atoms": ptx.count("atom."),
        "bar_sync": ptx.count("bar.sync"),
        "cubin": len(c.asm["cubin"]) > 0,
        "pdl": ptx.count("griddepcontrol"),  # none without PDL (tests/test_pdl.py: with it)
    }


@pytest.mark.parametrize("capability", [90, 100])
@pytest.mark.parametrize("which", sorted(KERNELS))
def test_multimem_path_compiles_with_multimem_instructions(compiler, which, capability):
    [r] = compiler.run(_compile, which, capability, True, True)
    assert r["cubin"] and r["signals"] and r["globaltimer"]
    assert r["waits"] == 2 and r["clock_reads"] == r["clock_gated"] == 2
    if which in ("reduce_scatter", "fused"):
        assert r["ld_reduce"] > 0
    if which in ("all_gather", "fused"):
        assert r["st"] > 0


@pytest.mark.parametrize("which", sorted(KERNELS))
def test_peer_path_compiles_without_multimem_and_with_16_byte_loads(compiler, which):
    [r] = compiler.run(_compile, which, 90, False, True)
    assert r["cubin"] and r["ld_reduce"] == 0 and r["st"] == 0
    assert r["v4_loads"] > 0 and r["pdl"] == 0


@pytest.mark.parametrize("which, relaxed", [("all_gather", 1), ("reduce_scatter", 1),
                                            ("fused", 0)])
def test_signals_are_relaxed_where_no_data_precedes_them(compiler, which, relaxed):
    """All-gather's start signal and reduce-scatter's end signal publish no data: relaxed
    stores; every other signal is a release (kernels/barrier.py)."""
    [r] = compiler.run(_compile, which, 90, False, True)
    assert r["waits"] == 2 and r["relaxed_signals"] == relaxed


@pytest.mark.full
@pytest.mark.parametrize("which", sorted(KERNELS))
def test_same_gpu_groups_signal_at_gpu_scope(compiler, which):
    """SCOPE="gpu" (every rank on one GPU): no system-scope operation is left in the kernel."""
    [r] = compiler.run(_compile, which, 90, False, True, 3, "gpu")
    assert r["cubin"] and r["signals"] and r["sys_atoms"] == 0


@pytest.mark.full
@pytest.mark.parametrize("which", sorted(KERNELS))
def test_single_rank_kernels_have_no_barrier_atomics(compiler, which):
    """W = 1: the barrier is only the block's bar.sync (no peer to signal, no clock to read)."""
    [r] = compiler.run(_compile, which, 90, False, True, 1)
    assert r["cubin"] and r["atoms"] == 0 and not r["globaltimer"] and r["bar_sync"] > 0


@pytest.mark.full
@pytest.mark.parametrize("which", sorted(KERNELS))
def test_kernels_compile_when_counts_are_specialized_to_one(compiler, which):
    """Triton turns a runtime int equal to 1 into a constant: one element, one row, H = 1."""
    [r] = compiler.run(_compile_ones, which)
    assert r


def _compile_ones(rank, world, which):
    import importlib

    from helpers import compile_for_target

    module, name, extra = KERNELS[which]
    kern = getattr(importlib.import_module(f"symmtriton.kernels.{module}"), name)
    ones = {k: 1 for k in ("n", "s", "H") if k in kern.arg_names}
    c = compile_for_target(kern, 90, **COMMON, **extra, **ones, USE_MULTIMEM=False, ALIGNED=False)
    return len(c.asm["cubin"]) > 0


#: the flagged-chunk push kernels (kernels/push.py): kernel, extra constexprs, acquire poll sites
#: (the start barrier and one per round of flags)
PUSH_KERNELS = {
    "reduce_scatter": ("reduce_scatter", "_reduce_scatter_push_kernel", {}, 2),
    "all_reduce": ("all_reduce", "_all_reduce_push_kernel", dict(GATHER=True), 3),
    "all_reduce_one_shot": ("all_reduce", "_all_reduce_one_shot_push_kernel", {}, 2),
}


def _compile_push(rank, world, which, capability, scope, world_size=3):
    import importlib

    from helpers import compile_for_target

    module, name, extra, _ = PUSH_KERNELS[which]
    kern = getattr(importlib.import_module(f"symmtriton.kernels.{module}"), name)
    c = compile_for_target(kern, capability, RANK=1, WORLD_SIZE=world_size,
                           WORLD_P2=triton.next_power_of_2(world_size), SCOPE=scope, USE_PTX=True,
                           DTYPE=tl.bfloat16, BLOCK_SIZE=4096, ALIGNED=True, **extra)
    ptx = c.asm["ptx"]
    # what precedes each flag's release exchange since the previous one (or the kernel start)
    before_flags = re.split(rf"atom\.global\.{scope}\.release\.exch", ptx)[:-1]
    return {
        "cubin": len(c.asm["cubin"]) > 0,
        "v4_loads": ptx.count("ld.global.v4"),
        "v4_stores": ptx.count("st.global.v4"),
        "releases": ptx.count(f"atom.global.{scope}.release.exch"),
        "waits": ptx.count(f"atom.global.{scope}.acquire.add"),
        "relaxed": ptx.count(f"atom.global.{scope}.relaxed.exch"),
        "sys_atoms": ptx.count(".sys."),
        "clock_reads": ptx.count("%globaltimer"),
        "bar_before_release": all("bar.sync" in part.rsplit("st.global.v4", 1)[-1]
                                  for part in before_flags if "st.global.v4" in part),
    }


@pytest.mark.parametrize("capability", [90, 100])
@pytest.mark.parametrize("which", sorted(PUSH_KERNELS))
def test_push_kernels_order_their_chunks_behind_release_flags(compiler, which, capability):
    """The push kernels: 16-byte loads and stores; the start barrier's signal and each round's
    flag are release exchanges, each after a ``bar.sync`` that follows the block's stores; one
    acquire poll site per wait (the barrier, each round of flags), its clock read behind the
    miss counter."""
    [r] = compiler.run(_compile_push, which, capability, "sys")
    sites = PUSH_KERNELS[which][3]
    assert r["cubin"] and r["v4_loads"] > 0 and r["v4_stores"] > 0
    assert r["releases"] >= sites and r["waits"] == sites and r["relaxed"] == 0
    assert r["clock_reads"] == sites and r["bar_before_release"]


@pytest.mark.full
@pytest.mark.parametrize("which", sorted(PUSH_KERNELS))
def test_push_kernels_on_one_gpu_use_gpu_scope(compiler, which):
    [r] = compiler.run(_compile_push, which, 90, "gpu")
    assert r["cubin"] and r["releases"] >= PUSH_KERNELS[which][3] and r["sys_atoms"] == 0
