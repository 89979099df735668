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
