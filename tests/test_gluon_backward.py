"""The Gluon sm_90 fused backward (``gluon/backward_launch.py``) against the float64 oracle's
autograd by RELIABILITY.md's rule (c = 3): ragged Sq / Sk (1, 77, 129, 1000), causal with
Sq != Sk both ways, GQA / MQA, D 64 and 128, bf16 and fp16, more programs than SMs, large |lse|;
then the fallbacks (non-finite causal inputs -> None, deterministic=True -> tl) and the routing
(TILEATTN_GLUON_BWD=1 set here)."""

import pytest
import torch
from helpers import assert_close, leaf, make_qkv

from tileattn import plan, reference
from tileattn.score import ScoreSpec

CUDA = torch.cuda.is_available()
SM90 = CUDA and torch.cuda.get_device_capability()[0] == 9
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not SM90, reason="the Gluon backward needs sm_90")]


@pytest.fixture(autouse=True)
def _knob(monkeypatch):
    monkeypatch.setenv("TILEATTN_GLUON_BWD", "1")


def _spec(causal, scale):
    return ScoreSpec(scale=scale, window=(-1, 0) if causal else (-1, -1))


def _fused(q, k, v, dout, causal, scale):
    from tileattn.backends.triton.forward import forward
    from tileattn.backends.triton.gluon.backward_launch import backward
    out, lse = forward(q, k, v, _spec(causal, scale))
    return backward(dout, q, k, v, out, lse, scale, causal)


def _check(q, k, v, causal, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dout = torch.randn_like(q)
    got = _fused(q, k, v, dout, causal, scale)
    assert got is not None
    refs = []
    for upcast in (True, False):
        leaves = [leaf(t, torch.float64 if upcast else q.dtype) for t in (q, k, v)]
        o, _ = reference.attention(*leaves, causal=causal, scale=scale, upcast=upcast)
        refs.append(torch.autograd.grad(o, leaves, dout.to(o.dtype)))
    for name, g, hi, lo in zip(("dq", "dk", "dv"), got, *refs):
        assert g.dtype == q.dtype and g.shape == hi.shape
        assert_close(name, g, hi, lo, c=3.0)
    return got


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Sq,Sk", [(1, 1), (1, 77), (77, 1), (77, 129), (129, 77), (1000, 1000), (257, 1000),
                                   (1000, 257)])
@pytest.mark.parametrize("causal", [False, True])
def test_lengths(device, dtype, D, Sq, Sk, causal):
    _check(*make_qkv(2, Sq, Sk, 4, 2, D, dtype=dtype, device=device), causal)


@pytest.mark.parametrize("Hq,Hkv", [(8, 8), (8, 2), (8, 1)])
def test_gqa_mqa(device, Hq, Hkv):
    q, k, v = make_qkv(2, 300, 333, Hq, Hkv, 128, dtype=torch.bfloat16, device=device)
    _check(q, k, v, causal=True)
    _check(q, k, v, causal=False)


def test_many_programs(device):
    """cdiv(Sk, 128) * B * Hkv = 3 * 3 * 16 = 144 programs > 132 SMs; B * Hq = 144."""
    q, k, v = make_qkv(3, 300, 300, 48, 16, 64, dtype=torch.float16, device=device)
    _check(q, k, v, causal=True, scale=0.3)


@pytest.mark.parametrize("causal", [False, True])
def test_large_lse(device, causal):
    """|lse * log2(e)| >> LSE_EXACT: the preprocess's exact row statistics ([Note] large lse)."""
    q, k, v = make_qkv(1, 200, 190, 2, 1, 64, dtype=torch.bfloat16, device=device)
    _check(q * 16, k * 16, v, causal, scale=1.0)


def test_nonfinite_causal_defers(device):
    q, k, v = make_qkv(1, 100, 100, 2, 2, 64, dtype=torch.bfloat16, device=device)
    k[0, 90, 0, 3] = float("nan")  # hidden from rows < 90
    assert _fused(q, k, v, torch.randn_like(q), True, 0.125) is None


def test_deterministic_runs_tl(device):
    from tileattn.backends.triton.backward import backward
    from tileattn.backends.triton.forward import forward
    q, k, v = make_qkv(2, 500, 500, 4, 2, 128, dtype=torch.bfloat16, device=device)
    dout = torch.randn_like(q)
    out, lse = forward(q, k, v, _spec(True, 0.1))
    runs = [backward(dout, q, k, v, out, lse, _spec(True, 0.1), deterministic=True)[:3] for _ in range(3)]
    assert all(torch.equal(a, b) for r in runs[1:] for a, b in zip(runs[0], r))


def test_routing(device, monkeypatch):
    q, k, v = make_qkv(1, 64, 64, 2, 2, 128, dtype=torch.bfloat16, device=device)
    assert plan.backward_plan(q, k, v, causal=True).kernel == "gluon"
    assert "gluon bwd_kernel" in plan.describe(q, k, v, causal=True, backward=True)
    assert plan.backward_plan(q, k, v, softcap=5.0).kernel == "tl"
    monkeypatch.setenv("TILEATTN_GLUON_BWD", "0")
    assert plan.backward_plan(q, k, v, causal=True).kernel == "tl"
