"""Run benchmark sets of the registry (or one custom shape) against the providers available
here, with a progress bar; write the results JSON and PNG plots, or compare two results files.

    tileattn bench --set cpu --out cpu.json                 # + cpu-fwd-float32-cpu-D64.png, ...
    tileattn bench --set prefill --out prefill.json         # H200: bf16 fwd / bwd / fwd+bwd
    tileattn bench --seqlens 512,1024 --heads 8 --head-dim 64 --causal --out mine.json
    tileattn bench --seqlens 4096,32768 --decode --batch 16 --heads 32 --kv-heads 8 \\
        --head-dim 128 --dtype bfloat16 --device cuda --out decode.json
    tileattn bench --compare old.json new.json              # ratios, > 1: new is better

Plots go next to the JSON (``--plots DIR`` elsewhere, ``--no-plots`` none); each PNG carries
its line data (``tileattn.bench.plot.read_series``). Method and sets: benchmarks/README.md.
"""

import json
import os
import time

HELP = "benchmark sets or a custom shape: JSON, PNG plots, --compare"


def _ints(text):
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(p):
    from ..bench import run
    run.add_arguments(p, sets_required=False)
    g = p.add_argument_group("custom shape (instead of, or besides, --set)")
    g.add_argument("--seqlens", type=_ints, help="comma list: sequence lengths N (dense) or KV lengths (--decode)")
    g.add_argument("--decode", action="store_true", help="KV-cache decode steps (one new token)")
    g.add_argument("--batch", type=int, default=1)
    g.add_argument("--heads", type=int, default=8, help="query heads")
    g.add_argument("--kv-heads", type=int, help="default: --heads")
    g.add_argument("--head-dim", type=int, default=64)
    g.add_argument("--causal", action="store_true")
    g.add_argument("--page", type=int, default=0, help="decode: paged cache of this block size (0: contiguous)")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: float32 on CPU, else bfloat16")
    p.add_argument("--plots", help="directory for the PNG plots (default: the JSON's)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="print ratios of two results files and exit")


def _custom(args):
    import torch

    from ..bench import registry
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float32" if device == "cpu" else "bfloat16")
    return registry.custom(args.seqlens, decode=args.decode, B=args.batch, Hq=args.heads, Hkv=args.kv_heads,
                           D=args.head_dim, causal=args.causal, dtype=dtype, device=device, page=args.page)


def _compare(args, console) -> int:
    from rich.table import Table

    from ..bench import compare
    docs = []
    for path in args.compare:
        with open(path) as f:
            docs.append(json.load(f))
    found, left = compare.ratios(*docs)
    table = Table(title=f"{args.compare[1]} vs {args.compare[0]} (ratio > 1: new is better)")
    for col in ("case", "metric", "old", "new", "ratio"):
        table.add_column(col)
    for r in found:
        table.add_row(r.label, r.metric, f"{r.old:.4g}", f"{r.new:.4g}", f"{r.ratio:.3f}x")
    console.print(table)
    console.print(f"{len(found)} rows compared, {left} not comparable (skipped or in one file only)")
    return 0


def _plots(args, doc, console):
    from ..bench import plot
    out_dir = args.plots or os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(args.out))[0]
    try:
        paths = plot.save(doc, out_dir, stem)
    except ImportError as err:
        console.print(f"{err}; the JSON is written")
        return
    for path in paths:
        console.print(f"wrote {path}")


def run(args) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from ..bench import report, run as runner
    console = Console(stderr=True)
    if args.compare:
        return _compare(args, Console())
    if not args.sets and not args.seqlens:
        args.parser.error("give --set NAME, --seqlens N[,N...] or --compare OLD NEW")
    args.custom = _custom(args) if args.seqlens else None
    todo = runner.plan(args)
    if args.list:
        for name, case, provs, modes in todo:
            print(f"{name}: {case.label()} | {','.join(provs)} | {','.join(modes)}")
        return 0
    total = sum(len(provs) * len(modes) for _, _, provs, modes in todo)
    t0 = time.monotonic()
    with Progress(console=console) as progress:
        task = progress.add_task("benchmarking", total=total)

        def on_row(row, case):
            progress.update(task, advance=1, description=f"{case.label()[:48]} {row['provider']} {row['mode']}")
            progress.console.print(f"{case.label()} | {row['provider']} {row['mode']}: {report.summary(row)}")

        doc = runner.execute(args, todo, on_row)
    ok = sum(r["status"] == "ok" for r in doc["rows"])
    console.print(f"{ok}/{len(doc['rows'])} measurements ok in {time.monotonic() - t0:.0f} s")
    if not args.out:
        print(report.render([doc]))
        return 0
    console.print(f"wrote {args.out}")
    if not args.no_plots:
        _plots(args, doc, console)
    return 0
