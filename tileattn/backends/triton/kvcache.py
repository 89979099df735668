"""Triton ``forward_kvcache``: append new k/v, then split-KV attention (plan + run).

Plan (``plan.plan_decode``): block sizes, row blocks and the split count depend on shapes,
dtype, cache capacity and the SM count only -- never on device values -- so one plan serves
every layer of a decode step and a captured CUDA graph can be replayed with new
``cache_seqlens``; the plan owns the split workspace. Run: :func:`~.decode.decode_attention`
appends new k/v and attends in one kernel (+ the combine kernel when the plan has several
splits).

    >>> q = torch.randn(2, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    >>> kc, vc = (torch.zeros(2, 4096, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in "kv")
    >>> kn, vn = (torch.randn(2, 1, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in "kv")
    >>> seqlens = torch.tensor([17, 4000], dtype=torch.int32, device="cuda")
    >>> spec = ScoreSpec(scale=128 ** -0.5, window=(-1, 0))   # causal
    >>> plan = plan_kvcache(q, kc, vc, None)                   # once per step, any layer's caches
    >>> out, lse = forward_kvcache(q, kc, vc, kn, vn, spec, cache_seqlens=seqlens, block_table=None,
    ...     num_splits=0, plan=plan)   # out (2, 1, 32, 128) bf16, lse (2, 32, 1) fp32
"""

from .decode import decode_attention
from .plan import choose_num_splits, plan_decode

__all__ = ["choose_num_splits", "forward_kvcache", "plan_kvcache"]


def plan_kvcache(q, k_cache, v_cache, block_table, num_splits=0, *, overrides=None):
    """The :class:`~.plan.DecodePlan` of q (B, Sn, Hq, D) over these caches (cached by shapes;
    no device reads); see ``plan.plan_decode``."""
    return plan_decode(q, k_cache, v_cache, block_table, num_splits=num_splits, overrides=overrides)


def forward_kvcache(q, k_cache, v_cache, k_new, v_new, spec, *, cache_seqlens, block_table, num_splits, rotary=None,
                    cache_batch_idx=None, cache_leftpad=None, plan=None):
    """Backend contract (see ``tileattn.backends``): append k_new/v_new in place, then attend.

    q (B, Sn, Hq, D); caches (B, Smax, Hkv, D[v]) or paged (num_blocks, page_size, Hkv, D[v])
    with block_table int32 (B, max_blocks); k_new/v_new None or (B, Sn, Hkv, D[v]);
    cache_seqlens int32 (B,) on device. Query head h reads KV head h // (Hq // Hkv).
    rotary (cos, sin, interleaved), cache_batch_idx, cache_leftpad: the decode features, fused
    into the kernel (see ``decode.decode_attention``; None = off).
    ``plan``: a DecodePlan made for these shapes (reused across layers), else planned here.
    Returns out (B, Sn, Hq, Dv) in q.dtype and lse (B, Hq, Sn) float32.
    """
    if plan is None:
        plan = plan_decode(q, k_cache, v_cache, block_table, num_splits=num_splits)
    else:
        plan.check(q, v_cache)
    return decode_attention(q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, spec, plan=plan,
                            rotary=rotary, cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad)
