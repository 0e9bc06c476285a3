"""FP8 output of the RMSNorm row ops (``out_dtype=``, ``scale=``): the checks, the kernel's
``QUANT`` constexprs and its scale argument (kernels/quant.py), the outputs a call allocates,
and the same quantisation in torch for the ``torch.distributed`` fallback.

The normed rows, rounded to the input's dtype (the values the op returns without
``out_dtype``), are quantised: static (``scale`` a one-element fp32 tensor on the input's
device) ``out = clamp(y / scale, -max, max)``; dynamic (``scale=None``) per row,
``scales[r] = amax(|y[r]|) / max`` (1 for a row of zeros), ``out = y / scales[r]``, with
``scales`` ``[rows, 1]`` fp32 returned beside ``out``.

Where a dynamic call allocates both outputs they share one allocation (``scales`` 16-byte aligned
after ``out``): the kernel finds the scales at ``out + q_arg``, so a plan's launch varies one
argument per call (``Launch.var_index``): ``out``'s pointer, or the scales' offset when ``out``
is given.
"""

from __future__ import annotations

import torch
import triton.language as tl

#: the FP8 dtypes ``out_dtype`` takes: their Triton type and largest finite value.
FP8 = {torch.float8_e4m3fn: (tl.float8e4nv, 448.0), torch.float8_e5m2: (tl.float8e5, 57344.0)}

NONE, STATIC, DYNAMIC = 0, 1, 2


def quant_mode(a) -> int:
    """``QUANT`` of a call's :class:`~._operands.Rows`: none, static or dynamic."""
    if a.out_dtype is None:
        return NONE
    return STATIC if a.scale is not None else DYNAMIC


def check_quant(op: str, a, rows: int) -> None:
    """Raise ``TypeError``/``ValueError`` for a bad ``out_dtype``/``scale`` (or the scales an
    op hands in) before any launch; ``rows``: the output's rows."""
    if a.out_dtype is not None and a.out_dtype not in FP8:
        if not isinstance(a.out_dtype, torch.dtype):
            raise TypeError(f"{op}: out_dtype must be a torch.dtype or None, got "
                            f"{type(a.out_dtype).__name__}")
        raise ValueError(f"{op}: out_dtype {a.out_dtype} is not supported; supported: None, "
                         f"{', '.join(map(str, FP8))}")
    if a.out is not None and a.out_dtype is not None and a.out.dtype != a.out_dtype:
        raise ValueError(f"{op}: out.dtype {a.out.dtype} differs from out_dtype {a.out_dtype}")
    if a.scale is not None:
        if a.out_dtype is None:
            raise ValueError(f"{op}: scale needs an FP8 out_dtype, got out_dtype=None")
        _check_fp32(op, "scale", a.scale, (1,), a.input.device)
    if a.scales is not None:
        if a.out_dtype is None or a.scale is not None:
            raise ValueError(f"{op}: scales are the output of dynamic FP8 scaling only")
        _check_fp32(op, "scales", a.scales, (rows, 1), a.input.device)


def _check_fp32(op: str, name: str, t, shape: tuple, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"{op}: {name} must be float32, got {t.dtype}")
    if t.numel() != shape[0] * shape[-1] or (len(shape) > 1 and tuple(t.shape) != shape):
        raise ValueError(f"{op}: {name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but input is on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")


def quant_constexprs(a, dtype) -> dict:
    """The kernel's ``QUANT``, ``Q_DTYPE`` (``dtype``, the Triton input type, without FP8) and
    ``Q_MAX``."""
    mode = quant_mode(a)
    if mode == NONE:
        return dict(QUANT=0, Q_DTYPE=dtype, Q_MAX=0.0)
    q_dtype, q_max = FP8[a.out_dtype]
    return dict(QUANT=mode, Q_DTYPE=q_dtype, Q_MAX=q_max)


def fp8_records(a, hidden: int) -> bool:
    """The all-gather of the barrier kernel moves each row as an FP8 record (its ``hidden``
    FP8 bytes, then its 4-byte dynamic scale: kernels/quant.py, ``gather_row``), written over
    the row's bytes in the region: with FP8 output whenever the record fits them, i.e. all but
    dynamic rows of fewer than 4 bf16/fp16 or of 1 fp32 value, which travel in the input's
    dtype (no more bytes than their record)."""
    mode = quant_mode(a)
    record = hidden + (4 if mode == DYNAMIC else 0)
    return mode != NONE and record <= hidden * a.input.element_size()


def new_outputs(a, shape: tuple, mode: int) -> tuple:
    """``(out, scales)`` a call allocates: ``a.out`` or a new one, and the dynamic scales
    (``a.scales`` or new: in one allocation with a new ``out``), else ``None``."""
    dtype = a.input.dtype if a.out_dtype is None else a.out_dtype
    if mode != DYNAMIC:
        out = a.out if a.out is not None else torch.empty(shape, dtype=dtype,
                                                          device=a.input.device)
        return out, None
    scales = a.scales
    if a.out is not None:
        if scales is None:
            scales = torch.empty((shape[0], 1), dtype=torch.float32, device=a.input.device)
        return a.out, scales
    at = -(-shape[0] * shape[1] // 16) * 16
    raw = torch.empty(at + 4 * shape[0], dtype=torch.uint8, device=a.input.device)
    out = raw[:shape[0] * shape[1]].view(dtype).view(shape)
    return out, raw[at:].view(torch.float32).view(shape[0], 1)


def q_arg(a, out: torch.Tensor, scales) -> int:
    """The kernel's scale argument: the static scale's address, the dynamic scales' offset
    from ``out`` (bytes), or 0."""
    if a.scale is not None:
        return a.scale.data_ptr()
    if scales is not None:
        return scales.data_ptr() - out.data_ptr()
    return 0


def torch_quantise(y: torch.Tensor, out: torch.Tensor, scale, scales) -> None:
    """The kernels' quantisation in torch: ``y`` (the normed rows) into ``out`` with the static
    ``scale``, or per row into ``out`` and ``scales``."""
    q_max = FP8[out.dtype][1]
    yf = y.float()
    if scale is None:
        amax = yf.abs().amax(dim=-1, keepdim=True)
        scale = torch.where(amax > 0, amax / q_max, torch.ones_like(amax))
        scales.copy_(scale)
    out.copy_((yf / scale).clamp(-q_max, q_max).to(out.dtype))
