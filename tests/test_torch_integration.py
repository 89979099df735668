"""tileattn.sdpa vs torch's own SDPA, torch.compile(fullgraph=True), and torch.library.opcheck."""

import pytest
import torch
import torch.nn.functional as F

import tileattn
from tileattn import ops
from helpers import cu_seqlens

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SDPA_CASES = [  # (B, Hq, Hkv, L, S, E, Ev, mask, is_causal)
    (2, 4, 4, 17, 17, 32, 32, None, True),
    (1, 4, 4, 9, 23, 32, 16, None, True),     # L < S: torch's top-left causal
    (2, 3, 3, 23, 9, 32, 32, None, True),     # L > S
    (2, 4, 2, 15, 21, 64, 64, "bool", False),
    (1, 4, 1, 15, 21, 32, 32, "float", False),
    (2, 4, 4, 8, 8, 16, 16, "bool-row", False),  # a fully masked row
]


@pytest.mark.parametrize("case", SDPA_CASES, ids=[f"case{i}" for i in range(len(SDPA_CASES))])
def test_sdpa_matches_torch(case):
    B, Hq, Hkv, L, S, E, Ev, mask_kind, is_causal = case
    q = torch.randn(B, Hq, L, E, dtype=torch.float64).requires_grad_()
    k = torch.randn(B, Hkv, S, E, dtype=torch.float64).requires_grad_()
    v = torch.randn(B, Hkv, S, Ev, dtype=torch.float64).requires_grad_()
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(L, S) > 0.3
    elif mask_kind == "float":
        mask = torch.randn(B, 1, L, S, dtype=torch.float64)
    elif mask_kind == "bool-row":
        mask = torch.rand(B, 1, L, S) > 0.3
        mask[:, :, 2] = False
    gqa = Hq != Hkv
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
    dout = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (q, k, v), dout)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    fmask = mask.float() if mask is not None and mask.is_floating_point() else mask
    got = tileattn.sdpa(qf, kf, vf, attn_mask=fmask, is_causal=is_causal, enable_gqa=gqa)
    got_grads = torch.autograd.grad(got, (qf, kf, vf), dout.float())
    assert got.shape == want.shape
    want = torch.nan_to_num(want)  # torch may give NaN for a fully masked row; tileattn gives 0
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.double(), torch.nan_to_num(w), atol=1e-4, rtol=1e-4)


def test_compile_fullgraph_train_step():
    q, k, v = (torch.randn(2, 33, 4, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    sinks = torch.randn(4, device=DEVICE, requires_grad=True)

    def step(q, k, v, sinks):
        out = tileattn.attention(q, k, v, causal=True, sinks=sinks, softcap=5.0)
        return (out * out).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    loss = compiled(q, k, v, sinks)
    grads = torch.autograd.grad(loss, (q, k, v, sinks))
    eager = step(q, k, v, sinks)
    eager_grads = torch.autograd.grad(eager, (q, k, v, sinks))
    torch.testing.assert_close(loss, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


def test_compile_fullgraph_varlen_and_kvcache():
    lens = [3, 0, 11]
    cu = cu_seqlens(lens, DEVICE)
    q = torch.randn(14, 4, 32, device=DEVICE)
    kc, vc = torch.zeros(3, 16, 2, 32, device=DEVICE), torch.zeros(3, 16, 2, 32, device=DEVICE)
    kn, vn = torch.randn(3, 1, 2, 32, device=DEVICE), torch.randn(3, 1, 2, 32, device=DEVICE)
    seqlens = torch.tensor([0, 5, 9], dtype=torch.int32, device=DEVICE)

    def fn(q, kc, vc, kn, vn):
        a = tileattn.attention_varlen(q, q[:, :2], q[:, :2], cu, cu, 11, 11, causal=True)
        b = tileattn.attention_with_kvcache(q[:3, None], kc, vc, kn, vn, cache_seqlens=seqlens)
        return a, b

    kc2, vc2 = kc.clone(), vc.clone()
    a, b = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, kc, vc, kn, vn)
    ea, eb = fn(q, kc2, vc2, kn, vn)
    torch.testing.assert_close(a, ea)
    torch.testing.assert_close(b, eb)
    torch.testing.assert_close(kc, kc2)  # the in-place append happened under compile too


def test_opcheck():
    q, k, v = (torch.randn(1, 9, 2, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    sinks = torch.randn(2, device=DEVICE, requires_grad=True)
    args = (q, k, v, None, None, 9, 9, 0.25, -1, 0, 0.0, None, sinks, None, 0.0, None, False, False,
            "cpu" if DEVICE == "cpu" else "triton")
    torch.library.opcheck(ops.attention_fwd, args)
    kc, vc = torch.zeros(1, 16, 2, 16, device=DEVICE), torch.zeros(1, 16, 2, 16, device=DEVICE)
    seqlens = torch.tensor([4], dtype=torch.int32, device=DEVICE)
    kargs = (q.detach(), kc, vc, k.detach(), v.detach(), seqlens, None, 0.25, -1, 0, 0.0, None, None, 0, args[-1])
    torch.library.opcheck(ops.attention_kvcache, kargs, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("mask_shape", [(2, 1, 9, 11), (9, 11), (1, 3, 1, 11)])
def test_float_mask_grad_reduces_to_mask_shape(mask_shape):
    q = torch.randn(2, 9, 3, 16, requires_grad=True)
    k, v = torch.randn(2, 11, 3, 16), torch.randn(2, 11, 3, 16)
    mask = torch.randn(mask_shape, requires_grad=True)
    out = tileattn.attention(q, k, v, attn_mask=mask, backend="cpu")
    (grad,) = torch.autograd.grad(out.square().sum(), mask)
    ref_mask = mask.detach().double().requires_grad_()
    ref, _ = tileattn.reference.attention(q.detach().double(), k.double(), v.double(), attn_mask=ref_mask)
    (want,) = torch.autograd.grad(ref.square().sum(), ref_mask)
    assert grad.shape == mask.shape
    torch.testing.assert_close(grad.double(), want, atol=1e-5, rtol=1e-4)
