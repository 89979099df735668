"""Planning for every Triton launch: which kernel variant, tiles, warps, stages, loads and
split count a call uses, and why. ``tileattn.plan`` is the user-facing door to it.

Layout::

    configs.py   the Config record, the per-pass config tables with their reasons, the
                 thresholds (TMA, head grouping, decode splits and tiles), shared-memory models
    facts.py     Target (device facts), the environment knobs (read here only), Overrides,
                 alignment and the TMA rule (one function, a threshold per pass)
    forward.py   plan_forward -> ForwardPlan
    backward.py  plan_backward -> BackwardPlan (dQ and dK/dV configs, loads, head grouping)
    decode.py    plan_decode -> DecodePlan (split-KV launch shape + its split workspace)
    tune.py      the autotuner wrapper (TunedKernel) and kernel_for

Every planner takes the tensors (shapes, dtype, device, alignment), the call's ScoreSpec
where features matter, ``overrides=`` (an :class:`Overrides`) and ``target=`` (a
:class:`Target`, to plan as on another device). Plans are frozen and cached under the facts
they depend on (``spec.key()``, shapes, dtype, target, knobs, overrides); the caches are
``functools.lru_cache`` (thread-safe), so several threads may plan at once. Each plan has
``describe()``.
"""

from .backward import BackwardPlan, PassConfigs, head_group, plan_backward
from .configs import ROW_PAD, Config
from .decode import DecodePlan, choose_num_splits, plan_decode
from .facts import (Overrides, Target, bucket, cdiv, device_target, first_misaligned, head_block, next_pow2,
                    overrides, tma_rule)
from .forward import ForwardPlan, plan_forward
from .tune import TunedKernel, autotuner, kernel_for

from . import backward as _backward, decode as _decode, forward as _forward


def cache_clear() -> None:
    """Drop every cached plan (the next call of each planner plans afresh)."""
    _forward.cache_clear()
    _backward.cache_clear()
    _decode.cache_clear()


__all__ = ["BackwardPlan", "Config", "DecodePlan", "ForwardPlan", "Overrides", "PassConfigs", "ROW_PAD", "Target",
           "TunedKernel", "autotuner", "bucket", "cache_clear", "cdiv", "choose_num_splits", "device_target",
           "first_misaligned", "head_block", "head_group", "kernel_for", "next_pow2", "overrides", "plan_backward",
           "plan_decode", "plan_forward", "tma_rule"]
