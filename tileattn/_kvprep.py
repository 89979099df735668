"""Host-side preparation of attention_with_kvcache's flash-attn decode features.

Rotary embedding, ``cache_batch_idx`` and ``cache_leftpad`` are rewritten into what every
backend already runs (the backend contract does not change; Triton runs them with no kernel
change):

- rotary: q and the new k are rotated here (fp32 math, stored in their dtype) at positions
  ``cache_seqlens[b] + i``; q at ``cache_seqlens[b]`` for all its rows when neither causal nor
  windowed (flash-attn's rule). The first ``2 * rotary_cos.shape[1]`` dims rotate, as pairs
  (d, d + r/2) or, ``interleaved``, (2d, 2d + 1).
- cache_batch_idx alone (contiguous cache (B_cache, Smax, ...)): the cache is read as B_cache
  pages of Smax slots and row b's one page is ``cache_batch_idx[b]``; nothing is copied.
- cache_leftpad (row b's keys start at slot leftpad[b]): the cache is read as pages of ONE
  slot (a view; its first two dims must merge) through a table that maps logical position c
  of row b to physical position ``leftpad[b] + c``, and ``cache_seqlens - leftpad`` keys. Causal
  and window edges and ALiBi distances are unchanged by the shift (they depend on
  ``cache_seqlens + i - j`` only); appends land at ``cache_seqlens[b]`` as before. The table is
  (B, capacity) int32 per call; a fused kernel would take leftpad as a per-row start instead.
"""

import torch

from . import _checks, paged


def prepare(q, k_cache, v_cache, k, cache_seqlens, block_table, rotary_cos, rotary_sin, interleaved, batch_idx,
            leftpad, positional):
    """Returns (q, k, k_cache, v_cache, cache_seqlens, block_table) for the plain call.
    ``positional``: causal or windowed (q rows rotate at successive positions)."""
    _checks.tensor("q", q, 4)
    _checks.tensor("k_cache", k_cache, 4)
    batch = q.shape[0]
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=k_cache.device)
    cache_seqlens = _checks.index_tensor("cache_seqlens", cache_seqlens, k_cache, 1, "k_cache")
    if rotary_cos is not None or rotary_sin is not None:
        q, k = _rotary(q, k, cache_seqlens, rotary_cos, rotary_sin, interleaved, positional)
    rows = None
    if batch_idx is not None:
        if block_table is not None:
            raise ValueError("tileattn: cache_batch_idx needs a contiguous cache; with a paged cache, "
                             "reorder block_table's rows instead")
        rows = _rows("cache_batch_idx", batch_idx, batch, k_cache, 0, k_cache.shape[0] - 1)
    if leftpad is None:
        return q, k, k_cache, v_cache, cache_seqlens, (block_table if rows is None else rows[:, None])
    if block_table is not None:
        block_table = _checks.block_table(block_table, k_cache, batch)
    leftpad = _rows("cache_leftpad", leftpad, batch, k_cache, 0, paged.capacity(k_cache, block_table))
    if _checks.debug_checks(leftpad) and bool((leftpad > cache_seqlens).any()):
        raise ValueError(f"tileattn: cache_leftpad must be <= cache_seqlens, got {leftpad.tolist()} and "
                         f"{cache_seqlens.tolist()}")
    end = cache_seqlens.long() + q.shape[1]  # one past the last key (with the appended ones)
    if _checks.debug_checks(leftpad) and bool((end > paged.capacity(k_cache, block_table)).any()):
        raise ValueError(f"tileattn: cache_seqlens + Sn = {end.tolist()} exceeds the cache capacity "
                         f"{paged.capacity(k_cache, block_table)}")
    table = _slot_table(k_cache, block_table, rows, leftpad)
    return q, k, _slots("k_cache", k_cache), _slots("v_cache", v_cache), cache_seqlens - leftpad, table


def _rows(name, t, batch, cache, lo, hi):
    """An int32 (B,) tensor with values in [lo, hi] (checked where debug_checks allows)."""
    t = _checks.index_tensor(name, t, cache, 1, "k_cache")
    if t.shape[0] != batch:
        raise ValueError(f"tileattn: {name} must have shape ({batch},), got {tuple(t.shape)}")
    if _checks.debug_checks(t) and batch and not lo <= int(t.min()) <= int(t.max()) <= hi:
        raise ValueError(f"tileattn: {name} must lie in [{lo}, {hi}], got {t.tolist()}")
    return t


def _rotary(q, k, cache_seqlens, cos, sin, interleaved, positional):
    if k is None:
        raise ValueError("tileattn: rotary_cos/rotary_sin rotate the new k, so k and v must be given")
    for name, t in (("rotary_cos", cos), ("rotary_sin", sin)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2:
            raise TypeError(f"tileattn: {name} must be a 2-d floating tensor (seqlen_ro, rotary_dim / 2), "
                            f"got {getattr(t, 'shape', type(t).__name__)}")
        if t.device != q.device:
            raise TypeError(f"tileattn: {name} is on {t.device} but q is on {q.device}")
    if cos.shape != sin.shape or not 0 < 2 * cos.shape[1] <= q.shape[-1]:
        raise ValueError(f"tileattn: rotary_cos {tuple(cos.shape)} and rotary_sin {tuple(sin.shape)} must share "
                         f"one shape (seqlen_ro, rotary_dim / 2) with 0 < rotary_dim <= head dim {q.shape[-1]}")
    sn = q.shape[1]
    pos = paged.append_positions(cache_seqlens, sn)  # (B, Sn) int64
    if _checks.debug_checks(pos) and pos.numel() and int(pos.max()) >= cos.shape[0]:
        raise ValueError(f"tileattn: rotary_cos has {cos.shape[0]} positions but position {int(pos.max())} "
                         f"(cache_seqlens + Sn - 1) is rotated")
    q_pos = pos if positional else pos[:, :1].expand(-1, sn)
    return _rotate(q, cos, sin, q_pos, interleaved), _rotate(k, cos, sin, pos, interleaved)


def _rotate(x, cos, sin, pos, interleaved):
    """x (B, Sn, H, D) with its first 2 * cos.shape[1] dims rotated at positions pos (B, Sn)."""
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


def _slots(name, cache):
    """``cache`` (N, P, Hkv, D) as N * P pages of one slot: a view, so appends reach the cache."""
    try:
        return cache.view(-1, 1, *cache.shape[2:])
    except RuntimeError:
        raise ValueError(f"tileattn: cache_leftpad reads {name} slot by slot, so its first two dims must merge "
                         f"(stride(0) == shape[1] * stride(1)); got shape {tuple(cache.shape)}, strides "
                         f"{cache.stride()}") from None


def _slot_table(cache, block_table, rows, leftpad):
    """int32 (B, capacity): entry (b, c) is the one-slot page of row b's position leftpad[b] + c."""
    cap = paged.capacity(cache, block_table)
    pos = (leftpad.long()[:, None] + torch.arange(cap, device=cache.device)).clamp(max=cap - 1)
    if block_table is None:
        rows = torch.arange(leftpad.shape[0], device=cache.device) if rows is None else rows.long()
        return (rows[:, None] * cache.shape[1] + pos).to(torch.int32)
    page, slot = paged.locate(block_table, pos, cache.shape[1])
    return (page * cache.shape[1] + slot).to(torch.int32)
