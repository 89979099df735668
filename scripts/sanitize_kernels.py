"""Launch every Triton kernel variant once on small odd shapes, for compute-sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 scripts/sanitize_kernels.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python3 scripts/sanitize_kernels.py decode

Variants: forward and backward (dQ, dK/dV) with each score feature, strided inputs, varlen with
empty sequences, fp32/fp16/bf16, head dims 40/64/96/128/256 (TMA forced on and off); decode over
contiguous and paged caches (page sizes 1, 5, 16, 256) with new keys, Sn > 1 and split-KV (the
combine kernel). Uses the public API only; prints one line per case and exits 0 when every call
returned finite results where the oracle is finite (the sanitizer reports memory errors itself).
"""

import os
import sys

import torch

import tileattn
from tileattn import kvcache

DEV = "cuda"
FEATURES = [dict(), dict(causal=True), dict(window=(5, 3)), dict(softcap=3.0), dict(alibi=True),
            dict(sinks=True), dict(mask="bool"), dict(mask="float"), dict(dropout_p=0.2),
            dict(causal=True, softcap=2.0, alibi=True, sinks=True)]


def _features(f, B, Sq, Sk, Hq, dtype):
    kw = dict(causal=f.get("causal", False), window=f.get("window", (-1, -1)), softcap=f.get("softcap", 0.0),
              dropout_p=f.get("dropout_p", 0.0))
    if f.get("alibi"):
        kw["alibi_slopes"] = torch.rand(Hq, device=DEV)
    if f.get("sinks"):
        kw["sinks"] = torch.randn(Hq, device=DEV, requires_grad=True)
    if f.get("mask") == "bool":
        kw["attn_mask"] = torch.rand(B, 1, Sq, Sk, device=DEV) > 0.3
    elif f.get("mask") == "float":
        kw["attn_mask"] = torch.randn(B, Hq, Sq, Sk, device=DEV, dtype=dtype, requires_grad=True)
    return kw


def _dense(B, Sq, Sk, Hq, Hkv, D, Dv, dtype, strided):
    """q, k, v (requires grad); strided: slices of a packed buffer (non-contiguous rows)."""
    if strided:
        qkv = torch.randn(B, max(Sq, Sk), Hq + 2 * Hkv, max(D, Dv) + 8, device=DEV, dtype=dtype)
        q = qkv[:, :Sq, :Hq, :D]
        k = qkv[:, :Sk, Hq:Hq + Hkv, :D]
        v = qkv[:, :Sk, Hq + Hkv:, :Dv]
        return [t.detach().requires_grad_() for t in (q, k, v)]
    shapes = ((B, Sq, Hq, D), (B, Sk, Hkv, D), (B, Sk, Hkv, Dv))
    return [torch.randn(s, device=DEV, dtype=dtype, requires_grad=True) for s in shapes]


def _train(name, q, k, v, **kw):
    out = tileattn.attention(q, k, v, **kw)
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    ok = out.isfinite().all() and all(t.grad.isfinite().all() for t in (q, k, v))
    print(f"{name}: {'ok' if ok else 'NON-FINITE'}", flush=True)
    return bool(ok)


def prefill():
    ok = True
    for i, f in enumerate(FEATURES):
        dtype = (torch.float16, torch.bfloat16, torch.float32)[i % 3]
        q, k, v = _dense(2, 37, 53, 6, 2, 64, 64, dtype, strided=i % 2 == 0)
        ok &= _train(f"fwd+bwd {f} {dtype}", q, k, v, **_features(f, 2, 37, 53, 6, dtype))
    for D, Dv in ((40, 40), (96, 96), (128, 128), (256, 256), (192, 128)):
        for tma in ("0", "1"):
            os.environ["TILEATTN_TMA"] = tma
            q, k, v = _dense(1, 45, 29, 4, 4, D, Dv, torch.bfloat16, strided=False)
            ok &= _train(f"fwd+bwd D={D} Dv={Dv} TMA={tma}", q, k, v, causal=True)
    os.environ.pop("TILEATTN_TMA", None)
    lens_q, lens_k = [0, 7, 33, 1, 0], [5, 0, 41, 1, 0]
    cu = [torch.tensor([0] + torch.tensor(x).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
          for x in (lens_q, lens_k)]
    for causal in (False, True):
        q = torch.randn(sum(lens_q), 4, 64, device=DEV, dtype=torch.float16, requires_grad=True)
        k, v = (torch.randn(sum(lens_k), 2, 64, device=DEV, dtype=torch.float16, requires_grad=True) for _ in "kv")
        out = tileattn.attention_varlen(q, k, v, cu[0], cu[1], max(lens_q), max(lens_k), causal=causal)
        out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
        print(f"varlen empty sequences causal={causal}: ok", flush=True)
    return ok


def decode():
    ok = True
    lens = torch.tensor([0, 13, 200, 77], dtype=torch.int32, device=DEV)
    for page in (None, 1, 5, 16, 256):
        for sn, new, splits in ((1, True, 0), (3, True, 4), (1, False, 1), (70, True, 2)):
            q = torch.randn(4, sn, 8, 64, device=DEV, dtype=torch.bfloat16)
            k = torch.randn(4, 300, 2, 64, device=DEV, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            if page is None:
                kc, vc, table = k, v, None
            else:
                kc, vc, table = kvcache.paged_from_contiguous(k, v, page, shuffle=True)
            kn = vn = None
            if new:
                kn, vn = (torch.randn(4, sn, 2, 64, device=DEV, dtype=torch.bfloat16) for _ in "kv")
            out = tileattn.attention_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens, block_table=table,
                                                  num_splits=splits, sinks=torch.randn(8, device=DEV))
            torch.cuda.synchronize()
            good = bool(out.isfinite().all())
            ok &= good
            print(f"decode page={page} Sn={sn} new={new} splits={splits}: {'ok' if good else 'NON-FINITE'}",
                  flush=True)
    return ok


if __name__ == "__main__":
    which = sys.argv[1:] or ["prefill", "decode"]
    ok = all([{"prefill": prefill, "decode": decode}[w]() for w in which])
    sys.exit(0 if ok else 1)
