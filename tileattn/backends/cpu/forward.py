"""CPU forward of ``attention`` / ``attention_varlen``: tiled online softmax in torch.

Per slab (see ``_tiles``) and block of BLOCK_M query rows (all G heads of a kv head packed as
R = G * BLOCK_M rows), the key blocks the window can reach are visited in order, keeping the
online-softmax state in fp32 and base 2::

    s2   = tile scores (log2 units)                 (Bc*Hc, R, N)
    m_i  = running row max of s2                    (Bc*Hc, R)
    l_i  = running row sum of exp2(s2 - m_i)        (un-dropped probabilities)
    acc  = running sum of exp2(s2 - m_i) * keep @ v (Bc*Hc, R, Dv)

and at the end ``out = acc / l_i / (1 - p)``, ``lse = (m_i + log2(l_i)) * ln 2``, the sink
logit (if any) entering as one more term of l_i that carries no value.

[Note] fixed reference max
    The running max only keeps exp2 from overflowing. When every score of a query block is
    known to satisfy |s2| <= EXP2_SAFE = 64 (``Tiles.score_bound``: alpha |q| max|k| by
    Cauchy-Schwarz, or the softcap), m_i stays 0: exp2(s2) lies in [2^-64, 2^64], which fp32
    holds at full relative precision, and l_i, acc cannot overflow while max|v| <= 2^40 and
    Sk <= 2^22 (checked). Same math, minus the row max, the subtraction and the rescaling of
    every tile (a third of the non-matmul work). Otherwise the running max is used.

[Note] fully masked rows
    See ``score.softmax_step``: a row that ends with l_i = 0 gets out 0 and lse -inf; with
    sinks its only term is the sink's exp2(sink - m_i), so out 0 and lse = the sink logit.

Non-finite k or v in a slab switch its tiles to the exact path (``score``'s [Note] hidden keys).
"""

import torch

from . import _tiles, score
from ._tiles import LN2, Tiles


@torch.no_grad()
def forward(q, k, v, spec, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None):
    """Backend contract (see ``tileattn.backends``).

    dense:  q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv) -> out (B, Sq, Hq, Dv) in
            q.dtype, lse (B, Hq, Sq) fp32.
    varlen: q (Tq, Hq, D), k/v (Tk, Hkv, D[v]), cu_seqlens_* int32 (B+1,) -> out (Tq, Hq, Dv),
            lse (Hq, Tq); one dense problem per sequence b (dropout batch id b).
    """
    buffer = score.Workspace()
    sinks, alibi_slopes = spec.sinks, spec.alibi_slopes
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    if cu_seqlens_q is None:
        lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)
        _dense(q, k, v, out, lse, sinks, Tiles.from_spec(spec, q.shape[0], q.shape[1], k.shape[1], k.shape[2],
               q.shape[2] // k.shape[2], alibi=alibi_slopes, attn_mask=spec.attn_mask, buffer=buffer))
        return out, lse
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        tiles = Tiles.from_spec(spec, 1, qs.stop - qs.start, ks.stop - ks.start, k.shape[1],
                                q.shape[1] // k.shape[1], alibi=None if alibi_slopes is None else alibi_slopes[b:b + 1],
                                attn_mask=None, b0=b, buffer=buffer)
        _dense(q[None, qs], k[None, ks], v[None, ks], out[None, qs], lse[None, :, qs], sinks, tiles)
    return out, lse


def _dense(q, k, v, out, lse, sinks, tiles):
    """One dense problem: fill ``out`` (B, Sq, Hq, Dv) and ``lse`` (B, Hq, Sq) (views allowed)."""
    g = tiles.g
    if tiles.sq == 0:
        return
    for bs, hs in tiles.slabs():
        nbh = (bs.stop - bs.start) * (hs.stop - hs.start)
        buf = tiles.buffer  # reused across slabs: fresh multi-MiB copies cost page faults
        kh = _tiles.slab_kv(k, bs, hs, buf("kh", nbh, tiles.sk, k.shape[-1]))  # fp32 (Bc*Hc, Sk, D)
        vh = _tiles.slab_kv(v, bs, hs, buf("vh", nbh, tiles.sk, v.shape[-1]))
        kmax, vmax = 0.0, 0.0
        tiles.exact = not score.all_finite(kh, vh)  # [Note] hidden keys (score.py)
        if tiles.sk and not tiles.exact:
            kmax = float(torch.linalg.vector_norm(kh, dim=-1).max())
            vmax = max(abs(float(x)) for x in torch.aminmax(vh))
        v_ok = 2.0 ** -40 <= vmax <= 2.0 ** 40 and tiles.sk <= 2 ** 22 and not tiles.exact  # [Note] fixed ...
        for i0, i1 in tiles.q_blocks():
            qt = _tiles.gather_rows(q, bs, hs, g, i0, i1, buf("q", nbh, g * (i1 - i0), q.shape[-1]))
            fixed = v_ok and tiles.score_bound(qt, kmax) <= score.EXP2_SAFE
            o, lse2 = _rows(qt, kh, vh, sinks, tiles, bs, hs, i0, i1, fixed)
            _tiles.scatter_rows(out, o, bs, hs, g, i0, i1)
            lse2 = lse2.view(-1, hs.stop - hs.start, g, i1 - i0).flatten(1, 2)  # (Bc, Hc*G, M)
            lse[bs, hs.start * g:hs.stop * g, i0:i1] = lse2 * LN2
        del kh, vh  # one slab's k/v copies at a time


def _rows(qt, kh, vh, sinks, tiles, bs, hs, i0, i1, fixed):
    """Online softmax of q tile (Bc*Hc, R, D) over the slab's kh/vh (Bc*Hc, Sk, D[v]) key blocks
    -> (out (Bc*Hc, R, Dv) fp32, base-2 lse (Bc*Hc, R)).

    ``fixed``: keep m_i = 0 instead of a running max ([Note] fixed reference max).
    """
    n, r = qt.shape[:2]
    m_i = torch.full((n, r), 0.0 if fixed else score.NEG_INF)
    l_i = torch.zeros(n, r)
    acc = tiles.buffer("acc", n, r, vh.shape[-1]).zero_()
    for j0, j1 in tiles.k_blocks(i0, i1):
        s, _ = tiles.scores(qt, kh[:, j0:j1], bs, hs, i0, i1, j0, j1)
        m_i = score.softmax_step(m_i, l_i, acc, s, fixed)
        keep = tiles.dropout_keep(bs, hs, i0, i1, j0, j1)
        if keep is not None:
            s.mul_(keep)
        if tiles.exact:
            score.accumulate_kept(acc, s, vh[:, j0:j1], tiles.hidden(bs, hs, i0, i1, j0, j1))
        else:
            acc.baddbmm_(s, vh[:, j0:j1])
    if sinks is not None:  # the sink: one more logit in the denominator, no value
        m_i = score.fold_sink(m_i, l_i, acc, score.sink_rows(sinks, bs, hs, tiles.g, i1 - i0))
    return score.finish(m_i, l_i, acc, tiles.dropout_p)
