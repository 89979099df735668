"""transformers' ``attn_implementation="tileattn"`` (transformers >= 5.0; tested on 5.17 and 5.25).

    import tileattn.integrations.transformers as tt
    tt.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="tileattn")
    model.set_attn_implementation("tileattn")          # or switch a loaded model

:func:`register` adds :func:`attention_forward` to transformers' ``AttentionInterface`` and,
under the same name, torch SDPA's mask builder to ``AttentionMaskInterface``, so a layer
receives what transformers' "sdpa" receives: ``None`` when the mask is plain causal (no
padding), else a 4-D bool mask (B, 1, Sq, Sk), True = attend (padding, sliding window, packed
sequences and custom mask functions folded in). How each call runs:

- no mask, Sq > 1: ``causal=True`` (transformers' top-left rule; keys past Sq, an empty static
  cache's slots, are cut as its "sdpa" does), ``window`` from ``sliding_window``;
- no mask, Sq == 1, inference (no dropout, no grad): the decode kernel
  (:func:`tileattn.attention_with_kvcache` with the keys as a full contiguous cache);
- a mask: :func:`tileattn.attention` with it as ``attn_mask`` (dense; the varlen / left-pad
  forms are not used yet, see docs/compat.md).

Every path takes GQA heads as they come (no ``repeat_kv``), ``softcap`` (Gemma 2), sinks
(``s_aux``, gpt-oss), ``scaling``, ``dropout`` (the model passes 0 outside training) and
``position_bias`` (as a float mask, as transformers' "sdpa").
"""

import torch

from ..api import attention, attention_with_kvcache

NAME = "tileattn"


def register(name: str = NAME) -> None:
    """Make ``attn_implementation=name`` available to every transformers model (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)


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
    sq = q.shape[1]
    causal = is_causal and attention_mask is None and sq > 1
    if causal and k.shape[1] > sq:  # top-left causal: keys past Sq are never seen (empty static-cache slots)
        k, v = k[:, :sq], v[:, :sq]
        position_bias = None if position_bias is None else position_bias[..., :sq]
    if position_bias is not None:
        from transformers.integrations.sdpa_attention import create_position_bias_mask
        attention_mask = create_position_bias_mask(position_bias, attention_mask, causal, query, k.transpose(1, 2))
        causal = False
    window = (-1, -1) if not sliding_window or attention_mask is not None else (sliding_window - 1, 0 if causal else -1)
    keywords = dict(scale=scaling, window=window, softcap=softcap or 0.0,
                    sinks=None if s_aux is None else s_aux.to(torch.float32))
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if sq == 1 and attention_mask is None and not dropout and not grad:
        out = attention_with_kvcache(q, k, v, cache_seqlens=k.shape[1], causal=False, **keywords)
    else:
        out = attention(q, k, v, causal=causal, attn_mask=attention_mask, dropout_p=dropout, **keywords)
    return out, None
