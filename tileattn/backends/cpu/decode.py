"""CPU ``forward_kvcache``: attention of new tokens over a contiguous or paged KV cache.

Sub notation (the Triton decode kernel uses the same names):

    B, Sn        batch, new query tokens per sequence (1 = decode)
    Hq, Hkv, G   query heads, kv heads, G = Hq // Hkv query heads per kv head (packed GQA:
                 query head h = kvh * G + g reads kv head kvh, so each kv tile is read once)
    D, Dv        query/key and value head dims
    L_b          cache_seqlens[b], tokens already in the cache
    Sk_b         keys attended: L_b + Sn (L_b when no new k/v), off_b = Sk_b - Sn
    BLOCK_N      keys per tile of the online softmax
    m_i, l_i     running row max and row sum of exp(s - m_i); acc running unnormalized output

Per sequence (so its result never depends on its batch companions):

1. ``append_`` writes k_new/v_new in place (contiguous: row b; paged: page
   ``block_table[b, pos // block_size]``, slot ``pos % block_size``).
2. The keys the window can keep, ``[lo, hi)``, are cut into ``num_splits`` near-equal runs
   (split-KV); each run is an online softmax over BLOCK_N-key tiles gathered from the cache
   (a paged tile is gathered slot by slot through the block table; the whole sequence is
   never materialized), giving a partial (out, lse).
3. The runs are merged by their lse (flash-decoding's combine); the sink logit enters the
   merge as one more term that carries no value.

Memory is O(Hq * Sn * BLOCK_N) per step. Scores and accumulators are fp32 whatever the cache
dtype; out is cast to q's dtype at the end.

[Note] empty rows
    A row that keeps no key (``cache_seqlens = 0`` without new k/v, a window that excludes
    every key) has m_i = -inf; the exponent is then taken against 0 instead of -inf so no
    ``-inf - -inf`` NaN appears, l_i stays 0, the run's lse is -inf and its out is 0. The
    merge weights such runs by exp(-inf) = 0, so the row ends with out 0 and lse -inf (or the
    sink logit when sinks are given), as API.md requires.
"""

import math

import torch

BLOCK_N = 256  # keys per tile; tests lower it to exercise many tiles on short caches


def append_(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table):
    """Write ``k_new`` (B, Sn, Hkv, D) / ``v_new`` (B, Sn, Hkv, Dv) into the caches in place at
    positions ``cache_seqlens[b] + (0 .. Sn-1)``. Caches are contiguous (B, Smax, Hkv, D[v])
    with ``block_table`` None, or paged (num_blocks, block_size, Hkv, D[v]) with an int32
    ``block_table`` (B, max_blocks). Indices are built on the cache's device: no host sync.
    """
    batch, sn = k_new.shape[:2]
    pos = cache_seqlens.to(torch.long)[:, None] + torch.arange(sn, device=k_cache.device)  # (B, Sn)
    if block_table is None:
        index = (torch.arange(batch, device=k_cache.device)[:, None].expand(batch, sn), pos)
    else:
        block_size = k_cache.shape[1]
        index = (block_table.to(torch.long).gather(1, pos // block_size), pos % block_size)
    k_cache[index] = k_new.to(k_cache.dtype)
    v_cache[index] = v_new.to(v_cache.dtype)


def forward_kvcache(q, k_cache, v_cache, k_new, v_new, *, cache_seqlens, block_table, scale,
                    window, softcap, alibi_slopes, sinks, num_splits):
    """Backend contract (see ``tileattn.backends``): q (B, Sn, Hq, D) over the cache, after
    appending k_new/v_new -> out (B, Sn, Hq, Dv) in q.dtype, lse (B, Hq, Sn) float32.

    ``num_splits`` 0 means 1 on CPU (torch ops are already multi-threaded, so splitting only
    adds merge work); N > 1 splits each sequence's keys into N runs merged by lse, exactly as
    the GPU's split-KV does, so 1 vs N is testable on CPU.
    """
    batch, sn, hq, _ = q.shape
    hkv, dv = k_cache.shape[2], v_cache.shape[3]
    if k_new is not None:
        append_(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table)
    seqlens_k = (cache_seqlens.to(torch.long) + (sn if k_new is not None else 0)).tolist()
    out = torch.empty(batch, sn, hq, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, hq, sn, dtype=torch.float32, device=q.device)
    table = block_table.to(torch.long) if block_table is not None else None
    for b in range(batch):
        seq = _Sequence(k_cache, v_cache, b, table, seqlens_k[b], sn, hkv, scale, window, softcap,
                        alibi_slopes[b] if alibi_slopes is not None else None)
        o, lse_b = seq.attend(q[b], sinks, max(num_splits, 1))
        out[b] = o.to(q.dtype)
        lse[b] = lse_b
    return out, lse


class _Sequence:
    """One sequence b of the batch: its key range, its tiles, its split runs."""

    def __init__(self, k_cache, v_cache, b, table, seqlen_k, sn, hkv, scale, window, softcap, slopes):
        self.k_cache, self.v_cache, self.b, self.table = k_cache, v_cache, b, table
        self.sn, self.hkv, self.scale, self.softcap = sn, hkv, scale, softcap
        self.off = seqlen_k - sn
        self.left, self.right = window
        self.slopes = slopes  # (Hq,) fp32 or None
        # keys any row may keep: left bound of row 0, right bound of row Sn-1
        self.lo = max(0, self.off - self.left) if self.left >= 0 else 0
        self.hi = min(seqlen_k, sn - 1 + self.off + self.right + 1) if self.right >= 0 else seqlen_k

    def attend(self, q_b, sinks, num_splits):
        """q_b (Sn, Hq, D) -> out (Sn, Hq, Dv) fp32, lse (Hq, Sn) fp32."""
        sn, hkv = self.sn, self.hkv
        hq, d = q_b.shape[1:]
        g = hq // hkv
        qg = q_b.float().reshape(sn, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * sn, d)
        n_keys = max(self.hi - self.lo, 0)
        splits = max(min(num_splits, n_keys), 1)
        run_len = -(-n_keys // splits) if n_keys else 0
        runs = [self._run(qg, g, j0, min(j0 + run_len, self.hi)) for j0 in range(self.lo, self.hi, run_len or 1)]
        if not runs:
            dv = self.v_cache.shape[-1]
            runs = [(qg.new_zeros(hkv, g, sn, dv), qg.new_full((hkv, g, sn), -math.inf))]
        out, lse = _merge(runs, sinks.reshape(hkv, g, 1).expand(hkv, g, sn) if sinks is not None else None)
        return out.permute(2, 0, 1, 3).reshape(sn, hq, -1), lse.reshape(hq, sn)

    def _tile(self, cache, j0, j1):
        """Cache rows j0..j1-1 of this sequence: (j1 - j0, Hkv, D[v]) in fp32."""
        if self.table is None:
            return cache[self.b, j0:j1].float()
        block_size = cache.shape[1]
        j = torch.arange(j0, j1, device=cache.device)
        return cache[self.table[self.b, j // block_size], j % block_size].float()

    def _run(self, qg, g, start, stop):
        """Online softmax of qg (Hkv, G*Sn, D) over keys [start, stop) -> (out (Hkv,G,Sn,Dv), lse (Hkv,G,Sn))."""
        hkv, sn = self.hkv, self.sn
        m_i = qg.new_full((hkv, g, sn), -math.inf)
        l_i = qg.new_zeros((hkv, g, sn))
        acc = qg.new_zeros((hkv, g * sn, self.v_cache.shape[-1]))
        rows = torch.arange(sn, device=qg.device)[:, None] + self.off  # i + off, (Sn, 1)
        for j0 in range(start, stop, BLOCK_N):
            j1 = min(j0 + BLOCK_N, stop)
            k = self._tile(self.k_cache, j0, j1).transpose(0, 1)  # (Hkv, n, D)
            v = self._tile(self.v_cache, j0, j1).transpose(0, 1)  # (Hkv, n, Dv)
            s = self._scores(qg, k, rows - torch.arange(j0, j1, device=qg.device), g)
            m_new = torch.maximum(m_i, s.amax(-1))
            m_safe = m_new.masked_fill(m_new == -math.inf, 0.0)  # [Note] empty rows
            p = torch.exp(s - m_safe[..., None])
            alpha = torch.exp(m_i - m_safe)
            l_i = l_i * alpha + p.sum(-1)
            acc = acc * alpha.reshape(hkv, g * sn, 1) + torch.matmul(p.reshape(hkv, g * sn, -1), v)
            m_i = m_new
        acc = acc.reshape(hkv, g, sn, -1)
        out = torch.where(l_i[..., None] > 0, acc / l_i[..., None], 0.0)
        return out, m_i + torch.log(l_i)  # l_i = 0 -> log 0 = -inf

    def _scores(self, qg, k, dist, g):
        """Scores (Hkv, G, Sn, n) for one tile, through the API.md pipeline; dist = i + off - j."""
        s = torch.matmul(qg, k.transpose(1, 2)).reshape(self.hkv, g, self.sn, -1) * self.scale
        if self.softcap > 0:
            s = self.softcap * torch.tanh(s / self.softcap)
        if self.slopes is not None:
            s = s - self.slopes.reshape(self.hkv, g, 1, 1) * dist.abs()
        keep = None
        if self.left >= 0:
            keep = dist <= self.left
        if self.right >= 0:
            keep = (dist >= -self.right) if keep is None else keep & (dist >= -self.right)
        return s if keep is None else s.masked_fill(~keep, -math.inf)


def _merge(runs, sink):
    """Combine split runs [(out (Hkv,G,Sn,Dv), lse (Hkv,G,Sn))] and the sink logit by lse."""
    lses = torch.stack([lse for _, lse in runs])
    terms = lses if sink is None else torch.cat([lses, sink[None]])
    lse = torch.logsumexp(terms, dim=0)
    lse_safe = lse.masked_fill(lse == -math.inf, 0.0)  # [Note] empty rows
    weights = torch.exp(lses - lse_safe)
    out = sum(w[..., None] * o for w, (o, _) in zip(weights, runs))
    return out, lse
