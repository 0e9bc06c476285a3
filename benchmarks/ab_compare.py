"""Compare two sets of bench CSVs row by row (benchmarks/ab_trees.sh writes them):

    python benchmarks/ab_compare.py --old OLD.csv [OLD2.csv ...] --new NEW.csv [NEW2.csv ...]

Rows are matched on (op, dtype, size_bytes, placement, mode); each side's time is the median of
its rounds. Prints one line per row (old us, new us, new / old) and the median ratio, and exits 1
when a row is in one set only."""

import argparse
import csv
import statistics
import sys

KEY = ("op", "dtype", "size_bytes", "placement", "mode")


def _times(paths):
    rows = {}
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if row.get("time_us"):
                    rows.setdefault(tuple(row[k] for k in KEY), []).append(float(row["time_us"]))
    return {k: statistics.median(v) for k, v in rows.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", nargs="+", required=True, help="bench CSVs of the old tree")
    p.add_argument("--new", nargs="+", required=True, help="bench CSVs of the new tree")
    args = p.parse_args(argv)
    old, new = _times(args.old), _times(args.new)
    ratios = []
    print(f"{'op':<24}{'dtype':<10}{'bytes':>11} {'placement':<10}{'mode':<7}"
          f"{'old_us':>10}{'new_us':>10}{'new/old':>9}")
    for key in sorted(old.keys() & new.keys(), key=lambda k: (k[0], k[1], int(k[2]), k[3:])):
        ratio = new[key] / old[key]
        ratios.append(ratio)
        op, dtype, size, placement, mode = key
        print(f"{op:<24}{dtype:<10}{size:>11} {placement:<10}{mode:<7}"
              f"{old[key]:>10.2f}{new[key]:>10.2f}{ratio:>9.3f}")
    if ratios:
        print(f"median new/old over {len(ratios)} rows: {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
    alone = sorted(old.keys() ^ new.keys())
    for key in alone:
        print(f"only in {'old' if key in old else 'new'}: {key}")
    return 1 if alone else 0


if __name__ == "__main__":
    sys.exit(main())
