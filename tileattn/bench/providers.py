"""Providers: who computes the attention. ``build(name, case, inp) -> (fn, note)`` where
``fn()`` runs one forward (dense) or one decode step on the inputs of ``tileattn.bench.inputs``
and returns out as (B, Sq, Hq, Dv) (a view; peers' (B, H, S, D) outputs are transposed back).
``note`` says what a provider needed beyond the shared inputs. A provider that cannot serve a
case raises ``Skip`` (the runner records the reason and goes on).

- ``tileattn`` (backend "auto"), ``tileattn-<backend>`` (cpu, triton, reference).
- ``sdpa-flash``, ``sdpa-cudnn``, ``sdpa-efficient``, ``sdpa-math``: torch SDPA restricted to
  one ``SDPBackend``, on (B, H, S, D) transposed views of the same tensors (no copy).
  GQA through ``enable_gqa``; a backend without it gets k/v repeated to Hq heads, built
  outside the timed call (decode only; noted on the row). Decode: the new token attends the
  contiguous cache's Sk keys, is_causal=False; paged caches are tileattn's alone.
- ``torch-cpu``: SDPA with torch's default CPU dispatch (CPU only).
- ``flex``: ``torch.compile(flex_attention)`` with a bottom-right causal block mask.
"""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .inputs import causal_args


class Skip(Exception):
    """The provider cannot run this case; the message is the reason."""


def build(name: str, case, inp):
    if name == "tileattn" or name.startswith("tileattn-"):
        return _tileattn(name.partition("-")[2] or "auto", case, inp)
    if name in _SDPA:
        return _sdpa(_SDPA[name], case, inp)
    if name == "torch-cpu":
        if case.device != "cpu":
            raise Skip("torch-cpu is the CPU peer; use sdpa-* on CUDA")
        return _sdpa(None, case, inp)
    if name == "flex":
        return _flex(case, inp)
    raise Skip(f"unknown provider {name!r}; known: tileattn[-backend], torch-cpu, flex, {', '.join(_SDPA)}")


def _tileattn(backend, case, inp):
    try:
        import tileattn
        attention, with_kvcache = tileattn.attention, tileattn.attention_with_kvcache
    except (ImportError, AttributeError) as e:
        raise Skip(f"unavailable: {type(e).__name__}: {e}") from None
    if case.kind == "decode":
        return (lambda: with_kvcache(inp.q, inp.k_cache, inp.v_cache, inp.k_new, inp.v_new,
                                     cache_seqlens=inp.cache_seqlens, block_table=inp.block_table,
                                     causal=True, backend=backend)), ""
    return (lambda: attention(inp.q, inp.k, inp.v, causal=case.causal, backend=backend)), ""


_SDPA = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
         "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa-math": SDPBackend.MATH}


def _sdpa(backend, case, inp):
    if case.kind == "decode":
        if case.page:
            raise Skip("paged cache: SDPA peers are timed on the contiguous rows")
        k, v = inp.k_cache[:, :case.Sk], inp.v_cache[:, :case.Sk]
    else:
        k, v = inp.k, inp.v
    q, k, v = (t.transpose(1, 2) for t in (inp.q, k, v))  # (B, H, S, D) views
    mask, is_causal = causal_args(case)

    def call(k, v, gqa):
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)

    if case.Hq == case.Hkv:
        return (lambda: call(k, v, False).transpose(1, 2)), ""
    try:
        call(k, v, True)
        return (lambda: call(k, v, True).transpose(1, 2)), "enable_gqa"
    except RuntimeError as e:
        if case.kind != "decode":
            raise Skip(f"no GQA in this backend: {str(e).splitlines()[0]}") from None
    g = case.Hq // case.Hkv
    k, v = (t.detach().repeat_interleave(g, dim=1) for t in (k, v))
    return (lambda: call(k, v, False).transpose(1, 2)), f"k/v repeated to Hq heads outside the timing ({g}x the bytes)"


_FLEX = {}


def _flex(case, inp):
    if case.kind != "dense":
        raise Skip("flex: dense attention only")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if "fn" not in _FLEX:
        cfg = torch._dynamo.config  # one compile per shape: lift dynamo's recompile cap
        for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(cfg, knob):
                setattr(cfg, knob, 4096)
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    mask = None
    if case.causal:
        off = case.Sk - case.Sq
        mask = create_block_mask(lambda b, h, i, j: j <= i + off, None, None, case.Sq, case.Sk, device=case.device)
    q, k, v = (t.transpose(1, 2) for t in (inp.q, inp.k, inp.v))
    gqa, fn = case.Hq != case.Hkv, _FLEX["fn"]
    return (lambda: fn(q, k, v, block_mask=mask, enable_gqa=gqa).transpose(1, 2)), "torch.compile(flex_attention)"
