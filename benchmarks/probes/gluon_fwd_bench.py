"""A/B of the Gluon sm_90 forward against the tl forward, SDPA-cuDNN and SDPA-flash (H200).

    PYTHONPATH=. python3 benchmarks/probes/gluon_fwd_bench.py [--stages 2,3] [--d 128,64]

bf16, 16k tokens per batch (B = 16384 / N), Hq = 2048 / D, N = 1k / 4k / 16k, causal and not;
``do_bench`` median ms of eager calls, TFLOP/s = 4 B H N^2 D (halved when causal). Gluon rows
per ring depth (``--stages``). First a smoke check of each Gluon variant against SDPA (max
abs error), so a wrong variant is visible beside its speed.
"""
import argparse
import dataclasses

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from tileattn.backends.triton import plan
from tileattn.backends.triton.forward import run_forward
from tileattn.backends.triton.gluon import launch
from tileattn.score import ScoreSpec


def gluon_call(q, k, v, causal, stages):
    B, Sq, Hq, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, Sq, device=q.device, dtype=torch.float32)
    return lambda: launch.forward(q, k, v, out, lse, D ** -0.5, causal, stages)


def tl_call(q, k, v, causal):
    spec = ScoreSpec.build(q.shape[-1], causal=causal)
    fplan = dataclasses.replace(plan.plan_forward(q, k, v, spec), kernel="tl")
    return lambda: run_forward(q, k, v, spec, fplan)[0]


def sdpa_call(q, k, v, causal, backend):
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def fn():
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)
    return fn


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", default="2,3")
    ap.add_argument("--d", default="128,64")
    ap.add_argument("--n", default="1024,4096,16384")
    args = ap.parse_args()
    rows = []
    for D in map(int, args.d.split(",")):
        for N in map(int, args.n.split(",")):
            for causal in (False, True):
                B, H = 16384 // N, 2048 // D
                q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                flops = 4 * B * H * N * N * D / (2 if causal else 1)
                ref = sdpa_call(q, k, v, causal, SDPBackend.CUDNN_ATTENTION)()
                calls = {"tl": tl_call(q, k, v, causal),
                         "cudnn": sdpa_call(q, k, v, causal, SDPBackend.CUDNN_ATTENTION),
                         "flash": sdpa_call(q, k, v, causal, SDPBackend.FLASH_ATTENTION)}
                for s in map(int, args.stages.split(",")):
                    if D == 64 or s == 2:  # D=128: Q, O and 2 stages of K/V fill 192 KB of 227
                        calls[f"gluon-s{s}"] = gluon_call(q, k, v, causal, s)
                line = f"D={D} N={N:>5} {'causal' if causal else 'plain ':6}"
                for name, fn in calls.items():
                    err = (fn().float() - ref.float()).abs().max().item()
                    ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
                    line += f" | {name} {flops / ms / 1e9:6.1f}" + (f" (err {err:.3f})" if name.startswith("g") else "")
                print(line, flush=True)
                rows.append(line)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
