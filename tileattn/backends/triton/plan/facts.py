"""What plans depend on besides shapes: the target, the environment knobs, caller overrides,
alignment, and the TMA rule (written once for every pass).

Environment knobs (for measuring, not for users), read here and nowhere else, on every plan:

- ``TILEATTN_AUTOTUNE=0``: each pass launches its list's first (default) config, no timing;
- ``TILEATTN_TMA=0`` pointer tile loads everywhere; ``=1`` TMA wherever it can run (sm_90, or
  the interpreter) whatever the pass's threshold;
- ``TILEATTN_DECODE_BLOCK_N=<power of two >= 16>``: the decode key tile;
- ``TILEATTN_HOPPER=0``: the forward never takes the Gluon sm_90 kernel (``plan/forward.py``,
  :func:`~.forward.gluon_rule`), always the portable ``tl`` one.

:class:`Overrides` are the supported way to force a choice (tests, benchmarks, probes): passed
to a planner (``overrides=``) or made active for a block with :func:`overrides`; they win over
the knobs.
"""

import contextlib
import functools
import math
import os
import threading
from dataclasses import dataclass, replace
from typing import NamedTuple, Optional

import torch

from .configs import Config


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


# ----------------------------------------------------------------------------- target


class Target(NamedTuple):
    """The facts of a device that plans read. name: "interpreter" (CPU tensors, Triton
    interpreter), "sm_90" (Hopper and later) or "cuda" (earlier GPUs); desc: for describe;
    num_sms: streaming multiprocessors (the interpreter counts 8: few programs keep CPU tests
    fast). Tests pass a made-up one (e.g. ``Target("sm_90", "H200 (test)", 132)``) to plan as
    on that GPU without one."""

    name: str
    desc: str
    num_sms: int


INTERPRETER_TARGET = Target("interpreter", "Triton interpreter (TRITON_INTERPRET=1) on CPU tensors", 8)


def device_target(t: torch.Tensor) -> Target:
    """The :class:`Target` of tensors like ``t``."""
    if t.device.type != "cuda":
        return INTERPRETER_TARGET
    return _cuda_target(t.device)


@functools.lru_cache(maxsize=None)
def _cuda_target(device: torch.device) -> Target:
    """Device queries once per device, not on every call's hot path."""
    props = torch.cuda.get_device_properties(device)
    return Target("sm_90" if props.major >= 9 else "cuda", f"sm_{props.major}{props.minor} ({props.name})",
                  props.multi_processor_count)


# ----------------------------------------------------------------------------- knobs


def knob_tma() -> Optional[str]:
    """``TILEATTN_TMA``: "0", "1" or None (the planners' rule)."""
    return os.environ.get("TILEATTN_TMA")


def knob_autotune() -> bool:
    """False when ``TILEATTN_AUTOTUNE=0`` (first config of each list only)."""
    return os.environ.get("TILEATTN_AUTOTUNE") != "0"


def knob_decode_block_n() -> int:
    """``TILEATTN_DECODE_BLOCK_N`` as an int, 0 when unset."""
    return int(os.environ.get("TILEATTN_DECODE_BLOCK_N", 0))


def knob_gluon() -> bool:
    """False when ``TILEATTN_HOPPER=0`` (no Gluon forward)."""
    return os.environ.get("TILEATTN_HOPPER") != "0"


# ----------------------------------------------------------------------------- overrides


@dataclass(frozen=True)
class Overrides:
    """Forced choices, each None for "the planner decides".

    forward / dq / dkdv: candidate :class:`Config` tuples for the pass (one config: launched
    as is; several: autotuned among them on CUDA). dQ/dK/dV BLOCK_M must divide ROW_PAD (128).
    use_tma: tensor-descriptor (True) or pointer (False) tile loads in forward and backward
    (True where TMA cannot run fails at launch). autotune: False launches each list's first
    config. decode_block_n (power of two >= 16), decode_num_splits (>= 1; a call's explicit
    ``num_splits`` > 0 still wins), decode_num_warps, decode_num_stages: the decode launch.
    """

    forward: Optional[tuple] = None
    dq: Optional[tuple] = None
    dkdv: Optional[tuple] = None
    use_tma: Optional[bool] = None
    autotune: Optional[bool] = None
    decode_block_n: Optional[int] = None
    decode_num_splits: Optional[int] = None
    decode_num_warps: Optional[int] = None
    decode_num_stages: Optional[int] = None

    def __post_init__(self):
        for name in ("forward", "dq", "dkdv"):
            configs = getattr(self, name)
            if configs is not None:
                configs = (configs,) if isinstance(configs, Config) else tuple(configs)
                if not configs or not all(isinstance(c, Config) for c in configs):
                    raise TypeError(f"tileattn: Overrides.{name} must be Config objects, got {configs!r}")
                object.__setattr__(self, name, configs)
        n = self.decode_block_n
        if n is not None and (n < 16 or n & (n - 1)):
            raise ValueError(f"tileattn: Overrides.decode_block_n must be a power of two >= 16, got {n}")
        if self.decode_num_splits is not None and self.decode_num_splits < 1:
            raise ValueError(f"tileattn: Overrides.decode_num_splits must be >= 1, got {self.decode_num_splits}")
        object.__setattr__(self, "_hash", hash(tuple(vars(self).values())))

    def __hash__(self):  # plans are cached under the overrides: hash once, not per call
        return self._hash

    def merged(self, other: Optional["Overrides"]) -> "Overrides":
        """These overrides with ``other``'s non-None fields on top."""
        if other is None:
            return self
        return replace(self, **{k: v for k, v in vars(other).items() if v is not None and k != "_hash"})


NONE = Overrides()
_ACTIVE = NONE  # the block-wide overrides (see `overrides`); read once per plan
_ACTIVE_LOCK = threading.Lock()


def active(explicit: Optional[Overrides] = None) -> Overrides:
    """The overrides a plan uses: the active block's, with ``explicit`` (a planner argument) on top."""
    if explicit is None or explicit is _ACTIVE:
        return _ACTIVE
    return explicit if _ACTIVE is NONE else _ACTIVE.merged(explicit)


@contextlib.contextmanager
def overrides(**fields):
    """Force planner choices for every call made while the block runs (any thread: a
    backward on autograd's device threads sees them too), e.g.::

        with tileattn.plan.overrides(forward=[Config(64, 32, 4, 2)], use_tma=False):
            out = tileattn.attention(q, k, v)

    Fields as :class:`Overrides`; nested blocks stack. Meant for tests, benchmarks and probes
    that run one thing at a time, like the environment knobs it replaces."""
    global _ACTIVE
    with _ACTIVE_LOCK:
        previous = _ACTIVE
        _ACTIVE = previous.merged(Overrides(**fields))
    try:
        yield _ACTIVE
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE = previous


# ----------------------------------------------------------------------------- TMA


_TMA_DTYPES = (torch.float16, torch.bfloat16)


def first_misaligned(tensors: dict, rows: dict = None):
    """What TMA cannot read, as a short text, else None: the first named tensor that is empty
    or whose pointer or non-unit strides are not 16-byte aligned, then the first named row
    width (elements, of the tensors' dtype) that is not a multiple of 16 bytes."""
    es = 2
    for name, t in tensors.items():
        strides = t.stride()
        es = t.element_size()
        # every stride s has s * elt_size % 16 == 0 exactly when their gcd does
        if t.numel() == 0 or t.data_ptr() % 16 or math.gcd(*strides[:-1]) * es % 16:
            return f"{name} pointer or strides {strides} not 16-byte aligned"
    for name, width in (rows or {}).items():
        if width * es % 16:
            return f"{name} rows ({width} elements) not 16-byte aligned"
    return None


def tma_rule(target: str, dtype, tma_env, gate, misaligned=None):
    """(use TMA tile loads?, why), the rule of every pass.

    TMA descriptors need sm_90 (the interpreter runs them when forced), 16-bit data and
    16-byte aligned pointers, strides and rows (``misaligned``: :func:`first_misaligned`'s
    text, None when aligned or not looked at yet), and pay a per-program setup, so each pass
    uses them only past its threshold: ``gate`` = (reached?, the threshold in words).
    ``tma_env``: the TILEATTN_TMA knob ("0" off, "1" on wherever it can run). Called first
    with ``misaligned=None`` to learn whether alignment matters at all (it is read only then).
    """
    if tma_env == "0":
        return False, "pointer loads: TILEATTN_TMA=0"
    if dtype not in _TMA_DTYPES:
        return False, "pointer loads: fp32 path (ieee dots on FMA units gain nothing from TMA)"
    if target != "sm_90" and not (tma_env == "1" and target == "interpreter"):
        return False, "pointer loads: TMA needs sm_90+ (the interpreter runs it only when forced)"
    if misaligned is not None:
        return False, f"pointer loads: {misaligned}"
    if tma_env != "1" and not gate[0]:
        return False, f"pointer loads: {gate[1]}"
    forced = " (TILEATTN_TMA=1)" if tma_env == "1" else ""
    return True, f"TMA tensor descriptors{forced}: sm_90, 16-bit dtype, 16-byte aligned pointers and strides"
