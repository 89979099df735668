"""Issue 17's classes 1-5, each a rule and a matrix of cases (class 6, argument types, is
test_errors.py's table). Through the public API on every backend where the rule lives in
api / _checks (cpu, reference, and triton -- the interpreter on CPU tensors), and on the CPU
backend and the oracle where it lives in the numerics. Comparisons with the float64 oracle
follow RELIABILITY.md's rule (``helpers.assert_close``).

1. strides: non-contiguous sinks / alibi_slopes / cu_seqlens / cache_seqlens / block_table
   give the contiguous answer bitwise; a cache whose last dim is not unit-stride, or an
   expanded (stride-0) cache that would be written, raises and writes nothing; a cache that
   is a view into a larger buffer is written in the view and nowhere else.
2. scale and magnitude: a negative scale, and fp32 scores of ~1e6, match the oracle.
3. NaN containment: a non-finite key or value reaches exactly the rows that keep it
   (reference.py's [Note] hidden keys); NaN appears exactly where the oracle has it.
4. sinks at the limits: sinks = -inf gives dsinks = 0; softcap = inf is no cap.
5. max_seqlen_q/k below the real lengths raise where checkable without a sync.
"""

import os

import pytest
import torch

import tileattn
from tileattn import _checks, kvcache, reference
from tileattn.backends import cpu
from tileattn.backends.cpu import decode
from tileattn.score import ScoreSpec
from helpers import assert_close, cu_seqlens, make_qkv, randn

# These cases build CPU tensors: "triton" runs them in the interpreter (conftest sets
# TRITON_INTERPRET=1 without CUDA). On a GPU machine run them with TRITON_INTERPRET=1.
BACKENDS = ("cpu", "reference", pytest.param("triton", marks=pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors through Triton need TRITON_INTERPRET=1")))
NAN, INF = float("nan"), float("inf")


def _strided(t, fill):
    """Same values as ``t`` in a non-contiguous view (every other element of its last dim);
    the gaps hold ``fill``, so a reader that assumes contiguity gets garbage."""
    buf = torch.full((*t.shape[:-1], 2 * t.shape[-1]), fill, dtype=t.dtype)
    buf[..., ::2] = t
    return buf[..., ::2]


def _column_major(t):
    return t.t().contiguous().t()


# ----------------------------------------------------------------------------- 1. strides


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_per_head_tensors(backend):
    q, k, v = make_qkv(2, 9, 13, 4, 2, 16)
    sinks, slopes = torch.randn(4), torch.rand(2, 4)
    base = tileattn.attention(q, k, v, causal=True, sinks=sinks, alibi_slopes=slopes, return_lse=True,
                              backend=backend)
    for s, a in ((_strided(sinks, 1e4), _column_major(slopes)), (sinks, _strided(slopes, -7.0))):
        assert not (s.is_contiguous() and a.is_contiguous())
        got = tileattn.attention(q, k, v, causal=True, sinks=s, alibi_slopes=a, return_lse=True, backend=backend)
        assert all(torch.equal(x, y) for x, y in zip(got, base))
    heads = tileattn.attention(q, k, v, alibi_slopes=_strided(slopes[0], 3.0), backend=backend)
    assert torch.equal(heads, tileattn.attention(q, k, v, alibi_slopes=slopes[0].clone(), backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_cu_seqlens(backend):
    lens_q, lens_k = [3, 0, 7, 2], [5, 4, 0, 9]
    cq, ck = cu_seqlens(lens_q), cu_seqlens(lens_k)
    q, k, v = (torch.randn(sum(n), h, 16) for n, h in ((lens_q, 4), (lens_k, 2), (lens_k, 2)))
    sinks = torch.randn(4)
    base = tileattn.attention_varlen(q, k, v, cq, ck, 7, 9, causal=True, sinks=sinks, return_lse=True,
                                     backend=backend)
    for a, b in ((_strided(cq, 999), ck), (cq, _strided(ck, -5)), (_strided(cq, 7), _strided(ck, 7))):
        got = tileattn.attention_varlen(q, k, v, a, b, 7, 9, causal=True, sinks=_strided(sinks, NAN),
                                        return_lse=True, backend=backend)
        assert all(torch.equal(x, y) for x, y in zip(got, base))


def _cache_call(backend, q, kc, vc, k, v, lens, table):
    return tileattn.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, block_table=table, return_lse=True,
                                           backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_cache_seqlens_and_block_table(backend):
    q, k, v = torch.randn(3, 2, 4, 16), torch.randn(3, 2, 2, 16), torch.randn(3, 2, 2, 16)
    k_dense, v_dense = torch.randn(3, 20, 2, 16), torch.randn(3, 20, 2, 16)
    kp, vp, table = kvcache.paged_from_contiguous(k_dense, v_dense, 4, num_blocks=19, shuffle=True,
                                                  generator=torch.Generator().manual_seed(3))
    lens = torch.tensor([5, 0, 17], dtype=torch.int32)
    runs = []
    for seqlens, tbl in ((lens, table), (_strided(lens, 10**6), table), (lens, _column_major(table)),
                         (_strided(lens, -3), _strided(table, 10**6))):
        kc, vc = kp.clone(), vp.clone()
        runs.append((*_cache_call(backend, q, kc, vc, k, v, seqlens, tbl), kc, vc))
    for run in runs[1:]:
        assert all(torch.equal(x, y) for x, y in zip(run, runs[0]))
    kc, vc = k_dense.clone(), v_dense.clone()  # contiguous cache, strided lengths
    out = _cache_call(backend, q, kc, vc, k, v, _strided(lens, 10**6), None)
    kc2, vc2 = k_dense.clone(), v_dense.clone()
    assert all(torch.equal(x, y) for x, y in zip(out, _cache_call(backend, q, kc2, vc2, k, v, lens, None)))
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_layout_errors_write_nothing(backend):
    q, k, v = torch.randn(2, 1, 4, 8), torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8)
    wide = torch.randn(2, 10, 2, 16)
    strided_last = wide[..., ::2]  # last-dim stride 2
    before = wide.clone()
    for kc, vc in ((strided_last, torch.randn(2, 10, 2, 8)), (torch.randn(2, 10, 2, 8), strided_last)):
        with pytest.raises(ValueError, match="^tileattn: [kv]_cache has strides .* unit stride in its last dim"):
            tileattn.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=3, backend=backend)
    assert torch.equal(wide, before)
    expanded = torch.randn(1, 10, 2, 8).expand(2, 10, 2, 8)
    src = expanded.clone()
    with pytest.raises(ValueError, match="^tileattn: k_cache is an expanded view"):
        tileattn.attention_with_kvcache(q, expanded, torch.randn(2, 10, 2, 8), k, v, cache_seqlens=3, backend=backend)
    assert torch.equal(expanded, src)
    vc = torch.randn(2, 10, 2, 8)  # read-only: an expanded cache is just a broadcast, and is served
    got = tileattn.attention_with_kvcache(q, expanded, vc, cache_seqlens=4, backend=backend)
    assert torch.equal(got, tileattn.attention_with_kvcache(q, src, vc, cache_seqlens=4, backend=backend))


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_view_written_in_place_only(backend, paged):
    """A cache that is a unit-stride view into a larger buffer: the new keys land in the view
    (the caller's tensor), nothing outside it changes, and the result is the contiguous one."""
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8)
    shape = (7, 4, 2, 8) if paged else (2, 12, 2, 8)
    table = torch.tensor([[6, 0, 3], [1, 5, 2]], dtype=torch.int32) if paged else None
    lens = torch.tensor([4, 9], dtype=torch.int32)
    buf_k, buf_v = torch.full((*shape[:-1], 20), 1e4), torch.full((*shape[:-1], 20), -1e4)
    kc, vc = buf_k[..., 5:13], buf_v[..., 11:19]
    kc.copy_(torch.randn(shape)), vc.copy_(torch.randn(shape))
    dense_k, dense_v = kc.clone(), vc.clone()
    outside = [(b.clone(), sl) for b, sl in ((buf_k, (slice(0, 5), slice(13, 20))), (buf_v, (slice(0, 11), slice(19, 20))))]
    got = _cache_call(backend, q, kc, vc, k, v, lens, table)
    want = _cache_call(backend, q, dense_k, dense_v, k, v, lens, table)
    assert all(torch.equal(x, y) for x, y in zip(got, want))
    assert torch.equal(kc, dense_k) and torch.equal(vc, dense_v)  # the writes landed in the views
    for (old, slices), buf in zip(outside, (buf_k, buf_v)):
        for sl in slices:
            assert torch.equal(buf[..., sl], old[..., sl]), "written outside the cache view"


# ----------------------------------------------------------------------------- 2. scale and magnitude


def _oracle_grads(q, k, v, dout, **kw):
    """(out, lse, dq, dk, dv) of the float64 oracle."""
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    with torch.enable_grad():
        out, lse = reference.attention(*leaves, **kw)
        grads = torch.autograd.grad(out, leaves, dout.double())
    return (out, lse, *grads)


def _api_grads(q, k, v, backend, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, lse = tileattn.attention(*leaves, return_lse=True, backend=backend, **kw)
    dout = torch.randn_like(out)
    out.backward(dout)
    return (out, lse, *(x.grad for x in leaves)), dout


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("case", ["negative", "negative_causal_sinks", "negative_softcap", "negative_large"])
def test_negative_scale(case, backend):
    q, k, v = make_qkv(2, 37, 45, 4, 2, 32)
    kw = dict(scale=-0.4)
    if case == "negative_causal_sinks":
        kw.update(causal=True, sinks=torch.randn(4))
    if case == "negative_softcap":
        kw.update(softcap=3.0, window=(9, 4))
    if case == "negative_large":  # |s2| ~ 200: far past the fixed-max bound of 64
        kw.update(scale=-4.0)
    got, dout = _api_grads(q, k, v, backend, **kw)
    ref = _oracle_grads(q, k, v, dout, **kw)
    for name, g, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        assert_close(name, g, r, None, c=2.0 if name in ("out", "lse") else 3.0, dtype=torch.float32)


def test_negative_scale_cpu_fixed_max_path():
    """The forward's fixed-max path ([Note] fixed reference max) bounds |s| by |scale|."""
    q, k, v = make_qkv(1, 20, 30, 2, 2, 16)
    q, k = q * 4, k * 4  # |s2| up to ~250 with |scale| = 1: the running max is needed
    spec = ScoreSpec(scale=-1.0)
    out, lse = cpu.forward(q, k, v, spec)
    ref_out, ref_lse = reference.attention(q, k, v, scale=-1.0)
    assert_close("out", out, ref_out, None)
    assert_close("lse", lse, ref_lse, None, dtype=torch.float32)


def _huge_inputs(S, H, D):
    """fp32 q, k, v whose rows' top score is ~1e6 above the rest: key 0 = (1e3, 0, ...), query
    i = (a_i, noise) with a_i spread over [1e3, 2e3], other keys O(1). The softmax is exactly
    one-hot in fp32 and float64 alike (well conditioned), and the rows' lse values spread over
    many fp32 roundings (a saved lse that loses ~ulp(1e6) = 0.06 shows in P = exp(s - lse))."""
    q, k, v = make_qkv(1, S, S, H, 1, D)
    q[..., 0] = torch.linspace(1e3, 2e3, S)[:, None]
    k[:, 0] = 0.0
    k[:, 0, :, 0] = 1e3
    k[:, 1:, :, 0] = torch.rand(S - 1, 1) * 2 - 1
    return q, k, v


@pytest.mark.parametrize("scale", [0.5, 1.7])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sinks", [False, True])
def test_huge_scores_fp32_cpu(causal, sinks, scale):
    """|score| ~ 1e6 in fp32 ([Note] large lse in backward.py): out, lse, dv, dsinks match the
    oracle by the fp32 rule. The oracle's dq, dk are exactly 0 there (one-hot rows: dS = 0)
    and ours are fp32 noise of dP - delta: bounded by 1e-5 of |dout| |v| |k| |q| scale, as
    test_cpu_backend's one-key case."""
    S, H, D = 48, 2, 4
    q, k, v = _huge_inputs(S, H, D)
    s_leaf = (torch.randn(H) * 1e5).requires_grad_() if sinks else None
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, lse = tileattn.attention(*leaves, causal=causal, scale=scale, sinks=s_leaf, return_lse=True, backend="cpu")
    dout = torch.randn_like(out)
    out.backward(dout)
    s64 = None if s_leaf is None else s_leaf.detach().double().requires_grad_()
    leaves64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    with torch.enable_grad():
        ref_out, ref_lse = reference.attention(*leaves64, causal=causal, scale=scale, sinks=s64)
        wrt = leaves64 + ([s64] if s64 is not None else [])
        ref_grads = torch.autograd.grad(ref_out, wrt, dout.double())
    assert lse.abs().min() > 4e5
    assert_close("out", out, ref_out, None)
    assert_close("lse", lse, ref_lse, None, dtype=torch.float32)
    assert_close("dv", leaves[2].grad, ref_grads[2], None)
    if s_leaf is not None:
        assert torch.equal(s_leaf.grad, ref_grads[3].float())  # exactly 0: the sinks are far below
    noise = 1e-5 * dout.abs().max() * v.abs().max() * q.abs().max() * k.abs().max() * scale
    for name, g, r in (("dq", leaves[0].grad, ref_grads[0]), ("dk", leaves[1].grad, ref_grads[1])):
        assert r.abs().max() <= noise and (g.double() - r).abs().max() <= noise, name


# ----------------------------------------------------------------------------- 3. NaN containment


def _nan_close(name, got, hi, lo=None, dtype=None):
    """NaN exactly where the oracle has NaN; the rest by the tolerance rule."""
    got_nan, hi_nan = got.isnan(), hi.isnan()
    assert torch.equal(got_nan, hi_nan), f"{name}: NaN at {int(got_nan.sum())} places, oracle {int(hi_nan.sum())}"
    keep = ~hi_nan
    assert_close(name, got[keep], hi[keep], None if lo is None else lo[keep], dtype=dtype or got.dtype)


HIDERS = {  # how key column J = 20 of Sk = 32 (Sq = 32) is hidden from some rows, and which rows keep it
    "causal": (dict(causal=True), lambda i: i >= 20),
    "window": (dict(window=(4, 2)), lambda i: 18 <= i <= 24),
    "bool_mask": (dict(mask=True), lambda i: i % 3 == 0),
}


def _hidden_setup(hider, where, dtype=torch.float32):
    B, S, Hq, Hkv, D = 1, 32, 2, 1, 16
    q, k, v = make_qkv(B, S, S, Hq, Hkv, D, dtype=dtype)
    kw, keeps = HIDERS[hider]
    kw = dict(kw)
    if kw.pop("mask", False):
        mask = torch.rand(B, 1, S, S) > 0.3
        mask[..., 20] = torch.tensor([keeps(i) for i in range(S)])
        kw["attn_mask"] = mask
    (k if where == "k" else v)[0, 20, 0, 3] = NAN
    rows = torch.tensor([keeps(i) for i in range(S)])
    return q, k, v, kw, rows


@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("hider", list(HIDERS))
def test_oracle_nan_containment_by_reasoning(hider, where):
    """The oracle itself: rows that do not keep key 20 equal the answer with that key's NaN
    replaced by a finite value (they never read it), in value and in every gradient; rows that
    keep it are NaN in out and lse."""
    q, k, v, kw, rows = _hidden_setup(hider, where)
    clean_k, clean_v = k.nan_to_num(0.5), v.nan_to_num(0.5)
    dout = torch.randn(1, 32, 2, 16, dtype=torch.float64)
    out, lse, dq, dk, dv = _oracle_grads(q, k, v, dout, **kw)
    c_out, c_lse, c_dq, c_dk, c_dv = _oracle_grads(q, clean_k, clean_v, dout, **kw)
    assert out[0, rows].isnan().any(-1).all() and not out[0, ~rows].isnan().any()
    if where == "k":
        assert lse[0, :, rows].isnan().all()
    torch.testing.assert_close(out[0, ~rows], c_out[0, ~rows], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dq[0, ~rows], c_dq[0, ~rows], rtol=1e-12, atol=1e-12)
    assert dq[0, rows].isnan().any(-1).all()
    other = torch.arange(32) != 20
    if not rows.any():
        return
    # keys kept only by clean rows have the clean gradients; key 20's own k/v gradient is NaN
    # wherever a NaN row reaches it (its dk through the rows that keep it)
    reached = torch.zeros(32, dtype=torch.bool)
    for i in torch.nonzero(rows).flatten().tolist():
        reached |= _kept_by(kw, i)
    fine = other & ~reached
    torch.testing.assert_close(dk[0, fine], c_dk[0, fine], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dv[0, fine], c_dv[0, fine], rtol=1e-12, atol=1e-12)
    assert not dk[0, fine].isnan().any() and dk[0, reached].isnan().any()


def _kept_by(kw, i, sk=32, sq=32):
    """bool (Sk,): keys row i keeps under kw's causal / window / bool mask (Sq = Sk here)."""
    j = torch.arange(sk)
    keep = torch.ones(sk, dtype=torch.bool)
    left, right = kw.get("window", (-1, -1))
    if kw.get("causal"):
        right = 0
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    if "attn_mask" in kw:
        keep &= kw["attn_mask"][0, 0, i]
    return keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("hider", list(HIDERS))
def test_cpu_nan_containment(hider, where, dtype, monkeypatch):
    """CPU forward and backward (small tiles: the NaN key sits in a band-edge tile) agree with
    the oracle's NaN pattern exactly and with its values elsewhere."""
    from tileattn.backends.cpu import _tiles
    monkeypatch.setattr(_tiles, "BLOCK_ROWS", 8)
    monkeypatch.setattr(_tiles, "BLOCK_N", 16)
    q, k, v, kw, rows = _hidden_setup(hider, where, dtype)
    got, dout = _api_grads(q, k, v, "cpu", **kw)
    hi = _oracle_grads(q, k, v, dout, **kw)
    lo = None
    if dtype != torch.float32:
        lo_leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        with torch.enable_grad():
            o, l = reference.attention(*lo_leaves, upcast=False, **kw)
            lo = (o, l, *torch.autograd.grad(o, lo_leaves, dout.to(dtype)))
    assert not got[0][0, ~rows].isnan().any() and got[0][0, rows].isnan().any(-1).all()
    for n, name in enumerate(("out", "lse", "dq", "dk", "dv")):
        _nan_close(name, got[n], hi[n], None if lo is None else lo[n], dtype=dtype)


def test_float_mask_neg_inf_does_not_hide_nan():
    """A float mask of -inf is a score term, not a keep test: NaN + -inf = NaN (oracle and CPU)."""
    q, k, v = make_qkv(1, 8, 8, 2, 2, 16)
    k[0, 5, 1, 0] = NAN
    bias = torch.zeros(1, 1, 8, 8)
    bias[..., 5] = -INF
    ref_out, _ = reference.attention(q, k, v, attn_mask=bias)
    out = tileattn.attention(q, k, v, attn_mask=bias, backend="cpu")
    assert ref_out[0, :, 1].isnan().all() and not ref_out[0, :, 0].isnan().any()
    assert torch.equal(out.isnan(), ref_out.isnan())


@pytest.mark.parametrize("block_size", [None, 3])
@pytest.mark.parametrize("where", ["k", "v"])
def test_decode_masked_new_key_nan(where, block_size, monkeypatch):
    """Sn = 4 new tokens, causal: new key 2 is hidden from new rows 0, 1. A NaN in it (and one
    in a cached key the window hides) reaches rows 2, 3 only; the oracle agrees."""
    monkeypatch.setattr(decode, "BLOCK_N", 4)
    B, Sn, Hq, Hkv, D = 2, 4, 4, 2, 16
    lens = torch.tensor([6, 11], dtype=torch.int32)
    q = randn((B, Sn, Hq, D), torch.float32, "cpu")
    k_new, v_new = randn((B, Sn, Hkv, D), torch.float32, "cpu"), randn((B, Sn, Hkv, D), torch.float32, "cpu")
    (k_new if where == "k" else v_new)[:, 2, 1, 5] = NAN
    k_dense, v_dense = randn((B, 16, Hkv, D), torch.float32, "cpu"), randn((B, 16, Hkv, D), torch.float32, "cpu")
    (k_dense if where == "k" else v_dense)[1, 0, 0, 0] = NAN  # row 1's key 0: outside window (6, ...) of every new row
    kw = dict(window=(6, -1))
    ref_out, ref_lse = reference.attention_with_kvcache(q, k_dense.clone(), v_dense.clone(), k_new, v_new,
                                                        cache_seqlens=lens, **kw)
    if block_size is None:
        kc, vc, table = k_dense.clone(), v_dense.clone(), None
    else:
        kc, vc, table = kvcache.paged_from_contiguous(k_dense, v_dense, block_size, shuffle=True)
    out, lse = tileattn.attention_with_kvcache(q, kc, vc, k_new, v_new, cache_seqlens=lens, block_table=table,
                                               num_splits=2, return_lse=True, backend="cpu", **kw)
    assert ref_out[:, :2].isfinite().all() and ref_out[:, 2:, :2].isfinite().all()  # kv head 0 is clean
    assert ref_out[:, 2:, 2:].isnan().any(-1).all()
    clean_out, _ = reference.attention_with_kvcache(q, k_dense.nan_to_num(0.5), v_dense.nan_to_num(0.5),
                                                    k_new.nan_to_num(0.5), v_new.nan_to_num(0.5), cache_seqlens=lens, **kw)
    fine = ~ref_out.isnan()  # by reasoning: what does not read the NaN equals the clean answer
    torch.testing.assert_close(ref_out[fine], clean_out[fine], rtol=1e-12, atol=1e-12)
    _nan_close("out", out, ref_out)
    _nan_close("lse", lse, ref_lse, dtype=torch.float32)


# ----------------------------------------------------------------------------- 4. sinks and softcap at the limits


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("causal", [False, True])
def test_sinks_neg_inf_gives_zero_dsinks(backend, causal):
    """A head with sink -inf opts out: out and dq/dk/dv equal the no-sink call, dsinks = 0
    (never NaN), also for rows that keep nothing (causal with Sq > Sk)."""
    q, k, v = make_qkv(2, 19, 11, 4, 2, 16)
    sinks = torch.tensor([-INF, 0.3, -INF, -1.0]).requires_grad_()
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, lse = tileattn.attention(*leaves, causal=causal, sinks=sinks, return_lse=True, backend=backend)
    dout = torch.randn_like(out)
    out.backward(dout)
    assert sinks.grad.isfinite().all() and (sinks.grad[[0, 2]] == 0).all()
    plain = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out0 = tileattn.attention(*plain, causal=causal, backend=backend)
    out0.backward(dout)
    for h in (0, 2):
        torch.testing.assert_close(out[:, :, h], out0[:, :, h], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(leaves[0].grad[:, :, h], plain[0].grad[:, :, h], rtol=1e-5, atol=1e-6)
    if causal:  # rows 0..7 keep nothing: lse is the sink logit (-inf for heads 0, 2)
        assert (lse[:, [0, 2], :8] == -INF).all() and (out[:, :8] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_inf_is_no_cap(backend):
    q, k, v = make_qkv(1, 9, 12, 2, 1, 16)
    assert torch.equal(tileattn.attention(q, k, v, softcap=INF, backend=backend),
                       tileattn.attention(q, k, v, softcap=0.0, backend=backend))


# ----------------------------------------------------------------------------- 5. max_seqlen


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["q", "k"])
def test_max_seqlen_too_small(which, backend):
    lens_q, lens_k = [3, 9, 1], [4, 2, 12]
    cq, ck = cu_seqlens(lens_q), cu_seqlens(lens_k)
    q, k, v = (torch.randn(sum(n), h, 16) for n, h in ((lens_q, 2), (lens_k, 2), (lens_k, 2)))
    max_q, max_k = (8, 12) if which == "q" else (9, 11)  # one short of the longest
    with pytest.raises(ValueError, match=f"^tileattn: max_seqlen_{which}=.* smaller than the longest"):
        tileattn.attention_varlen(q, k, v, cq, ck, max_q, max_k, backend=backend)
    out = tileattn.attention_varlen(q, k, v, cq, ck, 9, 12, backend=backend)  # exact maxima: fine
    assert torch.equal(out, tileattn.attention_varlen(q, k, v, cq, ck, 50, 60, backend=backend))  # loose bounds too


def test_max_seqlen_checked_without_sync(monkeypatch):
    """Where the offsets cannot be read (a GPU tensor without TILEATTN_DEBUG, simulated), the
    host-known bound B * max_seqlen >= total tokens still catches what it can."""
    monkeypatch.setattr(_checks, "debug_checks", lambda t: False)
    cq = cu_seqlens([3, 9, 1])
    q = torch.randn(13, 2, 16)
    with pytest.raises(ValueError, match="^tileattn: max_seqlen_q=4 is smaller than the longest sequence"):
        _checks.varlen(cq, cq, 4, 9, q, q)  # 3 * 4 < 13
    assert _checks.varlen(cq, cq, 5, 9, q, q)[2:] == (5, 9)  # undetectable without a read: accepted
    with pytest.raises(TypeError, match="^tileattn: max_seqlen_k must be an int"):
        _checks.varlen(cq, cq, 5, 9.0, q, q)
    monkeypatch.setattr(_checks, "debug_checks", lambda t: True)  # TILEATTN_DEBUG=1: the real check
    with pytest.raises(ValueError, match="^tileattn: max_seqlen_q=5 is smaller than the longest sequence"):
        _checks.varlen(cq, cq, 5, 9, q, q)


def test_debug_checks_env(monkeypatch):
    t = torch.zeros(1)
    assert _checks.debug_checks(t)  # CPU tensors: always
    meta = torch.zeros(1, device="meta")
    monkeypatch.setenv("TILEATTN_DEBUG", "0")
    assert not _checks.debug_checks(meta)
    monkeypatch.setenv("TILEATTN_DEBUG", "1")
    assert _checks.debug_checks(meta)


def test_cpu_kept_products_by_brute_force():
    """backends/cpu/score.py's exact-path matmuls against a pair-by-pair sum: kept pairs are
    products (NaN / inf where the key holds one), hidden pairs contribute nothing."""
    from tileattn.backends.cpu import score
    N, R, Nk, D = 2, 5, 7, 3
    q, k, v = torch.randn(N, R, D), torch.randn(N, Nk, D), torch.randn(N, Nk, D)
    k[1, 4, 0], k[0, 2, 1], v[0, 5, 2], v[1, 1, 0] = NAN, INF, NAN, -INF
    hidden = torch.rand(N, R, Nk) > 0.5
    hidden[0, :, 2] = True  # the inf key hidden from every row of batch 0
    s = score.qk_kept(q, k, hidden, out=torch.empty(N, R, Nk), alpha=0.7)
    p = torch.rand(N, R, Nk).masked_fill(hidden, 0.0)
    acc0 = torch.randn(N, R, D)
    acc = score.accumulate_kept(acc0.clone(), p, v, hidden)
    for n in range(N):
        for r in range(R):
            want = acc0[n, r].clone()
            for j in range(Nk):
                if hidden[n, r, j]:
                    assert s[n, r, j].isfinite()  # never NaN / inf from a hidden key (masked to -inf later)
                    continue
                dot = (q[n, r] * k[n, j]).sum() * 0.7
                assert torch.equal(s[n, r, j].isnan(), dot.isnan())
                if dot.isfinite():
                    torch.testing.assert_close(s[n, r, j], dot, rtol=1e-5, atol=1e-5)
                else:
                    assert s[n, r, j].isnan() or s[n, r, j] == dot
                want = want + p[n, r, j] * v[n, j]
            assert torch.equal(acc[n, r].isnan(), want.isnan()) and torch.equal(acc[n, r].isinf(), want.isinf())
            fin = want.isfinite()
            torch.testing.assert_close(acc[n, r][fin], want[fin], rtol=1e-5, atol=1e-5)
    plain = score.accumulate_kept(acc0.clone(), p, v.nan_to_num(0.0, 0.0, 0.0), hidden)  # finite: baddbmm
    assert torch.equal(plain, acc0.clone().baddbmm_(p, v.nan_to_num(0.0, 0.0, 0.0)))
