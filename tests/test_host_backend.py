"""The host backend's shared-memory segments (symmtriton/backends/host.py): pages reserved at
creation, a /dev/shm without room recorded as a failure every rank agrees on, and the sweep of
segments that dead processes left."""

import errno
import fcntl
import os

import torch
import torch.distributed as dist

import symmtriton as st
from symmtriton.backends import host as host_backend
from symmtriton.backends.host import SHM_PREFIX, list_segments

M = st.SymmetricMemoryManager


def _shm_files():
    """This worker's segments in /dev/shm (a concurrent job's are none of this test's business)."""
    return list_segments(pid=os.getpid())


def _no_room_on_one_rank(rank, world):
    """The last rank's /dev/shm cannot supply the pages (posix_fallocate fails as on a full
    tmpfs): every rank records that reason, keeps no segment, and falls back."""
    real = os.posix_fallocate

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if rank == world - 1:
        os.posix_fallocate = no_space
    try:
        buf = M.get_buffer("full", dist.group.WORLD, size_mb=1)
    finally:
        os.posix_fallocate = real
    dist.barrier()  # every rank has released its segment
    out = torch.empty(2 * world, dtype=torch.int64)
    st.all_gather_into_tensor(out, torch.tensor([rank, 7 * rank]))  # the torch.distributed fallback
    return buf.init_failure_reason, buf.symm_mem_hdl is None, _shm_files(), out.tolist()


def test_shm_without_room_is_a_recorded_failure(cpu_pool):
    res = cpu_pool(2).run(_no_room_on_one_rank)
    assert len({r[0] for r in res}) == 1
    assert "rank 1: OSError: [Errno 28] No space left on device" in res[0][0]
    for r in res:
        assert r[1:] == (True, [], [0, 0, 1, 7])


def test_segment_pages_are_reserved_at_creation():
    seg = host_backend.allocate_local(3 * 4096 + 5)
    try:
        assert os.fstat(seg._fd).st_blocks * 512 >= seg.total > 3 * 4096 + 5
    finally:
        seg.close()
    assert not os.path.exists(seg.path)


NEVER_A_PID = 2**22 + 1  # above PID_MAX_LIMIT: no process can have it


def _sweep(rank, world, directory):
    """Segments of dead processes go on the next creation; live ones and foreign files stay."""
    real_dir = host_backend.SHM_DIR
    host_backend.SHM_DIR = directory  # a private directory: no concurrent job can interfere
    held = None
    try:
        names = {"stale": f"{SHM_PREFIX}{rank:016x}-p{NEVER_A_PID}",
                 "live": f"{SHM_PREFIX}{rank + 16:016x}-p{os.getppid()}",
                 "locked": f"{SHM_PREFIX}{rank + 32:016x}-p{NEVER_A_PID}",
                 "foreign": f"{SHM_PREFIX}{rank + 48:016x}-p{NEVER_A_PID}.bak"}
        for name in names.values():
            open(os.path.join(directory, name), "wb").close()
        # a creator in another pid namespace: its pid means nothing here, but it holds the lock
        held = os.open(os.path.join(directory, names["locked"]), os.O_RDONLY)
        fcntl.flock(held, fcntl.LOCK_SH)
        dist.barrier()
        buf = M.get_buffer("sweep", dist.group.WORLD, size_mb=1)
        dist.barrier()
        left = {k: os.path.exists(os.path.join(directory, n)) for k, n in names.items()}
        return left, buf.init_failure_reason, sorted(os.listdir(directory))
    finally:
        host_backend.SHM_DIR = real_dir
        if held is not None:
            os.close(held)


def test_segments_of_dead_processes_are_swept(cpu_pool, tmp_path):
    res = cpu_pool(2).run(_sweep, str(tmp_path))
    for left, reason, _ in res:
        assert left == {"stale": False, "live": True, "locked": True, "foreign": True}
        assert reason is None
    assert len(res[0][2]) == 6  # live, locked, foreign of each rank; the buffers' are unlinked
