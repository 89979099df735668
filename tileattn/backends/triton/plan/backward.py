"""Backward plan: the dQ and dK/dV kernels' configs, their tile loads and head grouping.

The dQ kernel (BLOCK_M query rows per program, BLOCK_N keys per step; it also writes lse2 and
delta = rowsum(out * dout)) runs first, then dK/dV (BLOCK_N keys per program, BLOCK_M rows per
step). Choices:

1. Configs: ``configs.DQ`` / ``configs.DKDV`` by (target, dtype width, head-dim block); only the
   first entry when the bucketed Sq * Sk is below ``BWD_TUNE_MIN_WORK`` (launch-bound calls)
   or autotuning is off, else timed once per tuning key.
2. Loads: :func:`~.facts.tma_rule` with the backward's threshold, the longer of the (maximum)
   query and key lengths at least ``BWD_TMA_MIN_SEQLEN``; q, k, v, dout aligned.
3. Head grouping (:func:`head_group`): causal-like calls launch a group of heads' long
   programs first when the group's re-read tiles fit in ``L2_SHARE``.
"""

import functools
import os
from dataclasses import dataclass

from . import configs as C
from .facts import (Overrides, active, bucket, device_target, first_misaligned, head_block, knob_autotune, knob_tma,
                    tma_rule)
from .forward import FLAG_NAMES, KernelPlan, flag_text, gluon_rule, table_configs

_HAS_RIGHT = FLAG_NAMES.index("HAS_RIGHT")


def head_group(uneven: bool, rows: int, row_bytes: int, num_bh: int) -> int:
    """Heads per scheduling group (backward_kernels' ``_block_and_head``): 1 (head-major)
    unless the programs' work is ``uneven`` (a right window edge, as causal), else the largest
    power of two <= num_bh whose ``rows`` x ``row_bytes`` re-read tiles fit in L2_SHARE
    (1 if below MIN_HEAD_GROUP)."""
    fit = min(C.L2_SHARE // max(1, rows * row_bytes), num_bh)
    if not uneven or fit < C.MIN_HEAD_GROUP:
        return 1
    return 1 << (fit.bit_length() - 1)


@dataclass(frozen=True)
class PassConfigs:
    """One backward kernel's candidate configs: several are autotuned, one is launched as is."""

    configs: tuple
    why: str

    @property
    def autotune(self) -> bool:
        return len(self.configs) > 1


@dataclass(frozen=True)
class BackwardPlan(KernelPlan):
    """What the backward launcher needs besides the tensors and lengths."""

    dq: PassConfigs
    dkdv: PassConfigs
    kernel: str = "tl"  # "gluon": the fused sm_90 kernel (gluon/backward_sm90.py) runs unless deterministic
    kernel_why: str = ""

    def head_groups(self, batch, hq, hkv, max_seqlen_q, max_seqlen_k) -> tuple:
        """(dQ, dK/dV) heads per scheduling group: dQ programs re-read k/v of max_seqlen_k keys,
        dK/dV programs q/dout of max_seqlen_q rows for each of the G query heads."""
        uneven = bool(self.spec_key[_HAS_RIGHT])
        row_bytes = (self.head_dim + self.head_dim_v) * self.dtype.itemsize
        return (head_group(uneven, max_seqlen_k, row_bytes, batch * hq),
                head_group(uneven, max_seqlen_q * (hq // hkv), row_bytes, batch * hkv))

    def describe(self, spec=None, shape=None) -> str:
        """``shape`` = (batch, hq, hkv, max_seqlen_q, max_seqlen_k) adds the head grouping."""
        groups = self.head_groups(*shape) if shape is not None else None
        if self.kernel == "gluon":
            kernel = ("gluon bwd_kernel (FA3 design: one pass per 128 keys, two 64-key wgmma consumer warpgroups, "
                      "TMA loader warp, dQ by fp32 atomics); deterministic=True, and causal calls whose inputs "
                      "hold non-finite values, run the tl kernels below")
        else:
            kernel = f"tl kernels below ({self.kernel_why})"
        lines = [f"{self.header('backward')}, {'varlen' if self.varlen else 'dense'}", f"  kernel: {kernel}",
                 f"  features: {flag_text(self.spec_key, spec)}",
                 f"  loads (inner-loop tiles of both kernels): {self.loads_why}"]
        for i, (name, what, p) in enumerate((
                ("dQ", "_bwd_dq_kernel: BLOCK_M query rows per program, BLOCK_N keys per step; writes lse2, delta",
                 self.dq),
                ("dK/dV", "_bwd_dkdv_kernel: BLOCK_N keys per program, BLOCK_M query rows per step", self.dkdv))):
            lines.append(f"  {name} ({what})")
            lines.append(f"    configs ({p.why}):")
            lines += [f"      {c}  -- {c.why or 'given by the caller'}" for c in p.configs]
            if groups is not None:
                g = groups[i]
                lines.append(f"    head grouping: {g} head(s) per group" + (
                    " (head-major: even work per program, or the group's tiles exceed the L2 share)" if g == 1 else
                    f" (causal-like: long programs of {g} heads first, their tiles fit {C.L2_SHARE >> 20} MB of L2)"))
        return "\n".join(lines)


def gluon_bwd_rule(q, k, v, spec, varlen, ov, target):
    """(run the Gluon fused backward?, why not): ``TILEATTN_GLUON_BWD=1`` (off by default until
    verified on the H200) and the forward's :func:`~.forward.gluon_rule` (dense 16-bit, D == Dv
    in {64, 128}, plain or causal, positive scale, sm_90, no forced configs or loads)."""
    if os.environ.get("TILEATTN_GLUON_BWD") != "1":
        return False, "TILEATTN_GLUON_BWD=1 not set: the Gluon fused backward is off by default"
    return gluon_rule(q, k, v, spec, varlen, ov, target)


def plan_backward(q, k, v, dout, spec, *, max_seqlen_q, max_seqlen_k, varlen=False,
                  overrides: Overrides = None, target=None) -> BackwardPlan:
    """Plan the Triton backward of ``spec`` over these tensors (lengths: the dense Sq/Sk or the
    varlen maxima). ``overrides``: ``dq``/``dkdv`` configs, ``use_tma``, ``autotune``; ``target``
    as in :func:`~.forward.plan_forward`. Cached like the forward plan, lengths reduced to the two
    facts they decide (tuning worthwhile, TMA threshold reached)."""
    target = target or device_target(q)
    ov = active(overrides)
    tma_env = knob_tma()
    long = max(max_seqlen_q, max_seqlen_k) >= C.BWD_TMA_MIN_SEQLEN
    misaligned = None
    if ov.use_tma is None and tma_rule(target.name, q.dtype, tma_env, (long, ""))[0]:
        misaligned = first_misaligned({"q": q, "k": k, "v": v, "dout": dout}, {"q": q.shape[-1], "v": v.shape[-1]})
    small = bucket(max_seqlen_q) * bucket(max_seqlen_k) < C.BWD_TUNE_MIN_WORK
    return _plan(target, q.dtype, q.shape[-1], v.shape[-1], spec.key(), bool(varlen), small, long, tma_env,
                 misaligned, knob_autotune(), ov, gluon_bwd_rule(q, k, v, spec, varlen, ov, target))


def _pass_configs(name, table, forced, target, dtype, block_d, block_dv, small, autotune_env, ov) -> PassConfigs:
    if forced is not None:
        if any(C.ROW_PAD % c.block_m for c in forced):
            raise ValueError(f"tileattn: {name} configs need BLOCK_M dividing {C.ROW_PAD}, got {forced}")
        return PassConfigs(forced, "forced by caller" + (", autotuned" if len(forced) > 1 else ""))
    configs = table_configs(table, target.name, dtype, block_d, block_dv)
    why = f"{target.name} list"
    if len(configs) > 1:
        if not autotune_env or ov.autotune is False:
            configs, why = configs[:1], why + ", first entry only (autotuning off)"
        elif small:
            configs, why = configs[:1], why + ", first entry only (bucketed Sq * Sk < 512 * 512: launch-bound)"
        else:
            why += ", autotuned once per Sq/Sk power-of-two bucket"
    return PassConfigs(configs, why)


@functools.lru_cache(maxsize=1024)
def _plan(target, dtype, head_dim, head_dim_v, spec_key, varlen, small, long, tma_env, misaligned, autotune_env,
          ov, gluon) -> BackwardPlan:
    block_d, block_dv = head_block(head_dim), head_block(head_dim_v)
    if ov.use_tma is None:
        gate = (long, f"longest sequence < {C.BWD_TMA_MIN_SEQLEN} (per-program descriptor setup outweighs TMA)")
        use_tma, loads_why = tma_rule(target.name, dtype, tma_env, gate, misaligned)
    else:
        use_tma = ov.use_tma
        loads_why = f"{'TMA tensor descriptors' if use_tma else 'pointer loads'} (forced by caller)"
    facts = (target, dtype, block_d, block_dv, small, autotune_env, ov)
    return BackwardPlan(target.name, target.desc, dtype, head_dim, head_dim_v, block_d, block_dv, spec_key, varlen,
                        bool(use_tma), loads_why, _pass_configs("dq", C.DQ, ov.dq, *facts),
                        _pass_configs("dkdv", C.DKDV, ov.dkdv, *facts), "gluon" if gluon[0] else "tl", gluon[1])


cache_clear = _plan.cache_clear
