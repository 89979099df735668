"""Issue 18's cheap A/B: the forward at num_warps=4 with device descriptors, forced through
``tileattn.plan.overrides``, non-causal D=128 bf16, N = 1k/4k/16k, TFLOP/s and max error vs SDPA.

Run it in this tree and in one with docs/experiments/fwd-warp-specialize-2026-12-04.patch
applied (benchmarks/probes/ab_trees.sh runs both in one device call); results in
docs/results/h200-fwd-warp-specialize-ab-2026-12-04.txt.
"""
import torch, triton, tileattn
from tileattn import plan
import torch.nn.functional as F
torch.manual_seed(0)
for N in (1024, 4096, 16384):
    B, H, D = 16384 // N, 16, 128
    q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    flops = 4 * B * H * N * N * D
    for label, cfgs in (("default", None), ("128x128 w4 s3 tma", [plan.Config(128, 128, 4, 3)]),
                        ("128x64 w4 s3 tma", [plan.Config(128, 64, 4, 3)]), ("128x128 w4 s2 tma", [plan.Config(128, 128, 4, 2)])):
        try:
            ctx = plan.overrides(forward=cfgs, use_tma=True) if cfgs else plan.overrides()
            with ctx:
                fn = lambda: tileattn.attention(q, k, v)
                out = fn()
                err = (out.float() - ref.float()).abs().max().item()
                ms = triton.testing.do_bench(fn, warmup=50, rep=300)
            print(f"N={N} {label}: {flops / ms / 1e9:.1f} TFLOP/s (max err vs SDPA {err:.3g})", flush=True)
        except Exception as e:
            print(f"N={N} {label}: ERROR {type(e).__name__}: {str(e)[:200]}", flush=True)
