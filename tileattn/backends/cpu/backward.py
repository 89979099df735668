"""CPU backward of ``attention`` / ``attention_varlen``: flash-attention-2's algorithm in torch.

Per slab and block of query rows (R = G * BLOCK_M packed rows), with ``delta_i =
rowsum(dout_i * out_i)`` (which also holds with dropout: sum_j P_ij dP_ij = dout_i . out_i),
every key block the window reaches is recomputed from the saved lse (no autograd)::

    P   = exp2(s2 - lse2)                        un-dropped probabilities  (Bc*Hc, R, N)
    dV += (P * keep)^T @ dout          / (1 - p)
    dP  = (dout @ v^T) * keep          / (1 - p)
    dS  = P * (dP - delta)                       dL/d(score after softcap, ALiBi and mask)
    dmask[tile] = dS                              (``mask_grad``)
    dS /= cosh^2(s / softcap)                     (softcap chain: 1 - tanh^2, accurately)
    dQ += dS @ k,  dK += dS^T @ q                 (times ``scale`` at the end)

dK/dV of a kv head sum its G query heads for free: the G heads are rows of the same matmul.
Accumulators are fp32; every sum runs in a fixed order, so the result is bitwise
reproducible (``deterministic`` is always honoured). The sink gradient is
``dsinks_h = -sum_i exp(sink_h - lse_i) * delta_i``.

[Note] fully masked rows
    An empty row has lse = -inf (no sinks, or sinks of -inf): lse2 is replaced by 0, its
    scores are all -inf, so P = 0 and every gradient it contributes is 0; its sink weight is 0
    (``score.sink_probability``), so dsinks stays finite. With a finite sink lse is finite.

[Note] large lse
    P = exp2(s2 - lse2) subtracts two numbers of the scores' magnitude: the fp32 lse saved by
    the forward (natural log, rounded twice on the way) is only known to ~|lse2| * 2^-23, so
    at |lse2| ~ 1e6 every P is off by ~10%. Where a query block's |lse2| exceeds LSE_EXACT the
    block first re-runs the forward's online softmax (``_row_stats``: m_i, l_i from the same
    score bits) and uses P = exp2(s2 - m_i) / l_i: exact to fp32 rounding at any magnitude.
    Below it the saved lse is used (the same bits as always).

Non-finite k or v in a slab switch its tiles to the exact path (``score``'s [Note] hidden keys).
"""

import torch

from tileattn.score import LSE_EXACT

from . import _tiles, score
from ._tiles import LOG2E, NEG_INF, Tiles


@torch.no_grad()
def backward(dout, q, k, v, out, lse, spec, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
             max_seqlen_k=None, deterministic=False, mask_grad=False):
    """Backend contract (see ``tileattn.backends``) -> (dq, dk, dv, dsinks, dmask).

    dense:  dout/out (B, Sq, Hq, Dv), lse (B, Hq, Sq); varlen: (Tq, Hq, Dv), lse (Hq, Tq).
    dq, dk, dv have q, k, v's shapes and dtypes (contiguous); dsinks fp32 (Hq,) when sinks
    is given; dmask fp32 (B, Hq, Sq, Sk) when ``mask_grad`` (dense only), else None.
    """
    buffer = score.Workspace()
    sinks, alibi_slopes = spec.sinks, spec.alibi_slopes
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype) for x in (q, k, v))
    dsinks = None if sinks is None else torch.zeros(sinks.shape[0], dtype=torch.float64)
    dmask = None
    if cu_seqlens_q is None:
        if mask_grad:
            dmask = torch.zeros(q.shape[0], q.shape[2], q.shape[1], k.shape[1], dtype=torch.float32)
        tiles = Tiles.from_spec(spec, q.shape[0], q.shape[1], k.shape[1], k.shape[2], q.shape[2] // k.shape[2],
                                alibi=alibi_slopes, attn_mask=spec.attn_mask, buffer=buffer)
        _dense((dout, q, k, v, out, lse), (dq, dk, dv, dsinks, dmask), sinks, tiles)
    else:
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        for b in range(len(cq) - 1):
            qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
            tiles = Tiles.from_spec(spec, 1, qs.stop - qs.start, ks.stop - ks.start, k.shape[1],
                                    q.shape[1] // k.shape[1],
                                    alibi=None if alibi_slopes is None else alibi_slopes[b:b + 1], attn_mask=None,
                                    b0=b, buffer=buffer)
            ins = (dout[None, qs], q[None, qs], k[None, ks], v[None, ks], out[None, qs], lse[None, :, qs])
            _dense(ins, (dq[None, qs], dk[None, ks], dv[None, ks], dsinks, None), sinks, tiles)
    return dq, dk, dv, None if dsinks is None else dsinks.float(), dmask


def _dense(ins, grads, sinks, tiles):
    """One dense problem. ins: dout, q, k, v, out (native layout, views allowed), lse (B, Hq, Sq).

    grads: dq, dk, dv (native-layout views, written), dsinks fp64 (Hq,) (accumulated) or None,
    dmask fp32 (B, Hq, Sq, Sk) zeros (written per visited tile) or None.
    """
    dout, q, k, v, out, lse = ins
    dq, dk, dv, dsinks, dmask = grads
    g = tiles.g
    for bs, hs in tiles.slabs():
        kh, vh = _tiles.slab_kv(k, bs, hs), _tiles.slab_kv(v, bs, hs)  # fp32 (Bc*Hc, Sk, D[v])
        tiles.exact = not score.all_finite(kh, vh)  # [Note] hidden keys (score.py)
        dkh, dvh = torch.zeros_like(kh), torch.zeros_like(vh)
        for i0, i1 in tiles.q_blocks():
            qt, dot, ot = (_tiles.gather_rows(x, bs, hs, g, i0, i1) for x in (q, dout, out))
            lse_r = _tiles.lse_rows(lse, bs, hs, g, i0, i1)
            delta = (dot * ot).sum(-1)  # (Bc*Hc, R)
            sink2 = None if sinks is None else score.sink_rows(sinks, bs, hs, g, i1 - i0)
            dqt = _rows(qt, dot, lse_r, delta, kh, vh, dkh, dvh, dmask, tiles, bs, hs, i0, i1, sink2)
            _tiles.scatter_rows(dq, dqt.mul_(tiles.scale), bs, hs, g, i0, i1)
            if dsinks is not None:
                psink = score.sink_probability(sink2, lse_r * LOG2E)
                term = (psink * delta).double().view(-1, hs.stop - hs.start, g, i1 - i0)
                dsinks[hs.start * g:hs.stop * g] -= term.sum((0, 3)).flatten()
        if tiles.dropout_p > 0:
            dvh.mul_(1.0 / (1.0 - tiles.dropout_p))
        _tiles.scatter_kv(dk, dkh.mul_(tiles.scale), bs, hs)
        _tiles.scatter_kv(dv, dvh, bs, hs)
        del kh, vh, dkh, dvh  # one slab's k/v copies at a time


def _row_stats(qt, kh, sink2, tiles, bs, hs, i0, i1):
    """The forward's (m_i, log2 l_i) of a q tile (sink folded in when ``sink2`` is given), from
    the same score bits ([Note] large lse)."""
    n, r = qt.shape[:2]
    m_i, l_i = torch.full((n, r), NEG_INF), torch.zeros(n, r)
    acc = qt.new_zeros(n, r, 0)
    for j0, j1 in tiles.k_blocks(i0, i1):
        s, _ = tiles.scores(qt, kh[:, j0:j1], bs, hs, i0, i1, j0, j1)
        m_i = score.softmax_step(m_i, l_i, acc, s)
    if sink2 is not None:
        m_i = score.fold_sink(m_i, l_i, acc, sink2)
    return m_i.masked_fill(l_i == 0, 0.0), torch.log2(l_i.masked_fill(l_i == 0, 1.0))


def _rows(qt, dot, lse_r, delta, kh, vh, dkh, dvh, dmask, tiles, bs, hs, i0, i1, sink2=None):
    """Gradients of q tile (Bc*Hc, R, D) over the slab's key blocks; dK/dV (Bc*Hc, Sk, D[v])
    accumulate in place. Returns dQ / scale of the tile, fp32 (Bc*Hc, R, D).
    """
    lse2 = (lse_r * LOG2E).masked_fill_(lse_r == NEG_INF, 0.0).unsqueeze(-1)  # [Note] fully masked rows
    stats = None
    if bool((lse2.abs() > LSE_EXACT).any()):  # [Note] large lse
        m_i, log_l = _row_stats(qt, kh, sink2, tiles, bs, hs, i0, i1)
        stats = m_i.unsqueeze(-1), log_l.unsqueeze(-1)
    dqt = torch.zeros_like(qt)
    inv_keep = 1.0 / (1.0 - tiles.dropout_p)
    for j0, j1 in tiles.k_blocks(i0, i1):
        kt, vt = kh[:, j0:j1], vh[:, j0:j1]
        s, x = tiles.scores(qt, kt, bs, hs, i0, i1, j0, j1, keep_x=True)
        p = s.sub_(lse2).exp2_() if stats is None else s.sub_(stats[0]).sub_(stats[1]).exp2_()
        hidden = tiles.hidden(bs, hs, i0, i1, j0, j1) if tiles.exact else None
        if hidden is not None:  # [Note] hidden keys: rows whose lse is NaN must not reach them
            p.masked_fill_(hidden, 0.0)
        keep = tiles.dropout_keep(bs, hs, i0, i1, j0, j1)
        pd = p if keep is None else p * keep
        dvh[:, j0:j1].baddbmm_(pd.transpose(1, 2), dot)
        dp = torch.bmm(dot, vt.transpose(1, 2), out=tiles.buffer("dp", *p.shape))
        if keep is not None:
            dp.mul_(keep).mul_(inv_keep)
        ds = dp.sub_(delta.unsqueeze(-1)).mul_(p)
        if hidden is not None:
            ds.masked_fill_(hidden, 0.0)
        if dmask is not None:
            part = dmask[bs, hs.start * tiles.g:hs.stop * tiles.g, i0:i1, j0:j1]
            part.copy_(ds.view(part.shape[0], -1, tiles.g, i1 - i0, j1 - j0).flatten(1, 2))
        if x is not None:  # softcap chain: d(c tanh(x)) / d(c x) = 1 - tanh^2 x = 1 / cosh^2 x
            ds.div_(x.cosh_().square_())  # (not 1 - t^2, which cancels to nothing as |t| -> 1)
        if tiles.exact:
            score.accumulate_kept(dqt, ds, kt, hidden)
        else:
            dqt.baddbmm_(ds, kt)
        dkh[:, j0:j1].baddbmm_(ds.transpose(1, 2), qt)
    return dqt
