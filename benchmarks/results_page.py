"""Write benchmarks/results/README.md, the results page, from benchmarks/results/latest/*.json.

The page is generated, never edited by hand: tests/test_results_page.py regenerates it and
checks it equals the committed file. Each result set in latest/ is the newest full run of one
machine and layout (its JSON ``meta`` names the commit and date); the page gives, per set,
op x size tables of the median time per call (max over ranks) next to the baselines of the
same run, for every mode and placement the set has, and the bus bandwidth against the ceiling
measured in the same run. The first table ("Headline") is the one README.md shows.

    python benchmarks/results_page.py              # rewrite benchmarks/results/README.md
    python benchmarks/results_page.py --out FILE   # write elsewhere
"""
from __future__ import annotations

import argparse
import json
import pathlib

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
LATEST = RESULTS / "latest"
PAGE = RESULTS / "README.md"

#: the set, mode, placement and sizes of the headline table (the one README.md shows).
HEADLINE = ("h200x2_w2_pergpu", "graph", "zero_copy",
            (4 << 10, 64 << 10, 1 << 20, 16 << 20, 1 << 30))
OP_NAMES = {"all_gather": "all-gather", "reduce_scatter": "reduce-scatter",
            "fused": "RS + add + RMSNorm + AG", "reduce_scatter_add_rmsnorm": "RS + add + RMSNorm",
            "all_reduce": "all-reduce",
            "all_reduce_add_rmsnorm": "AR + add + RMSNorm", "all_gather_v": "all_gather_v",
            "reduce_scatter_v": "reduce_scatter_v"}
OP_ORDER = tuple(OP_NAMES)
V_OPS = ("all_gather_v", "reduce_scatter_v")
MODES = {"graph": "CUDA graph", "eager": "eager"}
PLACEMENTS = {"zero_copy": "zero-copy", "staged": "staged"}
#: bandwidth tables start at this size (smaller messages are latency-bound).
BW_MIN_BYTES = 1 << 20
#: order of the sets on the page (others follow by name): across GPUs, shared GPU, one rank.
SET_ORDER = ("h200x2_w2_pergpu", "h200x4_w4_pergpu", "h200_w4_shared", "h200_w1", "h100_w4_shared",
             "h100_w1")


def size_label(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def us(t) -> str:
    if t is None:
        return "-"
    return f"{t:.2f}" if t < 100 else f"{t:.1f}" if t < 1000 else f"{t:.0f}"


def column(row: dict) -> str:
    """The table column of a row: its op (and, for the v ops, its count distribution; for FP8
    rows, their form)."""
    op = row["op"]
    name = f"{OP_NAMES[op]} ({row['variant']})" if op in V_OPS else OP_NAMES.get(op, op)
    return name + (f" FP8 {row['fp8']}" if row.get("fp8") else "")


def load_sets(latest: pathlib.Path = LATEST) -> dict:
    """name -> the parsed JSON of every result set in ``latest``, by name."""
    paths = sorted(latest.glob("*.json"),
                   key=lambda p: (SET_ORDER.index(p.stem) if p.stem in SET_ORDER else 99, p.stem))
    return {p.stem: json.loads(p.read_text()) for p in paths}


def machine(meta: dict) -> str:
    gpus = meta.get("gpus") or 1
    return f"{gpus}x {meta['device']}"


def layout(meta: dict) -> str:
    if str(meta.get("layout", "")).startswith("shared"):
        return f"{meta['world_size']} ranks on one GPU" + (" (MPS)" if meta.get("mps") else "")
    return "one rank per GPU"


def title(name: str, meta: dict) -> str:
    return f"{name}: {machine(meta)}, W = {meta['world_size']}, {layout(meta)}"


def setting(data: dict, mode: str, placement: str) -> str:
    return f"{MODES[mode]}, {PLACEMENTS[placement]}, {data['rows'][0]['dtype']}"


def caption(meta: dict, what: str) -> str:
    return (f"**{machine(meta)}, W = {meta['world_size']}, {layout(meta)}, {what}** "
            f"(commit {meta['commit'][:7]}, {meta['date'][:10]})")


def rows_of(data: dict, mode: str, placement: str) -> dict:
    """(column, size) -> row, for one mode and placement (the first row of each pair)."""
    out: dict = {}
    for r in data["rows"]:
        if r["mode"] == mode and r["placement"] == placement and r.get("path") != "fallback":
            out.setdefault((column(r), r["size_bytes"]), r)
    return out


def columns(data: dict) -> list:
    seen = {column(r): (OP_ORDER.index(r["op"]) if r["op"] in OP_ORDER else 99, column(r))
            for r in data["rows"]}
    return [c for c, _ in sorted(seen.items(), key=lambda kv: kv[1])]


def table(header: list, body: list) -> list:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in body]


def baseline_name(data: dict) -> str:
    names = sorted({r["baseline"] for r in data["rows"] if r.get("baseline")})
    return "torch.distributed (" + ", ".join(n.upper() if n == "nccl" else n for n in names) + ")"


def symm_ops(data: dict, cells: dict) -> str:
    ops: dict = {}
    for (col, _), r in sorted(cells.items()):
        if r.get("symm_mem_us") is not None:
            ops.setdefault(col, set()).add(r["symm_mem_op"])
    listed = "; ".join(f"{c}: {', '.join(sorted(o))}" for c, o in ops.items())
    return f"torch symm_mem ops timed: {listed}." if listed else "No torch symm_mem op timed."


def time_table(data: dict, mode: str, placement: str) -> list:
    cells = rows_of(data, mode, placement)
    if not cells:
        return []
    cols = [c for c in columns(data) if any(k[0] == c for k in cells)]
    sizes = sorted({s for _, s in cells})
    body = []
    for s in sizes:
        line = [size_label(s)]
        for c in cols:
            r = cells.get((c, s))
            quant = f" / {us(r.get('ours_quant_us'))}" if r and r.get("fp8") else ""
            line.append("" if r is None else
                        f"{us(r['time_us'])} / {us(r.get('baseline_us'))} / "
                        f"{us(r.get('symm_mem_us'))}{quant}")
        body.append(line)
    fp8 = any(r.get("fp8") for r in cells.values())
    return ([caption(data["meta"], setting(data, mode, placement)), "",
             f"us per call: ours / {baseline_name(data)} / torch symm_mem"
             + (" (FP8 columns: / ours in the input dtype, then torch's quantisation)" * fp8)
             + ". " + symm_ops(data, cells), ""]
            + table(["size"] + cols, body) + [""])


def ceiling_text(rows: list) -> str:
    gbs = sorted({r["ceiling_gbs"] for r in rows
                  if r.get("ceiling_gbs") and r.get("ceiling") == "p2p"})
    if {r.get("ceiling") for r in rows} == {"p2p"}:
        return ("% = busbw / the copy-engine copy to the peer GPU measured in the same run ("
                + " and ".join(f"{g:.1f}" for g in gbs) + " GB/s).")
    return ("% = the bench's `efficiency` against a local device copy (bytes the kernel moves "
            "through this GPU's memory; benchmarks/README.md, column `efficiency`).")


def bandwidth_table(data: dict, mode: str = "graph") -> list:
    cells = {(placement, *k): r for placement in PLACEMENTS
             for k, r in rows_of(data, mode, placement).items()
             if k[1] >= BW_MIN_BYTES and r.get("busbw_gbs")}
    if not cells:
        return []
    cols = [c for c in columns(data) if any(k[1] == c for k in cells)]
    body = []
    for placement in PLACEMENTS:
        for s in sorted({k[2] for k in cells if k[0] == placement}):
            line = [size_label(s), PLACEMENTS[placement]]
            for c in cols:
                r = cells.get((placement, c, s))
                eff = r.get("efficiency") if r else None
                line.append("" if r is None else f"{r['busbw_gbs']:.1f}"
                            + ("" if eff is None else f" ({eff * 100:.0f}%)"))
            body.append(line)
    return ([caption(data["meta"], f"{MODES[mode]}, bus bandwidth GB/s"), "",
             ceiling_text(list(cells.values())), ""]
            + table(["size", "placement"] + cols, body) + [""])


def gpu_tier(name: str, latest: pathlib.Path) -> list:
    """The GPU tests that ran with the set (``<name>_pytest.log``): its summary lines, after
    the ``# `` lines that say what each part of the log ran."""
    log = latest / f"{name}_pytest.log"
    if not log.exists():
        return []
    said = [ln.strip().lstrip("# ") for ln in log.read_text().splitlines()
            if ln.startswith("# ") or (" passed" in ln and ln.strip()[:1].isdigit())]
    return [f"GPU tests run with this set (`latest/{log.name}`): " + "; ".join(said) + ".", ""]


def headline(sets: dict) -> list:
    name, mode, placement, sizes = HEADLINE
    data = sets[name]
    cells = rows_of(data, mode, placement)
    body = []
    for c in columns(data):
        line = [c]
        for s in sizes:
            r = cells.get((c, s))
            line.append("" if r is None else f"{us(r['time_us'])} ({us(r.get('baseline_us'))}, "
                        f"{us(r.get('symm_mem_us'))})")
        body.append(line)
    return ["## Headline", "", caption(data["meta"], setting(data, mode, placement)), "",
            "us per call: ours (NCCL, torch symm_mem); `-`: not timed (torch's all-gather is not "
            "capturable in a graph). Other sets, modes and placements: "
            "benchmarks/results/README.md.", ""
            ] + table(["op"] + [size_label(s) for s in sizes], body) + [""]


def render(latest: pathlib.Path = LATEST) -> str:
    sets = load_sets(latest)
    out = ["# Benchmark results", "",
           "Generated by `python benchmarks/results_page.py` from `latest/*.json` (do not edit;",
           "tests/test_results_page.py checks the page is current). Each set in `latest/` is the",
           "newest full run of one machine and layout; its JSON `meta` names the commit and date.",
           "Times are the median over the timed calls of each rank, then the maximum over ranks,",
           "measured by `symmtriton-bench` (benchmarks/README.md), with the baselines in the same",
           "run. For the fused ops, torch.distributed is the unfused sequence and torch symm_mem",
           "an all-reduce alone (communication only). Runs that back specific claims of the code",
           "and README: `archive/README.md`.", "", "Sets:", ""]
    out += [f"- [{title(n, d['meta'])}](#{n})" for n, d in sets.items()] + [""]
    out += headline(sets)
    for name, data in sets.items():
        meta = data["meta"]
        out += [f'<a id="{name}"></a>', "", f"## {title(name, meta)}", "",
                f"torch {meta.get('torch')}, triton {meta.get('triton')}, CUDA {meta.get('cuda')}"
                + (f", NCCL {meta['nccl']}" if meta.get("nccl") else "")
                + f"; files `latest/{name}.json`, `latest/{name}.csv`.", ""]
        out += [f"Run note: {n}" for n in data.get("notes", [])] + [""] * bool(data.get("notes"))
        out += gpu_tier(name, latest)
        for mode in MODES:
            for placement in PLACEMENTS:
                out += time_table(data, mode, placement)
        out += bandwidth_table(data)
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=pathlib.Path, default=PAGE)
    p.add_argument("--latest", type=pathlib.Path, default=LATEST)
    args = p.parse_args(argv)
    args.out.write_text(render(args.latest))


if __name__ == "__main__":
    main()
