"""Public entry points: validate, fill defaults, pick a backend, call the ops (ops.py).

Layout is (B, S, H, D) everywhere except ``sdpa``, which mirrors torch's (B, H, L, E).
GQA: query head ``h`` reads kv head ``h // (Hq // Hkv)``. Causal masks are aligned to the
bottom-right corner (flash-attn >= 2.1): with ``off = Sk - Sq``, row ``i`` keeps ``j <= i + off``::

    Sq=2, Sk=5, causal          Sq=5, Sk=2, causal (rows 0-2 keep nothing: out 0, lse -inf)
      1 1 1 1 0                   0 0
      1 1 1 1 1                   0 0
                                  0 0
                                  1 0
                                  1 1
"""

import os
from dataclasses import replace

import torch

from . import _checks, _fastpath, _kvprep, backends, ops, paged
from .score import ScoreSpec

__all__ = ["attention", "attention_varlen", "attention_with_kvcache", "sdpa"]

_NEEDS = {"forward": "attention", "backward": "attention backward", "forward_kvcache": "attention_with_kvcache"}


def _backend(name: str, q: torch.Tensor, needs: str) -> str:
    """Resolve ``backend`` for tensors like ``q``; raise if it cannot serve ``needs``."""
    if name == "auto":
        name = "triton" if q.is_cuda else "cpu"
    if name not in backends.BACKENDS:
        raise ValueError(f"tileattn: backend must be one of auto, {', '.join(backends.BACKENDS)}; got {name!r}")
    if name == "cpu" and q.device.type != "cpu":
        raise NotImplementedError(f"tileattn: backend='cpu' needs CPU tensors, got q on {q.device}; use backend='auto'")
    if name == "triton" and q.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise NotImplementedError("tileattn: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for "
                                      "the interpreter); use backend='cpu' for CPU tensors")
        if q.dtype == torch.bfloat16:  # its bf16 tl.dot returns garbage (docs/design/TOOLCHAIN.md)
            raise NotImplementedError("tileattn: the Triton interpreter computes bf16 dots wrongly, so q of dtype "
                                      "torch.bfloat16 is refused there; use backend='cpu', fp16/fp32, or a GPU")
    try:
        module = backends.get(name)
    except ImportError as err:
        raise NotImplementedError(f"tileattn: backend={name!r} is unavailable here ({err}); use backend='cpu'") from err
    if not hasattr(module, needs):
        raise NotImplementedError(f"tileattn: backend={name!r} does not implement {_NEEDS[needs]} yet; use backend='cpu'")
    return name


def _needs(*tensors) -> str:
    """'backward' when autograd will need a backward through these inputs, else 'forward'."""
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return "backward" if grad else "forward"


def _seed(dropout_p: float):
    """Philox key as a CPU int64 tensor (traceable; no device sync), or None without dropout."""
    if dropout_p == 0.0:
        return None
    return torch.randint(0, 2**63 - 1, (), dtype=torch.int64)


def _interpreted(name: str, q: torch.Tensor) -> bool:
    """Triton on CPU tensors (the interpreter): its environment check runs on every call."""
    return name == "triton" and q.device.type == "cpu"


def _unit_stride(*tensors):
    """Only a last-dim stride other than 1 costs a copy (see API.md)."""
    return [t if t is None or t.stride(-1) == 1 else t.contiguous() for t in tensors]


def _common_checks(q, k, v, scale, window, softcap, dropout_p, alibi_slopes, sinks, batch, **flags):
    """Validate the shared arguments; returns (alibi_slopes, sinks) contiguous."""
    _checks.same_dtype_device(q, k=k, v=v)
    _checks.heads_and_dims(q, k, v)
    _checks.options(scale=scale, window=window, softcap=softcap, dropout_p=dropout_p, **flags)
    return (_checks.per_head("alibi_slopes", alibi_slopes, q, batch, q.shape[-2], allow_batch=True),
            _checks.per_head("sinks", sinks, q, batch, q.shape[-2], allow_batch=False))


def attention(q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=0.0, alibi_slopes=None,
              sinks=None, attn_mask=None, dropout_p=0.0, deterministic=False, return_lse=False,
              backend="auto"):
    """Exact attention ``softmax(q k^T * scale [+ features]) v`` computed tile by tile.

    Args:
        q: (B, Sq, Hq, D) fp16/bf16/fp32, any strides.
        k: (B, Sk, Hkv, D), Hq % Hkv == 0 (GQA/MQA).
        v: (B, Sk, Hkv, Dv); Dv may differ from D; head dims up to 256.
        causal: keep j <= i + (Sk - Sq) (bottom-right aligned, see the module docstring).
        scale: score scale, default 1/sqrt(D).
        window: (left, right) keeps i+off-left <= j <= i+off+right; -1 = unbounded.
        softcap: c > 0 applies s = c * tanh(s / c) after scaling.
        alibi_slopes: (Hq,) or (B, Hq) float; adds -slope * |i + off - j|.
        sinks: (Hq,) float logits adding exp(sink) to each softmax denominator.
        attn_mask: bool (True = keep) or float (added) tensor broadcastable to (B, Hq, Sq, Sk).
        dropout_p: probability of zeroing each attention weight (Philox stream, see _philox).
        deterministic: bitwise-reproducible backward.
        return_lse: also return lse (B, Hq, Sq) float32, natural log (includes the sink).
        backend: "auto" (triton for CUDA, cpu for CPU), "triton", "cpu" or "reference".

    Returns:
        out (B, Sq, Hq, Dv) in q's dtype [, lse]. Rows with no kept key give out 0, lse -inf.

    Example:
        >>> q, k, v = (torch.randn(2, 100, 8, 64) for _ in range(3))
        >>> tileattn.attention(q, k, v, causal=True).shape
        torch.Size([2, 100, 8, 64])
    """
    key = None
    if not torch.compiler.is_compiling():  # [Note] eager fast path (tileattn/_fastpath.py)
        key = ("attention", torch.is_grad_enabled(),
               *map(_fastpath.tensor_facts, (q, k, v, attn_mask, alibi_slopes, sinks)),
               _fastpath.scalar_facts((causal, scale, window, softcap, dropout_p, deterministic, return_lse, backend)))
        hit = _fastpath.recall(key)
        if hit is not None:
            name, spec, needs = hit
            spec = spec if attn_mask is None else replace(spec, attn_mask=attn_mask)
            return _run(q, k, v, None, None, q.shape[1], k.shape[1], spec, deterministic, return_lse, name, needs)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(name, t, 4)
    if k.shape[0] != q.shape[0] or v.shape[:2] != k.shape[:2]:
        raise ValueError(f"tileattn: q, k, v must share batch and k, v the key length; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    alibi_slopes, sinks = _common_checks(q, k, v, scale, window, softcap, dropout_p, alibi_slopes, sinks, q.shape[0],
                                         causal=causal, deterministic=deterministic, return_lse=return_lse,
                                         backend=backend)
    _checks.attn_mask(attn_mask, q, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
    needs = _needs(q, k, v, sinks, attn_mask)
    name = _backend(backend, q, needs)
    given = (q, k, v)
    q, k, v = _unit_stride(q, k, v)
    spec = ScoreSpec.build(q.shape[-1], causal=causal, scale=scale, window=window, softcap=softcap,
                           alibi_slopes=alibi_slopes, sinks=sinks, attn_mask=attn_mask, dropout_p=dropout_p)
    if (key is not None and all(a is b for a, b in zip((q, k, v), given)) and alibi_slopes is None
            and sinks is None and not dropout_p and not _interpreted(name, q)):
        _fastpath.remember(key, (name, replace(spec, attn_mask=None), needs))
    return _run(q, k, v, None, None, q.shape[1], k.shape[1], spec, deterministic, return_lse, name, needs)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, *,
                     causal=False, scale=None, window=(-1, -1), softcap=0.0, alibi_slopes=None,
                     sinks=None, dropout_p=0.0, deterministic=False, return_lse=False, backend="auto"):
    """Attention over a batch of packed variable-length sequences (flash-attn's varlen layout).

    Args:
        q: (total_q, Hq, D); k: (total_k, Hkv, D); v: (total_k, Hkv, Dv).
        cu_seqlens_q, cu_seqlens_k: int32 (B+1,) on q's device, starting at 0; sequence b owns
            rows cu[b]:cu[b+1]. Zero-length sequences are allowed.
        max_seqlen_q, max_seqlen_k: int, maximum query / key sequence length in the batch (as
            flash-attn's). Give them to avoid a host sync; None reads them from cu_seqlens.
            They must be >= every sequence's length: a smaller value is an error, raised as a
            ``tileattn:`` ValueError where it costs no sync (CPU tensors; always when
            B * max_seqlen < total tokens) and under ``TILEATTN_DEBUG=1`` on the GPU, and
            undefined (rows past it are not computed) otherwise.
        Other keywords as in :func:`attention` (masking is per sequence, with off = Sk_b - Sq_b).

    Returns:
        out (total_q, Hq, Dv) [, lse (Hq, total_q) float32].

    Example:
        >>> cu = torch.tensor([0, 3, 10], dtype=torch.int32)
        >>> q = k = v = torch.randn(10, 4, 64)
        >>> tileattn.attention_varlen(q, k, v, cu, cu, 7, 7, causal=True).shape
        torch.Size([10, 4, 64])
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(name, t, 3)
    if v.shape[0] != k.shape[0]:
        raise ValueError(f"tileattn: k and v must hold the same tokens, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k = _checks.varlen(
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q, k)
    batch = cu_seqlens_q.numel() - 1
    alibi_slopes, sinks = _common_checks(q, k, v, scale, window, softcap, dropout_p, alibi_slopes, sinks, batch,
                                         causal=causal, deterministic=deterministic, return_lse=return_lse,
                                         backend=backend)
    needs = _needs(q, k, v, sinks)
    name = _backend(backend, q, needs)
    q, k, v = _unit_stride(q, k, v)
    spec = ScoreSpec.build(q.shape[-1], causal=causal, scale=scale, window=window, softcap=softcap,
                           alibi_slopes=alibi_slopes, sinks=sinks, dropout_p=dropout_p)
    return _run(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), spec, deterministic,
                return_lse, name, needs)


def _run(q, k, v, cu_q, cu_k, max_q, max_k, spec, deterministic, return_lse, name, needs):
    """Call the attention op for ``spec`` (dense when cu_q is None, else varlen). Eager calls
    that need no backward (``needs``, from :func:`_needs`) skip autograd; a dense Triton call
    with one query row and no mask or dropout runs the decode kernel (split-KV over the keys,
    the keys as a full contiguous cache: the same bottom-right rule, many programs per head)."""
    if torch.compiler.is_compiling():
        fwd = ops.attention_fwd
    elif needs == "forward" and not spec.dropout_p:
        batch, hq = (q.shape[0] if cu_q is None else cu_q.numel() - 1), q.shape[-2]
        if cu_q is None and name == "triton" and q.shape[1] == 1 and spec.attn_mask is None and q.numel() \
                and k.shape[1]:
            out, lse = ops.run_kvcache(name, q, k, v, None, None, spec.expanded(batch, hq),
                                       _fastpath.lengths(k.shape[1], batch, k.device), None, 0)
        else:
            out, lse = ops.run_forward(name, q, k, v, spec.expanded(batch, hq, q.shape[1], k.shape[1]), cu_q, cu_k,
                                       max_q, max_k)
        return (out, lse) if return_lse else out
    else:
        fwd = ops.EagerAttention.apply
    mask = spec.attn_mask
    mask_grad = mask is not None and mask.requires_grad and torch.is_grad_enabled()
    out, lse = fwd(q, k, v, cu_q, cu_k, max_q, max_k, *spec.op_fields(), _seed(spec.dropout_p),
                   bool(deterministic), mask_grad, name)
    return (out, lse) if return_lse else out


class _NoBackward(torch.autograd.Function):
    """Passes ``out`` through; its backward raises: attention_with_kvcache is inference-only."""

    @staticmethod
    def forward(ctx, out, *inputs):
        return out.clone()

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("tileattn: attention_with_kvcache has no backward; use attention() or "
                                  "attention_varlen() for training, or call it under torch.no_grad()")


def attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, block_table=None,
                           causal=True, scale=None, window=(-1, -1), softcap=0.0, alibi_slopes=None,
                           sinks=None, num_splits=0, return_lse=False, rotary_cos=None, rotary_sin=None,
                           rotary_interleaved=False, cache_batch_idx=None, cache_leftpad=None, backend="auto"):
    """Decode / chunked prefill over a contiguous or paged KV cache (inference only).

    Args:
        q: (B, Sn, Hq, D), Sn >= 1 new query tokens per sequence (1 = decode).
        k_cache, v_cache: contiguous (B, Smax, Hkv, D[v]), or paged (num_blocks, block_size,
            Hkv, D[v]) with ``block_table`` int32 (B, max_blocks) of page ids (any block_size).
            Any strides but the last dim's, which must be 1 (the append writes into the caller's
            tensor, so it is never copied); an expanded (stride-0) cache that would be written
            is refused as aliasing.
        k, v: optional (B, Sn, Hkv, D[v]) new tokens, written in place at cache positions
            cache_seqlens[b] .. cache_seqlens[b] + Sn - 1 before attending.
        cache_seqlens: int32 (B,) tokens already in the cache (or a Python int). The caller
            advances it; lengths are read on device (no host sync, CUDA-graph capturable).
        causal: bottom-right aligned against cache_seqlens[b] + Sn keys (default True).
        num_splits: split-KV count; 0 lets the backend choose.
        rotary_cos, rotary_sin: (seqlen_ro, rotary_dim / 2) float; rotate q and the new k (k/v
            required) at positions cache_seqlens[b] + i -- q at cache_seqlens[b] for every row
            when neither causal nor windowed -- on the first rotary_dim dims, as pairs
            (d, d + rotary_dim / 2), or (2d, 2d + 1) with ``rotary_interleaved`` (flash-attn's rule).
        cache_batch_idx: int32 (B,): row b uses contiguous cache row cache_batch_idx[b] (the
            cache may hold more rows than B; not with a paged cache, as in flash-attn).
        cache_leftpad: int32 (B,): row b's keys start at cache slot cache_leftpad[b] (<=
            cache_seqlens[b]); slots before it are not attended; positions (causal, window,
            ALiBi, rotary) stay slot numbers. The last three are fused into the Triton decode
            kernel and native on the CPU backend (validated in tileattn/_kvprep.py).
        Other keywords as in :func:`attention`.

    Returns:
        out (B, Sn, Hq, Dv) [, lse (B, Hq, Sn) float32].

    Example:
        >>> kc = vc = torch.zeros(2, 256, 2, 64)
        >>> q = torch.randn(2, 1, 8, 64); k = v = torch.randn(2, 1, 2, 64)
        >>> out = tileattn.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=10)
    """
    plain = rotary_cos is None and rotary_sin is None and cache_batch_idx is None and cache_leftpad is None
    key = None
    if plain and not torch.compiler.is_compiling():  # [Note] eager fast path (tileattn/_fastpath.py)
        key = ("kvcache", int if type(cache_seqlens) is int else _fastpath.tensor_facts(cache_seqlens),
               *map(_fastpath.tensor_facts, (q, k_cache, v_cache, k, v, block_table, alibi_slopes, sinks)),
               _fastpath.scalar_facts((causal, scale, window, softcap, num_splits, return_lse, backend)))
        hit = _fastpath.recall(key)
        if hit is not None:
            name, spec, limit = hit
            if type(cache_seqlens) is int:
                ok = 0 <= cache_seqlens <= limit  # else the checks below raise
                lengths = _fastpath.lengths(cache_seqlens, q.shape[0], k_cache.device) if ok else None
            else:
                ok, lengths = not _checks.debug_checks(cache_seqlens), cache_seqlens
            if ok:
                out, lse = ops.run_kvcache(name, q, k_cache, v_cache, k, v, spec, lengths, block_table, num_splits)
                return (out, lse) if return_lse else out
    given = (q, k, v, cache_seqlens, block_table)
    rotary = None
    if not plain:
        _checks.flag("rotary_interleaved", rotary_interleaved)
        cache_seqlens, rotary, cache_batch_idx, cache_leftpad = _kvprep.prepare(
            q, k_cache, k, cache_seqlens, block_table, rotary_cos, rotary_sin, rotary_interleaved, cache_batch_idx,
            cache_leftpad)
    cache_seqlens, block_table = _checks.kvcache(k_cache, v_cache, k, v, cache_seqlens, block_table, q=q,
                                                 rows_mapped=cache_batch_idx is not None)
    _checks.options(scale=scale, window=window, softcap=softcap, causal=causal, return_lse=return_lse,
                    backend=backend, num_splits=num_splits)
    alibi_slopes = _checks.per_head("alibi_slopes", alibi_slopes, q, q.shape[0], q.shape[2], allow_batch=True)
    sinks = _checks.per_head("sinks", sinks, q, q.shape[0], q.shape[2], allow_batch=False)
    name = _backend(backend, q, "forward_kvcache")
    q, k, v = _unit_stride(q, k, v)
    spec = ScoreSpec.build(q.shape[-1], causal=causal, scale=scale, window=window, softcap=softcap,
                           alibi_slopes=alibi_slopes, sinks=None if sinks is None else sinks.detach())
    scale, left, right, softcap, alibi_slopes, sinks = spec.op_fields()[:6]
    args = (q, k_cache, v_cache, k, v, cache_seqlens, block_table, scale, left, right, softcap,
            alibi_slopes, sinks, num_splits, name)
    if rotary is not None or cache_batch_idx is not None or cache_leftpad is not None:
        args += (*(rotary or (None, None, False)), cache_batch_idx, cache_leftpad)
    # eager calls skip the dispatcher's overhead on the decode hot path; compile sees the op
    run = ops.attention_kvcache if torch.compiler.is_compiling() else ops.kvcache_impl
    grad_inputs = [t for t in (q, k, v) if t is not None and t.requires_grad]
    int_lengths = type(given[3]) is int
    same = all(a is b for a, b in zip(given, (q, k, v, given[3] if int_lengths else cache_seqlens, block_table)))
    if (key is not None and same and not any(t is not None and t.requires_grad for t in (q, k_cache, v_cache, k, v))
            and alibi_slopes is None and sinks is None
            and (int_lengths or not _checks.debug_checks(cache_seqlens)) and not _interpreted(name, q)):
        limit = paged.capacity(k_cache, block_table) - (0 if k is None else q.shape[1])
        _fastpath.remember(key, (name, ScoreSpec(scale=scale, window=(left, right), softcap=softcap), limit))
    with torch.no_grad():
        out, lse = run(*args)
    if grad_inputs and torch.is_grad_enabled():
        out = _NoBackward.apply(out, *grad_inputs)
    return (out, lse) if return_lse else out


class SDPAInputError(RuntimeError, ValueError, TypeError):
    """Bad input to :func:`sdpa`: a ``RuntimeError`` as torch's SDPA raises, and the
    ``ValueError`` / ``TypeError`` the rest of tileattn raises, so either ``except`` catches it."""


def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` on tileattn's kernels.

    Same layout (query (B, H, L, E), key (B, Hkv, S, E), value (B, Hkv, S, Ev); also (B, L, E)),
    same top-left aligned ``is_causal`` (torch's rule: row i keeps j <= i), same mask semantics
    (bool True = take part, float added), GQA only with ``enable_gqa=True``. Returns (B, H, L, Ev).
    Bad input raises :class:`SDPAInputError` (a ``RuntimeError``, like torch's).
    """
    try:
        return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    except (ValueError, TypeError) as err:
        if not str(err).startswith("tileattn:"):
            raise
        raise SDPAInputError(str(err)) from None


def _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() not in (3, 4):
            raise ValueError(f"tileattn: {name} must be a 3-D (B, L, E) or 4-D (B, H, L, E) tensor, "
                             f"got {getattr(t, 'shape', type(t).__name__)}")
    _checks.flag("is_causal", is_causal)
    _checks.flag("enable_gqa", enable_gqa)
    if is_causal and attn_mask is not None:
        raise ValueError("tileattn: pass either attn_mask or is_causal=True, not both (as torch's SDPA)")
    if not enable_gqa and query.shape[-3:-2] != key.shape[-3:-2] and query.dim() == 4:
        raise ValueError(f"tileattn: key has {key.shape[1]} heads but query has {query.shape[1]}; "
                         f"set enable_gqa=True for grouped-query attention")
    three_d = query.dim() == 3
    q, k, v = (t.unsqueeze(1) if three_d else t for t in (query, key, value))
    sq, sk = q.shape[2], k.shape[2]
    window = (-1, -1)
    if is_causal and sq > sk:  # top-left j <= i is the window right edge sq - sk from bottom-right
        window = (-1, sq - sk)
    elif is_causal and sq < sk:  # a negative right edge is not expressible: use an explicit mask
        attn_mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None and three_d and attn_mask.dim() == 3:
        attn_mask = attn_mask.unsqueeze(1)
    out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=is_causal and sq == sk,
                    scale=scale, window=window, attn_mask=attn_mask, dropout_p=dropout_p)
    out = out.transpose(1, 2)
    return out.squeeze(1) if three_d else out
