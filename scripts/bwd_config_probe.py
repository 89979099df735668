"""Backward config probe (sm_90, bf16, D=128, H=16, 16k tokens per batch): TFLOP/s per forced config.

    python scripts/bwd_config_probe.py [N ...]      # default 4096 16384; CUDA only

For each N and causal off/on: the backward as users get it (autotuned), then each dK/dV
candidate forced (dQ at its default) and each dQ candidate forced (dK/dV at its default).
Backward FLOPs are 2.5x the forward's (5 matmuls of the forward's 2), halved with causal.
Answers "is there a config outside the tuned lists that is faster?".
"""

import importlib
import sys

import torch
import triton

from tileattn.backends.triton.forward import forward

bwd = importlib.import_module("tileattn.backends.triton.backward")  # the package exports the function

H, D = 16, 128
KEY = ("sm_90", "16", 128)
DKDV = [(32, 128, 8, 3), (32, 128, 8, 2), (32, 128, 8, 4), (16, 128, 8, 3), (16, 128, 8, 4), (64, 128, 8, 2),
        (64, 64, 8, 3), (32, 64, 4, 3)]
DQ = [(128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 8, 2), (128, 32, 8, 3), (128, 32, 8, 4), (64, 64, 4, 4),
      (64, 32, 4, 3), (64, 128, 8, 3)]


def _tflops(fn, flops):
    fn()
    return flops / triton.testing.do_bench(fn, warmup=100, rep=200, return_mode="median") / 1e9


def main(ns):
    tuned_dkdv, tuned_dq = bwd._DKDV[KEY], bwd._DQ[KEY]
    for N in ns:
        B = 16384 // N
        q, k, v, dout = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        for causal in (False, True):
            window = (-1, 0) if causal else (-1, -1)
            kw = dict(scale=D ** -0.5, window=window, softcap=0.0, alibi_slopes=None, sinks=None, attn_mask=None,
                      dropout_p=0.0, seed=0)
            out, lse = forward(q, k, v, **kw)
            flops = 2.5 * 4 * B * H * N * N * D / (2 if causal else 1)

            def step():
                return bwd.backward(dout, q, k, v, out, lse, **kw)

            bwd._DKDV[KEY], bwd._DQ[KEY] = tuned_dkdv, tuned_dq
            print(f"N={N} causal={int(causal)} autotuned {_tflops(step, flops):.0f}", flush=True)
            for which, table, cands, other in (("dkdv", bwd._DKDV, DKDV, "dq"), ("dq", bwd._DQ, DQ, "dkdv")):
                bwd._DKDV[KEY], bwd._DQ[KEY] = tuned_dkdv[:1], tuned_dq[:1]
                row = []
                for c in cands:
                    table[KEY] = (bwd.Cfg(*c, "probe"),)
                    try:
                        row.append(f"{c} {_tflops(step, flops):.0f}")
                    except Exception as e:  # out of shared memory / resources
                        row.append(f"{c} failed: {type(e).__name__}")
                print(f"N={N} causal={int(causal)} {which} forced ({other} default): " + " | ".join(row), flush=True)
    bwd._DKDV[KEY], bwd._DQ[KEY] = tuned_dkdv, tuned_dq


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1:]] or [4096, 16384])
