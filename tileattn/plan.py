"""Kernel planning: which Triton forward variant, blocks, warps and stages a call uses, and why.

``plan.describe(q, k, v, causal=True)`` answers "what will run" without running it::

    >>> print(tileattn.plan.describe(q, k, v, causal=True))   # q, k, v bf16 (2, 4096, 16, 128) on an H100
    tileattn forward plan: sm_90 (NVIDIA H100 80GB HBM3), torch.bfloat16, D=128 (block 128), Dv=128 (block 128)
      features: causal/window (right=0)
      loads: TMA tensor descriptors: sm_90, 16-bit dtype, 16-byte aligned pointers and strides
      ...

Choices, in order:

1. Target: the Triton interpreter (CPU tensors, ``TRITON_INTERPRET=1``), sm_90 (Hopper), other CUDA.
2. Head-dim blocks: next power of two >= 16 (tl.dot needs K >= 16); 80 -> 128, 192 -> 256, with
   masked (or TMA zero-filled) columns, so any D <= 256 runs.
3. Loads: TMA tensor descriptors (``tl.make_tensor_descriptor``) on sm_90+ for fp16/bf16 when every
   pointer and non-unit stride is 16-byte aligned (TMA's rule); pointer loads otherwise.
4. Blocks: a short list per (target, dtype class, head-dim block) in ``_CONFIGS``, each entry
   with its reason; on CUDA the launcher times the list once per (features, seqlen bucket)
   (``triton.autotune``, key = power-of-two buckets of max Sq and Sk) after ``_prune`` dropped
   configs that cannot fit or cannot help. One config means no timing.

Environment knobs (for measuring, not for users): ``TILEATTN_AUTOTUNE=0`` uses each list's first
(default) entry; ``TILEATTN_TMA=0`` forces pointer loads; ``TILEATTN_WARP_SPECIALIZE=1`` turns on
``tl.range(..., warp_specialize=True)`` on the TMA path (off by default until measured).
"""

import os
from dataclasses import dataclass, field

import torch
import triton


@dataclass(frozen=True)
class FwdConfig:
    """One launch configuration of the forward kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    why: str = field(default="", compare=False)

    def __str__(self):
        return f"BLOCK_M={self.block_m} BLOCK_N={self.block_n} warps={self.num_warps} stages={self.num_stages}"


_C = FwdConfig
# (target, "16" | "32" bit dtype, head-dim block) -> configs, default first.
_CONFIGS = {
    ("sm_90", "16", 64): (
        _C(128, 128, 4, 3, "Flex/tutorial H100 choice for D=64: 128x128 tile, one warpgroup"),
        _C(128, 64, 4, 4, "smaller key tile, deeper pipeline"),
    ),
    ("sm_90", "16", 128): (
        _C(128, 64, 8, 3, "Flex H100 bf16 D=128: two warpgroups share the 128 rows"),
        _C(128, 128, 8, 3, "Flex H100 fp16 D=128: larger key tile, fewer softmax rescales"),
        _C(128, 64, 4, 3, "one warpgroup: fewer registers for acc, more CTAs per SM"),
    ),
    ("sm_90", "16", 256): (
        _C(64, 64, 4, 2, "D=256: acc 64x256 fp32 fits one warpgroup's registers"),
        _C(128, 64, 8, 2, "two warpgroups, 128 rows: halves K/V re-reads"),
        _C(64, 32, 4, 3, "Flex H100 D=256 choice"),
    ),
    ("cuda", "16", 64): (_C(128, 64, 4, 3, "Ampere-class default (Flex A100 D=64)"),),
    ("cuda", "16", 128): (_C(128, 64, 8, 3, "Ampere-class default (Flex A100 D=128)"),
                          _C(64, 64, 4, 3, "fewer registers per CTA")),
    ("cuda", "16", 256): (_C(64, 32, 4, 2, "D=256: small tiles to fit registers and shared memory"),),
    ("cuda", "32", 64): (_C(64, 32, 4, 2, "fp32 with ieee dots runs on FMA units: small tiles"),),
    ("cuda", "32", 128): (_C(32, 32, 4, 2, "fp32 with ieee dots runs on FMA units: small tiles"),),
    ("cuda", "32", 256): (_C(32, 16, 4, 2, "fp32, D=256: the smallest tile tl.dot allows in N"),),
    ("interpreter", "16", 0): (_C(64, 32, 4, 1, "interpreter: few programs, several key tiles on short tests"),),
    ("interpreter", "32", 0): (_C(64, 32, 4, 1, "interpreter: few programs, several key tiles on short tests"),),
}


def bucket(n: int) -> int:
    """Autotune key of a sequence length: next power of two, at least 16."""
    return max(16, triton.next_power_of_2(max(int(n), 1)))


def _head_block(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _target(t: torch.Tensor):
    if t.device.type != "cuda":
        return "interpreter", "Triton interpreter (TRITON_INTERPRET=1) on CPU tensors"
    major, minor = torch.cuda.get_device_capability(t.device)
    name = torch.cuda.get_device_name(t.device)
    return ("sm_90" if major >= 9 else "cuda"), f"sm_{major}{minor} ({name})"


def _tma_ok(target, q, k, v, head_dim_v):
    """(bool, reason): TMA descriptors need sm_90+, 16-bit data, 16-byte aligned pointers/strides."""
    env = os.environ.get("TILEATTN_TMA")
    if env == "0":
        return False, "pointer loads: TILEATTN_TMA=0"
    if target != "sm_90":
        return False, "pointer loads: TMA needs sm_90+ (the interpreter runs it only when forced)"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return False, "pointer loads: fp32 path (ieee dots on FMA units gain nothing from TMA)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        es = t.element_size()
        if t.numel() == 0 or t.data_ptr() % 16 or any(s * es % 16 for s in t.stride()[:-1]):
            return False, f"pointer loads: {name} pointer or strides {tuple(t.stride())} not 16-byte aligned"
    if head_dim_v * q.element_size() % 16:
        return False, "pointer loads: output rows (Dv) not 16-byte aligned"
    return True, "TMA tensor descriptors: sm_90, 16-bit dtype, 16-byte aligned pointers and strides"


def _smem_bytes(cfg, block_d, block_dv, es):
    """Shared memory of the q tile plus num_stages buffered K and V tiles."""
    return es * (cfg.block_m * block_d + max(cfg.num_stages, 1) * cfg.block_n * (block_d + block_dv))


@dataclass(frozen=True)
class FwdPlan:
    """Everything the launcher needs besides the tensors: variant flags and candidate configs."""

    target: str
    device: str
    dtype: torch.dtype
    head_dim: int
    head_dim_v: int
    block_d: int
    block_dv: int
    features: tuple
    use_tma: bool
    loads_why: str
    warp_specialize: bool
    configs: tuple
    autotune: bool

    def launch_kwargs(self) -> dict:
        """Meta-parameters for a direct launch; empty when the autotuner supplies them."""
        if self.autotune:
            return {}
        c = self.configs[0]
        return dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages)

    def describe(self) -> str:
        lines = [f"tileattn forward plan: {self.device}, {self.dtype}, D={self.head_dim} (block {self.block_d}), "
                 f"Dv={self.head_dim_v} (block {self.block_dv})",
                 f"  features: {', '.join(self.features) or 'plain'}",
                 f"  loads: {self.loads_why}",
                 f"  warp specialization: {'on' if self.warp_specialize else 'off'}",
                 "  configs (" + ("autotuned once per Sq/Sk power-of-two bucket" if self.autotune else "fixed") + "):"]
        lines += [f"    {c}  -- {c.why}" for c in self.configs]
        return "\n".join(lines)


def forward_plan(q, k, v, *, window=(-1, -1), softcap=0.0, alibi_slopes=None, sinks=None, attn_mask=None,
                 dropout_p=0.0, varlen=False, configs=None, use_tma=None) -> FwdPlan:
    """Plan the Triton forward for these tensors and (normalized) features.

    ``configs`` / ``use_tma`` override the choice (tests force TMA in the interpreter and tiny
    blocks); everything else follows the module docstring.
    """
    target, device = _target(q)
    block_d, block_dv = _head_block(q.shape[-1]), _head_block(v.shape[-1])
    features = tuple(name for name, on in (
        ("varlen", varlen), (f"causal/window {tuple(window)}", tuple(window) != (-1, -1)),
        ("softcap", softcap > 0), ("alibi", alibi_slopes is not None), ("sinks", sinks is not None),
        (f"{'bool' if attn_mask is not None and attn_mask.dtype == torch.bool else 'float'} mask",
         attn_mask is not None), ("dropout", dropout_p > 0)) if on)
    if use_tma is None:
        use_tma, loads_why = _tma_ok(target, q, k, v, v.shape[-1])
    else:
        loads_why = f"{'TMA tensor descriptors' if use_tma else 'pointer loads'} (forced by caller)"
    width = "32" if q.dtype == torch.float32 else "16"
    if configs is None:
        dkey = 0 if target == "interpreter" else max(64, max(block_d, block_dv))
        configs = _CONFIGS[(target, width, dkey)]
        if os.environ.get("TILEATTN_AUTOTUNE") == "0":
            configs = configs[:1]
    warp_spec = use_tma and target == "sm_90" and os.environ.get("TILEATTN_WARP_SPECIALIZE") == "1"
    return FwdPlan(target, device, q.dtype, q.shape[-1], v.shape[-1], block_d, block_dv, features,
                   bool(use_tma), loads_why, warp_spec, tuple(configs), target != "interpreter" and len(configs) > 1)


def describe(q, k, v, *, causal=False, window=(-1, -1), **features) -> str:
    """Human-readable forward plan for ``tileattn.attention(q, k, v, ...)`` arguments."""
    if causal:
        window = (window[0], 0)
    return forward_plan(q, k, v, window=window, **features).describe()


def _prune(configs, named_args, **kwargs):
    """Autotune ``early_config_prune``: drop configs that cannot fit or cannot help, keep >= 1.

    - shared memory: q tile + num_stages K/V tiles above the device's per-block limit fail to launch;
    - BLOCK_M above the (bucketed) query length computes only padding rows.
    """
    q, v = named_args["Q"], named_args["V"]
    es = q.element_size()
    limit = triton.runtime.driver.active.utils.get_device_properties(q.device.index)["max_shared_mem"]
    bd, bdv = kwargs["BLOCK_D"], kwargs["BLOCK_DV"]
    sq = named_args["tune_sq"]
    kept = [c for c in configs
            if _smem_bytes(FwdConfig(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages),
                           bd, bdv, es) <= limit and c.kwargs["BLOCK_M"] <= max(sq, 64)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


_TUNED = {}


def forward_kernel(kernel, fplan: FwdPlan):
    """The kernel to launch: ``kernel`` itself, or a cached autotuner over the plan's configs."""
    if not fplan.autotune:
        return kernel
    key = (fplan.configs, fplan.features, fplan.block_d, fplan.block_dv, fplan.use_tma, fplan.warp_specialize)
    if key not in _TUNED:
        cfgs = [triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n}, num_warps=c.num_warps,
                              num_stages=c.num_stages) for c in fplan.configs]
        _TUNED[key] = triton.autotune(cfgs, key=["tune_sq", "tune_sk"],
                                      prune_configs_by={"early_config_prune": _prune})(kernel)
    return _TUNED[key]
