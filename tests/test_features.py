"""The feature matrix: every score feature x entry point x backend x dtype against the oracle.

One table, ``FEATURES``: a feature case, its small odd shape, its public keywords and, per entry
point, whether the entry point serves it. The matrix runs every served pair through the public
API only (``tileattn.attention`` / ``attention_varlen`` / ``attention_with_kvcache`` /
``sdpa``, ``backend=`` where the entry point has one) and compares with ``tileattn.reference``
by RELIABILITY.md's rule (``helpers.assert_close``: fp32 within 1e-5 of float64; fp16/bf16
within c x the plain low-precision error, c = 2 for out/lse, c = 3 for gradients):

    out, lse, dq, dk, dv, dsinks, dmask     attention, varlen, sdpa (sdpa has no lse)
    out, lse, the cache writes (bitwise), nothing written past them      kvcache, paged

Every test runs under conftest's ``poison`` fixture (fresh allocations are NaN), so an output
element a kernel leaves unwritten fails. Rows that keep no key must give exactly 0 out and 0 dq.

Axes (the ids read ``entry-backend-dtype-feature``):

- feature: the rows of FEATURES.
- entry: attention | varlen (packed sequences, with a zero-length q and a zero-length k
  sequence) | kvcache (contiguous cache; a batch row with an empty cache) | paged1 / paged5 /
  paged16 (shuffled pages of that size, spare pages) | sdpa ((B, H, L, E), top-left causal).
- backend: cpu | triton (the interpreter on CPU, compiled on CUDA) | reference (the oracle as a
  backend: fp32 self-check of the API plumbing). sdpa has no backend argument: "cpu" runs it on
  CPU tensors, "triton" on CUDA tensors (GPU only).
- dtype: fp32, fp16, bf16. The Triton interpreter refuses bf16 (its bf16 dot is wrong,
  TOOLCHAIN.md): triton-bf16 cases are ``gpu``-marked and ``test_interpreter_refuses_bf16``
  asserts the error instead. Paged layouts run one dtype per backend (fp16; reference fp32);
  triton varlen runs fp32 (and bf16 on the GPU): its fp16 dots are the attention entry's.

An entry point that does not serve a feature says why in the table: the keyword it lacks
(``test_unsupported`` asserts the TypeError naming it). ``attention_with_kvcache`` has no
backward: ``test_kvcache_has_no_backward`` asserts its ``tileattn:`` NotImplementedError.
"""

from dataclasses import dataclass, field

import pytest
import torch

import tileattn
from tileattn import _philox, reference
from helpers import assert_cancelled, assert_close, cu_seqlens, leaf, make_qkv, to_paged

pytestmark = pytest.mark.usefixtures("poison")

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
OK = "ok"
SEED = 1234


@dataclass(frozen=True)
class Feature:
    """One row of the table.

    shape: (B, Sq, Sk, Hq, Hkv, D, Dv). kw: public keywords, tensors given symbolically and
    drawn per call: alibi "h" (Hq,) / "bh" (B, Hq) slopes; sinks True (learnable (Hq,) logits);
    mask "bool" (B, 1, Sq, Sk) with an all-False row, "float" (Hq, Sq, Sk) learnable,
    "bool_empty" (1, 1, Sq, Sk) with all-False rows, "neg_inf" learnable float with -inf rows.
    qmul: q is scaled by it (large scores). layout: "bhsd" / "padded" non-contiguous inputs and
    grad, also checked bitwise against the contiguous call. support: entry -> OK or the
    keyword that entry point lacks; kvcache covers the paged entries.
    """

    shape: tuple
    kw: dict
    attention: str = OK
    varlen: str = OK
    kvcache: str = OK
    sdpa: str = OK
    qmul: float = 1.0
    layout: str = "bshd"
    extra: dict = field(default_factory=dict)


# The kv-cache and varlen adaptations of a shape (Sq, Sk): see _run_kvcache / _run_varlen.
FEATURES = {
    #                     (B, Sq, Sk, Hq, Hkv, D, Dv)
    "plain": Feature((2, 17, 33, 4, 4, 32, 32), {}),
    "causal_sq<sk": Feature((1, 17, 97, 4, 2, 32, 32), dict(causal=True)),
    "causal_sq>sk": Feature((2, 33, 17, 3, 1, 32, 32), dict(causal=True)),  # leading rows empty
    "window_left": Feature((1, 97, 97, 2, 2, 40, 40), dict(window=(9, -1)), sdpa="window"),
    "window_right": Feature((1, 33, 47, 2, 1, 32, 32), dict(window=(-1, 5)), sdpa="window"),
    "window_both": Feature((2, 29, 29, 2, 2, 32, 32), dict(window=(6, 3)), sdpa="window"),
    "causal_window": Feature((1, 40, 65, 4, 2, 32, 32), dict(causal=True, window=(12, -1)), sdpa="window"),
    "softcap": Feature((2, 21, 30, 4, 2, 32, 32), dict(softcap=2.0), qmul=4.0, sdpa="softcap"),
    "scale": Feature((1, 19, 23, 2, 2, 32, 32), dict(scale=0.3, causal=True)),
    "alibi_h": Feature((2, 21, 30, 4, 2, 32, 32), dict(alibi="h", causal=True), sdpa="alibi_slopes"),
    "alibi_bh": Feature((2, 30, 21, 4, 2, 32, 32), dict(alibi="bh"), sdpa="alibi_slopes"),
    "sinks": Feature((1, 30, 30, 4, 4, 80, 80), dict(sinks=True, causal=True), sdpa="sinks"),
    "bool_mask": Feature((2, 17, 29, 4, 2, 32, 32), dict(mask="bool"), varlen="attn_mask", kvcache="attn_mask"),
    "float_mask": Feature((1, 23, 31, 2, 1, 32, 32), dict(mask="float"), varlen="attn_mask", kvcache="attn_mask"),
    "dropout": Feature((2, 21, 34, 4, 2, 32, 32), dict(dropout_p=0.3, causal=True), kvcache="dropout_p"),
    "gqa3": Feature((1, 33, 47, 6, 2, 64, 64), dict(causal=True)),
    "mqa": Feature((2, 19, 23, 4, 1, 32, 32), {}),
    "dv<d": Feature((1, 33, 65, 2, 1, 64, 32), {}),
    "dv>d": Feature((1, 17, 29, 2, 2, 16, 40), dict(causal=True)),
    "empty_rows_bool": Feature((2, 9, 13, 2, 1, 16, 16), dict(mask="bool_empty"), varlen="attn_mask",
                               kvcache="attn_mask"),
    "empty_rows_neg_inf": Feature((1, 9, 13, 2, 2, 16, 16), dict(mask="neg_inf", sinks=True), varlen="attn_mask",
                                  kvcache="attn_mask", sdpa="sinks"),
    "empty_rows_sinks": Feature((2, 21, 8, 2, 1, 16, 16), dict(causal=True, window=(3, -1), sinks=True),
                                sdpa="window"),
    "noncontig_bhsd": Feature((2, 37, 45, 4, 2, 32, 32), dict(causal=True), layout="bhsd"),
    "noncontig_padded": Feature((1, 29, 33, 2, 1, 32, 32), dict(alibi="h", sinks=True), layout="padded",
                                sdpa="alibi_slopes"),
    "noncontig_dropout": Feature((2, 29, 29, 4, 2, 48, 48), dict(causal=True, softcap=4.0, dropout_p=0.1),
                                 layout="bhsd", kvcache="dropout_p", sdpa="softcap"),
    "len_1x1": Feature((1, 1, 1, 2, 1, 16, 16), {}),
    "len_1x129": Feature((2, 1, 129, 4, 2, 32, 32), dict(causal=True)),
    "len_17x97": Feature((1, 17, 97, 2, 2, 32, 32), {}),
    "len_129x129": Feature((1, 129, 129, 2, 1, 16, 16), dict(causal=True)),
    "len_97x17": Feature((1, 97, 17, 3, 3, 16, 16), dict(causal=True)),
    "combined": Feature((2, 37, 45, 6, 2, 32, 32), dict(softcap=3.0, alibi="bh", sinks=True, window=(11, 2)),
                        qmul=2.0, sdpa="window"),
    "combined_mask_dropout": Feature((2, 25, 31, 4, 2, 32, 32),
                                     dict(softcap=3.0, alibi="h", sinks=True, window=(9, -1), mask="float",
                                          dropout_p=0.2), varlen="attn_mask", kvcache="attn_mask", sdpa="window"),
}

ENTRIES = ("attention", "varlen", "kvcache", "paged1", "paged5", "paged16", "sdpa")
BACKENDS = ("cpu", "triton", "reference")


def _support(feature, entry):
    return getattr(feature, "kvcache" if entry.startswith("paged") else entry)


def _dtypes(entry, backend):
    if backend == "reference":
        return [F32]
    if entry.startswith("paged"):
        return [F16]
    if entry == "varlen" and backend == "triton":  # the interpreter's slowest column; fp16 is
        return [F32, BF16]                        # covered by the attention entry's kernels
    return [F32, F16, BF16]


def _matrix():
    """pytest params (feature, entry, backend, dtype) of every served pair."""
    params = []
    for entry in ENTRIES:
        for backend in BACKENDS:
            if entry == "sdpa" and backend == "reference":
                continue  # sdpa has no backend argument
            for dtype in _dtypes(entry, backend):
                marks = []
                if backend == "triton" and (dtype == BF16 or entry == "sdpa"):
                    marks.append(pytest.mark.gpu)  # interpreter: no bf16; sdpa: CUDA tensors only
                for name, f in FEATURES.items():
                    if _support(f, entry) == OK:
                        params.append(pytest.param(name, entry, backend, dtype, marks=marks,
                                                   id=f"{entry}-{backend}-{str(dtype)[6:]}-{name}"))
    return params


# ----------------------------------------------------------------------------- inputs


def _device(backend):
    return "cpu" if backend in ("cpu", "reference") else DEVICE


def _keywords(f, B, Sq, Sk, Hq, dtype, device):
    """(keywords, learnable): the feature's public keywords with tensors drawn; ``learnable``
    maps "sinks" / "attn_mask" to the leaves whose gradients are checked."""
    kw = {n: v for n, v in f.kw.items() if n not in ("alibi", "sinks", "mask")}
    learn = {}
    if f.kw.get("alibi") == "h":
        kw["alibi_slopes"] = torch.rand(Hq, device=device)
    elif f.kw.get("alibi") == "bh":
        kw["alibi_slopes"] = torch.rand(B, Hq, device=device)
    if f.kw.get("sinks"):
        learn["sinks"] = (torch.randn(Hq, device=device) * 2).requires_grad_()
    mask = f.kw.get("mask")
    if mask == "bool":
        m = torch.rand(B, 1, Sq, Sk, device=device) > 0.3
        m[..., min(3, Sq - 1), :] = False
        kw["attn_mask"] = m
    elif mask == "bool_empty":
        m = torch.rand(1, 1, Sq, Sk, device=device) > 0.5
        m[..., ::3, :] = False
        kw["attn_mask"] = m
    elif mask == "float":
        learn["attn_mask"] = torch.randn(Hq, Sq, Sk, device=device, dtype=dtype).requires_grad_()
    elif mask == "neg_inf":
        m = torch.randn(1, Hq, Sq, Sk, device=device, dtype=dtype)
        m[:, :, 1::4] = float("-inf")
        m[:, 0, 2, :] = float("-inf")
        learn["attn_mask"] = m.requires_grad_()
    return kw, learn


def _scaled_q(q, f):
    return q if f.qmul == 1.0 else leaf(q * f.qmul)


def _seeded(call):
    """Run ``call`` after seeding torch's generator; return (result, the Philox key it drew)."""
    torch.manual_seed(SEED)
    result = call()
    torch.manual_seed(SEED)
    return result, _philox.next_seed()


def _cpu(kw):
    return {n: (v.detach().cpu() if torch.is_tensor(v) else v) for n, v in kw.items()}


def _oracle(fn, inputs, kw, learn, dout, upcast, **extra):
    """(out, lse, grads) of the oracle ``fn`` on CPU copies of ``inputs`` and ``learn``:
    float64 leaves when ``upcast``, else the inputs' dtypes; grads of out under ``dout``
    for inputs + learn (None when ``dout`` is None)."""
    wide = torch.float64 if upcast else None
    leaves = [leaf(t.cpu(), wide) for t in inputs]
    learned = {n: leaf(t.cpu(), wide) for n, t in learn.items()}
    with torch.enable_grad():
        out, lse = fn(*leaves, **_cpu(kw), **learned, **extra, upcast=upcast)
        grads = None
        if dout is not None:
            grads = torch.autograd.grad(out, leaves + list(learned.values()), dout.cpu().to(out.dtype))
    return out.detach(), lse.detach(), grads


def _compare(names, got, hi, lo, dtype, c, cancel=None):
    """assert_close each output. ``cancel`` (q, k, v, dout): where the oracle's dq or dk is
    exactly 0 everywhere (every row keeps one key: dS = P (dP - delta) cancels exactly), the
    relative rule has no scale; the result must then be fp32 noise of the cancelling terms."""
    for name, g, h, l in zip(names, got, hi, lo):
        if cancel is not None and name in ("dq", "dk") and not h.any():
            assert_cancelled(name, g, *cancel)
            continue
        assert_close(name, g, h, l, c=c, dtype=dtype if name in ("lse", "dsinks", "dmask") else None)


def _empty_rows(lse_nosinks, rows, *tensors):
    """Rows that keep no key (oracle lse without sinks is -inf) give exactly 0 in ``tensors``;
    ``rows`` maps a tensor to a view whose leading dims are lse's."""
    empty = lse_nosinks == float("-inf")
    for name, t in tensors:
        got = rows(t).detach().cpu()[empty]
        assert (got == 0).all(), f"{name}: a row that keeps no key is not exactly 0"


def _hidden_mask_grad(learn, grads):
    """A float mask's -inf entries get exactly zero gradient (dmask is the last grad)."""
    if "attn_mask" in learn:
        hidden = learn["attn_mask"].detach() == float("-inf")
        assert (grads[-1][hidden] == 0).all(), "dmask: nonzero where the mask is -inf"


def _grad_names(learn):
    return ["dq", "dk", "dv"] + [{"sinks": "dsinks", "attn_mask": "dmask"}[n] for n in learn]


# ----------------------------------------------------------------------------- entry points


def _run_attention(f, backend, dtype):
    B, Sq, Sk, Hq, Hkv, D, Dv = f.shape
    device = _device(backend)
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, Dv, dtype=dtype, device=device, layout=f.layout, requires_grad=True)
    q = _scaled_q(q, f)
    kw, learn = _keywords(f, B, Sq, Sk, Hq, dtype, device)
    dout = torch.randn(B, Sq, Hq, Dv, dtype=dtype, device=device)
    if f.layout != "bshd":
        dout = torch.randn(B, Hq, Sq, Dv, dtype=dtype, device=device).transpose(1, 2)

    def call(q, k, v, dout):
        out, lse = tileattn.attention(q, k, v, **kw, **learn, return_lse=True, deterministic=True, backend=backend)
        return out, lse, torch.autograd.grad(out, [q, k, v, *learn.values()], dout)

    (out, lse, grads), seed = _seeded(lambda: call(q, k, v, dout))
    assert out.dtype == dtype and lse.dtype == F32 and out.shape == (B, Sq, Hq, Dv) and lse.shape == (B, Hq, Sq)
    extra = dict(dropout_seed=seed) if kw.get("dropout_p") else {}
    hi = _oracle(reference.attention, (q, k, v), kw, learn, dout, True, **extra)
    lo = hi if dtype == F32 else _oracle(reference.attention, (q, k, v), kw, learn, dout, False, **extra)
    _compare(["out", "lse"], [out, lse], hi[:2], lo[:2], dtype, c=2.0)
    _compare(_grad_names(learn), grads, hi[2], lo[2], dtype, c=3.0, cancel=(q, k, v, dout))
    _hidden_mask_grad(learn, grads)
    nosinks = {n: t for n, t in learn.items() if n != "sinks"}
    lse0 = _oracle(reference.attention, (q, k, v), {**kw, "dropout_p": 0.0}, nosinks, None, True)[1]
    _empty_rows(lse0, lambda t: t.transpose(1, 2), ("out", out), ("dq", grads[0]))
    if f.layout != "bshd":  # non-contiguous inputs and grad: bitwise the contiguous result
        contiguous = [leaf(t.contiguous()) for t in (q, k, v)]
        (out_c, lse_c, grads_c), _ = _seeded(lambda: call(*contiguous, dout.contiguous()))
        for name, a, b in zip(["out", "lse", *_grad_names(learn)], [out, lse, *grads], [out_c, lse_c, *grads_c]):
            assert torch.equal(a, b), f"{name}: non-contiguous inputs change the result"


def _varlen_lengths(Sq, Sk):
    """Four sequences: the feature's (Sq, Sk), a zero-length q, a zero-length k (its rows keep
    nothing) and a shorter one of the same proportions."""
    return [Sq, 0, 5, Sq // 2 + 1], [Sk, 3, 0, Sk // 2 + 1]


def _run_varlen(f, backend, dtype):
    _, Sq, Sk, Hq, Hkv, D, Dv = f.shape
    device = _device(backend)
    lens_q, lens_k = _varlen_lengths(Sq, Sk)
    B, Tq, Tk = len(lens_q), sum(lens_q), sum(lens_k)
    cq, ck = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)

    def tokens(T, H, d):
        if f.layout == "bhsd":
            return torch.randn(H, T, d, dtype=dtype, device=device).transpose(0, 1).requires_grad_()
        if f.layout == "padded":
            return torch.randn(T, H, d + 8, dtype=dtype, device=device)[..., :d].requires_grad_()
        return torch.randn(T, H, d, dtype=dtype, device=device, requires_grad=True)

    q, k, v = tokens(Tq, Hq, D), tokens(Tk, Hkv, D), tokens(Tk, Hkv, Dv)
    q = _scaled_q(q, f)
    kw, learn = _keywords(f, B, Sq, Sk, Hq, dtype, device)
    dout = tokens(Tq, Hq, Dv).detach()
    lens = (cq, ck, max(lens_q), max(lens_k))

    def call(q, k, v, dout):
        out, lse = tileattn.attention_varlen(q, k, v, *lens, **kw, **learn, return_lse=True, deterministic=True,
                                             backend=backend)
        return out, lse, torch.autograd.grad(out, [q, k, v, *learn.values()], dout)

    (out, lse, grads), seed = _seeded(lambda: call(q, k, v, dout))
    assert out.dtype == dtype and out.shape == (Tq, Hq, Dv) and lse.shape == (Hq, Tq)

    def oracle(q, k, v, **kw):
        return reference.attention_varlen(q, k, v, cq.cpu(), ck.cpu(), **kw)

    extra = dict(dropout_seed=seed) if kw.get("dropout_p") else {}
    hi = _oracle(oracle, (q, k, v), kw, learn, dout, True, **extra)
    lo = hi if dtype == F32 else _oracle(oracle, (q, k, v), kw, learn, dout, False, **extra)
    _compare(["out", "lse"], [out, lse], hi[:2], lo[:2], dtype, c=2.0)
    _compare(_grad_names(learn), grads, hi[2], lo[2], dtype, c=3.0, cancel=(q, k, v, dout))
    lse0 = _oracle(oracle, (q, k, v), {**kw, "dropout_p": 0.0}, {}, None, True)[1]
    _empty_rows(lse0, lambda t: t.transpose(0, 1), ("out", out), ("dq", grads[0]))
    if f.layout != "bshd":
        contiguous = [leaf(t.contiguous()) for t in (q, k, v)]
        (out_c, lse_c, grads_c), _ = _seeded(lambda: call(*contiguous, dout.contiguous()))
        for name, a, b in zip(["out", "lse", *_grad_names(learn)], [out, lse, *grads], [out_c, lse_c, *grads_c]):
            assert torch.equal(a, b), f"{name}: non-contiguous inputs change the result"


def _kvcache_setup(f, dtype, device):
    """(q, k_cache, v_cache, k_new, v_new, lens, used, kw): B + 1 batch rows. Sk >= Sq: the Sq
    new tokens are appended after Sk - Sq cached ones (row 1: an empty cache, rows 2..: half);
    Sk < Sq: no new tokens, Sk cached (row 1 keeps no key at all). Slots past ``used`` are NaN."""
    B, Sq, Sk, Hq, Hkv, D, Dv = f.shape
    append = Sk >= Sq
    base = Sk - Sq if append else Sk
    lens = [base, 0] + [base // 2] * (B - 1)
    used = [n + (Sq if append else 0) for n in lens]
    smax = max(used) + 3
    rows = len(lens)

    def make(*shape):
        x = torch.randn(*shape, dtype=dtype, device=device)
        if f.layout == "bhsd":  # (B, S, H, D) view of (B, H, S, D) storage
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        elif f.layout == "padded":
            x = torch.nn.functional.pad(x, (0, 8))[..., :shape[-1]]
        return x

    q = make(rows, Sq, Hq, D) * f.qmul
    kc, vc = make(rows, smax, Hkv, D).contiguous(), make(rows, smax, Hkv, Dv).contiguous()
    for c in (kc, vc):
        for b, n in enumerate(used):
            c[b, n:] = float("nan")
    k_new, v_new = (make(rows, Sq, Hkv, D), make(rows, Sq, Hkv, Dv)) if append else (None, None)
    kw, _ = _keywords(f, rows, Sq, Sk, Hq, dtype, device)
    kw.setdefault("causal", False)  # attention_with_kvcache defaults to causal=True
    if f.kw.get("sinks"):
        kw["sinks"] = torch.randn(Hq, device=device) * 2
    return q, kc, vc, k_new, v_new, lens, used, kw


def _page(cache, block_size, used, table=None):
    """Shuffled pages of ``cache`` (+3 spare); every slot not holding a position < used[b] is NaN."""
    paged, table = to_paged(cache, block_size, table=table)
    stale = torch.ones(paged.shape[:2], dtype=torch.bool, device=paged.device)
    for b, n in enumerate(used):
        pos = torch.arange(n, device=paged.device)
        stale[table[b, pos // block_size].long(), pos % block_size] = False
    paged[stale] = float("nan")
    return paged, table, stale


def _run_kvcache(f, entry, backend, dtype):
    device = _device(backend)
    q, kc, vc, k_new, v_new, lens, used, kw = _kvcache_setup(f, dtype, device)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    refs = []
    for upcast in (True, False) if dtype != F32 else (True,):
        kr, vr = kc.cpu().clone(), vc.cpu().clone()
        new = [None if t is None else t.cpu() for t in (k_new, v_new)]
        refs.append((*reference.attention_with_kvcache(q.cpu(), kr, vr, *new, cache_seqlens=seqlens.cpu(),
                                                       **_cpu(kw), upcast=upcast), kr, vr))
    hi, lo = refs[0], refs[-1]
    table = None
    kb, vb = kc.clone(), vc.clone()
    if entry != "kvcache":
        bs = int(entry[len("paged"):])
        kb, table, stale = _page(kc, bs, used)
        vb, _, _ = _page(vc, bs, used, table=table)
    out, lse = tileattn.attention_with_kvcache(q, kb, vb, k_new, v_new, cache_seqlens=seqlens, block_table=table,
                                               **kw, return_lse=True, backend=backend)
    assert out.dtype == dtype and out.shape == (len(lens), q.shape[1], q.shape[2], vc.shape[-1])
    assert lse.dtype == F32 and lse.shape == (len(lens), q.shape[2], q.shape[1])
    _compare(["out", "lse"], [out, lse], hi[:2], lo[:2], dtype, c=2.0)
    lse0 = reference.attention_with_kvcache(q.cpu(), kc.cpu().clone(), vc.cpu().clone(),
                                            *[None if t is None else t.cpu() for t in (k_new, v_new)],
                                            cache_seqlens=seqlens.cpu(), **_cpu({**kw, "sinks": None}))[1]
    _empty_rows(lse0, lambda t: t.transpose(1, 2), ("out", out))
    for name, ours, theirs in (("k_cache", kb, hi[2]), ("v_cache", vb, hi[3])):
        for b, n in enumerate(used):
            pos = torch.arange(n, device=ours.device)
            got = ours[b, :n] if table is None else ours[table[b, pos // bs].long(), pos % bs]
            assert torch.equal(got.cpu(), theirs[b, :n]), f"{name}[{b}]: cache contents differ from the oracle's"
        untouched = ours[stale] if table is not None else torch.cat([ours[b, n:] for b, n in enumerate(used)])
        assert untouched.isnan().all(), f"{name}: written outside positions 0 .. cache_seqlens + Sn"


def _run_sdpa(f, backend, dtype):
    B, Sq, Sk, Hq, Hkv, D, Dv = f.shape
    device = _device(backend)
    # sdpa's own layout is (B, H, L, E): "bshd" gives it contiguous tensors, "bhsd" transposed
    # views of (B, L, H, E) storage, "padded" slices of a wider last dim
    storage = {"bshd": "bhsd", "bhsd": "bshd", "padded": "padded"}[f.layout]
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, Dv, dtype=dtype, device=device, layout=storage)
    q, k, v = (leaf(t.transpose(1, 2)) for t in (q, k, v))
    q = _scaled_q(q, f)
    kw, learn = _keywords(f, B, Sq, Sk, Hq, dtype, device)
    mask = learn.get("attn_mask", kw.get("attn_mask"))
    causal = kw.get("causal", False)
    dropout_p = kw.get("dropout_p", 0.0)
    dout = torch.randn(B, Hq, Sq, Dv, dtype=dtype, device=device)
    if f.layout != "bshd":
        dout = torch.randn(B, Sq, Hq, Dv, dtype=dtype, device=device).transpose(1, 2)

    def call(q, k, v, dout):
        out = tileattn.sdpa(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=kw.get("scale"),
                            enable_gqa=Hq != Hkv)
        return out, torch.autograd.grad(out, [q, k, v, *learn.values()], dout)

    (out, grads), seed = _seeded(lambda: call(q, k, v, dout))
    assert out.dtype == dtype and out.shape == (B, Hq, Sq, Dv)
    # the oracle in native layout; torch's top-left causal is an explicit lower-triangular mask
    okw = dict(scale=kw.get("scale"), dropout_p=dropout_p)
    if causal:
        okw["attn_mask"] = torch.ones(Sq, Sk, dtype=torch.bool).tril()
    elif "attn_mask" in kw:
        okw["attn_mask"] = kw["attn_mask"]
    extra = dict(dropout_seed=seed) if dropout_p else {}

    def oracle(q, k, v, **kw):
        o, lse = reference.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kw)
        return o.transpose(1, 2), lse

    hi = _oracle(oracle, (q, k, v), okw, learn, dout, True, **extra)
    lo = hi if dtype == F32 else _oracle(oracle, (q, k, v), okw, learn, dout, False, **extra)
    _compare(["out"], [out], hi[:1], lo[:1], dtype, c=2.0)
    _compare(_grad_names(learn), grads, hi[2], lo[2], dtype, c=3.0, cancel=(q, k, v, dout))
    _hidden_mask_grad(learn, grads)
    lse0 = _oracle(oracle, (q, k, v), {**okw, "dropout_p": 0.0}, learn, None, True)[1]
    _empty_rows(lse0, lambda t: t, ("out", out), ("dq", grads[0]))
    if f.layout != "bshd":
        contiguous = [leaf(t.contiguous()) for t in (q, k, v)]
        (out_c, grads_c), _ = _seeded(lambda: call(*contiguous, dout.contiguous()))
        for name, a, b in zip(["out", *_grad_names(learn)], [out, *grads], [out_c, *grads_c]):
            assert torch.equal(a, b), f"{name}: non-contiguous inputs change the result"


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("feature,entry,backend,dtype", _matrix())
def test_feature(feature, entry, backend, dtype):
    f = FEATURES[feature]
    if entry == "attention":
        _run_attention(f, backend, dtype)
    elif entry == "varlen":
        _run_varlen(f, backend, dtype)
    elif entry == "sdpa":
        _run_sdpa(f, backend, dtype)
    else:
        _run_kvcache(f, entry, backend, dtype)


def _unsupported():
    return [pytest.param(name, entry, id=f"{entry}-{name}") for entry in ("varlen", "kvcache", "sdpa")
            for name, f in FEATURES.items() if _support(f, entry) != OK]


@pytest.mark.parametrize("feature,entry", _unsupported())
def test_unsupported(feature, entry):
    """An entry point that lacks a feature's keyword rejects that keyword by name."""
    f = FEATURES[feature]
    missing = _support(f, entry)
    B, Sq, Sk, Hq, Hkv, D, Dv = f.shape
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, D, Dv)
    kw, learn = _keywords(f, B, Sq, Sk, Hq, F32, "cpu")
    kw = {missing: {**kw, **learn}[missing]}
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{missing}'"):
        if entry == "varlen":
            cq, ck = cu_seqlens([Sq] * B), cu_seqlens([Sk] * B)
            tileattn.attention_varlen(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cq, ck, **kw)
        elif entry == "kvcache":
            tileattn.attention_with_kvcache(q, k.clone(), v.clone(), cache_seqlens=0, **kw)
        else:
            tileattn.sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=Hq != Hkv, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_has_no_backward(backend):
    device = _device(backend)
    q = torch.randn(2, 1, 4, 16, device=device, requires_grad=True)
    kc, vc = torch.randn(2, 9, 2, 16, device=device), torch.randn(2, 9, 2, 16, device=device)
    out = tileattn.attention_with_kvcache(q, kc, vc, cache_seqlens=5, backend=backend)
    with pytest.raises(NotImplementedError, match="^tileattn: attention_with_kvcache has no backward"):
        out.sum().backward()


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter only runs without CUDA")
@pytest.mark.parametrize("entry", ["attention", "varlen", "kvcache"])
def test_interpreter_refuses_bf16(entry):
    q, k, v = make_qkv(1, 5, 7, 2, 1, 16, dtype=BF16)
    with pytest.raises(NotImplementedError, match="^tileattn: .*bfloat16"):
        if entry == "attention":
            tileattn.attention(q, k, v, backend="triton")
        elif entry == "varlen":
            tileattn.attention_varlen(q[0], k[0], v[0], cu_seqlens([5]), cu_seqlens([7]), backend="triton")
        else:
            tileattn.attention_with_kvcache(q, k.clone(), v.clone(), cache_seqlens=3, backend="triton")


def test_dropout_keeps_one_minus_p():
    """The Philox stream the matrix's dropout cases share keeps about 1 - p of the weights."""
    keep = _philox.keep_mask(_philox.next_seed(), 0.3, 2, 4, 21, 34)
    assert 0.62 < keep.float().mean() < 0.78
