"""The oracle is right: checked against SDPA, explicit masks and hand-written formulas (CPU, fast).

The oracle as a backend (``backend="reference"`` through the public API, every feature and
entry point) is a column of the matrix in test_features.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from tileattn import _philox, reference as R
from tests.helpers import assert_close, cu_seqlens, make_qkv, randn, to_paged

F64 = torch.float64
SHAPES = [  # B, Sq, Sk, Hq, Hkv, D, Dv
    (1, 1, 1, 1, 1, 8, 8),
    (2, 17, 17, 3, 3, 16, 16),
    (2, 13, 29, 6, 2, 24, 16),
    (1, 33, 7, 4, 1, 8, 12),
]


def sdpa(q, k, v, **kw):
    """torch SDPA in native layout with k/v heads repeated for GQA."""
    g = q.shape[2] // k.shape[2]
    k, v = (x.repeat_interleave(g, dim=2).transpose(1, 2) for x in (k, v))
    return F.scaled_dot_product_attention(q.transpose(1, 2), k, v, **kw).transpose(1, 2)


def scores(q, k, scale=None):
    """Raw scaled scores (B, Hq, Sq, Sk) in float64 with GQA repeat."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    return torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) * scale


def band(Sq, Sk, left=-1, right=-1):
    """Explicit bottom-right window mask (Sq, Sk): the spec's formula, loop-free."""
    i = torch.arange(Sq).view(-1, 1) + Sk - Sq
    j = torch.arange(Sk).view(1, -1)
    return ((left < 0) | (j >= i - left)) & ((right < 0) | (j <= i + right))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["plain", "causal", "bool", "float"])
def test_matches_sdpa(shape, kind):
    B, Sq, Sk, Hq, Hkv, D, Dv = shape
    if kind == "causal" and Sq != Sk:
        pytest.skip("SDPA's causal is top-left; equal only for Sq == Sk")
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, Dv, dtype=F64, layout="bhsd")
    mask = None
    if kind == "bool":
        mask = torch.rand(B, 1, Sq, Sk) > 0.3
        mask[..., 0] = True  # SDPA gives NaN on empty rows; those are tested separately
    elif kind == "float":
        mask = randn((1, Hq, Sq, Sk), F64, "cpu")
    out, lse = R.attention(q, k, v, causal=kind == "causal", attn_mask=mask)
    ref = sdpa(q, k, v, is_causal=kind == "causal", attn_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    s = scores(q, k)
    if kind == "causal":
        s = s.masked_fill(~band(Sq, Sk, -1, 0), -math.inf)
    elif mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask
    torch.testing.assert_close(lse, s.logsumexp(-1), rtol=1e-12, atol=1e-12)
    assert out.dtype == lse.dtype == F64 and out.shape == (B, Sq, Hq, Dv) and lse.shape == (B, Hq, Sq)


@pytest.mark.parametrize("Sq,Sk", [(5, 11), (11, 5), (1, 9), (9, 9)])
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (3, 2)), (True, (4, -1)), (False, (0, 0))])
def test_causal_window_bottom_right(Sq, Sk, causal, window):
    q, k, v = make_qkv(2, Sq, Sk, 4, 2, 16, dtype=F64)
    out, lse = R.attention(q, k, v, causal=causal, window=window)
    keep = band(Sq, Sk, window[0], 0 if causal else window[1])
    ref, ref_lse = R.attention(q, k, v, attn_mask=keep)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)


def test_sinks_formula():
    q, k, v = make_qkv(2, 7, 9, 4, 2, 16, 8, dtype=F64)
    sinks = randn((4,), F64, "cpu")
    out, lse = R.attention(q, k, v, sinks=sinks)
    s = scores(q, k)
    z = s.exp().sum(-1) + sinks.exp().view(1, -1, 1)
    p = s.exp() / z[..., None]
    vr = v.repeat_interleave(2, dim=2)
    torch.testing.assert_close(out, torch.einsum("bhij,bjhd->bihd", p, vr), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, z.log(), rtol=1e-12, atol=1e-12)


def test_softcap_and_alibi_as_explicit_bias():
    B, Sq, Sk, Hq = 2, 6, 10, 3
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hq, 16, dtype=F64)
    q = q * 4
    slopes = torch.rand(Hq, dtype=torch.float32)
    s = scores(q, k)
    capped = 5.0 * torch.tanh(s / 5.0)
    dist = (torch.arange(Sq).view(-1, 1) + Sk - Sq - torch.arange(Sk)).abs()
    bias = -slopes.double().view(1, -1, 1, 1) * dist
    want = torch.softmax(capped + bias, -1)
    out, lse = R.attention(q, k, v, softcap=5.0, alibi_slopes=slopes)
    torch.testing.assert_close(out, torch.einsum("bhij,bjhd->bihd", want, v.double()), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, (capped + bias).logsumexp(-1), rtol=1e-12, atol=1e-12)
    out_b, _ = R.attention(q, k, v, softcap=5.0, alibi_slopes=slopes.expand(B, Hq).contiguous())
    torch.testing.assert_close(out_b, out, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["window", "causal_sq_gt_sk", "all_false", "float_neg_inf"])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_fully_masked_rows(case, with_sinks):
    Sq, Sk = (8, 3) if case == "causal_sq_gt_sk" else (6, 6)
    q, k, v = make_qkv(2, Sq, Sk, 2, 1, 8, dtype=F64, requires_grad=True)
    sinks = randn((2,), F64, "cpu", requires_grad=True) if with_sinks else None
    kw = {"causal": True} if case == "causal_sq_gt_sk" else {}
    empty = torch.zeros(Sq, dtype=torch.bool)
    if case == "window":  # diagonal-only window with the diagonal masked out: every row empty
        kw["window"] = (0, 0)
        kw["attn_mask"] = ~torch.eye(Sq, dtype=torch.bool)
        empty[:] = True
    elif case == "causal_sq_gt_sk":
        empty[: Sq - Sk] = True
    elif case == "all_false":
        kw["attn_mask"] = torch.ones(Sq, Sk, dtype=torch.bool)
        kw["attn_mask"][2] = False
        empty[2] = True
    else:
        kw["attn_mask"] = torch.zeros(Sq, Sk, dtype=F64, requires_grad=True)
        with torch.no_grad():
            kw["attn_mask"][4] = -math.inf
        empty[4] = True
    out, lse = R.attention(q, k, v, sinks=sinks, **kw)
    assert not out.isnan().any() and not lse.isnan().any()
    assert (out[:, empty] == 0).all()
    want = sinks.detach().view(1, 2, 1).expand(2, 2, int(empty.sum())) if with_sinks else -math.inf
    assert (lse[:, :, empty] == want).all()
    loss = (out * randn(out.shape, F64, "cpu")).sum() + lse[lse.isfinite()].sum()
    wrt = [q, k, v] + ([sinks] if with_sinks else []) + ([kw["attn_mask"]] if case == "float_neg_inf" else [])
    grads = torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True)
    assert all(not g.isnan().any() for g in grads)
    assert (grads[0][:, empty] == 0).all()
    if case == "float_neg_inf":
        assert (grads[-1][4] == 0).all()


def test_dropout_mask_and_seed():
    B, Sq, Sk, H, p = 2, 9, 12, 3, 0.3
    q, k, v = make_qkv(B, Sq, Sk, H, H, 8, dtype=F64)
    keep = _philox.keep_mask(1234, p, B, H, Sq, Sk)
    out, lse = R.attention(q, k, v, dropout_p=p, dropout_mask=keep)
    P = torch.softmax(scores(q, k), -1)
    want = torch.einsum("bhij,bjhd->bihd", P * keep / (1 - p), v)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, scores(q, k).logsumexp(-1), rtol=1e-12, atol=1e-12)
    out_seed, _ = R.attention(q, k, v, dropout_p=p, dropout_seed=1234)
    torch.testing.assert_close(out_seed, out, rtol=0, atol=0)
    with pytest.raises(ValueError):
        R.attention(q, k, v, dropout_p=p)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_equals_per_sequence(causal):
    lq, lk = [3, 0, 7, 1, 5], [4, 2, 7, 0, 9]
    Hq, Hkv, D, p, seed = 4, 2, 16, 0.2, 99
    q = randn((sum(lq), Hq, D), F64, "cpu")
    k, v = randn((sum(lk), Hkv, D), F64, "cpu"), randn((sum(lk), Hkv, 8), F64, "cpu")
    slopes = torch.rand(len(lq), Hq)
    sinks = randn((Hq,), F64, "cpu")
    cq, ck = cu_seqlens(lq), cu_seqlens(lk)
    kw = dict(causal=causal, window=(3, -1), softcap=10.0, sinks=sinks, dropout_p=p)
    out, lse = R.attention_varlen(q, k, v, cq, ck, max(lq), max(lk), alibi_slopes=slopes, dropout_seed=seed, **kw)
    assert out.shape == (sum(lq), Hq, 8) and lse.shape == (Hq, sum(lq))
    for b in range(len(lq)):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        keep = _philox.keep_mask(seed, p, 1, Hq, lq[b], lk[b], b0=b)
        o, l = R.attention(q[None, qs], k[None, ks], v[None, ks], alibi_slopes=slopes[b], dropout_mask=keep, **kw)
        torch.testing.assert_close(out[qs], o[0], rtol=0, atol=0)
        torch.testing.assert_close(lse[:, qs], l[0], rtol=0, atol=0)


@pytest.mark.parametrize("block_size", [1, 5, 16])
@pytest.mark.parametrize("append", [True, False])
def test_kvcache_paged_equals_contiguous_and_dense(block_size, append):
    B, Smax, Sn, Hq, Hkv, D, Dv = 3, 23, 3, 4, 2, 16, 8
    lens = torch.tensor([0, 7, 20 - (Sn if append else 0)], dtype=torch.int32)
    kc, vc = randn((B, Smax, Hkv, D), F64, "cpu"), randn((B, Smax, Hkv, Dv), F64, "cpu")
    kp, table = to_paged(kc, block_size)
    vp, _ = to_paged(vc, block_size, table=table)
    q = randn((B, Sn, Hq, D), F64, "cpu")
    kn, vn = (randn((B, Sn, Hkv, D), F64, "cpu"), randn((B, Sn, Hkv, Dv), F64, "cpu")) if append else (None, None)
    kw = dict(cache_seqlens=lens, window=(4, -1), sinks=randn((Hq,), F64, "cpu"), alibi_slopes=torch.rand(Hq))
    out_c, lse_c = R.attention_with_kvcache(q, kc, vc, kn, vn, **kw)
    out_p, lse_p = R.attention_with_kvcache(q, kp, vp, kn, vn, block_table=table, **kw)
    torch.testing.assert_close(out_p, out_c, rtol=0, atol=0)
    torch.testing.assert_close(lse_p, lse_c, rtol=0, atol=0)
    if not append:  # cache_seqlens = 0 and no new keys: empty rows
        assert (out_c[0] == 0).all() and (lse_c[0] == kw["sinks"].view(Hq, 1)).all()
    for b in range(B):
        n = int(lens[b]) + (Sn if append else 0)
        if append:
            assert (kc[b, lens[b]:n] == kn[b]).all()
        dense_kw = {x: kw[x] for x in ("window", "sinks", "alibi_slopes")}
        o, l = R.attention(q[b:b + 1], kc[b:b + 1, :n], vc[b:b + 1, :n], causal=True, **dense_kw)
        torch.testing.assert_close(out_c[b:b + 1], o, rtol=0, atol=0)
        torch.testing.assert_close(lse_c[b:b + 1], l, rtol=0, atol=0)


def test_kvcache_int_seqlens():
    kc, vc = randn((2, 10, 1, 8), F64, "cpu"), randn((2, 10, 1, 8), F64, "cpu")
    q = randn((2, 1, 2, 8), F64, "cpu")
    a = R.attention_with_kvcache(q, kc, vc, cache_seqlens=6)
    b = R.attention_with_kvcache(q, kc, vc, cache_seqlens=torch.full((2,), 6, dtype=torch.int32))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gradcheck():
    q, k, v = make_qkv(1, 4, 5, 2, 1, 3, 2, dtype=F64, requires_grad=True)
    sinks = randn((2,), F64, "cpu", requires_grad=True)
    mask = randn((1, 2, 4, 5), F64, "cpu", requires_grad=True)

    slopes = torch.rand(2)

    def fn(q, k, v, sinks, mask):
        return R.attention(q, k, v, causal=True, window=(2, -1), softcap=3.0, alibi_slopes=slopes,
                           sinks=sinks, attn_mask=mask)

    assert torch.autograd.gradcheck(fn, (q, k, v, sinks, mask))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_reference(dtype):
    q, k, v = make_qkv(2, 17, 29, 4, 2, 32, dtype=dtype)
    hi, hi_lse = R.attention(q, k, v, causal=True)
    lo, lo_lse = R.attention(q, k, v, causal=True, upcast=False)
    assert lo.dtype == dtype and lo_lse.dtype == torch.float32
    assert_close("out", lo, hi, lo)  # ref_lo passes against itself with the floor
    assert_close("lse", lo_lse, hi_lse, lo_lse, dtype=dtype)
    with pytest.raises(AssertionError, match="out"):
        assert_close("out", lo + 0.1, hi, lo)
    with pytest.raises(AssertionError, match="NaN"):
        assert_close("out", lo.masked_fill(torch.rand(lo.shape) < 0.01, math.nan), hi, lo)
