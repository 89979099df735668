"""In-place append of new keys/values into a contiguous or paged KV cache.

New token t of sequence b goes to cache position p = cache_seqlens[b] + t: row p of a
contiguous cache (B, Smax, Hkv, D), or slot p % page_size of page block_table[b, p // page_size]
of a paged cache (num_blocks, page_size, Hkv, D). Positions are read on device (no host sync).
"""

import triton
import triton.language as tl

from tileattn.backends.triton.launch import fast
from tileattn.plan import next_pow2

from .combine import _rows_mask


@triton.jit
def _copy_heads(SRC, DST, Hkv, stride_src_h, stride_dst_h, DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """Copy all Hkv heads (rows of DIM elements) of one token from SRC to DST, casting."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = _rows_mask(offs_h < Hkv, offs_d, DIM, BLOCK_D)
    x = tl.load(SRC + offs_h[:, None] * stride_src_h + offs_d[None, :], mask=mask)
    tl.store(DST + offs_h[:, None] * stride_dst_h + offs_d[None, :], x.to(DST.dtype.element_ty), mask=mask)


@triton.jit
def _append_kernel(
    K_NEW, V_NEW, K, V, SEQLENS, BLOCK_TABLE,
    stride_knb, stride_kns, stride_knh, stride_vnb, stride_vns, stride_vnh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_btb,
    Sn, Hkv,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PAGE_SIZE: tl.constexpr,
):
    """One program per new token (b, t): write k_new[b, t] and v_new[b, t] (all heads)."""
    pid = tl.program_id(0)
    b = (pid // Sn).to(tl.int64)
    t = (pid % Sn).to(tl.int64)
    p = tl.load(SEQLENS + b).to(tl.int64) + t
    if PAGE_SIZE == 0:
        k_row = b * stride_kb + p * stride_ks
        v_row = b * stride_vb + p * stride_vs
    else:
        page = tl.load(BLOCK_TABLE + b * stride_btb + p // PAGE_SIZE).to(tl.int64)
        slot = p % PAGE_SIZE
        k_row = page * stride_kb + slot * stride_ks
        v_row = page * stride_vb + slot * stride_vs
    _copy_heads(K_NEW + b * stride_knb + t * stride_kns, K + k_row, Hkv, stride_knh, stride_kh,
                HEAD_DIM, BLOCK_H, BLOCK_D)
    _copy_heads(V_NEW + b * stride_vnb + t * stride_vns, V + v_row, Hkv, stride_vnh, stride_vh,
                HEAD_DIM_V, BLOCK_H, BLOCK_DV)


def append_kv(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table):
    """Write k_new/v_new (B, Sn, Hkv, D[v]) into the caches at cache_seqlens[b] .. +Sn, in place.

    Caches as in :func:`tileattn.backends.triton.decode.decode_attention`; any strides.
    The caller guarantees cache_seqlens[b] + Sn <= capacity (checked at the API).
    """
    B, Sn, Hkv, D = k_new.shape
    Dv = v_new.shape[3]
    paged = block_table is not None
    fast(_append_kernel)[(B * Sn,)](
        k_new, v_new, k_cache, v_cache, cache_seqlens, block_table,
        *k_new.stride()[:3], *v_new.stride()[:3],
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        block_table.stride(0) if paged else 0,
        Sn, Hkv,
        HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_H=next_pow2(Hkv),
        BLOCK_D=next_pow2(D), BLOCK_DV=next_pow2(Dv),
        PAGE_SIZE=k_cache.shape[1] if paged else 0,
        num_warps=4,
    )
