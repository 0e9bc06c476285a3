"""The handle shape shared by every backend.

A handle describes one symmetric allocation of ``buffer_size`` bytes on each of ``world_size``
ranks, plus one signal pad per rank. Kernels see only integers: ``buffer_ptrs_dev`` and
``signal_pad_ptrs_dev`` are addresses of int64 tables (one entry per rank) that live where the
kernels run (device memory for ``cuda``, host memory for ``host``).
"""

from __future__ import annotations

import torch


class SymmHandle:
    """Common surface of :class:`CudaHandle` and :class:`HostHandle` (torch's handle surface)."""

    backend: str = "?"
    rank: int
    world_size: int
    buffer_size: int
    signal_pad_size: int
    buffer_ptrs: list[int]
    signal_pad_ptrs: list[int]
    multicast_ptr: int

    def __init__(self, rank: int, world_size: int, buffer_size: int, signal_pad_size: int,
                 buffer_ptrs: list[int], signal_pad_ptrs: list[int], multicast_ptr: int,
                 device: torch.device):
        self.rank = rank
        self.world_size = world_size
        self.buffer_size = buffer_size
        self.signal_pad_size = signal_pad_size
        self.buffer_ptrs = list(buffer_ptrs)
        self.signal_pad_ptrs = list(signal_pad_ptrs)
        self.multicast_ptr = int(multicast_ptr)
        self.device = device
        # Tables the kernels index by rank; kept alive as long as the handle.
        self._buffer_table = torch.tensor(self.buffer_ptrs, dtype=torch.int64, device=device)
        self._signal_table = torch.tensor(self.signal_pad_ptrs, dtype=torch.int64, device=device)

    @property
    def buffer_ptrs_dev(self) -> int:
        return self._buffer_table.data_ptr()

    @property
    def signal_pad_ptrs_dev(self) -> int:
        return self._signal_table.data_ptr()

    #: processes of this group that share this rank's device (their grids must be co-resident).
    ranks_on_device: int = 1
    #: most blocks one kernel may use (None: no bound). Per-block barriers need every rank's
    #: block b running at the same time: on a GPU shared by several ranks, the blocks surely
    #: co-resident; in the interpreter, where blocks run one after another and each block's
    #: barrier is a round trip through Python, a few.
    grid_limit: int | None = None

    @property
    def signal_pad_slots(self) -> int:
        """32-bit words in each rank's signal pad (the barrier slots follow the reserved ones)."""
        return self.signal_pad_size // 4

    def get_buffer(self, rank: int, sizes, dtype: torch.dtype,
                   storage_offset: int = 0) -> torch.Tensor:
        """A tensor view of ``rank``'s buffer: ``sizes`` elements of ``dtype`` starting at element
        ``storage_offset``. Raises ``ValueError`` when the view would leave the buffer."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the group of size {self.world_size}")
        if not isinstance(sizes, (tuple, list, torch.Size)):
            sizes = (sizes,)
        sizes = tuple(int(s) for s in sizes)
        numel = 1
        for s in sizes:
            numel *= s
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
        itemsize = dtype.itemsize
        end = (storage_offset + numel) * itemsize
        if storage_offset < 0 or end > self.buffer_size:
            raise ValueError(
                f"view of {sizes} {dtype} at element offset {storage_offset} needs {end} bytes; "
                f"the buffer holds {self.buffer_size}")
        raw = self._peer_bytes(rank)
        return raw.view(dtype)[storage_offset:storage_offset + numel].view(sizes)

    def _peer_bytes(self, rank: int) -> torch.Tensor:  # pragma: no cover - backend specific
        raise NotImplementedError

    def signal_pad(self, rank: int) -> torch.Tensor:  # pragma: no cover - backend specific
        """``rank``'s whole signal pad as an int32 tensor (for inspection: kernels own it)."""
        raise NotImplementedError

    def barrier(self) -> None:  # pragma: no cover - backend specific
        raise NotImplementedError

    def close(self) -> None:
        """Drop every reference this handle holds; memory is freed once no view remains."""
        self._buffer_table = None
        self._signal_table = None
