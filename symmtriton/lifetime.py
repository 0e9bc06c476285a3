"""What may outlive a symmetric buffer, and how it learns that the buffer is gone.

* Caches derived from buffers (the plan cache of symmtriton.ops.driver) register a hook
  (:func:`register_invalidation_hook`), run whenever a buffer is created, closed or destroyed.
* Views of a closed buffer (destroyed, or replaced by a larger one) keep its local pages mapped,
  but no peer shares them any more: :func:`retire` records the memory when the buffer closes,
  and :func:`check_live` makes a collective given such a view raise instead of using it.
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef

#: callbacks ``hook(buf)``, run when a buffer is created, closed or destroyed.
_invalidation_hooks: list = []
#: the memory of closed buffers: storage address -> a weak reference to the storage. While it
#: lives (a view holds it) no other memory can have its address; expired entries are dropped.
_closed_memory: dict = {}


def register_invalidation_hook(hook) -> None:
    if hook not in _invalidation_hooks:
        _invalidation_hooks.append(hook)


def invalidate(buf) -> None:
    """Run every hook for ``buf`` (``None``: any buffer may have changed)."""
    for hook in list(_invalidation_hooks):
        hook(buf)


def retire(view: torch.Tensor) -> None:
    """``view`` (any view of a buffer's local memory) belongs to a buffer that is closing."""
    for ptr, ref in list(_closed_memory.items()):
        if ref.expired():
            del _closed_memory[ptr]
    storage = view.untyped_storage()
    _closed_memory[storage.data_ptr()] = StorageWeakRef(storage)


def check_live(args) -> None:
    """Raise ``ValueError`` when a tensor in ``args`` (or in a list or tuple there) is a view of
    a closed buffer's memory. Free while no buffer was ever closed."""
    if not _closed_memory:
        return
    for i, a in enumerate(args):
        for t in a if isinstance(a, (list, tuple)) else (a,):
            ref = (_closed_memory.get(t.untyped_storage().data_ptr())
                   if isinstance(t, torch.Tensor) and t.device.type != "meta" else None)
            if ref is not None and not ref.expired():
                raise ValueError(
                    f"argument {i} ({tuple(t.shape)} {t.dtype}) is a view of a symmetric buffer "
                    "that was destroyed or replaced by a larger one: take a new view of the "
                    "current buffer (SymmetricMemoryManager.get_buffer)")
