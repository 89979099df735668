"""tileattn.flash_attn: flash-attn v2.8.3's signatures, and each function against the oracle.

Dense and varlen functions are compared with ``tileattn.reference`` by RELIABILITY.md's rule
(out, softmax_lse, gradients); the packed forms with the unpacked call on the same tensors
(bitwise: same kernels), their gradients landing in the packed tensor; kvcache with
contiguous, paged and batch-indexed caches against ``tileattn.attention_with_kvcache`` and
the oracle. Shapes are small and odd (Sq 7, Sk 11, D 24, GQA 4:2).
"""

import inspect

import pytest
import torch

import tileattn
from tileattn import flash_attn as fa, reference

from helpers import assert_close, cu_seqlens, make_qkv, randn, to_paged

# flash_attn/flash_attn_interface.py at v2.8.3: (positional parameters, keyword defaults)
_FEATURES = [("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
             ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False)]
SIGNATURES = {
    "flash_attn_func": (["q", "k", "v"], _FEATURES),
    "flash_attn_qkvpacked_func": (["qkv"], _FEATURES),
    "flash_attn_kvpacked_func": (["q", "kv"], _FEATURES),
    "flash_attn_varlen_func": (["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"],
                               _FEATURES + [("block_table", None)]),
    "flash_attn_varlen_qkvpacked_func": (["qkv", "cu_seqlens", "max_seqlen"], _FEATURES),
    "flash_attn_varlen_kvpacked_func": (["q", "kv", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                                         "max_seqlen_k"], _FEATURES),
    "flash_attn_with_kvcache": (["q", "k_cache", "v_cache"], [
        ("k", None), ("v", None), ("rotary_cos", None), ("rotary_sin", None), ("cache_seqlens", None),
        ("cache_batch_idx", None), ("cache_leftpad", None), ("block_table", None), ("softmax_scale", None),
        ("causal", False), ("window_size", (-1, -1)), ("softcap", 0.0), ("rotary_interleaved", True),
        ("alibi_slopes", None), ("num_splits", 0), ("return_softmax_lse", False)]),
}
CASES = {
    "plain": {},
    "causal": dict(causal=True),
    "window_softcap": dict(window_size=(3, 2), softcap=2.0, softmax_scale=0.4),
    "alibi_h": dict(causal=True, alibi_slopes="h"),
    "alibi_bh": dict(alibi_slopes="bh"),
}


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signature_matches_flash_attn(name):
    params = list(inspect.signature(getattr(fa, name)).parameters.values())
    positional, defaults = SIGNATURES[name]
    assert [p.name for p in params] == positional + [n for n, _ in defaults]
    assert all(p.default is inspect.Parameter.empty for p in params[:len(positional)])
    assert [(p.name, p.default) for p in params[len(positional):]] == defaults
    assert name in fa.__all__


def _keywords(case, batch, heads):
    """flash-attn keywords of ``case`` and the oracle's equivalents."""
    kw = dict(CASES[case])
    if kw.get("alibi_slopes") is not None:
        shape = (heads,) if kw["alibi_slopes"] == "h" else (batch, heads)
        kw["alibi_slopes"] = torch.rand(shape) * 0.5
    ref = dict(causal=kw.get("causal", False), scale=kw.get("softmax_scale"), window=kw.get("window_size", (-1, -1)),
               softcap=kw.get("softcap", 0.0), alibi_slopes=kw.get("alibi_slopes"))
    return kw, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_flash_attn_func_vs_oracle(case, dtype):
    q, k, v = make_qkv(2, 7, 11, 4, 2, 24, dtype=dtype, layout="bhsd")
    kw, ref = _keywords(case, 2, 4)
    out, lse, s_dmask = fa.flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    out_hi, lse_hi = reference.attention(q, k, v, **ref)
    out_lo, _ = reference.attention(q, k, v, **ref, upcast=False)
    assert_close("out", out, out_hi, None if dtype == torch.float32 else out_lo)
    assert_close("softmax_lse", lse, lse_hi, None, dtype=torch.float32)
    assert lse.shape == (2, 4, 7) and lse.dtype == torch.float32
    assert s_dmask.shape == (0,) and s_dmask.dtype == dtype  # flash-attn's value without dropout
    assert torch.equal(fa.flash_attn_func(q, k, v, **kw), out)


@pytest.mark.parametrize("case", ["causal", "window_softcap", "alibi_bh"])
def test_flash_attn_func_gradients_vs_oracle(case):
    q, k, v = make_qkv(2, 7, 11, 4, 2, 24, requires_grad=True)
    kw, ref = _keywords(case, 2, 4)
    dout = torch.randn(2, 7, 4, 24)
    grads = torch.autograd.grad(fa.flash_attn_func(q, k, v, deterministic=True, **kw), (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64, _ = reference.attention(q64, k64, v64, **ref)
    grads64 = torch.autograd.grad(out64, (q64, k64, v64), dout.double())
    for n, g, g64 in zip("qkv", grads, grads64):
        assert_close(f"d{n}", g, g64, None, c=3)


def test_qkvpacked_equals_unpacked_and_grad_reaches_qkv():
    qkv = randn((2, 9, 3, 4, 24), torch.float32, "cpu", requires_grad=True)
    out, lse, _ = fa.flash_attn_qkvpacked_func(qkv, causal=True, window_size=(4, 0), return_attn_probs=True)
    q, k, v = (qkv.detach()[:, :, i].requires_grad_() for i in range(3))
    ref, ref_lse = tileattn.attention(q, k, v, causal=True, window=(4, 0), return_lse=True)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref.backward(dout)
    assert torch.equal(qkv.grad, torch.stack([q.grad, k.grad, v.grad], dim=2))


def test_kvpacked_equals_unpacked_and_grad_reaches_kv():
    q = randn((2, 5, 4, 24), torch.float32, "cpu", requires_grad=True)
    kv = randn((2, 9, 2, 2, 24), torch.float32, "cpu", requires_grad=True)
    out = fa.flash_attn_kvpacked_func(q, kv, causal=True, softcap=3.0)
    k, v = (kv.detach()[:, :, i].requires_grad_() for i in range(2))
    q2 = q.detach().requires_grad_()
    ref = tileattn.attention(q2, k, v, causal=True, softcap=3.0)
    assert torch.equal(out, ref)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref.backward(dout)
    assert torch.equal(kv.grad, torch.stack([k.grad, v.grad], dim=2)) and torch.equal(q.grad, q2.grad)


LENS_Q, LENS_K = [3, 0, 7, 1], [5, 4, 7, 11]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", ["plain", "causal", "window_softcap", "alibi_bh"])
def test_varlen_func_vs_oracle(case, dtype):
    q, k, v = randn((sum(LENS_Q), 4, 24), dtype, "cpu"), *(randn((sum(LENS_K), 2, 24), dtype, "cpu") for _ in "kv")
    cu_q, cu_k = cu_seqlens(LENS_Q), cu_seqlens(LENS_K)
    kw, ref = _keywords(case, 4, 4)
    out, lse, _ = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 7, 11, return_attn_probs=True, **kw)
    out_hi, lse_hi = reference.attention_varlen(q, k, v, cu_q, cu_k, **ref)
    out_lo, _ = reference.attention_varlen(q, k, v, cu_q, cu_k, **ref, upcast=False)
    assert_close("out", out, out_hi, None if dtype == torch.float32 else out_lo)
    assert_close("softmax_lse", lse, lse_hi, None, dtype=torch.float32)
    assert lse.shape == (4, sum(LENS_Q))


def test_varlen_packed_forms_equal_varlen_func():
    cu = cu_seqlens(LENS_K)
    qkv = randn((sum(LENS_K), 3, 4, 24), torch.float32, "cpu", requires_grad=True)
    out = fa.flash_attn_varlen_qkvpacked_func(qkv, cu, 11, causal=True)
    q, k, v = (qkv.detach()[:, i].requires_grad_() for i in range(3))
    ref = fa.flash_attn_varlen_func(q, k, v, cu, cu, 11, 11, causal=True)
    assert torch.equal(out, ref)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref.backward(dout)
    assert torch.equal(qkv.grad, torch.stack([q.grad, k.grad, v.grad], dim=1))
    cu_q = cu_seqlens(LENS_Q)
    kv = randn((sum(LENS_K), 2, 2, 24), torch.float32, "cpu")
    q = randn((sum(LENS_Q), 4, 24), torch.float32, "cpu")
    assert torch.equal(fa.flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu, 7, 11, window_size=(2, 1)),
                       fa.flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_q, cu, 7, 11, window_size=(2, 1)))


@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_varlen_paged_kv_equals_packed(block_size):
    """k/v as pages + block_table: sequence b's keys are pages' positions 0 .. len_b - 1."""
    dense_k, dense_v = randn((4, 11, 2, 24), torch.float32, "cpu"), randn((4, 11, 2, 24), torch.float32, "cpu")
    k_pages, table = to_paged(dense_k, block_size)
    v_pages, _ = to_paged(dense_v, block_size, table=table)
    q = randn((sum(LENS_Q), 4, 24), torch.float32, "cpu")
    cu_q, cu_k = cu_seqlens(LENS_Q), cu_seqlens(LENS_K)
    packed_k = torch.cat([dense_k[b, :n] for b, n in enumerate(LENS_K)])
    packed_v = torch.cat([dense_v[b, :n] for b, n in enumerate(LENS_K)])
    out = fa.flash_attn_varlen_func(q, k_pages, v_pages, cu_q, cu_k, 7, 11, causal=True, block_table=table)
    assert torch.equal(out, fa.flash_attn_varlen_func(q, packed_k, packed_v, cu_q, cu_k, 7, 11, causal=True))


def _cache(batch, smax=16):
    return randn((batch, smax, 2, 24), torch.float32, "cpu"), randn((batch, smax, 2, 24), torch.float32, "cpu")


@pytest.mark.parametrize("paged", [False, True])
def test_with_kvcache_vs_oracle(paged):
    kc, vc = _cache(3)
    q, k, v = randn((3, 2, 4, 24), torch.float32, "cpu"), *(randn((3, 2, 2, 24), torch.float32, "cpu") for _ in "kv")
    seqlens = torch.tensor([0, 5, 14], dtype=torch.int32)
    out_hi, lse_hi = reference.attention_with_kvcache(q, kc.clone(), vc.clone(), k, v, cache_seqlens=seqlens,
                                                      causal=True, softcap=2.0)
    table = None
    if paged:
        kc, table = to_paged(kc, 5)
        vc, _ = to_paged(vc, 5, table=table)
    out, lse = fa.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens, block_table=table, causal=True,
                                         softcap=2.0, num_splits=2, return_softmax_lse=True)
    assert_close("out", out, out_hi, None)
    assert_close("softmax_lse", lse, lse_hi, None, dtype=torch.float32)
    written = kc[table[1, 1].long(), 0] if paged else kc[1, 5]  # position 5 of row 1 (page 1 slot 0 when paged)
    assert torch.equal(written, k[1, 0])


def test_with_kvcache_defaults_and_cache_seqlens_forms():
    """causal defaults to False (flash-attn's); an int and a tensor length agree; None = whole cache."""
    kc, vc = _cache(2)
    q = randn((2, 3, 4, 24), torch.float32, "cpu")
    by_int = fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=9)
    by_tensor = fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([9, 9], dtype=torch.int32))
    assert torch.equal(by_int, by_tensor)
    assert torch.equal(by_int, tileattn.attention_with_kvcache(q, kc, vc, cache_seqlens=9, causal=False))
    assert not torch.equal(by_int, tileattn.attention_with_kvcache(q, kc, vc, cache_seqlens=9, causal=True))
    whole = fa.flash_attn_with_kvcache(q, kc, vc)
    assert torch.equal(whole, tileattn.attention_with_kvcache(q, kc, vc, cache_seqlens=16, causal=False))


def test_with_kvcache_cache_batch_idx():
    """Query row b reads and appends to cache row cache_batch_idx[b]; other rows stay untouched."""
    kc, vc = _cache(4)
    idx = torch.tensor([2, 0], dtype=torch.int32)
    q, k, v = randn((2, 1, 4, 24), torch.float32, "cpu"), *(randn((2, 1, 2, 24), torch.float32, "cpu") for _ in "kv")
    seqlens = torch.tensor([3, 7], dtype=torch.int32)
    kr, vr = kc[idx.long()].clone(), vc[idx.long()].clone()
    before = kc.clone()
    out = fa.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens, cache_batch_idx=idx, causal=True)
    assert torch.equal(out, tileattn.attention_with_kvcache(q, kr, vr, k, v, cache_seqlens=seqlens))
    assert torch.equal(kc[2, 3], k[0, 0]) and torch.equal(kc[0, 7], k[1, 0])
    assert torch.equal(kc[1], before[1]) and torch.equal(kc[3], before[3])


def test_dropout_follows_tileattn_stream():
    q, k, v = make_qkv(1, 6, 6, 2, 2, 16)
    torch.manual_seed(3)
    out = fa.flash_attn_func(q, k, v, dropout_p=0.3)
    torch.manual_seed(3)
    assert torch.equal(out, tileattn.attention(q, k, v, dropout_p=0.3))
    assert not torch.equal(out, fa.flash_attn_func(q, k, v))


def test_errors_name_flash_attn_arguments():
    q, k, v = make_qkv(1, 4, 4, 2, 2, 16)
    with pytest.raises(NotImplementedError, match="tileattn: return_attn_probs=True with dropout_p > 0"):
        fa.flash_attn_func(q, k, v, dropout_p=0.1, return_attn_probs=True)
    with pytest.raises(ValueError, match="tileattn: window_size must have entries >= -1"):
        fa.flash_attn_func(q, k, v, window_size=(-2, 0))
    with pytest.raises(TypeError, match="tileattn: softmax_scale must be"):
        fa.flash_attn_func(q, k, v, softmax_scale="0.1")
    with pytest.raises(TypeError, match="tileattn: return_attn_probs must be a bool"):
        fa.flash_attn_func(q, k, v, return_attn_probs=1)
    with pytest.raises(ValueError, match=r"tileattn: qkv must have shape \(B, S, 3, H, D\)"):
        fa.flash_attn_qkvpacked_func(torch.randn(1, 4, 2, 2, 16))
    with pytest.raises(ValueError, match=r"tileattn: kv must have shape \(total_k, 2, Hkv, D\)"):
        fa.flash_attn_varlen_kvpacked_func(q[0], torch.randn(4, 3, 2, 16), *[cu_seqlens([4])] * 2, 4, 4)
    kc, vc = _cache(1)
    with pytest.raises(ValueError, match="tileattn: cache_seqlens is required when k and v are given"):
        fa.flash_attn_with_kvcache(q, kc, vc, k, v)
    with pytest.raises(ValueError, match=r"tileattn: cache_batch_idx must lie in \[0, 0\], got \[1\]"):
        fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=1, cache_batch_idx=torch.tensor([1], dtype=torch.int32))
    with pytest.raises(ValueError, match="tileattn: rotary_cos/rotary_sin rotate the new k"):
        fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=1, rotary_cos=torch.ones(8, 4), rotary_sin=torch.ones(8, 4))
    with pytest.raises(ValueError, match="tileattn: cache_leftpad must be <= cache_seqlens"):
        fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=1, cache_leftpad=torch.tensor([2], dtype=torch.int32))


# ----------------------------------------------------------- decode features (rotary, batch index, leftpad)

DECODE = {  # keywords of attention_with_kvcache beyond the cache; "paged": page size 5
    "rotary_causal_sn3": dict(rotary=16, causal=True),
    "rotary_interleaved_noncausal": dict(rotary=24, interleaved=True, causal=False),
    "rotary_window": dict(rotary=8, causal=False, window=(4, 1)),
    "leftpad_alibi": dict(leftpad=True, causal=True, alibi=True),
    "leftpad_paged_window": dict(leftpad=True, paged=True, causal=True, window=(6, 0)),
    "batch_idx": dict(batch_idx=True, causal=True),
    "all_three": dict(rotary=16, batch_idx=True, leftpad=True, causal=True, softcap=2.0),
}


def _decode_args(case):
    """(cache tensors, keywords for tileattn and the oracle) of DECODE[case]: 3 query rows,
    Sn 3, caches of 16 slots (5 cache rows with a batch index)."""
    c = DECODE[case]
    kc, vc = _cache(5 if c.get("batch_idx") else 3)
    kw = dict(cache_seqlens=torch.tensor([4, 0, 9], dtype=torch.int32), causal=c["causal"],
              window=c.get("window", (-1, -1)), softcap=c.get("softcap", 0.0))
    if c.get("rotary"):
        angles = torch.rand(32, c["rotary"] // 2) * 6
        kw.update(rotary_cos=angles.cos(), rotary_sin=angles.sin(), rotary_interleaved=c.get("interleaved", False))
    if c.get("batch_idx"):
        kw["cache_batch_idx"] = torch.tensor([3, 0, 4], dtype=torch.int32)
    if c.get("leftpad"):
        kw["cache_leftpad"] = torch.tensor([2, 0, 9], dtype=torch.int32)
    if c.get("alibi"):
        kw["alibi_slopes"] = torch.rand(3, 4)
    return kc, vc, c.get("paged", False), kw


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("case", sorted(DECODE))
def test_decode_features_vs_oracle(case, backend, device):
    """Triton runs on the test device (the interpreter on CPU); the oracle on CPU."""
    kc, vc, paged, kw = _decode_args(case)
    q, k, v = randn((3, 3, 4, 24), torch.float32, "cpu"), *(randn((3, 3, 2, 24), torch.float32, "cpu") for _ in "kv")
    k_ref, v_ref = kc.clone(), vc.clone()
    out_hi, lse_hi = reference.attention_with_kvcache(q, k_ref, v_ref, k, v, **kw)
    dev = device if backend == "triton" else "cpu"
    q, k, v, kc, vc = (t.to(dev) for t in (q, k, v, kc, vc))
    kw = {n: t.to(dev) if isinstance(t, torch.Tensor) else t for n, t in kw.items()}
    table = None
    if paged:
        kc, table = to_paged(kc, 5)
        vc, _ = to_paged(vc, 5, table=table)
    out, lse = tileattn.attention_with_kvcache(q, kc, vc, k, v, block_table=table, return_lse=True,
                                               backend=backend, **kw)
    assert_close("out", out, out_hi, None)
    assert_close("lse", lse, lse_hi, None, dtype=torch.float32)
    if not paged:  # the (rotated) new keys landed in the right rows and slots, nothing else moved
        assert_close("k_cache", kc, k_ref, None)
        assert torch.equal(vc.cpu(), v_ref)


def test_decode_features_through_flash_attn_names():
    """flash_attn_with_kvcache passes rotary (interleaved by default), batch index and leftpad on."""
    kc, vc, _, kw = _decode_args("all_three")
    q, k, v = randn((3, 3, 4, 24), torch.float32, "cpu"), *(randn((3, 3, 2, 24), torch.float32, "cpu") for _ in "kv")
    kw["rotary_interleaved"] = True
    ref = tileattn.attention_with_kvcache(q, kc.clone(), vc.clone(), k, v, **kw)
    out = fa.flash_attn_with_kvcache(q, kc, vc, k, v, kw["rotary_cos"], kw["rotary_sin"], kw["cache_seqlens"],
                                     kw["cache_batch_idx"], kw["cache_leftpad"], causal=True, softcap=2.0)
    assert torch.equal(out, ref)


def test_leftpad_equals_the_cache_shifted_left():
    """Leftpad p over slots p..n-1 is the attention of those keys moved to 0..n-p-1 (causal,
    window and ALiBi distances are relative), up to fp32 rounding."""
    kc, vc = _cache(1)
    q, slopes = randn((1, 2, 4, 24), torch.float32, "cpu"), torch.rand(4)
    kw = dict(alibi_slopes=slopes, window=(4, 0))
    pad = torch.tensor([5], dtype=torch.int32)
    out = tileattn.attention_with_kvcache(q, kc, vc, cache_seqlens=12, cache_leftpad=pad, **kw)
    shifted = tileattn.attention_with_kvcache(q, kc[:, 5:].contiguous(), vc[:, 5:].contiguous(), cache_seqlens=7, **kw)
    assert_close("leftpad vs shifted", out, shifted.double(), None)

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", sorted(CASES))
def test_gpu_func_and_paged_kvcache_vs_oracle(case, dtype):
    q, k, v = make_qkv(2, 97, 129, 8, 2, 128, dtype=dtype, layout="bhsd")
    kw, ref = _keywords(case, 2, 8)
    gpu_kw = {n: t.cuda() if isinstance(t, torch.Tensor) else t for n, t in kw.items()}
    out = fa.flash_attn_func(q.cuda(), k.cuda(), v.cuda(), **gpu_kw)
    out_lo, _ = reference.attention(q, k, v, **ref, upcast=False)
    assert_close("out", out, reference.attention(q, k, v, **ref)[0], None if dtype == torch.float32 else out_lo)
    kc, vc = k[:, :128].contiguous(), v[:, :128].contiguous()
    seqlens = torch.tensor([0, 127], dtype=torch.int32)
    hi, _ = reference.attention_with_kvcache(q[:, :1], kc, vc, cache_seqlens=seqlens, **ref)
    lo, _ = reference.attention_with_kvcache(q[:, :1], kc, vc, cache_seqlens=seqlens, **ref, upcast=False)
    kp, table = to_paged(kc.cuda(), 16)
    vp, _ = to_paged(vc.cuda(), 16, table=table)
    out = fa.flash_attn_with_kvcache(q[:, :1].cuda(), kp, vp, cache_seqlens=seqlens.cuda(), block_table=table,
                                     **{n: gpu_kw[n] for n in gpu_kw if n != "dropout_p"})
    assert_close("kvcache out", out, hi, None if dtype == torch.float32 else lo)
