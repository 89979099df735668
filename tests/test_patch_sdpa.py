"""tileattn.patch_sdpa: supported calls reach tileattn.sdpa and match torch's SDPA by
RELIABILITY.md's rule (float64 torch SDPA the oracle, torch in the input dtype the yardstick);
calls tileattn refuses fall back to torch's own function (bitwise torch's result, or torch's
error) and are counted by reason; the original comes back when the last patch ends."""

import copy

import pytest
import torch

import tileattn
import tileattn.patch as patch

from helpers import assert_close, randn

F = torch.nn.functional
ORIGINAL = F.scaled_dot_product_attention


@pytest.fixture(autouse=True)
def _clean():
    patch.stats.reset()
    yield
    tileattn.unpatch_sdpa()
    assert F.scaled_dot_product_attention is ORIGINAL


@pytest.fixture
def calls(monkeypatch):
    """Calls that reached tileattn.sdpa through the patch."""
    seen = []

    def spy(*args):
        seen.append(args)
        return sdpa(*args)

    sdpa = patch.sdpa
    monkeypatch.setattr(patch, "sdpa", spy)
    return seen


SUPPORTED = {
    "causal_square": (dict(L=9, S=9), dict(is_causal=True)),
    "causal_wide": (dict(L=5, S=11), dict(is_causal=True)),
    "causal_tall": (dict(L=11, S=5), dict(is_causal=True)),
    "bool_mask": (dict(L=7, S=10), dict(attn_mask="bool")),
    "float_mask_scale": (dict(L=7, S=10), dict(attn_mask="float", scale=0.3)),
    "gqa": (dict(L=6, S=8, Hkv=2), dict(enable_gqa=True, is_causal=True)),
    "three_d": (dict(L=6, S=8, three_d=True), {}),
}


def _inputs(L, S, Hkv=4, three_d=False, dtype=torch.float32, E=24):
    shape = (lambda n, h: (2, n, E)) if three_d else (lambda n, h: (2, h, n, E))
    return randn(shape(L, 4), dtype, "cpu"), randn(shape(S, Hkv), dtype, "cpu"), randn(shape(S, Hkv), dtype, "cpu")


def _mask(kind, L, S):
    if kind == "bool":
        return torch.rand(2, 1, L, S) > 0.3
    return torch.randn(L, S)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", sorted(SUPPORTED))
def test_supported_calls_reach_tileattn_and_match_torch(case, dtype, calls):
    shapes, kw = SUPPORTED[case]
    q, k, v = _inputs(**shapes, dtype=dtype)
    kw = dict(kw)
    if "attn_mask" in kw:
        kw["attn_mask"] = _mask(kw["attn_mask"], shapes["L"], shapes["S"])
    with tileattn.patch_sdpa() as p:
        out = F.scaled_dot_product_attention(q, k, v, **kw)
    assert len(calls) == 1 and p.stats.routed == 1 and not p.stats.fallbacks
    hi_kw = {n: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for n, t in kw.items()}
    hi = ORIGINAL(q.double(), k.double(), v.double(), **hi_kw)
    lo = ORIGINAL(q, k, v, **kw)
    assert_close(case, out, hi, None if dtype == torch.float32 else lo)


def test_multihead_attention_module_goes_through_the_patch(calls):
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(2, 7, 32)
    with tileattn.patch_sdpa():
        out, _ = mha(x, x, x, need_weights=False)
    assert len(calls) == 1
    x64 = x.double()
    hi, _ = copy.deepcopy(mha).double()(x64, x64, x64, need_weights=False)
    assert_close("MultiheadAttention", out, hi, None)


UNSUPPORTED = {
    "float64": lambda: (_inputs(5, 6, dtype=torch.float64), {}, "dtype torch.float64"),
    "head_dim_320": lambda: (_inputs(5, 6, E=320), {}, "head dims are 1..256"),
    "five_d": lambda: (tuple(t.unsqueeze(0) for t in _inputs(5, 6)), {}, "must be a 3-D"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_calls_fall_back_to_torch(case, calls):
    (q, k, v), kw, reason = UNSUPPORTED[case]()
    with tileattn.patch_sdpa() as p:
        out = F.scaled_dot_product_attention(q, k, v, **kw)
    assert torch.equal(out, ORIGINAL(q, k, v, **kw))
    assert p.stats.routed == 0 and sum(p.stats.fallbacks.values()) == 1
    (message,) = p.stats.fallbacks
    assert message.startswith("tileattn:") and reason in message


def test_bad_input_raises_torchs_error():
    q, k, v = _inputs(5, 6, Hkv=2)  # 4 query heads, 2 kv heads, no enable_gqa
    with pytest.raises(RuntimeError) as torch_err:
        ORIGINAL(q, k, v)
    with tileattn.patch_sdpa() as p, pytest.raises(RuntimeError) as err:
        F.scaled_dot_product_attention(q, k, v)
    assert str(err.value) == str(torch_err.value)
    assert sum(p.stats.fallbacks.values()) == 1


def test_nesting_global_switch_and_restore():
    outer = tileattn.patch_sdpa()
    with tileattn.patch_sdpa():
        assert F.scaled_dot_product_attention is patch._router
    assert F.scaled_dot_product_attention is patch._router  # outer still active
    outer.remove()
    outer.remove()  # once only
    assert F.scaled_dot_product_attention is ORIGINAL
    with pytest.raises(ZeroDivisionError):
        with tileattn.patch_sdpa():
            1 / 0
    assert F.scaled_dot_product_attention is ORIGINAL


def test_unpatch_ends_all_and_stale_handles_do_not_end_newer_patches():
    stale = tileattn.patch_sdpa()
    tileattn.patch_sdpa()
    tileattn.unpatch_sdpa()
    assert F.scaled_dot_product_attention is ORIGINAL
    with tileattn.patch_sdpa():
        stale.remove()
        assert F.scaled_dot_product_attention is patch._router
    assert F.scaled_dot_product_attention is ORIGINAL


def test_a_later_wrapper_is_kept_and_passes_through(calls):
    tileattn.patch_sdpa()
    wrapped = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda *a, **kw: wrapped(*a, **kw)  # someone wraps us
    outer = F.scaled_dot_product_attention
    try:
        tileattn.unpatch_sdpa()
        assert F.scaled_dot_product_attention is outer
        q, k, v = _inputs(3, 3)
        assert torch.equal(outer(q, k, v), ORIGINAL(q, k, v)) and not calls
    finally:
        F.scaled_dot_product_attention = ORIGINAL
