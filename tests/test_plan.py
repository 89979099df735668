"""The Triton planner (``tileattn/backends/triton/plan/``) without a GPU: its choices on a made-up
sm_90 target (the same as before the planning package), overrides, describe for every pass,
caching under ``spec.key()``, thread safety, and the decode plan's workspace."""

import math
import threading

import pytest
import torch

import tileattn
from tileattn import reference
from tileattn.backends.triton import plan
from tileattn.backends.triton.kvcache import forward_kvcache
from tileattn.backends.triton.plan import configs as tables
from tileattn.score import ScoreSpec

SM90 = plan.Target("sm_90", "NVIDIA H200 (test)", 132)
AMPERE = plan.Target("cuda", "sm_80 (test)", 108)
CAUSAL = ScoreSpec(scale=1.0, window=(-1, 0))
PLAIN = ScoreSpec(scale=1.0)


@pytest.fixture(autouse=True)
def no_knobs(monkeypatch):
    for name in ("TILEATTN_TMA", "TILEATTN_AUTOTUNE", "TILEATTN_DECODE_BLOCK_N"):
        monkeypatch.delenv(name, raising=False)


def qkv(d, dv=None, dtype=torch.bfloat16, s=8, b=1, h=2):
    dv = dv or d
    return (torch.zeros(b, s, h, d, dtype=dtype), torch.zeros(b, s, h, d, dtype=dtype),
            torch.zeros(b, s, h, dv, dtype=dtype))


# ----------------------------------------------------------------------------- the rules as they were
# The forward's and the backward's TMA tests before the planning package, copied: the one rule
# (facts.tma_rule) must decide the same on sm_90 and on other GPUs without knobs.

def _old_forward_tma(q, k, v, target):
    if target != "sm_90" or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    for t in (q, k, v):
        if t.numel() == 0 or t.data_ptr() % 16 or math.gcd(*t.stride()[:-1]) * t.element_size() % 16:
            return False
    if v.shape[-1] * q.element_size() % 16:
        return False
    return max(plan.head_block(q.shape[-1]), plan.head_block(v.shape[-1])) >= 256


def _old_backward_tma(q, k, v, dout, target, max_seqlen):
    if q.dtype == torch.float32 or not (target == "sm_90" and max_seqlen >= 4096):
        return False
    for t in (q, k, v, dout):
        if t.numel() == 0 or t.data_ptr() % 16 or math.gcd(*t.stride()[:-1]) * t.element_size() % 16:
            return False
    return all(t.shape[-1] * t.element_size() % 16 == 0 for t in (q, k, v, dout))


def _layouts():
    """(q, k, v) of several head dims, dtypes and alignments."""
    def shifted(n, d=256):
        return torch.zeros(8 * 2 * d + n, dtype=torch.bfloat16)[n:].view(1, 8, 2, d)
    q256, k256, v256 = qkv(256)
    out = [qkv(d, dv, dtype) for d, dv in ((64, 64), (128, 128), (256, 256), (80, 48), (192, 128), (40, 40),
                                             (256, 250))
           for dtype in (torch.bfloat16, torch.float16, torch.float32)]
    return out + [(shifted(8), k256, v256), (q256, shifted(1), v256), (q256, k256, shifted(3)),
                  (torch.zeros(1, 8, 2, 260, dtype=torch.bfloat16)[..., :256], k256, v256),
                  (torch.zeros(1, 8, 2, 264, dtype=torch.bfloat16)[..., :256], k256, v256)]


@pytest.mark.parametrize("target", [SM90, AMPERE, plan.facts.INTERPRETER_TARGET], ids=lambda t: t.name)
def test_tma_decisions_unchanged(target):
    for q, k, v in _layouts():
        assert plan.plan_forward(q, k, v, PLAIN, target=target).use_tma == _old_forward_tma(q, k, v, target.name)
        dout = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
        for n in (8, 4095, 4096, 16384):
            got = plan.plan_backward(q, k, v, dout, CAUSAL, max_seqlen_q=n, max_seqlen_k=8, target=target).use_tma
            assert got == _old_backward_tma(q, k, v, dout, target.name, n), (q.shape, v.shape, q.dtype, n)


def test_forward_configs_unchanged():
    """sm_90: the table's list for (16-bit, head-dim block), autotuned; the attn_mask lists at
    D <= 128; fp32 takes the "cuda" fp32 list; the interpreter one fixed config."""
    for d in (64, 128, 256):
        p = plan.plan_forward(*qkv(d), CAUSAL, target=SM90)
        assert p.configs == tables.FORWARD[("sm_90", "16", d)] and p.autotune and len(p.configs) == 3
        mask = ScoreSpec(scale=1.0, attn_mask=torch.ones(1, 1, 8, 8, dtype=torch.bool))
        want = tables.FORWARD_MASK.get(d, tables.FORWARD[("sm_90", "16", d)])
        assert plan.plan_forward(*qkv(d), mask, target=SM90).configs == want
        assert plan.plan_forward(*qkv(d, dtype=torch.float32), CAUSAL, target=SM90).configs == \
            tables.FORWARD[("cuda", "32", d)]
        assert plan.plan_forward(*qkv(d), CAUSAL, target=AMPERE).configs == tables.FORWARD[("cuda", "16", d)]
    assert plan.plan_forward(*qkv(96), PLAIN, target=SM90).block_d == 128
    p = plan.plan_forward(*qkv(64, dtype=torch.float16), PLAIN)  # CPU tensors: the interpreter
    assert p.target == "interpreter" and not p.autotune and p.configs[0].meta() == dict(
        BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1)


def test_backward_configs_unchanged(monkeypatch):
    """Both kernels' lists on sm_90 from bucketed Sq * Sk >= 512 * 512, the first entry below it
    or with TILEATTN_AUTOTUNE=0; every BLOCK_M divides ROW_PAD."""
    for d in (64, 128, 256):
        q, k, v = qkv(d)
        p = plan.plan_backward(q, k, v, q, CAUSAL, max_seqlen_q=512, max_seqlen_k=512, target=SM90)
        assert p.dq.configs == tables.DQ[("sm_90", "16", d)] and p.dq.autotune
        assert p.dkdv.configs == tables.DKDV[("sm_90", "16", d)] and p.dkdv.autotune
        p = plan.plan_backward(q, k, v, q, CAUSAL, max_seqlen_q=256, max_seqlen_k=511, target=SM90)
        assert p.dq.configs == tables.DQ[("sm_90", "16", d)][:1] and not p.dq.autotune
        assert p.dkdv.configs == tables.DKDV[("sm_90", "16", d)][:1]
    monkeypatch.setenv("TILEATTN_AUTOTUNE", "0")
    p = plan.plan_backward(q, k, v, q, CAUSAL, max_seqlen_q=4096, max_seqlen_k=4096, target=SM90)
    assert len(p.dq.configs) == len(p.dkdv.configs) == 1
    for table in (tables.DQ, tables.DKDV):
        for cfgs in table.values():
            assert all(tables.ROW_PAD % c.block_m == 0 for c in cfgs)


def test_head_group():
    """Causal (uneven) programs: the largest power of two <= B * H heads whose re-read rows fit
    in L2_SHARE, head-major below MIN_HEAD_GROUP heads and for even work."""
    rows = tables.L2_SHARE // 512 // 8  # 8 heads fit
    assert plan.head_group(False, 16, 16, 64) == 1
    assert plan.head_group(True, 16, 16, 6) == 4
    assert plan.head_group(True, 16, 16, 3) == 1
    assert plan.head_group(True, rows, 512, 64) == 8
    assert plan.head_group(True, rows + 1, 512, 64) == 4
    assert plan.head_group(True, rows * 4, 512, 64) == 1
    q, k, v = qkv(128, h=16)
    p = plan.plan_backward(q, k, v, q, CAUSAL, max_seqlen_q=1024, max_seqlen_k=1024, target=SM90)
    # bf16 D=Dv=128: 512 B per row; dQ re-reads 1024 keys (16 heads fit 16 MB), dK/dV 1024 rows x G=1
    assert p.head_groups(16, 16, 16, 1024, 1024) == (32, 32)
    assert p.head_groups(1, 16, 16, 16384, 16384) == (1, 1)
    assert plan.plan_backward(q, k, v, q, PLAIN, max_seqlen_q=1024, max_seqlen_k=1024,
                              target=SM90).head_groups(16, 16, 16, 1024, 1024) == (1, 1)


def test_decode_choices_unchanged():
    """H200-like target (132 SMs), bf16, Hq=32, Hkv=8, D=128: one program per SM, 64-key tiles
    for splits of <= 256 keys, 5 stages when paged, 16-row blocks for fp32."""
    def dplan(B, L, dtype=torch.bfloat16, page=None, Sn=1, **kw):
        q = torch.zeros(B, Sn, 32, 128, dtype=dtype)
        if page:
            kc = torch.zeros(B * L // page, page, 8, 128, dtype=dtype)
            table = torch.zeros(B, L // page, dtype=torch.int32)
        else:
            kc, table = torch.zeros(B, L, 8, 128, dtype=dtype), None
        return plan.plan_decode(q, kc, kc, table, target=SM90, **kw)

    p = dplan(1, 4096)
    assert (p.num_splits, p.block_n, p.block_m, p.num_warps, p.num_stages, p.m_blocks) == (16, 64, 16, 4, 3, 1)
    assert (dplan(1, 32768).num_splits, dplan(1, 32768).block_n) == (16, 128)
    assert (dplan(16, 4096).num_splits, dplan(16, 4096).block_n) == (1, 128)
    assert dplan(4, 32768).num_splits == 4
    assert dplan(1, 4096, page=16).num_stages == 5
    assert dplan(1, 4096, num_splits=8).block_n == 128
    assert dplan(1, 4096, dtype=torch.float32).block_m == 16
    chunk = dplan(1, 4096, Sn=16)  # 64 packed rows: 8 warps
    assert (chunk.block_m, chunk.num_warps, chunk.m_blocks) == (64, 8, 1)
    assert plan.choose_num_splits(1, 8, 4096, 132) == 16 and plan.choose_num_splits(64, 8, 4096, 132) == 1


# ----------------------------------------------------------------------------- overrides


def test_forward_overrides_and_knobs(monkeypatch):
    q, k, v = qkv(256)
    tiny = plan.Config(16, 16, 4, 1)
    p = plan.plan_forward(q, k, v, PLAIN, target=SM90, overrides=plan.Overrides(forward=[tiny], use_tma=False))
    assert p.configs == (tiny,) and not p.autotune and not p.use_tma and "forced" in p.loads_why
    monkeypatch.setenv("TILEATTN_TMA", "0")
    assert plan.plan_forward(q, k, v, PLAIN, target=SM90, overrides=plan.Overrides(use_tma=True)).use_tma
    monkeypatch.delenv("TILEATTN_TMA")
    with plan.overrides(autotune=False):
        assert len(plan.plan_forward(q, k, v, PLAIN, target=SM90).configs) == 1
        with plan.overrides(forward=tiny):  # nested blocks stack
            p = plan.plan_forward(q, k, v, PLAIN, target=SM90)
            assert p.configs == (tiny,)
    assert len(plan.plan_forward(q, k, v, PLAIN, target=SM90).configs) == 3  # restored
    with pytest.raises(TypeError):
        plan.Overrides(forward=[(16, 16, 4, 1)])


def test_backward_overrides():
    q, k, v = qkv(128)
    dq, dkdv = plan.Config(32, 16, 4, 1), plan.Config(16, 32, 4, 1)
    p = plan.plan_backward(q, k, v, q, CAUSAL, max_seqlen_q=4096, max_seqlen_k=4096, target=SM90,
                           overrides=plan.Overrides(dq=[dq], dkdv=[dkdv], use_tma=False))
    assert p.dq.configs == (dq,) and p.dkdv.configs == (dkdv,) and not p.use_tma
    with pytest.raises(ValueError, match="ROW_PAD|dividing 128"):
        plan.plan_backward(q, k, v, q, CAUSAL, max_seqlen_q=8, max_seqlen_k=8, target=SM90,
                           overrides=plan.Overrides(dq=[plan.Config(48, 16, 4, 1)]))


def test_decode_overrides(monkeypatch):
    q, kc = torch.zeros(1, 1, 32, 128, dtype=torch.bfloat16), torch.zeros(1, 4096, 8, 128, dtype=torch.bfloat16)
    ov = plan.Overrides(decode_block_n=32, decode_num_splits=3, decode_num_warps=8, decode_num_stages=2)
    p = plan.plan_decode(q, kc, kc, None, target=SM90, overrides=ov)
    assert (p.block_n, p.num_splits, p.num_warps, p.num_stages) == (32, 3, 8, 2)
    assert plan.plan_decode(q, kc, kc, None, num_splits=5, target=SM90, overrides=ov).num_splits == 5
    monkeypatch.setenv("TILEATTN_DECODE_BLOCK_N", "16")
    assert plan.plan_decode(q, kc, kc, None, target=SM90).block_n == 16
    assert plan.plan_decode(q, kc, kc, None, target=SM90, overrides=ov).block_n == 32  # overrides win
    with pytest.raises(ValueError):
        plan.Overrides(decode_block_n=48)


def test_overrides_through_the_public_api(device):
    """A forced config and TMA loads reach a public-API call and its backward."""
    q, k, v = (torch.randn(1, 37, 2, 32, device=device, requires_grad=True) for _ in range(3))
    with tileattn.plan.overrides(forward=[plan.Config(16, 16, 4, 1)], dq=[plan.Config(16, 32, 4, 1)],
                                 dkdv=[plan.Config(32, 16, 4, 1)], use_tma=True):
        out = tileattn.attention(q, k, v, causal=True, backend="triton")
        assert tileattn.plan.forward_plan(q, k, v, causal=True).configs == (plan.Config(16, 16, 4, 1),)
        out.sum().backward()
    ref, _ = reference.attention(*(t.detach().cpu() for t in (q, k, v)), causal=True)
    torch.testing.assert_close(out.detach().cpu().double(), ref, atol=1e-4, rtol=1e-4)
    assert all(t.grad.isfinite().all() for t in (q, k, v))


# ----------------------------------------------------------------------------- describe


def test_describe_every_pass():
    q, k, v = qkv(128, b=2, s=4096, h=16)
    text = tileattn.plan.describe(q, k, v, causal=True, softcap=30.0, backward=True, target=SM90)
    for piece in ("tileattn forward plan: NVIDIA H200 (test)", "features: causal/window (-1, 0), softcap",
                  "pointer loads: head-dim block 128 < 256", "autotuned once per Sq/Sk power-of-two bucket",
                  "BLOCK_M=128 BLOCK_N=64 warps=8 stages=3  -- Flex H100 bf16 D=128",
                  "tileattn backward plan:", "TMA tensor descriptors", "dQ (_bwd_dq_kernel", "dK/dV (_bwd_dkdv_kernel",
                  "head grouping: 8 head(s) per group", "BLOCK_M=32 BLOCK_N=128 warps=8 stages=3"):
        assert piece in text, piece
    kc = torch.zeros(4, 64, 8, 128, dtype=torch.bfloat16)
    table = torch.zeros(1, 256, dtype=torch.int32)
    text = tileattn.plan.describe_kvcache(q[:1, :1], kc, kc, table, causal=True, sinks=torch.zeros(16),
                                          target=SM90)
    for piece in ("tileattn decode plan", "paged (page 64) cache of 16384 keys", "features: causal/window (-1, 0), "
                  "sinks", "splits: 16", "about one program per SM", "key tile: BLOCK_N=128", "stages: 5",
                  "page ids", "warps: 4", "combine: _combine_kernel merges 16"):
        assert piece in text, piece


# ----------------------------------------------------------------------------- caching, threads


def test_cache_keyed_by_spec_key():
    """Specs with the same key (only values that compile the same kernel differ) share a plan;
    a different key gets its own."""
    q, k, v = qkv(64)
    a = plan.plan_forward(q, k, v, ScoreSpec(scale=0.1, window=(5, 0), softcap=2.0), target=SM90)
    b = plan.plan_forward(q, k, v, ScoreSpec(scale=0.3, window=(100, 7), softcap=9.0), target=SM90)
    c = plan.plan_forward(q, k, v, ScoreSpec(scale=0.3, window=(-1, 7), softcap=9.0), target=SM90)
    assert a is b and a.spec_key == b.spec_key and c is not a and c.spec_key != a.spec_key
    d = plan.plan_backward(q, k, v, q, CAUSAL, max_seqlen_q=8, max_seqlen_k=8, target=SM90)
    e = plan.plan_backward(q, k, v, q, ScoreSpec(scale=2.0, window=(3, 0)), max_seqlen_q=9, max_seqlen_k=9,
                           target=SM90)
    assert d is not e and d.spec_key != e.spec_key
    assert d is plan.plan_backward(q, k, v, q, ScoreSpec(scale=5.0, window=(-1, 2)), max_seqlen_q=16,
                                   max_seqlen_k=3, target=SM90)


def test_planning_from_threads():
    """Eight threads planning every pass at once (cold caches, overrides active) get the plans
    planned one at a time."""
    specs = [PLAIN, CAUSAL, ScoreSpec(scale=1.0, window=(4, 4), softcap=1.0),
             ScoreSpec(scale=1.0, sinks=torch.zeros(2), alibi_slopes=torch.ones(1, 2))]
    cases = [(qkv(d, dtype=dt), s) for d in (64, 128, 256) for dt in (torch.bfloat16, torch.float32) for s in specs]
    kc = torch.zeros(2, 1024, 2, 64, dtype=torch.float16)

    def plan_all():
        out = []
        for (q, k, v), s in cases:
            out.append(plan.plan_forward(q, k, v, s, target=SM90))
            out.append(plan.plan_backward(q, k, v, q, s, max_seqlen_q=4096, max_seqlen_k=64, target=SM90))
        out.append(plan.plan_decode(torch.zeros(2, 1, 8, 64, dtype=torch.float16), kc, kc, None, target=SM90))
        return out

    with plan.overrides(autotune=False):
        plan.cache_clear()
        want = plan_all()
        plan.cache_clear()
        got, errors = [None] * 8, []
        start = threading.Barrier(8)

        def worker(i):
            try:
                start.wait()
                got[i] = plan_all()
            except Exception as err:  # noqa: BLE001 -- reported below
                errors.append(err)
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors and all(g == want for g in got)


# ----------------------------------------------------------------------------- decode plan / run


def test_decode_plan_reused_across_layers(device):
    """One plan for several layers' caches: each call reuses the plan's split workspace (same
    buffers), matches a fresh plan's result, and another thread gets its own workspace."""
    torch.manual_seed(0)
    B, Sn, Hq, Hkv, D, L = 2, 1, 4, 2, 32, 300
    q = torch.randn(B, Sn, Hq, D, device=device)
    layers = [(torch.randn(B, L, Hkv, D, device=device), torch.randn(B, L, Hkv, D, device=device)) for _ in range(3)]
    lens = torch.tensor([17, 250], dtype=torch.int32, device=device)
    spec = ScoreSpec(scale=D ** -0.5, window=(-1, 0))
    step = plan.plan_decode(q, *layers[0], None, num_splits=3)
    assert step.num_splits == 3 and step.workspace() is step.workspace()
    ws = step.workspace()[0].data_ptr()
    for kc, vc in layers:
        got = forward_kvcache(q, kc.clone(), vc.clone(), None, None, spec, cache_seqlens=lens, block_table=None,
                              num_splits=3, plan=step)
        want = forward_kvcache(q, kc.clone(), vc.clone(), None, None, spec, cache_seqlens=lens, block_table=None,
                               num_splits=3)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert step.workspace()[0].data_ptr() == ws
    other = []
    t = threading.Thread(target=lambda: other.append(step.workspace()[0].data_ptr()))
    t.start()
    t.join()
    assert other[0] != ws
    assert plan.plan_decode(q, *layers[0], None, num_splits=1).workspace() is None
    with pytest.raises(ValueError, match="decode plan made for"):
        forward_kvcache(q[:1], *layers[0], None, None, spec, cache_seqlens=lens[:1], block_table=None,
                        num_splits=3, plan=step)
    text = tileattn.plan.kvcache_plan(q, *layers[0], num_splits=3).describe(spec)
    assert "splits: 3  -- given by the caller" in text
