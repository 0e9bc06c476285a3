"""The benchmark's MoE rows (``--ops moe_dispatch,moe_combine``): one row per dtype, mode and
op, of ``--tokens`` tokens per rank with hidden size ``--hidden`` (default 7168 here), each
routed to ``--topk`` of ``--experts`` experts (K distinct experts drawn per token, seeded by
rank), checked exactly against :mod:`symmtriton.tools.reference` (tokens in [-2, 2], experts
that scale by 1 or 2, weights 0.5 or 1) before it is timed.

The combine row times the combine alone, on the handle of one dispatch made beforehand. The
row's size is this rank's tokens (``tokens x hidden`` elements of the dtype). Baseline: the
``torch.distributed`` all-to-all of the same rows (each token once to every rank owning one of
its experts; back, one row per (token, rank)): in eager the send counts are exchanged first
(``all_to_all_single`` of the splits, read on the host), in graphs every rank sends its
``tokens`` slots padded to capacity. The dispatch row's ``symm_mem`` time is torch's
``torch.ops.symm_mem.all_to_all_vdev`` of the same rows (device-side splits, no host sync;
:func:`vdev_baseline`), where it can run: CUDA, a torch that has it, torch's NVSHMEM
symmetric-memory backend (``TORCH_SYMMMEM=NVSHMEM``), a world size and row length its kernel
splits evenly; otherwise a note of the run says why it was not timed.

``--fp8`` reaches the MoE rows through :data:`FP8_FORMS` (``use_fp8=`` of the dispatch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._symmetric_memory as symm

from symmtriton.ops.moe_combine import moe_combine
from symmtriton.ops.moe_dispatch import moe_dispatch

from .. import reference
from ..testing import device, sync, tagged
from . import timing

MOE_OPS = ("moe_dispatch", "moe_combine")
#: the ``--fp8`` forms each MoE op's rows take (a row with a form calls the dispatch with
#: ``use_fp8=True``: per-token scales per 128 channels, so only ``dynamic``).
FP8_FORMS = {"moe_dispatch": ("dynamic",)}
#: torch's device-side all-to-all the dispatch is compared with (``symm_mem_op``), and the
#: least input it is given: its kernel then runs its most blocks, which split each peer's rows
#: evenly when the rows are a multiple of 64 bytes and the world size a power of two.
VDEV, VDEV_MIN_BYTES = "all_to_all_vdev", 16 << 20
#: defaults of ``--tokens``, ``--hidden`` (MoE rows), ``--topk``, ``--experts``.
TOKENS, HIDDEN, TOPK, EXPERTS = 128, 7168, 8, 64


@dataclass(frozen=True)
class MoeShape:
    tokens: int
    hidden: int
    topk: int
    experts: int

    def buffer_bytes(self, world: int, dtype: torch.dtype) -> int:
        """What the pair stages in the symmetric buffer at most (the combine's fp32 partials,
        or the dispatch's rows and routing), with room for alignment and the count areas."""
        rows = world * self.tokens * self.hidden
        slots = world * self.tokens * self.topk * 4
        return max(rows * 4 + slots, rows * dtype.itemsize + slots + (1 << 20)) + (1 << 20)


def buffer_mb(opts, world: int) -> float:
    """MiB of symmetric buffer the MoE rows of ``opts`` stage (0 without MoE rows)."""
    if not set(opts.ops) & set(MOE_OPS):
        return 0.0
    return max(opts.moe.buffer_bytes(world, dtype) for dtype in opts.dtypes) / (1 << 20)


def inputs(shape: MoeShape, rank: int, dtype: torch.dtype):
    """``(x, topk_idx, topk_weights)`` of ``rank`` on the CPU."""
    T, H, K, E = shape.tokens, shape.hidden, shape.topk, shape.experts
    g = torch.Generator().manual_seed(4242 + rank)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.randint(-1, 1, (T, K), generator=g).float().exp2()
    return tagged(T * H, dtype, rank, bound=2).cpu().view(T, H), idx, w


def experts(recv: torch.Tensor, rank: int) -> torch.Tensor:
    """The local experts: expert ``j`` of ``rank`` scales its rows by ``(global id) % 2 + 1``."""
    EL = recv.shape[0]
    scale = torch.tensor([(rank * EL + j) % 2 + 1 for j in range(EL)], dtype=recv.dtype)
    return recv * scale.to(recv.device)[:, None, None]


class MoeWorkload:
    """The operands of one MoE row on this rank: the routing, and for the combine the handle and
    expert outputs of one dispatch."""

    def __init__(self, op: str, shape: MoeShape, dtype: torch.dtype, group, *,
                 use_fp8: bool = False):
        self.op, self.shape, self.dtype, self.group = op, shape, dtype, group
        self.use_fp8 = use_fp8
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.x, self.idx, self.w = (t.to(device()) for t in inputs(shape, self.rank, dtype))
        self.out = torch.empty_like(self.x)
        self.tensors, self.counts = {"input": self.x}, None  # as the other workloads name them
        self.recv, self.handle, self.expert_out = None, None, None
        if op == "moe_combine":
            self.recv, self.handle = self._dispatch()
            self.expert_out = experts(self.recv, self.rank)

    def _dispatch(self):
        return moe_dispatch(self.x, self.idx, self.shape.experts, self.group,
                            max_tokens_per_rank=self.shape.tokens, use_fp8=self.use_fp8)

    def run(self):
        if self.op == "moe_dispatch":
            self.recv, self.handle = self._dispatch()
            return self.recv
        return moe_combine(self.expert_out, self.idx, self.w, self.handle, self.group,
                           out=self.out)

    def check(self) -> bool:
        """One call, compared with the reference exactly (valid rows and counts of the
        dispatch; the combine's output)."""
        self.run()
        sync()
        ins = [inputs(self.shape, r, self.dtype) for r in range(self.world)]
        xs, idxs, ws = (list(t) for t in zip(*ins))
        E, M = self.shape.experts, self.shape.tokens
        if self.op == "moe_combine":
            outs = [experts(reference.moe_dispatch(xs, idxs, E, M, d)[0], d)
                    for d in range(self.world)]
            return torch.equal(self.out.cpu(), reference.moe_combine(outs, idxs, ws, E, M,
                                                                     self.rank))
        if self.use_fp8:
            recv, scales, counts = reference.moe_dispatch_fp8(xs, idxs, E, M, self.rank)
            pairs = [(self.recv.view(torch.uint8), recv.view(torch.uint8)),
                     (self.handle.recv_scales, scales)]
        else:
            recv, counts = reference.moe_dispatch(xs, idxs, E, M, self.rank)
            pairs = [(self.recv, recv)]
        return torch.equal(self.handle.recv_counts.cpu(), counts) and all(
            torch.equal(got.cpu()[j, :c], want[j, :c])
            for got, want in pairs for j, c in enumerate(counts.tolist()))


def _routes(wl: MoeWorkload):
    """``(order, send)``: this rank's tokens in the order of the ranks they go to (a token once
    per rank owning one of its experts), and how many go to each rank (a device tensor)."""
    EL = wl.shape.experts // wl.world
    ranks = torch.arange(wl.world, device=wl.idx.device)
    hit = ((wl.idx // EL)[:, :, None] == ranks).any(1)  # [T, W]
    order = hit.t().nonzero()[:, 1]
    return order, hit.sum(0)


def baseline(wl: MoeWorkload, mode: str):
    """``torch.distributed``'s all-to-all of the rows the op moves (module docstring)."""
    group, world = wl.group, wl.world
    if mode == "graph":
        send = wl.x.expand(world, *wl.x.shape).contiguous()
        if wl.op == "moe_combine":
            send = send.float()  # the partial sums travel in fp32, as the kernel's
        recv = torch.empty_like(send)
        return lambda: dist.all_to_all_single(recv, send, group=group)
    order, counts = _routes(wl)
    send = wl.x[order]
    if wl.op == "moe_combine":
        send = send.float()
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=group)
    out_splits, in_splits = counts.tolist(), recv_counts.tolist()
    recv = send.new_empty((sum(in_splits), send.shape[1]))

    def dispatch():
        got = torch.empty_like(counts)
        dist.all_to_all_single(got, counts, group=group)
        splits = got.tolist()  # the host waits for the counts, as a user's eager code does
        out = send.new_empty((sum(splits), send.shape[1]))
        dist.all_to_all_single(out, send, splits, out_splits, group=group)

    def combine():  # the splits are known from the dispatch: the rows go back at once
        dist.all_to_all_single(send, recv, out_splits, in_splits, group=group)

    return dispatch if wl.op == "moe_dispatch" else combine


def vdev_unavailable(dev, world: int, row_bytes: int) -> str | None:
    """Why ``torch.ops.symm_mem.all_to_all_vdev`` cannot time this rank's rows here, or
    ``None``. Torch's symmetric-memory backend is process-wide and fixed once symmetric memory
    is in use (the bench's own buffer is), so the bench never switches it: the run chooses it
    (``TORCH_SYMMMEM=NVSHMEM``)."""
    if dev.type != "cuda":
        return "needs CUDA"
    if not hasattr(torch.ops.symm_mem, VDEV):
        return f"this torch ({torch.__version__}) has no torch.ops.symm_mem.{VDEV}"
    available = getattr(symm, "is_nvshmem_available", None)
    if available is None or not available():
        return "this torch cannot use NVSHMEM (symm_mem.is_nvshmem_available() is False)"
    backend = symm.get_backend(dev) if hasattr(symm, "get_backend") else None
    if backend != "NVSHMEM":
        return (f"torch's symmetric-memory backend is {backend or 'the default'}, not NVSHMEM "
                "(run with TORCH_SYMMMEM=NVSHMEM)")
    per_peer = max(int(os.environ.get("TORCH_SYMMMEM_NBLOCKS") or 64) // world, 1)
    if world & (world - 1) or row_bytes % per_peer:
        return (f"its kernel splits each peer's rows over {per_peer} blocks: rows of "
                f"{row_bytes} B at world size {world} do not split evenly")
    return None


def vdev_baseline(wl: MoeWorkload, note):
    """A call of ``torch.ops.symm_mem.all_to_all_vdev`` that moves the rows ``wl`` dispatches
    (those of the ``torch.distributed`` baseline: each token once to every rank owning one of
    its experts), after a barrier of the symmetric handle (the op leaves none: a rank must not
    rewrite a peer's split offsets while that peer still reads them); or ``None``, with a note
    saying why. Checked once against ``all_to_all_single`` of the same rows before it is timed.
    Collective; every step that can fail is agreed over the group."""
    world, H, group = wl.world, wl.shape.hidden, wl.group
    why, t = _agreed(lambda: vdev_unavailable(wl.x.device, world, H * wl.dtype.itemsize), group)
    if why is None:
        why, t = _agreed(lambda: _vdev_operands(wl), group)
    if why is None:
        why, fn = _agreed(lambda: _vdev_call(wl, t), group)
    if why is None:
        return fn
    note(f"torch symm_mem baseline for moe_dispatch: {VDEV} not timed: {why}")
    return None


def _agreed(step, group) -> tuple:
    """``(why, result)`` of ``step()`` (returning a reason string, or a result), agreed over
    ``group``: ``why`` is ``None`` only where it succeeded on every rank."""
    try:
        got = step()
        why = got if isinstance(got, str) else None
    except Exception as exc:
        got, why = None, f"{type(exc).__name__}: {exc}"
    if not timing.all_ranks_ok(why is None, group):
        return why or "failed on another rank", None
    return None, got


def _vdev_operands(wl: MoeWorkload) -> dict:
    """The symmetric tensors of the call: the rows in the order of the ranks they go to, their
    counts, room for what arrives, and the splits and offsets the op writes."""
    order, counts = _routes(wl)
    H, dev = wl.shape.hidden, wl.x.device
    rows = max(wl.world * wl.shape.tokens, -(-VDEV_MIN_BYTES // (H * wl.dtype.itemsize)))
    t = {"input": symm.empty((rows, H), dtype=wl.dtype, device=dev),
         "out": symm.empty((rows, H), dtype=wl.dtype, device=dev),
         "in_splits": symm.empty(wl.world, dtype=torch.int64, device=dev),
         "out_splits_offsets": symm.empty((2, wl.world), dtype=torch.int64, device=dev)}
    t["input"][:len(order)].copy_(wl.x[order])
    t["in_splits"].copy_(counts)
    t["send"] = wl.x[order]
    return t


def _vdev_call(wl: MoeWorkload, t: dict):
    """The call on ``t``, run once and compared with ``all_to_all_single`` (the counts that
    arrive and the rows)."""
    hdl = [symm.rendezvous(t[k], wl.group) for k in ("input", "out", "in_splits",
                                                      "out_splits_offsets")][0]
    op, name = getattr(torch.ops.symm_mem, VDEV), wl.group.group_name

    def call():
        hdl.barrier()
        op(t["input"], t["out"], t["in_splits"], t["out_splits_offsets"], name)

    call()
    got = torch.empty_like(t["in_splits"])
    dist.all_to_all_single(got, t["in_splits"], group=wl.group)
    splits = got.tolist()
    want = t["send"].new_empty((sum(splits), wl.shape.hidden))
    dist.all_to_all_single(want, t["send"], splits, t["in_splits"].tolist(), group=wl.group)
    sync()
    if not (torch.equal(t["out_splits_offsets"][0], got)
            and torch.equal(t["out"][:len(want)], want)):
        return "its rows differ from all_to_all_single's"
    return call


def measure(opts, shape: MoeShape, op: str, dtype, mode: str, warmup: int, group, note, *,
            use_fp8: bool = False):
    """``(time, check, baseline dict)`` of one MoE row (every rank, in the same order);
    ``use_fp8``: the dispatch's ``use_fp8=``."""
    dev = device()
    wl = MoeWorkload(op, shape, dtype, group, use_fp8=use_fp8)
    check = timing.agreed_check(wl.check, group, note, op)
    t = timing.agreed_time(wl.run, mode, device=dev, group=group, **opts.counts(warmup))
    base = {}
    if opts.baselines:
        name = str(dist.get_backend(group))
        base = {"baseline": name, "baseline_s": None, "symm_mem_s": None, "symm_mem_op": None}
        if mode == "graph" and "nccl" not in name:
            note(f"graph mode: torch.distributed over {name} is not capturable: skipped")
        else:
            base["baseline_s"] = timing.agreed_time(baseline(wl, mode), mode, device=dev,
                                                    group=group, **opts.counts(warmup))
        vdev = vdev_baseline(wl, note) if op == "moe_dispatch" else None
        if vdev is not None:
            base["symm_mem_s"] = timing.agreed_time(vdev, mode, device=dev, group=group,
                                                    **opts.counts(warmup))
            base["symm_mem_op"] = VDEV if base["symm_mem_s"] is not None else None
    return t, check, base
