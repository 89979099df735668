"""The CPU score pipeline, written once: every API.md step on one fp32 tile, and the
online-softmax state. Used by the CPU forward, backward and decode (``forward.py``,
``backward.py``, ``decode.py``); ``tileattn.reference`` is the same rule in float64.

Sub notation (``_tiles`` and the Triton kernels use the same names):

    off           Sk - Sq of the problem (per sequence for varlen and decode)
    G             query heads per kv head; a tile packs the G heads as rows: R = G * M
    s2            base-2 scores (s * log2(e)), so the softmax uses exp2; lse leaves in natural log
    m_i, l_i      running row max of s2 and row sum of exp2(s2 - m_i); acc the running P @ V

Steps of :meth:`TileScore.scores`: 1. ``alpha * q @ k^T`` (alpha = scale * log2(e), or
scale / softcap for the tanh) 2. softcap 3. ALiBi 4. float mask added / bool mask kept
5. causal / window kept. Keep tests become an additive 0 / -inf bias (vectorized; torch's
bool kernels cost ~25x a broadcast add).

[Note] hidden keys
    A key a row does not keep (causal, window, bool mask) is never read by that row: a
    non-finite k_j or v_j reaches exactly the rows that keep j (see ``tileattn.reference``).
    An additive -inf bias does not hide a NaN score (NaN + -inf = NaN), and 0 * NaN = NaN in
    P @ V, dP = dO @ V^T and dS @ K. So when a slab's k or v holds a non-finite value the tile
    runs *exact*: hidden scores are replaced (not added) by -inf, hidden probabilities and dS
    are set to 0, and non-finite keys/values enter the matmuls only for the rows that keep
    them (:func:`qk_kept`, :func:`accumulate_kept`). Finite inputs never take that path (same bits as before).
    A float mask of -inf is a score term, not a keep test: it hides nothing (as the oracle).
"""

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from tileattn import _philox
from tileattn.score import LN2, LOG2E  # noqa: F401  (LN2: imported from here by the CPU passes)

EXP2_SAFE = 64.0  # |s2| <= EXP2_SAFE everywhere: the forward may skip the running max
NEG_INF = -math.inf
F32_MIN = torch.finfo(torch.float32).min


class Workspace:
    """Named fp32 tile buffers reused across tiles: a fresh multi-MiB tensor per tile costs
    page faults that, on 2 threads, cut the matmul speed by 3x. A tensor returned for a name
    is only valid until the next request of that name."""

    def __init__(self):
        self._flat = {}

    def __call__(self, name, *shape):
        n = math.prod(shape)
        flat = self._flat.get(name)
        if flat is None or flat.numel() < n:
            flat = self._flat[name] = torch.empty(n, dtype=torch.float32)
        return flat[:n].view(shape)


@dataclass
class TileScore:
    """The score pipeline of one dense problem (a batch, or one varlen / decode sequence).

    ``alibi`` None or fp32 (B, Hq); ``attn_mask`` None or bool / float (B, Hq, Sq, Sk)
    (stride-0 broadcast dims allowed); ``b0`` the dropout batch id of batch row 0 (the
    sequence index for varlen); ``exact`` set per slab by the callers ([Note] hidden keys).
    Build it from a call's :class:`~tileattn.score.ScoreSpec` with :meth:`from_spec`.
    """

    batch: int
    sq: int
    sk: int
    hkv: int
    g: int
    scale: float
    window: tuple
    softcap: float
    alibi: Optional[torch.Tensor]
    attn_mask: Optional[torch.Tensor]
    dropout_p: float
    seed: int
    b0: int = 0
    buffer: Workspace = field(default_factory=Workspace)
    exact: bool = False

    @classmethod
    def from_spec(cls, spec, batch, sq, sk, hkv, g, *, alibi, attn_mask, b0=0, buffer=None, dropout=True):
        """The spec's scalar fields; ``alibi`` / ``attn_mask`` this problem's slices of the
        spec's (B, Hq) / (B, Hq, Sq, Sk) views; ``dropout=False`` for decode (no dropout)."""
        return cls(batch, sq, sk, hkv, g, scale=spec.scale, window=tuple(spec.window), softcap=spec.softcap,
                   alibi=alibi, attn_mask=attn_mask, dropout_p=spec.dropout_p if dropout else 0.0,
                   seed=spec.seed if dropout else 0, b0=b0, buffer=buffer or Workspace())

    def __post_init__(self):
        self.off = self.sk - self.sq
        # alpha of q @ k^T: base-2 scores directly, or s / softcap for the tanh
        self.alpha = self.scale / self.softcap if self.softcap > 0 else self.scale * LOG2E
        self._bias_cache = {}  # window biases by tile geometry (see _window_bias)

    def score_bound(self, q, kmax):
        """Upper bound on |s2| over all tiles of q tile (Bc*Hc, R, D) fp32, given kmax = max_j |k_j|.

        Cauchy-Schwarz (|q . k| <= |q| |k|, so |alpha| for a negative scale), or c * log2(e)
        with softcap; inf when ALiBi or a float mask make the scores unbounded (or the inputs
        are not finite). Masked (-inf) scores need no bound.
        """
        if self.alibi is not None or (self.attn_mask is not None and self.attn_mask.dtype != torch.bool):
            return math.inf
        if self.softcap > 0:
            return self.softcap * LOG2E
        bound = abs(self.alpha) * float(torch.linalg.vector_norm(q, dim=-1).max()) * kmax
        return bound if math.isfinite(bound) else math.inf

    # ------------------------------------------------------------------ the pipeline

    def scores(self, q, k, bs, hs, i0, i1, j0, j1, keep_x=False):
        """Base-2 scores of one tile, every API.md step before the softmax applied.

        q (Bc*Hc, R, D) fp32, k (Bc*Hc, N, D) fp32 -> (s2 (Bc*Hc, R, N) fp32 with dropped
        positions at -inf, x) where x = s / softcap, the tanh argument (a separate tensor, for
        the backward's softcap derivative), when ``keep_x`` and softcap > 0, else None.
        In ``exact`` mode hidden positions are replaced by -inf ([Note] hidden keys).
        """
        s = self.buffer("s", q.shape[0], q.shape[1], k.shape[1])
        if self.exact:
            qk_kept(q, k, self.hidden(bs, hs, i0, i1, j0, j1), out=s, alpha=self.alpha)
        elif self.softcap <= 0 and self.alibi is None and self.attn_mask is None:
            # only the causal / window step: its bias rides in the matmul (beta = 1), no extra pass
            bias = self._window_bias(i0, i1, j0, j1)
            if bias is None:
                torch.baddbmm(s, q, k.transpose(1, 2), beta=0.0, alpha=self.alpha, out=s)
            else:
                torch.baddbmm(bias, q, k.transpose(1, 2), beta=1.0, alpha=self.alpha, out=s)
            return s, None
        else:
            torch.baddbmm(s, q, k.transpose(1, 2), beta=0.0, alpha=self.alpha, out=s)
        x = None
        if self.softcap > 0:  # 2. s = c * tanh(s / c), in base 2
            if keep_x:
                x, s = s, torch.tanh(s, out=self.buffer("tanh", *s.shape))
            else:
                s.tanh_()
            s.mul_(self.softcap * LOG2E)
        s5 = s.view(bs.stop - bs.start, hs.stop - hs.start, self.g, i1 - i0, j1 - j0)
        if self.alibi is not None:  # 3. s -= slope * |i + off - j|
            slopes = self.alibi[bs, hs.start * self.g:hs.stop * self.g].to(torch.float32)
            slopes = slopes.reshape(*s5.shape[:3], 1, 1) * -LOG2E
            s5.addcmul_(slopes, self._diff(i0, i1, j0, j1).abs_())
        mask = self._mask(bs, hs, i0, i1, j0, j1)
        if mask is not None and mask.dtype != torch.bool:  # 4. float mask: a score term
            s5.add_(mask, alpha=LOG2E)
        if self.exact:  # 4./5. keep tests replace the score ([Note] hidden keys)
            hidden = self.hidden(bs, hs, i0, i1, j0, j1)
            if hidden is not None:
                s.masked_fill_(hidden, NEG_INF)
            return s, x
        if mask is not None and mask.dtype == torch.bool:  # 4. bool keep
            s5.add_(keep_bias(mask.view(torch.uint8).to(torch.float32)))
        keep = self._window_keep(i0, i1, j0, j1)  # 5. causal / window
        if keep is not None:
            s5.add_(keep_bias(keep))
        return s, x

    def hidden(self, bs, hs, i0, i1, j0, j1):
        """bool (Bc*Hc, R, N) (broadcast where it can) True where the keep tests (bool mask,
        causal / window) drop (i, j), or None when every pair of the tile is kept."""
        mask = self._mask(bs, hs, i0, i1, j0, j1)
        keep = self._window_keep(i0, i1, j0, j1)
        if (mask is None or mask.dtype != torch.bool) and keep is None:
            return None
        shape = (bs.stop - bs.start, hs.stop - hs.start, self.g, i1 - i0, j1 - j0)
        drop = torch.zeros((), dtype=torch.bool)
        if mask is not None and mask.dtype == torch.bool:
            drop = drop | ~mask
        if keep is not None:
            drop = drop | (keep == 0)
        return drop.expand(shape).reshape(-1, shape[2] * shape[3], shape[4])

    def dropout_keep(self, bs, hs, i0, i1, j0, j1):
        """fp32 (Bc*Hc, R, N) 1 = keep / 0 = drop mask of ``_philox``'s stream for this tile, or None."""
        if self.dropout_p <= 0:
            return None
        b = torch.arange(self.b0 + bs.start, self.b0 + bs.stop).view(-1, 1, 1, 1, 1)
        h = torch.arange(hs.start * self.g, hs.stop * self.g).view(1, -1, self.g, 1, 1)
        i = torch.arange(i0, i1).view(-1, 1)
        j = torch.arange(j0, j1).view(1, -1)
        keep = _philox.uniform(self.seed, b, h, i, j) >= torch.tensor(self.dropout_p, dtype=torch.float32)
        return keep.view(torch.uint8).to(torch.float32).view(-1, self.g * (i1 - i0), j1 - j0)

    def _mask(self, bs, hs, i0, i1, j0, j1):
        """The attn_mask of a tile as (Bc, Hc, G, M, N) (stride-0 dims narrowed), or None."""
        if self.attn_mask is None:
            return None
        mask = self.attn_mask[bs, hs.start * self.g:hs.stop * self.g, i0:i1, j0:j1]
        return _unexpand(mask.unflatten(1, (hs.stop - hs.start, self.g)))

    def _diff(self, i0, i1, j0, j1):
        """fp32 (M, N) j - (i + off) of a tile (exact below 2^24)."""
        cols = torch.arange(j0, j1, dtype=torch.float32)
        return cols - torch.arange(i0 + self.off, i1 + self.off, dtype=torch.float32).unsqueeze(-1)

    def _cuts(self, i0, i1, j0, j1):
        """(cut_left, cut_right): whether the window's left / right edge crosses the tile."""
        left, right = self.window
        return (left >= 0 and j0 < i1 - 1 + self.off - left,
                right >= 0 and j1 - 1 > i0 + self.off + right)

    def _window_bias(self, i0, i1, j0, j1):
        """fp32 (G*M, N) additive window bias (0 keep, -inf drop) of a tile, or None when every
        (i, j) is inside the band. Cached by the tile's geometry: the diagonal tiles of a causal
        problem mostly share one."""
        if not any(self._cuts(i0, i1, j0, j1)):
            return None
        key = (i0 + self.off - j0, i1 - i0, j1 - j0)
        cache = self._bias_cache
        bias = cache.get(key)
        if bias is None:
            bias = keep_bias(self._window_keep(i0, i1, j0, j1))
            if self.g > 1:
                bias = bias.unsqueeze(0).expand(self.g, -1, -1).reshape(-1, j1 - j0)
            if len(cache) >= 8:
                cache.clear()
            cache[key] = bias
        return bias

    def _window_keep(self, i0, i1, j0, j1):
        """fp32 (M, N) window keep-mask (1 keep, 0 drop) of a tile, or None when every (i, j)
        is inside the band (then no masking arithmetic runs at all)."""
        left, right = self.window
        cut_left, cut_right = self._cuts(i0, i1, j0, j1)
        if not (cut_left or cut_right):
            return None
        diff = self._diff(i0, i1, j0, j1)
        keep = (right + 1 - diff).clamp_(0.0, 1.0) if cut_right else torch.ones_like(diff)
        if cut_left:  # keep j - (i + off) >= -left, i.e. diff + left + 1 >= 1
            keep.mul_((diff + (left + 1)).clamp_(0.0, 1.0))
        return keep


def keep_bias(keep):
    """fp32 keep-mask (1 keep, 0 drop) -> additive bias, 0 where kept and -inf where dropped.

    Computed as 1 - 1/keep (1/0 = inf) in place: torch's bool kernels (masked_fill, where,
    bool casts; a bool mask arrives here through its uint8 view) are not vectorized and cost
    ~25x a broadcast add over a score tile.
    """
    return keep.reciprocal_().neg_().add_(1.0)


def _unexpand(x):
    """View of x with every stride-0 (broadcast) dim narrowed to size 1 (still broadcastable)."""
    for d in range(x.dim()):
        if x.stride(d) == 0 and x.shape[d] > 1:
            x = x.narrow(d, 0, 1)
    return x


def all_finite(*tensors) -> bool:
    """Whether every element of the tensors is finite (decides the exact path per slab)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def qk_kept(q, k, hidden, *, out, alpha):
    """``alpha * q @ k^T`` into ``out`` (q (N, R, D), k (N, Nk, D)), where a key j whose k_j
    holds a non-finite value is scored only for the rows that keep it (hidden pairs get 0;
    the caller sets them to -inf). [Note] hidden keys."""
    bad = ~torch.isfinite(k).all(2)  # (N, Nk)
    keys = bad.any(0).nonzero().flatten() if hidden is not None else bad.new_zeros(0, dtype=torch.long)
    if keys.numel() == 0:
        return torch.baddbmm(out, q, k.transpose(1, 2), beta=0.0, alpha=alpha, out=out)
    torch.baddbmm(out, q, k.masked_fill(bad[:, :, None], 0.0).transpose(1, 2), beta=0.0, alpha=alpha, out=out)
    # pair by pair: (n, j) whose k_j is non-finite (the matmul above scored 0 there), kept rows only
    keep = ~hidden.expand(out.shape)[:, :, keys] & bad[:, None, keys]  # (N, R, J)
    part = torch.where(keep[..., None], k[:, None, keys], 0.0)  # (N, R, J, D): hidden pairs read nothing
    out[:, :, keys] += (q[:, :, None] * part).sum(-1) * alpha
    return out


def accumulate_kept(acc, p, v, hidden, alpha=1.0):
    """``acc += alpha * p @ v`` with p (N, R, Nk), v (N, Nk, C) over keys: a key j whose v_j
    holds a non-finite value contributes only to the rows that keep it ([Note] hidden keys);
    with ``hidden`` None (or a finite v) a plain ``baddbmm``."""
    bad = ~torch.isfinite(v).all(2) if v.shape[2] else torch.zeros(v.shape[0], v.shape[1], dtype=torch.bool)
    keys = bad.any(0).nonzero().flatten() if hidden is not None else bad.new_zeros(0, dtype=torch.long)
    if keys.numel() == 0:
        return acc.baddbmm_(p, v, alpha=alpha)
    acc.baddbmm_(p, v.masked_fill(bad[:, :, None], 0.0), alpha=alpha)
    # pair by pair: (n, j) whose v_j is non-finite (the plain matmul above had 0 there), kept rows only
    keep = ~hidden.expand(p.shape)[:, :, keys] & bad[:, None, keys]  # (N, R, J)
    terms = torch.where(keep[..., None], p[:, :, keys, None] * v[:, None, keys], 0.0)  # (N, R, J, C)
    return acc.add_(terms.sum(2), alpha=alpha)


# ---------------------------------------------------------------------- online softmax


def softmax_step(m_i, l_i, acc, s, fixed=False):
    """Fold one tile of base-2 scores s (N, R, Nk) into the running (m_i, l_i) (N, R) and
    rescale acc (N, R, Dv); s becomes exp2(s - m_i) in place (the caller adds it @ v).
    Returns the new m_i. ``fixed``: m_i stays 0 ([Note] fixed reference max in forward.py).

    [Note] fully masked rows: a row that has kept no key so far has m_i = -inf; the exponent
    is taken against the lowest finite float instead so no ``-inf - -inf`` NaN appears and
    l_i, acc stay 0.
    """
    if fixed:
        l_i.add_(s.exp2_().sum(-1))
        return m_i
    m_new = torch.maximum(m_i, s.amax(-1))
    m_use = m_new.clamp(min=F32_MIN)
    s.sub_(m_use.unsqueeze(-1)).exp2_()
    rescale = torch.exp2(m_i - m_use)
    l_i.mul_(rescale).add_(s.sum(-1))
    acc.mul_(rescale.unsqueeze(-1))
    return m_new


def fold_sink(m_i, l_i, acc, sink2):
    """The sink: one more base-2 logit (N, R) in the denominator, with no value. Returns m_i."""
    m_fin = torch.maximum(m_i, sink2).clamp_(min=F32_MIN)
    rescale = torch.exp2(m_i - m_fin)
    l_i.mul_(rescale).add_(torch.exp2(sink2 - m_fin))
    acc.mul_(rescale.unsqueeze(-1))
    return m_fin


def finish(m_i, l_i, acc, dropout_p=0.0):
    """(out = acc / l_i / (1 - p), base-2 lse = m_i + log2 l_i); a row with l_i = 0 (nothing
    kept, no sink) gets out 0 and lse -inf. acc is divided in place."""
    empty = l_i == 0
    out = acc.div_(l_i.masked_fill(empty, 1.0).unsqueeze(-1))
    if dropout_p > 0:
        out.mul_(1.0 / (1.0 - dropout_p))
    return out, (m_i + torch.log2(l_i)).masked_fill_(empty, NEG_INF)


def sink_rows(sinks, bs, hs, g, m):
    """fp32 (Hq,) sink logits -> base-2 (Bc*Hc, G*M) per-row sink logits of a slab tile."""
    s2 = sinks[hs.start * g:hs.stop * g].to(torch.float32).view(1, -1, g, 1) * LOG2E
    return s2.expand(bs.stop - bs.start, -1, -1, m).reshape(-1, g * m)


def sink_probability(sink2, lse2):
    """exp2(sink - lse) per row, base 2: the sink's share of the softmax (its gradient weight);
    0 where lse = -inf (then the sink is -inf too: a head that opts out), never NaN."""
    return torch.exp2(sink2 - lse2).masked_fill_(lse2 == NEG_INF, 0.0)
