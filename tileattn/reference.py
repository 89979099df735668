"""The oracle: exact attention in plain PyTorch with materialized scores (API.md in code).

Every backend and every test is judged against this file, so it is written to be read.
``upcast=True`` computes in float64 and returns float64 ``out`` and ``lse`` (``ref_hi``);
``upcast=False`` computes in q's dtype and returns ``out`` in q's dtype and ``lse`` in float32
(``ref_lo``, the plain-PyTorch error that RELIABILITY.md's tolerance is tied to).

Layout is native (B, S, H, D); query head ``h`` reads kv head ``h // (Hq // Hkv)``.
Causal is bottom-right aligned: with ``off = Sk - Sq`` row ``i`` keeps keys ``j <= i + off``::

    Sq=2, Sk=5 (off=3)      Sq=5, Sk=2 (off=-3)
    1 1 1 1 0               0 0          <- rows 0..2 keep nothing: out 0, lse -inf
    1 1 1 1 1               0 0
                            0 0
                            1 0
                            1 1

Example::

    q, k, v = (torch.randn(2, 7, 4, 16) for _ in range(3))
    out, lse = attention(q, k, v, causal=True)   # out (2, 7, 4, 16) float64, lse (2, 4, 7)

The module also implements the internal backend contract (``forward``, ``backward``,
``forward_kvcache``; see ``tileattn.backends``) so that ``backend="reference"`` works.
"""

import math

import torch

from tileattn import _philox

_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- the core


def _core(q, k, v, *, scale, window, softcap, alibi, sinks, attn_mask, keep, dropout_p, dtype):
    """Dense attention computed in ``dtype``, step by step as API.md's score pipeline.

    q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv); ``window`` (left, right) with
    causal folded in; ``alibi`` None or (B, Hq); ``sinks`` None or (Hq,); ``attn_mask`` None
    or bool (True = keep) / floating, broadcastable to (B, Hq, Sq, Sk); ``keep`` None or the
    bool (B, Hq, Sq, Sk) dropout keep-mask. Returns out (B, Sq, Hq, Dv), lse (B, Hq, Sq) in dtype.
    """
    B, Sq, Hq, _ = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    qh = q.to(dtype).transpose(1, 2)                                        # (B, Hq, Sq, D)
    kh = k.to(dtype).repeat_interleave(Hq // Hkv, dim=2).transpose(1, 2)    # (B, Hq, Sk, D)
    vh = v.to(dtype).repeat_interleave(Hq // Hkv, dim=2).transpose(1, 2)    # (B, Hq, Sk, Dv)
    row = torch.arange(Sq, device=q.device).view(-1, 1) + (Sk - Sq)         # i + off
    col = torch.arange(Sk, device=q.device).view(1, -1)                     # j

    s = (qh @ kh.transpose(-1, -2)) * scale                                 # 1. scale
    if softcap > 0:                                                         # 2. softcap
        s = softcap * torch.tanh(s / softcap)
    if alibi is not None:                                                   # 3. ALiBi
        wide = torch.promote_types(dtype, torch.float32)  # bias built in >= fp32, rounded once
        s = s - (alibi.to(wide)[:, :, None, None] * (row - col).abs().to(wide)).to(dtype)
    kept = torch.ones((), dtype=torch.bool, device=q.device)
    if attn_mask is not None:                                               # 4. attn_mask
        if attn_mask.dtype == torch.bool:
            kept = kept & attn_mask
        else:
            s = s + attn_mask.to(dtype)
    left, right = window                                                    # 5. causal/window
    if left >= 0:
        kept = kept & (col >= row - left)
    if right >= 0:
        kept = kept & (col <= row + right)
    s = torch.where(kept, s, _NEG_INF)

    # 6. softmax; the sink is one more logit that takes probability mass but has no value.
    # [Note] fully masked rows: the max is taken detached and replaced by 0 when it is -inf,
    # and denominators of 0 are replaced by 1 before dividing, so an empty row gives p = 0,
    # out = 0, lse = -inf (or the sink logit) and zero -- never NaN -- gradients.
    if sinks is not None:
        sink = sinks.to(dtype).view(1, Hq, 1, 1).expand(B, Hq, Sq, 1)
    else:
        sink = s.new_full((B, Hq, Sq, 1), _NEG_INF)
    logits = torch.cat([s, sink], dim=-1)
    m = logits.amax(dim=-1, keepdim=True).detach()
    m = torch.where(m == _NEG_INF, 0.0, m)
    e = torch.exp(logits - m)
    denom = e.sum(dim=-1, keepdim=True)
    nonempty = denom > 0
    safe = torch.where(nonempty, denom, 1.0)
    p = e[..., :Sk] / safe
    lse = torch.where(nonempty, torch.log(safe) + m, _NEG_INF).squeeze(-1)

    if keep is not None:                                                    # 7. dropout
        p = torch.where(keep.to(p.device), p, 0.0) / (1.0 - dropout_p)
    out = (p @ vh).transpose(1, 2)                                          # 8. P @ V
    return out, lse


def _run(q, k, v, *, scale, window, softcap, alibi, sinks, attn_mask, dropout_p, dropout_mask,
         seed, cu_seqlens_q, cu_seqlens_k, dtype):
    """Dense (``cu_seqlens_q`` None) or varlen attention; dropout from ``dropout_mask`` or ``seed``.

    Dense returns out (B, Sq, Hq, Dv), lse (B, Hq, Sq); varlen q (Tq, Hq, D) returns
    out (Tq, Hq, Dv), lse (Hq, Tq), one dense call per sequence b (dropout batch index b).
    """
    kw = dict(scale=scale, window=window, softcap=softcap, sinks=sinks, dropout_p=dropout_p, dtype=dtype)
    drop = dropout_p > 0
    if drop and dropout_mask is None and seed is None:
        raise ValueError("reference: dropout_p > 0 needs dropout_mask or a seed")
    if cu_seqlens_q is None:
        B, Sq, Hq, _ = q.shape
        if drop and dropout_mask is None:
            dropout_mask = _philox.keep_mask(seed, dropout_p, B, Hq, Sq, k.shape[1])
        return _core(q, k, v, alibi=alibi, attn_mask=attn_mask, keep=dropout_mask if drop else None, **kw)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    Hq = q.shape[1]
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qb, kb, vb = q[None, cq[b]:cq[b + 1]], k[None, ck[b]:ck[b + 1]], v[None, ck[b]:ck[b + 1]]
        keep = _philox.keep_mask(seed, dropout_p, 1, Hq, qb.shape[1], kb.shape[1], b0=b) if drop else None
        alibi_b = None if alibi is None else alibi[b:b + 1]
        o, l = _core(qb, kb, vb, alibi=alibi_b, attn_mask=None, keep=keep, **kw)
        outs.append(o[0])
        lses.append(l[0])
    return torch.cat(outs, dim=0), torch.cat(lses, dim=-1)


def _kvcache(q, k_cache, v_cache, k_new, v_new, *, cache_seqlens, block_table, scale, window,
             softcap, alibi, sinks, dtype):
    """Append k_new/v_new into the cache in place, then attend each batch row to its keys.

    Contiguous cache (B, Smax, Hkv, D[v]) or paged (num_blocks, block_size, Hkv, D[v]) with
    block_table (B, max_blocks); position t of row b lives in page block_table[b, t // bs] at
    slot t % bs. Returns out (B, Sn, Hq, Dv), lse (B, Hq, Sn) in dtype.
    """
    B, Sn = q.shape[:2]
    lens = cache_seqlens.tolist() if torch.is_tensor(cache_seqlens) else [int(cache_seqlens)] * B
    dev = k_cache.device

    def where(b, pos):  # index tuple of cache positions ``pos`` of batch row b
        if block_table is None:
            return (b, pos)
        bs = k_cache.shape[1]
        return (block_table[b].to(dev)[pos // bs].long(), pos % bs)

    outs, lses = [], []
    for b in range(B):
        n = lens[b]
        if k_new is not None:
            pos = torch.arange(n, n + Sn, device=dev)
            with torch.no_grad():
                k_cache[where(b, pos)] = k_new[b].to(k_cache.dtype)
                v_cache[where(b, pos)] = v_new[b].to(v_cache.dtype)
            n += Sn
        idx = where(b, torch.arange(n, device=dev))
        o, l = _core(q[b:b + 1], k_cache[idx][None], v_cache[idx][None], scale=scale, window=window,
                     softcap=softcap, alibi=None if alibi is None else alibi[b:b + 1], sinks=sinks,
                     attn_mask=None, keep=None, dropout_p=0.0, dtype=dtype)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, dim=0), torch.cat(lses, dim=0)


def _normalize(q, causal, scale, window, alibi_slopes, batch):
    """Public keywords -> contract form: default scale, causal folded into window, (B, Hq) slopes."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    window = (int(window[0]), 0 if causal else int(window[1]))
    if alibi_slopes is not None and alibi_slopes.dim() == 1:
        alibi_slopes = alibi_slopes.expand(batch, alibi_slopes.shape[0])
    return scale, window, alibi_slopes


def _result(out, lse, upcast, q):
    return (out, lse) if upcast else (out.to(q.dtype), lse.float())


# ----------------------------------------------------------------------------- public oracle


def attention(q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=0.0, alibi_slopes=None,
              sinks=None, attn_mask=None, dropout_p=0.0, dropout_mask=None, dropout_seed=None,
              upcast=True):
    """Reference ``tileattn.attention``; returns ``(out, lse)``.

    q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv) -> out (B, Sq, Hq, Dv),
    lse (B, Hq, Sq). ``scale`` defaults to 1/sqrt(D); causal sets window right = 0
    (bottom-right). ``alibi_slopes`` (Hq,) or (B, Hq); ``sinks`` (Hq,) logits; ``attn_mask``
    bool (True = keep) or float (added), broadcastable to (B, Hq, Sq, Sk). Dropout with
    ``dropout_p > 0`` keeps the bool (B, Hq, Sq, Sk) ``dropout_mask``, or regenerates it with
    ``_philox.keep_mask(dropout_seed, ...)``. Differentiable in q, k, v, sinks, float mask.
    """
    scale, window, alibi = _normalize(q, causal, scale, window, alibi_slopes, q.shape[0])
    out, lse = _run(q, k, v, scale=scale, window=window, softcap=float(softcap), alibi=alibi,
                    sinks=sinks, attn_mask=attn_mask, dropout_p=float(dropout_p),
                    dropout_mask=dropout_mask, seed=dropout_seed, cu_seqlens_q=None,
                    cu_seqlens_k=None, dtype=torch.float64 if upcast else q.dtype)
    return _result(out, lse, upcast, q)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, *,
                     causal=False, scale=None, window=(-1, -1), softcap=0.0, alibi_slopes=None,
                     sinks=None, dropout_p=0.0, dropout_seed=None, upcast=True):
    """Reference ``tileattn.attention_varlen``; returns ``(out, lse)``.

    q (Tq, Hq, D), k (Tk, Hkv, D), v (Tk, Hkv, Dv), cu_seqlens int (B+1,) from 0 ->
    out (Tq, Hq, Dv), lse (Hq, Tq). Each sequence b is dense attention with its own
    off = sk_b - sq_b; dropout of sequence b is ``_philox.keep_mask(dropout_seed, p, 1, Hq,
    sq_b, sk_b, b0=b)``. ``max_seqlen_*`` are accepted and unused. Other keywords as ``attention``.
    """
    scale, window, alibi = _normalize(q, causal, scale, window, alibi_slopes, len(cu_seqlens_q) - 1)
    out, lse = _run(q, k, v, scale=scale, window=window, softcap=float(softcap), alibi=alibi,
                    sinks=sinks, attn_mask=None, dropout_p=float(dropout_p), dropout_mask=None,
                    seed=dropout_seed, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                    dtype=torch.float64 if upcast else q.dtype)
    return _result(out, lse, upcast, q)


def attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, block_table=None,
                           causal=True, scale=None, window=(-1, -1), softcap=0.0, alibi_slopes=None,
                           sinks=None, num_splits=0, upcast=True):
    """Reference ``tileattn.attention_with_kvcache``; returns ``(out, lse)``; mutates the caches.

    q (B, Sn, Hq, D); cache (B, Smax, Hkv, D[v]) or paged (num_blocks, block_size, Hkv, D[v])
    with ``block_table`` (B, max_blocks); ``cache_seqlens`` int tensor (B,) or Python int.
    k/v (B, Sn, Hkv, D[v]) are written at cache_seqlens[b] .. +Sn, then keys
    0 .. cache_seqlens[b] + Sn (cache_seqlens[b] without k) are attended, causal bottom-right
    by default -> out (B, Sn, Hq, Dv), lse (B, Hq, Sn). ``num_splits`` is accepted and unused.
    """
    scale, window, alibi = _normalize(q, causal, scale, window, alibi_slopes, q.shape[0])
    out, lse = _kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, block_table=block_table,
                        scale=scale, window=window, softcap=float(softcap), alibi=alibi, sinks=sinks,
                        dtype=torch.float64 if upcast else q.dtype)
    return _result(out, lse, upcast, q)


# ----------------------------------------------------------------------------- backend contract


def _spec_kw(spec):
    """The ``_run`` / ``_kvcache`` keywords of a :class:`~tileattn.score.ScoreSpec`."""
    return dict(scale=spec.scale, window=spec.window, softcap=spec.softcap, alibi=spec.alibi_slopes)


def forward(q, k, v, spec, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None):
    """Backend ``forward`` (see ``tileattn.backends``): float64 math, out in q.dtype, lse fp32."""
    out, lse = _run(q, k, v, **_spec_kw(spec), sinks=spec.sinks, attn_mask=spec.attn_mask,
                    dropout_p=spec.dropout_p, dropout_mask=None, seed=spec.seed,
                    cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, dtype=torch.float64)
    return out.to(q.dtype).contiguous(), lse.float().contiguous()


def backward(dout, q, k, v, out, lse, spec, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
             max_seqlen_k=None, deterministic=False, mask_grad=False):
    """Backend ``backward``: float64 autograd through the oracle (``out``/``lse`` unused).

    Returns dq, dk, dv in their inputs' dtypes, dsinks fp32 (Hq,) or None, and with
    ``mask_grad`` dmask = dL/d(additive score term) fp32 (B, Hq, Sq, Sk), else None.
    Always deterministic.
    """
    sinks, attn_mask = spec.sinks, spec.attn_mask
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    sinks64 = None if sinks is None else sinks.detach().double().requires_grad_()
    bias = None
    if mask_grad:  # a bool mask becomes its equivalent 0 / -inf bias so one tensor carries both
        shape = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
        if attn_mask is None:
            bias = torch.zeros(shape, dtype=torch.float64, device=q.device)
        elif attn_mask.dtype == torch.bool:
            bias = torch.zeros(shape, dtype=torch.float64, device=q.device).masked_fill(~attn_mask, _NEG_INF)
        else:
            bias = attn_mask.detach().double().expand(shape).clone()
        attn_mask = bias.requires_grad_()
    with torch.enable_grad():
        o, _ = _run(*leaves, **_spec_kw(spec), sinks=sinks64, attn_mask=attn_mask, dropout_p=spec.dropout_p,
                    dropout_mask=None, seed=spec.seed,
                    cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, dtype=torch.float64)
        wrt = leaves + [t for t in (sinks64, bias) if t is not None]
        grads = torch.autograd.grad(o, wrt, dout.double(), allow_unused=True, materialize_grads=True)
    dq, dk, dv = (g.to(t.dtype) for g, t in zip(grads[:3], (q, k, v)))
    rest = iter(grads[3:])
    dsinks = None if sinks is None else next(rest).float()
    dmask = None if bias is None else next(rest).float()
    return dq, dk, dv, dsinks, dmask


def forward_kvcache(q, k_cache, v_cache, k_new, v_new, spec, *, cache_seqlens, block_table, num_splits):
    """Backend ``forward_kvcache``: float64 math, out in q.dtype, lse fp32; mutates the caches."""
    out, lse = _kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=cache_seqlens,
                        block_table=block_table, **_spec_kw(spec), sinks=spec.sinks, dtype=torch.float64)
    return out.to(q.dtype).contiguous(), lse.float().contiguous()
