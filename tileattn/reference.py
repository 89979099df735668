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

from dataclasses import replace

import torch

from tileattn import _philox, paged
from tileattn.score import ScoreSpec

_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- the core


def _core(q, k, v, spec, *, keep, dtype):
    """Dense attention computed in ``dtype``, step by step as API.md's score pipeline.

    q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv); ``spec`` a
    :class:`~tileattn.score.ScoreSpec` whose ``window`` has causal folded in, ``alibi_slopes``
    None or (B, Hq), ``sinks`` None or (Hq,), ``attn_mask`` None or bool (True = keep) /
    floating, broadcastable to (B, Hq, Sq, Sk); ``keep`` None or the bool (B, Hq, Sq, Sk)
    dropout keep-mask. Returns out (B, Sq, Hq, Dv), lse (B, Hq, Sq) in dtype.

    [Note] hidden keys
        Row i *keeps* key j when the bool mask and the causal / window test keep (i, j); a
        float mask (even -inf) is a score term, not a keep test. A row reads nothing of a key
        it does not keep: a non-finite k_j or v_j reaches exactly the rows that keep j --
        their out and lse are NaN, and so are the gradients that flow through them (dq of
        those rows, dk / dv of the keys those rows keep, dsinks) -- and nothing else. Dropout
        does not hide: it multiplies a kept weight by 0 or 1/(1-p) (0 * NaN = NaN), as the
        kernels' P @ V and delta = rowsum(dO * O) do. Plain
        matmuls cannot say that (0 * NaN = NaN in q @ k^T's backward and in P @ V), so a
        non-finite key or value column is multiplied pair by pair, for kept pairs only
        (:func:`_kept_products`); finite inputs take the plain matmuls. A non-finite query
        makes its own row NaN (its gradient effect on other keys is not specified).
    """
    B, Sq, Hq, _ = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    qh = q.to(dtype).transpose(1, 2)                                        # (B, Hq, Sq, D)
    kh = k.to(dtype).repeat_interleave(Hq // Hkv, dim=2).transpose(1, 2)    # (B, Hq, Sk, D)
    vh = v.to(dtype).repeat_interleave(Hq // Hkv, dim=2).transpose(1, 2)    # (B, Hq, Sk, Dv)
    row = torch.arange(Sq, device=q.device).view(-1, 1) + (Sk - Sq)         # i + off
    col = torch.arange(Sk, device=q.device).view(1, -1)                     # j
    kept = _kept(spec, row, col)                                            # steps 4 (bool) and 5

    s = _kept_products(qh, kh, kept, contract_keys=False) * spec.scale      # 1. scale
    if spec.softcap > 0:                                                    # 2. softcap
        s = spec.softcap * torch.tanh(s / spec.softcap)
    if spec.alibi_slopes is not None:                                       # 3. ALiBi
        wide = torch.promote_types(dtype, torch.float32)  # bias built in >= fp32, rounded once
        slopes = spec.alibi_slopes.to(wide)[:, :, None, None]
        s = s - (slopes * (row - col).abs().to(wide)).to(dtype)
    mask = spec.attn_mask
    if mask is not None and mask.dtype != torch.bool:                       # 4. float attn_mask
        s = s + mask.to(dtype)
    if kept is not None:                                                    # 4. bool mask, 5. window
        s = torch.where(kept, s, _NEG_INF)

    # 6. softmax; the sink is one more logit that takes probability mass but has no value.
    # [Note] fully masked rows: the max is taken detached and replaced by 0 when it is -inf,
    # and denominators of 0 are replaced by 1 before dividing, so an empty row gives p = 0,
    # out = 0, lse = -inf (or the sink logit) and zero -- never NaN -- gradients.
    if spec.sinks is not None:
        sink = spec.sinks.to(dtype).view(1, Hq, 1, 1).expand(B, Hq, Sq, 1)
    else:
        sink = s.new_full((B, Hq, Sq, 1), _NEG_INF)
    logits = torch.cat([s, sink], dim=-1)
    m = logits.amax(dim=-1, keepdim=True).detach()
    m = torch.where(m == _NEG_INF, 0.0, m)
    e = torch.exp(logits - m)
    denom = e.sum(dim=-1, keepdim=True)
    empty = denom == 0  # (a NaN row is not empty: its lse is NaN)
    safe = torch.where(empty, 1.0, denom)
    p = e[..., :Sk] / safe
    if kept is not None:  # [Note] hidden keys: a NaN row (it keeps a NaN key) has no p for the rest
        p = torch.where(kept, p, 0.0)
    lse = torch.where(empty, _NEG_INF, torch.log(safe) + m).squeeze(-1)

    if keep is not None:  # 7. dropout: the weight times 0 / 1 (a dropped pair is still kept: 0 * NaN = NaN)
        p = p * keep.to(device=p.device, dtype=p.dtype) / (1.0 - spec.dropout_p)
    out = _kept_products(p, vh, kept, contract_keys=True).transpose(1, 2)   # 8. P @ V
    return out, lse


def _kept(spec, row, col):
    """bool keep test of steps 4 (bool attn_mask) and 5 (causal / window), broadcastable to
    (B, Hq, Sq, Sk), or None when every (i, j) is kept."""
    kept = None
    if spec.attn_mask is not None and spec.attn_mask.dtype == torch.bool:
        kept = spec.attn_mask
    left, right = spec.window
    for on, test in ((left >= 0, lambda: col >= row - left), (right >= 0, lambda: col <= row + right)):
        if on:
            kept = test() if kept is None else kept & test()
    return kept


def _kept_products(a, b, kept, *, contract_keys):
    """``a @ b^T`` (scores: a = q (.., Sq, D), b = k (.., Sk, D)) or ``a @ b`` (P @ V: a = p
    (.., Sq, Sk), b = v (.., Sk, Dv)), where a key j whose b_j holds a non-finite value enters
    only the pairs (i, j) that ``kept`` keeps ([Note] hidden keys): its column is computed
    pair by pair from ``where(kept, b_j, 0)``, so hidden pairs contribute an exact 0 in value
    and gradient. Finite b (or nothing hidden): the plain matmul."""
    bad = ~torch.isfinite(b).all(-1)                                        # (B, Hq, Sk)
    if kept is None or not bool(bad.any()):
        return a @ b if contract_keys else a @ b.transpose(-1, -2)
    keys = bad.any(0).any(0).nonzero().flatten()                            # columns with a non-finite value
    clean = b.masked_fill(bad[..., None], 0.0)
    out = a @ clean if contract_keys else a @ clean.transpose(-1, -2)
    shape = (a.shape[0], a.shape[1], a.shape[2], b.shape[-2])
    # pair by pair where b_j is non-finite in this (batch, head) (clean holds 0 there), kept rows only
    pairs = kept.expand(shape)[..., keys] & bad[:, :, None, keys]           # (B, Hq, Sq, J)
    b_j = torch.where(pairs[..., None], b[:, :, None, keys], 0.0)           # (B, Hq, Sq, J, E)
    if contract_keys:  # out_i += sum_j p_ij v_j over those j
        return out + (a[..., keys, None] * b_j).sum(-2)
    return out.index_add(-1, keys, (a[..., None, :] * b_j).sum(-1))       # s_ij += q_i . k_j, those j


def _run(q, k, v, spec, *, dropout_mask, cu_seqlens_q, cu_seqlens_k, dtype):
    """Dense (``cu_seqlens_q`` None) or varlen attention; dropout from ``dropout_mask`` or the
    spec's seed. ``spec.alibi_slopes`` None or (B, Hq).

    Dense returns out (B, Sq, Hq, Dv), lse (B, Hq, Sq); varlen q (Tq, Hq, D) returns
    out (Tq, Hq, Dv), lse (Hq, Tq), one dense call per sequence b (dropout batch index b).
    """
    drop = spec.dropout_p > 0
    if drop and dropout_mask is None and spec.seed is None:
        raise ValueError("reference: dropout_p > 0 needs dropout_mask or a seed")
    if cu_seqlens_q is None:
        B, Sq, Hq, _ = q.shape
        if drop and dropout_mask is None:
            dropout_mask = _philox.keep_mask(spec.seed, spec.dropout_p, B, Hq, Sq, k.shape[1])
        return _core(q, k, v, spec, keep=dropout_mask if drop else None, dtype=dtype)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    Hq = q.shape[1]
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qb, kb, vb = q[None, cq[b]:cq[b + 1]], k[None, ck[b]:ck[b + 1]], v[None, ck[b]:ck[b + 1]]
        keep = _philox.keep_mask(spec.seed, spec.dropout_p, 1, Hq, qb.shape[1], kb.shape[1], b0=b) if drop else None
        o, l = _core(qb, kb, vb, _row(spec, b), keep=keep, dtype=dtype)
        outs.append(o[0])
        lses.append(l[0])
    return torch.cat(outs, dim=0), torch.cat(lses, dim=-1)


def _row(spec, b):
    """The spec of batch row / sequence b alone: slopes (1, Hq), no attn_mask."""
    slopes = None if spec.alibi_slopes is None else spec.alibi_slopes[b:b + 1]
    return replace(spec, alibi_slopes=slopes, attn_mask=None)


def _kvcache(q, k_cache, v_cache, k_new, v_new, spec, *, cache_seqlens, block_table, dtype, rows=None, starts=None):
    """Append k_new/v_new into the cache in place, then attend each batch row to its keys.

    Contiguous cache (B, Smax, Hkv, D[v]) or paged (num_blocks, page_size, Hkv, D[v]) with
    block_table (B, max_blocks), addressed by ``tileattn.paged``. Row b uses cache row
    ``rows[b]`` (contiguous; default b) and attends keys ``starts[b]`` (default 0) .. end.
    Returns out (B, Sn, Hq, Dv), lse (B, Hq, Sn) in dtype.
    """
    B, Sn = q.shape[:2]
    lens = cache_seqlens.tolist() if torch.is_tensor(cache_seqlens) else [int(cache_seqlens)] * B
    rows = range(B) if rows is None else rows.tolist()
    starts = [0] * B if starts is None else starts.tolist()
    dev = k_cache.device
    outs, lses = [], []
    for b in range(B):
        n, r = lens[b], rows[b]
        if k_new is not None:
            at = paged.row_index(k_cache, block_table, r, torch.arange(n, n + Sn, device=dev))
            with torch.no_grad():
                k_cache[at] = k_new[b].to(k_cache.dtype)
                v_cache[at] = v_new[b].to(v_cache.dtype)
            n += Sn
        keys = paged.row_index(k_cache, block_table, r, torch.arange(starts[b], n, device=dev))
        o, l = _core(q[b:b + 1], k_cache[keys][None], v_cache[keys][None], _row(spec, b), keep=None, dtype=dtype)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, dim=0), torch.cat(lses, dim=0)


def _spec(q, batch, causal, scale, window, softcap, alibi_slopes, sinks, attn_mask=None, dropout_p=0.0, seed=None):
    """The public oracle's keywords as a ScoreSpec (slopes (B, Hq)); the tensors are kept as
    given (float64 sinks stay float64 leaves), ``seed`` may be None."""
    spec = ScoreSpec.build(q.shape[-1], causal=causal, scale=scale, window=window, softcap=softcap,
                           dropout_p=dropout_p)
    if alibi_slopes is not None and alibi_slopes.dim() == 1:
        alibi_slopes = alibi_slopes.expand(batch, alibi_slopes.shape[0])
    return replace(spec, alibi_slopes=alibi_slopes, sinks=sinks, attn_mask=attn_mask, seed=seed)


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
    spec = _spec(q, q.shape[0], causal, scale, window, softcap, alibi_slopes, sinks, attn_mask, dropout_p,
                 dropout_seed)
    out, lse = _run(q, k, v, spec, dropout_mask=dropout_mask, cu_seqlens_q=None, cu_seqlens_k=None,
                    dtype=torch.float64 if upcast else q.dtype)
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
    spec = _spec(q, len(cu_seqlens_q) - 1, causal, scale, window, softcap, alibi_slopes, sinks, None, dropout_p,
                 dropout_seed)
    out, lse = _run(q, k, v, spec, dropout_mask=None, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                    dtype=torch.float64 if upcast else q.dtype)
    return _result(out, lse, upcast, q)


def attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, block_table=None,
                           causal=True, scale=None, window=(-1, -1), softcap=0.0, alibi_slopes=None,
                           sinks=None, num_splits=0, rotary_cos=None, rotary_sin=None, rotary_interleaved=False,
                           cache_batch_idx=None, cache_leftpad=None, upcast=True):
    """Reference ``tileattn.attention_with_kvcache``; returns ``(out, lse)``; mutates the caches.

    q (B, Sn, Hq, D); cache (B, Smax, Hkv, D[v]) or paged (num_blocks, block_size, Hkv, D[v])
    with ``block_table`` (B, max_blocks); ``cache_seqlens`` int tensor (B,) or Python int.
    k/v (B, Sn, Hkv, D[v]) are written at cache_seqlens[b] .. +Sn, then keys
    cache_leftpad[b] (default 0) .. cache_seqlens[b] + Sn (cache_seqlens[b] without k) are
    attended, causal bottom-right against that end -> out (B, Sn, Hq, Dv), lse (B, Hq, Sn).
    ``cache_batch_idx`` (B,) maps row b to contiguous cache row cache_batch_idx[b]. Rotary
    (``rotary_cos``/``rotary_sin`` (seqlen_ro, r/2)) turns q and k before the append: pairs
    (d, d + r/2), or (2d, 2d + 1) interleaved, at position cache_seqlens[b] + i (q's rows all
    at cache_seqlens[b] unless causal or windowed). ``num_splits`` is accepted and unused.
    """
    spec = _spec(q, q.shape[0], causal, scale, window, softcap, alibi_slopes, sinks)
    dtype = torch.float64 if upcast else q.dtype
    if rotary_cos is not None:
        q, k = _rotate_new(q, k, (rotary_cos, rotary_sin, rotary_interleaved), cache_seqlens,
                           causal or tuple(window) != (-1, -1), dtype)
    out, lse = _kvcache(q, k_cache, v_cache, k, v, spec, cache_seqlens=cache_seqlens, block_table=block_table,
                        dtype=dtype, rows=cache_batch_idx, starts=cache_leftpad)
    return _result(out, lse, upcast, q)


def _rotate_new(q, k, rotary, cache_seqlens, positional, dtype):
    """q and k (B, Sn, ...) rotated by ``rotary`` (cos, sin, interleaved) in ``dtype``: k at
    positions cache_seqlens[b] + i, q likewise when ``positional`` (causal or windowed), else
    every row at cache_seqlens[b]."""
    cos, sin, interleaved = rotary
    lens = torch.as_tensor(cache_seqlens, device=q.device).long().expand(q.shape[0])
    pos = lens[:, None] + torch.arange(q.shape[1], device=q.device)
    q_pos = pos if positional else lens[:, None].expand_as(pos)
    return _rotary(q, cos, sin, q_pos, interleaved, dtype), _rotary(k, cos, sin, pos, interleaved, dtype)


def _rotary(x, cos, sin, pos, interleaved, dtype):
    """x (B, S, H, D) in ``dtype`` with its first 2 * cos.shape[1] dims rotated at positions pos (B, S)."""
    half = cos.shape[1]
    c, s = cos.to(dtype)[pos][:, :, None], sin.to(dtype)[pos][:, :, None]
    first, second = (slice(0, 2 * half, 2), slice(1, 2 * half, 2)) if interleaved else \
        (slice(0, half), slice(half, 2 * half))
    x = x.to(dtype)
    out = x.clone()
    out[..., first] = x[..., first] * c - x[..., second] * s
    out[..., second] = x[..., first] * s + x[..., second] * c
    return out


# ----------------------------------------------------------------------------- backend contract


def forward(q, k, v, spec, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None):
    """Backend ``forward`` (see ``tileattn.backends``): float64 math, out in q.dtype, lse fp32."""
    out, lse = _run(q, k, v, spec, dropout_mask=None, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                    dtype=torch.float64)
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
        o, _ = _run(*leaves, replace(spec, sinks=sinks64, attn_mask=attn_mask), dropout_mask=None,
                    cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, dtype=torch.float64)
        wrt = leaves + [t for t in (sinks64, bias) if t is not None]
        grads = torch.autograd.grad(o, wrt, dout.double(), allow_unused=True, materialize_grads=True)
    dq, dk, dv = (g.to(t.dtype) for g, t in zip(grads[:3], (q, k, v)))
    rest = iter(grads[3:])
    dsinks = None if sinks is None else next(rest).float()
    dmask = None if bias is None else next(rest).float()
    return dq, dk, dv, dsinks, dmask


def forward_kvcache(q, k_cache, v_cache, k_new, v_new, spec, *, cache_seqlens, block_table, num_splits, rotary=None,
                    cache_batch_idx=None, cache_leftpad=None):
    """Backend ``forward_kvcache``: float64 math, out in q.dtype, lse fp32; mutates the caches."""
    dtype = q.dtype
    if rotary is not None:
        q, k_new = _rotate_new(q, k_new, rotary, cache_seqlens, spec.window != (-1, -1), torch.float64)
    out, lse = _kvcache(q, k_cache, v_cache, k_new, v_new, spec, cache_seqlens=cache_seqlens,
                        block_table=block_table, dtype=torch.float64, rows=cache_batch_idx, starts=cache_leftpad)
    return out.to(dtype).contiguous(), lse.float().contiguous()
