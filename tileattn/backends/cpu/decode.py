"""CPU ``forward_kvcache``: attention of new tokens over a contiguous or paged KV cache.

Sub notation (as ``_tiles`` and the Triton decode kernel):

    B, Sn        batch, new query tokens per sequence (1 = decode)
    Hq, Hkv, G   query heads, kv heads, G = Hq // Hkv query heads per kv head (packed GQA:
                 query head h = kvh * G + g reads kv head kvh, so each kv tile is read once)
    D, Dv        query/key and value head dims
    L_b          cache_seqlens[b], tokens already in the cache
    Sk_b         keys attended: L_b + Sn (L_b when no new k/v), off_b = Sk_b - Sn
    BLOCK_N      keys per tile of the online softmax
    R            G * Sn packed query rows per kv head (row g * Sn + i is head kvh * G + g, token i)
    m_i, l_i     running row max of the base-2 scores s2 and row sum of exp2(s2 - m_i);
                 acc the running unnormalized output (Hkv, R, Dv)

Per sequence (so its result never depends on its batch companions):

1. ``append_`` writes k_new/v_new in place (``tileattn.paged``: contiguous row b, or page
   ``block_table[b, pos // page_size]`` slot ``pos % page_size``).
2. The keys the window can keep, ``[lo, hi)``, are cut into ``num_splits`` near-equal runs
   (split-KV); each run is an online softmax over BLOCK_N-key tiles gathered from the cache
   (a paged tile is gathered slot by slot through the block table; the whole sequence is
   never materialized), giving a partial (out, lse).
3. The runs are merged by their lse (flash-decoding's combine); the sink logit enters the
   merge as one more term that carries no value.

Decode features, natively: rotary turns q and k_new (fp32, stored in their dtype, as the GPU
kernel) before step 1 (:func:`rotate`); ``cache_batch_idx`` reads the contiguous cache
(B_cache, Smax, ...) as B_cache pages of Smax slots through the one-column table
cache_batch_idx[:, None] (a view: appends reach the cache); ``cache_leftpad`` starts row b's
key range at slot leftpad[b] (positions stay slot numbers, as in the oracle).

The score pipeline (scale, softcap, ALiBi, window) and the online-softmax step are ``score.py``'s,
shared with the CPU forward and backward, so each rule is written once; as there, scores are fp32 in base 2
(``exp2``) whatever the cache dtype, and lse is converted back to natural log per run.
Memory is O(Hq * Sn * BLOCK_N) per step; out is cast to q's dtype at the end.

[Note] empty rows
    A row that keeps no key (``cache_seqlens = 0`` without new k/v, a window that excludes
    every key) has m_i = -inf (``score.softmax_step`` takes no ``-inf - -inf``), l_i stays 0,
    the run's lse is -inf and its out is 0. The merge weights such runs by exp(-inf) = 0, so
    the row ends with out 0 and lse -inf (or the sink logit when sinks are given), as API.md
    requires.

A tile with hidden pairs (the causal diagonal of the new keys, a window edge) whose k or v
holds a non-finite value runs ``score``'s exact path ([Note] hidden keys): a NaN key the
causal mask hides from a new token does not reach that token's row.
"""

import torch

from tileattn import paged

from . import score
from .score import LN2, NEG_INF, TileScore

BLOCK_N = 256  # keys per tile; tests lower it to exercise many tiles on short caches


def append_(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table):
    """Write ``k_new`` (B, Sn, Hkv, D) / ``v_new`` (B, Sn, Hkv, Dv) into the caches in place at
    positions ``cache_seqlens[b] + (0 .. Sn-1)``. Caches are contiguous (B, Smax, Hkv, D[v])
    with ``block_table`` None, or paged (num_blocks, block_size, Hkv, D[v]) with an int32
    ``block_table`` (B, max_blocks). Indices are built on the cache's device: no host sync.
    """
    pos = paged.append_positions(cache_seqlens, k_new.shape[1])
    paged.scatter_(k_cache, block_table, pos, k_new)
    paged.scatter_(v_cache, block_table, pos, v_new)


def forward_kvcache(q, k_cache, v_cache, k_new, v_new, spec, *, cache_seqlens, block_table, num_splits, rotary=None,
                    cache_batch_idx=None, cache_leftpad=None):
    """Backend contract (see ``tileattn.backends``): q (B, Sn, Hq, D) over the cache, after
    appending k_new/v_new -> out (B, Sn, Hq, Dv) in q.dtype, lse (B, Hq, Sn) float32.

    ``num_splits`` 0 means 1 on CPU (torch ops are already multi-threaded, so splitting only
    adds merge work); N > 1 splits each sequence's keys into N runs merged by lse, exactly as
    the GPU's split-KV does, so 1 vs N is testable on CPU. Decode features as in the module
    docstring.
    """
    batch, sn, hq, _ = q.shape
    hkv, dv = k_cache.shape[2], v_cache.shape[3]
    if rotary is not None:
        pos = paged.append_positions(cache_seqlens, sn)
        q_pos = pos if spec.window != (-1, -1) else pos[:, :1].expand(-1, sn)
        q, k_new = rotate(q, rotary, q_pos), rotate(k_new, rotary, pos)
    if cache_batch_idx is not None:
        block_table = cache_batch_idx[:, None]
    if k_new is not None:
        append_(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table)
    seqlens_k = (cache_seqlens.to(torch.long) + (sn if k_new is not None else 0)).tolist()
    out = torch.empty(batch, sn, hq, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, hq, sn, dtype=torch.float32, device=q.device)
    table = block_table.to(torch.long) if block_table is not None else None
    starts = [0] * batch if cache_leftpad is None else cache_leftpad.tolist()
    for b in range(batch):
        tiles = TileScore.from_spec(spec, 1, sn, seqlens_k[b], hkv, hq // hkv, attn_mask=None, dropout=False,
                                    alibi=None if spec.alibi_slopes is None else spec.alibi_slopes[b:b + 1])
        seq = _Sequence(k_cache, v_cache, b, table, tiles, starts[b])
        o, lse_b = seq.attend(q[b], spec.sinks, max(num_splits, 1))
        out[b] = o.to(q.dtype)
        lse[b] = lse_b
    return out, lse


class _Sequence:
    """One sequence b of the batch (a ``TileScore`` problem with B = 1): its key range, tiles, runs."""

    def __init__(self, k_cache, v_cache, b, table, tiles, start=0):
        self.k_cache, self.v_cache, self.b, self.table, self.tiles = k_cache, v_cache, b, table, tiles
        left, right = tiles.window
        # keys any row may keep: from the sequence's first slot (leftpad) and the left bound of
        # row 0 to the right bound of row Sn-1
        self.lo = max(start, tiles.off - left) if left >= 0 else start
        self.hi = min(tiles.sk, tiles.sq - 1 + tiles.off + right + 1) if right >= 0 else tiles.sk

    def attend(self, q_b, sinks, num_splits):
        """q_b (Sn, Hq, D) -> out (Sn, Hq, Dv) fp32, lse (Hq, Sn) fp32."""
        hkv, g, sn = self.tiles.hkv, self.tiles.g, self.tiles.sq
        d, dv = q_b.shape[-1], self.v_cache.shape[-1]
        qg = q_b.float().reshape(sn, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * sn, d)
        n_keys = max(self.hi - self.lo, 0)
        splits = max(min(num_splits, n_keys), 1)
        run_len = -(-n_keys // splits) if n_keys else 1
        runs = [self._run(qg, j0, min(j0 + run_len, self.hi)) for j0 in range(self.lo, self.hi, run_len)]
        if not runs:
            runs = [(qg.new_zeros(hkv, g * sn, dv), qg.new_full((hkv, g * sn), NEG_INF))]
        sink = None if sinks is None else sinks.reshape(hkv, g, 1).expand(hkv, g, sn).reshape(hkv, g * sn)
        out, lse = _merge(runs, sink)
        return out.reshape(hkv, g, sn, dv).permute(2, 0, 1, 3).reshape(sn, hkv * g, dv), lse.reshape(hkv * g, sn)

    def _tile(self, cache, j0, j1):
        """Cache rows j0..j1-1 of this sequence as (Hkv, j1 - j0, D[v]) fp32."""
        return paged.gather(cache, self.table, self.b, j0, j1).transpose(0, 1).float()

    def _run(self, qg, start, stop):
        """Online softmax of qg (Hkv, G*Sn, D) over keys [start, stop) -> (out (Hkv, G*Sn, Dv), lse)."""
        tiles, every = self.tiles, slice(0, 1)
        heads = slice(0, tiles.hkv)
        m_i = qg.new_full(qg.shape[:2], NEG_INF)  # base 2
        l_i = qg.new_zeros(qg.shape[:2])
        acc = qg.new_zeros(*qg.shape[:2], self.v_cache.shape[-1])
        for j0 in range(start, stop, BLOCK_N):
            j1 = min(j0 + BLOCK_N, stop)
            kt, vt = self._tile(self.k_cache, j0, j1), self._tile(self.v_cache, j0, j1)
            hidden = tiles.hidden(every, heads, 0, tiles.sq, j0, j1)  # None: every pair kept
            tiles.exact = hidden is not None and not score.all_finite(kt, vt)
            s, _ = tiles.scores(qg, kt, every, heads, 0, tiles.sq, j0, j1)
            m_i = score.softmax_step(m_i, l_i, acc, s)  # [Note] empty rows
            if tiles.exact:
                score.accumulate_kept(acc, s, vt, hidden)
            else:
                acc.add_(torch.bmm(s, vt))
        out, lse2 = score.finish(m_i, l_i, acc)
        return out, lse2 * LN2


def rotate(x, rotary, pos):
    """x (B, Sn, H, D) with its first rotary_dim dims turned at positions pos (B, Sn) by
    ``rotary`` = (cos, sin, interleaved), cos/sin (seqlen_ro, rotary_dim / 2): pairs
    (d, d + rotary_dim / 2), or (2d, 2d + 1) interleaved; fp32 math, x's dtype."""
    cos, sin, interleaved = rotary
    half = cos.shape[1]
    c, s = cos.float()[pos][:, :, None, :], sin.float()[pos][:, :, None, :]  # (B, Sn, 1, r/2)
    rot = x[..., :2 * half].float()
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rot = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        rot = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rot.to(x.dtype), x[..., 2 * half:]), dim=-1)


def _merge(runs, sink):
    """Combine split runs [(out (Hkv, R, Dv), lse (Hkv, R))] and the sink logit (Hkv, R) by lse."""
    lses = torch.stack([lse for _, lse in runs])
    terms = lses if sink is None else torch.cat([lses, sink[None]])
    lse = torch.logsumexp(terms, dim=0)
    weights = torch.exp(lses - lse.masked_fill(lse == NEG_INF, 0.0))  # [Note] empty rows
    out = sum(w.unsqueeze(-1) * o for w, (o, _) in zip(weights, runs))
    return out, lse
