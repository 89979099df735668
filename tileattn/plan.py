"""What a Triton call will run, and why: plans for the forward, the backward and decode.

``tileattn.plan`` is the door to the planner (``tileattn/backends/triton/plan/``); Triton is
imported on first use, not by ``import tileattn``::

    >>> print(tileattn.plan.describe(q, k, v, causal=True, backward=True))  # bf16 (2, 4096, 16, 128), H200
    tileattn forward plan: sm_90 (NVIDIA H200), torch.bfloat16, D=128 (block 128), Dv=128 (block 128)
      kernel: _fwd_kernel (dense): one program per BLOCK_M query rows of one (batch, query head), ...
      features: causal/window (-1, 0)
      loads: pointer loads: head-dim block 128 < 256 (...)
      configs (sm_90 list, autotuned once per Sq/Sk power-of-two bucket):
        BLOCK_M=128 BLOCK_N=64 warps=8 stages=3  -- Flex H100 bf16 D=128: two warpgroups share 128 rows, ...
    tileattn backward plan: ...
      dQ (...)  configs, head grouping;  dK/dV (...)  configs, head grouping
    >>> print(tileattn.plan.describe_kvcache(q[:, :1], k_cache, v_cache, causal=True))
    tileattn decode plan: ... splits, key tile, warps, stages, each with its reason

Forcing a choice (tests, benchmarks, probes) is an argument, not a patched table::

    with tileattn.plan.overrides(forward=[Config(64, 32, 4, 2)], dq=[...], dkdv=[...],
                                 use_tma=False, autotune=False, decode_block_n=64,
                                 decode_num_splits=4, decode_num_stages=4):
        tileattn.attention(...)          # every call in the block (any thread) plans with them

or ``overrides=Overrides(...)`` on :func:`forward_plan` / :func:`backward_plan` /
:func:`kvcache_plan`. A :func:`kvcache_plan` result is reusable across the layers of a decode
step and owns its split workspace (``tileattn.backends.triton.forward_kvcache(..., plan=)``).
Asking before running (no GPU needed; ``tileattn plan`` prints the same)::

    r = tileattn.plan.estimate(2, 4096, 4096, 16, 16, 128, dtype=torch.bfloat16, causal=True,
                               backward=True, preset="h200")   # -> PlanReport
    r.blocks, r.sram_bytes, r.hbm_bytes, r.memory_saved_bytes, r.flops, r.predicted_s

Environment knobs (``TILEATTN_TMA``, ``TILEATTN_AUTOTUNE``, ``TILEATTN_DECODE_BLOCK_N``) still
work for whole-process runs; overrides win over them.
"""

import importlib

from .roofline import PRESETS, PlanReport, estimate
from .score import ScoreSpec

_PACKAGE = "tileattn.backends.triton.plan"


def _planner():
    """The planning package (imports Triton on first use)."""
    return importlib.import_module(_PACKAGE)


def _spec(head_dim, *, causal=False, window=(-1, -1), scale=None, softcap=0.0, alibi_slopes=None, sinks=None,
          attn_mask=None, dropout_p=0.0):
    return ScoreSpec.build(head_dim, causal=causal, scale=scale, window=window, softcap=softcap,
                           alibi_slopes=alibi_slopes, sinks=sinks, attn_mask=attn_mask, dropout_p=dropout_p)


def _overrides(overrides, **fields):
    fields = {k: v for k, v in fields.items() if v is not None}
    if not fields:
        return overrides
    extra = _planner().Overrides(**fields)
    return extra if overrides is None else overrides.merged(extra)


def forward_plan(q, k, v, *, varlen=False, configs=None, use_tma=None, overrides=None, target=None, **features):
    """The ForwardPlan of ``tileattn.attention(q, k, v, **features)`` (features: causal, window,
    scale, softcap, alibi_slopes, sinks, attn_mask, dropout_p). ``configs`` / ``use_tma`` force
    the configs and the tile loads (shorthand for ``overrides``)."""
    spec = _spec(q.shape[-1], **features)
    return _planner().plan_forward(q, k, v, spec, varlen=varlen, target=target,
                                   overrides=_overrides(overrides, forward=configs, use_tma=use_tma))


def backward_plan(q, k, v, dout=None, *, max_seqlen_q=None, max_seqlen_k=None, varlen=False, dq_configs=None,
                  dkdv_configs=None, use_tma=None, overrides=None, target=None, **features):
    """The BackwardPlan of the same call's backward. ``dout`` (only its alignment matters)
    defaults to a tensor laid out like q (like v when Dv != D); the lengths default to the
    dense Sq/Sk and are required for varlen."""
    if dout is None:
        dout = q if q.shape[-1] == v.shape[-1] else v
    if not varlen:
        max_seqlen_q = q.shape[1] if max_seqlen_q is None else max_seqlen_q
        max_seqlen_k = k.shape[1] if max_seqlen_k is None else max_seqlen_k
    elif max_seqlen_q is None or max_seqlen_k is None:
        raise ValueError("tileattn: backward_plan(varlen=True) needs max_seqlen_q and max_seqlen_k")
    spec = _spec(q.shape[-1], **features)
    return _planner().plan_backward(q, k, v, dout, spec, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                                    varlen=varlen, target=target,
                                    overrides=_overrides(overrides, dq=dq_configs, dkdv=dkdv_configs, use_tma=use_tma))


def kvcache_plan(q, k_cache, v_cache, block_table=None, *, num_splits=0, overrides=None, target=None, **decode):
    """The DecodePlan of ``tileattn.attention_with_kvcache(q, k_cache, v_cache, ...)`` from shapes
    only (no device reads): reusable across layers and CUDA-graph replays. ``decode``: block_n,
    num_warps, num_stages overrides (``decode_`` fields of :class:`Overrides`)."""
    extra = {f"decode_{name}": value for name, value in decode.items()}
    return _planner().plan_decode(q, k_cache, v_cache, block_table, num_splits=num_splits, target=target,
                                  overrides=_overrides(overrides, **extra))


def describe(q, k, v, *, backward=False, varlen=False, max_seqlen_q=None, max_seqlen_k=None, target=None,
             **features) -> str:
    """Text of the forward plan (and with ``backward=True`` the backward's dQ and dK/dV plans)
    for ``tileattn.attention(q, k, v, **features)``: kernel variant, loads, configs, head
    grouping, and the reason for each."""
    spec = _spec(q.shape[-1], **features)
    text = forward_plan(q, k, v, varlen=varlen, target=target, **features).describe(spec)
    if backward:
        bplan = backward_plan(q, k, v, varlen=varlen, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                              target=target, **features)
        shape = None if varlen else (q.shape[0], q.shape[2], k.shape[2], max_seqlen_q or q.shape[1],
                                     max_seqlen_k or k.shape[1])
        text += "\n" + bplan.describe(spec, shape)
    return text


def describe_kvcache(q, k_cache, v_cache, block_table=None, *, num_splits=0, target=None, **features) -> str:
    """Text of the decode plan of ``tileattn.attention_with_kvcache(q, k_cache, v_cache, ...)``."""
    spec = _spec(q.shape[-1], **features)
    return kvcache_plan(q, k_cache, v_cache, block_table, num_splits=num_splits, target=target).describe(spec)


def overrides(**fields):
    """Context manager forcing planner choices for every call in the block (see the module
    docstring and ``Overrides``)."""
    return _planner().overrides(**fields)


# names served by the planning package on first use (Triton imported then)
_FORWARDED = ("Config", "Overrides", "Target", "ForwardPlan", "BackwardPlan", "DecodePlan", "TunedKernel",
              "autotuner", "bucket", "cdiv", "head_block", "next_pow2", "device_target", "cache_clear")
def __getattr__(name):
    if name in _FORWARDED:
        return getattr(_planner(), name)
    raise AttributeError(f"module 'tileattn.plan' has no attribute {name!r}")


__all__ = ["PRESETS", "PlanReport", "backward_plan", "describe", "describe_kvcache", "estimate", "forward_plan",
           "kvcache_plan", "overrides",
           *_FORWARDED]
