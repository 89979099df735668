"""Hypothesis properties of RELIABILITY.md on the CPU backend (derandomized in conftest)."""

import torch
from hypothesis import given
from hypothesis import strategies as st

import tileattn
from helpers import cu_seqlens

HEADS = dict(causal=st.booleans(), hq_per_kv=st.sampled_from([1, 2, 3]), hkv=st.integers(1, 2),
                d=st.sampled_from([16, 24, 32]))


@given(lens=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=1, max_size=5), **HEADS)
def test_varlen_equals_per_sequence_dense(lens, causal, hq_per_kv, hkv, d):
    hq = hq_per_kv * hkv
    lq, lk = [a for a, _ in lens], [b for _, b in lens]
    q, k, v = torch.randn(sum(lq), hq, d), torch.randn(sum(lk), hkv, d), torch.randn(sum(lk), hkv, d)
    cq, ck = cu_seqlens(lq), cu_seqlens(lk)
    out, lse = tileattn.attention_varlen(q, k, v, cq, ck, causal=causal, return_lse=True)
    for b in range(len(lens)):
        qs, ks = slice(int(cq[b]), int(cq[b + 1])), slice(int(ck[b]), int(ck[b + 1]))
        if lq[b] == 0:
            continue
        if lk[b] == 0:  # no key at all: out 0, lse -inf
            assert torch.equal(out[qs], torch.zeros_like(out[qs])) and bool((lse[:, qs] == -torch.inf).all())
            continue
        o, l = tileattn.attention(q[None, qs], k[None, ks], v[None, ks], causal=causal, return_lse=True)
        torch.testing.assert_close(out[qs], o[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[:, qs], l[0], atol=1e-5, rtol=1e-5)


@given(sq=st.integers(1, 50), sk=st.integers(1, 50), **HEADS)
def test_gqa_equals_repeated_kv_mha(sq, sk, causal, hq_per_kv, hkv, d):
    q = torch.randn(2, sq, hq_per_kv * hkv, d)
    k, v = torch.randn(2, sk, hkv, d), torch.randn(2, sk, hkv, d)
    gqa = tileattn.attention(q, k, v, causal=causal)
    mha = tileattn.attention(q, k.repeat_interleave(hq_per_kv, 2), v.repeat_interleave(hq_per_kv, 2), causal=causal)
    torch.testing.assert_close(gqa, mha, atol=1e-5, rtol=1e-5)


@given(sq=st.integers(1, 30), sk=st.integers(2, 60), cut=st.floats(0.1, 0.9), scale=st.floats(-3.0, 3.0))
def test_merging_kv_halves_by_lse_equals_whole(sq, sk, cut, scale):
    q, k, v = torch.randn(1, sq, 2, 16), torch.randn(1, sk, 2, 16), torch.randn(1, sk, 2, 16)
    j = max(1, min(sk - 1, int(sk * cut)))
    out, lse = tileattn.attention(q, k, v, return_lse=True)
    o1, l1 = tileattn.attention(q, k[:, :j], v[:, :j], return_lse=True)
    o2, l2 = tileattn.attention(q, k[:, j:], v[:, j:], return_lse=True)
    merged_lse = torch.logaddexp(l1, l2)
    w1 = torch.exp(l1 - merged_lse).transpose(1, 2)[..., None]
    w2 = torch.exp(l2 - merged_lse).transpose(1, 2)[..., None]
    torch.testing.assert_close(w1 * o1 + w2 * o2, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_lse, lse, atol=1e-5, rtol=1e-5)
    # scaling v by c scales out by c
    torch.testing.assert_close(tileattn.attention(q, k, v * scale), out * scale, atol=1e-5, rtol=1e-5)


@given(perm_seed=st.integers(0, 100))
def test_batch_permutation_permutes_output(perm_seed):
    q, k, v = torch.randn(4, 19, 2, 16), torch.randn(4, 23, 2, 16), torch.randn(4, 23, 2, 16)
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(perm_seed))
    out = tileattn.attention(q, k, v, causal=True)
    assert torch.equal(tileattn.attention(q[perm], k[perm], v[perm], causal=True), out[perm])
