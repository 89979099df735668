"""Input validation shared by every entry point: raise before any work, mutate nothing.

Every message starts with ``tileattn:``, names the argument, and says what was expected and
what was received: ``TypeError`` for a wrong type (``softcap=None``, ``dropout_p='0.1'``, a
window of bools), ``ValueError`` for a wrong value. Checks that need a device->host sync
(cu_seqlens values, max_seqlen against the lengths, page ids, cache capacity) run on CPU
tensors always and on GPU tensors only when ``TILEATTN_DEBUG=1`` (:func:`debug_checks`).

Strides (issue 17, class 1): the small tensors (sinks, alibi_slopes, cu_seqlens_*,
cache_seqlens, block_table) come back contiguous from their validators, so no backend reads
them through assumed strides; a KV cache is used in place, so one whose last dim is not
unit-stride, or an expanded (stride-0) one that would be written, is refused (:func:`kvcache`).
"""

import math
import numbers
import os

import torch

from . import _fastpath, paged

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
    if hq == 0:
        raise ValueError(f"tileattn: q has 0 heads; it needs Hq >= 1 (a multiple of {k_name}'s {hkv} heads)")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"tileattn: {k_name} has {hkv} heads, which does not divide q's {hq} heads (Hq % Hkv must be 0)")
    if dk != d:
        raise ValueError(f"tileattn: {k_name} has head dim {dk} but q has {d}; q and k must share the head dim")
    if v.shape[-2] != hkv:
        raise ValueError(f"tileattn: {v_name} has {v.shape[-2]} heads but {k_name} has {hkv}")
    for name, dim in (("q", d), (v_name, v.shape[-1])):
        if not 1 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"tileattn: {name} has head dim {dim}; supported head dims are 1..{MAX_HEAD_DIM}")


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def flag(name: str, x) -> None:
    """A bool keyword (causal, deterministic, return_lse, is_causal, enable_gqa)."""
    if not isinstance(x, bool):
        raise TypeError(f"tileattn: {name} must be a bool, got {type(x).__name__} {x!r}")


_UNSET = object()


def options(*, scale, window, softcap, dropout_p=0.0, causal=False, deterministic=False, return_lse=False,
            backend="auto", num_splits=_UNSET) -> None:
    """The scalar keywords of every entry point: types (TypeError), then values (ValueError)."""
    if scale is not None and not _is_real(scale):
        raise TypeError(f"tileattn: scale must be a float or None, got {type(scale).__name__}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"tileattn: scale must be finite (any sign), got {scale}")
    if not isinstance(window, (tuple, list)) or not all(_is_int(w) for w in window):
        raise TypeError(f"tileattn: window must be a (left, right) pair of ints, got {window!r}")
    if len(window) != 2:
        raise ValueError(f"tileattn: window must be a (left, right) pair of ints, got {window!r}")
    if min(window) < -1:
        raise ValueError(f"tileattn: window must have entries >= -1 (-1 = unbounded), got {tuple(window)}")
    if not _is_real(softcap):
        raise TypeError(f"tileattn: softcap must be a float (0 disables it), got {type(softcap).__name__}")
    if math.isnan(softcap) or softcap < 0:
        raise ValueError(f"tileattn: softcap must be >= 0 (0 or inf disables it), got {softcap}")
    if not _is_real(dropout_p):
        raise TypeError(f"tileattn: dropout_p must be a float, got {type(dropout_p).__name__} {dropout_p!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"tileattn: dropout_p must be in [0, 1), got {dropout_p}")
    for name, x in (("causal", causal), ("deterministic", deterministic), ("return_lse", return_lse)):
        flag(name, x)
    if not isinstance(backend, str):
        raise TypeError(f"tileattn: backend must be a str, got {type(backend).__name__}")
    if num_splits is _UNSET:
        return
    if not _is_int(num_splits):
        raise TypeError(f"tileattn: num_splits must be an int >= 0 (0 = automatic), got {num_splits!r}")
    if num_splits < 0:
        raise ValueError(f"tileattn: num_splits must be an int >= 0 (0 = automatic), got {num_splits!r}")


def per_head(name: str, t, q: torch.Tensor, batch: int, hq: int, allow_batch: bool):
    """alibi_slopes (Hq,) or (B, Hq); sinks (Hq,): floating, on q's device. Returns ``t``
    contiguous (a small copy when it is a strided view), so no backend depends on its strides."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"tileattn: {name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if t.device != q.device:
        raise TypeError(f"tileattn: {name} is on {t.device} but q is on {q.device}")
    shapes = [(hq,)] + ([(batch, hq)] if allow_batch else [])
    if tuple(t.shape) not in shapes:
        want = " or ".join(str(s) for s in shapes)
        raise ValueError(f"tileattn: {name} must have shape {want}, got {tuple(t.shape)}")
    return t.contiguous()


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


def index_tensor(name: str, t, ref: torch.Tensor, rank: int, ref_name: str = "q") -> torch.Tensor:
    """An int32 tensor of ``rank`` dims on ``ref``'s device; returned contiguous (index tensors
    are small, and every backend reads them as packed arrays)."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32:
        raise TypeError(f"tileattn: {name} must be an int32 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if t.device != ref.device:
        raise TypeError(f"tileattn: {name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dim() != rank:
        raise ValueError(f"tileattn: {name} must have {rank} dims, got shape {tuple(t.shape)}")
    return t.contiguous()


# ----------------------------------------------------------------------------- varlen


def cu_seqlens(name: str, cu, total: int, q: torch.Tensor) -> torch.Tensor:
    """int32 (B+1,) offsets from 0 to ``total``, non-decreasing (values read where
    :func:`debug_checks` allows). Returns the tensor contiguous."""
    cu = index_tensor(name, cu, q, 1)
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
    return cu


def varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q: torch.Tensor, k: torch.Tensor) -> tuple:
    """Validate attention_varlen's lengths -> (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k).

    The offsets come back contiguous; a ``max_seqlen_*`` of None is filled with the real
    maximum (a host read). A given ``max_seqlen_*`` must be >= every length: checked from
    host-known numbers always (B * max >= total tokens) and against the offsets wherever
    reading them costs no sync (CPU tensors) or ``TILEATTN_DEBUG=1``.
    """
    cu_q = cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q)
    cu_k = cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q)
    if cu_k.numel() != cu_q.numel():
        raise ValueError(f"tileattn: cu_seqlens_k has {cu_k.numel()} entries but cu_seqlens_q has "
                         f"{cu_q.numel()}; both must be B+1 long")
    batch = cu_q.numel() - 1
    maxima = []
    for name, given, cu, total in (("max_seqlen_q", max_seqlen_q, cu_q, q.shape[0]),
                                   ("max_seqlen_k", max_seqlen_k, cu_k, k.shape[0])):
        if given is not None and not _is_int(given):
            raise TypeError(f"tileattn: {name} must be an int or None, got {type(given).__name__} {given!r}")
        if given is None or debug_checks(cu):
            longest = int((cu[1:] - cu[:-1]).max())
            if given is None:
                given = longest
            elif given < longest:
                raise ValueError(f"tileattn: {name}={given} is smaller than the longest sequence ({longest} tokens); "
                                 f"it must be an upper bound on the lengths (or None)")
        if given < 0 or batch * given < total:
            raise ValueError(f"tileattn: {name}={given} is smaller than the longest sequence (B={batch} sequences "
                             f"hold {total} tokens); it must be an upper bound on the lengths (or None)")
        maxima.append(int(given))
    return cu_q, cu_k, maxima[0], maxima[1]


# ----------------------------------------------------------------------------- KV cache


def _cache_layout(name: str, cache: torch.Tensor, written: bool) -> None:
    """A cache is read and written in place: its last dim must be unit-stride (no copy could
    carry a write back), and a cache that is written must not alias itself (a stride-0,
    expanded dim would make two positions one memory cell)."""
    if cache.shape[-1] > 1 and cache.stride(-1) != 1:
        raise ValueError(f"tileattn: {name} has strides {tuple(cache.stride())}; a cache needs a unit stride in its "
                         f"last dim (it is used in place, so it cannot be copied): pass a tensor whose last dim is "
                         f"contiguous")
    if written and any(st == 0 and n > 1 for st, n in zip(cache.stride(), cache.shape)):
        raise ValueError(f"tileattn: {name} is an expanded view (strides {tuple(cache.stride())} with a 0 stride): "
                         f"writing k/v into it would write several positions at one address; pass a real tensor")


def block_table(table, cache: torch.Tensor, batch=None) -> torch.Tensor:
    """int32 (B, max_blocks) page table on the cache's device, returned contiguous."""
    table = index_tensor("block_table", table, cache, 2, "the cache")
    if batch is not None and table.shape[0] != batch:
        raise ValueError(f"tileattn: block_table must have B={batch} rows, got {table.shape[0]}")
    return table


def kvcache(k_cache, v_cache, k, v, cache_seqlens, table, *, q=_UNSET, rows_mapped=False) -> tuple:
    """Validate a cache call -- ``attention_with_kvcache`` (``q`` given) or
    ``tileattn.kvcache.append`` (``q`` None, ``k``/``v`` required) -- before anything is
    written. Returns ``(cache_seqlens, block_table)``: lengths as a contiguous int32 (B,)
    tensor on the cache's device (a Python int is range-checked first), the table contiguous.

    Value checks (0 <= cache_seqlens, cache_seqlens + Sn <= capacity, the page ids of every
    position read or written inside [0, num_blocks)) read device memory, so they run where
    :func:`debug_checks` allows; a Python int length is always checked. ``rows_mapped``
    (cache_batch_idx given): a contiguous cache may hold any number of rows.
    """
    if q is _UNSET:  # kvcache.append: no query
        q = None
    else:
        tensor("q", q, 4)
    tensor("k_cache", k_cache, 4)
    tensor("v_cache", v_cache, 4)
    ref, ref_name = (q, "q") if q is not None else (k_cache, "k_cache")
    if (k is None) != (v is None):
        raise ValueError("tileattn: pass both k and v (new tokens to append) or neither")
    if k is not None:
        tensor("k", k, 4)
        tensor("v", v, 4)
    _same(ref, ref_name, k_cache=k_cache, v_cache=v_cache, k=k, v=v)
    if q is not None:
        heads_and_dims(q, k_cache, v_cache, "k_cache", "v_cache")
    elif k_cache.shape[2] != v_cache.shape[2]:
        raise ValueError(f"tileattn: v_cache has {v_cache.shape[2]} heads but k_cache has {k_cache.shape[2]}")
    if k_cache.shape[:2] != v_cache.shape[:2]:
        raise ValueError(f"tileattn: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must share "
                         f"their first two dims")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        _cache_layout(name, cache, written=k is not None)
    if q is not None:
        batch, sn = q.shape[:2]
    else:
        batch, sn = (table.shape[0] if isinstance(table, torch.Tensor) else k_cache.shape[0]), k.shape[1]
    if k is not None:
        for name, t, cache in (("k", k, k_cache), ("v", v, v_cache)):
            want = (batch, sn, cache.shape[2], cache.shape[3])
            if tuple(t.shape) != want:
                raise ValueError(f"tileattn: {name} must have shape (B, Sn, Hkv, D) = {want}, got {tuple(t.shape)}")
    if table is None:
        if k_cache.shape[0] != batch and not rows_mapped:
            raise ValueError(f"tileattn: contiguous k_cache must have batch {batch} in dim 0, got {k_cache.shape[0]}")
    else:
        table = block_table(table, k_cache, batch)
    capacity = paged.capacity(k_cache, table)
    new = 0 if k is None else sn
    if _is_int(cache_seqlens):
        if not 0 <= cache_seqlens <= capacity - new:
            raise ValueError(f"tileattn: cache_seqlens={cache_seqlens} with Sn={new} new tokens must lie in "
                             f"[0, {capacity - new}]: the cache capacity is {capacity}")
        cache_seqlens = _fastpath.lengths(int(cache_seqlens), batch, k_cache.device)
    elif not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"tileattn: cache_seqlens must be an int32 tensor or an int, got {type(cache_seqlens).__name__}")
    cache_seqlens = index_tensor("cache_seqlens", cache_seqlens, ref, 1, ref_name)
    if cache_seqlens.numel() != batch:
        raise ValueError(f"tileattn: cache_seqlens must have B={batch} entries, got {cache_seqlens.numel()}")
    if debug_checks(cache_seqlens) and batch:
        _cache_values(cache_seqlens, new, capacity, table, k_cache.shape[0], k_cache.shape[1])
    return cache_seqlens, table


def _same(ref, ref_name, **others) -> None:
    for name, t in others.items():
        if t is None or t is ref:
            continue
        if t.dtype != ref.dtype:
            raise TypeError(f"tileattn: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; q, the caches and "
                            f"k/v must share one dtype")
        if t.device != ref.device:
            raise TypeError(f"tileattn: {name} is on {t.device} but {ref_name} is on {ref.device}")


def _cache_values(cache_seqlens, new, capacity, table, num_blocks, page_size) -> None:
    """Host-side value checks of a cache call (a device read: see :func:`kvcache`)."""
    lo, hi = (int(x) for x in torch.aminmax(cache_seqlens))
    if lo < 0:
        raise ValueError(f"tileattn: cache_seqlens must be >= 0, got {cache_seqlens.tolist()}")
    if hi + new > capacity:
        raise ValueError(f"tileattn: cache_seqlens + Sn reaches {hi + new} tokens, beyond the cache capacity "
                         f"{capacity} (cache_seqlens={cache_seqlens.tolist()}, Sn={new})")
    if table is not None:
        pages = paged.pages_in_use(table, cache_seqlens.long() + new, page_size)
        if pages.numel() and (int(pages.min()) < 0 or int(pages.max()) >= num_blocks):
            raise ValueError(f"tileattn: block_table holds page ids outside [0, {num_blocks}) among the pages in use "
                             f"(got {int(pages.min())}..{int(pages.max())})")
