"""The score specification: the user's score arguments, normalized once, read by every backend.

API.md's pipeline for query row ``i`` and key ``j`` (``off = Sk - Sq`` per sequence)::

    s = (q_i . k_j) * scale          1. scale (default 1/sqrt(D); any finite value, also < 0)
    s = c * tanh(s / c)              2. softcap c > 0 (0 or inf = off)
    s -= slope_h * |i + off - j|     3. ALiBi
    s += mask  |  keep &= mask       4. attn_mask: float (added) or bool (True = keep)
    keep &= i+off-left <= j <= i+off+right     5. causal (right = 0) / window, -1 = unbounded
    softmax over kept j, + exp(sink_h) in the denominator     6. sinks
    p *= keep_dropout / (1 - p_drop)                          7. dropout (Philox, _philox.py)

:class:`ScoreSpec` is built once per call by ``tileattn.api`` (:meth:`ScoreSpec.build`). The
custom ops carry its fields through the dispatcher (:meth:`ScoreSpec.op_fields`) and rebuild
it with full-shape views (:meth:`ScoreSpec.from_op_fields`); backends receive the spec and read:

- the reference and the CPU backend: its fields (``scale``, ``window``, ``softcap``, ...);
- Triton: :meth:`constexprs` (feature flags, one name each across forward, backward and
  decode) and :meth:`scalars` (the base-2 constants the kernels use);
- planners: :meth:`key` (hashable, no tensors); ``describe``: :meth:`features`.

Adding a score modifier: a field here, its constexpr/scalar, and one helper per language
(``tileattn/reference.py``, ``backends/cpu/score.py``, ``backends/triton/score.py``);
``docs/design/ARCHITECTURE.md`` lists the files.
"""

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

LOG2E = 1.4426950408889634  # log2(e): kernels work in base 2 (exp2), lse leaves in natural log
LN2 = 0.6931471805599453
LSE_EXACT = 64.0  # above this |lse * log2(e)| a backward recomputes its rows' statistics (backends' [Note] large lse)
WINDOW_CLAMP = 2**30  # a window wider than any |i + off - j| is the same window; keeps int32 math exact


@dataclass(frozen=True, eq=False)
class ScoreSpec:
    """Normalized score arguments of one call (see the module docstring for the pipeline).

    scale: float, finite. window: (left, right) ints, causal folded in (right = 0), -1 =
    unbounded. softcap: float, 0.0 = off. alibi_slopes: None or float32, (Hq,) or (B, Hq) as
    given; backends see (B, Hq) (a (Hq,) input as a stride-0 expand, :meth:`expanded`).
    sinks: None or float32 (Hq,). attn_mask: None or bool / float, broadcastable to
    (B, Hq, Sq, Sk); backends see a (B, Hq, Sq, Sk) view. dropout_p: float in [0, 1);
    seed: the Philox key (int), 0 without dropout.
    """

    scale: float
    window: tuple = (-1, -1)
    softcap: float = 0.0
    alibi_slopes: Optional[Tensor] = None
    sinks: Optional[Tensor] = None
    attn_mask: Optional[Tensor] = None
    dropout_p: float = 0.0
    seed: int = 0

    @classmethod
    def build(cls, head_dim: int, *, causal=False, scale=None, window=(-1, -1), softcap=0.0, alibi_slopes=None,
              sinks=None, attn_mask=None, dropout_p=0.0) -> "ScoreSpec":
        """From validated public keywords: default scale 1/sqrt(head_dim), causal folded into the
        window's right edge, softcap inf -> off, slopes and sinks as float32. The dropout seed is
        drawn per call and travels beside the spec through the ops (:meth:`from_op_fields`)."""
        scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
        left, right = (int(w) for w in window)
        softcap = float(softcap)
        return cls(scale=scale, window=(left, 0 if causal else right),
                   softcap=0.0 if math.isinf(softcap) else softcap,
                   alibi_slopes=None if alibi_slopes is None else alibi_slopes.float(),
                   sinks=None if sinks is None else sinks.float(),
                   attn_mask=attn_mask, dropout_p=float(dropout_p))

    # ------------------------------------------------------------------ through the dispatcher

    def op_fields(self) -> tuple:
        """(scale, window_left, window_right, softcap, alibi_slopes, sinks, attn_mask, dropout_p),
        the custom ops' score arguments in their schema's order (the seed travels as a tensor)."""
        return (self.scale, self.window[0], self.window[1], self.softcap, self.alibi_slopes, self.sinks,
                self.attn_mask, self.dropout_p)

    @classmethod
    def from_op_fields(cls, scale, window_left, window_right, softcap, alibi_slopes, sinks, attn_mask, dropout_p,
                       seed=None) -> "ScoreSpec":
        """Inverse of :meth:`op_fields`; ``seed`` an int64 tensor or None (no dropout)."""
        return cls(scale=scale, window=(window_left, window_right), softcap=softcap, alibi_slopes=alibi_slopes,
                   sinks=sinks, attn_mask=attn_mask, dropout_p=dropout_p,
                   seed=int(seed) if seed is not None and dropout_p > 0 else 0)

    def expanded(self, batch: int, hq: int, seqlen_q: int = 0, seqlen_k: int = 0) -> "ScoreSpec":
        """The backends' view: slopes as (B, Hq) and the mask as (B, Hq, Sq, Sk), stride-0 where broadcast."""
        slopes, mask = self.alibi_slopes, self.attn_mask
        if slopes is not None and slopes.dim() == 1:
            slopes = slopes.expand(batch, hq)
        if mask is not None:
            mask = mask.expand(batch, hq, seqlen_q, seqlen_k)
        if slopes is self.alibi_slopes and mask is self.attn_mask:
            return self
        return replace(self, alibi_slopes=slopes, attn_mask=mask)

    # ------------------------------------------------------------------ what kernels and plans read

    @property
    def mask_kind(self) -> int:
        """0 no attn_mask, 1 bool (a keep test), 2 float (a score term)."""
        if self.attn_mask is None:
            return 0
        return 1 if self.attn_mask.dtype == torch.bool else 2

    def constexprs(self) -> dict:
        """Triton feature flags, the same names in every kernel. NEG_SCALE: scale < 0, so the
        row max must be taken over finished scores (backends/triton/score.py, [Note] negative scale)."""
        left, right = self.window
        return dict(SOFTCAP=self.softcap > 0, ALIBI=self.alibi_slopes is not None, MASK_KIND=self.mask_kind,
                    HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, SINKS=self.sinks is not None,
                    DROPOUT=self.dropout_p > 0, NEG_SCALE=self.scale < 0)

    def scalars(self) -> tuple:
        """(qk_scale, softcap_scale, softcap_log2, window_left, window_right, dropout_p, seed):
        qk_scale = scale * log2(e); softcap_scale = scale / c; softcap_log2 = c * log2(e);
        windows clamped to WINDOW_CLAMP."""
        left, right = (w if w < 0 else min(w, WINDOW_CLAMP) for w in self.window)
        capped = self.softcap > 0
        return (self.scale * LOG2E, self.scale / self.softcap if capped else 0.0, self.softcap * LOG2E,
                left, right, self.dropout_p, self.seed if self.dropout_p > 0 else 0)

    def key(self) -> tuple:
        """Hashable feature key for plan caches: which features are on (no tensors, no values
        that do not change the compiled kernel)."""
        return tuple(self.constexprs().values())  # in FLAG_NAMES order

    def features(self) -> tuple:
        """Names of the features that are on, for ``describe``."""
        mask = (None, "bool", "float")[self.mask_kind]
        return tuple(name for name, on in (
            (f"causal/window {self.window}", self.window != (-1, -1)), ("softcap", self.softcap > 0),
            ("alibi", self.alibi_slopes is not None), ("sinks", self.sinks is not None),
            (f"{mask} mask", mask is not None), ("dropout", self.dropout_p > 0)) if on)


FLAG_NAMES = tuple(ScoreSpec(scale=1.0).constexprs())  # the names behind ScoreSpec.key()'s values
