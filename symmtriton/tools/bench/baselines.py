"""What the benchmark compares symmtriton with: torch.distributed, PyTorch's symmetric-memory ops,
a local device copy, and (ranks on different GPUs) the copy bandwidth to a peer GPU; plus the
operand shapes of a row and where the ranks run."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._symmetric_memory as symm

from symmtriton.config import ROW_OPS
from symmtriton.ops.fallback import torch_all_gather, torch_reduce_scatter

from ..testing import device
from . import rownorm, timing, workloads


@dataclass(frozen=True)
class Shape:
    """One row's operands: ``numel`` as :class:`symmtriton.tools.bench.workloads.Workload`
    counts it (per shard; the whole tensor for the all-reduce ops), ``count`` the elements of
    nccl-tests' size."""

    numel: int
    hidden: int | None
    total_bytes: int
    count: int


def shape_for(op: str, nbytes: int, dtype: torch.dtype, world: int, hidden: int) -> Shape:
    """The operands nearest ``nbytes`` (rounded down to whole shards; the row ops
    (:data:`symmtriton.config.ROW_OPS`): ``[S, H]`` with ``H = hidden``, or less when ``nbytes``
    holds fewer than ``W`` rows (one row for the all-reduce), and ``S`` a multiple of ``W`` for
    the sharded ones)."""
    esize, per = dtype.itemsize, workloads.size_factor(op, world)
    if op not in ROW_OPS:
        numel = max(1, nbytes // (per * esize))
        return Shape(numel, None, per * numel * esize, per * numel)
    h = min(hidden, max(1, nbytes // (per * esize)))
    rows = max(1, nbytes // (per * esize * h))
    return Shape(rows * h, h, per * rows * h * esize, per * rows * h)


def _zeros(shape, dtype, dev):
    return torch.zeros(shape, dtype=dtype, device=dev)


def dist_baseline(op: str, shape: Shape, dtype, group, dev, counts=None, fp8=None):
    """torch.distributed's version of ``op`` on ordinary tensors: what a user writes without
    symmtriton. The RMSNorm row ops: their unfused sequence
    (:func:`symmtriton.tools.bench.rownorm.unfused`), followed by torch's quantisation in the
    FP8 form ``fp8`` when given; the variable-count ops (``counts``: rows per rank): the
    uniform collective on tensors padded to ``max(counts)`` rows per rank."""
    world = dist.get_world_size(group)
    n, h = shape.numel, shape.hidden
    if op == "all_gather":
        inp, out = _zeros(n, dtype, dev), torch.empty(world * n, dtype=dtype, device=dev)
        return lambda: torch_all_gather(out, inp, group)
    if op == "reduce_scatter":
        inp, out = _zeros(world * n, dtype, dev), torch.empty(n, dtype=dtype, device=dev)
        return lambda: torch_reduce_scatter(out, inp, group)
    if op in workloads.V_OPS:
        cap = max(counts)
        shard, padded = _zeros((cap, h), dtype, dev), _zeros((world * cap, h), dtype, dev)
        if op == "all_gather_v":
            return lambda: torch_all_gather(padded, shard, group)
        return lambda: torch_reduce_scatter(shard, padded, group)
    if op == "all_reduce":
        tensor = _zeros(n, dtype, dev)
        return lambda: dist.all_reduce(tensor, group=group)
    operands = rownorm.zero_operands(op, n, h, dtype, world, dev)
    if fp8 is not None:
        return rownorm.unfused_fp8(op, operands, group, fp8)
    return rownorm.unfused(op, operands, group)


#: torch.ops.symm_mem ops tried per op: (name, needs multicast). Every one that runs is timed;
#: a row reports the fastest. The RMSNorm row ops' is the all-reduce (reduce_scatter_add_rmsnorm:
#: the reduce-scatter) of their input, communication only.
SYMM_MEM_OPS = {
    "all_gather": (("multimem_all_gather_out", True), ("_low_contention_all_gather", False)),
    "reduce_scatter": (("reduce_scatter_out", False),),
    "fused": (("one_shot_all_reduce", False),),
    "reduce_scatter_add_rmsnorm": (("reduce_scatter_out", False),),
    "all_reduce": (("one_shot_all_reduce", False), ("two_shot_all_reduce_", False)),
    "all_reduce_add_rmsnorm": (("one_shot_all_reduce", False),),
}
#: torch.ops.symm_mem ops that cannot be captured in a CUDA graph.
SYMM_MEM_NOT_CAPTURABLE = ("_low_contention_all_gather",)


def symm_mem_baseline(op: str, shape: Shape, dtype, group, dev):
    """``([(name, fn), ...], None)``: PyTorch's symmetric-memory versions of ``op`` that this
    torch has and this group can run (:data:`SYMM_MEM_OPS`), on one symmetric tensor of
    ``shape.count`` elements; or ``([], why)``. Every step that can fail is agreed over the group
    before the next collective step."""
    ops = getattr(torch.ops, "symm_mem", None)
    if dev.type != "cuda" or ops is None:
        return [], "torch symm_mem ops need CUDA"
    cands = [(c, mc) for c, mc in SYMM_MEM_OPS.get(op, ()) if hasattr(ops, c)]
    if not cands:
        return [], f"no torch.ops.symm_mem op for {op}"
    name, n = group.group_name, shape.numel
    ok, big = True, None
    try:
        big = symm.empty(shape.count, dtype=dtype, device=dev)
    except Exception:
        ok = False
    if not timing.all_ranks_ok(ok, group):
        return [], "symm_mem.empty failed"
    try:
        hdl = symm.rendezvous(big, group)
    except Exception:  # e.g. a group this torch cannot rendezvous on
        hdl = None
    if not timing.all_ranks_ok(hdl is not None, group):
        return [], "symm_mem.rendezvous failed"
    multicast = timing.all_ranks_ok(hdl.multicast_ptr != 0, group)
    big.zero_()
    fns = []
    for op_name, needs_mc in cands:
        if needs_mc and not multicast:
            continue
        fn_op = getattr(ops, op_name)
        if op_name == "multimem_all_gather_out":
            inp = _zeros(n, dtype, dev)
            fn = (lambda i=inp, o=big, f=fn_op: f(i, name, o))
        elif op_name == "_low_contention_all_gather":  # copies on a side stream: joined back
            fn = (lambda i=big[:n], f=fn_op: _wait_tensor(f(i, name)))
        elif op_name == "reduce_scatter_out":
            out = torch.empty(n, dtype=dtype, device=dev)
            fn = (lambda i=big, o=out, f=fn_op: f(i, name, False, o))
        else:  # one_shot_all_reduce, two_shot_all_reduce_ (in place)
            fn = (lambda i=big, f=fn_op: f(i, "sum", name))
        fns.append((op_name, fn))
    if fns:
        return fns, None
    return fns, f"no usable torch.ops.symm_mem op for {op} (multicast: {multicast})"


def _wait_tensor(t):
    """What a caller of torch's asynchronous symm_mem ops writes before using ``t``: the current
    stream waits for the side stream that produces it (``_c10d_functional.wait_tensor``)."""
    wait = getattr(getattr(torch.ops, "_c10d_functional", None), "wait_tensor", None)
    return t if wait is None else wait(t)


def copy_baseline(nbytes: int, dev):
    src = torch.zeros(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


class Baselines:
    """Baseline times per (op, dtype, size, counts, mode), each measured once, in the same order
    on every rank. torch symm_mem operands are made once per (op, dtype, size) for both modes;
    local copies are timed once per (size, mode). In graph mode, what failed eagerly and what is
    known not to be capturable is skipped: a capture the driver invalidates is costly (see
    ``timing._abandon_capture``)."""

    def __init__(self, opts, group, note):
        """``opts``: the bench's options (``BenchOptions``); ``note(msg)`` records a note."""
        self.opts, self.group, self.note = opts, group, note
        self.dev = device()
        self.dist_name = str(dist.get_backend(group))
        self.times: dict = {}
        self._copies: dict = {}
        self._symm_key, self._symm = None, ([], None)

    def get(self, op, dtype, shape, mode, warmup, counts=None, fp8=None) -> dict:
        """``counts``: the variable-count ops' rows per rank (their padded baseline depends on
        them); ``fp8``: the FP8 form of an RMSNorm row op's row (its baseline quantises; the
        symm_mem times are those of the row without FP8 when already measured)."""
        key = (op, dtype, shape.total_bytes, counts, mode, fp8)
        if not self.opts.baselines:
            return {}
        if key not in self.times:
            self.times[key] = self._measure(key, shape, warmup)
        return self.times[key]

    def _measure(self, key, shape, warmup) -> dict:
        op, dtype, nbytes, counts, mode, fp8 = key
        eager = self.times.get((*key[:4], "eager", fp8), {})

        def capturable(name, why_not=None):
            if mode != "graph":
                return True
            if why_not:
                self.note(f"graph mode: {why_not}")
                return False
            return not eager or eager.get(name) is not None

        def run(fn):
            return timing.agreed_time(fn, mode, device=self.dev, group=self.group,
                                      **self.opts.counts(warmup))

        gloo = "nccl" not in self.dist_name
        base = {"baseline": self.dist_name, "baseline_s": None, "symm_mem_s": None,
                "symm_mem_op": None}
        no_graph = f"torch.distributed over {self.dist_name} is not capturable: skipped"
        if capturable("baseline_s", gloo and no_graph):
            base["baseline_s"] = run(dist_baseline(op, shape, dtype, self.group, self.dev, counts,
                                                   fp8))
        plain = self.times.get((*key[:5], None)) if fp8 is not None else None
        if plain is not None:  # the same symm_mem calls: not timed twice
            base.update({k: v for k, v in plain.items() if k.startswith("symm_mem")})
        else:
            self._symm_mem(op, dtype, shape, capturable, run, base)
        copy_key = (nbytes, mode)
        if copy_key not in self._copies:
            self._copies[copy_key] = run(copy_baseline(nbytes, self.dev))
        base["copy_s"] = self._copies[copy_key]
        return base

    def _symm_mem(self, op, dtype, shape, capturable, run, base) -> None:
        """Time the torch symm_mem ops of ``op`` into ``base`` (the fastest as
        ``symm_mem_s``)."""
        if self._symm_key != (op, dtype, shape.total_bytes):
            self._symm_key, self._symm = None, ([], None)  # free the previous operands first
            self._symm = symm_mem_baseline(op, shape, dtype, self.group, self.dev)
            self._symm_key = (op, dtype, shape.total_bytes)
        fns, why = self._symm
        if why:
            self.note(f"torch symm_mem baseline for {op}: {why}")
        for sm_name, sm_fn in fns:  # the fastest that runs
            if capturable(f"symm_mem_s:{sm_name}", sm_name in SYMM_MEM_NOT_CAPTURABLE and
                          f"{sm_name} (side stream, host barrier) is not capturable: skipped"):
                t = base[f"symm_mem_s:{sm_name}"] = run(sm_fn)
                if t is not None and (base["symm_mem_s"] is None or t < base["symm_mem_s"]):
                    base["symm_mem_s"], base["symm_mem_op"] = t, sm_name


@dataclass(frozen=True)
class Topology:
    """Where the ranks of a group run."""

    devices: tuple  #: each rank's device name, by rank
    gpus: int  #: distinct GPUs the group uses (0 on the CPU)
    layout: str  #: "cpu", "one rank per GPU" or "shared: W ranks on G GPU(s)"

    @property
    def across_gpus(self) -> bool:
        """Peers on other GPUs: their traffic crosses the GPU interconnect."""
        return self.gpus > 1

    @property
    def slug(self) -> str:
        if self.gpus == 0:
            return ""
        return "pergpu" if self.layout == "one rank per GPU" else "shared"


def topology(group, dev) -> Topology:
    """Every rank's device (name and UUID, exchanged over ``group``) and the layout they make."""
    world = dist.get_world_size(group)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        mine = (props.name, str(getattr(props, "uuid", "")) or f"{props.pci_bus_id}:{dev.index}")
    else:
        mine = ("cpu", None)
    seen: list = [None] * world
    dist.all_gather_object(seen, mine, group=group)
    if dev.type != "cuda":
        return Topology(tuple(n for n, _ in seen), 0, "cpu")
    gpus = len({u for _, u in seen})
    layout = "one rank per GPU" if gpus == world else f"shared: {world} ranks on {gpus} GPU(s)"
    return Topology(tuple(n for n, _ in seen), gpus, layout)


def peer_copy_gbs(buf, topo: Topology, group, *, nbytes: int = 256 << 20, iters: int = 10,
                  batch: int = 4) -> float | None:
    """GB/s of a copy-engine copy from this GPU into the next rank's symmetric buffer (a peer
    GPU's memory, through the buffer's peer mapping), every rank copying at once as in a
    collective: ``iters`` samples of ``batch`` copies each, timed to completion, the slowest
    rank's per sample, their median (:func:`symmtriton.tools.bench.timing.median_time`). The
    ceiling of rows whose ranks are on different GPUs (each rank's busbw crosses the interconnect
    once). ``None`` unless every rank has its own GPU and the buffer is symmetric. Collective."""
    world = dist.get_world_size(group)
    usable = topo.layout == "one rank per GPU" and world > 1 and buf.symm_mem_hdl is not None
    if not timing.all_ranks_ok(usable, group):
        return None
    hdl, rank = buf.symm_mem_hdl, dist.get_rank(group)
    n = min(nbytes, buf.nbytes)
    dst = hdl.get_buffer((rank + 1) % world, (n,), torch.uint8)
    src = torch.ones(n, dtype=torch.uint8, device=dst.device)
    t = timing.median_time(lambda: dst.copy_(src), iters=iters, warmup=2, device=dst.device,
                           group=group, batch=batch)
    timing.group_barrier(group)  # no peer overwrites a buffer before every copy into it is done
    return n / timing.all_reduce_max([t], group)[0] / 1e9
