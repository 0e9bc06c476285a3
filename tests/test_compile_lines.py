"""Compile tier for the barrier-free kernels (kernels/lines.py), as tests/test_compile.py for the
others: compiled for sm_90 / sm_100 by Triton's bundled ptxas on this (GPU-less) machine. With
the launcher's alignment promise the lines go out as 16-byte stores (two lines each) and come
in through 16-byte volatile loads (inline PTX: Triton does not vectorize volatile loads); there
is no barrier (no release/acquire signal) in them."""

import pytest
import triton.language as tl

COMMON = dict(RANK=1, WORLD_SIZE=3, WORLD_P2=4, SCOPE="sys", USE_PTX=True)
KERNELS = {
    "all_gather": ("all_gather", "_all_gather_lines_kernel", dict(DTYPE=tl.int32, BLOCK=1024)),
    "all_gather_bytes": ("all_gather", "_all_gather_lines_kernel",
                         dict(DTYPE=tl.uint8, BLOCK=4096)),
    "reduce_scatter": ("reduce_scatter", "_reduce_scatter_lines_kernel",
                       dict(DTYPE=tl.bfloat16, BLOCK=2048)),
    "all_reduce": ("all_reduce", "_all_reduce_lines_kernel", dict(DTYPE=tl.float16, BLOCK=2048)),
    "all_reduce_rmsnorm": ("all_reduce_rmsnorm", "_all_reduce_rmsnorm_lines_kernel",
                           dict(DTYPE=tl.bfloat16, W_DTYPE=tl.float32, CHUNK=256, NC=16,
                                num_warps=1)),
    "fused_rmsnorm": ("fused_rmsnorm", "_fused_rmsnorm_lines_kernel",
                      dict(DTYPE=tl.bfloat16, W_DTYPE=tl.bfloat16, CHUNK=256, NC=16,
                           ALL_GATHER=True, num_warps=1)),
    "fused_rmsnorm_whole_rows": ("fused_rmsnorm", "_fused_rmsnorm_lines_kernel",
                                 dict(DTYPE=tl.float16, W_DTYPE=tl.float16, CHUNK=1024, NC=1,
                                      ALL_GATHER=False)),
}


def _compile(rank, world, which, capability, aligned, ones=False):
    import importlib

    from helpers import compile_for_target

    module, name, extra = KERNELS[which]
    kern = getattr(importlib.import_module(f"symmtriton.kernels.{module}"), name)
    counts = {k: 1 for k in ("n", "s", "S", "H") if ones and k in kern.arg_names}
    c = compile_for_target(kern, capability, **COMMON, **extra, **counts, ALIGNED=aligned)
    ptx = c.asm["ptx"]
    return {
        "line_stores": ptx.count("st.global.v2.b64"),
        "volatile_loads": ptx.count("ld.volatile.global"),
        "pair_loads": ptx.count("ld.volatile.global.v2.b64"),
        "signals": ptx.count(".release.") + ptx.count(".acquire."),
        "multimem": ptx.count("multimem."),
        "gpu_atomics": ptx.count("atom.global.gpu.relaxed."),
        "cubin": len(c.asm["cubin"]) > 0,
        "pdl": ptx.count("griddepcontrol"),  # none without PDL (tests/test_pdl.py: with it)
    }


@pytest.mark.parametrize("which", sorted(KERNELS))
def test_lines_kernels_store_16_byte_pairs_and_poll_without_barriers(compiler, which):
    [r] = compiler.run(_compile, which, 90, True)
    assert r["cubin"] and r["line_stores"] > 0 and r["pair_loads"] > 0
    assert r["signals"] == 0 and r["multimem"] == 0 and r["pdl"] == 0
    # rows in several units pass their stats through inboxes, with no atomic (kernels/lines_rows.py)
    assert r["gpu_atomics"] == 0


@pytest.mark.parametrize("which", ["all_gather", "all_reduce_rmsnorm"])
def test_lines_kernels_compile_for_sm100(compiler, which):
    [r] = compiler.run(_compile, which, 100, True)
    assert r["cubin"] and r["line_stores"] > 0


@pytest.mark.full
@pytest.mark.parametrize("which", sorted(KERNELS))
def test_lines_kernels_compile_unaligned_and_with_counts_of_one(compiler, which):
    """No alignment promise (scalar accesses), and runtime ints Triton turns into the constant 1."""
    [r] = compiler.run(_compile, which, 90, False, True)
    assert r["cubin"] and r["volatile_loads"] > 0



#: waits whose lines Triton keeps copies of in several warps (kernels/lines.py, "Warps"): the
#: all-gather's 64 lines in 4 warps, and a row kernel's inbox (its last wait), 4 lines in 2 warps.
POLLED_IN_SEVERAL_WARPS = {
    "all_gather": ("all_gather", "_all_gather_lines_kernel",
                   dict(num_warps=4, DTYPE=tl.int32, BLOCK=64)),
    "row_inbox": ("all_reduce_rmsnorm", "_all_reduce_rmsnorm_lines_kernel",
                  dict(num_warps=2, DTYPE=tl.bfloat16, W_DTYPE=tl.bfloat16, CHUNK=1024, NC=4)),
}


def _barrier_before_clear(rank, world, which, aligned):
    import importlib
    import re

    from helpers import compile_for_target

    module, name, extra = POLLED_IN_SEVERAL_WARPS[which]
    kern = getattr(importlib.import_module(f"symmtriton.kernels.{module}"), name)
    ttgir = compile_for_target(kern, 90, **COMMON, **extra, ALIGNED=aligned).asm["ttgir"]
    poll = [m.end() for m in re.finditer(r"ld\.volatile\.global|isVolatile = true", ttgir)][-1]
    after = ttgir[poll:]
    return "gpu.barrier" in after[:after.index("tt.store")]


@pytest.mark.parametrize("aligned", [True, False], ids=["pairs", "lines"])
@pytest.mark.parametrize("which", sorted(POLLED_IN_SEVERAL_WARPS))
def test_every_warp_is_done_polling_before_lines_are_cleared(compiler, which, aligned):
    assert compiler.run(_barrier_before_clear, which, aligned) == [True]
