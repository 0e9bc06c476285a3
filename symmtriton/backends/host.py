"""``host`` backend: POSIX shared memory on the CPU, one segment per rank, mapped by every rank.

Each rank creates ``/dev/shm/symmtriton-<id>-r<rank>`` holding its buffer followed by its signal
pad, the ranks exchange names over the (CPU-capable) process group, every rank maps every
segment, and once all have mapped them each rank unlinks its own: from then on a crash leaks no
file in ``/dev/shm``; the memory goes back to the system when the last mapping closes.

With ``TRITON_INTERPRET=1`` the Triton interpreter dereferences integer pointers as host
addresses and its atomics are real atomics, so the same kernels run across processes here.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
import uuid

import numpy as np

import torch
import torch.distributed as dist

from .base import SymmHandle

SHM_DIR = "/dev/shm"
SHM_PREFIX = "symmtriton-"
HOST_SIGNAL_PAD_SIZE = 16 * 1024  # bytes per rank: 4096 uint32 barrier slots
# Interpreted blocks run one after another, each with a cross-process barrier round trip: a few
# blocks still exercise the multi-block chunk mapping; more only add barriers (a 2 MiB
# all-gather over 3 ranks took 117 s with 128 blocks).
HOST_GRID_LIMIT = 4
_PAGE = mmap.PAGESIZE


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


class HostSegment:
    """This rank's segment, created and mapped but not yet shared."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.pad_offset = _round_up(max(nbytes, 1), _PAGE)
        self.total = self.pad_offset + HOST_SIGNAL_PAD_SIZE
        self.name = f"{SHM_PREFIX}{uuid.uuid4().hex[:16]}-p{os.getpid()}"
        self.path = os.path.join(SHM_DIR, self.name)
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, self.total)  # fresh tmpfs pages read as zero: pads start cleared
            self.map = mmap.mmap(fd, self.total)
        except BaseException:
            os.close(fd)
            self.unlink()
            raise
        os.close(fd)

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _map_peer(path: str, total: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, total)
    finally:
        os.close(fd)


class HostHandle(SymmHandle):
    backend = "host"

    def __init__(self, seg: HostSegment, group: dist.ProcessGroup):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        names: list = [None] * world
        try:
            dist.all_gather_object(names, (seg.name, seg.total), group=group)
            maps = []
            for r, (name, total) in enumerate(names):
                maps.append(seg.map if r == rank else _map_peer(os.path.join(SHM_DIR, name), total))
            # Every rank has mapped every segment once all pass this point: unlink our own name.
            dist.barrier(group=group)
        finally:
            seg.unlink()
        self._maps = maps
        self._bytes = [torch.frombuffer(m, dtype=torch.uint8) for m in maps]
        buffer_ptrs = [t.data_ptr() for t in self._bytes]
        pad_ptrs = [p + seg.pad_offset for p in buffer_ptrs]
        super().__init__(rank, world, seg.nbytes, HOST_SIGNAL_PAD_SIZE, buffer_ptrs, pad_ptrs,
                         multicast_ptr=0, device=torch.device("cpu"))
        self._pad_offset = seg.pad_offset
        self._group = group
        self.grid_limit = HOST_GRID_LIMIT
        # The interpreter has no clock instruction: the barrier's timeout reads this rank's
        # time from the first 8 bytes of its own signal pad, kept current by a thread.
        self._clock = np.frombuffer(seg.map, dtype=np.int64, count=1, offset=seg.pad_offset)
        self._clock[0] = time.monotonic_ns()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="symmtriton-host-clock", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        clock, stop = self._clock, self._stop
        while not stop.wait(0.001):
            clock[0] = time.monotonic_ns()

    def local_tensor(self) -> torch.Tensor:
        return self._bytes[self.rank][: self.buffer_size]

    def signal_pad(self, rank: int) -> torch.Tensor:
        return self._bytes[rank][self._pad_offset:self._pad_offset + self.signal_pad_size].view(torch.int32)

    def _peer_bytes(self, rank: int) -> torch.Tensor:
        return self._bytes[rank][: self.buffer_size]

    def barrier(self) -> None:
        dist.barrier(group=self._group)

    def close(self) -> None:
        self._stop.set()
        self._ticker.join()
        self._clock = None
        super().close()
        # Views handed out keep their mapping alive (frombuffer holds the mmap); ours go now.
        self._bytes = []
        self._maps = []


def allocate_local(nbytes: int) -> HostSegment:
    return HostSegment(nbytes)


def rendezvous(seg: HostSegment, group: dist.ProcessGroup) -> HostHandle:
    return HostHandle(seg, group)
