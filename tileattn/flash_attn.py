"""flash-attn 2.x's public functions on tileattn: change the import, keep the calls.

    from tileattn.flash_attn import flash_attn_func      # was: from flash_attn import ...
    out = flash_attn_func(q, k, v, causal=True)          # q (B, S, H, D), k/v (B, S, Hkv, D)

Names, argument names and order, defaults, shapes and return values are those of flash-attn
v2.8.3 (``flash_attn/flash_attn_interface.py``; tests/test_flash_attn_compat.py holds the
table). The calls run on :func:`tileattn.attention`, :func:`tileattn.attention_varlen` and
:func:`tileattn.attention_with_kvcache`, so CPU tensors, fp32, any head dim 1..256 and
``Dv != D`` work too, and every score feature means what it means there (API.md).

Return values, as flash-attn's:
    ``out``; with ``return_attn_probs=True`` the triple ``(out, softmax_lse, S_dmask)``:
    softmax_lse (B, H, Sq) float32 (varlen: (H, total_q)), natural log. flash-attn fills
    ``S_dmask`` only when ``dropout_p > 0`` (probabilities with the dropout pattern in the
    sign) and returns an empty (0,) tensor otherwise; so do we for ``dropout_p == 0``. With
    ``dropout_p > 0`` we raise ``NotImplementedError``: tileattn never materializes the
    probabilities and its dropout stream (tileattn/_philox.py) is not flash-attn's.

Differences (docs/compat.md): a negative ``softcap`` raises (flash-attn treats it as off);
``flash_attn_with_kvcache`` has no backward, as flash-attn's (its rotary / cache_batch_idx /
cache_leftpad are fused into the Triton decode kernel).
"""

import torch

from . import _checks, paged
from .api import attention, attention_varlen, attention_with_kvcache

__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache"]

# tileattn's keyword -> flash-attn's, so an error names the argument the caller wrote
_RENAMES = {"scale": "softmax_scale", "window": "window_size", "return_lse": "return_attn_probs"}


def _call(fn, args, return_attn_probs, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
          deterministic):
    """Run ``fn(*args, **keywords)``; shape the result as flash-attn returns it."""
    _checks.flag("return_attn_probs", return_attn_probs)
    if return_attn_probs and _checks._is_real(dropout_p) and dropout_p > 0:
        raise NotImplementedError("tileattn: return_attn_probs=True with dropout_p > 0 asks for flash-attn's "
                                  "dropout-mask encoding (S_dmask), which tileattn cannot produce; use "
                                  "dropout_p=0.0, or return_attn_probs=False")
    try:
        res = fn(*args, dropout_p=dropout_p, scale=softmax_scale, causal=causal, window=window_size,
                 softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
                 return_lse=return_attn_probs)
    except (TypeError, ValueError) as err:
        raise _renamed(err) from None
    if not return_attn_probs:
        return res
    out, lse = res
    return out, lse, torch.empty((0,), dtype=out.dtype, device=out.device)


def _renamed(err):
    """``err`` with tileattn's argument name replaced by flash-attn's."""
    msg = str(err)
    for ours, theirs in _RENAMES.items():
        if msg.startswith(f"tileattn: {ours} "):
            return type(err)(f"tileattn: {theirs} " + msg[len(f"tileattn: {ours} "):])
    return err


def _unbind(name, t, dim, n, layout):
    """``t`` split along ``dim`` (of size ``n``) into views; their gradients flow into ``t``."""
    if not isinstance(t, torch.Tensor) or t.dim() != len(layout.split(",")) or t.shape[dim] != n:
        raise ValueError(f"tileattn: {name} must have shape ({layout}), got {getattr(t, 'shape', type(t).__name__)}")
    return t.unbind(dim)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn's ``flash_attn_func``: :func:`tileattn.attention` under flash-attn's names.

    Args:
        q: (B, Sq, H, D); k: (B, Sk, Hkv, D); v: (B, Sk, Hkv, Dv); H % Hkv == 0 (query head h
            reads kv head h // (H // Hkv)). fp16, bf16 or fp32, any strides.
        dropout_p: dropout probability (default 0.0; use 0.0 in evaluation).
        softmax_scale: default 1 / sqrt(D).
        causal: bottom-right aligned (flash-attn >= 2.1); Sq=2, Sk=5 keeps ``1 1 1 1 0 / 1 1 1 1 1``.
        window_size: (left, right), -1 unbounded: keys i + Sk - Sq - left .. i + Sk - Sq + right.
        softcap: > 0 caps scores as softcap * tanh(s / softcap); 0.0 is off.
        alibi_slopes: (H,) or (B, H) fp32: adds -slope * |i + Sk - Sq - j|.
        deterministic: bitwise-reproducible backward.
        return_attn_probs: also return softmax_lse and S_dmask (see the module docstring).

    Returns:
        out (B, Sq, H, Dv), or (out, softmax_lse (B, H, Sq) float32, S_dmask empty (0,)).

    Example:
        >>> q, k, v = torch.randn(2, 9, 4, 32), torch.randn(2, 9, 2, 32), torch.randn(2, 9, 2, 32)
        >>> flash_attn_func(q, k, v, causal=True).shape
        torch.Size([2, 9, 4, 32])
    """
    return _call(attention, (q, k, v), return_attn_probs, dropout_p, softmax_scale, causal, window_size, softcap,
                 alibi_slopes, deterministic)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """:func:`flash_attn_func` on packed qkv (B, S, 3, H, D); the gradient lands in ``qkv``.

    Returns out (B, S, H, D) [, softmax_lse (B, H, S), S_dmask (0,)].

    Example:
        >>> qkv = torch.randn(2, 9, 3, 4, 32, requires_grad=True)
        >>> flash_attn_qkvpacked_func(qkv, causal=True).sum().backward(); qkv.grad.shape
        torch.Size([2, 9, 3, 4, 32])
    """
    q, k, v = _unbind("qkv", qkv, 2, 3, "B, S, 3, H, D")
    return _call(attention, (q, k, v), return_attn_probs, dropout_p, softmax_scale, causal, window_size, softcap,
                 alibi_slopes, deterministic)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """:func:`flash_attn_func` with q (B, Sq, H, D) and packed kv (B, Sk, 2, Hkv, D).

    Returns out (B, Sq, H, D) [, softmax_lse (B, H, Sq), S_dmask (0,)]; kv's gradient is one tensor.

    Example:
        >>> q, kv = torch.randn(2, 5, 4, 32), torch.randn(2, 9, 2, 2, 32)
        >>> flash_attn_kvpacked_func(q, kv, causal=True).shape
        torch.Size([2, 5, 4, 32])
    """
    k, v = _unbind("kv", kv, 2, 2, "B, Sk, 2, Hkv, D")
    return _call(attention, (q, k, v), return_attn_probs, dropout_p, softmax_scale, causal, window_size, softcap,
                 alibi_slopes, deterministic)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """flash-attn's ``flash_attn_varlen_func``: :func:`tileattn.attention_varlen`.

    Args:
        q: (total_q, H, D); k: (total_k, Hkv, D); v: (total_k, Hkv, Dv); or, with
            ``block_table`` int32 (B, max_blocks), paged k/v (num_blocks, block_size, Hkv, D[v])
            holding sequence b's keys 0 .. cu_seqlens_k[b+1] - cu_seqlens_k[b] - 1 (any
            block_size; the pages are gathered into packed form first, which reads
            cu_seqlens_k on the host).
        cu_seqlens_q, cu_seqlens_k: int32 (B+1,) offsets starting at 0.
        max_seqlen_q, max_seqlen_k: int, >= every sequence's length.
        Other arguments as in :func:`flash_attn_func` (masks per sequence, off = Sk_b - Sq_b).

    Returns:
        out (total_q, H, Dv) [, softmax_lse (H, total_q) float32, S_dmask (0,)].

    Example:
        >>> cu = torch.tensor([0, 3, 10], dtype=torch.int32)
        >>> q = k = v = torch.randn(10, 4, 32)
        >>> flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, causal=True).shape
        torch.Size([10, 4, 32])
    """
    if block_table is not None:
        k, v = _unpage(k, block_table, cu_seqlens_k), _unpage(v, block_table, cu_seqlens_k)
    return _call(attention_varlen, (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k),
                 return_attn_probs, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                 deterministic)


def _unpage(cache, block_table, cu_seqlens_k):
    """Packed (total_k, Hkv, D) copy of the keys ``cu_seqlens_k`` gives each sequence of
    paged ``cache`` (num_blocks, block_size, Hkv, D); differentiable (an index)."""
    _checks.tensor("k", cache, 4)
    cu = _checks.index_tensor("cu_seqlens_k", cu_seqlens_k, cache, 1, "k")
    table = _checks.block_table(block_table, cache, cu.numel() - 1)
    lens = cu.diff().long()
    cap = paged.capacity(cache, table)
    if bool((lens < 0).any()) or int(lens.max()) > cap:
        raise ValueError(f"tileattn: cu_seqlens_k gives lengths {lens.tolist()}, outside 0..{cap} (block_table's "
                         f"{table.shape[1]} pages of {cache.shape[1]})")
    rows = torch.repeat_interleave(torch.arange(lens.numel(), device=cache.device), lens)
    pos = torch.arange(rows.numel(), device=cache.device) - cu.long()[rows]
    page, slot = paged.locate(table[rows], pos[:, None], cache.shape[1])
    return cache[page[:, 0], slot[:, 0]]


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """:func:`flash_attn_varlen_func` on packed qkv (total, 3, H, D), one cu_seqlens (B+1,).

    Returns out (total, H, D) [, softmax_lse (H, total), S_dmask (0,)]; the gradient lands in qkv.

    Example:
        >>> cu = torch.tensor([0, 3, 10], dtype=torch.int32)
        >>> flash_attn_varlen_qkvpacked_func(torch.randn(10, 3, 4, 32), cu, 7, causal=True).shape
        torch.Size([10, 4, 32])
    """
    q, k, v = _unbind("qkv", qkv, 1, 3, "total, 3, H, D")
    return _call(attention_varlen, (q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen), return_attn_probs,
                 dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """:func:`flash_attn_varlen_func` with q (total_q, H, D) and packed kv (total_k, 2, Hkv, D).

    Returns out (total_q, H, D) [, softmax_lse (H, total_q), S_dmask (0,)].

    Example:
        >>> cu_q, cu_k = (torch.tensor(c, dtype=torch.int32) for c in ([0, 1, 3], [0, 4, 9]))
        >>> flash_attn_varlen_kvpacked_func(torch.randn(3, 4, 32), torch.randn(9, 2, 2, 32),
        ...                                 cu_q, cu_k, 2, 5, causal=True).shape
        torch.Size([3, 4, 32])
    """
    k, v = _unbind("kv", kv, 1, 2, "total_k, 2, Hkv, D")
    return _call(attention_varlen, (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k),
                 return_attn_probs, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                 deterministic)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """flash-attn's ``flash_attn_with_kvcache``: :func:`tileattn.attention_with_kvcache`.

    Args:
        q: (B, Sn, H, D) new queries.
        k_cache, v_cache: (B_cache, Smax, Hkv, D[v]), or paged (num_blocks, block_size, Hkv,
            D[v]) with ``block_table`` int32 (B, max_blocks) (any block_size).
        k, v: optional (B, Sn, Hkv, D[v]) new tokens, written in place at cache positions
            cache_seqlens[b] .. + Sn - 1, then attended.
        cache_seqlens: int or int32 (B,) tokens already cached; None = the whole cache (only
            without k/v). The caller advances it.
        rotary_cos, rotary_sin: (seqlen_ro, rotary_dim / 2): rotate q and the new k (k/v
            required) at positions cache_seqlens[b] + i (q all at cache_seqlens[b] unless causal
            or windowed); ``rotary_interleaved`` (default True) pairs dims (2d, 2d + 1), else
            (d, d + rotary_dim / 2) (GPT-NeoX).
        cache_batch_idx: int32 (B,): query row b uses cache row cache_batch_idx[b] (contiguous
            cache only, as flash-attn); default 0 .. B-1.
        cache_leftpad: int32 (B,): row b's keys start at slot cache_leftpad[b] (paged caches too).
        causal: default False here (flash-attn's), bottom-right aligned against the cache.
        num_splits: split-KV count, 0 = automatic. Other arguments as :func:`flash_attn_func`.
        Rotary, batch index and leftpad are fused into the Triton decode kernel.

    Returns:
        out (B, Sn, H, Dv) [, softmax_lse (B, H, Sn) float32]. No backward (as flash-attn).

    Example:
        >>> kc = vc = torch.zeros(2, 64, 2, 32)
        >>> q, k, v = torch.randn(2, 1, 4, 32), torch.randn(2, 1, 2, 32), torch.randn(2, 1, 2, 32)
        >>> flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=5, causal=True).shape
        torch.Size([2, 1, 4, 32])
    """
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("tileattn: cache_seqlens is required when k and v are given (it says where they go)")
        table = None if block_table is None else _checks.block_table(block_table, k_cache)
        cache_seqlens = paged.capacity(k_cache, table)
    _checks.flag("return_softmax_lse", return_softmax_lse)
    try:
        return attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens,
                                      block_table=block_table, causal=causal, scale=softmax_scale,
                                      window=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                                      num_splits=num_splits, return_lse=return_softmax_lse, rotary_cos=rotary_cos,
                                      rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved,
                                      cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad)
    except (TypeError, ValueError) as err:
        raise _renamed(err) from None

