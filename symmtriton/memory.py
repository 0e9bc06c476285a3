"""Symmetric buffers and their per-key registry.

A :class:`SymmetricMemoryBuffer` owns one symmetric allocation of ``size_in_mb`` MiB on every
rank of its process group. It rendezvouses once, in its constructor; collectives that use it
never rendezvous again.

**The buffer is a scratch area.** ``_allocate``, ``maybe_get_tensor`` and ``maybe_get_tensors``
all lay out from byte 0 on every call, so the views of one call alias the views of the previous
call, and every collective that runs on the buffer may overwrite them. Take a view, fill it,
run the collective, read the result; copy out what must outlive the next collective.

Past those ``size_in_mb`` MiB each rank's allocation holds the line area of the lines protocol
(:attr:`SymmetricMemoryBuffer.lines_off`): the allocation API never hands it out, so no view
aliases it. It is zeroed once, before the ranks agree the buffer is up.
"""

from __future__ import annotations

import logging
import math
import numbers
import operator

import torch
import torch.distributed as dist

from . import backends
from . import env
from . import host_collectives
from . import presets
from .kernels import protocol as _protocol
from .lifetime import invalidate as _invalidate
from .lifetime import retire

logger = logging.getLogger("symmtriton")

_MIB = 1024 * 1024


def _size_mb(name: str, value) -> None:
    """A size in MiB: a real number (not a bool, else ``TypeError``), finite and > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of MiB, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number of MiB, got {value!r}")


def _element_size(dtype: torch.dtype) -> int:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    return dtype.itemsize


def _count(name: str, value) -> int:
    """``value`` as an int >= 0: ints and integer-likes (numpy ints, 0-d integer tensors) pass;
    a float (even ``10.0``) or bool raises ``TypeError``, a negative value ``ValueError``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return n


def resolve_group(group, name: str = "process_group"):
    """``group``, or the default group for ``None``; raises naming the argument ``name``."""
    if group is None:
        if not dist.is_initialized():
            raise ValueError(f"{name} is None and torch.distributed is not initialized")
        return dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed.ProcessGroup or None, got {group!r}")
    return group


class SymmetricMemoryBuffer:
    """One symmetric allocation over ``process_group``; see the module docstring for aliasing.

    Attributes:
        symm_buffer: this rank's uint8 tensor, or ``None`` when symmetric memory is unavailable.
        symm_mem_hdl: the handle (rank, world_size, peer and signal-pad pointers, multicast
            pointer, ``get_buffer``, ``barrier``), or ``None``.
        init_failure_reason: why symmetric memory is unavailable (the same on every rank), or
            ``None``.
        backend: ``"cuda"`` or ``"host"``.
        has_multicast: every rank of the group has a non-zero multicast pointer.
    """

    def __init__(self, size_in_mb, process_group):
        _size_mb("size_in_mb", size_in_mb)
        self.process_group = resolve_group(process_group)
        self.size_in_mb = size_in_mb
        self.nbytes = int(size_in_mb * _MIB)
        self.symm_buffer: torch.Tensor | None = None
        self.symm_mem_hdl = None
        self.init_failure_reason: str | None = None
        self.has_multicast = False
        self.status: torch.Tensor | None = None
        self.rank = dist.get_rank(self.process_group)
        self.world_size = dist.get_world_size(self.process_group)
        self.backend = backends.select_backend()
        #: the line area: its byte offset in every rank's allocation, its words per source slot
        #: (``presets.LINES_SLOT_BYTES``; 0: none, at one rank) and the whole allocation's size
        self.lines_off = -(-self.nbytes // 16) * 16
        self.lines_words = (presets.LINES_SLOT_BYTES[self.backend] // _protocol.LINES_WORD_BYTES
                            if self.world_size > 1 else 0)
        self.alloc_bytes = self.lines_off + _protocol.lines_area_bytes(self.world_size,
                                                                    self.lines_words)
        self.device = backends.backend_device(self.backend)
        self._setup()

    # -- set-up: every rank agrees before and after rendezvous, so none is left in a collective.
    def _gather(self, obj, what: str) -> list:
        return host_collectives.all_gather_object(obj, self.process_group,
                                                  f"creating a symmetric buffer ({what})")

    def _setup(self) -> None:
        """Allocate, agree, rendezvous, agree. Whatever ends it early (a failed vote, a peer
        that died and broke a host collective, an interrupt) frees this rank's memory first:
        a host segment is never left in ``/dev/shm``."""
        local = hdl = None
        try:
            local, reason = self._allocate_local()
            votes = self._gather((reason, self.nbytes, self.backend), "allocation vote")
            if len({v[1] for v in votes}) != 1 or len({v[2] for v in votes}) != 1:
                raise ValueError(
                    "ranks disagree on the symmetric buffer: (bytes, backend) per rank = "
                    f"{[(v[1], v[2]) for v in votes]}")
            failed = [f"rank {r}: {v[0]}" for r, v in enumerate(votes) if v[0] is not None]
            if failed:
                self._fail("allocation failed on " + "; ".join(failed))
                return
            reason = None
            try:
                hdl = backends.rendezvous(self.backend, local, self.alloc_bytes,
                                          self.process_group)
                local = None  # the handle owns the memory now
                self._zero_line_area(hdl)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
            votes = self._gather((reason, hdl.multicast_ptr != 0 if hdl is not None else False),
                                 "rendezvous vote")
            failed = [f"rank {r}: {v[0]}" for r, v in enumerate(votes) if v[0] is not None]
            if failed:
                self._fail("rendezvous failed on " + "; ".join(failed))
                return
            # Error word the barriers write on timeout: host memory the kernels can store to
            # (pinned, so mapped into the GPU's address space), read by the host without a sync.
            self.status = torch.zeros(4, dtype=torch.int32, device="cpu",
                                      pin_memory=self.backend == "cuda")
            self.symm_mem_hdl, self.symm_buffer = hdl, hdl.local_tensor()[:self.nbytes]
            self.has_multicast = all(v[1] for v in votes)
            hdl = None
        finally:
            if hdl is not None:
                hdl.close()
            backends.release_local(local)

    def _allocate_local(self):
        """(this rank's memory, None) or (None, the reason it could not be had)."""
        try:
            if env.disabled():
                raise RuntimeError(f"disabled by {env.DISABLE}=1")
            return backends.allocate_local(self.backend, self.alloc_bytes, self.device), None
        except Exception as exc:  # any allocation failure becomes a recorded reason
            return None, f"{type(exc).__name__}: {exc}"

    def _zero_line_area(self, hdl) -> None:
        """Zero this rank's line area and wait for it: the vote after the rendezvous then tells
        every rank that every area is clean before any peer can write into it."""
        hdl.local_tensor()[self.lines_off:self.alloc_bytes].zero_()
        if self.backend == "cuda":
            torch.cuda.synchronize(self.device)

    def _fail(self, reason: str) -> None:
        self.init_failure_reason = reason
        if self.rank == 0:
            logger.warning("symmetric memory unavailable, collectives fall back to "
                           "torch.distributed: %s", reason)

    # -- the allocation API (every call lays out from byte 0: see the module docstring).
    def _can_allocate(self, numel: int, dtype: torch.dtype) -> bool:
        """Whether ``numel`` elements of ``dtype`` fit the buffer (``False`` when it is
        unavailable). ``numel`` is an int or integer-like (numpy ints); a float raises."""
        nbytes = _count("numel", numel) * _element_size(dtype)
        return self.symm_mem_hdl is not None and nbytes <= self.nbytes

    def _allocate(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A 1-D view of ``numel`` elements of ``dtype`` at byte 0. Raises ``ValueError`` when it
        does not fit and ``RuntimeError`` when symmetric memory is unavailable."""
        nbytes = _count("numel", numel) * _element_size(dtype)
        if self.symm_mem_hdl is None:
            raise RuntimeError(f"symmetric memory unavailable: {self.init_failure_reason}")
        if nbytes > self.nbytes:
            raise ValueError(
                f"{numel} elements of {dtype} need {nbytes} bytes; the buffer holds {self.nbytes}")
        return self.symm_buffer[:nbytes].view(dtype)

    def maybe_get_tensor(self, tensor_shape, dtype: torch.dtype) -> dict:
        """``{"tensor": view of tensor_shape at byte 0, "handle": h}``, or both ``None`` when
        symmetric memory is unavailable or the tensor does not fit. A negative or non-integer
        dimension raises."""
        if not isinstance(tensor_shape, (tuple, list, torch.Size)):
            raise TypeError(
                f"tensor_shape must be a tuple, list or torch.Size, got {tensor_shape!r}")
        dims = [_count("tensor_shape entry", d) for d in tensor_shape]
        numel = math.prod(dims)
        if not self._can_allocate(numel, dtype):
            return {"tensor": None, "handle": None}
        return {"tensor": self._allocate(numel, dtype).view(*dims), "handle": self.symm_mem_hdl}

    def maybe_get_tensors(self, tensor_specs, alignment: int = 16) -> dict:
        """Pack ``tensor_specs`` = ``[(numel, dtype), ...]`` one after another from byte 0.

        Each start is rounded up to ``max(alignment, dtype.itemsize)`` bytes: ``alignment`` must
        be a power of two (``ValueError`` otherwise), so every start is a multiple of its dtype's
        size too and each uint8 view can be viewed as its dtype. Returns ``{"handle": h,
        "tensors": [(uint8 view, byte offset), ...]}``, or both ``None`` when unavailable or too
        large."""
        if isinstance(alignment, bool) or not isinstance(alignment, int):
            raise TypeError(f"alignment must be an int, got {alignment!r}")
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment!r}")
        layout, offset = [], 0
        for spec in tensor_specs:
            try:
                numel, dtype = spec
            except (TypeError, ValueError):
                raise ValueError(f"each tensor spec must be (numel, dtype), got {spec!r}") from None
            nbytes = _count("numel", numel) * _element_size(dtype)
            step = max(alignment, dtype.itemsize)
            offset = -(-offset // step) * step
            layout.append((offset, nbytes))
            offset += nbytes
        if self.symm_mem_hdl is None or offset > self.nbytes:
            return {"handle": None, "tensors": None}
        return {"handle": self.symm_mem_hdl,
                "tensors": [(self.symm_buffer[o:o + n], o) for o, n in layout]}

    # -- helpers for the collectives.

    def byte_offset_of(self, tensor: torch.Tensor) -> int | None:
        """Byte offset of ``tensor``'s data inside this rank's buffer, or ``None`` when the tensor
        does not lie entirely inside it."""
        if self.symm_buffer is None or tensor.device != self.symm_buffer.device:
            return None
        start = tensor.data_ptr() - self.symm_buffer.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        if 0 <= start and end <= self.nbytes:
            return start
        return None

    def close(self) -> None:
        """Free this rank's memory: drops every reference; views handed out keep their pages
        alive until they are gone too (host), so a stale view never touches unmapped memory."""
        if self.symm_buffer is not None:
            retire(self.symm_buffer)  # views outlive it: collectives given one raise
        if self.symm_mem_hdl is not None:
            self.symm_mem_hdl.close()
        self.symm_mem_hdl = None
        self.symm_buffer = None
        self.__dict__.pop("_launch_ctx", None)
        self.__dict__.pop("_pair_tables", None)  # ops/all_gather_v.py
        if self.init_failure_reason is None:
            self.init_failure_reason = "destroyed"
        _invalidate(self)

    def __repr__(self) -> str:
        state = ("ok" if self.symm_mem_hdl is not None
                 else f"unavailable ({self.init_failure_reason})")
        return (f"SymmetricMemoryBuffer({self.size_in_mb} MiB, backend={self.backend}, "
                f"rank={self.rank}/{self.world_size}, multicast={self.has_multicast}, {state})")


class SymmetricMemoryManager:
    """Class-level registry of :class:`SymmetricMemoryBuffer`, one per key, created lazily."""

    _buffers: dict[str, SymmetricMemoryBuffer] = {}
    _default_size_mb = 256

    @classmethod
    def get_buffer(cls, key: str, process_group=None, size_mb=None) -> SymmetricMemoryBuffer:
        """The buffer for ``key``, created on first call (``process_group`` required then).

        Later calls return it unless ``size_mb`` (positive, finite) exceeds its size: then it is
        destroyed and one of ``size_mb`` takes its place, on ``process_group`` if given, else on
        the stored group (collective, like creation); views of the old one then raise in
        collectives, and CUDA graphs captured on it must be captured again. A buffer whose
        initialisation failed is returned as it is, never grown."""
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, got {key!r}")
        if size_mb is not None:
            _size_mb("size_mb", size_mb)
        buf = cls._buffers.get(key)
        if buf is not None and (size_mb is None or size_mb <= buf.size_in_mb
                                or buf.init_failure_reason is not None):
            return buf
        if buf is None and process_group is None:
            raise ValueError(f"buffer {key!r} does not exist yet: pass process_group to create it")
        group = buf.process_group if process_group is None else resolve_group(process_group)
        if buf is not None:  # grown: the new buffer keeps the key's place (buffer_for_group)
            buf.close()
        try:
            buf = cls._buffers[key] = SymmetricMemoryBuffer(size_mb or cls._default_size_mb, group)
        except BaseException:
            cls._buffers.pop(key, None)
            raise
        _invalidate(buf)  # the buffer a group's collectives use may change
        return buf

    @classmethod
    def is_initialized(cls, key: str) -> bool:
        return key in cls._buffers

    @classmethod
    def destroy(cls, key: str | None = None) -> None:
        """Free the buffer of ``key``, or of every key when ``key`` is ``None``. Call it when no
        collective on that buffer is in flight (e.g. after ``torch.cuda.synchronize()``)."""
        keys = list(cls._buffers) if key is None else [key]
        for k in keys:
            buf = cls._buffers.pop(k, None)
            if buf is not None:
                buf.close()  # runs the invalidation hooks
        _invalidate(None)

    @classmethod
    def buffer_for_group(cls, group, *, create: bool = True) -> SymmetricMemoryBuffer | None:
        """The buffer collectives on ``group`` use: the first registered buffer of that group
        that is usable, else the first registered one of that group, else a new default-sized
        one under ``"__symmtriton_<group name>"`` (``create=False``: ``None`` instead; creating
        is collective). Every rank runs the same calls, so every rank picks the same buffer."""
        group = resolve_group(group)
        fallback = None
        for buf in list(cls._buffers.values()):  # another thread may add one meanwhile
            if buf.process_group is group:
                if buf.symm_mem_hdl is not None:
                    return buf
                fallback = fallback or buf
        if fallback is not None or not create:
            return fallback
        return cls.get_buffer(f"__symmtriton_{group.group_name}", group)
