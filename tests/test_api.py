"""The public API against the oracle, for every backend: forward, backward, varlen, layouts.

The same cases run with backend="cpu" and backend="triton" (through the Triton interpreter on
CPU, on the GPU under `make test-gpu`). Deeper per-backend suites live in test_cpu_backend.py,
test_triton_forward.py, test_triton_backward.py and test_kvcache*.py.
"""

import pytest
import torch

import tileattn
from tileattn import _philox, reference
from helpers import assert_close, cu_seqlens, leaf, make_qkv

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

# (name, (B, Sq, Sk, Hq, Hkv, D, Dv), keywords). Small, odd shapes: the interpreter is slow.
CASES = [
    ("plain", (2, 17, 33, 4, 4, 32, 32), {}),
    ("causal_sq<sk", (1, 19, 97, 4, 2, 64, 64), dict(causal=True)),
    ("causal_sq>sk", (2, 40, 13, 3, 1, 32, 32), dict(causal=True)),
    ("window", (1, 65, 65, 2, 2, 40, 40), dict(window=(9, 3))),
    ("gqa4_dv", (1, 33, 47, 8, 2, 64, 32), dict(causal=True)),
    ("softcap_alibi", (2, 21, 30, 4, 2, 32, 32), dict(softcap=2.0, alibi=True)),
    ("sinks_causal", (1, 30, 30, 4, 4, 80, 80), dict(causal=True, sinks=True)),
    ("bool_mask", (2, 17, 29, 4, 2, 32, 32), dict(mask="bool")),
    ("float_mask", (1, 23, 31, 2, 1, 32, 32), dict(mask="float")),
]


def _kwargs(spec, B, Sq, Sk, Hq, dtype, device):
    kw = {k: v for k, v in spec.items() if k not in ("alibi", "sinks", "mask")}
    if spec.get("alibi"):
        kw["alibi_slopes"] = torch.rand(Hq, device=device)
    if spec.get("sinks"):
        kw["sinks"] = torch.randn(Hq, device=device)
    if spec.get("mask") == "bool":
        mask = torch.rand(B, 1, Sq, Sk, device=device) > 0.3
        mask[..., 3, :] = False  # a fully masked row
        kw["attn_mask"] = mask
    elif spec.get("mask") == "float":
        kw["attn_mask"] = torch.randn(Hq, Sq, Sk, device=device, dtype=dtype)
    return kw


def _dtypes(backend):
    if backend == "triton" and not HAS_CUDA:
        return [torch.float32, torch.float16]  # bf16 tl.dot is wrong in the interpreter
    return [torch.float32, torch.float16, torch.bfloat16]


def _params():
    out = []
    for backend in ("cpu", "triton"):
        for dtype in _dtypes(backend):
            for name, shape, spec in CASES:
                device = "cpu" if backend == "cpu" else DEVICE
                out.append(pytest.param(backend, device, dtype, shape, spec,
                                        id=f"{backend}-{str(dtype)[6:]}-{name}"))
    return out


def _ref_kw(kw):
    return {k: v.cpu() if torch.is_tensor(v) else v for k, v in kw.items()}


@pytest.mark.parametrize("backend,device,dtype,shape,spec", _params())
def test_forward(backend, device, dtype, shape, spec):
    B, Sq, Sk, Hq, Hkv, D, Dv = shape
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, Dv, dtype=dtype, device=device)
    kw = _kwargs(spec, B, Sq, Sk, Hq, dtype, device)
    out, lse = tileattn.attention(q, k, v, return_lse=True, backend=backend, **kw)
    args = (q.cpu(), k.cpu(), v.cpu())
    hi_out, hi_lse = reference.attention(*args, **_ref_kw(kw))
    lo_out, lo_lse = reference.attention(*args, upcast=False, **_ref_kw(kw))
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close("out", out, hi_out, lo_out)
    assert_close("lse", lse, hi_lse, lo_lse, dtype=dtype)


@pytest.mark.parametrize("backend,device,dtype,shape,spec", _params())
def test_backward(backend, device, dtype, shape, spec):
    B, Sq, Sk, Hq, Hkv, D, Dv = shape
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, Dv, dtype=dtype, device=device, requires_grad=True)
    kw = _kwargs(spec, B, Sq, Sk, Hq, dtype, device)
    for name in ("sinks", "attn_mask"):
        if name in kw and kw[name].is_floating_point():
            kw[name].requires_grad_()
    dout = torch.randn(B, Sq, Hq, Dv, device=device, dtype=dtype)
    try:
        out = tileattn.attention(q, k, v, backend=backend, **kw)
    except NotImplementedError as err:
        pytest.skip(str(err))
    extra = [n for n in ("sinks", "attn_mask") if n in kw and kw[n].requires_grad]
    wrt = [q, k, v] + [kw[n] for n in extra]
    grads = torch.autograd.grad(out, wrt, dout)
    hi = _reference_grads(wrt, extra, kw, dout, upcast=True)
    lo = _reference_grads(wrt, extra, kw, dout, upcast=False)
    for name, g, h, l in zip(["dq", "dk", "dv"] + [f"d{n}" for n in extra], grads, hi, lo):
        assert_close(name, g, h, l, c=3.0, dtype=dtype)


def _reference_grads(wrt, extra, kw, dout, upcast):
    """Oracle gradients w.r.t. ``wrt`` (q, k, v, then the ``extra`` keywords): float64 or q's dtype."""
    leaves = [leaf(t.cpu(), torch.float64) if upcast else leaf(t.cpu()) for t in wrt]
    rkw = dict(_ref_kw(kw), **dict(zip(extra, leaves[3:])))
    o, _ = reference.attention(*leaves[:3], upcast=upcast, **rkw)
    return torch.autograd.grad(o, leaves, dout.cpu().to(o.dtype))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen(backend, causal):
    device = "cpu" if backend == "cpu" else DEVICE
    lens_q, lens_k = [5, 0, 17, 1], [9, 3, 17, 0]
    cq, ck = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)
    q = torch.randn(sum(lens_q), 4, 32, device=device)
    k, v = (torch.randn(sum(lens_k), 2, 32, device=device) for _ in range(2))
    out, lse = tileattn.attention_varlen(q, k, v, cq, ck, 17, 17, causal=causal, return_lse=True, backend=backend)
    hi_out, hi_lse = reference.attention_varlen(q.cpu(), k.cpu(), v.cpu(), cq.cpu(), ck.cpu(), causal=causal)
    assert_close("out", out, hi_out, None)
    assert_close("lse", lse, hi_lse, None, dtype=torch.float32)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_noncontiguous_bitwise(backend):
    device = "cpu" if backend == "cpu" else DEVICE
    torch.manual_seed(1)
    a = make_qkv(2, 37, 45, 4, 2, 32, dtype=torch.float16, device=device, layout="bhsd")
    b = [t.contiguous() for t in a]
    out_a = tileattn.attention(*a, causal=True, backend=backend)
    out_b = tileattn.attention(*b, causal=True, backend=backend)
    assert torch.equal(out_a, out_b)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_dropout(backend):
    device = "cpu" if backend == "cpu" else DEVICE
    q, k, v = make_qkv(2, 21, 34, 4, 2, 32, device=device)
    p = 0.3
    torch.manual_seed(7)
    out = tileattn.attention(q, k, v, dropout_p=p, causal=True, backend=backend)
    torch.manual_seed(7)
    seed = _philox.next_seed()
    keep = _philox.keep_mask(seed, p, 2, 4, 21, 34)
    hi, _ = reference.attention(q.cpu(), k.cpu(), v.cpu(), dropout_p=p, dropout_mask=keep, causal=True)
    assert_close("out", out, hi, None)
    assert 0.55 < keep.float().mean() < 0.85


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_forward_deterministic(backend):
    device = "cpu" if backend == "cpu" else DEVICE
    q, k, v = make_qkv(1, 50, 50, 4, 2, 32, dtype=torch.float16, device=device)
    first = tileattn.attention(q, k, v, causal=True, return_lse=True, backend=backend)
    second = tileattn.attention(q, k, v, causal=True, return_lse=True, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
