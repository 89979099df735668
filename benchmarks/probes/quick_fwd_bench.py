"""Quick forward-only TFLOP/s of tileattn vs SDPA flash/cuDNN (bf16, CUDA) without autograd.

    python3 benchmarks/probes/quick_fwd_bench.py [D ...]     # default 64 128 256; CUDA only

16k tokens per batch (B = 16384 // N), N = 1k/4k/16k, H = 2048 // D, causal off/on; public API
only. A sanity check in a minute; the numbers that go in docs/performance.md come from
``python3 -m benchmarks.run --set prefill`` (same inputs for every peer, L2 flushed, JSON).
"""

import sys

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import tileattn


def main(dims=(64, 128, 256)):
    for d in dims:
        h = {64: 32, 128: 16, 256: 8}[d]
        for n in (1024, 4096, 16384):
            b = 16384 // n
            q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            for causal in (False, True):
                flops = 4 * b * h * n * n * d / (2 if causal else 1)
                row = [f"D={d} N={n} causal={int(causal)}"]
                ms = triton.testing.do_bench(lambda: tileattn.attention(q, k, v, causal=causal), return_mode="median")
                row.append(f"tileattn {flops / ms / 1e9:6.1f}")
                for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                    with sdpa_kernel(be):
                        ms = triton.testing.do_bench(
                            lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal),
                            return_mode="median")
                    row.append(f"{name} {flops / ms / 1e9:6.1f}")
                print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main(tuple(int(x) for x in sys.argv[1:]) or (64, 128, 256))
