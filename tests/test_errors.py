"""Every bad input of RELIABILITY.md raises a clear `tileattn:` error and mutates nothing."""

import pytest
import torch

import tileattn


def qkv(b=2, sq=5, sk=7, hq=4, hkv=2, d=16, dv=None, dtype=torch.float32):
    return (torch.randn(b, sq, hq, d, dtype=dtype), torch.randn(b, sk, hkv, d, dtype=dtype),
            torch.randn(b, sk, hkv, dv or d, dtype=dtype))


def raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match) as info:
        fn(*args, **kwargs)
    assert str(info.value).startswith("tileattn:"), str(info.value)


def test_dtype_mismatch():
    q, k, v = qkv()
    raises(TypeError, "k has dtype torch.float16", tileattn.attention, q, k.half(), v)


def test_unsupported_dtype():
    q, k, v = qkv()
    raises(TypeError, "q has dtype torch.float64", tileattn.attention, q.double(), k.double(), v.double())
    raises(TypeError, "q has dtype torch.int64", tileattn.attention, q.long(), k, v)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_device_mismatch():
    q, k, v = qkv()
    raises(TypeError, "k is on cuda", tileattn.attention, q, k.cuda(), v)


def test_wrong_rank():
    q, k, v = qkv()
    raises(ValueError, "q must have 4 dims", tileattn.attention, q[0], k, v)
    raises(ValueError, "q must have 3 dims", tileattn.attention_varlen, q, k, v, None, None)


def test_heads_not_dividing():
    q, k, v = qkv(hq=16, hkv=6)
    raises(ValueError, "k has 6 heads, which does not divide q's 16 heads", tileattn.attention, q, k, v)


def test_head_dims():
    q, k, v = qkv()
    raises(ValueError, "k has head dim 8 but q has 16", tileattn.attention, q, k[..., :8], v)
    q, k, v = qkv(d=264)
    raises(ValueError, "supported head dims are 1..256", tileattn.attention, q, k, v)
    q, k, v = qkv(dv=300)
    raises(ValueError, "v has head dim 300", tileattn.attention, q, k, v)


def test_batch_and_length_mismatch():
    q, k, v = qkv()
    raises(ValueError, "share batch", tileattn.attention, q, k, v[:, :3])


def _varlen():
    q, k, v = (torch.randn(10, 4, 16) for _ in range(3))
    return q, k, v, torch.tensor([0, 4, 10], dtype=torch.int32)


def test_cu_seqlens():
    q, k, v, cu = _varlen()
    raises(TypeError, "cu_seqlens_q must be an int32", tileattn.attention_varlen, q, k, v, cu.long(), cu)
    raises(ValueError, "cu_seqlens_k has 2 entries", tileattn.attention_varlen, q, k, v, cu, cu[[0, 2]])
    raises(ValueError, "cu_seqlens_q must start at 0", tileattn.attention_varlen, q, k, v, torch.tensor([1, 4, 10], dtype=torch.int32), cu)
    raises(ValueError, "cu_seqlens_k ends at 9", tileattn.attention_varlen, q, k, v, cu, torch.tensor([0, 4, 9], dtype=torch.int32))
    raises(ValueError, "non-decreasing", tileattn.attention_varlen, q, k, v, torch.tensor([0, 6, 4, 10], dtype=torch.int32),
           torch.tensor([0, 6, 4, 10], dtype=torch.int32))


def test_options():
    q, k, v = qkv()
    raises(ValueError, "dropout_p must be in", tileattn.attention, q, k, v, dropout_p=1.0)
    raises(ValueError, "dropout_p must be in", tileattn.attention, q, k, v, dropout_p=-0.1)
    raises(ValueError, "softcap must be >= 0", tileattn.attention, q, k, v, softcap=-1.0)
    raises(ValueError, "window must have entries >= -1", tileattn.attention, q, k, v, window=(-2, 0))
    raises(ValueError, "window must be a", tileattn.attention, q, k, v, window=(1,))


def test_per_head_shapes():
    q, k, v = qkv()
    raises(ValueError, "alibi_slopes must have shape", tileattn.attention, q, k, v, alibi_slopes=torch.ones(3))
    raises(ValueError, "sinks must have shape", tileattn.attention, q, k, v, sinks=torch.ones(2, 4))
    raises(TypeError, "sinks must be a floating", tileattn.attention, q, k, v, sinks=torch.ones(4, dtype=torch.int32))


def test_attn_mask():
    q, k, v = qkv()
    raises(ValueError, "not broadcastable", tileattn.attention, q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.bool))
    raises(TypeError, "attn_mask must be a bool or floating", tileattn.attention, q, k, v,
           attn_mask=torch.ones(5, 7, dtype=torch.int64))


def test_backend():
    q, k, v = qkv()
    raises(ValueError, "backend must be one of", tileattn.attention, q, k, v, backend="cuda")


def _cache(paged=False):
    b, hkv, d = 2, 2, 16
    q = torch.randn(b, 1, 4, d)
    new = torch.randn(b, 1, hkv, d), torch.randn(b, 1, hkv, d)
    if paged:
        kc, vc = torch.zeros(6, 4, hkv, d), torch.zeros(6, 4, hkv, d)
        table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
        return q, kc, vc, new, table
    return q, torch.zeros(b, 8, hkv, d), torch.zeros(b, 8, hkv, d), new, None


def _unchanged(kc, vc, fn):
    before = kc.clone(), vc.clone()
    fn()
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1]), "cache was written by a failing call"


def test_kvcache_capacity_and_nothing_written():
    q, kc, vc, (k, v), _ = _cache()
    seqlens = torch.tensor([3, 8], dtype=torch.int32)
    _unchanged(kc, vc, lambda: raises(ValueError, "beyond the cache capacity 8", tileattn.attention_with_kvcache,
                                      q, kc, vc, k, v, cache_seqlens=seqlens))


def test_kvcache_block_table():
    q, kc, vc, (k, v), table = _cache(paged=True)
    seqlens = torch.tensor([3, 5], dtype=torch.int32)
    raises(TypeError, "block_table must be an int32", tileattn.attention_with_kvcache, q, kc, vc, k, v,
           cache_seqlens=seqlens, block_table=table.long())
    bad = table.clone()
    bad[1, 1] = 6
    _unchanged(kc, vc, lambda: raises(ValueError, r"page ids outside \[0, 6\)", tileattn.attention_with_kvcache,
                                      q, kc, vc, k, v, cache_seqlens=seqlens, block_table=bad))


def test_kvcache_shapes():
    q, kc, vc, (k, v), _ = _cache()
    raises(ValueError, "pass both k and v", tileattn.attention_with_kvcache, q, kc, vc, k, None, cache_seqlens=1)
    raises(ValueError, r"k must have shape \(B, Sn, Hkv, D\)", tileattn.attention_with_kvcache, q, kc, vc,
           k[:, :, :1], v, cache_seqlens=1)
    raises(ValueError, "cache_seqlens must have B=2", tileattn.attention_with_kvcache, q, kc, vc, k, v,
           cache_seqlens=torch.zeros(3, dtype=torch.int32))
    raises(TypeError, "cache_seqlens must be an int32", tileattn.attention_with_kvcache, q, kc, vc, k, v,
           cache_seqlens=torch.zeros(2, dtype=torch.int64))


def test_kvcache_has_no_backward():
    q, kc, vc, (k, v), _ = _cache()
    q.requires_grad_()
    out = tileattn.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=1)
    raises(NotImplementedError, "has no backward", out.sum().backward)


def test_sdpa_errors():
    """sdpa raises what torch's SDPA raises (RuntimeError), still a tileattn ValueError/TypeError."""
    q, k, v = (t.transpose(1, 2) for t in qkv())
    raises(RuntimeError, "set enable_gqa=True", tileattn.sdpa, q, k, v)
    raises(RuntimeError, "not both", tileattn.sdpa, q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool),
           is_causal=True, enable_gqa=True)
    raises(ValueError, "not both", tileattn.sdpa, q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool),
           is_causal=True, enable_gqa=True)
    raises(RuntimeError, "k has dtype torch.float16", tileattn.sdpa, q, k.half(), v, enable_gqa=True)
    raises(TypeError, "k has dtype torch.float16", tileattn.sdpa, q, k.half(), v, enable_gqa=True)
    with pytest.raises(RuntimeError):  # torch's own SDPA agrees on the exception class
        torch.nn.functional.scaled_dot_product_attention(q, k.half(), v, enable_gqa=True)


# ----------------------------------------------------------------------------- every argument (issue 17, class 6)


def _valid(entry):
    """Valid keyword arguments of one entry point (a paged cache call writes new tokens)."""
    if entry == "attention":
        q, k, v = qkv()
        return dict(q=q, k=k, v=v)
    if entry == "varlen":
        q, k, v, cu = _varlen()
        return dict(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu.clone(), max_seqlen_q=6, max_seqlen_k=6)
    if entry == "kvcache":
        q, kc, vc, (k, v), table = _cache(paged=True)
        kc.normal_(), vc.normal_()
        return dict(q=q, k_cache=kc, v_cache=vc, k=k, v=v, cache_seqlens=torch.tensor([3, 5], dtype=torch.int32),
                    block_table=table)
    q, k, v = (t.transpose(1, 2) for t in qkv())
    return dict(query=q, key=k, value=v, enable_gqa=True)


ENTRY = dict(attention=tileattn.attention, varlen=tileattn.attention_varlen, kvcache=tileattn.attention_with_kvcache,
             sdpa=tileattn.sdpa)
T, V = TypeError, ValueError
I32 = torch.int32
# the keywords every entry point but sdpa shares: (argument, bad value, error, words after the name)
SHARED = [
    ("causal", None, T, "must be a bool"), ("causal", "yes", T, "must be a bool"), ("causal", 1, T, "must be a bool"),
    ("scale", "0.1", T, "must be a float"), ("scale", True, T, "must be a float"), ("scale", torch.tensor(0.1), T, ""),
    ("scale", float("nan"), V, "must be finite"), ("scale", float("inf"), V, "must be finite"),
    ("window", (True, False), T, "pair of ints"), ("window", (1.5, 2), T, "pair of ints"), ("window", None, T, ""),
    ("window", "ab", T, "pair of ints"), ("window", (1, 2, 3), V, "pair of ints"), ("window", (-5, 0), V, ">= -1"),
    ("softcap", None, T, "must be a float"), ("softcap", "1", T, ""), ("softcap", float("nan"), V, ">= 0"),
    ("softcap", -0.5, V, ">= 0"),
    ("alibi_slopes", [0.5] * 4, T, "floating-point tensor"), ("alibi_slopes", torch.ones(4, dtype=I32), T, ""),
    ("alibi_slopes", torch.ones(5), V, "must have shape"),
    ("sinks", [0.0] * 4, T, "floating-point tensor"), ("sinks", torch.ones(3), V, "must have shape"),
    ("return_lse", "no", T, "must be a bool"), ("return_lse", None, T, "must be a bool"),
    ("backend", None, T, "must be a str"), ("backend", 3, T, "must be a str"), ("backend", "cuda", V, "must be one of"),
]
CASES = [(entry, *case) for entry in ("attention", "varlen", "kvcache") for case in SHARED] + [
    (entry, *case) for entry in ("attention", "varlen") for case in [
        ("dropout_p", "0.1", T, "must be a float"), ("dropout_p", None, T, ""), ("dropout_p", True, T, ""),
        ("dropout_p", 1.0, V, r"in \[0, 1\)"), ("dropout_p", float("nan"), V, r"in \[0, 1\)"),
        ("deterministic", None, T, "must be a bool"), ("deterministic", "true", T, "must be a bool"),
        ("q", None, T, "must be a torch.Tensor"), ("q", [[0.0]], T, "must be a torch.Tensor"),
        ("k", None, T, "must be a torch.Tensor"), ("v", 3.0, T, "must be a torch.Tensor"),
        ("q", lambda kw: kw["q"].long(), T, "has dtype"), ("k", lambda kw: kw["k"].half(), T, "has dtype"),
        ("q", lambda kw: kw["q"][..., :0, :], V, "has 0 heads"),  # Hq = 0 (was a ZeroDivisionError)
        ("k", lambda kw: kw["k"][..., :0, :], V, "has 0 heads"),
        ("k", lambda kw: torch.cat([kw["k"], kw["k"][..., :1, :]], -2), V, "does not divide"), ("v", lambda kw: kw["v"][..., :1, :], V, "heads"),
        ("q", lambda kw: kw["q"][..., :0], V, "head dim"), ("k", lambda kw: kw["k"][..., :8], V, "head dim"),
    ]] + [
    ("attention", "attn_mask", [[True]], T, "bool or floating"), ("attention", "attn_mask", torch.ones(7, dtype=I32), T, ""),
    ("attention", "attn_mask", torch.ones(3, 7, dtype=torch.bool), V, "not broadcastable"),
    ("attention", "q", lambda kw: kw["q"][0], V, "must have 4 dims"), ("attention", "v", lambda kw: kw["v"][:, :2], V, "v"),
    ("varlen", "q", lambda kw: kw["q"][None], V, "must have 3 dims"), ("varlen", "v", lambda kw: kw["v"][:3], V, "v"),
    ("varlen", "cu_seqlens_q", None, T, "int32 tensor"), ("varlen", "cu_seqlens_q", [0, 4, 10], T, "int32 tensor"),
    ("varlen", "cu_seqlens_q", lambda kw: kw["cu_seqlens_q"].long(), T, "int32 tensor"),
    ("varlen", "cu_seqlens_q", lambda kw: kw["cu_seqlens_q"][None], V, "must have 1 dims"),
    ("varlen", "cu_seqlens_k", lambda kw: kw["cu_seqlens_k"][:1], V, "B\\+1 >= 2"),
    ("varlen", "cu_seqlens_k", lambda kw: kw["cu_seqlens_k"] + 1, V, "must start at 0"),
    ("varlen", "max_seqlen_q", "6", T, "must be an int"), ("varlen", "max_seqlen_q", 6.0, T, "must be an int"),
    ("varlen", "max_seqlen_q", True, T, "must be an int"), ("varlen", "max_seqlen_q", -1, V, "smaller than"),
    ("varlen", "max_seqlen_k", 5, V, "smaller than the longest"), ("varlen", "max_seqlen_k", 2, V, "smaller than"),
    ("kvcache", "q", None, T, "must be a torch.Tensor"), ("kvcache", "q", lambda kw: kw["q"].half(), T, "dtype"),
    ("kvcache", "q", lambda kw: kw["q"][..., :0, :], V, "has 0 heads"),
    ("kvcache", "k_cache", None, T, "must be a torch.Tensor"), ("kvcache", "k_cache", lambda kw: kw["k_cache"][0], V, "4 dims"),
    ("kvcache", "k_cache", lambda kw: kw["k_cache"].long(), T, "has dtype"),
    ("kvcache", "k_cache", lambda kw: kw["k_cache"][:, :, :1], V, ""),
    ("kvcache", "v_cache", lambda kw: kw["v_cache"][:, :3], V, "first two dims"),
    ("kvcache", "v_cache", lambda kw: torch.zeros(6, 4, 2, 32)[..., ::2], V, "unit stride in its last dim"),
    ("kvcache", "k_cache", lambda kw: kw["k_cache"][:1].expand(6, 4, 2, 16), V, "expanded view"),
    ("kvcache", "k", lambda kw: kw["k"][:, :, :1], V, r"must have shape \(B, Sn, Hkv, D\)"),
    ("kvcache", "k", lambda kw: kw["k"].half(), T, "has dtype"), ("kvcache", "v", None, V, ""),
    ("kvcache", "v", [1.0], T, "must be a torch.Tensor"),
    ("kvcache", "cache_seqlens", 2 ** 40, V, "capacity"), ("kvcache", "cache_seqlens", -1, V, "capacity"),
    ("kvcache", "cache_seqlens", True, T, "int32 tensor or an int"), ("kvcache", "cache_seqlens", 1.5, T, "int32"),
    ("kvcache", "cache_seqlens", None, T, "int32"), ("kvcache", "cache_seqlens", "3", T, "int32"),
    ("kvcache", "cache_seqlens", torch.tensor([3, 5]), T, "int32"),
    ("kvcache", "cache_seqlens", torch.tensor([3, 5, 1], dtype=I32), V, "B=2"),
    ("kvcache", "cache_seqlens", torch.tensor([3, -1], dtype=I32), V, ">= 0"),
    ("kvcache", "cache_seqlens", torch.tensor([3, 12], dtype=I32), V, "capacity"),
    ("kvcache", "block_table", [[0, 1, 2], [3, 4, 5]], T, "int32 tensor"),
    ("kvcache", "block_table", lambda kw: kw["block_table"].long(), T, "int32 tensor"),
    ("kvcache", "block_table", lambda kw: kw["block_table"][0], V, "2 dims"),
    ("kvcache", "block_table", lambda kw: kw["block_table"][:1], V, "B=2 rows"),
    ("kvcache", "block_table", lambda kw: kw["block_table"] * 2, V, r"page ids outside \[0, 6\)"),
    ("kvcache", "num_splits", -1, V, ">= 0"), ("kvcache", "num_splits", 1.5, T, ">= 0"),
    ("kvcache", "num_splits", None, T, ""), ("kvcache", "num_splits", True, T, ""),
    ("sdpa", "query", None, V, "3-D"), ("sdpa", "dropout_p", "0.1", T, "must be a float"),
    ("sdpa", "dropout_p", 1.5, V, r"in \[0, 1\)"), ("sdpa", "is_causal", None, T, "must be a bool"),
    ("sdpa", "is_causal", "yes", T, "must be a bool"), ("sdpa", "enable_gqa", 1, T, "must be a bool"),
    ("sdpa", "scale", "x", T, "must be a float"), ("sdpa", "attn_mask", torch.ones(5, 7, dtype=I32), T, ""),
]


def _case_id(case):
    entry, name, value = case[:3]
    shown = "fn" if callable(value) and not isinstance(value, torch.Tensor) else repr(value)[:20]
    return f"{entry}-{name}-{shown}"


@pytest.mark.parametrize("entry, name, value, error, words", CASES, ids=[_case_id(c) for c in CASES])
def test_every_argument(entry, name, value, error, words):
    """Each bad argument raises a ``tileattn:`` error of the right class naming the argument
    (TypeError for a type, ValueError for a value), and a cache call writes nothing."""
    kw = _valid(entry)
    kw[name] = value(kw) if callable(value) and not isinstance(value, torch.Tensor) else value
    caches = [t for n, t in kw.items() if n in ("k_cache", "v_cache") and isinstance(t, torch.Tensor)]
    before = [t.clone() for t in caches]
    raises(error, f"{name}.*{words}" if words else name, ENTRY[entry], **kw)
    for t, old in zip(caches, before):
        assert torch.equal(t, old), "a cache was written by a failing call"
