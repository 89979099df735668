"""Markdown report of results files: ``python -m tileattn.bench.report results.json [more.json ...]``.

One table per (set, device, dtype, mode). Dense cells are TFLOP/s (GFLOP/s on CPU); decode
cells are microseconds per call and GB/s (do_bench; ``graph`` = CUDA-graph replay); dense
tables on CUDA come twice, do_bench and CUDA-graph replay (no host launch gaps); memory
rows give the peak MiB beyond the inputs. ``ours/X`` columns are tileattn's throughput over
peer X's on the same inputs (> 1: tileattn is faster); paged decode rows are compared with
the contiguous rows of the same shape. Decode ratios use the CUDA-graph times when both rows
have one (small-batch eager decode is host-bound, so do_bench ratios there compare hosts). Before the tables: rows whose forward differs from the
fp32 reference by more than ``registry.ERR_LIMIT`` ("CHECK FAILED"), and skipped rows with
their reasons (cut to 200 characters; the JSON has them whole).
"""

import json
import sys
from collections import defaultdict

from .registry import ERR_LIMIT


def summary(row) -> str:
    """One line for a row (the runner's progress output)."""
    if row["status"] != "ok":
        return "skipped: " + row.get("reason", "")
    if "peak_mib" in row:
        return f"peak {row['peak_mib']:.1f} MiB beyond inputs ({row['inputs_mib']:.1f} MiB)"
    err = f", rel err {row['rel_err']:.1e}" if "rel_err" in row else ""
    if "gbps" in row:
        g = f", graph {row['us_graph']:.1f} us" if "us_graph" in row else ""
        return f"{row['us']:.1f} us, {row['gbps']:.0f} GB/s{g}{err}"
    unit, scale = ("GFLOP/s", 1e3) if row["device"] == "cpu" else ("TFLOP/s", 1.0)
    return f"{row['ms']:.3f} ms, {row['tflops'] * scale:.1f} {unit}{err}"


def _table(header, lines) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(map(str, line)) + " |" for line in lines])


def _ours(provs):
    return next((p for p in provs if p.startswith("tileattn")), None)


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _dense(rows, cpu) -> str:
    provs = list(dict.fromkeys(r["provider"] for r in rows))
    ours, scale = _ours(provs), 1e3 if cpu else 1.0
    peers = [p for p in provs if p != ours]
    cells = defaultdict(dict)
    for r in rows:
        key = (r["B"], r["Sq"], r["Sk"], r["Hq"], r["Hkv"], r["D"], r["Dv"], r["causal"])
        cells[key][r["provider"]] = r["tflops"] * scale if r["status"] == "ok" else None
    lines = []
    for (B, Sq, Sk, Hq, Hkv, D, Dv, causal), c in cells.items():
        shape = [B, Sq if Sq == Sk else f"{Sq}/{Sk}", Hq if Hq == Hkv else f"{Hq}/{Hkv}",
                 D if D == Dv else f"{D}/{Dv}", "y" if causal else "n"]
        vals = [f"{c[p]:.1f}" if c.get(p) else "-" for p in provs]
        lines.append(shape + vals + ([_ratio(c.get(ours), c.get(p)) for p in peers] if ours else []))
    head = ["B", "N", "H", "D", "causal"] + provs + ([f"ours/{p}" for p in peers] if ours else [])
    return _table(head, lines)


def _time_ratio(slow, fast) -> str:
    """Throughput of row ``fast`` over row ``slow``: CUDA-graph times if both have them, else do_bench."""
    if not (slow and fast):
        return "-"
    key = "us_graph" if "us_graph" in slow and "us_graph" in fast else "us"
    return _ratio(slow[key], fast[key])


def _decode(rows) -> str:
    provs = list(dict.fromkeys(r["provider"] for r in rows))
    ours = _ours(provs)
    peers = [p for p in provs if p != ours]
    us = {}
    for r in rows:
        us[(r["B"], r["Sk"], r["page"], r["provider"])] = r if r["status"] == "ok" else None
    lines = []
    for B, Sk, page in dict.fromkeys((r["B"], r["Sk"], r["page"]) for r in rows):
        line = [B, Sk, f"paged {page}" if page else "contiguous"]
        for p in provs:
            r = us.get((B, Sk, page, p))
            g = f" / {r['us_graph']:.1f}" if r and "us_graph" in r else ""
            line.append(f"{r['us']:.1f}{g} us, {r['gbps']:.0f} GB/s" if r else "-")
        if ours:
            mine = us.get((B, Sk, page, ours))
            for p in peers:  # peers run on the contiguous cache
                line.append(_time_ratio(us.get((B, Sk, page, p)) or us.get((B, Sk, 0, p)), mine))
            line.append(_time_ratio(us.get((B, Sk, 0, ours)), mine) if page else "")
        lines.append(line)
    head = ["B", "kv len", "cache"] + provs + ([f"ours/{p}" for p in peers] + ["paged/contig"] if ours else [])
    return _table(head, lines)


def _memory(rows) -> str:
    mib = lambda r, k: f"{r[k]:.1f}" if k in r else "-"  # noqa: E731
    lines = [[r["provider"], r["mode"], r["B"], r["Sq"], r["Hq"], r["D"], mib(r, "peak_mib"), mib(r, "inputs_mib"),
              mib(r, "scores_mib")] for r in rows]
    return _table(["provider", "mode", "B", "N", "H", "D", "peak MiB", "inputs MiB", "one fp32 score matrix MiB"],
                  lines)


def _machine(m) -> str:
    hw = m.get("gpu") or f"{m.get('cpu')} ({m.get('torch_threads')} threads)"
    sw = f"torch {m['torch']}, triton {m.get('triton')}" + (f", cuDNN {m['cudnn']}" if m.get("cudnn") else "")
    load = f", load {m['loadavg']:.1f}" if m.get("loadavg") is not None else ""
    return f"**{hw}** — {sw}, python {m['python']}, git {m.get('git')}, {m['date']}{load}"


def _checks(rows) -> list:
    out = []
    for r in rows:
        limit = ERR_LIMIT.get(r["dtype"], 1e-2)
        if r.get("rel_err") is not None and not r["rel_err"] <= limit:
            out.append(f"- CHECK FAILED: {r['provider']} {r['mode']} {_shape(r)}: "
                       f"rel err {r['rel_err']:.2e} > {limit:g}")
    return out


def _shape(r) -> str:
    page = f" page={r['page']}" if r.get("page") else ""
    return (f"{r['kind']} B={r['B']} Sq={r['Sq']} Sk={r['Sk']} H={r['Hq']}/{r['Hkv']} D={r['D']}{page} "
            f"causal={r['causal']}")


def _skips(rows) -> list:
    seen = defaultdict(list)
    for r in rows:
        if r["status"] != "ok":
            mode = "" if r["mode"] == r["kind"] else r["mode"] + " "
            seen[(r["provider"], r.get("reason", ""))].append(mode + _shape(r))
    return [f"- {p} skipped {len(v)}x (e.g. {v[0]}): {reason[:200]}" for (p, reason), v in seen.items()]


def render(docs) -> str:
    parts = []
    for doc in docs:
        rows = doc["rows"]
        parts.append(_machine(doc["machine"]))
        errs = [r["rel_err"] for r in rows if r.get("rel_err") is not None]
        checks = _checks(rows)
        if checks or errs:
            parts.append("\n".join(checks) if checks else
                         f"All {len(errs)} forward checks within limits (max rel err {max(errs):.1e}).")
        if _skips(rows):
            parts.append("Skipped:\n" + "\n".join(_skips(rows)))
        groups = defaultdict(list)
        for r in rows:
            groups[(r["set"], r["kind"], r["device"], r["dtype"], r["mode"] if r["kind"] == "dense" else "")].append(r)
        for (set_name, kind, device, dtype, mode), g in groups.items():
            unit = {"dense": "GFLOP/s" if device == "cpu" else "TFLOP/s", "memory": "peak memory",
                    "decode": ("us per call" if device == "cpu" else "us per call: do_bench / CUDA graph")
                    + "; GB/s of K+V+q+out"}[kind]
            title = f"### {set_name}: {kind} {mode} {dtype} on {device} ({unit})".replace("  ", " ")
            body = {"dense": lambda: _dense(g, device == "cpu"), "decode": lambda: _decode(g),
                    "memory": lambda: _memory(g)}[kind]()
            parts.append(title + "\n\n" + body)
            if kind == "dense" and any("tflops_graph" in r for r in g):  # also CUDA-graph replay
                graph = [dict(r, tflops=r["tflops_graph"]) if "tflops_graph" in r else dict(r, status="skipped")
                         for r in g]
                parts.append(title.replace(f" ({unit})", f", CUDA graph ({unit})") + "\n\n" + _dense(graph, False))
    return "\n\n".join(parts)


def main(argv=None):
    paths = (argv if argv is not None else sys.argv[1:])
    if not paths:
        raise SystemExit("usage: python -m tileattn.bench.report results.json [more.json ...]")
    docs = []
    for path in paths:
        with open(path) as f:
            docs.append(json.load(f))
    print(render(docs))


if __name__ == "__main__":
    main()
