"""The benchmark's RMSNorm row ops (:data:`symmtriton.tools.bench.workloads.NORM_OPS`): their
unfused ``torch.distributed`` sequences (the baseline of every such row) and their FP8 rows
(``--fp8``).

An FP8 row calls the op with ``out_dtype=``:data:`DTYPE` and ``scale=``: a one-element fp32
tensor holding :data:`STATIC_SCALE` (``static``: returns ``out``) or ``None`` (``dynamic``: per
row, returns ``(out, scales)``). Beside it, on the same operands and in the same run:

- ``ours_quant``: the same op of ours in the input dtype, then torch's quantisation
  (:func:`quantise`), so the row shows what doing the quantisation in the kernel saves;
- the baseline: the unfused ``torch.distributed`` sequence (:func:`unfused`), then the same
  quantisation.

The row's check (:meth:`Fp8Row.check`) runs each of the three once on rank-tagged data and
compares it with the reference (:func:`symmtriton.tools.reference.quantise` of the reference's
normed rows) within one FP8 step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from symmtriton.ops.all_reduce import all_reduce_add_rmsnorm
from symmtriton.ops.fallback import torch_all_gather, torch_reduce_scatter
from symmtriton.ops.fused import (reduce_scatter_add_rmsnorm,
                                  reduce_scatter_add_rmsnorm_all_gather)

from .. import reference
from ..testing import sync
from . import timing
from .workloads import FUSED_EPS, NORM_OPS, SHARD_NORM_OPS

#: the ``--fp8`` forms: a static scale (``scale=`` tensor) or dynamic per-row scales.
FORMS = ("static", "dynamic")
#: the FP8 dtype of the rows and its largest finite value.
DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
#: the static rows' scale (a power of two: the division is exact; normed rows up to 28 in
#: magnitude stay unclamped).
STATIC_SCALE = 2.0 ** -4
#: one FP8 step, relative (e4m3: 3 mantissa bits), and the subnormal step, the check's slack.
FP8_STEP, FP8_TINY = 2.0 ** -3, 2.0 ** -9
FUNCTIONS = {"fused": reduce_scatter_add_rmsnorm_all_gather,
             "reduce_scatter_add_rmsnorm": reduce_scatter_add_rmsnorm,
             "all_reduce_add_rmsnorm": all_reduce_add_rmsnorm}


def static_scale(device) -> torch.Tensor:
    """The static rows' ``scale=`` tensor on ``device``."""
    return torch.full((1,), STATIC_SCALE, dtype=torch.float32, device=device)


def quantise(y: torch.Tensor, scale: torch.Tensor | None):
    """Torch's quantisation of the normed rows ``y``, as a user writes it: with ``scale``,
    ``(y / scale).clamp(-448, 448)`` cast to :data:`DTYPE`; without, ``(out, scales)`` with
    ``scales = amax(|y|) / 448`` per row (1 for a row of zeros), ``[rows, 1]`` fp32."""
    if scale is not None:
        return (y / scale).clamp(-FP8_MAX, FP8_MAX).to(DTYPE)
    scales = y.abs().amax(-1, keepdim=True).float() / FP8_MAX
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    return (y / scales).clamp(-FP8_MAX, FP8_MAX).to(DTYPE), scales


def zero_operands(op: str, numel: int, hidden: int, dtype, world: int, dev) -> dict:
    """Zero ``input`` and ``residual`` and a ``weight`` of ones for :func:`unfused`: ``numel``
    elements per residual (``[numel / hidden, hidden]``), the input ``world`` times that for the
    sharded ops (:data:`symmtriton.tools.bench.workloads.SHARD_NORM_OPS`)."""
    rows = numel // hidden
    in_rows = world * rows if op in SHARD_NORM_OPS else rows
    return {"input": torch.zeros((in_rows, hidden), dtype=dtype, device=dev),
            "residual": torch.zeros((rows, hidden), dtype=dtype, device=dev),
            "weight": torch.ones(hidden, dtype=dtype, device=dev)}


def unfused(op: str, t: dict, group):
    """``torch.distributed``'s version of the RMSNorm row op ``op`` on the operands ``t``
    (``input``, ``residual`` updated in place, ``weight``), returning the normed rows: fused:
    reduce-scatter, add, RMSNorm (:func:`symmtriton.tools.reference.rmsnorm`), all-gather;
    ``reduce_scatter_add_rmsnorm``: the same without the all-gather, with
    ``torch.nn.functional.rms_norm``; all-reduce fused: all-reduce (in place), add,
    ``rms_norm``."""
    if op not in NORM_OPS:
        raise ValueError(f"op must be one of {', '.join(NORM_OPS)}, got {op!r}")
    inp, res, weight = t["input"], t["residual"], t["weight"]
    h = res.shape[1]
    if op == "all_reduce_add_rmsnorm":
        def all_reduced():
            dist.all_reduce(inp, group=group)
            res.add_(inp)
            return F.rms_norm(res, (h,), weight, FUSED_EPS)
        return all_reduced
    part = torch.empty_like(res)
    if op == "reduce_scatter_add_rmsnorm":
        def scattered():
            torch_reduce_scatter(part, inp, group)
            res.add_(part)
            return F.rms_norm(res, (h,), weight, FUSED_EPS)
        return scattered
    out = torch.empty_like(inp)

    def gathered():
        torch_reduce_scatter(part, inp, group)
        res.add_(part)
        torch_all_gather(out, reference.rmsnorm(res, weight, FUSED_EPS), group)
        return out
    return gathered


def unfused_fp8(op: str, t: dict, group, form: str):
    """:func:`unfused` followed by :func:`quantise` in the FP8 ``form``."""
    fn = unfused(op, t, group)
    scale = static_scale(t["input"].device) if form == "static" else None
    return lambda: quantise(fn(), scale)


def _pair(got) -> tuple:
    """``(out, scales or None)`` of a static or dynamic result."""
    return tuple(got) if isinstance(got, (tuple, list)) else (got, None)


class Fp8Row:
    """The calls of one FP8 row on this rank, on the operands of ``wl`` (a
    :class:`symmtriton.tools.bench.workloads.Workload` of a :data:`NORM_OPS` op): :meth:`run`
    (the op with FP8 output, into its own ``out``) and :meth:`run_ours_quant` (the op in the
    input dtype, then :func:`quantise`). ``form``: one of :data:`FORMS`. ``baselines``: whether
    :meth:`check` also runs the two baselines."""

    def __init__(self, wl, form: str, *, baselines: bool = True, note=None):
        if wl.op not in NORM_OPS or form not in FORMS:
            raise ValueError(f"FP8 rows take an op of {', '.join(NORM_OPS)} and a form of "
                             f"{', '.join(FORMS)}, got {wl.op!r} and {form!r}")
        self.wl, self.form, self.baselines, self.note = wl, form, baselines, note
        out = wl.tensors["output"]
        self.out = torch.empty(out.shape, dtype=DTYPE, device=out.device)
        self.scale = static_scale(out.device) if form == "static" else None

    def run(self):
        wl, t = self.wl, self.wl.tensors
        extra = {"algorithm": wl.algorithm} if wl.op == "all_reduce_add_rmsnorm" else {}
        return FUNCTIONS[wl.op](t["input"], t["residual"], t["weight"], FUSED_EPS, wl.group,
                                self.out, out_dtype=DTYPE, scale=self.scale, **extra)

    def run_ours_quant(self):
        self.wl.run()
        return quantise(self.wl.tensors["output"], self.scale)

    def _once(self, fn):
        """``fn()`` once on freshly tagged operands, every rank started together."""
        self.wl.reset()
        sync()
        timing.group_barrier(self.wl.group)
        got = _pair(fn())
        sync()
        return got

    def check(self) -> bool:
        """Run the op, and with ``baselines`` ``ours_quant`` and the baseline
        (:func:`unfused_fp8` on copies of the tagged operands), once each, and compare each
        with the reference: within one FP8 step (:func:`agrees`). Every rank runs every call
        before comparing (the calls are collectives); a note names what disagreed."""
        wl = self.wl
        ref = reference.quantise(wl.expected()["output"].to(self.out.device), DTYPE, self.scale)
        got = {"symmtriton": self._once(self.run)}
        if self.baselines:
            got["ours_quant"] = self._once(self.run_ours_quant)
            wl.reset()
            copies = {k: wl.tensors[k].clone() for k in ("input", "residual", "weight")}
            got["baseline"] = self._once(unfused_fp8(wl.op, copies, wl.group, self.form))
        tol = 1e-4 if wl.dtype == torch.float32 else 1.0 / 64
        bad = [name for name, pair in got.items() if not agrees(pair, _pair(ref), tol)]
        if bad and self.note is not None:
            self.note(f"{wl.op} fp8 {self.form}: {', '.join(bad)} differ from the reference "
                      f"quantisation on rank {wl.rank}")
        return not bad


def agrees(got: tuple, ref: tuple, tol: float) -> bool:
    """Whether ``got = (out, scales)`` matches ``ref`` (the reference's quantisation): the
    shapes; the dynamic scales within ``tol`` (relative; the normed rows' tolerance); the
    dequantised values within one FP8 step and ``tol`` of the reference's (relative), plus
    ``tol`` and the subnormal step (absolute), as the normed rows' own check allows."""
    (q, s), (rq, rs) = got, ref
    if q.dtype != DTYPE or q.shape != rq.shape or (s is None) != (rs is None):
        return False
    if s is not None and not (s.shape == rs.shape and torch.allclose(s, rs, rtol=tol, atol=0)):
        return False
    scale = rs if rs is not None else torch.full((1, 1), STATIC_SCALE, device=rq.device)
    a = q.float() * (s if s is not None else scale)
    b = rq.float() * scale
    slack = (FP8_STEP + tol) * b.abs() + tol + FP8_TINY * scale
    return bool(((a - b).abs() <= slack).all())
