"""Compile tier for the FP8 output of the RMSNorm row kernels (kernels/quant.py), as
tests/test_compile.py: compiled for sm_90 by Triton's bundled ptxas, no GPU. The FP8 variants
keep the multimem instructions of their multimem form and convert to e4m3 (e5m2) in hardware;
the kernels without ``QUANT`` hold no FP8 conversion. The fused all-gather's FP8 variant (its
``Q_GATHER`` form, the one calls run) stores half the 16-byte multimem vectors of the bf16 one
and converts each row once."""

import pytest
import triton.language as tl

COMMON = dict(RANK=1, WORLD_SIZE=3, WORLD_P2=4, SCOPE="sys", USE_PTX=True)
KERNELS = {
    "fused_ag": ("fused_rmsnorm", "_fused_rmsnorm_kernel",
                 dict(DTYPE=tl.bfloat16, W_DTYPE=tl.bfloat16, BLOCK_H=4096, STAGE_IN=True,
                      ALL_GATHER=True, COPY_OUT=True, USE_MULTIMEM=True)),
    "fused": ("fused_rmsnorm", "_fused_rmsnorm_kernel",
              dict(DTYPE=tl.bfloat16, W_DTYPE=tl.bfloat16, BLOCK_H=4096, STAGE_IN=True,
                   ALL_GATHER=False, COPY_OUT=False, USE_MULTIMEM=True)),
    "all_reduce_one_shot": ("all_reduce_rmsnorm", "_all_reduce_rmsnorm_kernel",
                            dict(DTYPE=tl.bfloat16, W_DTYPE=tl.bfloat16, BLOCK_H=4096,
                                 STAGE_IN=True, TWO_SHOT=False, USE_MULTIMEM=True)),
    "all_reduce_two_shot": ("all_reduce_rmsnorm", "_all_reduce_rmsnorm_kernel",
                            dict(DTYPE=tl.bfloat16, W_DTYPE=tl.bfloat16, BLOCK_H=4096,
                                 STAGE_IN=True, TWO_SHOT=True, USE_MULTIMEM=True)),
    "fused_lines": ("fused_rmsnorm", "_fused_rmsnorm_lines_kernel",
                    dict(DTYPE=tl.bfloat16, W_DTYPE=tl.bfloat16, CHUNK=4096, NC=1,
                         ALL_GATHER=True)),
    "all_reduce_lines": ("all_reduce_rmsnorm", "_all_reduce_rmsnorm_lines_kernel",
                         dict(DTYPE=tl.bfloat16, W_DTYPE=tl.float32, CHUNK=4096, NC=1)),
}
FP8 = {"e4m3": (tl.float8e4nv, 448.0), "e5m2": (tl.float8e5, 57344.0)}


def _compile(rank, world, which, quant, fp8="e4m3", over=None):
    """PTX counts of ``which`` (its FP8 variant with ``quant``: the fused all-gather's with FP8
    records, ``Q_GATHER``, unless ``over`` says otherwise; ``over`` replaces constexprs)."""
    import importlib

    from helpers import compile_for_target

    module, name, extra = KERNELS[which]
    kern = getattr(importlib.import_module(f"symmtriton.kernels.{module}"), name)
    q = {}
    if quant:
        q = dict(QUANT=quant, Q_DTYPE=FP8[fp8][0], Q_MAX=FP8[fp8][1])
        if "Q_GATHER" in kern.arg_names:
            q["Q_GATHER"] = extra["ALL_GATHER"]
    ptx = compile_for_target(kern, 90, **COMMON, **{**extra, **q, **(over or {})},
                             ALIGNED=True).asm["ptx"]
    return {"ld_reduce": ptx.count("multimem.ld_reduce"), "st": ptx.count("multimem.st"),
            "e4m3": ptx.count("cvt.rn.satfinite.e4m3x2.f32"),
            "e5m2": ptx.count("cvt.rn.satfinite.e5m2x2.f32")}


@pytest.mark.parametrize("which", sorted(KERNELS))
@pytest.mark.parametrize("quant", [1, 2])
def test_fp8_variant_converts_to_e4m3_and_keeps_multimem(compiler, which, quant):
    [plain, r] = [compiler.run(_compile, which, q)[0] for q in (0, quant)]
    assert r["e4m3"] > 0 and r["e5m2"] == 0
    assert plain["e4m3"] == 0 and plain["e5m2"] == 0
    # the multimem instructions of the plain form stay (the FP8 form may unroll differently)
    assert (r["ld_reduce"] > 0, r["st"] > 0) == (plain["ld_reduce"] > 0, plain["st"] > 0)
    if KERNELS[which][2].get("USE_MULTIMEM"):
        assert r["ld_reduce"] > 0


def test_fp8_e5m2_variant_converts_to_e5m2(compiler):
    [r] = compiler.run(_compile, "all_reduce_one_shot", 2, "e5m2")
    assert r["e5m2"] > 0 and r["e4m3"] == 0 and r["ld_reduce"] > 0


@pytest.mark.parametrize("quant", [1, 2])
def test_fp8_all_gather_stores_half_the_multimem_vectors(compiler, quant):
    """[1, 4096] bf16 rows: the FP8 records leave in half the ``multimem.st`` of the bf16 rows
    (the bytes on the link), each row converted once, not once per rank that copies it out (the
    form without records quantises this rank's row and each of the 2 peers' rows)."""
    [plain, records, rows] = [compiler.run(_compile, "fused_ag", q, "e4m3", over)[0] for q, over in
                              ((0, {}), (quant, {}), (quant, {"Q_GATHER": False}))]
    assert plain["st"] > 0 and records["st"] * 2 == plain["st"] == rows["st"]
    assert records["ld_reduce"] > 0 and records["e4m3"] > 0
    assert records["e4m3"] * COMMON["WORLD_SIZE"] == rows["e4m3"]
