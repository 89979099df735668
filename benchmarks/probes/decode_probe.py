"""Decode probe (CUDA, bf16, Hq=32, Hkv=8, D=128): CUDA-graph us per decode step, public API only.

    python3 benchmarks/probes/decode_probe.py one B L PAGE SHUFFLE [B L PAGE SHUFFLE ...]
                        # the plan's choice per cache layout (PAGE 0 = contiguous)
    python3 benchmarks/probes/decode_probe.py splits [out.json]
                        # num_splits sweep (0 = the plan's count), contiguous, 7 shapes

``one`` answers "is a layout's gap the kernel's or the scattered pages'?" (paged with shuffled
vs in-order page tables beside contiguous). ``splits`` times every split count that keeps
B * Hkv * splits <= 8 programs per SM through ``attention_with_kvcache(num_splits=...)``.
Times are medians of graph replays over rotated input copies (replays read HBM, not L2); TB/s
counts the K+V bytes read. No new keys are appended (the benchmark's decode set appends).

The key tile and the pipeline depth are the planner's choice (``tileattn.plan.describe_kvcache``
says which); to time another, wrap the calls in the planner's override, e.g.
``with tileattn.plan.overrides(decode_block_n=64, decode_num_stages=4): ...``.
"""

import json
import sys

import torch
import triton

import tileattn
from tileattn.kvcache import paged_from_contiguous

HQ, HKV, D = 32, 8, 128


def _inputs(B, L, page, shuffle, copies):
    sets = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for _ in range(copies):
        q = torch.randn(B, 1, HQ, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(B, L, HKV, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        table = None
        if page:
            k, v, table = paged_from_contiguous(k, v, page, shuffle=shuffle, generator=g)
        seqlens = torch.full((B,), L, dtype=torch.int32, device="cuda")
        sets.append((q, k, v, table, seqlens))
    torch.cuda.synchronize()  # the timing runs on another stream
    return sets


def _time(sets, num_splits):
    calls = [lambda s=s: tileattn.attention_with_kvcache(s[0], s[1], s[2], cache_seqlens=s[4], block_table=s[3],
                                                         causal=True, num_splits=num_splits) for s in sets]

    def step():
        for c in calls:
            c()
    step()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(step, rep=30, return_mode="median") / len(calls) * 1e3


def _tbs(B, L, us):
    return B * L * HKV * 2 * D * 2 / (us * 1e-6) / 1e12


def _copies(B, L):
    return max(2, min(8, int(2e9 // (B * L * HKV * 2 * D * 2))))


def splits(path=None):
    rows = []
    sms = torch.cuda.get_device_properties().multi_processor_count
    for B, L in ((1, 4096), (1, 32768), (4, 4096), (4, 32768), (16, 4096), (16, 32768), (64, 4096)):
        sets = _inputs(B, L, 0, False, _copies(B, L))
        for n in (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64):
            if n and (B * HKV * n > 8 * sms or L // n < 128):
                continue
            us = _time(sets, n)
            rows.append(dict(B=B, L=L, splits=n, us=us, tbs=_tbs(B, L, us)))
            print(f"B={B:<3d} L={L:<6d} splits={n or 'plan':<4} {us:8.1f} us {_tbs(B, L, us):5.2f} TB/s", flush=True)
        del sets
    if path:
        with open(path, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


def one(B, L, page, shuffle):
    us = _time(_inputs(B, L, page, bool(shuffle), _copies(B, L)), 0)
    print(f"B={B} L={L} page={page} shuffle={shuffle}: {us:.1f} us {_tbs(B, L, us):.2f} TB/s", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "splits":
        splits(*sys.argv[2:])
    else:
        args = [int(x) for x in sys.argv[2:]]
        for i in range(0, len(args), 4):
            one(*args[i:i + 4])
