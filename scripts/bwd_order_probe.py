"""Backward program order probe (sm_90, bf16, D=128, H=16, 16k tokens per batch): TFLOP/s per L2_SHARE.

    python scripts/bwd_order_probe.py          # CUDA only

For each N: the causal backward with ``backward.L2_SHARE`` set to 0 (head-major program order),
16, 4 and 64 MB (groups of heads, longest blocks first; see ``_head_group``), then 0 and 16 MB
again to show the run-to-run spread; the non-causal backward once for scale. Same process,
same inputs, so the columns compare the program order only.
"""

import importlib

import torch
import triton

from tileattn.backends.triton.forward import forward

bwd = importlib.import_module("tileattn.backends.triton.backward")  # the package exports the function

H, D = 16, 128
SHARES_MB = (0, 16, 4, 64, 0, 16)


def _tflops(fn, flops):
    fn()
    return flops / triton.testing.do_bench(fn, warmup=100, rep=300, return_mode="median") / 1e9


def main():
    default = bwd.L2_SHARE
    for N in (1024, 4096, 16384):
        B = 16384 // N
        q, k, v, dout = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        for causal in (True, False):
            kw = dict(scale=D ** -0.5, window=(-1, 0) if causal else (-1, -1), softcap=0.0, alibi_slopes=None,
                      sinks=None, attn_mask=None, dropout_p=0.0, seed=0)
            out, lse = forward(q, k, v, **kw)
            flops = 2.5 * 4 * B * H * N * N * D / (2 if causal else 1)
            row = []
            for mb in SHARES_MB if causal else (0,):
                bwd.L2_SHARE = mb << 20
                row.append(f"{mb}M {_tflops(lambda: bwd.backward(dout, q, k, v, out, lse, **kw), flops):.1f}")
            print(f"N={N} causal={int(causal)} " + " | ".join(row), flush=True)
    bwd.L2_SHARE = default


if __name__ == "__main__":
    main()
