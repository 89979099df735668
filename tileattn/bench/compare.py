"""Ratios between two results files (``tileattn bench --compare old.json new.json``).

Rows are matched on the case and how it was run (set, kind, provider, mode, shape, dtype,
device, page). Each ratio reads "> 1: new is better": dense ``tflops`` new / old, decode ``us``
old / new, memory ``peak_mib`` old / new. Rows skipped in either file, or present in one only,
are counted, not compared.
"""

from typing import NamedTuple

KEY = ("set", "kind", "provider", "mode", "B", "Sq", "Sk", "Hq", "Hkv", "D", "Dv", "causal", "dtype", "device", "page")
METRIC = {"dense": ("tflops", True), "decode": ("us", False), "memory": ("peak_mib", False)}  # (field, higher is better)


class Ratio(NamedTuple):
    label: str  # provider, mode and shape
    metric: str
    old: float
    new: float
    ratio: float  # > 1: new is better


def _label(r) -> str:
    s = f"N={r['Sq']}" if r["Sq"] == r["Sk"] else f"Sq={r['Sq']} Sk={r['Sk']}"
    page = f" paged{r['page']}" if r.get("page") else ""
    return (f"{r['provider']} {r['mode']} B={r['B']} {s} H={r['Hq']}/{r['Hkv']} D={r['D']}"
            f"{' causal' if r['causal'] and r['kind'] == 'dense' else ''}{page} {r['dtype']}")


def ratios(old: dict, new: dict):
    """([Ratio] for the rows ok in both docs, in ``new``'s order; number of rows not compared)."""
    before = {tuple(r.get(k) for k in KEY): r for r in old["rows"] if r["status"] == "ok"}
    keys = [tuple(r.get(k) for k in KEY) for r in new["rows"]]
    out, left = [], sum(key not in keys for key in before)  # old rows the new file lacks
    for r, key in zip(new["rows"], keys):
        o = before.get(key)
        field, higher = METRIC[r["kind"]]
        if r["status"] != "ok" or o is None or not o.get(field) or not r.get(field):
            left += 1
            continue
        a, b = o[field], r[field]
        out.append(Ratio(_label(r), field, a, b, b / a if higher else a / b))
    return out, left
