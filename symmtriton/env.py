"""Every ``SYMMTRITON_*`` environment variable: its name, its default and its parser, here and
nowhere else (README, "Environment", lists the same table).

=============================  =======  =======================================================
variable                       default  meaning
=============================  =======  =======================================================
``SYMMTRITON_BACKEND``         auto     ``cuda`` or ``host``: force the memory backend
``SYMMTRITON_DISABLE``         unset    ``1``: no symmetric memory (torch.distributed fallback)
``SYMMTRITON_TIMEOUT_S``       300      barrier bound in s; ``0``/``inf``: forever
``SYMMTRITON_BARRIER_SCOPE``   auto     ``sys``: system-scope barrier atomics even on one GPU
``SYMMTRITON_CHECK_UNIFORM``   unset    ``1``: ranks compare every call's shapes (debugging)
``SYMMTRITON_DIRECT_LAUNCH``   1        ``0``: launch through ``JITFunction.run`` every time
``SYMMTRITON_PROTOCOL``        auto     ``lines``/``barrier``/``push``: how collectives synchronise
``SYMMTRITON_PDL``             auto     ``off``/``0``: no programmatic dependent launch (sm_90+)
``SYMMTRITON_TUNING_CACHE``    ~/...    the tuned-config file (``~/.cache/symmtriton/tuning.json``)
``SYMMTRITON_EXIT_MARK``       unset    set: ``testing.teardown`` prints an exit mark (tools only)
=============================  =======  =======================================================

Only the standard library is imported: :mod:`symmtriton._interpret` reads
``SYMMTRITON_BACKEND`` before torch or triton load. Per-call readers (:func:`timeout_key`,
:func:`check_uniform`, ``tuning_cache_raw``) read the live environment with one dict lookup
(:func:`reader`): a variable set mid-process takes effect at the next call, no refresh needed.
"""

from __future__ import annotations

import functools
import numbers
import os

BACKEND = "SYMMTRITON_BACKEND"
DISABLE = "SYMMTRITON_DISABLE"
TIMEOUT_S = "SYMMTRITON_TIMEOUT_S"
BARRIER_SCOPE = "SYMMTRITON_BARRIER_SCOPE"
CHECK_UNIFORM = "SYMMTRITON_CHECK_UNIFORM"
DIRECT_LAUNCH = "SYMMTRITON_DIRECT_LAUNCH"
PROTOCOL = "SYMMTRITON_PROTOCOL"
PDL = "SYMMTRITON_PDL"
TUNING_CACHE = "SYMMTRITON_TUNING_CACHE"
EXIT_MARK = "SYMMTRITON_EXIT_MARK"  # read by symmtriton.testing.teardown (a tool)
#: every variable above (README's table lists the same names; tests/test_layering.py checks it).
ALL = (BACKEND, DISABLE, TIMEOUT_S, BARRIER_SCOPE, CHECK_UNIFORM, DIRECT_LAUNCH, PROTOCOL, PDL,
       TUNING_CACHE, EXIT_MARK)

DEFAULT_TIMEOUT_S = 300.0
DEFAULT_TUNING_CACHE = os.path.join("~", ".cache", "symmtriton", "tuning.json")

_ENV_DATA = getattr(os.environ, "_data", None)
if os.name == "posix" and isinstance(_ENV_DATA, dict):
    def reader(name: str):
        """A function of no arguments returning the raw value of environment variable ``name``
        (bytes) or ``None``: a change detector for per-call paths, reading the live environment
        every call (a variable set later takes effect at the next call). ``os.environ.get`` of a
        missing variable raises and catches a KeyError inside (microseconds); this is one dict
        lookup through a C call (``functools.partial`` of ``dict.get``, ~50 ns)."""
        return functools.partial(_ENV_DATA.get, name.encode())
else:  # pragma: no cover - non-CPython/POSIX environ
    def reader(name: str):
        return functools.partial(os.environ.get, name)


def raw(name: str):
    """The raw value of environment variable ``name`` (bytes on POSIX) or ``None``."""
    return reader(name)()


_timeout_raw = reader(TIMEOUT_S)
_check_uniform_raw = reader(CHECK_UNIFORM)
#: the raw ``$SYMMTRITON_TUNING_CACHE`` (a change detector, one dict lookup).
tuning_cache_raw = reader(TUNING_CACHE)


def interpreting() -> bool:
    """Triton runs kernels in its interpreter (``TRITON_INTERPRET``, set by _interpret.py)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def backend() -> str:
    """``$SYMMTRITON_BACKEND`` lower-cased, ``""`` when unset (symmtriton.backends checks it)."""
    return os.environ.get(BACKEND, "").strip().lower()


def disabled() -> bool:
    """``$SYMMTRITON_DISABLE=1``: never allocate symmetric memory."""
    return os.environ.get(DISABLE, "") == "1"


# -- the barrier's timeout ------------------------------------------------------------------------
#: largest bound in seconds (about 31.7 years): the kernels add it, in int64 ns, to a clock that
#: counts ns since the epoch, so it stays far below 2**63. Longer is "wait forever": 0 or inf.
MAX_TIMEOUT_S = 1e9
#: what :func:`timeout_ns` accepts, for its errors.
TIMEOUT_RANGE = "a number of seconds in [0, 1e9] (0 or inf: wait forever)"
#: (raw value of $SYMMTRITON_TIMEOUT_S, its bound in ns): the last parse, reused while it holds
#: (one tuple, replaced whole, so threads never see half of an update).
_TIMEOUT: tuple = (object(), 0)


def timeout_key(timeout_s: float | None):
    """What a call's barrier bound depends on, for plan keys: the argument, else the environment
    value (not parsed: parsing, and its errors, stay in :func:`timeout_ns`)."""
    return timeout_s if timeout_s is not None else ("env", _timeout_raw())


def timeout_ns(timeout_s: float | None = None) -> int:
    """Barrier bound in ns: the argument ``timeout_s``, else ``$SYMMTRITON_TIMEOUT_S``, else
    300 s; 0 = wait forever (``0`` or ``inf`` seconds). A bool or non-number ``timeout_s``
    raises ``TypeError``; NaN, a negative value or one above :data:`MAX_TIMEOUT_S` raises
    ``ValueError`` naming the argument or the variable and :data:`TIMEOUT_RANGE`. The
    environment is parsed once per distinct value."""
    global _TIMEOUT
    if timeout_s is None:
        key = _timeout_raw()
        cached = _TIMEOUT
        if key == cached[0]:
            return cached[1]
        text = os.environ.get(TIMEOUT_S, "")
        try:
            seconds = float(text) if text.strip() else DEFAULT_TIMEOUT_S
        except ValueError:
            raise ValueError(f"{TIMEOUT_S}={text!r} is not a number of seconds: expected "
                             f"{TIMEOUT_RANGE}") from None
        ns = _to_ns(seconds, f"{TIMEOUT_S}={text!r}")
        _TIMEOUT = (key, ns)
        return ns
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, numbers.Real):
        raise TypeError(f"timeout_s must be None or {TIMEOUT_RANGE}, got "
                        f"{type(timeout_s).__name__} {timeout_s!r}")
    return _to_ns(float(timeout_s), f"timeout_s={timeout_s!r}")


def _to_ns(seconds: float, what: str) -> int:
    if seconds == float("inf"):
        return 0
    if not 0 <= seconds <= MAX_TIMEOUT_S:  # NaN fails both
        raise ValueError(f"{what}: expected {TIMEOUT_RANGE}")
    return max(1, int(seconds * 1e9)) if seconds > 0 else 0  # a tiny bound is not "forever"


def timeout_s() -> float | None:
    """``$SYMMTRITON_TIMEOUT_S`` in seconds (as :func:`timeout_ns` parses it), ``None`` for
    wait forever: the bound of the host-side collectives (symmtriton.host_collectives)."""
    ns = timeout_ns()
    return ns / 1e9 if ns else None


# -- launch options -------------------------------------------------------------------------------
def barrier_scope_forced() -> bool:
    """``$SYMMTRITON_BARRIER_SCOPE=sys`` (``auto``, the default, lets the launcher choose)."""
    forced = os.environ.get(BARRIER_SCOPE, "auto")
    if forced not in ("auto", "sys"):
        raise ValueError(f"{BARRIER_SCOPE} must be 'auto' or 'sys', got {forced!r}")
    return forced == "sys"


def check_uniform() -> bool:
    """``$SYMMTRITON_CHECK_UNIFORM=1`` (read per call: one dict lookup)."""
    return _check_uniform_raw() in _ONE


_ONE = (b"1", "1")  # the raw value on POSIX (bytes), elsewhere (str)


#: values of ``$SYMMTRITON_PROTOCOL`` (see :func:`protocol`).
PROTOCOLS = ("auto", "lines", "barrier", "push")


def protocol() -> str:
    """``$SYMMTRITON_PROTOCOL``: how collectives synchronise. ``auto`` (default): flag-in-data
    lines (kernels/lines.py) for small messages (``context.lines_eligible``), barriers above, and a
    large reduce-scatter or two-shot all-reduce without multicast pushed in flagged chunks
    (``context.push_eligible``); ``lines``: lines whenever the line area holds the message;
    ``barrier``: never lines, never push; ``push``: never lines, and the reduce-scatter and the
    all-reduce (one-shot or two-shot, ``context.push_one_shot_eligible``) push whenever the
    buffer has room. Read when a call is planned (its first call with those tensors): set it
    alike on every rank, before the calls (or drop the plans,
    ``symmtriton.ops.driver.clear_plans``)."""
    mode = os.environ.get(PROTOCOL, "auto").strip().lower() or "auto"
    if mode not in PROTOCOLS:
        raise ValueError(f"{PROTOCOL} must be one of {', '.join(PROTOCOLS)}, got {mode!r}")
    return mode


#: values of ``$SYMMTRITON_PDL`` (see :func:`pdl`), and the spellings they also take.
PDL_MODES = ("auto", "on", "off")
_PDL_ALIASES = {"1": "on", "0": "off"}


def pdl() -> str:
    """``$SYMMTRITON_PDL``: whether kernels launch with programmatic dependent launch (PDL; see
    ``context.pdl_enabled``). ``auto`` (default): on CUDA devices of compute capability >= 9.0,
    never in the interpreter; ``on`` (``1``): the same, but a CUDA device below 9.0 raises;
    ``off`` (``0``): never. Read when a call is planned, as :func:`protocol`."""
    text = os.environ.get(PDL, "auto").strip().lower() or "auto"
    mode = _PDL_ALIASES.get(text, text)
    if mode not in PDL_MODES:
        raise ValueError(f"{PDL} must be one of auto, on (1), off (0), got {text!r}")
    return mode


def direct_launch() -> bool:
    """Launch plans through their ``CompiledKernel`` (``$SYMMTRITON_DIRECT_LAUNCH`` != ``0``)."""
    return os.environ.get(DIRECT_LAUNCH, "1") != "0"


# -- the tuning cache -----------------------------------------------------------------------------
def tuning_cache_path() -> str:
    """``$SYMMTRITON_TUNING_CACHE``, else ``~/.cache/symmtriton/tuning.json`` (user-expanded)."""
    return os.path.expanduser(os.environ.get(TUNING_CACHE) or DEFAULT_TUNING_CACHE)
