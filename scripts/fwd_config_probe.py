"""Forward config probe (sm_90, bf16): TFLOP/s of every tuned config and of the autotuned call.

    python scripts/fwd_config_probe.py D N [N ...]     # e.g. 128 1024 4096

For each N (16k tokens per batch, H = 2048 // D) and causal off/on: each config of the plan's
list forced (pointer and TMA loads), then ``tileattn.attention`` as users call it and the config
its autotuner picked. Answers "is a slow number the kernel or the autotuner's pick?".
"""

import sys

import torch
import triton

import tileattn
from tileattn import plan
from tileattn.backends.triton.forward import _fwd_kernel, run_forward


def _tflops(fn, flops):
    fn()
    return flops / triton.testing.do_bench(fn, return_mode="median") / 1e9


def main(D, ns):
    H = 2048 // D
    for N in ns:
        B = 16384 // N
        q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        kw = dict(scale=D ** -0.5, softcap=0.0, alibi_slopes=None, sinks=None, attn_mask=None, dropout_p=0.0,
                  seed=0)
        for causal in (False, True):
            window = (-1, 0) if causal else (-1, -1)
            flops = 4 * B * H * N * N * D / (2 if causal else 1)
            row = [f"D={D} N={N} causal={int(causal)}"]
            for use_tma in (False, True):
                for c in plan.forward_plan(q, k, v, window=window).configs:
                    fp = plan.forward_plan(q, k, v, window=window, configs=[c], use_tma=use_tma)
                    t = _tflops(lambda: run_forward(q, k, v, fp, window=window, **kw), flops)
                    row.append(f"{'tma' if use_tma else 'ptr'} {c.block_m}x{c.block_n}w{c.num_warps}s{c.num_stages} {t:.0f}")
            t = _tflops(lambda: tileattn.attention(q, k, v, causal=causal), flops)
            tuned = [a for key, a in plan._TUNED.items() if a.fn is _fwd_kernel]
            picks = {str(a.best_config) for a in tuned if getattr(a, "best_config", None)}
            row.append(f"autotuned {t:.0f} (picks so far: {sorted(picks)})")
            print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), [int(x) for x in sys.argv[2:]] or [1024, 4096])
