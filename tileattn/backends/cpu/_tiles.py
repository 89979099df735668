"""Tiling of one dense problem for the CPU forward and backward (the score pipeline itself is
``score.py``).

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
"""

from dataclasses import dataclass

import torch

from .score import EXP2_SAFE, LN2, LOG2E, NEG_INF, TileScore, Workspace, sink_rows  # noqa: F401 (re-exported)

BLOCK_ROWS = 256  # query rows per tile over the G packed heads (BLOCK_M = BLOCK_ROWS // G)
BLOCK_N = 512  # keys per tile
TILE_ELEMS = 0  # scores per tile over a slab; 0 = 2^18 (1 MiB fp32, L2-sized) per torch thread


@dataclass
class Tiles(TileScore):
    """One dense problem (:class:`~.score.TileScore`) and its tiling: slabs, query blocks and
    the key blocks the window reaches. ``buffer`` may be shared by the sequences of one varlen
    call."""

    def __post_init__(self):
        super().__post_init__()
        self.block_m = max(1, BLOCK_ROWS // self.g)

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
