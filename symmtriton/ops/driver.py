"""The plan driver: the one path every collective takes from its public function to a launch.

A call goes ``call(op, ...)``:

1. **key** -> **plan**: ``op.key(...)`` is everything the launch decision depends on (tensor
   pointers, shapes, strides, dtypes, devices, group, config, timeout); a plan stored for that
   key (:func:`get_plan`) runs at once, without validation (``plan.run``). A plan that went
   stale (a config tuned since it was made) answers :data:`STALE` and is rebuilt.
2. else **validate** -> **prepare** -> **plan**: ``op.validate`` raises ``ValueError`` /
   ``TypeError`` naming the bad value before any launch; ``op.prepare`` decides the path
   (nothing to move, symmetric-memory kernel, or the torch.distributed fallback of
   :mod:`.fallback`) and returns a typed plan, stored under the key (:func:`put_plan`), then run.

Plans exist only for calls that validated; the cache is a small LRU, dropped whenever a buffer is
created, closed or destroyed (its pointers may change; a call given a view of a closed buffer
then raises, :func:`symmtriton.lifetime.check_live`). With ``SYMMTRITON_CHECK_UNIFORM=1`` the
ranks compare every call's shapes first (:func:`check_uniform`).

Autograd: a plan bumps the version counter of every tensor it writes (outputs, an in-place
``tensor``, a fused op's ``residual``) before it writes, as torch's in-place ops do, so a
backward that saved one of them raises "modified by an inplace operation" instead of using the
new values (:data:`bump_versions`; host-side only, so CUDA graph replays do not bump).

Threads: one thread at a time per group, see :mod:`._guard`.

How to add an op (see ops/all_gather.py, the shortest):

* ``kernels/<op>.py``: the device code (its kernel argument list is the contract);
* ``ops/_operands.py``: the op's operand record, a ``typing.NamedTuple`` (or an existing one of
  the same layout: :class:`~._operands.Flat`, :class:`~._operands.Rows`, ...); every reader
  takes its fields by name;
* ``ops/<op>.py``: a :class:`Collective` subclass (no op inherits another: what ops share is a
  function of a shared module, e.g. ``key = flat_key``, or ``ops/_rows.py`` for the row ops)
  with ``name`` (the public function's name), ``config_op`` (its key in
  :data:`symmtriton.config.CONFIG_OP`), ``key``, ``uniform``, ``validate`` and ``prepare``;
  ``prepare`` returns a plan naming its ``path`` (:data:`PATHS`): an :class:`OutputPlan` (ops
  writing one ``output``) or a plan class of its own with ``path`` and ``run(args, config)``;
  its kernel's :class:`~symmtriton.launch.Launch` is built in one function (``_kernel_launch``:
  the only place that lists the kernel's arguments) with ``Launch.on(ctx, ...)``, which adds
  the context's shared constexprs (``RANK``, ``WORLD_SIZE``, ``WORLD_P2``, ``SCOPE``,
  ``USE_PTX``); then the public function, the eager path ``call(OP, group, config, timeout_s,
  record(Record, (...)))`` (:func:`~._operands.record`), decorated ``@sequenced(_traced)``
  where ``_traced``, with the same parameters, dispatches to its ``torch.ops`` op under
  ``torch.compile`` (:func:`eager_only` first);
* ``custom_ops.py``: its schema and public function, one row of ``TABLE``; ``__init__.py``:
  export it; ``config.py``: its config name; ``tests/test_<op>.py``; a workload in
  ``workloads.py`` for bench and tuner.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from itertools import count
from typing import Callable

import torch
import torch.distributed as dist
import triton.language as tl

from .. import env
from .. import host_collectives
from ..config import LaunchConfig
from ..launch import Launch
from ..lifetime import check_live, register_invalidation_hook
from ..memory import resolve_group
from ..tuning import lookup_config
from ..tuning import stamp as tuning_stamp
from ._guard import GUARDS, concurrent_error, count_skipped, new_guard

_GroupMember = dist.GroupMember
_ProcessGroup = dist.ProcessGroup

TL_DTYPE = {
    torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32,
    torch.int8: tl.int8, torch.uint8: tl.uint8, torch.int16: tl.int16, torch.int32: tl.int32,
}

#: what ``plan.run`` returns when the plan must be rebuilt.
STALE = object()


def _version_bumper():
    """``bump(tensors)``: advance the autograd version counter of each tensor of the tuple
    (``torch.autograd.graph.increment_version``; a no-op for inference tensors), through its C
    entry point where that takes a tuple (~0.2 us)."""
    raw = torch._C._increment_version
    try:
        raw((torch.empty(0, device="cpu"),))
        return raw
    except TypeError:  # an older torch: one tensor per call
        one = torch.autograd.graph.increment_version
        return lambda tensors: [one(t) for t in tensors]


#: ``bump_versions(tensors)``: see the module docstring ("Autograd").
bump_versions = _version_bumper()


def group_name(group=None) -> str:
    """The name the ``torch.ops.symmtriton`` ops take for ``group`` (``None``: the default
    group)."""
    return resolve_group(group, "group").group_name


def eager_only(name: str, config, timeout_s) -> None:
    """While ``torch.compile`` traces, the public functions dispatch to their custom ops, whose
    schema has no ``config``/``timeout_s``: ``ValueError`` when one is given, never ignored."""
    if config is not None or timeout_s is not None:
        raise ValueError(f"{name}: config= and timeout_s= apply to eager calls only; under "
                         "torch.compile use the tuning cache and SYMMTRITON_TIMEOUT_S")


def tensor_desc(t):
    """What a plan depends on of tensor ``t`` (``None`` for ``None``)."""
    return None if t is None else (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)


# -- the config a plan was made with -------------------------------------------------------------
class ConfigChoice:
    """A plan's launch config: forced by ``config=`` (``op`` is None), or the tuning cache's
    answer for ``(op, numel, dtype, world, hidden)``, which may change when a config is tuned.

    :meth:`current` runs per call: while the tuning table's :func:`~symmtriton.tuning.stamp`
    is the one the answer was taken under, it holds without a lookup (one dict lookup and an int
    compare; the lookup with its ``torch.cuda.current_device()`` cost ~0.4 us on the CPU,
    benchmarks/host_path.py); after a change, one lookup decides (an equal config keeps the
    plan) and renews the stamp."""

    __slots__ = ("config", "op", "numel", "dtype", "world", "hidden", "stamp")

    def __init__(self, config: LaunchConfig, op: str | None = None, numel: int = 0,
                 dtype: torch.dtype | None = None, world: int = 0, hidden: int | None = None,
                 stamp: int = -1):
        self.config, self.op, self.numel, self.dtype = config, op, numel, dtype
        self.world, self.hidden, self.stamp = world, hidden, stamp

    def __repr__(self) -> str:
        return f"ConfigChoice({self.config!r}, op={self.op!r})"

    def current(self) -> bool:
        if self.op is None or self.stamp == tuning_stamp():
            return True
        stamp = tuning_stamp()
        if lookup_config(self.op, self.numel, self.dtype, self.world,
                         hidden=self.hidden) != self.config:
            return False
        self.stamp = stamp
        return True


def choose_config(forced: LaunchConfig | None, op: str, numel: int, dtype: torch.dtype,
                  world: int, hidden: int | None = None) -> ConfigChoice:
    if forced is not None:
        return ConfigChoice(forced)
    stamp = tuning_stamp()  # before the lookup: a change in between shows as a stale stamp
    return ConfigChoice(lookup_config(op, numel, dtype, world, hidden=hidden), op, numel, dtype,
                        world, hidden, stamp)


# -- plans -------------------------------------------------------------------------------------
#: the words of a plan's ``path`` (what a call runs), read by tools that report it:
#: ``"empty"`` nothing to move; ``"fallback"`` torch.distributed (:mod:`.fallback`); the
#: symmetric-memory kernels: ``"lines"`` flag-in-data lines (kernels/lines.py), ``"barrier"``
#: per-block barriers with peer loads and stores, ``"multimem"`` the same with multimem
#: instructions, ``"push"`` flagged chunks (kernels/push.py).
PATHS = ("empty", "fallback", "lines", "barrier", "multimem", "push")


def barrier_path(multimem: bool) -> str:
    """The path of a barrier kernel launched with ``USE_MULTIMEM=multimem``."""
    return "multimem" if multimem else "barrier"


@dataclass(eq=False)
class OutputPlan:
    """The plan of an op that writes one ``output`` and returns it (operands with ``output`` and
    ``input``: :class:`~._operands.Flat`, :class:`~._operands.AllReduceOperands`): launch
    ``kernel``, or run ``fallback(output, input, group)``, or neither (``path`` ``"empty"``).
    ``algorithm``: the all-reduce's (``"one_shot"``/``"two_shot"``, ``"lines"``), else None."""

    path: str
    kernel: Launch | None = None
    choice: ConfigChoice | None = None
    fallback: Callable | None = None
    group: object = None
    algorithm: str | None = None

    def run(self, args, config):
        output = args.output
        bump_versions((output,))
        if self.kernel is not None:
            if not self.choice.current():
                return STALE
            self.kernel.launch()
        elif self.fallback is not None:
            self.fallback(output, args.input, self.group)
        return output


class Collective:
    """One public op as the driver sees it (one instance per op; see the module docstring)."""

    name: str
    config_op: str

    def key(self, group, config, timeout_s, args) -> tuple:
        """Everything the plan depends on; may raise AttributeError/TypeError for non-tensors."""
        raise NotImplementedError

    def uniform(self, args) -> dict:
        """The tensors ranks compare under ``SYMMTRITON_CHECK_UNIFORM=1``."""
        raise NotImplementedError

    def validate(self, group, args) -> None:
        raise NotImplementedError

    def prepare(self, group, config, timeout_s, args):
        """The plan of this call: an object with ``path`` (one of :data:`PATHS`) and
        ``run(args, config)``, which returns the op's result or :data:`STALE`."""
        raise NotImplementedError


def call(op: Collective, group, config, timeout_s, args):
    """Run ``op`` on ``args`` (its operand record, :mod:`._operands`): its stored plan, else
    validate -> prepare -> store -> run, all inside the group's in-flight guard
    (:mod:`._guard`)."""
    if group is None:
        group = _GroupMember.WORLD  # what resolve_group(None) returns, without its checks
    if group is None or type(group) is not _ProcessGroup:
        group = resolve_group(group, "group")
    guard = GUARDS.get(group) or new_guard(group)
    if not guard.lock.acquire(False):
        raise concurrent_error(op.name, group, guard)
    try:  # one frame: the guard costs a lock, not a call
        try:
            key = op.key(group, config, timeout_s, args)
        except (AttributeError, TypeError):
            key = None  # not tensors: validation raises
        plan = get_plan(key)
        uniform = env.check_uniform()
        if plan is not None:
            if uniform:
                check_uniform(group, op.name, **op.uniform(args))
            result = plan.run(args, config)
            if result is not STALE:
                return result
        env.timeout_ns(timeout_s)  # raises naming a bad timeout_s / SYMMTRITON_TIMEOUT_S
        op.validate(group, args)
        check_live(args)  # no view of a destroyed buffer
        if uniform and plan is None:
            check_uniform(group, op.name, **op.uniform(args))
        plan = put_plan(key, op.prepare(group, config, timeout_s, args))
        return plan.run(args, config)
    finally:
        if guard.skipped:
            count_skipped(guard)
        guard.lock.release()


def check_uniform(group, op: str, **tensors: torch.Tensor) -> None:
    """All ranks compare the shapes and dtypes of this call (a host collective per call: a
    debugging aid, not for graphs or production) and every rank raises ``ValueError`` naming the
    ranks that differ. Off by default: a mismatch is otherwise undetectable without
    communication, and corrupts or times out."""
    mine = {k: (tuple(t.shape), str(t.dtype)) for k, t in tensors.items()}
    seen = host_collectives.all_gather_object((op, mine), group, f"{op} ({env.CHECK_UNIFORM})")
    if any(s != seen[0] for s in seen):
        raise ValueError(f"{op}: ranks disagree on the call: " +
                         "; ".join(f"rank {r}: {s[0]} {s[1]}" for r, s in enumerate(seen)))


# -- the plan cache ------------------------------------------------------------------------------
#: most plans kept (all ops together); least recently used ones go first.
PLAN_CACHE_MAX = 256
#: key -> [plan, tick of its last use]. Ticks instead of an OrderedDict's ``move_to_end``: that
#: hashes the key a second time per call (~0.27 us for an all-gather key on the CPU,
#: benchmarks/host_path.py); the oldest tick is searched only when an insertion overflows.
_PLANS: dict = {}
_TICKS = count()
#: held while the cache changes size (insert + evict, clear): calls of different groups may
#: run in different threads (:mod:`._guard`); lookups need no lock.
_PLANS_LOCK = threading.Lock()


def get_plan(key):
    """The plan stored for ``key``, or ``None`` (also for ``None`` or an unhashable key)."""
    if key is None:
        return None
    try:
        entry = _PLANS.get(key)
    except TypeError:
        return None
    if entry is None:
        return None
    entry[1] = next(_TICKS)
    return entry[0]


def last_plan():
    """The plan used most recently (``None`` when there is none): for tools that report what a
    call launched."""
    entries = list(_PLANS.values())
    if not entries:
        return None
    return max(entries, key=lambda entry: entry[1])[0]


def put_plan(key, plan):
    """Store ``plan`` for ``key``, evicting the least recently used beyond
    :data:`PLAN_CACHE_MAX`."""
    if key is None:
        return plan
    with _PLANS_LOCK:
        try:
            _PLANS[key] = [plan, next(_TICKS)]
        except TypeError:
            return plan
        while len(_PLANS) > PLAN_CACHE_MAX:
            del _PLANS[min(_PLANS.items(), key=lambda item: item[1][1])[0]]
    return plan


def clear_plans(buf=None) -> None:
    """Drop every plan: which buffer a group's collectives use, and its pointers, may change."""
    with _PLANS_LOCK:
        _PLANS.clear()


register_invalidation_hook(clear_plans)
