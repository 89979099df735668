"""KV-cache helpers: allocate contiguous or paged caches, append tokens, gather pages back.

Layouts (API.md; ``tileattn.attention_with_kvcache`` takes either):

    contiguous  k (B, Smax, Hkv, D), v (B, Smax, Hkv, Dv), block_table None
    paged       k (num_blocks, block_size, Hkv, D), v (num_blocks, block_size, Hkv, Dv),
                block_table int32 (B, max_blocks): token t of sequence b lives in page
                ``block_table[b, t // block_size]`` at slot ``t % block_size``

``cache_seqlens`` int32 (B,) counts the tokens already in each sequence. Appending writes
at ``cache_seqlens[b] .. + Sn``, exactly as ``attention_with_kvcache`` does with its k/v;
the caller then advances ``cache_seqlens`` (``KVCache.append`` does both).

Example::

    import torch, tileattn
    from tileattn import kvcache

    cache = kvcache.allocate(2, 64, 2, 16, dtype=torch.float32, block_size=16, num_blocks=10,
                             shuffle=True, generator=torch.Generator().manual_seed(0))
    k, v = torch.randn(2, 3, 2, 16), torch.randn(2, 3, 2, 16)
    cache.append(k, v)                       # positions 0..2; cache.seqlens -> [3, 3]
    k_dense, v_dense = cache.gather()        # contiguous copies (2, 64, 2, 16), zero past seqlens
    assert torch.equal(k_dense[:, :3], k)
    q, k1, v1 = torch.randn(2, 1, 4, 16), torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    out = tileattn.attention_with_kvcache(q, cache.k, cache.v, k1, v1, cache_seqlens=cache.seqlens,
                                          block_table=cache.block_table)   # (2, 1, 4, 16)
    cache.seqlens += 1                       # the attention call appended one token
"""

from dataclasses import dataclass
from typing import Optional

import torch

from tileattn import _checks, paged


@dataclass
class KVCache:
    """A contiguous (``block_table`` None) or paged KV cache and its per-sequence lengths.

    k (B, Smax, Hkv, D) or (num_blocks, block_size, Hkv, D); v likewise with Dv;
    block_table int32 (B, max_blocks) or None; seqlens int32 (B,) tokens stored per sequence.
    """

    k: torch.Tensor
    v: torch.Tensor
    block_table: Optional[torch.Tensor]
    seqlens: torch.Tensor

    @property
    def paged(self) -> bool:
        return self.block_table is not None

    @property
    def capacity(self) -> int:
        """Tokens each sequence can hold: Smax, or max_blocks * block_size when paged."""
        return paged.capacity(self.k, self.block_table)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k (B, Sn, Hkv, D), v (B, Sn, Hkv, Dv) after each sequence's tokens; advance seqlens."""
        append(self.k, self.v, k, v, self.seqlens, self.block_table)
        self.seqlens += k.shape[1]

    def gather(self) -> tuple:
        """Contiguous copies (k, v), each (B, capacity, Hkv, D[v]), zero past ``seqlens``."""
        return gather(self.k, self.block_table, self.seqlens), gather(self.v, self.block_table, self.seqlens)


def allocate(batch: int, max_seqlen: int, num_kv_heads: int, head_dim: int, *, head_dim_v=None,
             dtype=torch.bfloat16, device=None, block_size=None, num_blocks=None, shuffle=False,
             generator=None) -> KVCache:
    """An empty (zero-filled) cache for ``batch`` sequences of up to ``max_seqlen`` tokens.

    ``block_size`` None gives a contiguous cache (B, max_seqlen, Hkv, D). Otherwise a paged
    cache of ``num_blocks`` pages (default: exactly B * ceil(max_seqlen / block_size)); each
    sequence owns ceil(max_seqlen / block_size) pages, taken in order, or in a random order
    (``shuffle=True``, drawn from the CPU ``generator``). Pages beyond those owned are spare.
    ``head_dim_v`` defaults to ``head_dim``; seqlens start at 0.
    """
    for name, n in (("batch", batch), ("max_seqlen", max_seqlen), ("num_kv_heads", num_kv_heads),
                    ("head_dim", head_dim), ("head_dim_v", head_dim_v or head_dim)):
        _positive(name, n)
    dv = head_dim_v or head_dim
    seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
    if block_size is None:
        if num_blocks is not None:
            raise ValueError(f"tileattn: num_blocks={num_blocks} needs block_size (a paged cache); got block_size=None")
        shape = (batch, max_seqlen, num_kv_heads)
        return KVCache(torch.zeros(*shape, head_dim, dtype=dtype, device=device),
                       torch.zeros(*shape, dv, dtype=dtype, device=device), None, seqlens)
    _positive("block_size", block_size)
    max_blocks = paged.num_pages(max_seqlen, block_size)
    num_blocks = _num_blocks(num_blocks, batch * max_blocks)
    shape = (num_blocks, block_size, num_kv_heads)
    table = _block_table(batch, max_blocks, num_blocks, shuffle, generator).to(device)
    return KVCache(torch.zeros(*shape, head_dim, dtype=dtype, device=device),
                   torch.zeros(*shape, dv, dtype=dtype, device=device), table, seqlens)


def append(k_cache, v_cache, k, v, cache_seqlens, block_table=None) -> None:
    """Write k (B, Sn, Hkv, D), v (B, Sn, Hkv, Dv) in place at positions cache_seqlens[b] .. +Sn.

    Same writes as ``attention_with_kvcache(q, k_cache, v_cache, k, v, ...)``; does not advance
    ``cache_seqlens`` (int32 (B,) or a Python int). Validates first, so a bad call writes nothing;
    capacity and page-id checks read device memory, so they run on CPU or with TILEATTN_DEBUG=1.
    """
    cache_seqlens, block_table = _checks.kvcache(k_cache, v_cache, k, v, cache_seqlens, block_table)
    pos = paged.append_positions(cache_seqlens, k.shape[1])
    paged.scatter_(k_cache, block_table, pos, k)
    paged.scatter_(v_cache, block_table, pos, v)


def gather(cache, block_table=None, seqlens=None) -> torch.Tensor:
    """Contiguous copy (B, max_blocks * block_size, Hkv, D) of a paged ``cache``
    (num_blocks, block_size, Hkv, D) through ``block_table`` int32 (B, max_blocks); a
    contiguous cache (``block_table`` None) is copied as is. Positions at or past
    ``seqlens[b]`` (int32 (B,), default: all kept) are zero, and their pages are not read.
    """
    if not isinstance(cache, torch.Tensor) or cache.dim() != 4:
        raise ValueError(f"tileattn: cache must be a 4-d tensor, got {_shape(cache)}")
    if block_table is not None:
        block_table = _checks.block_table(block_table, cache)
    batch = block_table.shape[0] if block_table is not None else cache.shape[0]
    if seqlens is not None:
        seqlens = _seqlens(seqlens, batch, cache.device).long()
    if block_table is None:
        dense = cache.clone()
    else:
        pos = torch.arange(paged.capacity(cache, block_table), device=cache.device).expand(batch, -1)
        page, slot = paged.locate(block_table, pos, cache.shape[1])
        if seqlens is not None:  # entries past seqlens may hold anything: read page 0 instead
            page = page.masked_fill(pos >= seqlens[:, None], 0)
        dense = cache[page, slot]
    if seqlens is not None:
        pos = torch.arange(dense.shape[1], device=cache.device)
        dense[pos >= seqlens[:, None]] = 0
    return dense


def paged_from_contiguous(k, v, block_size, *, num_blocks=None, shuffle=False, generator=None) -> tuple:
    """Copy contiguous caches k (B, Smax, Hkv, D), v (B, Smax, Hkv, Dv) into pages.

    Returns ``(k_pages, v_pages, block_table)``: pages (num_blocks, block_size, Hkv, D[v]) and
    int32 (B, ceil(Smax / block_size)). Every position 0..Smax-1 is copied (so the paged cache
    has the same capacity); slots past Smax in a sequence's last page and spare pages
    (``num_blocks`` above B * max_blocks) are zero. ``shuffle`` assigns pages in random order.
    """
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"tileattn: {name} must be a 4-d tensor (B, Smax, Hkv, D), got {_shape(t)}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"tileattn: v has shape {tuple(v.shape)}, which does not match k's (B, Smax, Hkv) {tuple(k.shape[:3])}")
    _positive("block_size", block_size)
    batch, smax = k.shape[:2]
    max_blocks = paged.num_pages(smax, block_size)
    num_blocks = _num_blocks(num_blocks, batch * max_blocks)
    table = _block_table(batch, max_blocks, num_blocks, shuffle, generator).to(k.device)
    pages = []
    for t in (k, v):
        padded = t.new_zeros(batch, max_blocks * block_size, *t.shape[2:])
        padded[:, :smax] = t
        out = t.new_zeros(num_blocks, block_size, *t.shape[2:])
        out[table.long().flatten()] = padded.reshape(batch * max_blocks, block_size, *t.shape[2:])
        pages.append(out)
    return pages[0], pages[1], table


# ----------------------------------------------------------------------------- validation


def _shape(t):
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _positive(name, n):
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"tileattn: {name} must be a positive int, got {n!r}")


def _num_blocks(num_blocks, needed):
    if num_blocks is None:
        return needed
    if not isinstance(num_blocks, int) or num_blocks < needed:
        raise ValueError(f"tileattn: num_blocks must be an int >= {needed} (batch * pages per sequence), got {num_blocks!r}")
    return num_blocks


def _block_table(batch, max_blocks, num_blocks, shuffle, generator):
    """int32 (B, max_blocks) on CPU: the first B * max_blocks of a (shuffled) page order."""
    order = torch.randperm(num_blocks, generator=generator) if shuffle else torch.arange(num_blocks)
    return order[:batch * max_blocks].reshape(batch, max_blocks).to(torch.int32)


def _seqlens(seqlens, batch, device):
    """A Python int or an int32 (B,) tensor -> int32 (B,) tensor on ``device``."""
    if isinstance(seqlens, int) and not isinstance(seqlens, bool):
        return torch.full((batch,), seqlens, dtype=torch.int32, device=device)
    if not isinstance(seqlens, torch.Tensor) or seqlens.dtype != torch.int32:
        raise TypeError(f"tileattn: cache_seqlens must be an int32 tensor or an int, got {getattr(seqlens, 'dtype', type(seqlens).__name__)}")
    if tuple(seqlens.shape) != (batch,):
        raise ValueError(f"tileattn: cache_seqlens must have shape ({batch},), got {tuple(seqlens.shape)}")
    if seqlens.device != device:
        raise TypeError(f"tileattn: cache_seqlens is on {seqlens.device} but the cache is on {device}")
    return seqlens
