"""The Triton backward (``tileattn.backends.triton.backward``) against the oracle's autograd.

Calls the backend contract directly: out/lse from the Triton forward, gradients compared with
the reference's float64 (ref_hi) and same-dtype (ref_lo) autograd gradients by
RELIABILITY.md's rule with c = 3. On CPU the kernels run in the Triton interpreter
(fp32/fp16, small shapes); on CUDA every case also runs in bf16, plus larger GPU-only shapes.
"""

import contextlib
import math

import pytest
import torch
import triton
import triton.language as tl

import tileattn
from tileattn import reference
from tileattn.backends.triton import plan
from tileattn.backends.triton.plan import Config, configs as tables
from tileattn.backends.triton.backward import backward
from tileattn.backends.triton.backward_kernels import _block_and_head
from tileattn.score import ScoreSpec
from helpers import assert_close, cu_seqlens, leaf, make_qkv

try:
    from tileattn.backends.triton.forward import forward
except ImportError:  # developed before the Triton forward existed
    forward = reference.forward

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
NAMES = ("dq", "dk", "dv", "dsinks", "dmask")

# (name, (B, Sq, Sk, Hq, Hkv, D, Dv), spec). Odd lengths; CPU-sized (the interpreter is slow).
CASES = [
    ("plain", (2, 17, 33, 4, 4, 32, 32), {}),
    ("causal_sq<sk_gqa2", (1, 19, 97, 4, 2, 64, 64), dict(window=(-1, 0))),
    ("causal_sq>sk_mqa", (2, 40, 13, 3, 1, 32, 32), dict(window=(-1, 0))),  # empty rows 0..26
    ("window_d40", (1, 65, 65, 2, 2, 40, 40), dict(window=(9, 3))),
    ("window_left_only", (1, 70, 50, 2, 1, 32, 32), dict(window=(5, -1))),
    ("window_right_only", (1, 45, 70, 2, 2, 32, 32), dict(window=(-1, 7))),
    ("gqa4_dv32", (1, 33, 47, 8, 2, 64, 32), dict(window=(-1, 0))),
    ("d80_sinks_causal", (1, 30, 30, 2, 2, 80, 80), dict(window=(-1, 0), sinks=True)),
    ("softcap_alibi", (2, 21, 30, 4, 2, 32, 32), dict(softcap=2.0, alibi=True)),
    ("bool_mask_bcast", (2, 17, 29, 4, 2, 32, 32), dict(mask="bool")),
    ("float_mask_grad_causal", (1, 23, 31, 2, 1, 32, 32), dict(mask="float", mask_grad=True, window=(-1, 0))),
    ("dropout_causal", (2, 21, 34, 4, 2, 32, 32), dict(p=0.3, window=(-1, 0))),
    ("everything", (1, 37, 45, 4, 2, 32, 16), dict(p=0.2, window=(20, 2), softcap=3.0, alibi=True, sinks=True,
                                                   mask="float", mask_grad=True)),
    ("empty_window_sinks", (1, 40, 13, 2, 2, 32, 32), dict(window=(2, 0), sinks=True)),
    ("one_by_one_sinks", (1, 1, 1, 2, 1, 32, 32), dict(sinks=True)),
    # any finite scale (issue 17 class 2); sinks of -inf: no term, dsinks 0 (class 4)
    ("negative_scale_causal_sinks", (1, 29, 21, 4, 2, 32, 32), dict(window=(-1, 0), sinks=True, scale=-0.4)),
    ("negative_scale_softcap_alibi", (2, 21, 30, 4, 2, 32, 32), dict(softcap=2.0, alibi=True, scale=-0.3)),
    ("neg_inf_sinks_empty_rows", (2, 19, 11, 4, 2, 16, 16), dict(window=(-1, 0), sinks="-inf")),
]
GPU_CASES = [
    ("d128_causal_long", (2, 1023, 1025, 4, 2, 128, 128), dict(window=(-1, 0))),
    ("d192_dv128", (1, 255, 257, 4, 4, 192, 128), dict(window=(-1, 0))),
    ("d256_window", (1, 300, 300, 2, 1, 256, 256), dict(window=(100, 0), softcap=5.0)),
    ("d96_alibi_sinks", (2, 129, 127, 6, 3, 96, 96), dict(alibi=True, sinks=True, p=0.1)),
    ("d64_mask", (2, 200, 333, 4, 2, 64, 64), dict(mask="float", mask_grad=True, window=(50, 50))),
]


def _features(spec, B, Sq, Sk, Hq, D, dtype, device):
    """Contract keywords for ``spec`` (normalized as the API passes them: stride-0 expands)."""
    kw = dict(scale=spec.get("scale", 1.0 / math.sqrt(D)), window=spec.get("window", (-1, -1)),
              softcap=spec.get("softcap", 0.0),
              alibi_slopes=None, sinks=None, attn_mask=None, dropout_p=spec.get("p", 0.0), seed=1234567891011)
    if spec.get("alibi"):
        kw["alibi_slopes"] = torch.rand(Hq, device=device).expand(B, Hq)
    if spec.get("sinks") == "-inf":  # heads 0 and 2 opt out
        kw["sinks"] = torch.randn(Hq, device=device).index_fill_(0, torch.tensor([0, 2], device=device), float("-inf"))
    elif spec.get("sinks"):
        kw["sinks"] = torch.randn(Hq, device=device)
    if spec.get("mask") == "bool":
        mask = torch.rand(B, 1, Sq, Sk, device=device) > 0.3
        mask[..., 3 % Sq, :] = False  # a fully masked row
        kw["attn_mask"] = mask.expand(B, Hq, Sq, Sk)
    elif spec.get("mask") == "float":
        kw["attn_mask"] = torch.randn(Hq, Sq, Sk, device=device, dtype=dtype).expand(B, Hq, Sq, Sk)
    return kw


def _ref_kw(kw):
    """Contract keywords -> reference.attention keywords on CPU."""
    cpu = {n: (t.cpu() if torch.is_tensor(t) else t) for n, t in kw.items()}
    return dict(scale=cpu["scale"], window=cpu["window"], softcap=cpu["softcap"], alibi_slopes=cpu["alibi_slopes"],
                sinks=cpu["sinks"], attn_mask=cpu["attn_mask"], dropout_p=cpu["dropout_p"],
                dropout_seed=cpu["seed"])


def _reference_grads(dout, q, k, v, kw, mask_grad, upcast, varlen=None):
    """Oracle autograd gradients (dq, dk, dv, dsinks|None, dmask|None): float64 or q's dtype."""
    dtype = torch.float64 if upcast else q.dtype
    leaves = [leaf(t.cpu(), dtype) for t in (q, k, v)]
    rkw = _ref_kw(kw)
    extra = {}
    if rkw["sinks"] is not None:
        extra["sinks"] = rkw["sinks"] = leaf(rkw["sinks"], torch.float64 if upcast else None)
    if mask_grad:
        extra["attn_mask"] = rkw["attn_mask"] = leaf(rkw["attn_mask"].contiguous(), dtype)
    if varlen is None:
        o, _ = reference.attention(*leaves, upcast=upcast, **rkw)
    else:
        rkw.pop("attn_mask")
        o, _ = reference.attention_varlen(*leaves, *(c.cpu() for c in varlen), upcast=upcast, **rkw)
    grads = torch.autograd.grad(o, leaves + list(extra.values()), dout.cpu().to(o.dtype))
    it = iter(grads[3:])
    return (*grads[:3], next(it) if "sinks" in extra else None, next(it) if mask_grad else None)


def _check(got, dout, q, k, v, kw, mask_grad, varlen=None):
    hi = _reference_grads(dout, q, k, v, kw, mask_grad, True, varlen)
    lo = _reference_grads(dout, q, k, v, kw, mask_grad, False, varlen)
    for name, g, h, l in zip(NAMES, got, hi, lo):
        assert (g is None) == (h is None), name
        if g is not None:
            assert_close(name, g, h, l, c=3.0, dtype=q.dtype)
    dq, dk, dv = got[:3]
    assert dq.dtype == q.dtype and dk.dtype == k.dtype and dv.dtype == v.dtype
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


def _run_case(shape, spec, dtype, device, layout="bshd"):
    B, Sq, Sk, Hq, Hkv, D, Dv = shape
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, Dv, dtype=dtype, device=device, layout=layout)
    kw = _features(spec, B, Sq, Sk, Hq, D, dtype, device)
    out, lse = forward(q, k, v, ScoreSpec(**kw))
    dout = torch.randn_like(out)
    mask_grad = spec.get("mask_grad", False)
    got = backward(dout, q, k, v, out, lse, ScoreSpec(**kw), deterministic=False, mask_grad=mask_grad)
    _check(got, dout, q, k, v, kw, mask_grad)
    return got


def _run_varlen(lens_q, lens_k, Hq, Hkv, D, spec, dtype):
    """Varlen forward + backward of packed sequences of these lengths, checked against the oracle."""
    cq, ck = cu_seqlens(lens_q, DEVICE), cu_seqlens(lens_k, DEVICE)
    q = torch.randn(sum(lens_q), Hq, D, device=DEVICE, dtype=dtype)
    k, v = (torch.randn(sum(lens_k), Hkv, D, device=DEVICE, dtype=dtype) for _ in range(2))
    kw = _features(spec, len(lens_q), 1, 1, Hq, D, dtype, DEVICE)
    varlen = dict(cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k))
    out, lse = forward(q, k, v, ScoreSpec(**kw), **varlen)
    dout = torch.randn_like(out)
    got = backward(dout, q, k, v, out, lse, ScoreSpec(**kw), deterministic=False, mask_grad=False, **varlen)
    _check(got, dout, q, k, v, kw, False, varlen=(cq, ck))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("name,shape,spec", CASES, ids=[c[0] for c in CASES])
def test_backward(name, shape, spec, dtype):
    _run_case(shape, spec, dtype, DEVICE)


def test_neg_inf_sinks_give_zero_dsinks():
    """Heads with sink -inf (issue 17 class 4): dsinks exactly 0, never NaN, also with rows that
    keep nothing (causal Sq > Sk); the other heads' dsinks stay finite."""
    got = _run_case((2, 19, 11, 4, 2, 16, 16), dict(window=(-1, 0), sinks="-inf"), torch.float32, DEVICE)
    dsinks = got[3]
    assert (dsinks[[0, 2]] == 0).all() and dsinks.isfinite().all() and (dsinks[[1, 3]] != 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("name,shape,spec", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_backward_gpu_shapes(name, shape, spec, dtype):
    _run_case(shape, spec, dtype, "cuda")


def _force_configs(kv, q, **more):
    """While the block runs, the dK/dV kernel launches config ``kv`` and the dQ kernel ``q``
    (no autotuning); ``more``: other planner overrides (use_tma)."""
    return tileattn.plan.overrides(dkdv=[kv], dq=[q], **more)


@pytest.mark.parametrize("kv,q", [((16, 32), (32, 16)), ((64, 16), (16, 64))], ids=["m16n32", "m64n16"])
def test_block_shapes(kv, q):
    """The tiling logic (block ranges, edge tiles, GQA loop) is independent of the block sizes."""
    with _force_configs(Config(*kv, 4, 1), Config(*q, 4, 1)):
        for spec in (dict(window=(-1, 0), alibi=True), dict(window=(7, 3), mask="bool", p=0.2)):
            _run_case((1, 45, 38, 2, 1, 32, 32), spec, torch.float32, DEVICE)


@pytest.mark.gpu
@pytest.mark.parametrize("i", range(max(len(c) for c in (*tables.DKDV.values(), *tables.DQ.values()))))
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("tma", ["1", "0"], ids=["tma", "pointers"])
def test_every_tuned_config(tma, D, i):
    """Each sm_90 config the autotuner may pick is correct (not only the one it picked here),
    with tensor-descriptor and with pointer tile loads (the launcher picks by length)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("sm_90 config table")
    key = ("sm_90", "16", D)
    kv, q = tables.DKDV[key], tables.DQ[key]
    if i >= max(len(kv), len(q)):
        pytest.skip(f"D={D} has {max(len(kv), len(q))} configs")
    with _force_configs(kv[min(i, len(kv) - 1)], q[min(i, len(q) - 1)], use_tma=tma == "1"):
        for spec in (dict(window=(-1, 0)), dict(window=(100, 30), sinks=True, p=0.1, alibi=True)):
            _run_case((2, 300, 333, 4, 2, D, D), spec, torch.bfloat16, "cuda")


@pytest.mark.parametrize("tma", ["1", "0"], ids=["tma", "pointers"])
def test_tile_loads(tma):
    """Tensor-descriptor (TMA) and pointer loads of the inner loops' tiles: ragged last tiles,
    head dim 40 in a 64-wide block, GQA, windows, zero-length varlen sequences."""
    dtype = torch.bfloat16 if HAS_CUDA else torch.float16
    with tileattn.plan.overrides(use_tma=tma == "1"):
        q, k, v = make_qkv(1, 8, 8, 2, 1, 32, dtype=dtype, device=DEVICE)
        assert plan.plan_backward(q, k, v, q, ScoreSpec(scale=1.0), max_seqlen_q=8,
                                  max_seqlen_k=8).use_tma == (tma == "1")
        _run_case((1, 45, 38, 4, 2, 40, 40), dict(window=(-1, 0), alibi=True), dtype, DEVICE)
        _run_case((2, 33, 50, 2, 2, 32, 16), dict(window=(7, 3), sinks=True, p=0.2), dtype, DEVICE)
        _run_varlen([5, 0, 17, 3], [9, 3, 17, 0], 4, 2, 32, dict(window=(-1, 0)), dtype)


@triton.jit
def _order_kernel(Out, num_blocks, head_group):
    block, bh = _block_and_head(tl.program_id(0), num_blocks, head_group)
    tl.store(Out + 2 * tl.program_id(0), block)
    tl.store(Out + 2 * tl.program_id(0) + 1, bh)


@pytest.mark.parametrize("num_blocks,num_bh,head_group", [(5, 6, 1), (5, 6, 4), (3, 7, 2), (4, 3, 8), (1, 5, 4)])
def test_program_order(num_blocks, num_bh, head_group):
    """_block_and_head maps the 1-D grid onto every (block, batch * head) pair exactly once, a
    group of head_group heads (the last one partial) at a time with block 0 first in each group."""
    got = torch.zeros(num_blocks * num_bh, 2, dtype=torch.int32, device=DEVICE)
    _order_kernel[(num_blocks * num_bh,)](got, num_blocks, head_group)
    pairs = [tuple(p) for p in got.tolist()]
    assert sorted(pairs) == [(b, h) for b in range(num_blocks) for h in range(num_bh)]
    group = min(head_group, num_bh)
    assert pairs[:group] == [(0, h) for h in range(group)]
    assert pairs[group * num_blocks - 1] == (num_blocks - 1, group - 1)


def test_empty_rows_zero_grads():
    """Rows that keep no key (Sq > Sk causal) get exactly zero dq; no NaN anywhere."""
    got = _run_case((1, 40, 13, 2, 1, 32, 32), dict(window=(-1, 0)), torch.float32, DEVICE)
    assert torch.equal(got[0][:, :27], torch.zeros_like(got[0][:, :27]))
    assert all(g.isfinite().all() for g in got[:3])


def test_large_logits():
    """q*5, k*3 in fp16: finite and within tolerance."""
    B, Sq, Sk, Hq, Hkv, D = 1, 33, 40, 2, 2, 64
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, dtype=torch.float16, device=DEVICE)
    q, k = (q * 5).half(), (k * 3).half()
    kw = _features(dict(window=(-1, 0)), B, Sq, Sk, Hq, D, torch.float16, DEVICE)
    out, lse = forward(q, k, v, ScoreSpec(**kw))
    dout = torch.randn_like(out)
    got = backward(dout, q, k, v, out, lse, ScoreSpec(**kw), deterministic=False, mask_grad=False)
    _check(got, dout, q, k, v, kw, False)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen(causal):
    """Zero-length q and k sequences, per-sequence bottom-right causal, GQA, ALiBi, sinks, dropout."""
    spec = dict(window=(-1, 0) if causal else (-1, -1), alibi=True, sinks=True, p=0.25)
    _run_varlen([5, 0, 17, 1, 40, 3], [9, 3, 17, 0, 33, 0], 4, 2, 32, spec, torch.float32)


def test_varlen_all_empty_keys():
    """Every key sequence empty: all gradients exactly zero, dsinks zero."""
    lens_q, lens_k = [3, 7], [0, 0]
    cq, ck = cu_seqlens(lens_q, DEVICE), cu_seqlens(lens_k, DEVICE)
    q = torch.randn(10, 2, 32, device=DEVICE)
    k = v = torch.randn(0, 2, 32, device=DEVICE)
    kw = _features(dict(sinks=True), 2, 1, 1, 2, 32, q.dtype, DEVICE)
    varlen = dict(cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=7, max_seqlen_k=0)
    out, lse = forward(q, k, v, ScoreSpec(**kw), **varlen)
    dq, dk, dv, dsinks, _ = backward(torch.randn_like(out), q, k, v, out, lse, ScoreSpec(**kw), deterministic=False,
                                     mask_grad=False, **varlen)
    assert torch.equal(dq, torch.zeros_like(dq)) and dk.numel() == 0 and dv.numel() == 0
    assert torch.equal(dsinks, torch.zeros_like(dsinks))


def test_noncontiguous_bitwise():
    """(B,H,S,D) views of q/k/v and non-contiguous dout (transposed; last-dim stride 0) give
    bitwise the gradients of contiguous inputs."""
    a = make_qkv(1, 37, 45, 2, 1, 32, dtype=torch.float16, device=DEVICE, layout="bhsd")
    b = [t.contiguous() for t in a]
    kw = _features(dict(window=(-1, 0), alibi=True), 1, 37, 45, 2, 32, torch.float16, DEVICE)
    out, lse = forward(*b, ScoreSpec(**kw))
    dout_t = torch.randn(1, 2, 37, 32, dtype=torch.float16, device=DEVICE).transpose(1, 2)
    dout_e = torch.randn(1, 37, 2, 1, dtype=torch.float16, device=DEVICE).expand(1, 37, 2, 32)
    for dout in (dout_t, dout_e):
        ref = backward(dout.contiguous(), *b, out, lse, ScoreSpec(**kw), deterministic=False, mask_grad=False)
        got = backward(dout, *a, out, lse, ScoreSpec(**kw), deterministic=False, mask_grad=False)
        for g, r in zip(got[:3], ref[:3]):
            assert torch.equal(g, r)


def test_seed_per_call():
    """The dropout seed is per call: two calls of the same shapes with different seeds each
    match the oracle with their own seed (no cached launch state carries a seed over)."""
    q, k, v = make_qkv(1, 19, 23, 2, 2, 32, dtype=torch.float32, device=DEVICE)
    dout = torch.randn_like(q)
    for seed in (11, 22):
        kw = _features(dict(p=0.4), 1, 19, 23, 2, 32, torch.float32, DEVICE)
        kw["seed"] = seed
        out, lse = forward(q, k, v, ScoreSpec(**kw))
        got = backward(dout, q, k, v, out, lse, ScoreSpec(**kw), deterministic=False, mask_grad=False)
        _check(got, dout, q, k, v, kw, False)


def _poison_allocations(monkeypatch):
    """torch.empty / torch.empty_like return NaN-filled floating tensors from here on."""
    def poisoned(empty):
        def make(*args, **kwargs):
            t = empty(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        return make

    monkeypatch.setattr(torch, "empty", poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(torch.empty_like))


@pytest.mark.parametrize("forced", [None, ((64, 32), (16, 32))], ids=["default", "dkdv_m64_dq_m16"])
def test_writes_every_element(monkeypatch, forced):
    """Outputs and the padded lse2/delta buffers allocated NaN-poisoned: every dq/dk/dv element
    is written (windows skip tiles), and so is every padded row stat the dK/dV kernel reads
    (with dQ row blocks of 16, rows 80..127 come from the last row block's padding loop)."""
    B, Sq, Sk, Hq, Hkv, D = 1, 70, 50, 2, 1, 32
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, device=DEVICE)
    kw = _features(dict(window=(3, 0)), B, Sq, Sk, Hq, D, q.dtype, DEVICE)
    out, lse = reference.forward(q, k, v, ScoreSpec(**kw))
    _poison_allocations(monkeypatch)
    forcing = (contextlib.nullcontext() if forced is None else
               _force_configs(Config(*forced[0], 4, 1), Config(*forced[1], 4, 1)))
    with forcing:
        got = backward(torch.randn_like(out), q, k, v, out, lse, ScoreSpec(**kw), deterministic=False,
                       mask_grad=False)
    assert all(g.isfinite().all() for g in got[:3])


def test_varlen_row_stats_padding(monkeypatch):
    """Varlen padded row stats (sequence b's rows after cu_seqlens_q[b] + b * ROW_PAD): with
    NaN-poisoned buffers and dK/dV row blocks of 64 over dQ blocks of 16, every row dK/dV reads
    is written, for ragged, empty and multi-block sequences; gradients match the oracle."""
    lens_q, lens_k = [70, 0, 45, 130], [50, 9, 45, 140]
    cq, ck = cu_seqlens(lens_q, DEVICE), cu_seqlens(lens_k, DEVICE)
    Hq, Hkv, D = 2, 1, 32
    q = torch.randn(sum(lens_q), Hq, D, device=DEVICE)
    k, v = (torch.randn(sum(lens_k), Hkv, D, device=DEVICE) for _ in range(2))
    kw = _features(dict(window=(3, 0)), len(lens_q), 1, 1, Hq, D, q.dtype, DEVICE)
    varlen = dict(cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k))
    out, lse = reference.forward(q, k, v, ScoreSpec(**kw), **varlen)
    dout = torch.randn_like(out)
    _poison_allocations(monkeypatch)
    with _force_configs(Config(64, 32, 4, 1), Config(16, 32, 4, 1)):
        got = backward(dout, q, k, v, out, lse, ScoreSpec(**kw), deterministic=False, mask_grad=False, **varlen)
    monkeypatch.undo()
    _check(got, dout, q, k, v, kw, False, varlen=(cq, ck))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_deterministic_20_runs(dtype):
    """deterministic=True: 20 runs give bitwise equal dq, dk, dv, dsinks, dmask."""
    B, Sq, Sk, Hq, Hkv, D = 2, 777, 1025, 8, 2, 128
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, dtype=dtype, device="cuda")
    kw = _features(dict(window=(-1, 0), sinks=True, p=0.1, mask="float", mask_grad=True), B, Sq, Sk, Hq, D,
                   dtype, "cuda")
    out, lse = forward(q, k, v, ScoreSpec(**kw))
    dout = torch.randn_like(out)
    first = backward(dout, q, k, v, out, lse, ScoreSpec(**kw), deterministic=True, mask_grad=True)
    for _ in range(19):
        again = backward(dout, q, k, v, out, lse, ScoreSpec(**kw), deterministic=True, mask_grad=True)
        for a, b in zip(again, first):
            assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.slow
def test_int64_offsets():
    """Batch strides past 2**31 elements (q/k/v views into 4 GiB buffers): no int32 overflow,
    bitwise equal to the gradients of contiguous copies."""
    B, S, H, D = 2, 64, 2, 64
    step = 2**31 + 4096

    def huge_view():
        buf = torch.empty(step + S * H * D, dtype=torch.bfloat16, device="cuda")
        return buf.as_strided((B, S, H, D), (step, H * D, D, 1)).normal_()

    q, k, v = huge_view(), huge_view(), huge_view()
    small = [t.contiguous() for t in (q, k, v)]
    kw = _features(dict(window=(-1, 0), sinks=True), B, S, S, H, D, torch.bfloat16, "cuda")
    out, lse = forward(*small, ScoreSpec(**kw))
    dout = torch.randn_like(out)
    ref = backward(dout, *small, out, lse, ScoreSpec(**kw), deterministic=True, mask_grad=False)
    got = backward(dout, q, k, v, out, lse, ScoreSpec(**kw), deterministic=True, mask_grad=False)
    for g, r in zip(got[:4], ref[:4]):
        assert torch.equal(g, r)
