"""Validation of attention_with_kvcache's flash-attn decode features (rotary, batch index, leftpad).

The features travel to the backends as arguments (``forward_kvcache``'s ``rotary``,
``cache_batch_idx``, ``cache_leftpad``); each backend runs them natively (Triton fused into
the decode kernel, the CPU backend and the oracle in torch). Here they are checked and put in
the form every backend reads:

- rotary: ``(cos, sin, interleaved)``, cos/sin (seqlen_ro, rotary_dim / 2) floating on q's
  device, 0 < rotary_dim <= D; k/v must be given (the new keys rotate). Positions are
  ``cache_seqlens[b] + i`` (q's rows all at ``cache_seqlens[b]`` unless causal or windowed).
- cache_batch_idx: int32 (B,) rows of a contiguous cache (B_cache, Smax, ...) in
  [0, B_cache); flash-attn refuses it with a paged cache, and so do we.
- cache_leftpad: int32 (B,) in [0, capacity], <= cache_seqlens: row b's keys are slots
  leftpad[b] .. cache_seqlens[b] (+ Sn) - 1, at their slot positions.

Value checks read device memory, so they run where ``_checks.debug_checks`` allows.
"""

import torch

from . import _checks, paged


def prepare(q, k_cache, k, cache_seqlens, block_table, rotary_cos, rotary_sin, interleaved, batch_idx, leftpad):
    """Returns (cache_seqlens (B,) int32 tensor, rotary (cos, sin, interleaved) or None,
    cache_batch_idx, cache_leftpad), validated."""
    _checks.tensor("q", q, 4)
    _checks.tensor("k_cache", k_cache, 4)
    batch = q.shape[0]
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=k_cache.device)
    cache_seqlens = _checks.index_tensor("cache_seqlens", cache_seqlens, k_cache, 1, "k_cache")
    rotary = None
    if rotary_cos is not None or rotary_sin is not None:
        rotary = _rotary(q, k, cache_seqlens, rotary_cos, rotary_sin, interleaved)
    if batch_idx is not None:
        if block_table is not None:
            raise ValueError("tileattn: cache_batch_idx needs a contiguous cache (flash-attn's rule); with a paged "
                             "cache, reorder block_table's rows instead")
        batch_idx = _rows("cache_batch_idx", batch_idx, batch, k_cache, 0, k_cache.shape[0] - 1)
    if leftpad is not None:
        table = None if block_table is None else _checks.block_table(block_table, k_cache, batch)
        leftpad = _rows("cache_leftpad", leftpad, batch, k_cache, 0, paged.capacity(k_cache, table))
        if _checks.debug_checks(leftpad) and bool((leftpad > cache_seqlens).any()):
            raise ValueError(f"tileattn: cache_leftpad must be <= cache_seqlens, got {leftpad.tolist()} and "
                             f"{cache_seqlens.tolist()}")
    return cache_seqlens, rotary, batch_idx, leftpad


def _rows(name, t, batch, cache, lo, hi):
    """An int32 (B,) tensor with values in [lo, hi] (checked where debug_checks allows)."""
    t = _checks.index_tensor(name, t, cache, 1, "k_cache")
    if t.shape[0] != batch:
        raise ValueError(f"tileattn: {name} must have shape ({batch},), got {tuple(t.shape)}")
    if _checks.debug_checks(t) and batch and not lo <= int(t.min()) <= int(t.max()) <= hi:
        raise ValueError(f"tileattn: {name} must lie in [{lo}, {hi}], got {t.tolist()}")
    return t


def _rotary(q, k, cache_seqlens, cos, sin, interleaved):
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
    if _checks.debug_checks(cache_seqlens) and cache_seqlens.numel():
        last = int(cache_seqlens.max()) + q.shape[1] - 1
        if last >= cos.shape[0]:
            raise ValueError(f"tileattn: rotary_cos has {cos.shape[0]} positions but position {last} "
                             f"(cache_seqlens + Sn - 1) is rotated")
    return cos, sin, bool(interleaved)
