"""Backward kernel times, tileattn vs FlexAttention (bf16, D=128, H=16, 16k tokens per batch).

    python3 benchmarks/probes/bwd_kernel_profile.py [N ...]   # default 4096 16384; CUDA only

For each N and causal off/on: one warm ``loss.backward()`` per provider, then the CUDA time of
every kernel of 5 more under ``torch.profiler`` (us per call, summed per kernel name), so the
gap to Flex can be split between tileattn's dQ and dK/dV kernels. Public API only
(``tileattn.attention`` + ``torch.profiler``).
"""

import sys

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from torch.profiler import ProfilerActivity, profile

import tileattn

H, D, REPS = 16, 128, 5


def _kernel_times(step):
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPS):
            step()
        torch.cuda.synchronize()
    times = {}
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0:
            times[e.key[:60]] = e.device_time_total / REPS
    return times


def main(ns):
    flex = torch.compile(flex_attention, dynamic=False)
    for N in ns:
        B = 16384 // N
        for causal in (False, True):
            q, k, v, dout = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
            for t in (q, k, v):
                t.requires_grad_(True)
            qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_(True) for t in (q, k, v))
            mask = create_block_mask(lambda b, h, i, j: j <= i, None, None, N, N) if causal else None
            steps = {
                "tileattn": lambda: torch.autograd.grad(tileattn.attention(q, k, v, causal=causal), (q, k, v), dout),
                "flex": lambda: torch.autograd.grad(flex(qt, kt, vt, block_mask=mask), (qt, kt, vt),
                                                    dout.transpose(1, 2)),
            }
            for name, step in steps.items():
                times = _kernel_times(step)
                total = sum(times.values())
                top = sorted(times.items(), key=lambda kv: -kv[1])[:6]
                print(f"N={N} causal={int(causal)} {name}: fwd+bwd kernels {total:.0f} us | "
                      + " | ".join(f"{key} {us:.0f}" for key, us in top), flush=True)


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1:]] or [4096, 16384])
