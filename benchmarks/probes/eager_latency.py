"""Eager per-call time (host + device) of tileattn's decode-shaped entry points beside torch's SDPA.

Each case runs warm-up calls, then rounds of back-to-back eager calls with one
``torch.cuda.synchronize()`` at the end of a round; a round's wall time / calls is the per-call
time (host bound when the host is slower than the kernels, as at B=1). The median of the
rounds is reported. A failing case is recorded with its error, never fatal. CUDA only.

Shapes: B=1, Hq=32, Hkv=8, D=128, bf16, one new query token; caches of 4096 keys (contiguous
and paged 16); SDPA-shaped (B, H, 1, D) queries over 512 and 4096 keys with GQA (enable_gqa),
no mask or a bool key-padding mask (transformers repeats KV heads when it passes a mask).

    python3 benchmarks/probes/eager_latency.py OUT.json [--calls 200] [--rounds 7]
"""

import argparse
import json
import platform
import statistics
import time
import traceback

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import tileattn
from tileattn.flash_attn import flash_attn_with_kvcache
from tileattn.integrations import transformers as tt

DT, DEV = torch.bfloat16, "cuda"


def per_call_us(call, calls, rounds):
    """(median, every round) per-call us of ``calls`` eager calls synchronized at the end."""
    for _ in range(20):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times), times


def _sdpa(backend, *args, **kwargs):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(*args, **kwargs)


def cases():
    """name -> zero-argument call."""
    rnd = lambda *shape: torch.randn(*shape, device=DEV, dtype=DT)  # noqa: E731
    q, kn, vn = rnd(1, 1, 32, 128), rnd(1, 1, 8, 128), rnd(1, 1, 8, 128)
    kc, vc = rnd(1, 4096, 8, 128), rnd(1, 4096, 8, 128)
    kp, vp = rnd(256, 16, 8, 128), rnd(256, 16, 8, 128)
    table = torch.randperm(256, device=DEV, dtype=torch.int32)[None]
    full = torch.full((1,), 4096, device=DEV, dtype=torch.int32)
    room = torch.full((1,), 4095, device=DEV, dtype=torch.int32)
    out = {
        "kvcache 4k contiguous": lambda: tileattn.attention_with_kvcache(q, kc, vc, cache_seqlens=full),
        "kvcache 4k contiguous + append": lambda: tileattn.attention_with_kvcache(q, kc, vc, kn, vn,
                                                                                   cache_seqlens=room),
        "kvcache 4k paged 16": lambda: tileattn.attention_with_kvcache(q, kp, vp, cache_seqlens=full,
                                                                        block_table=table),
        "kvcache 4k int seqlens": lambda: tileattn.attention_with_kvcache(q, kc, vc, cache_seqlens=4096),
        "flash_attn_with_kvcache 4k": lambda: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=full, causal=True),
    }
    qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)  # the same memory as (B, H, S, D)
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        out[f"torch sdpa {name} 4k (kvcache equivalent)"] = (
            lambda b=backend: _sdpa(b, qt, kt, vt, enable_gqa=True))
    module = torch.nn.Module()
    for sk in (512, 4096):
        qs, ks, vs = rnd(1, 32, 1, 128), rnd(1, 8, sk, 128), rnd(1, 8, sk, 128)
        kr, vr = ks.repeat_interleave(4, dim=1), vs.repeat_interleave(4, dim=1)
        pad = torch.ones(1, 1, 1, sk, device=DEV, dtype=torch.bool)
        pad[..., : sk // 8] = False
        out[f"tileattn.sdpa gqa Sk={sk}"] = lambda qs=qs, ks=ks, vs=vs: tileattn.sdpa(qs, ks, vs, enable_gqa=True)
        out[f"torch sdpa gqa Sk={sk}"] = lambda qs=qs, ks=ks, vs=vs: F.scaled_dot_product_attention(
            qs, ks, vs, enable_gqa=True)
        out[f"tileattn.sdpa bool mask Sk={sk}"] = lambda qs=qs, kr=kr, vr=vr, pad=pad: tileattn.sdpa(qs, kr, vr, pad)
        out[f"torch sdpa bool mask Sk={sk}"] = lambda qs=qs, kr=kr, vr=vr, pad=pad: F.scaled_dot_product_attention(
            qs, kr, vr, pad)
        out[f"transformers layer tileattn Sk={sk}"] = lambda qs=qs, ks=ks, vs=vs: tt.attention_forward(
            module, qs, ks, vs, None, scaling=128 ** -0.5, is_causal=True)
    return out


RATIOS = [("kvcache 4k contiguous", "torch sdpa cudnn 4k (kvcache equivalent)"),
          ("kvcache 4k paged 16", "torch sdpa cudnn 4k (kvcache equivalent)"),
          ("flash_attn_with_kvcache 4k", "torch sdpa cudnn 4k (kvcache equivalent)"),
          *((f"tileattn.sdpa {kind} Sk={sk}", f"torch sdpa {kind} Sk={sk}")
            for sk in (512, 4096) for kind in ("gqa", "bool mask"))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    results = {}
    with torch.no_grad():
        for name, call in cases().items():
            try:
                us, rounds = per_call_us(call, args.calls, args.rounds)
                results[name] = {"us": us, "rounds": rounds}
                print(f"{name:44s} {us:8.1f} us", flush=True)
            except Exception as err:  # recorded, not fatal
                results[name] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc(limit=3)}
                print(f"{name:44s} FAILED {type(err).__name__}: {err}", flush=True)
    ratios = {}
    for ours, peer in RATIOS:
        if "us" in results.get(ours, {}) and "us" in results.get(peer, {}):
            ratios[f"{ours} / {peer}"] = results[ours]["us"] / results[peer]["us"]
            print(f"{ours} / {peer}: {ratios[f'{ours} / {peer}']:.2f}x")
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "host": platform.processor(),
            "calls": args.calls, "rounds": args.rounds}
    with open(args.out, "w") as f:
        json.dump({"info": info, "cases": results, "ratios": ratios}, f, indent=1)


if __name__ == "__main__":
    main()
