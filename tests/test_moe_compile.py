"""Compile tier of the MoE pair: kernels/moe_dispatch.py and kernels/moe_combine.py compiled
for sm_90 and sm_100 by Triton's bundled ptxas (no GPU needed): with alignment promised, rows
move in 16-byte accesses; each kernel has its two barriers, the start one of the dispatch with
a relaxed signal (nothing of this call precedes it), every other one a release. The dispatch's
FP8 variant (``use_fp8=True``) converts to e4m3 in hardware with IEEE divisions; the plain one
holds no FP8 conversion."""

import pytest
import triton.language as tl

SHAPE = dict(K=8, K_P2=8, EL=32, RANK=1, WORLD_SIZE=2, WORLD_P2=2, SCOPE="sys", USE_PTX=True,
             BLOCK_H=8192, ALIGNED=True)
KERNELS = {
    "dispatch": ("moe_dispatch", "_moe_dispatch_kernel",
                 dict(DTYPE=tl.bfloat16, IDX_DTYPE=tl.int64, EL_P2=32, E_P2=64, BT=64,
                      Q_GROUP=128)),
    "combine": ("moe_combine", "_moe_combine_kernel",
                dict(DTYPE=tl.bfloat16, W_DTYPE=tl.float32, IDX_DTYPE=tl.int32)),
    "dispatch_fp8": ("moe_dispatch", "_moe_dispatch_kernel",
                     dict(DTYPE=tl.bfloat16, IDX_DTYPE=tl.int64, EL_P2=32, E_P2=64, BT=64,
                          QUANT=True, Q_DTYPE=tl.float8e4nv, Q_MAX=448.0, Q_GROUP=128)),
}


def _compile(rank, world, which, capability):
    import importlib

    from helpers import compile_for_target

    module, name, extra = KERNELS[which]
    kern = getattr(importlib.import_module(f"symmtriton.kernels.{module}"), name)
    c = compile_for_target(kern, capability, num_warps=16, **SHAPE, **extra)
    ptx = c.asm["ptx"]
    return {"cubin": len(c.asm["cubin"]) > 0, "v4": "ld.global.v4" in ptx,
            "polls": ptx.count("atom.global.sys.acquire.add"),
            "release": ptx.count("atom.global.sys.release.exch"),
            "relaxed": ptx.count("atom.global.sys.relaxed.exch"),
            "e4m3": "cvt.rn.satfinite.e4m3x2.f32" in ptx, "div_rn": "div.rn.f32" in ptx,
            "st_v4": "st.global.v4" in ptx}


@pytest.mark.parametrize("capability", [90, pytest.param(100, marks=pytest.mark.full)])
@pytest.mark.parametrize("which", KERNELS)
def test_moe_kernels_compile_with_16_byte_rows_and_two_barriers(compiler, which, capability):
    [r] = compiler.run(_compile, which, capability)
    relaxed = 1 if which.startswith("dispatch") else 0
    fp8 = which == "dispatch_fp8"
    assert r == {"cubin": True, "v4": True, "polls": 2, "release": 2 - relaxed,
                 "relaxed": relaxed, "e4m3": fp8, "div_rn": fp8, "st_v4": True}, r
