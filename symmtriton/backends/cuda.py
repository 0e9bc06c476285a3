"""``cuda`` backend: PyTorch symmetric memory (``symm_mem.empty`` + ``rendezvous``).

Since torch 2.11 ``symm_mem.empty`` may hand out a slice of a pooled symmetric allocation, so
the tensor's ``data_ptr()`` can sit past ``hdl.buffer_ptrs[rank]``. Every address this module
gives the kernels is ``hdl.buffer_ptrs[r] + delta`` with ``delta = data_ptr() - buffer_ptrs[rank]``
(checked equal on every rank), never the raw table.

Multicast is taken only from torch's handle (``hdl.multicast_ptr``); this module never creates a
multicast object. Several ranks on one GPU need ``TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1``;
torch then reports no multicast.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import host_collectives
from .base import SymmHandle


def allocate_local(nbytes: int, device: torch.device) -> torch.Tensor:
    import torch.distributed._symmetric_memory as symm_mem

    return symm_mem.empty(max(nbytes, 1), dtype=torch.uint8, device=device)


def _signal_pad_size(hdl) -> int:
    size = getattr(hdl, "signal_pad_size", None)
    if isinstance(size, int) and size > 0:
        return size
    import torch.distributed._symmetric_memory as symm_mem

    return int(symm_mem.get_signal_pad_size())


class CudaHandle(SymmHandle):
    backend = "cuda"

    def __init__(self, tensor: torch.Tensor, hdl, nbytes: int, group: dist.ProcessGroup):
        self._tensor = tensor
        self._hdl = hdl
        rank, world = hdl.rank, hdl.world_size
        delta = tensor.data_ptr() - hdl.buffer_ptrs[rank]
        if delta < 0:
            raise RuntimeError(
                f"symmetric tensor starts {-delta} bytes before its handle's buffer on rank {rank}")
        # Each process's pool may place its tensor at another offset (e.g. after different
        # earlier allocations): exchange them instead of assuming ours holds everywhere.
        props = torch.cuda.get_device_properties(tensor.device)
        where = (str(getattr(props, "uuid", "")) or props.name, tensor.device.index)
        infos = host_collectives.all_gather_object((delta, where), group,
                                                   "cuda rendezvous (buffer offsets)")
        deltas = [d for d, _ in infos]
        # Per-block barriers need every rank's block b running at once. Ranks that share a GPU
        # share its SMs: one block per SM each is surely co-resident, so split the SMs.
        self.ranks_on_device = sum(1 for _, w in infos if w == where)
        self.grid_limit = max(1, props.multi_processor_count // self.ranks_on_device)
        buffer_ptrs = [p + d for p, d in zip(hdl.buffer_ptrs, deltas)]
        mc = int(hdl.multicast_ptr or 0)
        # A multicast address maps one offset on every rank: usable only if the offsets agree.
        mc_ptr = mc + delta if mc and len(set(deltas)) == 1 else 0
        super().__init__(rank, world, nbytes, _signal_pad_size(hdl), buffer_ptrs,
                         list(hdl.signal_pad_ptrs), mc_ptr, tensor.device)

    def local_tensor(self) -> torch.Tensor:
        return self._tensor

    def signal_pad(self, rank: int) -> torch.Tensor:
        return self._hdl.get_signal_pad(rank, (self.signal_pad_size // 4,), torch.int32)

    def _peer_bytes(self, rank: int) -> torch.Tensor:
        if rank == self.rank:
            return self._tensor
        # torch's get_buffer may or may not add the pool offset itself: measure where it starts.
        probe = self._hdl.get_buffer(rank, (1,), torch.uint8, 0).data_ptr()
        view = self._hdl.get_buffer(rank, (self.buffer_size,), torch.uint8,
                                    self.buffer_ptrs[rank] - probe)
        if view.data_ptr() != self.buffer_ptrs[rank]:
            raise RuntimeError(
                f"peer view of rank {rank} starts at {view.data_ptr():#x}, expected "
                f"{self.buffer_ptrs[rank]:#x}")
        return view

    def barrier(self) -> None:
        self._hdl.barrier()

    def close(self) -> None:
        super().close()
        self._hdl = None
        self._tensor = None


def rendezvous(tensor: torch.Tensor, nbytes: int, group: dist.ProcessGroup) -> CudaHandle:
    import torch.distributed._symmetric_memory as symm_mem

    hdl = symm_mem.rendezvous(tensor, group)
    return CudaHandle(tensor, hdl, nbytes, group)
