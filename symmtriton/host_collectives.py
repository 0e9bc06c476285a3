"""The host-side collectives symmtriton issues itself, bounded by ``SYMMTRITON_TIMEOUT_S``: the
votes and pointer exchanges that create a buffer (memory.py, backends/), and the comparison of
``SYMMTRITON_CHECK_UNIFORM``. A rank that never makes the same call (it exited, skipped a call,
or destroyed its buffer and called on, so that its next call creates a new one) makes the others
raise :class:`~symmtriton.errors.CollectiveTimeoutError` naming what they waited for, instead
of blocking in the process group (gloo's own bound is 30 minutes by default).

Each runs as an asynchronous ``torch.distributed`` collective polled until it completes or the
bound passes (``0`` or ``inf``: the process group's own wait). A collective abandoned this way
stays posted: the group's next collective may pair with it, so after such an error the group
is not usable for collectives any more. The torch.distributed fallback of the collectives
(ops/fallback.py) keeps ``torch.distributed``'s semantics, and torch's own symmetric-memory
rendezvous (cuda backend) its store's timeout.
"""

from __future__ import annotations

import pickle
import time

import torch
import torch.distributed as dist

from . import env
from .errors import CollectiveTimeoutError

#: longest pause between two polls of a pending collective (s): what a completed one may wait.
MAX_POLL_S = 0.002


def all_gather_object(obj, group, what: str) -> list:
    """``dist.all_gather_object`` of the picklable ``obj`` over ``group``: every rank's object,
    by rank. ``what`` names the exchange in the timeout error."""
    bound = env.timeout_s()
    world = dist.get_world_size(group)
    if bound is None:
        out: list = [None] * world
        dist.all_gather_object(out, obj, group=group)
        return out
    deadline = time.monotonic() + bound
    device = _device(group)
    data = pickle.dumps(obj)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    mine = torch.full((1,), len(data), dtype=torch.int64, device=device)
    _wait(dist.all_gather(sizes, mine, group=group, async_op=True), deadline, group, what)
    lengths = [int(n) for n in torch.cat(sizes).tolist()]
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device="cpu")  # whatever the default
    padded[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    rows = [torch.empty_like(padded, device=device) for _ in range(world)]
    _wait(dist.all_gather(rows, padded.to(device), group=group, async_op=True), deadline, group,
          what)
    return [pickle.loads(row[:n].cpu().numpy().tobytes()) for row, n in zip(rows, lengths)]


def barrier(group, what: str) -> None:
    """``dist.barrier`` over ``group``, bounded as :func:`all_gather_object`."""
    bound = env.timeout_s()
    if bound is None:
        dist.barrier(group=group)
        return
    _wait(dist.barrier(group=group, async_op=True), time.monotonic() + bound, group, what)


def _device(group) -> torch.device:
    """Where the group's collectives take tensors: the CPU when its backend has gloo (``gloo``,
    ``cpu:gloo,cuda:nccl``), else (NCCL alone) the current GPU."""
    backend = str(dist.get_backend(group))
    if "gloo" in backend or "nccl" not in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _wait(work, deadline: float, group, what: str) -> None:
    """Poll ``work`` until it completes (then ``wait`` raises its own error, e.g. a peer that
    died) or ``deadline`` passes (``CollectiveTimeoutError``)."""
    pause = 1e-4
    while not work.is_completed():
        if time.monotonic() >= deadline:
            raise CollectiveTimeoutError(
                f"{what}: rank {dist.get_rank(group)} of group {group.group_name!r} waited "
                f"{env.timeout_s():g} s ({env.TIMEOUT_S}) for the other ranks in a host-side "
                "collective: a rank did not make the same call (it exited, skipped a call, or "
                "destroyed its buffer and called on). The process group may pair its next "
                "collectives with this abandoned one: do not use it for collectives any more")
        time.sleep(pause)
        pause = min(2 * pause, MAX_POLL_S)
    work.wait()
