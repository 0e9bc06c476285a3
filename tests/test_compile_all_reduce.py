"""Compile tier for the all-reduce kernels (as tests/test_compile.py for the others): compiled for
sm_90 / sm_100 by Triton's bundled ptxas on this (GPU-less) machine. The multimem path must hold
``multimem.ld_reduce`` (both algorithms) and ``multimem.st`` (two-shot); the peer path none,
with 16-byte loads when the launcher promises alignment."""

import pytest
import triton.language as tl


COMMON = dict(RANK=1, WORLD_SIZE=3, WORLD_P2=4, SCOPE="sys", USE_PTX=True)
KERNELS = {
    "all_reduce": ("all_reduce", "_all_reduce_kernel",
                   dict(DTYPE=tl.bfloat16, BLOCK_SIZE=2048, STAGE_IN=True, COPY_OUT=True)),
    "all_reduce_rmsnorm": ("all_reduce_rmsnorm", "_all_reduce_rmsnorm_kernel",
                           dict(DTYPE=tl.bfloat16, W_DTYPE=tl.bfloat16, BLOCK_H=4096,
                                STAGE_IN=True)),
}
CASES = [(k, two_shot) for k in sorted(KERNELS) for two_shot in (False, True)]


def _compile(rank, world, which, two_shot, capability, multimem, aligned, ones=False):
    import importlib

    from helpers import compile_for_target

    module, name, extra = KERNELS[which]
    kern = getattr(importlib.import_module(f"symmtriton.kernels.{module}"), name)
    counts = {k: 1 for k in ("n", "cps", "S", "H", "rps") if ones and k in kern.arg_names}
    c = compile_for_target(kern, capability, **COMMON, **extra, **counts, TWO_SHOT=two_shot,
                           USE_MULTIMEM=multimem, ALIGNED=aligned)
    ptx = c.asm["ptx"]
    return {
        "ld_reduce": ptx.count("multimem.ld_reduce"),
        "st": ptx.count("multimem.st"),
        "v4_loads": ptx.count("ld.global.v4") + ptx.count("ld.global.L1::evict_last.v4"),
        # the barrier (kernels/barrier.py): a release exchange and acquire polls
        "signals": "sys.release.exch" in ptx and "sys.acquire.add" in ptx,
        "cubin": len(c.asm["cubin"]) > 0,
    }


@pytest.mark.parametrize("which,two_shot", CASES)
def test_multimem_path_compiles_with_multimem_instructions(compiler, which, two_shot):
    [r] = compiler.run(_compile, which, two_shot, 90, True, True)
    assert r["cubin"] and r["signals"] and r["ld_reduce"] > 0
    assert (r["st"] > 0) == two_shot


@pytest.mark.parametrize("which", sorted(KERNELS))
def test_two_shot_compiles_for_sm100(compiler, which):
    [r] = compiler.run(_compile, which, True, 100, True, True)
    assert r["cubin"] and r["ld_reduce"] > 0 and r["st"] > 0


@pytest.mark.parametrize("which,two_shot", CASES)
def test_peer_path_compiles_without_multimem_and_with_16_byte_loads(compiler, which, two_shot):
    [r] = compiler.run(_compile, which, two_shot, 90, False, True)
    assert r["cubin"] and r["ld_reduce"] == 0 and r["st"] == 0 and r["v4_loads"] > 0


@pytest.mark.full
@pytest.mark.parametrize("which", sorted(KERNELS))
def test_kernels_compile_when_counts_are_specialized_to_one(compiler, which):
    """Triton turns a runtime int equal to 1 into a constant: one element, one row, H = 1."""
    [r] = compiler.run(_compile, which, True, 90, False, False, True)
    assert r["cubin"]
