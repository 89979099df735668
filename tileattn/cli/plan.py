"""For a shape, dtype and features: the kernel variant and blocks chosen and why, shared
memory per program, HBM bytes vs the materialized (naive) path and the memory saved, FLOPs,
passes, and the predicted time at the device's ceilings (``--measure``: measured here too).

    tileattn plan --batch 2 --seqlen 4096 --heads 16 --head-dim 128 --causal --backward --preset h200
    tileattn plan --seqlen 100 --seqlen-k 300 --heads 8 --kv-heads 2 --head-dim 64 --dtype float32 --preset cpu
    tileattn plan --decode --batch 16 --seqlen 1 --seqlen-k 32768 --heads 32 --kv-heads 8 --head-dim 128 --preset h200

The same numbers from Python: ``tileattn.plan.estimate(...)`` -> ``PlanReport`` (its module,
``tileattn/roofline.py``, writes out every formula); ``--decode`` plans a KV-cache step (split
count, key tile, combine pass) instead. Presets: h200, h100, a100, cpu; default:
this machine's device.
"""

import torch

HELP = "kernel plan, SRAM, HBM bytes, FLOPs, passes, predicted time"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_arguments(p):
    from ..roofline import PRESETS
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seqlen", type=int, required=True, help="query length Sq (and Sk unless --seqlen-k)")
    p.add_argument("--seqlen-k", type=int, help="key length Sk (default: --seqlen)")
    p.add_argument("--heads", type=int, required=True, help="query heads Hq")
    p.add_argument("--kv-heads", type=int, help="key/value heads Hkv (default: --heads)")
    p.add_argument("--head-dim", type=int, required=True, help="D")
    p.add_argument("--head-dim-v", type=int, help="Dv (default: D)")
    p.add_argument("--dtype", choices=list(_DTYPES), default="bfloat16")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--window", type=int, nargs=2, metavar=("LEFT", "RIGHT"), default=(-1, -1))
    p.add_argument("--softcap", type=float, default=0.0)
    p.add_argument("--alibi", action="store_true")
    p.add_argument("--sinks", action="store_true")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--backward", action="store_true", help="also the backward's plan and numbers")
    p.add_argument("--decode", action="store_true",
                   help="plan attention_with_kvcache: --seqlen new tokens over --seqlen-k cached keys")
    p.add_argument("--preset", choices=list(PRESETS), help="device to plan for (default: this machine's)")
    p.add_argument("--measure", action="store_true", help="time the call on this machine too")
    p.add_argument("--verbose", action="store_true", help="print the planner's full text")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024


def _time(s) -> str:
    return "-" if s is None else f"{s * 1e6:,.1f} us" if s < 1e-2 else f"{s * 1e3:,.2f} ms"


def lines(r) -> list:
    """The report as (label, value) rows (exact byte and FLOP counts first, readable sizes after)."""
    rows = [("device", f"{r.device} [preset {r.preset}]"), ("shape", "B={} Sq={} Sk={} Hq={} Hkv={} D={} Dv={}".format(
        *r.shape)), ("dtype, features", f"{r.dtype}, {r.features}"), ("kernel", r.variant), ("blocks", r.blocks),
            ("why", r.why),
            ("SRAM per program, forward", f"{r.sram_bytes} bytes ({_size(r.sram_bytes)})")]
    if r.bwd_sram_bytes:
        rows.append(("SRAM per program, backward", " / ".join(f"{b} bytes" for b in r.bwd_sram_bytes)
                     + (" (dQ / dK,dV)" if len(r.bwd_sram_bytes) == 2 else "")))
    rows += [("HBM bytes, forward", f"{r.hbm_bytes} bytes ({_size(r.hbm_bytes)})"),
             ("HBM bytes, naive forward", f"{r.naive_hbm_bytes} bytes ({_size(r.naive_hbm_bytes)}, "
                                          f"{r.naive_hbm_bytes / r.hbm_bytes:.1f}x)"),
             ("memory beyond inputs/out", f"{r.extra_bytes} bytes (naive {r.naive_extra_bytes} bytes = "
                                          f"{_size(r.naive_extra_bytes)}; saved {_size(r.memory_saved_bytes)})"),
             ("FLOPs, forward", f"{r.flops}"),
             ("passes (forward; backward)", f"{r.passes}; {r.bwd_passes if r.bwd_passes else '-'}"),
             ("predicted forward", f"{_time(r.predicted_s)} ({r.bound}-bound)")]
    if r.bwd_flops is not None:
        rows += [("FLOPs, backward", f"{r.bwd_flops}"),
                 ("HBM bytes, backward", f"{r.bwd_hbm_bytes} bytes ({_size(r.bwd_hbm_bytes)})"),
                 ("predicted backward", _time(r.bwd_predicted_s))]
    if r.measured_s:
        rows.append(("measured forward", f"{_time(r.measured_s)} ({r.roofline:.0%} of the roofline)"))
    if r.bwd_measured_s:
        rows.append(("measured backward", f"{_time(r.bwd_measured_s)} ({r.bwd_roofline:.0%} of the roofline)"))
    return rows


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..roofline import estimate
    r = estimate(args.batch, args.seqlen, args.seqlen_k or args.seqlen, args.heads, args.kv_heads or args.heads,
                 args.head_dim, args.head_dim_v, dtype=_DTYPES[args.dtype], causal=args.causal,
                 window=tuple(args.window), softcap=args.softcap, alibi=args.alibi, sinks=args.sinks,
                 dropout_p=args.dropout, backward=args.backward, decode=args.decode, preset=args.preset,
                 measure=args.measure)
    table = Table(title="tileattn plan", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for label, value in lines(r):
        table.add_row(label, value)
    console = Console(width=140)
    console.print(table)
    if args.verbose:
        console.print(r.describe, markup=False, highlight=False)
    return 0
