"""Device-resident counts of the variable-count collectives (``all_gather_v``,
``reduce_scatter_v``): their validation, their clamping rule, and their error word.

The kernels read ``counts`` when they run and clamp it so nothing moves out of bounds
(``kernels/common.py``, ``clamped_counts``): a count lies in ``[0, cap_each]`` and rank ``r``'s
rows ``[start_r, start_r + n_r)`` end by ``cap_total``. When clamping changed anything, block 0
stores its ``COUNT_*`` bits in the buffer's status word ``COUNTS_ERROR_WORD`` (int32 host memory,
next to the barrier's timeout word 0). The host backend launches synchronously and raises at
once; on the GPU the next variable-count call, or :func:`symmtriton.synchronize`, raises
``ValueError`` naming the counts (their values when the error is raised) and clears the word:
the barriers still ran, so the buffer stays usable.
"""

from __future__ import annotations

import torch

#: index of the counts error word in ``SymmetricMemoryBuffer.status`` (int32 words).
COUNTS_ERROR_WORD = 1
#: the error bits, as in kernels/common.py.
COUNT_NEGATIVE, COUNT_OVER_EACH, COUNT_OVER_TOTAL = 1, 2, 4
COUNTS_DTYPES = (torch.int32, torch.int64)


def check_counts(op: str, counts, world: int, device: torch.device) -> torch.Tensor:
    """``counts`` is an int32/int64 tensor ``[world]`` on ``device``, contiguous."""
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
    """The kernels' clamping on the host (for the torch.distributed fallback):
    ``(starts, ns, error bits)``."""
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
    """Record the call whose counts a later error word refers to (GPU: raised afterwards)."""
    buf._counts_call = (op, counts, each, total)


def check_error(buf, status, where: str | None = None, *, launched: bool = False) -> None:
    """Raise the recorded counts error of ``buf`` (``status``: its status word view), once;
    ``launched``: right after the launch that set it (see :func:`counts_error`)."""
    code = int(status[COUNTS_ERROR_WORD])
    if not code:
        return
    status[COUNTS_ERROR_WORD] = 0
    op, counts, each, total = getattr(buf, "_counts_call", ("collective", [], "?", "?"))
    raise counts_error(op if where is None else f"{where} ({op})", counts, code, each, total,
                       launched=launched)
