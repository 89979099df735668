"""Decode tuning probe (H100/H200, bf16, Hq=32, Hkv=8, D=128): CUDA-graph us per decode step.

    python scripts/decode_probe.py sweep [out.json]        # split count x key tile, contiguous
    python scripts/decode_probe.py one B L PAGE SHUFFLE N [B L PAGE SHUFFLE N ...]
                                                           # cases (PAGE 0 = contiguous, N 0 = plan)
    python scripts/decode_probe.py grid B L PAGE [B L PAGE ...]
                                                           # splits x key tile x stages, one layout

``grid`` times split counts x 64/128-key tiles x 3/4/5 pipeline stages for one (shuffled)
layout, the plan's choice first. ``sweep`` times every split count that keeps B * Hkv * splits <= 8 programs per SM, with 64-
and 128-key tiles (``TILEATTN_DECODE_BLOCK_N``); ``one`` times the plan's own choice for each
given cache layout (paged-16 with shuffled vs in-order page tables: is the gap to contiguous the
kernel's or the scattered pages'?). Times are medians of graph replays over rotated input
copies (replays read HBM, not L2); TB/s counts the K+V bytes read.
"""

import dataclasses
import json
import os
import sys

import torch
import triton
from triton.runtime.errors import OutOfResources

import tileattn
from tileattn.backends.triton import kvcache as triton_kvcache
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


def sweep(path=None):
    rows = []
    sms = torch.cuda.get_device_properties().multi_processor_count
    for B, L in ((1, 4096), (1, 32768), (4, 4096), (4, 32768), (16, 4096), (16, 32768), (64, 4096)):
        sets = _inputs(B, L, 0, False, _copies(B, L))
        for block_n in ("64", "128"):
            os.environ["TILEATTN_DECODE_BLOCK_N"] = block_n
            for splits in (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64):
                if splits and (B * HKV * splits > 8 * sms or L // splits < 128):
                    continue
                us = _time(sets, splits)
                rows.append(dict(B=B, L=L, block_n=int(block_n), splits=splits, us=us, tbs=_tbs(B, L, us)))
                print(f"B={B:<3d} L={L:<6d} n={block_n:<3s} splits={splits or 'auto':<4} {us:8.1f} us "
                      f"{_tbs(B, L, us):5.2f} TB/s", flush=True)
        os.environ.pop("TILEATTN_DECODE_BLOCK_N")
        del sets
    if path:
        with open(path, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


def one(B, L, page, shuffle, block_n):
    os.environ["TILEATTN_DECODE_BLOCK_N"] = str(block_n)
    us = _time(_inputs(B, L, page, bool(shuffle), _copies(B, L)), 0)
    print(f"B={B} L={L} page={page} shuffle={shuffle} n={block_n or 'plan'}: {us:.1f} us "
          f"{_tbs(B, L, us):.2f} TB/s", flush=True)


def grid(B, L, page):
    sets = _inputs(B, L, page, True, _copies(B, L))
    make_plan = triton_kvcache._make_plan
    plan = triton_kvcache.plan_kvcache(*sets[0][:3], sets[0][3])
    print(f"B={B} L={L} page={page} plan: {plan}", flush=True)
    try:
        for block_n in (128, 64):
            for stages in (3, 4, 5):
                triton_kvcache._make_plan = lambda *a, _n=block_n, _s=stages: dataclasses.replace(
                    make_plan(*a), block_n=_n, num_stages=_s)
                for splits in (2, 4, 8, 12, 16, 24, 32):
                    if L // splits < block_n:
                        continue
                    try:
                        us = _time(sets, splits)
                    except OutOfResources:
                        print(f"  n={block_n:<3d} stages={stages}: over the shared memory limit", flush=True)
                        break
                    print(f"  n={block_n:<3d} stages={stages} splits={splits:<3d} {us:7.1f} us "
                          f"{_tbs(B, L, us):5.2f} TB/s", flush=True)
    finally:
        triton_kvcache._make_plan = make_plan


if __name__ == "__main__":
    if sys.argv[1] == "sweep":
        sweep(*sys.argv[2:])
    elif sys.argv[1] == "grid":
        args = [int(x) for x in sys.argv[2:]]
        for i in range(0, len(args), 3):
            grid(*args[i:i + 3])
    else:
        args = [int(x) for x in sys.argv[2:]]
        for i in range(0, len(args), 5):
            one(*args[i:i + 5])
