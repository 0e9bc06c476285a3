"""The row counts of the variable-count ops (``all_gather_v``, ``reduce_scatter_v``): the
``counts`` tensor (rows per rank, int32 or int64 on the device), its checks, the clamping the
kernels apply to it, and the counts error word that reports a clamp.

The kernels read ``counts`` when they run and clamp it so no row moves out of bounds
(``kernels/common.py``, ``clamped_counts``): a count lies in ``[0, cap_each]`` and rank ``r``'s
rows ``[start_r, start_r + n_r)`` end by ``cap_total``. When clamping changed anything, block 0
stores its ``COUNT_*`` bits in the counts error word (``COUNTS_ERROR_WORD`` of the buffer's int32
host status words; word 0 is the barrier's timeout word). The host backend launches
synchronously and raises at once; on the GPU the next variable-count call, or
:func:`symmtriton.synchronize`, raises ``ValueError`` naming the counts (their values when the
error is raised) and clears the word: the barriers still ran, so the buffer stays usable.
"""

from __future__ import annotations

import torch

#: index of the counts error word in ``SymmetricMemoryBuffer.status`` (int32 words).
COUNTS_ERROR_WORD = 1
#: the bits of the counts error word, as in kernels/common.py.
COUNT_NEGATIVE, COUNT_OVER_EACH, COUNT_OVER_TOTAL = 1, 2, 4
COUNTS_DTYPES = (torch.int32, torch.int64)


def check_counts(op: str, counts, world: int, device: torch.device) -> torch.Tensor:
    """``counts`` (rows per rank) is an int32/int64 tensor ``[world]`` on ``device``,
    contiguous; ``TypeError`` / ``ValueError`` naming ``op`` otherwise."""
    if not isinstance(counts, torch.Tensor):
        raise TypeError(f"{op}: counts must be a torch.Tensor, got {type(counts).__name__}")
    if counts.dtype not in COUNTS_DTYPES:
        raise TypeError(f"{op}: counts has dtype {counts.dtype}; supported: torch.int32, "
                        "torch.int64")
    if tuple(counts.shape) != (world,):
        raise ValueError(f"{op}: counts shape {tuple(counts.shape)} must be ({world},) "
                         f"(one count per rank of the group)")
    if counts.device != device:
        raise ValueError(f"{op}: counts is on {counts.device} but the tensors are on {device}")
    if not counts.is_contiguous():
        raise ValueError(f"{op}: counts must be contiguous (stride {counts.stride()})")
    return counts


def clamp(counts: list[int], cap_each: int, cap_total: int):
    """The kernels' clamping of row counts, on the host (for the torch.distributed fallback):
    ``(first row per rank, rows per rank, counts error bits)``."""
    starts, ns, before, code = [], [], 0, 0
    for c in counts:
        if c < 0:
            code |= COUNT_NEGATIVE
        if c > cap_each:
            code |= COUNT_OVER_EACH
        c = min(max(c, 0), cap_each)
        starts.append(min(before, cap_total))
        ns.append(min(before + c, cap_total) - starts[-1])
        before += c
    if before > cap_total:
        code |= COUNT_OVER_TOTAL
    return starts, ns, code


def counts_error(op: str, counts, code: int, each: str, total: str, *,
                 launched: bool = False) -> ValueError:
    """The error for error bits ``code``; ``each``/``total`` name the capacities. ``launched``:
    raised by the call that moved the clamped rows (host backend, fallback), which every rank
    made: its ``launched`` attribute tells ``_calls.sequenced`` not to count it as skipped."""
    values = counts.tolist() if isinstance(counts, torch.Tensor) else counts
    why = [w for bit, w in ((COUNT_NEGATIVE, "a count is negative"),
                            (COUNT_OVER_EACH, f"a count exceeds {each}"),
                            (COUNT_OVER_TOTAL, f"sum(counts) exceeds {total}")) if code & bit]
    err = ValueError(f"{op}: counts {values} overflow: {'; '.join(why)}. The kernel clamped them "
                     "(nothing was written out of bounds); the rows moved are incomplete")
    err.launched = launched
    return err


def remember(buf, op: str, counts: torch.Tensor, each: str, total: str) -> None:
    """Record the call whose row counts a later counts error word refers to (GPU: raised
    afterwards)."""
    buf._counts_call = (op, counts, each, total)


def remember_error(buf, make_error) -> None:
    """Record ``make_error(code, where, launched) -> ValueError``, the error a later counts
    error word raises, for an op whose device-side check is not about row counts (the expert
    ids of ``moe_dispatch`` / ``moe_combine``)."""
    buf._counts_call = make_error


def check_error(buf, status, where: str | None = None, *, launched: bool = False) -> None:
    """Raise the counts error ``buf``'s counts error word records (``status``: its status
    words), once, and clear the word; ``launched``: right after the launch that set it (see
    :func:`counts_error`)."""
    code = int(status[COUNTS_ERROR_WORD])
    if not code:
        return
    status[COUNTS_ERROR_WORD] = 0
    call = getattr(buf, "_counts_call", ("collective", [], "?", "?"))
    if callable(call):
        raise call(code, where, launched)
    op, counts, each, total = call
    raise counts_error(op if where is None else f"{where} ({op})", counts, code, each, total,
                       launched=launched)
