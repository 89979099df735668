"""KV-cache attention on the CPU backend, and the ``tileattn.kvcache`` helpers.

Every case compares ``backends.cpu.decode.forward_kvcache`` with
``reference.attention_with_kvcache`` by RELIABILITY.md's rule; paged caches are shuffled,
carry spare pages and NaN-poisoned unused slots (a read past ``cache_seqlens`` would show).
``decode.BLOCK_N`` is lowered so short caches span many tiles.
"""

import math

import pytest
import torch
from hypothesis import given, strategies as st

import tileattn
from tileattn import backends, kvcache, paged, reference
from tileattn.backends.cpu import decode
from tileattn.score import ScoreSpec

from helpers import assert_close, randn

NAN = float("nan")


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    monkeypatch.setattr(decode, "BLOCK_N", 16)


def _caches(lens, smax, hkv, d, dv, dtype):
    """Contiguous caches (B, smax, Hkv, D[v]) holding random data everywhere."""
    return randn((len(lens), smax, hkv, d), dtype, "cpu"), randn((len(lens), smax, hkv, dv), dtype, "cpu")


def _paged(k, v, block_size, used):
    """Shuffled pages (+3 spare) of k/v; slots at or past ``used[b]`` and spare pages are NaN."""
    pages = paged.num_pages(k.shape[1], block_size) * k.shape[0]
    kp, vp, table = kvcache.paged_from_contiguous(k, v, block_size, num_blocks=pages + 3, shuffle=True)
    slot = torch.arange(paged.capacity(kp, table))
    for p in (kp, vp):
        spare = torch.ones(p.shape[0], dtype=torch.bool)
        spare[table.long().flatten()] = False
        p[spare] = NAN
        for b, n in enumerate(used):
            p[paged.row_index(p, table, b, slot[n:])] = NAN
    return kp, vp, table


def _run(q, k_cache, v_cache, k_new, v_new, lens, *, block_size=None, causal=True, window=(-1, -1),
         softcap=0.0, alibi=None, sinks=None, num_splits=1):
    """Backend on a (paged, poisoned) copy vs the oracle on clean contiguous copies.

    Checks out and lse by the tolerance rule, and the appended cache contents bitwise.
    Returns (out, lse) of the backend.
    """
    seqlens = torch.tensor(lens, dtype=torch.int32)
    sn = q.shape[1]
    used = [n + (sn if k_new is not None else 0) for n in lens]
    refs = []
    for upcast in (True, False):
        kc, vc = k_cache.clone(), v_cache.clone()
        refs.append(reference.attention_with_kvcache(
            q, kc, vc, k_new, v_new, cache_seqlens=seqlens, causal=causal, window=window,
            softcap=softcap, alibi_slopes=alibi, sinks=sinks, upcast=upcast))
    if block_size is None:
        kb, vb, table = k_cache.clone(), v_cache.clone(), None
        for c in (kb, vb):
            for b, n in enumerate(used):
                c[b, n:] = NAN
    else:
        kb, vb, table = _paged(k_cache, v_cache, block_size, used)
    left, right = window
    out, lse = decode.forward_kvcache(
        q, kb, vb, k_new, v_new,
        ScoreSpec(scale=1 / math.sqrt(q.shape[-1]), window=(left, 0 if causal else right), softcap=softcap,
                  alibi_slopes=alibi.expand(q.shape[0], -1) if alibi is not None and alibi.dim() == 1 else alibi,
                  sinks=sinks),
        cache_seqlens=seqlens, block_table=table, num_splits=num_splits)
    (out_hi, lse_hi), (out_lo, lse_lo) = refs
    assert out.dtype == q.dtype and out.shape == out_hi.shape and lse.dtype == torch.float32
    assert_close("out", out, out_hi, out_lo)
    assert_close("lse", lse, lse_hi, lse_lo, dtype=q.dtype)
    for name, ours, theirs in (("k_cache", kb, kc), ("v_cache", vb, vc)):
        dense = kvcache.gather(ours, table, seqlens + (sn if k_new is not None else 0))
        for b, n in enumerate(used):
            assert torch.equal(dense[b, :n], theirs[b, :n]), f"{name}[{b}] contents differ"
        if block_size is None:
            assert all(ours[b, n:].isnan().all() for b, n in enumerate(used)), f"{name} written past the end"
    return out, lse


def _inputs(lens, sn, hq, hkv, d, dv, dtype, new=True, smax=48):
    q = randn((len(lens), sn, hq, d), dtype, "cpu")
    k, v = _caches(lens, smax, hkv, d, dv, dtype)
    k_new = randn((len(lens), sn, hkv, d), dtype, "cpu") if new else None
    v_new = randn((len(lens), sn, hkv, dv), dtype, "cpu") if new else None
    return q, k, v, k_new, v_new


# ----------------------------------------------------------------------------- against the oracle


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [None, 1, 5, 16, 256])
@pytest.mark.parametrize("sn", [1, 4])
@pytest.mark.parametrize("new", [True, False])
def test_matches_reference(dtype, block_size, sn, new):
    lens = [0, 1, 13, 40] if new else [0, 1, 13, 44]  # cache_seqlens + Sn <= 48
    _run(*_inputs(lens, sn, 6, 2, 32, 24, dtype, new), lens, block_size=block_size)


@pytest.mark.parametrize("block_size", [None, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("feature", [
    dict(softcap=1.5), dict(alibi="batch"), dict(alibi="heads"), dict(sinks=True),
    dict(window=(7, -1)), dict(window=(3, 2), causal=False), dict(window=(-1, 1), causal=False),
    dict(causal=False), dict(softcap=3.0, alibi="batch", sinks=True, window=(9, -1))])
def test_features(feature, dtype, block_size):
    lens, hq = [0, 3, 17, 39], 8
    kw = dict(feature)
    if kw.pop("alibi", None):
        kw["alibi"] = torch.rand(len(lens), hq) if feature["alibi"] == "batch" else torch.rand(hq)
    if kw.pop("sinks", None):
        kw["sinks"] = torch.randn(hq)
    _run(*_inputs(lens, 4, hq, 2, 40, 40, dtype), lens, block_size=block_size, **kw)


@pytest.mark.parametrize("hkv", [1, 2, 6])
def test_gqa_mqa(hkv):
    lens = [5, 30]
    _run(*_inputs(lens, 3, 6, hkv, 16, 16, torch.float32), lens, block_size=16)


@pytest.mark.parametrize("num_splits", [2, 3, 7, 1000])
@pytest.mark.parametrize("block_size", [None, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_splits(num_splits, block_size, dtype):
    """Split-KV runs merged by lse agree with one run (and both with the oracle)."""
    lens = [0, 2, 50, 117]
    q, k, v, kn, vn = _inputs(lens, 2, 4, 2, 32, 32, dtype, smax=120)
    sinks = torch.randn(4)
    one = _run(q, k, v, kn, vn, lens, block_size=block_size, sinks=sinks, num_splits=1)
    many = _run(q, k, v, kn, vn, lens, block_size=block_size, sinks=sinks, num_splits=num_splits)
    if dtype == torch.float32:
        for a, b in zip(many, one):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_empty_rows():
    """cache_seqlens 0 without new keys, and Sn > Sk causal rows: out 0, lse -inf or the sink."""
    q, k, v, _, _ = _inputs([0, 2], 4, 2, 1, 16, 16, torch.float32, new=False)
    seqlens = torch.tensor([0, 2], dtype=torch.int32)
    for sinks in (None, torch.randn(2)):
        out, lse = decode.forward_kvcache(q, k, v, None, None, ScoreSpec(scale=0.25, window=(-1, 0), sinks=sinks),
                                          cache_seqlens=seqlens, block_table=None, num_splits=3)
        empty = lse.new_full((2,), -math.inf) if sinks is None else sinks
        assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[1, :2], torch.zeros_like(out[1, :2]))
        assert torch.equal(lse[0], empty[:, None].expand(2, 4)) and torch.equal(lse[1, :, :2], empty[:, None].expand(2, 2))
        assert out[1, 2:].abs().sum() > 0 and not out.isnan().any()


def test_large_logits():
    lens = [9, 33]
    q, k, v, kn, vn = _inputs(lens, 2, 4, 2, 64, 64, torch.bfloat16)
    _run(q * 5, k * 3, v, kn * 3, vn, lens, block_size=5)
    _run(q * 5, k * 3, v, kn * 3, vn, lens, block_size=None, softcap=0.5)


def test_non_contiguous_inputs_bitwise():
    """q, k_new and a cache that are strided views give the same bits as contiguous copies."""
    lens = [4, 21]
    q, k, v, kn, vn = _inputs(lens, 2, 4, 2, 16, 16, torch.float16)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    kw = dict(cache_seqlens=seqlens, block_table=None, num_splits=2)
    spec = ScoreSpec(scale=0.25, window=(-1, 0))
    wide = torch.zeros(2, 48, 2, 40, dtype=torch.float16)
    k_view, v_view = wide[..., :16], wide[..., 20:36]
    k_view.copy_(k), v_view.copy_(v)
    out_a, lse_a = decode.forward_kvcache(q.transpose(1, 2).contiguous().transpose(1, 2), k_view, v_view,
                                          kn.transpose(1, 2).contiguous().transpose(1, 2), vn, spec, **kw)
    out_b, lse_b = decode.forward_kvcache(q, k, v, kn, vn, spec, **kw)
    assert torch.equal(out_a, out_b) and torch.equal(lse_a, lse_b)
    assert torch.equal(k_view, k) and torch.equal(v_view, v)


@pytest.mark.parametrize("block_size", [None, 5])
def test_batch_invariance(block_size):
    """A sequence's result does not change with its batch companions (bitwise)."""
    lens = [3, 0, 41, 17, 29]
    q, k, v, kn, vn = _inputs(lens, 2, 4, 2, 32, 32, torch.bfloat16)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    kp, vp, table = (k, v, None) if block_size is None else kvcache.paged_from_contiguous(k, v, block_size, shuffle=True)
    slopes = torch.rand(5, 4)
    kw = dict(scale=0.2, window=(-1, 0))
    out, lse = decode.forward_kvcache(q, kp.clone(), vp.clone(), kn, vn, ScoreSpec(**kw, alibi_slopes=slopes),
                                      cache_seqlens=seqlens, block_table=table, num_splits=2)
    for b in (0, 2, 4):
        one = slice(b, b + 1)
        kb, vb = (k[one].clone(), v[one].clone()) if table is None else (kp.clone(), vp.clone())
        o, l = decode.forward_kvcache(q[one], kb, vb, kn[one], vn[one], ScoreSpec(**kw, alibi_slopes=slopes[one]),
                                      cache_seqlens=seqlens[one], block_table=None if table is None else table[one],
                                      num_splits=2)
        assert torch.equal(o[0], out[b]) and torch.equal(l[0], lse[b])


@given(st.data())
def test_property_paged_equals_contiguous(data):
    """Paged (any page size, shuffled, spare pages) == contiguous, bitwise, caches included."""
    batch = data.draw(st.integers(1, 3))
    sn = data.draw(st.integers(1, 4))
    smax = data.draw(st.integers(sn, 40))
    lens = data.draw(st.lists(st.integers(0, smax - sn), min_size=batch, max_size=batch))
    block_size = data.draw(st.sampled_from([1, 2, 3, 5, 16, 64]))
    spare = data.draw(st.integers(0, 4))
    hkv, group = data.draw(st.integers(1, 2)), data.draw(st.sampled_from([1, 3]))
    splits = data.draw(st.integers(0, 4))
    new = data.draw(st.booleans())
    q, k, v, kn, vn = _inputs(lens, sn, hkv * group, hkv, 8, 8, torch.float32, new, smax=smax)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    per = paged.num_pages(smax, block_size)
    kp, vp, table = kvcache.paged_from_contiguous(k, v, block_size, num_blocks=batch * per + spare, shuffle=True,
                                                  generator=torch.Generator().manual_seed(len(lens)))
    kw = dict(cache_seqlens=seqlens, num_splits=splits)
    spec = ScoreSpec(scale=0.35, window=(-1, 0))
    out_c, lse_c = decode.forward_kvcache(q, k, v, kn, vn, spec, block_table=None, **kw)
    out_p, lse_p = decode.forward_kvcache(q, kp, vp, kn, vn, spec, block_table=table, **kw)
    assert torch.equal(out_c, out_p) and torch.equal(lse_c, lse_p)
    assert torch.equal(kvcache.gather(kp, table)[:, :smax], k) and torch.equal(kvcache.gather(vp, table)[:, :smax], v)


# ----------------------------------------------------------------------------- kvcache helpers


@pytest.mark.parametrize("block_size", [None, 1, 5, 16])
def test_helpers_allocate_append_gather(block_size):
    gen = torch.Generator().manual_seed(1)
    cache = kvcache.allocate(3, 23, 2, 8, head_dim_v=6, dtype=torch.float16, block_size=block_size,
                             num_blocks=None if block_size is None else 3 * paged.num_pages(23, block_size) + 2,
                             shuffle=True, generator=gen)
    assert cache.paged == (block_size is not None) and cache.capacity >= 23
    assert cache.seqlens.dtype == torch.int32 and cache.seqlens.tolist() == [0, 0, 0]
    if cache.paged:
        ids = cache.block_table.flatten()
        assert cache.block_table.dtype == torch.int32 and len(set(ids.tolist())) == ids.numel()
    chunks = [(randn((3, n, 2, 8), torch.float16, "cpu"), randn((3, n, 2, 6), torch.float16, "cpu")) for n in (5, 1, 17)]
    for k, v in chunks:
        cache.append(k, v)
    assert cache.seqlens.tolist() == [23, 23, 23]
    k_dense, v_dense = cache.gather()
    assert k_dense.shape == (3, cache.capacity, 2, 8) and v_dense.shape == (3, cache.capacity, 2, 6)
    assert torch.equal(k_dense[:, :23], torch.cat([k for k, _ in chunks], 1))
    assert torch.equal(v_dense[:, :23], torch.cat([v for _, v in chunks], 1))


def test_helpers_append_matches_attention_writes():
    lens = [0, 6, 19]
    _, k, v, kn, vn = _inputs(lens, 3, 2, 2, 8, 8, torch.float32)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    kp, vp, table = kvcache.paged_from_contiguous(k, v, 4, num_blocks=50, shuffle=True)
    ka, va = kp.clone(), vp.clone()
    kvcache.append(ka, va, kn, vn, seqlens, table)
    decode.forward_kvcache(torch.randn(3, 3, 2, 8), kp, vp, kn, vn, ScoreSpec(scale=0.3, window=(-1, 0)),
                           cache_seqlens=seqlens, block_table=table, num_splits=0)
    assert torch.equal(ka, kp) and torch.equal(va, vp)
    kvcache.append(k, v, kn, vn, 2)  # contiguous, Python-int lengths
    assert torch.equal(k[:, 2:5], kn) and torch.equal(v[:, 2:5], vn)


def test_helpers_gather_round_trip_and_unread_pages():
    k, v = _caches([0, 0], 37, 3, 4, 4, torch.bfloat16)
    kp, vp, table = kvcache.paged_from_contiguous(k, v, 8, num_blocks=20, shuffle=True)
    assert kp.shape == (20, 8, 3, 4) and table.shape == (2, 5)
    assert torch.equal(kvcache.gather(kp, table)[:, :37], k) and torch.equal(kvcache.gather(vp, table)[:, :37], v)
    seqlens = torch.tensor([9, 0], dtype=torch.int32)
    table[0, 2:] = -1  # entries past the used pages may hold anything: they are not read
    table[1] = 10**6
    dense = kvcache.gather(kp, table, seqlens)
    assert torch.equal(dense[0, :9], k[0, :9]) and not dense[0, 9:].any() and not dense[1].any()
    assert torch.equal(kvcache.gather(k, None, seqlens)[0, :9], k[0, :9])


@pytest.mark.parametrize("call, error, words", [
    (lambda c, k: kvcache.append(c.k, c.v, k, k, torch.tensor([0, 14], dtype=torch.int32), c.block_table),
     ValueError, "capacity"),
    (lambda c, k: kvcache.append(c.k, c.v, k[:, :, :1], k, c.seqlens, c.block_table), ValueError, "k must have shape"),
    (lambda c, k: kvcache.append(c.k, c.v, k, k, c.seqlens.long(), c.block_table), TypeError, "cache_seqlens"),
    (lambda c, k: kvcache.append(c.k, c.v, k, k, c.seqlens, c.block_table.long()), TypeError, "block_table"),
    (lambda c, k: kvcache.append(c.k, c.v, k, k, c.seqlens, c.block_table + 100), ValueError, "page ids"),
    (lambda c, k: kvcache.append(c.k, c.v, k.double(), k, c.seqlens, c.block_table), TypeError, "k has dtype"),
    (lambda c, k: kvcache.allocate(2, 16, 2, 4, block_size=0), ValueError, "block_size"),
    (lambda c, k: kvcache.allocate(2, 16, 2, 4, block_size=4, num_blocks=7), ValueError, "num_blocks"),
    (lambda c, k: kvcache.allocate(2, 16, 2, 4, num_blocks=8), ValueError, "num_blocks"),
    (lambda c, k: kvcache.allocate(0, 16, 2, 4), ValueError, "batch"),
    (lambda c, k: kvcache.paged_from_contiguous(k, k[:1], 4), ValueError, "v has shape"),
    (lambda c, k: kvcache.gather(c.k, c.block_table[0]), ValueError, "block_table"),
])
def test_helpers_errors_mutate_nothing(call, error, words):
    cache = kvcache.allocate(2, 16, 2, 4, dtype=torch.float32, block_size=4, num_blocks=9, shuffle=True)
    before = cache.k.clone(), cache.v.clone()
    with pytest.raises(error, match=f"^tileattn: .*{words}"):
        call(cache, torch.randn(2, 3, 2, 4))
    assert torch.equal(cache.k, before[0]) and torch.equal(cache.v, before[1])


# ----------------------------------------------------------------------------- public API


def _cpu_backend_ready():
    if not hasattr(backends.get("cpu"), "forward_kvcache"):
        pytest.skip("tileattn.backends.cpu does not export forward_kvcache yet")


@pytest.mark.parametrize("block_size", [None, 5])
def test_api_cpu_backend(block_size):
    _cpu_backend_ready()
    cache = kvcache.allocate(2, 30, 2, 16, dtype=torch.float16, block_size=block_size, num_blocks=None,
                             shuffle=True)
    cache.append(randn((2, 11, 2, 16), torch.float16, "cpu"), randn((2, 11, 2, 16), torch.float16, "cpu"))
    cache.seqlens[1] = 4
    q, k, v = (randn((2, 2, 4, 16), torch.float16, "cpu") for _ in range(3))
    k, v = k[:, :, :2], v[:, :, :2]
    slopes, sinks = torch.rand(4), torch.randn(4)
    dense_k, dense_v = cache.gather()
    ref_hi = reference.attention_with_kvcache(q, dense_k.clone(), dense_v.clone(), k, v, cache_seqlens=cache.seqlens,
                                              alibi_slopes=slopes, sinks=sinks, window=(6, -1))
    ref_lo = reference.attention_with_kvcache(q, dense_k.clone(), dense_v.clone(), k, v, cache_seqlens=cache.seqlens,
                                              alibi_slopes=slopes, sinks=sinks, window=(6, -1), upcast=False)
    out, lse = tileattn.attention_with_kvcache(q, cache.k, cache.v, k, v, cache_seqlens=cache.seqlens,
                                               block_table=cache.block_table, alibi_slopes=slopes, sinks=sinks,
                                               window=(6, -1), num_splits=2, return_lse=True, backend="cpu")
    assert_close("out", out, ref_hi[0], ref_lo[0])
    assert_close("lse", lse, ref_hi[1], ref_lo[1], dtype=torch.float16)
    cache.seqlens += 2
    assert torch.equal(cache.gather()[0][1, 4:6], k[1])


def test_api_cpu_backend_int_seqlens_and_errors():
    _cpu_backend_ready()
    k_cache, v_cache = torch.randn(2, 8, 1, 16), torch.randn(2, 8, 1, 16)
    q, k, v = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 1, 16), torch.randn(2, 1, 1, 16)
    ref = reference.attention_with_kvcache(q, k_cache.clone(), v_cache.clone(), k, v, cache_seqlens=7)
    out = tileattn.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=7, backend="cpu")
    assert_close("out", out, ref[0], None)
    before = k_cache.clone()
    with pytest.raises(ValueError, match="^tileattn: .*capacity"):
        tileattn.attention_with_kvcache(q, k_cache, v_cache, k * 2, v, cache_seqlens=8, backend="cpu")
    assert torch.equal(k_cache, before)


# ----------------------------------------------------------------------------- tileattn.paged


def test_paged_addressing():
    """The one rule: position p of row b is page table[b, p // page_size], slot p % page_size."""
    cache = torch.arange(6 * 4, dtype=torch.float32).view(6, 4, 1, 1).expand(6, 4, 1, 2).contiguous()
    table = torch.tensor([[5, 0, 3], [2, 4, 1]], dtype=torch.int32)
    assert paged.num_pages(9, 4) == 3 and paged.num_pages(8, 4) == 2 and paged.num_pages(0, 4) == 0
    assert paged.capacity(cache, table) == 12 and paged.capacity(cache, None) == 4
    pos = torch.tensor([[0, 5, 11], [3, 4, 9]])
    page, slot = paged.locate(table, pos, 4)
    assert page.tolist() == [[5, 0, 3], [2, 4, 1]] and slot.tolist() == [[0, 1, 3], [3, 0, 1]]
    assert torch.equal(cache[paged.index(cache, table, pos)][..., 0, 0], page * 4.0 + slot)
    assert torch.equal(paged.gather(cache, table, 1, 2, 7)[:, 0, 0], torch.tensor([10.0, 11.0, 16.0, 17.0, 18.0]))
    dense = torch.randn(2, 12, 1, 2)
    assert torch.equal(paged.gather(dense, None, 1, 2, 7), dense[1, 2:7])
    assert torch.equal(dense[paged.index(dense, None, pos)], torch.stack([dense[0, pos[0]], dense[1, pos[1]]]))
    new = torch.randn(2, 2, 1, 2)
    at = paged.append_positions(torch.tensor([3, 10], dtype=torch.int32), 2)
    assert at.tolist() == [[3, 4], [10, 11]]
    paged.scatter_(cache, table, at, new)
    assert torch.equal(cache[5, 3], new[0, 0]) and torch.equal(cache[0, 0], new[0, 1])
    assert torch.equal(cache[1, 2], new[1, 0]) and torch.equal(cache[1, 3], new[1, 1])
    used = paged.pages_in_use(table, torch.tensor([5, 0]), 4)
    assert sorted(used.tolist()) == [0, 5]
    assert sorted(paged.pages_in_use(table, torch.tensor([9, 12]), 4, start=torch.tensor([4, 8])).tolist()) == [0, 1, 3]
