"""PNG plots of a results doc (matplotlib: ``pip install 'tileattn[plot]'``).

One figure per (mode, dtype, device, head dim):

- dense: throughput vs sequence length (Sk), one line per provider (dashed: causal);
  TFLOP/s on CUDA, GFLOP/s on CPU (FLOPs as ``registry.flops``).
- decode: two panels vs KV length, GB/s of K+V+q+out and microseconds per call (eager, do_bench
  on CUDA), one line per provider, batch and cache layout.

Memory rows and skipped rows are not plotted. Every PNG carries the data of the lines it draws,
read back from the drawn lines, as JSON in its ``tileattn-series`` text chunk
(``{panel y label: {line label: [[x, y], ...]}}``; :func:`read_series`), so a test or a reader
can check a plot against the results file without reading pixels.
"""

import json
import os
from collections import defaultdict

SERIES_KEY = "tileattn-series"


def _dense_panels(rows, cpu):
    unit, scale = ("GFLOP/s", 1e3) if cpu else ("TFLOP/s", 1.0)
    lines = defaultdict(list)
    for r in rows:
        lines[r["provider"] + (" causal" if r["causal"] else "")].append((r["Sk"], r["tflops"] * scale))
    return [(f"{unit}", lines)]


def _decode_panels(rows):
    gbps, us = defaultdict(list), defaultdict(list)
    for r in rows:
        label = f"{r['provider']} B={r['B']} " + (f"paged{r['page']}" if r["page"] else "contiguous")
        gbps[label].append((r["Sk"], r["gbps"]))
        us[label].append((r["Sk"], r["us"]))
    return [("GB/s (K+V+q+out)", gbps), ("us per call", us)]


def figures(rows) -> dict:
    """{file tag: (title, x label, [(y label, {line label: [(x, y), ...]})])} for the ok dense
    and decode rows, points sorted by x."""
    groups = defaultdict(list)
    for r in rows:
        if r["status"] == "ok" and r["kind"] in ("dense", "decode"):
            groups[(r["mode"], r["dtype"], r["device"], r["D"])].append(r)
    out = {}
    for (mode, dtype, device, d), g in groups.items():
        decode = mode == "decode"
        panels = _decode_panels(g) if decode else _dense_panels(g, device == "cpu")
        panels = [(y, {label: sorted(pts) for label, pts in lines.items()}) for y, lines in panels]
        title = f"{mode} {dtype} {device}, D={d}" + (f", Hq={g[0]['Hq']} Hkv={g[0]['Hkv']}" if decode else "")
        out[f"{mode.replace('+', '')}-{dtype}-{device}-D{d}"] = (
            title, "KV length" if decode else "sequence length (keys)", panels)
    return out


def save(doc, out_dir, stem) -> list:
    """Write ``<out_dir>/<stem>-<tag>.png`` for each of :func:`figures`; the paths.
    ImportError (with the install hint) when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("tileattn: plots need matplotlib: pip install 'tileattn[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for tag, (title, xlabel, panels) in figures(doc["rows"]).items():
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
        drawn = {}
        for ax, (ylabel, lines) in zip(axes[0], panels):
            colors = {}  # a provider's causal line (dashed) shares its color
            for label, pts in lines.items():
                xs, ys = zip(*pts)
                color = colors.setdefault(label.removesuffix(" causal"), f"C{len(colors) % 10}")
                ax.plot(xs, ys, "--o" if label.endswith(" causal") else "-o", color=color, label=label, markersize=4)
            ax.set(xlabel=xlabel, ylabel=ylabel)
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            drawn[ylabel] = {ln.get_label(): [[float(x), float(y)] for x, y in zip(ln.get_xdata(), ln.get_ydata())]
                             for ln in ax.get_lines()}
        fig.suptitle(f"tileattn bench: {title}")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{stem}-{tag}.png")
        fig.savefig(path, dpi=80, metadata={SERIES_KEY: json.dumps(drawn)})
        plt.close(fig)
        paths.append(path)
    return paths


def read_series(path) -> dict:
    """The line data a PNG written by :func:`save` carries."""
    from PIL import Image
    with Image.open(path) as im:
        return json.loads(im.text[SERIES_KEY])
