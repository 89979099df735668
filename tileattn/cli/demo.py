"""Check tileattn against the float64 oracle on three shapes, then time a causal forward
against torch's SDPA on the same tensors.

Timing: one warm-up call each (compile, autotune), then the median of repeats filling about
``--seconds`` (at least 10; ``do_bench`` with L2 flushed on CUDA). The last column is SDPA's
time over tileattn's: above 1.00x tileattn is faster, below it SDPA is.
"""

import os

import torch

from .. import api, reference, tolerance

HELP = "check against the oracle, time against torch SDPA"
_SHAPES = [  # (B, Sq, Sk, Hq, Hkv, D, causal)
    (2, 257, 257, 8, 8, 64, True),
    (1, 100, 700, 8, 2, 128, True),
    (4, 128, 128, 6, 3, 80, False),
]


def add_arguments(p):
    p.add_argument("--seconds", type=float, default=1.0, help="CPU: time each measurement fills (default 1)")


def _check(shape, device, dtype) -> tolerance.Verdict:
    """The tolerance rule's verdict on one random forward."""
    b, sq, sk, hq, hkv, d, causal = shape
    q = torch.randn(b, sq, hq, d, device=device, dtype=dtype)
    k = torch.randn(b, sk, hkv, d, device=device, dtype=dtype)
    v = torch.randn(b, sk, hkv, d, device=device, dtype=dtype)
    out = api.attention(q, k, v, causal=causal)
    hi, _ = reference.attention(q.cpu(), k.cpu(), v.cpu(), causal=causal)
    lo, _ = reference.attention(q.cpu(), k.cpu(), v.cpu(), causal=causal, upcast=False)
    return tolerance.check(out, hi, lo)


def _ms(fn, device, seconds) -> float:
    from ..bench import timing
    fn()  # warm-up: compile, autotune
    if device == "cuda":
        return timing.gpu_ms(fn)
    return timing.cpu_ms(fn, seconds, min_reps=10)


def _bench(device, dtype, n, d, heads, seconds):
    """(tileattn ms, SDPA ms) for a causal forward of batch 1, length n."""
    q, k, v = (torch.randn(1, n, heads, d, device=device, dtype=dtype) for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return (_ms(lambda: api.attention(q, k, v, causal=True), device, seconds),
            _ms(lambda: sdpa(qt, kt, vt, is_causal=True), device, seconds))


def run(args) -> int:
    from rich.console import Console
    from rich.progress import track
    from rich.table import Table

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    console = Console()
    console.print(f"tileattn demo on {device} ({dtype}), torch {torch.__version__}")
    failed = False
    checks = Table(title="exactness vs the float64 oracle (docs/design/RELIABILITY.md's rule)")
    for col in ("B", "Sq", "Sk", "Hq/Hkv", "D", "causal", "max |err|", "bound", "ok"):
        checks.add_column(col)
    for shape in track(_SHAPES, description="checking", console=console):
        verdict = _check(shape, device, dtype)
        failed |= not verdict.ok
        b, sq, sk, hq, hkv, d, causal = shape
        checks.add_row(str(b), str(sq), str(sk), f"{hq}/{hkv}", str(d), str(causal), f"{verdict.err:.2e}",
                       f"{verdict.bound:.2e}", "yes" if verdict.ok else "NO")
    console.print(checks)
    speed = Table(title="causal forward, batch 1, median time after warm-up")
    for col in ("N", "D", "heads", "tileattn ms", "torch SDPA ms", "SDPA time / ours (>1: ours faster)"):
        speed.add_column(col)
    sizes = [(1024, 64, 8), (2048, 64, 8)] if device == "cpu" else [(4096, 128, 16), (16384, 128, 16)]
    for n, d, h in track(sizes, description="timing", console=console):
        ours, theirs = _bench(device, dtype, n, d, h, args.seconds)
        speed.add_row(str(n), str(d), str(h), f"{ours:.2f}", f"{theirs:.2f}", f"{theirs / ours:.2f}x")
    console.print(speed)
    load = os.getloadavg()[0] if device == "cpu" and hasattr(os, "getloadavg") else 0.0
    if load >= 1.0:  # torch's CPU threads wait on busy cores: many small ops (ours) suffer most
        console.print(f"[yellow]note: load average {load:.1f} on {os.cpu_count()} cores while timing: CPU times "
                      "need an idle machine (docs/performance.md); rerun when it is idle[/yellow]")
    console.print("all checks passed" if not failed else "[red]a check FAILED[/red]")
    return 1 if failed else 0
