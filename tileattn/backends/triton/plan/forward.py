"""Forward plan: tile loads (TMA or pointers) and the candidate configs, with the reasons.

Choices, in order:

1. Target (:func:`~.facts.device_target`): the interpreter (CPU tensors), sm_90, other CUDA.
2. Head-dim blocks: next power of two >= 16 (tl.dot needs K >= 16); 80 -> 128, 192 -> 256, with
   masked (or TMA zero-filled) columns, so any D <= 256 runs.
3. Loads: :func:`~.facts.tma_rule` with the forward's threshold, a head-dim block of 256
   (``FWD_TMA_MIN_HEAD_BLOCK``); q, k, v and the output rows (Dv) must be 16-byte aligned.
4. Configs: ``configs.FORWARD`` by (target, dtype width, head-dim block), ``FORWARD_MASK`` with
   an attn_mask on sm_90; on CUDA a list of several is timed once per (features, Sq/Sk
   power-of-two bucket) after the prune of ``tune.autotuner``.
5. Kernel: the Gluon FA3-design kernel (``backends/triton/gluon``) where :func:`gluon_rule`
   allows it, else the portable ``tl`` kernel ``_fwd_kernel`` with the configs above.

Not used: ``tl.range(..., warp_specialize=True)``: with triton 3.6 on sm_90 it only tags the
loop (the compiled TTGIR has no warp-specialized partitions); producer/consumer warpgroups on
Hopper need Gluon.
"""

import functools
from dataclasses import dataclass

import torch

from tileattn.score import FLAG_NAMES  # the names behind ScoreSpec.key()'s values

from . import configs as C
from .facts import (Overrides, active, device_target, first_misaligned, head_block, knob_autotune, knob_gluon, knob_tma,
                    tma_rule)



def flag_text(spec_key, spec=None) -> str:
    """The features line of describe: the spec's own words, else the flags that are on."""
    if spec is not None:
        names = spec.features()
    else:
        names = tuple(f"{n}={v}" if not isinstance(v, bool) else n for n, v in zip(FLAG_NAMES, spec_key) if v)
    return ", ".join(names) or "plain"


def table_configs(table, target: str, dtype, block_d: int, block_dv: int) -> tuple:
    """A config list of ``table`` for this target, dtype and head-dim blocks (fp32 uses the
    "cuda" fp32 lists on every GPU; the interpreter has one entry)."""
    if target == "interpreter":
        return table[C.INTERPRETER]
    width = "32" if dtype == torch.float32 else "16"
    return table[(target if width == "16" else "cuda", width, max(64, block_d, block_dv))]


@dataclass(frozen=True)
class KernelPlan:
    """The facts every pass's plan holds: device, dtype, head dims and their blocks, the spec's
    feature key, dense or varlen, and the tile-load choice with its reason."""

    target: str
    device: str
    dtype: torch.dtype
    head_dim: int
    head_dim_v: int
    block_d: int
    block_dv: int
    spec_key: tuple
    varlen: bool
    use_tma: bool
    loads_why: str

    def header(self, name: str) -> str:
        """First line of ``describe``: the pass, device, dtype and head dims."""
        return (f"tileattn {name} plan: {self.device}, {self.dtype}, D={self.head_dim} (block {self.block_d}), "
                f"Dv={self.head_dim_v} (block {self.block_dv})")


@dataclass(frozen=True)
class ForwardPlan(KernelPlan):
    """What the forward launcher needs besides the tensors."""

    configs: tuple
    configs_why: str
    autotune: bool
    kernel: str = "tl"  # "gluon": the sm_90 Gluon kernel runs instead of _fwd_kernel and its configs
    kernel_why: str = ""

    def tune_key(self) -> tuple:
        """The kernel variant's facts for the autotuner cache (one autotuner per variant)."""
        return (self.spec_key, self.varlen, self.block_d, self.block_dv, self.use_tma)

    def describe(self, spec=None) -> str:
        if self.kernel == "gluon":
            kernel = ("gluon fwd_kernel (FA3 design: TMA loader warp, two 64-row wgmma consumer warpgroups, "
                      "BLOCK_M=128, BLOCK_N=128); the tl configs below are unused")
        else:
            kernel = (f"_fwd_kernel ({'varlen' if self.varlen else 'dense'}): one program per BLOCK_M query rows "
                      f"of one (batch, query head), walking BLOCK_N key tiles ({self.kernel_why})")
        lines = [self.header("forward"), f"  kernel: {kernel}",
                 f"  features: {flag_text(self.spec_key, spec)}",
                 f"  loads: {self.loads_why}",
                 f"  configs ({self.configs_why}):"]
        lines += [f"    {c}  -- {c.why or 'given by the caller'}" for c in self.configs]
        return "\n".join(lines)


@functools.lru_cache(maxsize=None)
def _hopper_exact(device) -> bool:
    """sm_90 itself: wgmma and setmaxnreg do not exist on later majors (Target "sm_90" means 9.0+)."""
    return torch.cuda.get_device_capability(device)[0] == 9


def gluon_rule(q, k, v, spec, varlen, ov, target):
    """(run the Gluon sm_90 forward?, why not): a Hopper GPU, Gluon importable, the knob
    (``TILEATTN_HOPPER``) on, no forced configs or loads, dense 16-bit q/k/v with D == Dv in
    {64, 128}, non-empty, TMA-aligned, and a plain or causal score with a positive scale (every
    other feature stays on the ``tl`` kernel)."""
    if not knob_gluon():
        return False, "TILEATTN_HOPPER=0"
    # tensors off the GPU reach here only with an explicit sm_90 target (a preset): what would run
    if target.name != "sm_90" or (q.is_cuda and not _hopper_exact(q.device)):
        return False, "the Gluon kernel needs sm_90 exactly"
    if ov.forward is not None or ov.use_tma is not None:
        return False, "configs or loads forced by the caller"
    D = q.shape[-1]
    if varlen or q.dtype not in (torch.float16, torch.bfloat16) or D not in (64, 128) or v.shape[-1] != D:
        return False, "the Gluon kernel covers dense fp16/bf16 with D == Dv in {64, 128}"
    if (spec.window not in ((-1, -1), (-1, 0)) or spec.scale <= 0 or spec.softcap or spec.dropout_p
            or any(t is not None for t in (spec.alibi_slopes, spec.sinks, spec.attn_mask))):
        return False, "features beyond causal (or scale <= 0) run on the tl kernel"
    if q.shape[1] == 0 or k.shape[1] == 0:
        return False, "empty sequence"
    misaligned = first_misaligned({"q": q, "k": k, "v": v}, {"out": D})
    if misaligned:
        return False, misaligned
    from tileattn.backends.triton import gluon  # imports no Gluon itself
    return (True, "") if gluon.available() else (False, "triton.experimental.gluon (3.6 Hopper API) not importable")


def plan_forward(q, k, v, spec, *, varlen=False, overrides: Overrides = None, target=None) -> ForwardPlan:
    """Plan the Triton forward of ``spec`` (a ScoreSpec) over these tensors.

    ``overrides`` (:class:`~.facts.Overrides`: ``forward`` configs, ``use_tma``, ``autotune``)
    force choices on top of any active :func:`~.facts.overrides` block; ``target`` (a
    :class:`~.facts.Target`) plans as on that device (tests). Cached under the facts a plan
    depends on: target, dtype, head dims, ``spec.key()``, varlen, alignment (read only where
    TMA is otherwise possible), the knobs and the overrides.
    """
    target = target or device_target(q)
    ov = active(overrides)
    tma_env = knob_tma()
    misaligned = None
    if ov.use_tma is None:
        # the head-dim block (next power of two) reaches the threshold exactly when D > threshold / 2
        gate = (max(q.shape[-1], v.shape[-1]) > C.FWD_TMA_MIN_HEAD_BLOCK // 2, "")
        if tma_rule(target.name, q.dtype, tma_env, gate)[0]:
            misaligned = first_misaligned({"q": q, "k": k, "v": v}, {"out": v.shape[-1]})
    return _plan(target, q.dtype, q.shape[-1], v.shape[-1], spec.key(), spec.mask_kind, bool(varlen), tma_env,
                 misaligned, knob_autotune(), ov, gluon_rule(q, k, v, spec, varlen, ov, target))


@functools.lru_cache(maxsize=1024)
def _plan(target, dtype, head_dim, head_dim_v, spec_key, mask_kind, varlen, tma_env, misaligned, autotune_env,
          ov, gluon) -> ForwardPlan:
    block_d, block_dv = head_block(head_dim), head_block(head_dim_v)
    if ov.use_tma is None:
        gate = (max(block_d, block_dv) >= C.FWD_TMA_MIN_HEAD_BLOCK,
                f"head-dim block {max(block_d, block_dv)} < {C.FWD_TMA_MIN_HEAD_BLOCK} (pointer loads as fast at "
                "long sequences, faster at short ones where per-program descriptor setup shows)")
        use_tma, loads_why = tma_rule(target.name, dtype, tma_env, gate, misaligned)
    else:
        use_tma = ov.use_tma
        loads_why = f"{'TMA tensor descriptors' if use_tma else 'pointer loads'} (forced by caller)"
    if ov.forward is not None:
        configs, why = ov.forward, "forced by caller"
    else:
        configs = table_configs(C.FORWARD, target.name, dtype, block_d, block_dv)
        dkey = max(64, block_d, block_dv)
        why = f"{target.name} list"
        if mask_kind and target.name == "sm_90" and dtype != torch.float32 and dkey in C.FORWARD_MASK:
            configs, why = C.FORWARD_MASK[dkey], "sm_90 attn_mask list"
        if not autotune_env or ov.autotune is False:
            configs, why = configs[:1], why + ", first entry only (autotuning off)"
    autotune = target.name != "interpreter" and len(configs) > 1
    why += ", autotuned once per Sq/Sk power-of-two bucket" if autotune else ", fixed"
    return ForwardPlan(target.name, target.desc, dtype, head_dim, head_dim_v, block_d, block_dv, spec_key, varlen,
                       bool(use_tma), loads_why, tuple(configs), why, autotune, "gluon" if gluon[0] else "tl",
                       gluon[1])


cache_clear = _plan.cache_clear
