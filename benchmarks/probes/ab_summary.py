"""One line per benchmark case across the trees and rounds of ``benchmarks/probes/ab_trees.sh``.

    python3 benchmarks/probes/ab_summary.py $OUT          # reads $OUT/<tree>/<round>/*.json

Prints each case's value per tree, rounds joined by "/": TFLOP/s for prefill rows, CUDA-graph
microseconds for decode rows (lower is better), and each tree's best round over main's best
(above 1 is faster for TFLOP/s, below 1 is faster for microseconds).
"""

import json
import sys
from collections import defaultdict
from pathlib import Path


def _value(row):
    """(value, higher is better) of a results row, or None when it was not measured."""
    if row.get("status") != "ok":
        return None
    if row["mode"] == "decode":
        return row.get("us_graph") or row["us"], False
    return row["tflops"], True


def main(root):
    table = defaultdict(lambda: defaultdict(list))  # case -> tree -> values over rounds
    better = {}
    for path in sorted(Path(root).glob("*/*/*.json")):
        tree = path.parent.parent.name
        for row in json.loads(path.read_text())["rows"]:
            got = _value(row)
            if got is None:
                continue
            shape = (f"{row['kind']} B={row['B']} Sq={row['Sq']} Sk={row['Sk']} D={row['D']}"
                     f"{' causal' if row['causal'] and row['kind'] != 'decode' else ''}"
                     f"{' page' + str(row['page']) if row.get('page') else ''}")
            case = f"{shape} {row['provider']} {row['mode']}"
            table[case][tree].append(got[0])
            better[case] = got[1]
    trees = sorted({t for per in table.values() for t in per}, key=lambda t: (t != "main", t))
    for case, per in table.items():
        best = {t: (max if better[case] else min)(v) for t, v in per.items()}
        cells = []
        for t in trees:
            if t not in per:
                continue
            ratio = ""
            if t != "main" and "main" in best:
                ratio = f" ({best[t] / best['main']:.3f}x)"
            cells.append(f"{t} {'/'.join(f'{x:.1f}' for x in per[t])}{ratio}")
        print(f"{case}: " + "; ".join(cells))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpu_out")
