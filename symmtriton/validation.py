"""Input checks shared by the public collectives: each raises before any launch, naming the
value."""

from __future__ import annotations

import torch

#: dtypes the reductions accept (all-gather copies bits and accepts any dtype).
REDUCE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_tensor(name: str, t, *, dtypes=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: {', '.join(map(str, dtypes))}")
    if t.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (no data); pass one on the buffer's device")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (shape {tuple(t.shape)}, stride {t.stride()})")
    if t.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension, got a 0-d tensor")
    return t


def check_same(what: str, **tensors) -> None:
    """All tensors share dtype and device."""
    items = list(tensors.items())
    (n0, t0) = items[0]
    for n, t in items[1:]:
        if t.dtype != t0.dtype:
            raise TypeError(f"{what}: {n}.dtype {t.dtype} differs from {n0}.dtype {t0.dtype}")
        if t.device != t0.device:
            raise ValueError(f"{what}: {n} is on {t.device} but {n0} is on {t0.device}")


def check_gather_shapes(what: str, big: torch.Tensor, small: torch.Tensor, world: int,
                        big_name: str, small_name: str) -> None:
    """``big`` is ``world`` copies of ``small`` along dim 0 (as torch.distributed requires:
    ``[world * s0, *rest]``, or the stacked ``[world, s0, *rest]``)."""
    cat = (big.dim() == small.dim() and big.shape[0] == world * small.shape[0]
           and big.shape[1:] == small.shape[1:])
    stacked = (big.dim() == small.dim() + 1 and big.shape[0] == world
               and big.shape[1:] == small.shape)
    if not (cat or stacked):
        raise ValueError(
            f"{what}: {big_name} shape {tuple(big.shape)} must be {world} x {small_name} shape "
            f"{tuple(small.shape)} along dim 0 (world size {world})")


def check_disjoint(op: str, operands, aliases=()) -> None:
    """No two of ``operands`` share memory: ``operands`` is ``[(name, tensor or None), ...]``
    (``None`` and empty tensors skipped; tensors already checked contiguous), every pair is
    compared, and the first overlapping pair raises ``ValueError`` naming both. Every operand,
    read or written, must have memory of its own, except where the op allows an alias:
    ``aliases`` holds ``(a, b, offset)``: ``b`` may lie inside ``a`` starting exactly ``offset``
    bytes into it (``all_reduce`` in place, an all-gather's own shard, ``out=input``)."""
    spans = [(name, t.device, t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
             for name, t in operands if t is not None and t.numel()]
    for i, (a, a_dev, a0, a1) in enumerate(spans):
        for b, b_dev, b0, b1 in spans[i + 1:]:
            if a_dev == b_dev and a0 < b1 and b0 < a1 and not _allowed(aliases, a, a0, a1,
                                                                       b, b0, b1):
                raise ValueError(f"{op}: {a} and {b} overlap in memory; pass tensors that do "
                                 "not share memory")


def _allowed(aliases, a, a0, a1, b, b0, b1) -> bool:
    spans = {a: (a0, a1), b: (b0, b1)}
    for outer, inner, offset in aliases:
        if {outer, inner} == {a, b} and outer != inner:
            (o0, o1), (i0, i1) = spans[outer], spans[inner]
            if i0 == o0 + offset and i1 <= o1:
                return True
    return False


def check_count(name: str, value) -> int:
    """``value`` as a positive int; ``ValueError`` naming ``name`` and the value otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value
