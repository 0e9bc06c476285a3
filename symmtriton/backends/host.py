"""``host`` backend: POSIX shared memory on the CPU, one segment per rank, mapped by every rank.

Each rank creates ``/dev/shm/symmtriton-<id>-p<pid>`` holding its buffer followed by its signal
pad, the ranks exchange names over the (CPU-capable) process group, every rank maps every
segment, and once all have mapped them each rank unlinks its own: from then on a crash leaks no
file in ``/dev/shm``; the memory goes back to the system when the last mapping closes.

Before that point a crash can leave a file behind, so:

* the pages are reserved at creation (``posix_fallocate``): a ``/dev/shm`` too small for the
  buffer fails there, as a recorded reason every rank agrees on, instead of a SIGBUS in the
  first collective that touches a page tmpfs cannot supply;
* every failure path of the buffer's set-up unlinks the segment (``memory.SymmetricMemoryBuffer``);
* each creation sweeps the segments of dead processes (:func:`sweep_stale_segments`).

With ``TRITON_INTERPRET=1`` the Triton interpreter dereferences integer pointers as host
addresses and its atomics are real atomics, so the same kernels run across processes here.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import re
import threading
import time
import uuid

import numpy as np

import torch
import torch.distributed as dist

from .. import host_collectives
from ..presets import HOST_GRID_LIMIT
from .base import SymmHandle

SHM_DIR = "/dev/shm"
SHM_PREFIX = "symmtriton-"
_SEGMENT_NAME = re.compile(re.escape(SHM_PREFIX) + r"[0-9a-f]{16}-p([0-9]+)")
HOST_SIGNAL_PAD_SIZE = 16 * 1024  # bytes per rank: 4096 uint32 barrier slots
_PAGE = mmap.PAGESIZE


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


class HostSegment:
    """This rank's segment, created, reserved and mapped but not yet shared.

    The creating process holds a shared ``flock`` on the file until it unlinks it, so a sweep
    can tell a live segment from a stale one even where the pid in its name means nothing
    (another pid namespace sharing ``/dev/shm``)."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.pad_offset = _round_up(max(nbytes, 1), _PAGE)
        self.total = self.pad_offset + HOST_SIGNAL_PAD_SIZE
        sweep_stale_segments()
        self.name = f"{SHM_PREFIX}{uuid.uuid4().hex[:16]}-p{os.getpid()}"
        self.path = os.path.join(SHM_DIR, self.name)
        self._fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_SH)
            os.ftruncate(self._fd, self.total)  # fresh tmpfs pages read as zero: pads start cleared
            # Reserve every page now: tmpfs hands out pages on first touch, and one it cannot
            # supply then is a SIGBUS in a kernel, on every rank.
            os.posix_fallocate(self._fd, 0, self.total)
            self.map = mmap.mmap(self._fd, self.total)
        except BaseException:
            self.unlink()
            raise

    def unlink(self) -> None:
        """Remove the name (idempotent); the mapping stays until :meth:`close`."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        if self._fd is not None:
            os.close(self._fd)  # drops the lock: only after the name is gone
            self._fd = None

    def close(self) -> None:
        """Unlink and unmap, for a segment that was never shared (views of it keep it mapped)."""
        self.unlink()
        try:
            self.map.close()
        except (AttributeError, BufferError):  # never mapped, or views still exported
            pass


def list_segments(pid: int | None = None) -> list[tuple[str, int]]:
    """``(path, creator pid)`` of every segment in ``SHM_DIR`` named like ours, or only of those
    that process ``pid`` created."""
    try:
        names = sorted(os.listdir(SHM_DIR))
    except OSError:
        return []
    found = [(os.path.join(SHM_DIR, n), int(m.group(1)))
             for n in names if (m := _SEGMENT_NAME.fullmatch(n))]
    return [f for f in found if pid is None or f[1] == pid]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists
        return True
    return True


def sweep_stale_segments() -> list[str]:
    """Unlink the segments that dead processes left in ``SHM_DIR``; return their paths.

    A segment goes only when all hold: its name is ours (``symmtriton-<16 hex>-p<pid>``), the
    file belongs to this user, no process ``pid`` exists (a reused pid keeps it: it is swept
    once that process is gone too), and no process holds its creator's lock (a live creator in
    another pid namespace keeps it). Anything else, or any error, leaves the file alone."""
    swept = []
    uid = os.getuid()
    for path, pid in list_segments():
        if pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if os.fstat(fd).st_uid != uid:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while a creator holds it
            os.unlink(path)
            swept.append(path)
        except OSError:
            continue
        finally:
            os.close(fd)
    return swept


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
        try:
            names = host_collectives.all_gather_object(
                (seg.name, seg.total), group, "host rendezvous (segment names)")
            maps = []
            for r, (name, total) in enumerate(names):
                maps.append(seg.map if r == rank else _map_peer(os.path.join(SHM_DIR, name), total))
            # Every rank has mapped every segment once all pass this point: unlink our own name.
            host_collectives.barrier(group, "host rendezvous (segments mapped)")
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
        self._ticker = threading.Thread(target=self._tick, name="symmtriton-host-clock",
                                        daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        clock, stop = self._clock, self._stop
        while not stop.wait(0.001):
            clock[0] = time.monotonic_ns()

    def local_tensor(self) -> torch.Tensor:
        return self._bytes[self.rank][: self.buffer_size]

    def signal_pad(self, rank: int) -> torch.Tensor:
        pad = self._bytes[rank][self._pad_offset:self._pad_offset + self.signal_pad_size]
        return pad.view(torch.int32)

    def _peer_bytes(self, rank: int) -> torch.Tensor:
        return self._bytes[rank][: self.buffer_size]

    def barrier(self) -> None:
        host_collectives.barrier(self._group, "host handle barrier")

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
