"""Input validation shared by every entry point: raise before any work, mutate nothing.

Every message starts with ``tileattn:``, names the argument, and says what was expected and
what was received. Checks that need a device->host sync (cu_seqlens values, page ids, cache
capacity) run on CPU tensors always and on GPU tensors only when ``TILEATTN_DEBUG=1``.
"""

import os

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def debug_checks(t: torch.Tensor) -> bool:
    """Whether value checks that read device memory should run for tensors like ``t``."""
    if torch.compiler.is_compiling():  # value checks would break the graph
        return False
    return t.device.type == "cpu" or os.environ.get("TILEATTN_DEBUG", "0") == "1"


def tensor(name: str, t, rank: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"tileattn: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPES:
        raise TypeError(f"tileattn: {name} has dtype {t.dtype}; expected float16, bfloat16 or float32")
    if t.dim() != rank:
        raise ValueError(f"tileattn: {name} must have {rank} dims, got shape {tuple(t.shape)}")


def same_dtype_device(q: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is None:
            continue
        if t.dtype != q.dtype:
            raise TypeError(f"tileattn: {name} has dtype {t.dtype} but q has {q.dtype}; all of q, k, v must share one dtype")
        if t.device != q.device:
            raise TypeError(f"tileattn: {name} is on {t.device} but q is on {q.device}")


def heads_and_dims(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_name="k", v_name="v") -> None:
    """q (..., Hq, D), k (..., Hkv, D), v (..., Hkv, Dv): GQA divisibility and head dims."""
    hq, d = q.shape[-2:]
    hkv, dk = k.shape[-2:]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"tileattn: {k_name} has {hkv} heads, which does not divide q's {hq} heads (Hq % Hkv must be 0)")
    if dk != d:
        raise ValueError(f"tileattn: {k_name} has head dim {dk} but q has {d}; q and k must share the head dim")
    if v.shape[-2] != hkv:
        raise ValueError(f"tileattn: {v_name} has {v.shape[-2]} heads but {k_name} has {hkv}")
    for name, dim in (("q", d), (v_name, v.shape[-1])):
        if not 1 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"tileattn: {name} has head dim {dim}; supported head dims are 1..{MAX_HEAD_DIM}")


def options(*, scale, window, softcap, dropout_p=0.0) -> None:
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"tileattn: scale must be a float or None, got {type(scale).__name__}")
    if not (isinstance(window, (tuple, list)) and len(window) == 2 and all(isinstance(w, int) for w in window)):
        raise ValueError(f"tileattn: window must be a (left, right) pair of ints, got {window!r}")
    if min(window) < -1:
        raise ValueError(f"tileattn: window must have entries >= -1 (-1 = unbounded), got {tuple(window)}")
    if softcap < 0:
        raise ValueError(f"tileattn: softcap must be >= 0 (0 disables it), got {softcap}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"tileattn: dropout_p must be in [0, 1), got {dropout_p}")


def per_head(name: str, t, q: torch.Tensor, batch: int, hq: int, allow_batch: bool) -> None:
    """alibi_slopes (Hq,) or (B, Hq); sinks (Hq,): floating, on q's device."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"tileattn: {name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if t.device != q.device:
        raise TypeError(f"tileattn: {name} is on {t.device} but q is on {q.device}")
    shapes = [(hq,)] + ([(batch, hq)] if allow_batch else [])
    if tuple(t.shape) not in shapes:
        want = " or ".join(str(s) for s in shapes)
        raise ValueError(f"tileattn: {name} must have shape {want}, got {tuple(t.shape)}")


def attn_mask(mask, q: torch.Tensor, target: tuple) -> None:
    """bool or floating mask broadcastable to target = (B, Hq, Sq, Sk)."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or not (mask.dtype == torch.bool or mask.is_floating_point()):
        raise TypeError(f"tileattn: attn_mask must be a bool or floating tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.device != q.device:
        raise TypeError(f"tileattn: attn_mask is on {mask.device} but q is on {q.device}")
    ok = mask.dim() <= 4 and all(m in (1, t) for m, t in zip(reversed(mask.shape), reversed(target)))
    if not ok:
        raise ValueError(f"tileattn: attn_mask of shape {tuple(mask.shape)} is not broadcastable to (B, Hq, Sq, Sk) = {target}")


def index_tensor(name: str, t, q: torch.Tensor, rank: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32:
        raise TypeError(f"tileattn: {name} must be an int32 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if t.device != q.device:
        raise TypeError(f"tileattn: {name} is on {t.device} but q is on {q.device}")
    if t.dim() != rank:
        raise ValueError(f"tileattn: {name} must have {rank} dims, got shape {tuple(t.shape)}")


def cache_capacity(k_cache: torch.Tensor, block_table) -> int:
    """Tokens one sequence can hold: Smax of a contiguous (B, Smax, Hkv, D) cache, or
    max_blocks * block_size of a paged (num_blocks, block_size, Hkv, D) cache."""
    return k_cache.shape[1] * (1 if block_table is None else block_table.shape[1])


def cu_seqlens(name: str, cu, total: int, q: torch.Tensor) -> None:
    index_tensor(name, cu, q, 1)
    if cu.numel() < 2:
        raise ValueError(f"tileattn: {name} must have B+1 >= 2 entries, got {cu.numel()}")
    if debug_checks(cu):
        first, last = int(cu[0]), int(cu[-1])
        if first != 0:
            raise ValueError(f"tileattn: {name} must start at 0, got {first}")
        if last != total:
            raise ValueError(f"tileattn: {name} ends at {last} but the tensor holds {total} tokens")
        if bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"tileattn: {name} must be non-decreasing, got {cu.tolist()}")
