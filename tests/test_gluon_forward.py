"""The Gluon sm_90 forward (``tileattn.backends.triton.gluon``) called directly, against the
float64 oracle by RELIABILITY.md's rule: ragged Sq / Sk tails, causal with Sq != Sk both ways
(empty rows), GQA / MQA, D 64 and 128, bf16 and fp16, non-contiguous layouts, more CTAs than
SMs; then the routing (plan says gluon, TILEATTN_HOPPER=0 and forced configs say tl)."""

import pytest
import torch
from helpers import assert_close, make_qkv

from tileattn import plan, reference

CUDA = torch.cuda.is_available()
SM90 = CUDA and torch.cuda.get_device_capability()[0] == 9
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not SM90, reason="the Gluon forward needs sm_90")]


def _run(q, k, v, causal, scale=None):
    from tileattn.backends.triton import gluon
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, Sq, Hq, D = q.shape
    out = torch.full((B, Sq, Hq, D), float("nan"), dtype=q.dtype, device=q.device)  # poison: every element written
    lse = torch.full((B, Hq, Sq), float("nan"), dtype=torch.float32, device=q.device)
    gluon.forward(q, k, v, out, lse, scale, causal)
    hi = reference.attention(q, k, v, causal=causal, scale=scale, upcast=True)
    lo = reference.attention(q, k, v, causal=causal, scale=scale, upcast=False)
    assert_close("out", out, hi[0], lo[0])
    assert_close("lse", lse, hi[1], lo[1], dtype=q.dtype)
    return out, lse


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Sq,Sk", [(1, 1), (1, 77), (77, 1), (77, 129), (129, 77), (129, 129), (1000, 1000),
                                   (257, 1000), (1000, 257), (128, 256), (384, 384)])
@pytest.mark.parametrize("causal", [False, True])
def test_lengths(device, dtype, D, Sq, Sk, causal):
    q, k, v = make_qkv(2, Sq, Sk, 4, 2, D, dtype=dtype, device=device)
    out, lse = _run(q, k, v, causal)
    if causal and Sq > Sk:  # rows i < Sq - Sk keep no key: out 0, lse -inf
        assert (out[:, :Sq - Sk] == 0).all() and (lse[:, :, :Sq - Sk] == float("-inf")).all()


@pytest.mark.parametrize("Hq,Hkv", [(8, 8), (8, 2), (8, 1)])
def test_gqa_mqa(device, Hq, Hkv):
    q, k, v = make_qkv(2, 300, 333, Hq, Hkv, 128, dtype=torch.bfloat16, device=device)
    _run(q, k, v, causal=True)
    _run(q, k, v, causal=False)


@pytest.mark.parametrize("layout", ["bhsd", "padded"])
def test_noncontiguous(device, layout):
    q, k, v = make_qkv(2, 200, 150, 4, 2, 64, dtype=torch.float16, device=device, layout=layout)
    _run(q, k, v, causal=True, scale=0.3)


def test_many_ctas_long(device):
    """B * Hq * row blocks >> 132 SMs, long enough for the K/V ring to wrap many times."""
    q, k, v = make_qkv(3, 2049, 2049, 16, 4, 128, dtype=torch.bfloat16, device=device)
    _run(q, k, v, causal=True)
    _run(q, k, v, causal=False)


def test_deterministic(device):
    from tileattn.backends.triton import gluon
    q, k, v = make_qkv(2, 1000, 1000, 8, 2, 128, dtype=torch.bfloat16, device=device)
    runs = []
    for _ in range(2):
        out, lse = torch.empty_like(q), torch.empty(2, 8, 1000, device=device)
        gluon.forward(q, k, v, out, lse, 0.1, True)
        runs.append((out, lse))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_routing(device, monkeypatch):
    q, k, v = make_qkv(1, 64, 64, 2, 2, 128, dtype=torch.bfloat16, device=device)
    assert plan.forward_plan(q, k, v, causal=True).kernel == "gluon"
    assert "gluon" in plan.describe(q, k, v)
    assert plan.forward_plan(q, k, v, softcap=5.0).kernel == "tl"
    assert plan.forward_plan(q, k, v, configs=[plan.Config(64, 64, 4, 2)]).kernel == "tl"
    assert plan.forward_plan(q.float(), k.float(), v.float()).kernel == "tl"
    monkeypatch.setenv("TILEATTN_HOPPER", "0")
    assert plan.forward_plan(q, k, v).kernel == "tl"


@pytest.mark.parametrize("junk", ["nan", "inf"])
@pytest.mark.parametrize("Sq,Sk", [(300, 300), (200, 333)])
def test_hidden_nonfinite_value(device, junk, Sq, Sk):
    """A NaN / inf in a value the causal mask hides from earlier rows (forward_sm90 [Note]
    hidden values), through the public call (routed to Gluon, flagged rows redone by the tl
    kernel): out is non-finite exactly where the oracle's is, every other row matches it."""
    import tileattn
    q, k, v = make_qkv(2, Sq, Sk, 4, 2, 128, dtype=torch.bfloat16, device=device)
    j = Sk - Sq + 150  # row 150's diagonal key: rows < 150 do not keep it
    v[1, j, 0, 5] = float(junk)
    assert plan.forward_plan(q, k, v, causal=True).kernel == "gluon"
    out, lse = tileattn.attention(q, k, v, causal=True, return_lse=True)
    hi = reference.attention(q, k, v, causal=True, upcast=True)
    lo = reference.attention(q, k, v, causal=True, upcast=False)
    bad = ~hi[0].isfinite()
    assert bad.any() and torch.equal(~out.isfinite(), bad) and torch.equal(out.isnan(), hi[0].isnan())
    assert_close("out", out[~bad], hi[0][~bad], lo[0][~bad])
    assert_close("lse", lse, hi[1], lo[1], dtype=q.dtype)
