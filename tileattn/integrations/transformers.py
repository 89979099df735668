"""transformers' ``attn_implementation="tileattn"`` (transformers >= 5.0; tested on 5.17 and 5.25).

    import tileattn.integrations.transformers as tt
    tt.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="tileattn")
    model.set_attn_implementation("tileattn")          # or switch a loaded model

:func:`register` adds :func:`attention_forward` to transformers' ``AttentionInterface`` and
:func:`mask_forward` to its ``AttentionMaskInterface``. The masks are those of transformers'
"sdpa" (``None`` when plain causal without padding, else a 4-D bool mask (B, 1, Sq, Sk),
True = attend), except padding under a plain causal mask (below). How each call runs:

- no mask, Sq > 1: ``causal=True`` (transformers' top-left rule; keys past Sq, an empty static
  cache's slots, are cut as its "sdpa" does), ``window`` from ``sliding_window``;
- no mask, Sq == 1, inference (no dropout, no grad): the decode kernel
  (:func:`tileattn.attention_with_kvcache` with the keys as a full contiguous cache);
- padding under a plain causal mask, queries the last positions (dynamic cache, no cache):
  :func:`mask_forward` returns the key-padding mask (B, Sk) alone, and the layer runs
  ``causal=True`` with it broadcast as (B, 1, 1, Sk), never a dense (B, 1, Sq, Sk) mask;
- packed sequences with flash-attn's keywords (``cu_seq_lens_q``/``_k``, ``max_length_q``/``_k``,
  batch 1, as transformers' flattening collator gives them): :func:`tileattn.attention_varlen`;
  the mask is then not read;
- any other mask (sliding window with padding, static cache, packing without those keywords,
  custom mask functions): :func:`tileattn.attention` with the dense mask as ``attn_mask``.

Every path takes GQA heads as they come (no ``repeat_kv``), ``softcap`` (Gemma 2), sinks
(``s_aux``, gpt-oss), ``scaling``, ``dropout`` (the model passes 0 outside training) and
``position_bias`` (as a float mask, as transformers' "sdpa").
"""

import torch

from ..api import attention, attention_varlen, attention_with_kvcache

NAME = "tileattn"


def register(name: str = NAME) -> None:
    """Make ``attn_implementation=name`` available to every transformers model (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask_forward)


def mask_forward(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, local_size=None, **kwargs):
    """transformers' mask builder for "tileattn": the key-padding mask (B, kv_length) bool when
    the mask is plain causal + padding and the queries are the last kv_length positions (so
    tileattn's bottom-right causal rule is the model's), else what "sdpa" builds (None or
    (B, 1, Sq, Sk) bool). Arguments as transformers' ``sdpa_mask``."""
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

    if (mask_function is causal_mask_function and attention_mask is not None and local_size is None
            and isinstance(q_offset, int) and q_offset + q_length == kv_offset + kv_length
            and not torch.compiler.is_compiling()):
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)[:, kv_offset:kv_offset + kv_length]
        if not bool(padding.all()):  # no padding: let sdpa_mask return None (plain causal)
            return padding
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function or causal_mask_function,
                     attention_mask=attention_mask, local_size=local_size, **kwargs)


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                      softcap=None, is_causal=None, s_aux=None, position_bias=None, **kwargs):
    """One attention layer, as transformers calls it.

    Args:
        module: the attention module (its ``is_causal`` is the default for ``is_causal``).
        query: (B, Hq, Sq, D); key: (B, Hkv, Sk, D); value: (B, Hkv, Sk, Dv); Hq % Hkv == 0.
        attention_mask: None, or bool (True = attend) / float (added) broadcastable to
            (B, Hq, Sq, Sk).
        dropout, scaling, sliding_window (keys q - W < k <= q), softcap (None = off),
        s_aux: sinks (Hq,), position_bias: float (B or 1, Hq or 1, Sq, Sk).

    Returns:
        (out (B, Sq, Hq, Dv), None): transformers' layout; no attention weights.

    Example:
        >>> q, k = torch.randn(1, 4, 6, 16), torch.randn(1, 2, 6, 16)
        >>> out, _ = attention_forward(torch.nn.Module(), q, k, k, None, is_causal=True)
        >>> out.shape
        torch.Size([1, 6, 4, 16])
    """
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    sinks = None if s_aux is None else s_aux.to(torch.float32)
    varlen = [kwargs.get(n) for n in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")]
    if all(x is not None for x in varlen) and q.shape[0] == 1 and position_bias is None:
        cu_q, cu_k, max_q, max_k = varlen
        window = (sliding_window - 1, 0 if is_causal else -1) if sliding_window else (-1, -1)
        out = attention_varlen(q[0], k[0], v[0], cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k),
                               causal=is_causal, scale=scaling, window=window, softcap=softcap or 0.0, sinks=sinks,
                               dropout_p=dropout)
        return out[None], None
    sq = q.shape[1]
    top_left = is_causal and attention_mask is None and sq > 1  # transformers' "sdpa" rule without a mask
    causal, window_ok = top_left, attention_mask is None
    if attention_mask is not None and attention_mask.dim() == 2:  # mask_forward's key padding (B, Sk)
        attention_mask, causal, window_ok = attention_mask[:, None, None, :], is_causal, True
    if top_left and k.shape[1] > sq:  # keys past Sq are never seen (empty static-cache slots)
        k, v = k[:, :sq], v[:, :sq]
        position_bias = None if position_bias is None else position_bias[..., :sq]
    if position_bias is not None:
        from transformers.integrations.sdpa_attention import create_position_bias_mask
        attention_mask = create_position_bias_mask(position_bias, attention_mask, top_left, query, k.transpose(1, 2))
        causal = causal and not top_left  # the mask now holds top-left causality; key padding keeps causal
    window = (sliding_window - 1, 0 if causal else -1) if sliding_window and window_ok else (-1, -1)
    keywords = dict(scale=scaling, window=window, softcap=softcap or 0.0, sinks=sinks)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if sq == 1 and attention_mask is None and not dropout and not grad:
        out = attention_with_kvcache(q, k, v, cache_seqlens=k.shape[1], causal=False, **keywords)
    else:
        out = attention(q, k, v, causal=causal, attn_mask=attention_mask, dropout_p=dropout, **keywords)
    return out, None
