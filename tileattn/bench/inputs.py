"""Random inputs for a benchmark case (never zeros), and the fp32 reference output used to
sanity-check every provider's forward.

Dense: q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv), dout (B, Sq, Hq, Dv); q, k, v
require grad. Decode: q (B, 1, Hq, D), k_new / v_new (B, 1, Hkv, D[v]), cache_seqlens int32
(B,) = Sk - 1, and either a contiguous cache (B, Sk, Hkv, D[v]) or a paged cache
(num_blocks, page, Hkv, D[v]) with block_table int32 (B, ceil(Sk / page)) a random permutation
of the blocks. k_new / v_new equal what the cache already holds at position Sk - 1, so the
append is idempotent and every call (and the reference) sees the same Sk keys.
"""

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from tileattn import paged

from .registry import Case


def _randn(shape, case: Case, g: torch.Generator, grad=False):
    x = torch.randn(shape, dtype=getattr(torch, case.dtype), device=case.device, generator=g)
    return x.requires_grad_(grad)


def make(case: Case, seed: int) -> SimpleNamespace:
    g = torch.Generator(device=case.device).manual_seed(seed)
    B, Sq, Sk, Hq, Hkv, D, Dv = case.B, case.Sq, case.Sk, case.Hq, case.Hkv, case.D, case.Dv
    if case.kind != "decode":
        return SimpleNamespace(q=_randn((B, Sq, Hq, D), case, g, True), k=_randn((B, Sk, Hkv, D), case, g, True),
                               v=_randn((B, Sk, Hkv, Dv), case, g, True), dout=_randn((B, Sq, Hq, Dv), case, g))
    inp = SimpleNamespace(q=_randn((B, Sq, Hq, D), case, g), block_table=None,
                          cache_seqlens=torch.full((B,), Sk - Sq, dtype=torch.int32, device=case.device))
    if case.page:
        blocks = math.ceil(Sk / case.page)
        perm = torch.randperm(B * blocks, generator=g, device=case.device)
        inp.block_table = perm.view(B, blocks).to(torch.int32)
        inp.k_cache = _randn((B * blocks, case.page, Hkv, D), case, g)
        inp.v_cache = _randn((B * blocks, case.page, Hkv, Dv), case, g)
    else:
        inp.k_cache, inp.v_cache = _randn((B, Sk, Hkv, D), case, g), _randn((B, Sk, Hkv, Dv), case, g)
    pos = torch.arange(Sk - Sq, Sk, device=case.device).expand(B, Sq)  # the new tokens' cache positions
    at = paged.index(inp.k_cache, inp.block_table, pos)
    inp.k_new, inp.v_new = inp.k_cache[at].clone(), inp.v_cache[at].clone()
    return inp


def logical_kv(inp, case: Case, b: int):
    """Sequence b's Sk cached keys and values, (Sk, Hkv, D[v]) (a copy when paged)."""
    if not case.page:
        return inp.k_cache[b, :case.Sk], inp.v_cache[b, :case.Sk]
    pages = inp.block_table[b].long()
    return (inp.k_cache[pages].flatten(0, 1)[:case.Sk], inp.v_cache[pages].flatten(0, 1)[:case.Sk])


@torch.no_grad()
def reference(case: Case, inp) -> torch.Tensor:
    """fp32 output (B, Sq, Hq, Dv) from torch: SDPA on fp32 copies (dense), or a per-sequence
    einsum softmax (decode; one new token attends all Sk keys)."""
    if case.kind == "decode":
        g, outs = case.Hq // case.Hkv, []
        for b in range(case.B):
            k, v = (t.float() for t in logical_kv(inp, case, b))  # (Sk, Hkv, D)
            q = inp.q[b, 0].float().view(case.Hkv, g, case.D)
            p = (torch.einsum("hgd,shd->hgs", q, k) / math.sqrt(case.D)).softmax(-1)
            outs.append(torch.einsum("hgs,shd->hgd", p, v).reshape(1, case.Hq, case.Dv))
        return torch.stack(outs)
    q, k, v = (t.detach().float().transpose(1, 2) for t in (inp.q, inp.k, inp.v))
    mask, is_causal = causal_args(case)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                         enable_gqa=case.Hq != case.Hkv)
    return out.transpose(1, 2)


def causal_args(case: Case):
    """(attn_mask, is_causal) giving SDPA tileattn's bottom-right causal mask."""
    if not case.causal or case.kind == "decode":
        return None, False
    if case.Sq == case.Sk:
        return None, True
    from torch.nn.attention.bias import causal_lower_right
    return causal_lower_right(case.Sq, case.Sk), False


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| (Frobenius); inf when out has NaN/inf."""
    d = out.detach().float() - ref
    return float(d.norm() / ref.norm()) if torch.isfinite(d).all() else math.inf
