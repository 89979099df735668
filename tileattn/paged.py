"""Paged-KV addressing, written once: where position ``p`` of sequence ``b`` lives in a cache.

Two layouts (API.md), told apart by ``block_table``:

    contiguous  cache (B, Smax, Hkv, D), block_table None: position p of row b is cache[b, p]
    paged       cache (num_blocks, page_size, Hkv, D), block_table int32 (B, max_blocks):
                position p of row b is cache[block_table[b, p // page_size], p % page_size]

Host-side users of the rule go through here: the reference (``tileattn.reference``), the
CPU decode (``backends/cpu/decode.py``), the cache helpers (``tileattn.kvcache``), the
validation (``tileattn._checks.kvcache``) and tests/test_kvcache.py. Torch ops only, on the
cache's device, no host sync (:func:`pages_in_use`'s caller reads the result on purpose).
The Triton kernels apply the same rule on device (``backends/triton``).

Example::

    cache = torch.zeros(6, 4, 2, 8)                       # 6 pages of 4 slots
    table = torch.tensor([[5, 0], [2, 3]], dtype=torch.int32)
    page, slot = locate(table, torch.tensor([[0, 5]]).expand(2, 2), 4)
    # page [[5, 0], [2, 3]], slot [[0, 1], [0, 1]]
    capacity(cache, table)                                # 8 tokens per sequence
"""

from typing import Optional

import torch
from torch import Tensor


def num_pages(tokens: int, page_size: int) -> int:
    """Pages needed to hold ``tokens`` positions: ceil(tokens / page_size)."""
    return -(-tokens // page_size)


def capacity(cache: Tensor, block_table: Optional[Tensor]) -> int:
    """Tokens one sequence can hold: Smax of a contiguous cache, max_blocks * page_size paged."""
    return cache.shape[1] * (1 if block_table is None else block_table.shape[1])


def locate(block_table: Tensor, pos: Tensor, page_size: int) -> tuple:
    """(page ids, slots), int64, of positions ``pos`` (B, N) of every row of ``block_table``
    (B, max_blocks); ``pos`` must lie in [0, max_blocks * page_size)."""
    pos = pos.to(torch.long)
    return block_table.to(torch.long).gather(1, pos // page_size), pos % page_size


def index(cache: Tensor, block_table: Optional[Tensor], pos: Tensor) -> tuple:
    """Index tuple into ``cache`` of positions ``pos`` (B, N) of batch rows 0..B-1:
    ``cache[index(...)]`` is (B, N, Hkv, D)."""
    pos = pos.to(torch.long)
    if block_table is None:
        rows = torch.arange(pos.shape[0], device=pos.device)[:, None]
        return rows.expand_as(pos), pos
    return locate(block_table, pos, cache.shape[1])


def row_index(cache: Tensor, block_table: Optional[Tensor], b: int, pos: Tensor) -> tuple:
    """Index tuple into ``cache`` of positions ``pos`` (N,) of batch row ``b``: ``cache[...]``
    is (N, Hkv, D)."""
    pos = pos.to(device=cache.device, dtype=torch.long)
    if block_table is None:
        return b, pos
    page_size = cache.shape[1]
    return block_table[b].to(device=cache.device, dtype=torch.long)[pos // page_size], pos % page_size


def gather(cache: Tensor, block_table: Optional[Tensor], b: int, start: int, stop: int) -> Tensor:
    """Positions start..stop-1 of sequence ``b`` as a (stop - start, Hkv, D) tensor (a copy
    when paged, a view when contiguous)."""
    if block_table is None:
        return cache[b, start:stop]
    return cache[row_index(cache, block_table, b, torch.arange(start, stop, device=cache.device))]


def scatter_(cache: Tensor, block_table: Optional[Tensor], pos: Tensor, values: Tensor) -> None:
    """Write ``values`` (B, N, Hkv, D) in place at positions ``pos`` (B, N) of every row
    (cast to the cache's dtype); the write lands in ``cache`` itself, whatever its strides."""
    cache[index(cache, block_table, pos)] = values.to(cache.dtype)


def append_positions(cache_seqlens: Tensor, sn: int) -> Tensor:
    """Positions cache_seqlens[b] + (0 .. Sn-1) as int64 (B, Sn), where new tokens go."""
    return cache_seqlens.to(torch.long)[:, None] + torch.arange(sn, device=cache_seqlens.device)


def pages_in_use(block_table: Tensor, lengths: Tensor, page_size: int, start: Optional[Tensor] = None) -> Tensor:
    """Page ids (1-D, int64) that hold positions [start_b, lengths_b) of each row (start 0 by
    default): the entries a call reads or writes. Entries past them may hold anything."""
    lengths = lengths.to(torch.long)
    cols = torch.arange(block_table.shape[1], device=block_table.device)
    used = cols[None, :] < (lengths[:, None] + page_size - 1) // page_size
    if start is not None:
        used &= cols[None, :] >= start.to(torch.long)[:, None] // page_size
    return block_table.to(torch.long)[used]
