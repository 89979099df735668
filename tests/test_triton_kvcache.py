"""Triton ``forward_kvcache`` (fused append + split-KV decode, combine) against the oracle.

On CPU the kernels run in the Triton interpreter (fp32/fp16 only: bf16 tl.dot is broken
there); ``gpu``-marked tests cover bf16, page size 256, 128k keys and CUDA-graph replay.
"""

import pytest
import torch
from helpers import assert_close, randn, to_paged

from tileattn import paged, reference
from tileattn.backends.triton.kvcache import choose_num_splits, forward_kvcache, plan_kvcache
from tileattn.score import ScoreSpec

CPU_DTYPES = (torch.float32, torch.float16)


def _cache(B, smax, Hkv, D, Dv, dtype, device, page=None, fused=False):
    """Caches with random contents (also past each length: a kernel reading them fails).

    ``fused``: K and V are last-dim slices of one (.., D + Dv) buffer (separate strides).
    ``page``: shuffled paged layout with spare pages and a partial last page.
    Returns k_cache, v_cache, block_table (None when contiguous).
    """
    if fused or page:
        kv = randn((B, smax, Hkv, D + Dv), dtype, device)
        table = None
        if page:
            kv, table = to_paged(kv, page)
        return kv[..., :D], kv[..., D:], table
    return randn((B, smax, Hkv, D), dtype, device), randn((B, smax, Hkv, Dv), dtype, device), None


def _check(q, kc, vc, kn, vn, lens, table, *, window=(-1, 0), softcap=0.0, alibi=None, sinks=None,
           num_splits=0, scale=None, rotary=None, batch_idx=None, leftpad=None):
    """Run the kernel and the oracle on copies of the caches; compare out, lse, appended caches.
    ``rotary`` (cos, sin, interleaved), ``batch_idx``, ``leftpad``: the decode features; with
    rotary the appended (rotated) keys are compared by the tolerance rule, else bitwise."""
    causal = window[1] == 0
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kw = dict(cache_seqlens=lens, block_table=table, softcap=softcap, alibi_slopes=alibi, sinks=sinks,
              causal=causal, window=(window[0], -1) if causal else window, scale=scale,
              cache_batch_idx=batch_idx, cache_leftpad=leftpad)
    if rotary is not None:
        kw.update(rotary_cos=rotary[0], rotary_sin=rotary[1], rotary_interleaved=rotary[2])
    ref, caches = {}, {}
    for upcast in (True, False):
        caches[upcast] = kr, vr = kc.clone(), vc.clone()
        ref[upcast] = reference.attention_with_kvcache(q, kr, vr, kn, vn, upcast=upcast, **kw)
    k_run, v_run = kc.clone(), vc.clone()
    spec = ScoreSpec(scale=scale, window=window, softcap=softcap, alibi_slopes=alibi, sinks=sinks)
    out, lse = forward_kvcache(q, k_run, v_run, kn, vn, spec, cache_seqlens=lens, block_table=table,
                               num_splits=num_splits, rotary=rotary, cache_batch_idx=batch_idx, cache_leftpad=leftpad)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_close("out", out, ref[True][0], ref[False][0])
    assert_close("lse", lse, ref[True][1], ref[False][1], dtype=q.dtype)
    bitwise = dict(rtol=0, atol=0, equal_nan=True, msg="appended cache differs from the oracle's")
    torch.testing.assert_close(v_run, vr, **bitwise)
    if rotary is None:
        torch.testing.assert_close(k_run, kr, **bitwise)
    else:  # fp32 rotation vs the oracle's float64 / q-dtype ones; untouched slots bitwise
        assert_close("k_cache", k_run, caches[True][0], caches[False][0])
        same = (caches[True][0] == kc).all(-1)
        assert torch.equal(k_run[same], kc[same]) and not same.all()
    return out, lse


def _case(B, Sn, Hq, Hkv, D, lens, smax, dtype, device, *, Dv=None, page=None, fused=False, new=True):
    Dv = D if Dv is None else Dv
    q = randn((B, Sn, Hq, D), dtype, device)
    kc, vc, table = _cache(B, smax, Hkv, D, Dv, dtype, device, page, fused)
    kn = randn((B, Sn, Hkv, D), dtype, device) if new else None
    vn = randn((B, Sn, Hkv, Dv), dtype, device) if new else None
    return q, kc, vc, kn, vn, torch.tensor(lens, dtype=torch.int32, device=device), table


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("D", [64, 128])
def test_decode_contiguous(device, dtype, Hq, Hkv, D):
    _check(*_case(2, 1, Hq, Hkv, D, [37, 90], 100, dtype, device), num_splits=2)


@pytest.mark.parametrize("page,Sn", [(1, 3), (5, 1), (5, 3), (16, 3), (64, 1),
                                     pytest.param(256, 3, marks=pytest.mark.gpu)])
def test_paged_equals_contiguous(device, page, Sn):
    """Shuffled pages + spares + partial last page: oracle, and bitwise the contiguous result."""
    B, Hq, Hkv, D, smax = 3, 8, 2, 64, 140 if page < 256 else 600  # 2 splits of >= 2 tiles
    lens = [0, 33, smax - Sn] if page < 256 else [0, 257, 580]
    q, kc, vc, kn, vn, lens, _ = _case(B, Sn, Hq, Hkv, D, lens, smax, torch.float32, device)
    out_c, lse_c = _check(q, kc, vc, kn, vn, lens, None, num_splits=2)
    kv, table = to_paged(torch.cat([kc, vc], dim=-1), page)
    out_p, lse_p = _check(q, kv[..., :D], kv[..., D:], kn, vn, lens, table, num_splits=2)
    assert torch.equal(out_p, out_c) and torch.equal(lse_p, lse_c)


@pytest.mark.parametrize("page", [5, 16, 64])
def test_paged_k_v_own_strides(device, page):
    """K and V paged in separate pools with their own page and slot strides (V: other head dim,
    padded rows), so each gets its own row offsets; pages inside a tile, whole pages per tile,
    and one page per tile (fp32 tiles are 64 keys here)."""
    B, Sn, Hq, Hkv, D, Dv, smax = 2, 3, 4, 2, 64, 32, 150
    q, kc, vc, kn, vn, lens, _ = _case(B, Sn, Hq, Hkv, D, [70, smax - Sn], smax, torch.float32, device, Dv=Dv)
    k_pool, table = to_paged(kc, page)
    v_pool, _ = to_paged(torch.nn.functional.pad(vc, (0, 8)), page, table=table)
    v_pool = v_pool[..., :Dv]
    assert k_pool.stride()[:2] != v_pool.stride()[:2]
    _check(q, k_pool, v_pool, kn, vn, lens, table, num_splits=2)


@pytest.mark.parametrize("Sn", [1, 3])
@pytest.mark.parametrize("new", [True, False])
def test_lengths_and_empty_rows(device, Sn, new):
    """cache_seqlens 0 / 1 / odd; without new k a length-0 row is empty (out 0, lse -inf),
    and with Sn > length the first rows keep nothing (bottom-right causal)."""
    q, kc, vc, kn, vn, lens, table = _case(3, Sn, 4, 2, 64, [0, 1, 45], 64, torch.float32, device,
                                           page=5, new=new)
    out, lse = _check(q, kc, vc, kn, vn, lens, table, num_splits=2)
    if not new:
        assert (out[0] == 0).all() and (lse[0] == float("-inf")).all()


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_features(device, dtype):
    """softcap + ALiBi ((Hq,) expanded: stride 0) + sinks + sliding window, chunked prefill."""
    B, Sn, Hq, Hkv = 2, 3, 8, 2
    q, kc, vc, kn, vn, lens, table = _case(B, Sn, Hq, Hkv, 64, [50, 97], 110, dtype, device, page=16)
    alibi = torch.rand(Hq, device=device).expand(B, Hq)
    sinks = randn((Hq,), torch.float32, device)
    for splits in (1, 3):
        _check(q, kc, vc, kn, vn, lens, table, window=(20, 0), softcap=5.0, alibi=alibi, sinks=sinks,
               num_splits=splits)
    _check(q, kc, vc, kn, vn, lens, table, window=(7, 2), num_splits=2)  # not causal: right = 2


def test_sinks_empty_row_lse_is_sink(device):
    q, kc, vc, _, _, lens, _ = _case(2, 1, 4, 2, 64, [0, 20], 32, torch.float32, device, new=False)
    sinks = randn((4,), torch.float32, device)
    out, lse = _check(q, kc, vc, None, None, lens, None, sinks=sinks, num_splits=3)
    assert (out[0] == 0).all()
    torch.testing.assert_close(lse[0, :, 0], sinks, rtol=1e-6, atol=0)


@pytest.mark.parametrize("splits", [1, 3])
def test_negative_scale(device, splits):
    """Any finite scale (issue 17 class 2), also with softcap, ALiBi and sinks."""
    B, Sn, Hq, Hkv = 2, 3, 8, 2
    q, kc, vc, kn, vn, lens, table = _case(B, Sn, Hq, Hkv, 64, [50, 97], 110, torch.float32, device, page=16)
    out, lse = _check(q, kc, vc, kn, vn, lens, table, scale=-0.4, num_splits=splits)
    assert out.isfinite().all() and lse.isfinite().all()
    _check(q, kc, vc, kn, vn, lens, table, scale=-2.0, window=(20, 0), softcap=5.0,
           alibi=torch.rand(Hq, device=device).expand(B, Hq), sinks=randn((Hq,), torch.float32, device),
           num_splits=splits)


@pytest.mark.parametrize("splits", [1, 3])
def test_sinks_neg_inf(device, splits):
    """A sink of -inf is no term (issue 17 class 4): an empty row gives out 0 and lse -inf, the
    others equal the call without sinks; never NaN, folded in the kernel or in the combine."""
    q, kc, vc, _, _, lens, _ = _case(2, 1, 4, 2, 64, [0, 20], 32, torch.float32, device, new=False)
    sinks = torch.tensor([float("-inf"), 0.5, float("-inf"), -1.0], device=device)
    out, lse = _check(q, kc, vc, None, None, lens, None, sinks=sinks, num_splits=splits)
    assert (out[0] == 0).all() and (lse[0, [0, 2]] == float("-inf")).all()
    plain, plain_lse = _check(q, kc, vc, None, None, lens, None, num_splits=splits)
    torch.testing.assert_close(out[1, :, [0, 2]], plain[1, :, [0, 2]], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse[1, [0, 2]], plain_lse[1, [0, 2]], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("page", [None, 3])
@pytest.mark.parametrize("splits", [1, 2])
def test_masked_new_key_nan(device, page, splits):
    """Sn = 4 new tokens, causal (issue 17 class 3): a NaN in new key 2 of kv head 1 is hidden
    from new rows 0, 1 and reaches rows 2, 3 of that head's queries only; a NaN in a cached key
    the window hides reaches nothing. NaN exactly where the oracle has it, the rest its values."""
    B, Sn, Hq, Hkv, D = 2, 4, 4, 2, 16
    q, kc, vc, kn, vn, lens, table = _case(B, Sn, Hq, Hkv, D, [6, 11], 16, torch.float32, device, page=page)
    kn[:, 2, 1, 5] = float("nan")
    # key 0 of batch row 1: left of the window (6, 0) of every new row
    kc[(1, 0) if page is None else (table[1, 0].long(), 0)][0, 0] = float("nan")
    kw = dict(cache_seqlens=lens, block_table=table, window=(6, -1))  # causal by default
    ref = reference.attention_with_kvcache(q, kc.clone(), vc.clone(), kn, vn, **kw)
    spec = ScoreSpec(scale=D ** -0.5, window=(6, 0))
    out, lse = forward_kvcache(q, kc.clone(), vc.clone(), kn, vn, spec, cache_seqlens=lens, block_table=table,
                               num_splits=splits)
    assert ref[0][:, 2:, 2:].isnan().any(-1).all() and ref[0][:, :2].isfinite().all()
    for name, got, hi in (("out", out, ref[0]), ("lse", lse, ref[1])):
        assert torch.equal(got.isnan(), hi.isnan()), name
        assert_close(name, got[~hi.isnan()], hi[~hi.isnan()], None, dtype=torch.float32)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("junk", ["nan", "inf"])
@pytest.mark.parametrize("page", [None, 3])
@pytest.mark.parametrize("splits", [1, 3])
def test_masked_value_nonfinite(device, dtype, junk, page, splits):
    """As above with values (reference.py [Note] hidden keys): a NaN / inf in new value 2 of kv
    head 1 reaches rows 2, 3 of that head's queries only (NaN / inf where the oracle has it),
    not rows 0, 1 that p = 0 hides it from; a whole cached value left of the window holding
    junk reaches nothing; split partials and the combine keep both."""
    B, Sn, Hq, Hkv, D = 2, 4, 4, 2, 16
    q, kc, vc, kn, vn, lens, table = _case(B, Sn, Hq, Hkv, D, [6, 11], 16, dtype, device, page=page)
    vn[:, 2, 1, 5] = float(junk)
    vc[(1, 0) if page is None else (table[1, 0].long(), 0)][0] = float(junk)
    kw = dict(cache_seqlens=lens, block_table=table, window=(6, -1))  # causal by default
    hi = reference.attention_with_kvcache(q, kc.clone(), vc.clone(), kn, vn, upcast=True, **kw)
    lo = reference.attention_with_kvcache(q, kc.clone(), vc.clone(), kn, vn, upcast=False, **kw)
    spec = ScoreSpec(scale=D ** -0.5, window=(6, 0))
    out, lse = forward_kvcache(q, kc.clone(), vc.clone(), kn, vn, spec, cache_seqlens=lens, block_table=table,
                               num_splits=splits)
    bad = ~hi[0].isfinite()
    assert bad[:, 2:, 2:, 5].all() and not bad[:, :2].any() and not bad[..., :5].any()
    assert torch.equal(out.isnan(), hi[0].isnan()) and torch.equal(out.isinf(), hi[0].isinf())
    assert torch.equal(out[out.isinf()], hi[0][hi[0].isinf()].to(dtype))
    assert_close("out", out[~bad], hi[0][~bad], lo[0][~bad], dtype=dtype)
    assert_close("lse", lse, hi[1], lo[1], dtype=dtype)


@pytest.mark.parametrize("D,Dv", [(80, 80), (64, 32)])
def test_odd_head_dims(device, D, Dv):
    _check(*_case(2, 2, 4, 2, D, [0, 77], 80, torch.float32, device, Dv=Dv, fused=True), num_splits=2)


@pytest.mark.parametrize("D,Dv", [(256, 256), (192, 128)])
def test_wide_heads_16bit(device, D, Dv):
    """D + Dv > 256 in 16-bit: 32-key tiles (32 KB stages), paged and split."""
    args = _case(2, 1, 4, 2, D, [0, 150], 160, torch.float16, device, Dv=Dv, page=16)
    assert plan_kvcache(args[0], args[1], args[2], args[6]).block_n == 32
    _check(*args, num_splits=2)


def test_chunked_prefill_many_row_blocks(device):
    """Sn * G = 160 packed rows -> 3 row blocks, causal and windowed tile skipping."""
    q, kc, vc, kn, vn, lens, table = _case(1, 20, 8, 1, 32, [70], 96, torch.float16, device, page=16)
    assert plan_kvcache(q, kc, vc, table).m_blocks == 3
    _check(q, kc, vc, kn, vn, lens, table, num_splits=1)
    _check(q, kc, vc, kn, vn, lens, table, window=(9, 0), num_splits=2)


@pytest.mark.parametrize("page", [None, 5])
def test_new_tokens_span_several_tiles(device, monkeypatch, page):
    """Sn = 37 new tokens over 16-key tiles: the appended rows and the attended new keys span
    several tiles and splits, after an empty and after a long cached prefix."""
    monkeypatch.setenv("TILEATTN_DECODE_BLOCK_N", "16")
    q, kc, vc, kn, vn, lens, table = _case(2, 37, 4, 2, 32, [0, 50], 100, torch.float32, device, page=page)
    _check(q, kc, vc, kn, vn, lens, table, num_splits=3)
    _check(q, kc, vc, kn, vn, lens, table, window=(20, 0), num_splits=1)


def test_splits_agree_and_noncontiguous_q(device):
    """1 vs 3 splits agree (tolerance); a (B, H, S, D)-view q gives bitwise the same result."""
    q, kc, vc, kn, vn, lens, table = _case(2, 3, 8, 2, 64, [120, 5], 128, torch.float32, device)
    o1, l1 = _check(q, kc, vc, kn, vn, lens, table, num_splits=1)
    o3, l3 = _check(q, kc, vc, kn, vn, lens, table, num_splits=3)
    torch.testing.assert_close(o1, o3, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l1, l3, rtol=1e-5, atol=1e-5)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    ot, lt = _check(qt, kc, vc, kn, vn, lens, table, num_splits=3)
    assert torch.equal(ot, o3) and torch.equal(lt, l3)


@pytest.mark.parametrize("splits", [1, 3])
def test_batch_invariance(device, splits):
    """With a fixed split count a sequence's output is bitwise independent of its companions."""
    q, kc, vc, kn, vn, lens, table = _case(3, 2, 4, 2, 64, [9, 100, 61], 110, torch.float16, device,
                                           page=16)
    out, lse = _check(q, kc, vc, kn, vn, lens, table, num_splits=splits)
    b = 2
    row = table[b:b + 1]
    out_b, lse_b = forward_kvcache(q[b:b + 1], kc.clone(), vc.clone(), kn[b:b + 1], vn[b:b + 1],
                                   ScoreSpec(scale=64 ** -0.5, window=(-1, 0)), cache_seqlens=lens[b:b + 1],
                                   block_table=row, num_splits=splits)
    assert torch.equal(out_b, out[b:b + 1]) and torch.equal(lse_b, lse[b:b + 1])


@pytest.mark.parametrize("page", [None, 16])
def test_16bit_uses_128_key_tiles(device, page):
    """16-bit caches with D + Dv <= 256: the 128-key tile path, against the oracle."""
    args = _case(1, 1, 4, 2, 64, [1500], 2048, torch.float16, device, page=page)
    assert plan_kvcache(args[0], args[1], args[2], args[6], num_splits=1).block_n == 128
    _check(*args, num_splits=1)


def test_short_splits_use_64_key_tiles():
    """A split spanning <= SHORT_SPLIT_KEYS keys of capacity takes 64-key tiles (B=1, 4k keys,
    16 splits on an H100/H200), longer ones 128."""
    q = torch.empty(1, 1, 32, 128, dtype=torch.bfloat16)
    kc = torch.empty(1, 4096, 8, 128, dtype=torch.bfloat16)
    assert plan_kvcache(q, kc, kc, None, num_splits=16).block_n == 64
    assert plan_kvcache(q, kc, kc, None, num_splits=8).block_n == 128


def test_choose_num_splits():
    assert choose_num_splits(64, 8, 4096, 132) == 1
    assert choose_num_splits(16, 8, 32768, 132) == 1
    assert choose_num_splits(4, 8, 32768, 132) == 4
    assert choose_num_splits(1, 8, 4096, 132) == 16
    assert choose_num_splits(1, 8, 32768, 132) == 16
    assert choose_num_splits(1, 8, 100, 132) == 1
    assert choose_num_splits(1, 1, 10 ** 7, 132) == 128
    assert choose_num_splits(1, 8, 32768, 132, m_blocks=4) == 4


# ------------------------------------------------- decode features (rotary, cache_batch_idx, cache_leftpad)


def _rotary(seqlen_ro, rotary_dim, interleaved, dtype, device):
    """(cos, sin, interleaved) of random angles, (seqlen_ro, rotary_dim / 2) in dtype."""
    angles = torch.rand(seqlen_ro, rotary_dim // 2, device=device) * 6
    return angles.cos().to(dtype), angles.sin().to(dtype), interleaved


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("Sn", [1, 3])
@pytest.mark.parametrize("page,dtype", [(None, torch.float32), (5, torch.float16)])
def test_rotary(device, interleaved, Sn, page, dtype):
    """q and the new keys turned on their first 24 of 40 dims at cache_seqlens + i (q's rows all
    at cache_seqlens when neither causal nor windowed); the rotated keys are appended."""
    q, kc, vc, kn, vn, lens, table = _case(3, Sn, 4, 2, 40, [0, 13, 70 - Sn], 70, dtype, device, page=page)
    rotary = _rotary(80, 24, interleaved, dtype, device)
    for splits in (1, 3):
        _check(q, kc, vc, kn, vn, lens, table, rotary=rotary, num_splits=splits)
    _check(q, kc, vc, kn, vn, lens, table, window=(-1, -1), rotary=rotary, num_splits=3)
    _check(q, kc, vc, kn, vn, lens, table, window=(9, 1), rotary=rotary, num_splits=1)


def test_rotary_new_tokens_span_several_tiles(device, monkeypatch):
    """Sn = 21 over 16-key tiles: new keys attended tile by tile (past BLOCK_NEW) and appended
    in several tiles, each rotated at its own position."""
    monkeypatch.setenv("TILEATTN_DECODE_BLOCK_N", "16")
    q, kc, vc, kn, vn, lens, table = _case(2, 21, 4, 2, 32, [0, 30], 60, torch.float32, device, page=7)
    _check(q, kc, vc, kn, vn, lens, table, rotary=_rotary(64, 32, True, torch.float32, device), num_splits=3)


@pytest.mark.parametrize("Sn", [1, 3])
@pytest.mark.parametrize("rows", [[2, 0, 1], [4, 0, 2]])
def test_cache_batch_idx(device, Sn, rows):
    """Batch row b reads and appends to cache row cache_batch_idx[b]: a permutation of the 3
    cache rows, and a subset of 5 (rows 1 and 3 untouched)."""
    q, kc, vc, kn, vn, lens, _ = _case(3, Sn, 4, 2, 40, [7, 0, 90], 100, torch.float32, device)
    kc, vc = _cache(max(rows) + 1, 100, 2, 40, 40, torch.float32, device)[:2]
    idx = torch.tensor(rows, dtype=torch.int32, device=device)
    for splits in (1, 3):
        _check(q, kc, vc, kn, vn, lens, None, batch_idx=idx, num_splits=splits)


@pytest.mark.parametrize("Sn", [1, 3])
@pytest.mark.parametrize("page", [None, 5])
def test_cache_leftpad(device, Sn, page):
    """Keys from slot leftpad[b]: 0, one inside a 64-key tile (first tile partly masked),
    a tile-aligned one, and leftpad == cache_seqlens (only the new keys). The padding slots
    hold NaN: never loaded, so they reach nothing (also where no exact pass would contain them:
    not causal, one split). Causal, windowed with ALiBi, split or not."""
    q, kc, vc, kn, vn, lens, table = _case(4, Sn, 4, 2, 40, [9, 100, 80, 33], 110, torch.float32, device, page=page)
    pad = torch.tensor([0, 70, 64, 33], dtype=torch.int32, device=device)
    for b, p in enumerate(pad.tolist()):  # junk in the padding slots
        for cache in (kc, vc):
            cache[paged.row_index(cache, table, b, torch.arange(p, device=device))] = float("nan")
    alibi = torch.rand(4, 4, device=device)
    for splits in (1, 3):
        _check(q, kc, vc, kn, vn, lens, table, leftpad=pad, num_splits=splits)
        _check(q, kc, vc, kn, vn, lens, table, leftpad=pad, window=(20, 0), alibi=alibi, num_splits=splits)
    _check(q, kc, vc, kn, vn, lens, table, leftpad=pad, window=(-1, -1), num_splits=1)
    out, _ = _check(q, kc, vc, None, None, lens, table, leftpad=pad, num_splits=3)  # row 3: no keys
    assert (out[3] == 0).all() and out.isfinite().all()


def test_all_decode_features(device):
    """Rotary (halves, 16 of 40 dims) + batch index + leftpad + softcap, chunked prefill."""
    q, kc, vc, kn, vn, lens, _ = _case(2, 5, 4, 2, 40, [30, 77], 90, torch.float16, device)
    kc, vc = _cache(3, 90, 2, 40, 40, torch.float16, device)[:2]
    idx = torch.tensor([2, 0], dtype=torch.int32, device=device)
    pad = torch.tensor([11, 64], dtype=torch.int32, device=device)
    _check(q, kc, vc, kn, vn, lens, None, rotary=_rotary(90, 16, False, torch.float16, device), batch_idx=idx,
           leftpad=pad, softcap=3.0, num_splits=3)


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("page", [None, 16, 256])
@pytest.mark.parametrize("Sn", [1, 4])
def test_bf16_gpu(page, Sn):
    B, Hq, Hkv, D = 4, 32, 8, 128
    q, kc, vc, kn, vn, lens, table = _case(B, Sn, Hq, Hkv, D, [0, 1, 1000, 3000], 3072,
                                           torch.bfloat16, "cuda", page=page)
    for splits in (0, 1, 7):
        _check(q, kc, vc, kn, vn, lens, table, num_splits=splits)
    alibi = torch.rand(B, Hq, device="cuda")
    sinks = randn((Hq,), torch.float32, "cuda")
    _check(q, kc, vc, kn, vn, lens, table, window=(500, 0), softcap=30.0, alibi=alibi, sinks=sinks)


@pytest.mark.gpu
@pytest.mark.parametrize("page", [None, 256])
def test_128k_keys_gpu(page):
    q, kc, vc, kn, vn, lens, table = _case(2, 1, 8, 2, 128, [131071, 70001], 131072, torch.bfloat16,
                                           "cuda", page=page)
    for splits in (0, 1):
        _check(q, kc, vc, kn, vn, lens, table, num_splits=splits)


@pytest.mark.gpu
@pytest.mark.parametrize("page", [None, 16])
def test_cuda_graph_replay(page):
    """Capture once, replay with new cache_seqlens (and new q / new k/v): matches the oracle."""
    B, Sn, Hq, Hkv, D, smax = 4, 1, 32, 8, 128, 4096
    q, kc, vc, kn, vn, lens, table = _case(B, Sn, Hq, Hkv, D, [5, 100, 2000, 4000], smax,
                                           torch.bfloat16, "cuda", page=page)
    kc0, vc0 = kc.clone(), vc.clone()

    def call():
        return forward_kvcache(q, kc, vc, kn, vn, ScoreSpec(scale=D ** -0.5, window=(-1, 0)),
                               cache_seqlens=lens, block_table=table, num_splits=0)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compile outside the capture
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = call()
    for new_lens in ([0, 4095, 17, 1], [3000, 64, 0, 129]):
        kc.copy_(kc0)
        vc.copy_(vc0)
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        for x in (q, kn, vn):
            x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        ref = {}
        for upcast in (True, False):
            kr, vr = kc0.clone(), vc0.clone()
            ref[upcast] = reference.attention_with_kvcache(q, kr, vr, kn, vn, cache_seqlens=lens,
                                                           block_table=table, upcast=upcast)
        assert_close("out", out, ref[True][0], ref[False][0])
        assert_close("lse", lse, ref[True][1], ref[False][1], dtype=q.dtype)
        assert torch.equal(kc, kr) and torch.equal(vc, vr)


@pytest.mark.gpu
@pytest.mark.parametrize("page", [None, 16, 256])
@pytest.mark.parametrize("Sn", [1, 4])
def test_decode_features_bf16_gpu(page, Sn):
    """bf16 on the H200: rotary (both modes, partial and full), batch index (contiguous) and
    leftpad over long caches, split and not."""
    B, Hq, Hkv, D = 4, 32, 8, 128
    q, kc, vc, kn, vn, lens, table = _case(B, Sn, Hq, Hkv, D, [0, 1, 1000, 3000], 3072, torch.bfloat16, "cuda",
                                           page=page)
    pad = torch.tensor([0, 1, 333, 2048], dtype=torch.int32, device="cuda")
    for interleaved, rotary_dim in ((False, 128), (True, 64)):
        rotary = _rotary(3100, rotary_dim, interleaved, torch.bfloat16, "cuda")
        for splits in (0, 1, 7):
            _check(q, kc, vc, kn, vn, lens, table, rotary=rotary, leftpad=pad, num_splits=splits)
        _check(q, kc, vc, kn, vn, lens, table, window=(-1, -1), rotary=rotary, num_splits=0)
    _check(q, kc, vc, kn, vn, lens, table, leftpad=pad, window=(500, 0), alibi=torch.rand(B, Hq, device="cuda"))
    if page is None:
        kc6, vc6 = _cache(6, 3072, Hkv, D, D, torch.bfloat16, "cuda")[:2]
        idx = torch.tensor([5, 0, 3, 1], dtype=torch.int32, device="cuda")
        for splits in (0, 1):
            _check(q, kc6, vc6, kn, vn, lens, None, batch_idx=idx, leftpad=pad, num_splits=splits)
