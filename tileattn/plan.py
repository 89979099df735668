"""Kernel planning: which Triton forward variant, blocks, warps and stages a call uses, and why.

``plan.describe(q, k, v, causal=True)`` answers "what will run" without running it::

    >>> print(tileattn.plan.describe(q, k, v, causal=True))   # bf16 (2, 4096, 16, 128) on an H100
    tileattn forward plan: sm_90 (NVIDIA H100 80GB HBM3), torch.bfloat16, D=128 (block 128), Dv=128 (block 128)
      features: causal/window (-1, 0)
      loads: pointer loads: head dims <= 128 (H200: as fast as TMA at 16k keys, ...)
      configs (autotuned once per Sq/Sk power-of-two bucket):
        BLOCK_M=128 BLOCK_N=64 warps=8 stages=3  -- Flex H100 bf16 D=128: two warpgroups share 128 rows, ...
        ...

Choices, in order:

1. Target: the Triton interpreter (CPU tensors, ``TRITON_INTERPRET=1``), sm_90 (Hopper), other CUDA.
2. Head-dim blocks: next power of two >= 16 (tl.dot needs K >= 16); 80 -> 128, 192 -> 256, with
   masked (or TMA zero-filled) columns, so any D <= 256 runs.
3. Loads: TMA tensor descriptors (``tl.make_tensor_descriptor``, built per program) on sm_90+ for
   fp16/bf16 with a head-dim block of 256 when every pointer and non-unit stride is 16-byte
   aligned (TMA's rule); pointer loads otherwise. Measured on the H200 (bf16 forward, same run):
   D=256 TMA 285-536 TFLOP/s vs pointers 262-453; D=64/128 pointers equal TMA at 16k keys and
   beat it at 1k keys (D=128 causal 301 vs 271, D=64 372 vs 329), where the per-program
   descriptor setup shows.
4. Blocks: a short list per (target, dtype class, head-dim block) in ``_CONFIGS``, each entry
   with its reason; on CUDA the launcher times the list once per (features, seqlen bucket)
   (``triton.autotune``, key = power-of-two buckets of max Sq and Sk) after :func:`autotuner`'s
   prune dropped configs that cannot fit or cannot help. One config means no timing.

Environment knobs (for measuring, not for users): ``TILEATTN_AUTOTUNE=0`` uses each list's first
(default) entry; ``TILEATTN_TMA=0`` forces pointer loads, ``TILEATTN_TMA=1`` TMA wherever it can
run (any head dim).

Not used: ``tl.range(..., warp_specialize=True)``. With triton 3.6 on sm_90 it only tags the loop
(the compiled TTGIR has no warp-specialized partitions), so it changes nothing on Hopper; real
producer/consumer warpgroups there need Gluon.
"""

import functools
import math
import os
from dataclasses import dataclass, field
from itertools import repeat

import torch
import triton
from triton.runtime import KernelInterface


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
# (target, "16" | "32" bit dtype, head-dim block) -> configs, default first. sm_90 entries were
# compiled for sm_90 with triton 3.6 (cuobjdump): all use HGMMA, none spills registers.
_CONFIGS = {
    ("sm_90", "16", 64): (
        _C(128, 64, 4, 3, "one warpgroup, 189-252 regs and 66 KB smem: two CTAs per SM"),
        _C(128, 128, 8, 3, "Flex/tutorial-sized 128x128 tile on two warpgroups"),
        _C(128, 64, 4, 4, "deeper K/V pipeline"),
    ),
    ("sm_90", "16", 128): (
        _C(128, 64, 8, 3, "Flex H100 bf16 D=128: two warpgroups share 128 rows, 148-167 regs"),
        _C(128, 128, 8, 3, "Flex H100 fp16 D=128: fewer softmax rescales, 225 KB smem, 190-255 regs"),
        _C(64, 64, 4, 3, "one warpgroup, 64 rows: short or ragged queries, more CTAs"),
    ),
    ("sm_90", "16", 256): (
        _C(64, 64, 4, 2, "D=256: acc 64x256 fp32 in one warpgroup, 161 KB smem"),
        _C(128, 64, 8, 2, "two warpgroups, 128 rows: halves K/V re-reads, 192 KB smem"),
        _C(64, 32, 4, 3, "Flex H100 D=256 choice"),
    ),
    ("cuda", "16", 64): (_C(128, 64, 4, 3, "Ampere-class default (Flex A100 D=64)"),),
    ("cuda", "16", 128): (_C(128, 64, 8, 3, "Ampere-class default (Flex A100 D=128)"),
                          _C(64, 64, 4, 3, "fewer registers per CTA")),
    ("cuda", "16", 256): (_C(64, 32, 4, 2, "D=256: small tiles to fit registers and shared memory"),),
    # fp32 uses ieee dots, i.e. FMA units: larger tiles spill (32x32 at D=128: 904 B of stack).
    ("cuda", "32", 64): (_C(32, 16, 4, 2, "fp32 ieee dots on FMA units: 80 regs, no spills"),),
    ("cuda", "32", 128): (_C(32, 16, 4, 2, "fp32 ieee dots on FMA units: 148 regs, no spills"),),
    ("cuda", "32", 256): (_C(16, 16, 4, 2, "fp32, D=256: 186 regs, no spills"),),
    ("interpreter", "16", 0): (_C(64, 32, 4, 1, "interpreter: few programs, several key tiles on short tests"),),
    ("interpreter", "32", 0): (_C(64, 32, 4, 1, "interpreter: few programs, several key tiles on short tests"),),
}
for _d in (64, 128, 256):
    _CONFIGS[("sm_90", "32", _d)] = _CONFIGS[("cuda", "32", _d)]
# attn_mask tiles (one pointer and value per score) and the full feature set spill at BLOCK_N=64
# (56-280 B of stack at D=64/128); BLOCK_N=32 compiles spill-free.
_MASK_CONFIGS = {
    64: (_C(128, 32, 8, 3, "attn_mask at D<=64: 128x32 on two warpgroups, 157-198 regs, no spills"),
         _C(128, 32, 4, 3, "attn_mask, one warpgroup: 232-255 regs, no spills")),
    128: (_C(128, 32, 8, 3, "attn_mask at D=128: 188-255 regs, no spills (128x64 spills)"),
          _C(64, 32, 4, 3, "attn_mask, one warpgroup: 185-253 regs, no spills")),
}


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1): ``triton.next_power_of_2`` without the cost of calling
    a Triton constexpr function (~1 us each) on the launchers' hot paths."""
    return 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints: ``triton.cdiv`` without the cost of calling a constexpr function."""
    return (a + b - 1) // b


def bucket(n: int) -> int:
    """Autotune key of a sequence length: next power of two, at least 16."""
    return max(16, next_pow2(max(int(n), 1)))


def head_block(d: int) -> int:
    """Kernel block width of a head dim: next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, next_pow2(d))


def device_target(t: torch.Tensor):
    """(target, description) for tensors like ``t``: "interpreter", "sm_90" (Hopper+) or "cuda"."""
    if t.device.type != "cuda":
        return "interpreter", "Triton interpreter (TRITON_INTERPRET=1) on CPU tensors"
    return _cuda_target(t.device)


@functools.lru_cache(maxsize=None)
def _cuda_target(device: torch.device):
    """Device queries once per device, not on every call's hot path."""
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    return ("sm_90" if major >= 9 else "cuda"), f"sm_{major}{minor} ({name})"


_TMA_DTYPES = (torch.float16, torch.bfloat16)


def first_misaligned(**tensors):
    """(name, strides) of the first named tensor that TMA cannot read (empty, or a pointer or a
    non-unit stride not 16-byte aligned), else None. Shared by the forward plan and the backward."""
    for name, t in tensors.items():
        strides = t.stride()
        # every stride s has s * elt_size % 16 == 0 exactly when their gcd does
        if t.numel() == 0 or t.data_ptr() % 16 or math.gcd(*strides[:-1]) * t.element_size() % 16:
            return name, strides
    return None


def _tma_ok(target, dtype, misaligned, head_dim, head_dim_v, env):
    """(bool, reason): TMA descriptors need sm_90+, 16-bit data, 16-byte aligned pointers/strides.

    misaligned: :func:`first_misaligned` of q, k, v (only looked at on sm_90 for 16-bit data);
    env: the ``TILEATTN_TMA`` value (or None).
    """
    if env == "0":
        return False, "pointer loads: TILEATTN_TMA=0"
    if target != "sm_90":
        return False, "pointer loads: TMA needs sm_90+ (the interpreter runs it only when forced)"
    if dtype not in _TMA_DTYPES:
        return False, "pointer loads: fp32 path (ieee dots on FMA units gain nothing from TMA)"
    if misaligned is not None:
        return False, f"pointer loads: {misaligned[0]} pointer or strides {misaligned[1]} not 16-byte aligned"
    if head_dim_v * dtype.itemsize % 16:
        return False, "pointer loads: output rows (Dv) not 16-byte aligned"
    if env != "1" and max(head_block(head_dim), head_block(head_dim_v)) < 256:
        return False, ("pointer loads: head dims <= 128 (H200: as fast as TMA at 16k keys, faster at 1k "
                       "where per-program descriptor setup shows: 2-13%, D=64 causal 263 vs 140 TFLOP/s)")
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
                 "  configs (" + ("autotuned once per Sq/Sk power-of-two bucket" if self.autotune else "fixed") + "):"]
        lines += [f"    {c}  -- {c.why}" for c in self.configs]
        return "\n".join(lines)


def forward_plan(q, k, v, *, window=(-1, -1), softcap=0.0, alibi_slopes=None, sinks=None, attn_mask=None,
                 dropout_p=0.0, varlen=False, configs=None, use_tma=None) -> FwdPlan:
    """Plan the Triton forward for these tensors and (normalized) features.

    ``configs`` / ``use_tma`` override the choice (tests force TMA in the interpreter and tiny
    blocks); everything else follows the module docstring. Plans are cached under the facts they
    depend on (see :func:`_make_plan`), read afresh on every call: device, dtype, head dims, which
    features are on, pointer/stride alignment, and the TILEATTN_TMA / TILEATTN_AUTOTUNE values.
    """
    target, device = device_target(q)
    mask = None if attn_mask is None else ("bool" if attn_mask.dtype == torch.bool else "float")
    flags = (varlen, tuple(window), softcap > 0, alibi_slopes is not None, sinks is not None, mask, dropout_p > 0)
    tma_env = os.environ.get("TILEATTN_TMA")
    # alignment decides only on sm_90 for 16-bit data (see _tma_ok); elsewhere skip reading it
    misaligned = None
    if use_tma is None and tma_env != "0" and target == "sm_90" and q.dtype in _TMA_DTYPES:
        misaligned = first_misaligned(q=q, k=k, v=v)
    return _make_plan(target, device, q.dtype, q.shape[-1], v.shape[-1], flags, tma_env, misaligned,
                      os.environ.get("TILEATTN_AUTOTUNE"), None if configs is None else tuple(configs), use_tma)


@functools.lru_cache(maxsize=1024)
def _make_plan(target, device, dtype, head_dim, head_dim_v, flags, tma_env, misaligned, autotune_env, configs,
               use_tma) -> FwdPlan:
    """:func:`forward_plan` from hashable facts; flags = (varlen, window, softcap, alibi, sinks,
    mask kind None / "bool" / "float", dropout)."""
    varlen, window, softcap, alibi, sinks, mask, dropout = flags
    block_d, block_dv = head_block(head_dim), head_block(head_dim_v)
    features = tuple(name for name, on in (
        ("varlen", varlen), (f"causal/window {window}", window != (-1, -1)), ("softcap", softcap),
        ("alibi", alibi), ("sinks", sinks), (f"{mask} mask", mask is not None), ("dropout", dropout)) if on)
    if use_tma is None:
        use_tma, loads_why = _tma_ok(target, dtype, misaligned, head_dim, head_dim_v, tma_env)
    else:
        loads_why = f"{'TMA tensor descriptors' if use_tma else 'pointer loads'} (forced by caller)"
    width = "32" if dtype == torch.float32 else "16"
    if configs is None:
        dkey = 0 if target == "interpreter" else max(64, max(block_d, block_dv))
        configs = _CONFIGS[(target, width, dkey)]
        if mask is not None and target == "sm_90" and width == "16" and dkey in _MASK_CONFIGS:
            configs = _MASK_CONFIGS[dkey]
        if autotune_env == "0":
            configs = configs[:1]
    return FwdPlan(target, device, dtype, head_dim, head_dim_v, block_d, block_dv, features,
                   bool(use_tma), loads_why, tuple(configs), target != "interpreter" and len(configs) > 1)


def describe(q, k, v, *, causal=False, window=(-1, -1), **features) -> str:
    """Human-readable forward plan for ``tileattn.attention(q, k, v, ...)`` arguments."""
    if causal:
        window = (window[0], 0)
    return forward_plan(q, k, v, window=window, **features).describe()


_TUNED = {}


def _max_shared_mem(device_index) -> int:
    """Shared memory one program may use on this CUDA device (bytes)."""
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


class TunedKernel(KernelInterface):
    """A ``triton.autotune`` Autotuner's choice, launched without its per-call overhead.

    Called like the Autotuner (``kernel[grid](*args, **kwargs)``). The first call per tuning key
    runs the Autotuner itself, which prunes, times the configs and launches the fastest; later
    calls launch ``fn`` with that config's meta-parameters directly (``fn.run``, as the
    Autotuner does), skipping its per-call argument dicts and key building (~30 us per call on
    the H200 machine's host).

    The tuning key refines the Autotuner's (the values of ``tune_sq`` and ``tune_sk`` plus the
    dtype of every tensor argument), see :meth:`_key`; tensors must be passed positionally, as
    our launchers do.
    ``best_config`` is the config of the latest launch, as on the Autotuner.
    """

    def __init__(self, fn, tuner):
        self.fn = fn
        self.tuner = tuner
        self.best_config = None
        self._key_args = [(fn.arg_names.index(name), name) for name in tuner.keys]
        self._chosen = {}  # tuning key -> (triton.Config, its launch kwargs)

    def _key(self, args, kwargs):
        """Key values, then each positional argument's dtype or None: a key at least as fine as
        the Autotuner's (so a call never reuses a choice made for another Autotuner key)."""
        values = [args[i] if i < len(args) else kwargs[name] for i, name in self._key_args]
        return (*values, *map(getattr, args, repeat("dtype"), repeat(None)))

    def run(self, *args, grid, warmup, **kwargs):
        key = self._key(args, kwargs)
        chosen = self._chosen.get(key)
        if chosen is None:
            ret = self.tuner.run(*args, grid=grid, warmup=warmup, **kwargs)
            config = self.tuner.best_config
            self._chosen[key] = (config, config.all_kwargs())
            self.best_config = config
            return ret
        self.best_config, meta = chosen
        return self.fn.run(*args, grid=grid, warmup=warmup, **kwargs, **meta)


def autotuner(kernel, key, configs, smem_bytes, tile_rows, tune_len):
    """``triton.autotune`` of ``kernel`` over ``configs`` (as a :class:`TunedKernel`), cached under ``key``.

    configs: objects with block_m, block_n, num_warps, num_stages (``FwdConfig``, the backward's
    ``Cfg``); the prune callbacks see each candidate as a ``FwdConfig``. The tuning key is the
    kernel's ``tune_sq``/``tune_sk`` (power-of-two buckets). Before timing, configs are pruned
    (at least one kept, the smallest tile):

    - ``smem_bytes(config, block_d, block_dv, elt_size)`` above the device's per-block shared
      memory fails to launch;
    - ``tile_rows(config)`` (the rows one program holds) above the bucketed length
      ``tune_len`` ("tune_sq" or "tune_sk") computes only padding.
    """
    if key in _TUNED:
        return _TUNED[key]

    def prune(candidates, named_args, **kwargs):
        args = {**named_args, **kwargs}
        q = args["Q"]
        limit = _max_shared_mem(q.device.index)

        def fits(tc):
            c = FwdConfig(tc.kwargs["BLOCK_M"], tc.kwargs["BLOCK_N"], tc.num_warps, tc.num_stages)
            return (smem_bytes(c, args["BLOCK_D"], args["BLOCK_DV"], q.element_size()) <= limit
                    and tile_rows(c) <= max(args[tune_len], 64))
        return [tc for tc in candidates if fits(tc)] or [
            min(candidates, key=lambda tc: tc.kwargs["BLOCK_M"] * tc.kwargs["BLOCK_N"])]

    cfgs = [triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n}, num_warps=c.num_warps,
                          num_stages=c.num_stages) for c in configs]
    tuner = triton.autotune(cfgs, key=["tune_sq", "tune_sk"], prune_configs_by={"early_config_prune": prune})(kernel)
    _TUNED[key] = TunedKernel(kernel, tuner)
    return _TUNED[key]


def forward_kernel(kernel, fplan: FwdPlan):
    """The kernel to launch: ``kernel`` itself, or a cached autotuner over the plan's configs
    (a program holds BLOCK_M query rows, see :func:`autotuner`)."""
    if not fplan.autotune:
        return kernel
    key = ("forward", fplan.configs, fplan.features, fplan.block_d, fplan.block_dv, fplan.use_tma)
    return autotuner(kernel, key, fplan.configs, _smem_bytes, lambda c: c.block_m, "tune_sq")
