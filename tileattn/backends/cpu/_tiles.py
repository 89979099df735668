"""The score pipeline on one tile, shared by the CPU forward and backward.

Sub notation (the Triton kernels use the same names):

    B, Sq, Sk     batch (1 for one varlen sequence), query and key lengths; off = Sk - Sq
    Hq, Hkv, G    query heads, kv heads, G = Hq // Hkv (query head h = kvh * G + g reads kv head
                  kvh). The G query heads of one kv head are packed as rows of one matrix, so
                  k/v are never repeated: a q tile is (Bc * Hc, G * BLOCK_M, D).
    slab          a rectangle (batch slice ``bs``, kv-head slice ``hs``) of Bc x Hc (batch,
                  kv head) pairs, processed by batched matmuls; its k/v are copied once to fp32
                  (Bc*Hc, Sk, D[v]) (``slab_kv``), so memory is O(slab * Sk), never O(B*H*Sk).
    tile          rows i0..i1 of the G heads x keys j0..j1 of one slab: scores (Bc*Hc, R, N),
                  R = G * (i1 - i0). At most ``TILE_ELEMS`` scores exist at a time (dropout: 1/8).

Every input is copied into these fp32 layouts before any arithmetic, so results never depend
on the caller's strides (non-contiguous inputs are bitwise equal to contiguous ones).

Numerics: scores are fp32 whatever the input dtype and in base 2 (``s2 = s * log2(e)``, so
the softmax uses ``exp2``); lse is converted back to natural log by the callers. The log2(e)
factor is folded into the matmul's alpha, the ALiBi slopes and the float-mask add.
"""

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from tileattn import _philox

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
BLOCK_ROWS = 256  # query rows per tile over the G packed heads (BLOCK_M = BLOCK_ROWS // G)
BLOCK_N = 512  # keys per tile
TILE_ELEMS = 0  # scores per tile over a slab; 0 = 2^18 (1 MiB fp32, L2-sized) per torch thread
EXP2_SAFE = 64.0  # |s2| <= EXP2_SAFE everywhere: the forward may skip the running max
NEG_INF = -math.inf


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
class Tiles:
    """One dense problem (a batch, or one varlen sequence) and its tiling.

    ``alibi`` None or fp32 (B, Hq); ``sinks`` None or fp32 (Hq,); ``attn_mask`` None or bool /
    float (B, Hq, Sq, Sk) (stride-0 broadcast dims allowed); ``b0`` is the dropout batch id of
    batch row 0 (the sequence index for varlen); ``buffer`` may be shared by the sequences of
    one varlen call.
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

    def __post_init__(self):
        self.off = self.sk - self.sq
        self.block_m = max(1, BLOCK_ROWS // self.g)
        # alpha of q @ k^T: base-2 scores directly, or s / softcap for the tanh
        self.alpha = self.scale / self.softcap if self.softcap > 0 else self.scale * LOG2E
        self._bias_cache = {}  # window biases by tile geometry (see _window_bias)

    # ------------------------------------------------------------------ iteration

    def slabs(self):
        """(bs, hs) slices of batch rows and kv heads whose tiles fit in TILE_ELEMS: whole
        batch rows when the kv heads of one fit, else kv-head chunks of one batch row."""
        budget = (TILE_ELEMS or (1 << 18) * torch.get_num_threads()) // (8 if self.dropout_p > 0 else 1)
        per = max(1, budget // (self.g * self.block_m * BLOCK_N))  # (batch, kv head) pairs per slab
        if per >= self.hkv:
            nb = per // self.hkv
            for b in range(0, self.batch, nb):
                yield slice(b, min(b + nb, self.batch)), slice(0, self.hkv)
        else:
            for b in range(self.batch):
                for h in range(0, self.hkv, per):
                    yield slice(b, b + 1), slice(h, min(h + per, self.hkv))

    def q_blocks(self):
        """(i0, i1) query-row blocks of BLOCK_M rows."""
        for i0 in range(0, self.sq, self.block_m):
            yield i0, min(i0 + self.block_m, self.sq)

    def k_blocks(self, i0, i1):
        """(j0, j1) key blocks of at most BLOCK_N keys that some row i0..i1-1 can keep.

        Row i keeps j iff (left < 0 or j >= i + off - left) and (right < 0 or j <= i + off + right);
        key blocks entirely outside that band for every row are never visited. Blocks are cut
        from ``hi`` down, so only the last block straddles a causal diagonal (cut from ``lo`` up,
        a 512-key block could hold mostly masked keys); the online softmax is order-free.
        """
        left, right = self.window
        lo = 0 if left < 0 else max(0, i0 + self.off - left)
        hi = self.sk if right < 0 else min(self.sk, i1 - 1 + self.off + right + 1)
        for j1 in range(hi, lo, -BLOCK_N):
            yield max(lo, j1 - BLOCK_N), j1

    def score_bound(self, q, kmax):
        """Upper bound on |s2| over all tiles of q tile (Bc*Hc, R, D) fp32, given kmax = max_j |k_j|.

        Cauchy-Schwarz (|q . k| <= |q| |k|), or c * log2(e) with softcap; inf when ALiBi or a
        float mask make the scores unbounded. Masked (-inf) scores need no bound.
        """
        if self.alibi is not None or (self.attn_mask is not None and self.attn_mask.dtype != torch.bool):
            return math.inf
        if self.softcap > 0:
            return self.softcap * LOG2E
        return self.alpha * float(torch.linalg.vector_norm(q, dim=-1).max()) * kmax

    # ------------------------------------------------------------------ the pipeline

    def scores(self, q, k, bs, hs, i0, i1, j0, j1, keep_x=False):
        """Base-2 scores of one tile, every API.md step before the softmax applied.

        q (Bc*Hc, R, D) fp32, k (Bc*Hc, N, D) fp32 -> (s2 (Bc*Hc, R, N) fp32 with dropped
        positions at -inf, x) where x = s / softcap, the tanh argument (a separate tensor, for
        the backward's softcap derivative), when ``keep_x`` and softcap > 0, else None.
        """
        s = self.buffer("s", q.shape[0], q.shape[1], k.shape[1])
        if self.softcap <= 0 and self.alibi is None and self.attn_mask is None:
            # only the causal / window step: its bias rides in the matmul (beta = 1), no extra pass
            bias = self._window_bias(i0, i1, j0, j1)
            if bias is None:
                torch.baddbmm(s, q, k.transpose(1, 2), beta=0.0, alpha=self.alpha, out=s)
            else:
                torch.baddbmm(bias, q, k.transpose(1, 2), beta=1.0, alpha=self.alpha, out=s)
            return s, None
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
        if self.attn_mask is not None:  # 4. bool keep / float add
            mask = self.attn_mask[bs, hs.start * self.g:hs.stop * self.g, i0:i1, j0:j1]
            mask = _unexpand(mask.unflatten(1, (hs.stop - hs.start, self.g)))
            if mask.dtype == torch.bool:
                s5.add_(keep_bias(mask.view(torch.uint8).to(torch.float32)))
            else:
                s5.add_(mask, alpha=LOG2E)
        keep = self._window_keep(i0, i1, j0, j1)  # 5. causal / window
        if keep is not None:
            s5.add_(keep_bias(keep))
        return s, x

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


# ---------------------------------------------------------------------- layout moves


def slab_kv(x, bs, hs, buf=None):
    """Native (B, Sk, Hkv, D) any strides / float dtype -> fp32 contiguous (Bc*Hc, Sk, D) copy
    (into ``buf``, a reused buffer of that shape, when given)."""
    part = x[bs, :, hs].permute(0, 2, 1, 3)
    out = torch.empty(part.shape, dtype=torch.float32) if buf is None else buf.view(part.shape)
    return out.copy_(part).flatten(0, 1)


def scatter_kv(dst, tile, bs, hs):
    """Write fp32 (Bc*Hc, Sk, D) into the slab of native dst (B, Sk, Hkv, D)."""
    part = dst[bs, :, hs]
    part.copy_(tile.view(part.shape[0], part.shape[2], part.shape[1], part.shape[3]).transpose(1, 2))


def gather_rows(x, bs, hs, g, i0, i1, buf=None):
    """Native (B, S, Hq, D) rows i0..i1 of the slab -> (Bc*Hc, G*M, D) fp32 contiguous copy
    (into ``buf``, a reused buffer of that shape, when given)."""
    part = x[bs, i0:i1, hs.start * g:hs.stop * g]
    part = part.unflatten(2, (hs.stop - hs.start, g)).permute(0, 2, 3, 1, 4)  # (Bc, Hc, G, M, D)
    out = torch.empty(part.shape, dtype=torch.float32) if buf is None else buf.view(part.shape)
    return out.copy_(part).view(-1, g * (i1 - i0), x.shape[-1])


def scatter_rows(dst, tile, bs, hs, g, i0, i1):
    """Write a (Bc*Hc, G*M, Dv) tile into rows i0..i1 of the slab of native dst (B, S, Hq, Dv)."""
    part = dst[bs, i0:i1, hs.start * g:hs.stop * g].unflatten(2, (hs.stop - hs.start, g))
    part.copy_(tile.view(part.shape[0], part.shape[2], g, i1 - i0, -1).permute(0, 3, 1, 2, 4))


def lse_rows(lse, bs, hs, g, i0, i1):
    """(B, Hq, Sq) fp32 -> (Bc*Hc, G*M) rows i0..i1 of the slab (a view or a copy: read only)."""
    return lse[bs, hs.start * g:hs.stop * g, i0:i1].to(torch.float32).reshape(-1, g * (i1 - i0))


def sink_rows(sinks, bs, hs, g, m):
    """fp32 (Hq,) sink logits -> base-2 (Bc*Hc, G*M) per-row sink logits of a slab tile."""
    s2 = sinks[hs.start * g:hs.stop * g].to(torch.float32).view(1, -1, g, 1) * LOG2E
    return s2.expand(bs.stop - bs.start, -1, -1, m).reshape(-1, g * m)
