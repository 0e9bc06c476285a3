"""The benchmark's outputs: the nccl-tests-style table, CSV/JSON files, the PNG plot and the
kernel-efficiency lines (rows are the dicts :func:`symmtriton.bench.run_sweep` makes).

Files survive an interrupted run: :class:`ResultFiles` writes the JSON (the run's metadata)
before the first row and the CSV row by row, flushed as each row finishes; the end of the run
rewrites the JSON with every row and ``"complete": true``."""

from __future__ import annotations

import csv
import json
import os
import re
import sys

from .config import CONFIG_KEYS
from .workloads import V_COUNTS

#: columns of the CSV (and of each JSON row), in order.
FIELDS = ("size_bytes", "count", "dtype", "op", "variant", "placement", "mode", "world_size", "path",
          *CONFIG_KEYS, "time_us", "algbw_gbs", "busbw_gbs", "check",
          "baseline", "baseline_us", "speedup", "symm_mem_op", "symm_mem_us", "speedup_symm_mem",
          "copy_us", "copy_gbs", "ceiling", "ceiling_gbs", "efficiency")


#: ops that reduce and gather all of their size, like an all-reduce: busbw = algbw * 2(W-1)/W.
ALL_REDUCE_LIKE = ("fused", "all_reduce", "all_reduce_add_rmsnorm")


def bus_factor(op: str, world: int) -> float:
    """nccl-tests' busbw / algbw: ``2(W-1)/W`` for :data:`ALL_REDUCE_LIKE`, else ``(W-1)/W``."""
    return (world - 1) / world * (2 if op in ALL_REDUCE_LIKE else 1)


def bytes_moved(op: str, placement: str, total: int, world: int) -> int:
    """Bytes one rank's kernel moves through its memory (see ``--help``: efficiency)."""
    base = total + total // world
    moved = 2 * base if op in ALL_REDUCE_LIKE else base
    return moved + (2 * total if placement == "staged" else 0)


def _fmt(v, width, prec=2):
    if v is None:
        return "-".rjust(width)
    if isinstance(v, float):
        return f"{v:{width}.{prec}f}"
    return str(v).rjust(width)


def format_table(rows: list[dict], meta: dict) -> str:
    """nccl-tests-like text table of ``rows``."""
    cols = [("size", "size_bytes", 12), ("count", "count", 11), ("type", "dtype", 9), ("op", "op", 22),
            ("variant", "variant", 8), ("placement", "placement", 10), ("mode", "mode", 6),
            ("time", "time_us", 10),
            ("algbw", "algbw_gbs", 8), ("busbw", "busbw_gbs", 8), ("check", "check", 6),
            ("block", "block_size", 6), ("warps", "num_warps", 5), ("maxblk", "max_blocks", 6),
            ("base", "baseline_us", 10), ("speedup", "speedup", 8), ("symm_mem", "symm_mem_us", 10),
            ("copy", "copy_us", 9), ("eff", "efficiency", 6)]
    units = {"size": "(B)", "count": "(elems)", "time": "(us)", "algbw": "(GB/s)", "busbw": "(GB/s)",
             "base": "(us)", "symm_mem": "(us)", "copy": "(us)"}
    lines = [f"# symmtriton-bench: world {meta['world_size']} ({meta.get('layout', '?')}), device "
             f"{meta['device']}, backend {meta['backend']}/{meta['dist_backend']}, torch {meta['torch']}, "
             f"triton {meta['triton']}, pdl {meta.get('pdl')}, {meta['date']}",
             "# base = torch.distributed, symm_mem = torch.ops.symm_mem (fastest), copy = local device copy, "
             "eff = efficiency against the row's ceiling (p2p or local copy)",
             "#" + " ".join(h.rjust(w) for h, _, w in cols)[1:],
             "#" + " ".join(units.get(h, "").rjust(w) for h, _, w in cols)[1:]]
    for r in rows:
        lines.append(" " + " ".join(_fmt(r[k], w) for _, k, w in cols)[1:])
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "device"


def _csv_row(row: dict) -> dict:
    return {k: ("" if row[k] is None else row[k]) for k in FIELDS}


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
            json.dump({"meta": self.meta, "complete": complete, "notes": notes, "columns": list(FIELDS),
                       "rows": rows}, f, indent=1)
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
                print("# note: matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return self.paths


def plot(rows: list[dict], path: str, meta: dict) -> None:
    """Latency and busbw vs size, one line per implementation, one row of panels per op."""
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
            counts = f" {r['variant']}" if r["variant"] in V_COUNTS else ""  # not the algorithm
            sfx = counts + plain
            impls = [(f"symmtriton {r['placement']}{sfx}", r["time_us"]),
                     (f"torch.distributed ({r['baseline']}){sfx}", r["baseline_us"]),
                     (f"torch symm_mem {r['symm_mem_op']}{sfx}", r["symm_mem_us"]),
                     (f"local copy{plain}", r["copy_us"])]
            for label, us in impls:
                if us:
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
        what = " ".join(x for x in (r["op"], r["variant"], r["placement"], r["mode"]) if x)
        head = f"# efficiency {what} {r['size_bytes']} B: "
        if r["ceiling"] == "p2p":
            out.append(head + f"busbw {r['busbw_gbs']:.0f} GB/s vs peer copy {r['ceiling_gbs']:.0f} GB/s "
                              f"= {100 * r['efficiency']:.0f}%")
        else:
            moved = bytes_moved(r["op"], r["placement"], r["size_bytes"], r["world_size"])
            out.append(head + f"{moved / (r['time_us'] * 1e-6) / 1e9:.0f} GB/s moved vs local copy "
                              f"{r['ceiling_gbs']:.0f} GB/s = {100 * r['efficiency']:.0f}%")
    return "\n".join(out)
