"""The benchmark's outputs: its rows (:func:`result_row`, one per row
:func:`symmtriton.tools.bench.cli.run_sweep` measures), the nccl-tests-style table, CSV/JSON
files, the PNG plot and the kernel-efficiency lines, and the check of every row against the
peer-copy ceiling (:func:`mark_validity`).

Files survive an interrupted run: :class:`ResultFiles` writes the JSON (the run's metadata)
before the first row and the CSV row by row, flushed as each row finishes; the end of the run
rewrites the JSON with every row and ``"complete": true``."""

from __future__ import annotations

import csv
import json
import os
import re
import sys

from symmtriton.config import CONFIG_KEYS
from symmtriton.tuning import dtype_name

from .workloads import V_COUNTS

#: rows at or above this size get an efficiency figure on the GPU.
EFF_MIN_BYTES = 1 << 20
#: columns of the CSV (and of each JSON row), in order.
FIELDS = ("size_bytes", "count", "dtype", "op", "variant", "fp8", "placement", "mode",
          "world_size", "path", *CONFIG_KEYS, "time_us", "algbw_gbs", "busbw_gbs", "check",
          "baseline", "baseline_us", "speedup", "symm_mem_op", "symm_mem_us", "speedup_symm_mem",
          "ours_quant_us", "speedup_ours_quant", "copy_us", "copy_gbs", "ceiling", "ceiling_gbs",
          "efficiency", "valid", "over_ceiling", "time_reduction", "commit")


#: ops that reduce and gather all of their size, like an all-reduce: busbw = algbw * 2(W-1)/W.
ALL_REDUCE_LIKE = ("fused", "all_reduce", "all_reduce_add_rmsnorm")
#: ops that only gather: their busbw is what each rank's link receives, multicast or not.
GATHER_OPS = ("all_gather", "all_gather_v")
#: a busbw above the peer-copy ceiling by more than this fraction marks its row invalid.
CEILING_TOLERANCE = 0.05
#: what a row times: (name in ``over_ceiling``, its time column, the speedups it takes part in).
TIMED = (("symmtriton", "time_us", ("speedup", "speedup_symm_mem", "speedup_ours_quant")),
         ("baseline", "baseline_us", ("speedup",)),
         ("symm_mem", "symm_mem_us", ("speedup_symm_mem",)),
         ("ours_quant", "ours_quant_us", ("speedup_ours_quant",)))


def bus_factor(op: str, world: int) -> float:
    """nccl-tests' busbw / algbw: ``2(W-1)/W`` for :data:`ALL_REDUCE_LIKE`, else ``(W-1)/W``."""
    return (world - 1) / world * (2 if op in ALL_REDUCE_LIKE else 1)


def ceiling_applies(op: str, multicast: bool) -> bool:
    """Whether the peer-copy ceiling bounds ``op``'s busbw: always without multicast; with it,
    only :data:`GATHER_OPS` (a switch that reduces, ``multimem.ld_reduce``, delivers more busbw
    than a link carries)."""
    return not multicast or op in GATHER_OPS


def row_label(row: dict) -> str:
    """``op [variant] dtype size B placement mode [fp8 form]``: names a row in warnings and
    reports."""
    fp8 = row.get("fp8")
    parts = (row["op"], row["variant"], row["dtype"], f"{row['size_bytes']} B", row["placement"],
             row["mode"], fp8 and f"fp8 {fp8}")
    return " ".join(str(x) for x in parts if x)


def busbw_gbs(row: dict, column: str) -> float | None:
    """The busbw (GB/s) of the time in ``column`` (microseconds) of ``row``; ``None`` if none."""
    us = row[column]
    if not us:
        return None
    return row["size_bytes"] / (us * 1e-6) / 1e9 * bus_factor(row["op"], row["world_size"])


def mark_validity(row: dict, ceiling_gbs: float | None) -> list[str]:
    """Set ``row["valid"]`` and ``row["over_ceiling"]`` against the peer-copy ceiling (``None``:
    none known or it does not apply; both stay empty): invalid when a busbw of :data:`TIMED`
    exceeds ``ceiling_gbs`` by more than :data:`CEILING_TOLERANCE`; the speedups an invalid time
    takes part in are blanked (an unphysical time is no win for either side). Returns one
    warning line per time over the ceiling."""
    row["valid"] = row["over_ceiling"] = None
    if ceiling_gbs is None:
        return []
    over, warnings = [], []
    for name, column, speedups in TIMED:
        bw = busbw_gbs(row, column)
        if bw is None or bw <= ceiling_gbs * (1 + CEILING_TOLERANCE):
            continue
        over.append(name)
        who = {"baseline": f"baseline ({row['baseline']})",
               "symm_mem": f"symm_mem ({row['symm_mem_op']})"}.get(name, name)
        by = 100 * (bw / ceiling_gbs - 1)
        warnings.append(f"invalid row {row_label(row)}: {who} busbw {bw:.1f} GB/s exceeds the "
                        f"peer-copy ceiling {ceiling_gbs:.1f} GB/s by {by:.0f}% "
                        f"(more than {100 * CEILING_TOLERANCE:.0f}%)")
        for key in speedups:
            row[key] = None
    row["valid"] = not over
    row["over_ceiling"] = ";".join(over) or None
    return warnings


def bytes_moved(op: str, placement: str, total: int, world: int) -> int:
    """Bytes one rank's kernel moves through its memory (see ``--help``: efficiency)."""
    base = total + total // world
    moved = 2 * base if op in ALL_REDUCE_LIKE else base
    return moved + (2 * total if placement == "staged" else 0)


def _us(t):
    return None if t is None else round(t * 1e6, 3)


def _ratio(a, b):
    return None if a is None or b is None or b <= 0 else round(a / b, 3)


def result_row(op, variant, dtype, shape, placement, mode, world, path, cfg, t, check, base,
               meta, *, on_gpu: bool, fp8: str | None = None) -> dict:
    """One result row (``fp8``: the FP8 form of an ``--fp8`` row); ``meta``
    (:func:`symmtriton.tools.bench.meta.bench_meta`) gives the peer-copy ceiling (the efficiency
    of cross-GPU rows) and the commit."""
    total, p2p_gbs = shape.total_bytes, meta["ceiling"]["peer_copy_gbs"]
    algbw = None if t is None else total / t / 1e9
    busbw = None if algbw is None else algbw * bus_factor(op, world)
    copy_s = base.get("copy_s")
    copy_gbs = None if not copy_s else 2 * total / copy_s / 1e9
    ceiling, ceiling_gbs = ("p2p", p2p_gbs) if p2p_gbs else ("local", copy_gbs)
    eff = None
    if on_gpu and total >= EFF_MIN_BYTES and t and ceiling_gbs:
        moved = bytes_moved(op, placement, total, world)
        moved_gbs = busbw if ceiling == "p2p" else moved / t / 1e9
        eff = moved_gbs / ceiling_gbs
    return {
        "size_bytes": total, "count": shape.count, "dtype": dtype_name(dtype), "op": op,
        "variant": variant, "fp8": fp8, "placement": placement, "mode": mode, "world_size": world,
        "path": path,
        **(cfg.as_dict() if cfg else dict.fromkeys(CONFIG_KEYS)), "time_us": _us(t),
        "algbw_gbs": None if algbw is None else round(algbw, 3),
        "busbw_gbs": None if busbw is None else round(busbw, 3), "check": check,
        "baseline": base.get("baseline"), "baseline_us": _us(base.get("baseline_s")),
        "speedup": _ratio(base.get("baseline_s"), t),
        "symm_mem_op": base.get("symm_mem_op"), "symm_mem_us": _us(base.get("symm_mem_s")),
        "speedup_symm_mem": _ratio(base.get("symm_mem_s"), t),
        "ours_quant_us": _us(base.get("ours_quant_s")),
        "speedup_ours_quant": _ratio(base.get("ours_quant_s"), t),
        "copy_us": _us(copy_s), "copy_gbs": None if copy_gbs is None else round(copy_gbs, 3),
        "ceiling": ceiling if ceiling_gbs else None,
        "ceiling_gbs": None if not ceiling_gbs else round(ceiling_gbs, 3),
        "efficiency": None if eff is None else round(eff, 3), "valid": None, "over_ceiling": None,
        "time_reduction": meta["time_reduction"], "commit": meta["commit"],
    }


def _fmt(v, width, prec=2):
    if v is None:
        return "-".rjust(width)
    if isinstance(v, bool):
        return ("yes" if v else "NO").rjust(width)
    if isinstance(v, float):
        return f"{v:{width}.{prec}f}"
    return str(v).rjust(width)


def format_table(rows: list[dict], meta: dict) -> str:
    """nccl-tests-like text table of ``rows``."""
    cols = [("size", "size_bytes", 12), ("count", "count", 11), ("type", "dtype", 9),
            ("op", "op", 22), ("variant", "variant", 8), ("fp8", "fp8", 7),
            ("placement", "placement", 10),
            ("mode", "mode", 6), ("time", "time_us", 10), ("algbw", "algbw_gbs", 8),
            ("busbw", "busbw_gbs", 8), ("check", "check", 6),
            ("block", "block_size", 6), ("warps", "num_warps", 5), ("maxblk", "max_blocks", 6),
            ("base", "baseline_us", 10), ("speedup", "speedup", 8), ("symm_mem", "symm_mem_us", 10),
            ("ours+q", "ours_quant_us", 10), ("copy", "copy_us", 9), ("eff", "efficiency", 6),
            ("valid", "valid", 5)]
    units = {"size": "(B)", "count": "(elems)", "time": "(us)", "algbw": "(GB/s)",
             "busbw": "(GB/s)", "base": "(us)", "symm_mem": "(us)", "ours+q": "(us)",
             "copy": "(us)"}
    lines = [f"# symmtriton-bench: world {meta['world_size']} ({meta.get('layout', '?')}), device "
             f"{meta['device']}, backend {meta['backend']}/{meta['dist_backend']}, "
             f"torch {meta['torch']}, triton {meta['triton']}, pdl {meta.get('pdl')}, "
             f"commit {meta.get('commit')}, {meta['date']}",
             "# base = torch.distributed, symm_mem = torch.ops.symm_mem (fastest), "
             "ours+q = fp8 rows: ours in the input dtype, then torch's quantisation, "
             "copy = local device copy, eff = efficiency against the row's ceiling (p2p or "
             "local copy)",
             f"# times: to completion, max over ranks; valid = every busbw within "
             f"{100 * CEILING_TOLERANCE:.0f}% of the peer-copy ceiling "
             f"({(meta.get('ceiling') or {}).get('peer_copy_gbs') or 'none known'} GB/s)",
             "#" + " ".join(h.rjust(w) for h, _, w in cols)[1:],
             "#" + " ".join(units.get(h, "").rjust(w) for h, _, w in cols)[1:]]
    for r in rows:
        lines.append(" " + " ".join(_fmt(r[k], w) for _, k, w in cols)[1:])
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "device"


def _csv_cell(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    return "" if v is None else v


def _csv_row(row: dict) -> dict:
    return {k: _csv_cell(row[k]) for k in FIELDS}


class ResultFiles:
    """``<stem>.csv``, ``.json`` and (matplotlib permitting) ``.png`` under ``opts.out_dir``
    (``opts``: a ``BenchOptions``; ``name`` and ``plot`` are read too). Rank 0 only."""

    def __init__(self, opts, meta: dict):
        os.makedirs(opts.out_dir, exist_ok=True)
        layout = f"_{meta['layout_slug']}" if meta.get("layout_slug") else ""
        default = f"symmtriton_{_slug(meta['device'])}_w{meta['world_size']}{layout}"
        self.stem = os.path.join(opts.out_dir, opts.name or default)
        self.paths = {"csv": self.stem + ".csv", "json": self.stem + ".json"}
        self.meta, self.plot = meta, opts.plot
        self._json([], [], complete=False)
        self._csv = open(self.paths["csv"], "w", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._csv, fieldnames=FIELDS)
        self._writer.writeheader()
        self._csv.flush()

    def _json(self, rows, notes, complete: bool) -> None:
        tmp = self.paths["json"] + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"meta": self.meta, "complete": complete, "notes": notes,
                       "columns": list(FIELDS), "rows": rows}, f, indent=1)
            f.write("\n")
        os.replace(tmp, self.paths["json"])

    def add(self, row: dict) -> None:
        """Append one finished row to the CSV, on disk now."""
        self._writer.writerow(_csv_row(row))
        self._csv.flush()

    def finish(self, rows: list[dict], notes: list[str]) -> dict:
        """Close the CSV, write the complete JSON and the plot; returns the paths."""
        self._csv.close()
        self._json(rows, notes, complete=True)
        if self.plot:
            png = self.stem + ".png"
            try:
                plot(rows, png, self.meta)
                self.paths["png"] = png
            except ImportError:
                print("# note: matplotlib is not installed: no plot (pip install matplotlib)",
                      file=sys.stderr)
        return self.paths


def counts_of(variant: str | None) -> str:
    """The count distribution a row's ``variant`` names first (``uniform/barrier``: ``uniform``),
    or ``""`` for a row without one."""
    head = (variant or "").split("/")[0]
    return head if head in V_COUNTS else ""


def plot(rows: list[dict], path: str, meta: dict) -> None:
    """Latency and busbw vs size, one line per implementation, one row of panels per op; times
    over the peer-copy ceiling (``over_ceiling``) are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r["op"] for r in rows))
    if not ops:
        return
    several_dtypes = len({r["dtype"] for r in rows}) > 1
    fig, axes = plt.subplots(len(ops), 2, figsize=(13, 4.2 * len(ops)), squeeze=False)
    for row_axes, op in zip(axes, ops):
        lines: dict = {}
        for r in (r for r in rows if r["op"] == op):
            plain = f" {r['mode']}" + (f" {r['dtype']}" if several_dtypes else "")
            counts = f" {c}" if (c := counts_of(r["variant"])) else ""  # not the algorithm
            sfx = counts + (f" fp8 {r['fp8']}" if r.get("fp8") else "") + plain
            over = (r["over_ceiling"] or "").split(";")
            impls = [(f"symmtriton {r['placement']}{sfx}", r["time_us"], "symmtriton"),
                     (f"torch.distributed ({r['baseline']}){sfx}", r["baseline_us"], "baseline"),
                     (f"torch symm_mem {r['symm_mem_op']}{sfx}", r["symm_mem_us"], "symm_mem"),
                     (f"symmtriton {r['placement']} + torch quantisation{sfx}",
                      r.get("ours_quant_us"), "ours_quant"),
                     (f"local copy{plain}", r["copy_us"], "copy")]
            for label, us, name in impls:
                if us and name not in over:  # an invalid time is not plotted
                    lines.setdefault(label, {})[r["size_bytes"]] = us
        factor = bus_factor(op, meta["world_size"])
        for label, pts in lines.items():
            sizes = sorted(pts)
            style = "-" if label.startswith("symmtriton") else "--"
            row_axes[0].plot(sizes, [pts[s] for s in sizes], style, marker="o", ms=3, label=label)
            row_axes[1].plot(sizes, [s / (pts[s] * 1e-6) / 1e9 * factor for s in sizes], style,
                             marker="o", ms=3, label=label)
        for ax, ylabel in zip(row_axes, ("time per call (us)", "bus bandwidth (GB/s)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("size (bytes)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{op}, W={meta['world_size']}, {meta['device']}")
            ax.grid(True, which="both", alpha=0.3)
        row_axes[0].set_yscale("log")
        row_axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def efficiency_report(rows: list[dict]) -> str:
    """Efficiency of the large GPU rows against their ceiling (see ``--help``: efficiency)."""
    out = []
    for r in rows:
        if r["efficiency"] is None:
            continue
        head = f"# efficiency {row_label(r)}: "
        if r["ceiling"] == "p2p":
            out.append(head + f"busbw {r['busbw_gbs']:.0f} GB/s vs peer copy "
                              f"{r['ceiling_gbs']:.0f} GB/s = {100 * r['efficiency']:.0f}%")
        else:
            moved = bytes_moved(r["op"], r["placement"], r["size_bytes"], r["world_size"])
            out.append(head + f"{moved / (r['time_us'] * 1e-6) / 1e9:.0f} GB/s moved vs local copy "
                              f"{r['ceiling_gbs']:.0f} GB/s = {100 * r['efficiency']:.0f}%")
    return "\n".join(out)
