"""The eager fast path (tileattn/_fastpath.py, [Note] eager fast path): a stored call is reused
only for the same facts, bad input after a stored call still raises, int lengths are cached
per value, and one-row Triton calls run the decode kernel with the forward's answer."""

import pytest
import torch

import tileattn
from tileattn import _fastpath, api, ops
from tileattn.reference import attention as reference


@pytest.fixture(autouse=True)
def fresh():
    _fastpath.clear()
    yield
    _fastpath.clear()


@pytest.fixture
def validations(monkeypatch):
    """Counts calls of the kvcache and attention validators."""
    counts = {"kvcache": 0, "attention": 0}
    kvcache, mask = api._checks.kvcache, api._checks.attn_mask

    def spy_kvcache(*args, **kwargs):
        counts["kvcache"] += 1
        return kvcache(*args, **kwargs)

    def spy_mask(*args, **kwargs):
        counts["attention"] += 1
        return mask(*args, **kwargs)

    monkeypatch.setattr(api._checks, "kvcache", spy_kvcache)
    monkeypatch.setattr(api._checks, "attn_mask", spy_mask)
    return counts


def _cache(b=2, s=16, hkv=2, d=8, dtype=torch.float32):
    q = torch.randn(b, 1, 4, d, dtype=dtype)
    return q, torch.randn(b, s, hkv, d, dtype=dtype), torch.randn(b, s, hkv, d, dtype=dtype)


def test_repeated_kvcache_call_skips_validation_and_matches(validations):
    q, kc, vc = _cache()
    first = tileattn.attention_with_kvcache(q, kc, vc, cache_seqlens=9)
    again = tileattn.attention_with_kvcache(q, kc, vc, cache_seqlens=9)
    assert validations["kvcache"] == 1
    assert torch.equal(first, again)


@pytest.mark.parametrize("change", ["shape", "dtype", "stride", "scale type", "window", "grad"])
def test_kvcache_fast_path_keys_on_every_fact(validations, change):
    q, kc, vc = _cache()
    tileattn.attention_with_kvcache(q, kc, vc, cache_seqlens=9, scale=1.0)
    kw = dict(cache_seqlens=9, scale=1.0)
    if change == "shape":
        q = q.expand(2, 1, 4, 8).clone()[:1]
        kc, vc = kc[:1], vc[:1]
    elif change == "dtype":
        q, kc, vc = q.double().half(), kc.half(), vc.half()
    elif change == "stride":
        kc = kc.transpose(1, 2).contiguous().transpose(1, 2)
    elif change == "scale type":
        kw["scale"] = 1
    elif change == "window":
        kw["window"] = (3, -1)
    else:
        q = q.clone().requires_grad_()
    tileattn.attention_with_kvcache(q, kc, vc, **kw)
    assert validations["kvcache"] == 2


def test_bad_input_after_a_stored_call_still_raises():
    q, kc, vc = _cache()
    tileattn.attention_with_kvcache(q, kc, vc, cache_seqlens=9)
    with pytest.raises(ValueError, match="tileattn: cache_seqlens=17 with Sn=0 new tokens must lie in"):
        tileattn.attention_with_kvcache(q, kc, vc, cache_seqlens=17)
    with pytest.raises(TypeError, match="tileattn: scale must be a float or None"):
        tileattn.attention_with_kvcache(q, kc, vc, cache_seqlens=9, scale=True)
    with pytest.raises(TypeError, match="tileattn: window must be a"):
        tileattn.attention_with_kvcache(q, kc, vc, cache_seqlens=9, window=(True, -1))
    k = torch.randn(2, 8, 2, 8)
    tileattn.attention(q, k, k)
    with pytest.raises(TypeError, match="tileattn: causal must be a bool"):
        tileattn.attention(q, k, k, causal=1)
    with pytest.raises(ValueError, match="tileattn: attn_mask of shape"):
        tileattn.attention(q, k, k, attn_mask=torch.ones(3, 8, dtype=torch.bool))


def test_attention_fast_path_takes_a_new_mask_each_call(validations):
    q, k = torch.randn(1, 1, 4, 8), torch.randn(1, 6, 2, 8)
    keep = torch.ones(1, 1, 1, 6, dtype=torch.bool)
    drop = keep.clone()
    drop[..., :3] = False
    first = tileattn.attention(q, k, k, attn_mask=keep)
    second = tileattn.attention(q, k, k, attn_mask=drop)
    assert validations["attention"] == 1
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, tileattn.attention(q[:, :, :, :], k[:, 3:], k[:, 3:]))


def test_int_lengths_cached_per_value():
    dev = torch.device("cpu")
    a = _fastpath.lengths(9, 2, dev)
    assert _fastpath.lengths(9, 2, dev) is a
    assert _fastpath.lengths(10, 2, dev) is not a and _fastpath.lengths(9, 3, dev).shape == (3,)
    assert a.dtype == torch.int32 and a.tolist() == [9, 9]
    for v in range(_fastpath.MAX_LENGTHS + 5):
        _fastpath.lengths(v, 1, dev)
    assert len(_fastpath._LENGTHS) <= _fastpath.MAX_LENGTHS


def test_no_grad_call_skips_autograd(monkeypatch):
    q, k = torch.randn(1, 3, 4, 8), torch.randn(1, 5, 2, 8)
    monkeypatch.setattr(ops.EagerAttention, "apply", lambda *a: pytest.fail("autograd used without grad"))
    tileattn.attention(q, k, k, causal=True)


@pytest.mark.parametrize("kw", [dict(), dict(causal=True, window=(3, 0)), dict(softcap=5.0, scale=-0.3),
                                dict(alibi_slopes=torch.rand(4), sinks=torch.randn(4))])
def test_one_row_triton_call_runs_decode_kernel(monkeypatch, kw):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    runs = []
    run_kvcache = ops.run_kvcache
    monkeypatch.setattr(ops, "run_kvcache", lambda *a: runs.append(a[0]) or run_kvcache(*a))
    q, k, v = torch.randn(2, 1, 4, 16), torch.randn(2, 37, 2, 16), torch.randn(2, 37, 2, 16)
    out, lse = tileattn.attention(q, k, v, return_lse=True, backend="triton", **kw)
    ref, ref_lse = reference(q, k, v, **kw)
    assert runs == ["triton"]
    torch.testing.assert_close(out, ref.float(), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse.float(), atol=2e-5, rtol=2e-5)
