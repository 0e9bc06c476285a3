"""The benchmark's provenance (the ``meta`` of its JSON, a tool): the project's commit, the
versions, where the ranks run, how the times were taken and reduced, and the peer-copy ceiling
rows are validated against (:func:`symmtriton.tools.bench.report.mark_validity`). No host names."""

from __future__ import annotations

import datetime as _dt
import os
import subprocess
import sys
from dataclasses import asdict

import torch
import torch.distributed as dist
import triton

import symmtriton

from symmtriton import tuning
from symmtriton.backends import select_backend
from symmtriton.context import pdl_enabled
from symmtriton.env import ALL as ENV_NAMES

from .report import CEILING_TOLERANCE, GATHER_OPS
from .timing import TIMING_METHOD

#: the project's checkout: the folder above the package (an editable install or a source tree).
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(symmtriton.__file__)))
#: the ``rank_placement`` values.
PLACEMENTS = ("one rank per GPU", "ranks sharing a GPU", "CPU host")
#: how the peer-copy ceiling of a run that measures it is measured
#: (:func:`symmtriton.tools.bench.baselines.peer_copy_gbs`).
MEASURED = ("measured in this run: a copy-engine copy of 256 MiB from every rank into the next "
            "rank's GPU at once (through the symmetric buffer's peer mapping), median of the "
            "slowest rank's")


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-c", f"safe.directory={CHECKOUT}", "-C", CHECKOUT, *args],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git here
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def project_commit(given: str | None = None) -> str:
    """``given`` (``--commit``) when set; else ``git rev-parse HEAD`` of :data:`CHECKOUT`, with
    ``"-dirty"`` appended when tracked files differ from it; ``"unknown"`` outside a git checkout
    of the project (an installed wheel, a copied tree, no git)."""
    if given:
        return given
    top = _git("rev-parse", "--show-toplevel")
    if top is None or os.path.realpath(top) != os.path.realpath(CHECKOUT):
        return "unknown"  # not a checkout of the project (a wheel inside another repository)
    head = _git("rev-parse", "HEAD")
    if head is None:
        return "unknown"
    changes = _git("status", "--porcelain", "--untracked-files=no")
    return head + ("-dirty" if changes else "")


def nccl_version() -> str | None:
    try:
        v = torch.cuda.nccl.version()
    except Exception:  # a CPU build
        return None
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def rank_placement(topo) -> str:
    """One of :data:`PLACEMENTS` for a :class:`symmtriton.tools.bench.baselines.Topology`."""
    if topo.gpus == 0:
        return PLACEMENTS[2]
    return PLACEMENTS[0] if topo.layout == "one rank per GPU" else PLACEMENTS[1]


def ceiling_meta(topo, world: int, measured_gbs: float | None, given_gbs: float | None,
                 symmetric: bool, multicast: bool) -> dict:
    """The peer-copy ceiling rows are validated against: this run's measurement, else
    ``--peer-copy-gbs``, else none, with why (``gbs`` ``None``: no row is marked)."""
    if measured_gbs is not None:
        gbs, source = round(measured_gbs, 3), MEASURED
    elif given_gbs is not None:
        gbs, source = given_gbs, "given by --peer-copy-gbs (not measured in this run)"
    else:
        gbs = None
        if topo.gpus == 0:
            source = "none known: CPU host backend (no GPU interconnect)"
        elif world == 1:
            source = "none known: one rank (no peer)"
        elif topo.gpus < world:
            source = "none known: ranks share a GPU (no interconnect between them)"
        elif not symmetric:
            source = "none known: symmetric memory unavailable (the peer copy needs its mapping)"
        else:
            source = "none known"
    return {"peer_copy_gbs": gbs, "source": source,
            "tolerance": CEILING_TOLERANCE,
            "checked": "busbw of symmtriton, the baseline, symm_mem and ours_quant in each row; "
                       "rows over "
                       "(1 + tolerance) x the ceiling are valid: false"
                       + (f"; multicast: only {', '.join(GATHER_OPS)} (a switch that reduces "
                          "gives more busbw than a link carries)" if multicast else "")}


def bench_meta(group, opts, argv, topo, p2p_gbs, buf, ceiling: dict, multicast: bool) -> dict:
    """Provenance recorded in the JSON (no host names): with ``pdl`` (whether ``buf``'s kernels
    launch with programmatic dependent launch), every ``SYMMTRITON_*`` variable set,
    ``ceiling`` (:func:`ceiling_meta`) and ``multicast`` (on every rank's buffer)."""
    return {
        "tool": "symmtriton-bench", "symmtriton": symmtriton.__version__,
        "commit": project_commit(opts.commit), "torch": torch.__version__,
        "triton": triton.__version__, "cuda": torch.version.cuda, "nccl": nccl_version(),
        "device": tuning.device_name(), "devices": list(topo.devices), "gpus": topo.gpus,
        "world_size": dist.get_world_size(group), "rank_placement": rank_placement(topo),
        "layout": topo.layout, "layout_slug": topo.slug,
        "p2p_gbs": None if p2p_gbs is None else round(p2p_gbs, 3), "ceiling": ceiling,
        "multicast": multicast, "timing": dict(TIMING_METHOD), "time_reduction": "max_over_ranks",
        "backend": select_backend(), "dist_backend": str(dist.get_backend(group)),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "pdl": pdl_enabled(buf) if buf.symm_mem_hdl is not None else None,
        "environment": {k: os.environ[k] for k in ENV_NAMES if k in os.environ},
        "options": {k: (list(map(tuning.dtype_name, v)) if k == "dtypes" else v)
                    for k, v in asdict(opts).items()},
    }
