"""`tileattn demo|info`: check against the oracle and time against torch's SDPA."""

import argparse
import sys
import time

import torch

from . import api, reference

_DEMO_SHAPES = [  # (B, Sq, Sk, Hq, Hkv, D, causal)
    (2, 257, 257, 8, 8, 64, True),
    (1, 100, 700, 8, 2, 128, True),
    (4, 128, 128, 6, 3, 80, False),
]


def _time(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs (synchronizing on CUDA)."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _check(shape, device, dtype) -> float:
    """Max |out - float64 oracle| for one random case."""
    b, sq, sk, hq, hkv, d, causal = shape
    q = torch.randn(b, sq, hq, d, device=device, dtype=dtype)
    k = torch.randn(b, sk, hkv, d, device=device, dtype=dtype)
    v = torch.randn(b, sk, hkv, d, device=device, dtype=dtype)
    out = api.attention(q, k, v, causal=causal)
    ref, _ = reference.attention(q.cpu(), k.cpu(), v.cpu(), causal=causal)
    return (out.cpu().double() - ref).abs().max().item()


def _bench(device, dtype, n: int, d: int, heads: int):
    """(tileattn seconds, SDPA seconds) for a causal forward of batch 1, length n."""
    q, k, v = (torch.randn(1, n, heads, d, device=device, dtype=dtype) for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    reps = 20 if device == "cuda" else 3
    ours = _time(lambda: api.attention(q, k, v, causal=True), reps)
    theirs = _time(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True), reps)
    return ours, theirs


def demo() -> int:
    from rich.console import Console
    from rich.progress import track
    from rich.table import Table

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-4
    console = Console()
    console.print(f"tileattn demo on {device} ({dtype}), torch {torch.__version__}")
    failed = False
    checks = Table(title="exactness vs the float64 oracle")
    for col in ("B", "Sq", "Sk", "Hq/Hkv", "D", "causal", "max |err|", "ok"):
        checks.add_column(col)
    for shape in track(_DEMO_SHAPES, description="checking", console=console):
        err = _check(shape, device, dtype)
        ok = err <= tol
        failed |= not ok
        b, sq, sk, hq, hkv, d, causal = shape
        checks.add_row(str(b), str(sq), str(sk), f"{hq}/{hkv}", str(d), str(causal), f"{err:.2e}", "yes" if ok else "NO")
    console.print(checks)
    speed = Table(title="causal forward, batch 1 (median time)")
    for col in ("N", "D", "heads", "tileattn ms", "torch SDPA ms", "SDPA time / ours"):
        speed.add_column(col)
    sizes = [(1024, 64, 8), (2048, 64, 8)] if device == "cpu" else [(4096, 128, 16), (16384, 128, 16)]
    for n, d, h in track(sizes, description="timing", console=console):
        ours, theirs = _bench(device, dtype, n, d, h)
        speed.add_row(str(n), str(d), str(h), f"{ours * 1e3:.2f}", f"{theirs * 1e3:.2f}", f"{theirs / ours:.2f}x")
    console.print(speed)
    console.print("all checks passed" if not failed else "[red]a check FAILED[/red]")
    return 1 if failed else 0


def info() -> int:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:  # CPU-only install: the CPU backend still runs
        triton_version = "not installed"
    print(f"tileattn {__import__('tileattn').__version__}, torch {torch.__version__}, triton {triton_version}")
    print(f"cuda: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tileattn")
    parser.add_argument("command", choices=["demo", "info"])
    args = parser.parse_args(argv)
    return {"demo": demo, "info": info}[args.command]()


if __name__ == "__main__":
    sys.exit(main())
