"""Split-KV attention of new query tokens over a contiguous or paged KV cache (flash-decoding).

Sub notation (kernel names)::

    b, hkv      batch row and KV head of this program (program axis 0 = b * Hkv + hkv)
    G           query heads per KV head (Hq // Hkv); query head h reads KV head h // G
    Sn          new query tokens per sequence (1 = decode, more = chunked prefill)
    Sk          keys attended by sequence b: cache_seqlens[b] (+ Sn when new k/v were appended)
    off         Sk - Sn: bottom-right alignment, row t sits at key position t + off
    packed row  r = t * G + g for token t and query head h = hkv * G + g; the Sn * G rows of one
                KV head are the M dimension of tl.dot, so each K/V tile is read once for all
    split       program axis 1: the key range [lo, hi) of a row block is cut, on device, into
                NUM_SPLITS runs of whole BLOCK_N tiles; each run yields a partial (out, lse)
    m_i, l_i    online-softmax running max and sum, base 2: scores leave the pipeline (scale,
                softcap, ALiBi: natural units) times log2(e); lse is stored in natural log

Causal mask picture for Sn = 3 new tokens over Sk = 7 keys (off = 4, x = kept)::

    key j  0 1 2 3 4 5 6
    t = 0  x x x x x . .
    t = 1  x x x x x x .
    t = 2  x x x x x x x

[Note] fully masked rows
    A row whose kept keys so far are none has m_i = -inf; exponents then subtract 0 instead of
    m_i, so p = exp2(-inf) = 0 and l_i stays 0. At the end such a row writes out = 0 and
    lse = -inf (the sink logit when sinks are given), never NaN.

[Note] page ids
    Paged caches read the tile's page ids from the block table inside the loop; the pipeliner
    copies them asynchronously one stage ahead of the K/V gathers that use them, so no load
    waits in the loop. That needs one more stage per level of indirection: the plan gives paged
    calls 5 stages (ids, K/V double-buffered: 136 KB shared memory for 128-key bf16 tiles at
    D=128, as contiguous with 3). A tile inside one page reads one scalar id; a tile of whole
    pages (PAGE_SIZE divides BLOCK_N) reads one id per page and broadcasts it over the page's
    slots (8 ids per 128-key tile at page size 16); other page sizes read one id per key.
    A tile's ids are read once for K and V. The slots' offsets are the same for every tile and
    computed once before the loop, and V reuses K's row offsets when their page and slot
    strides match (KV_SAME_ROWS). H200, bf16, page 16, CUDA-graph us before / after: B=1 4k
    14.8 / 13.5, B=1 128k 140.9 / 129.6, B=64 4k 267.0 / 254.6. Page ids are scaled by the page
    stride after the broadcast: scaled before, the compiler loses the offsets' 16-byte
    divisibility and the gathers went 24-78x slower.
"""

import torch
import triton
import triton.language as tl

from tileattn.backends.triton.launch import fast
from tileattn.plan import next_pow2

from .combine import LN2, LOG2E, _rows_mask, combine_splits


@triton.jit
def _tanh(x):
    """tanh in fp32 from exp2 only (interpreter-portable); Taylor series near 0 keeps it
    relatively accurate where 1 - exp(-2|x|) would cancel."""
    ax = tl.abs(x)
    e = tl.exp2(-2.8853900817779268 * ax)  # exp(-2|x|)
    big = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    small = ax * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * 0.021869488536155203))))
    t = tl.where(ax < 0.25, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def _slot_rows(stride_s, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """int64 (BLOCK_N,) offsets of a tile's keys within their pages, as far as they are the same
    for every tile (tiles start at multiples of BLOCK_N): slot * stride_s when pages divide the
    tile, (key - tile start) * stride_s when the tile lies in one page, else 0 (per key, in
    :func:`_page_rows`). Computed once, before the loop."""
    offs = tl.arange(0, BLOCK_N).to(tl.int64)
    if BLOCK_N % PAGE_SIZE == 0:
        return (offs % PAGE_SIZE) * stride_s
    elif PAGE_SIZE % BLOCK_N == 0:
        return offs * stride_s
    else:
        return offs * 0


@triton.jit
def _page_ids(BT_ROW, start_n, end, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """int64 page ids of the keys start_n .. start_n + BLOCK_N (keys >= end get page 0), read
    once per tile for K and V: a scalar when the tile lies in one page, else (BLOCK_N,).

    BT_ROW points at the sequence's block-table row; key j sits in page BT_ROW[j // PAGE_SIZE]
    at slot j % PAGE_SIZE. See [Note] page ids: one id read when the tile lies in one page, one
    per page when pages divide the tile, else one per key.
    """
    if PAGE_SIZE % BLOCK_N == 0:
        return tl.load(BT_ROW + start_n // PAGE_SIZE, mask=start_n < end, other=0).to(tl.int64)
    elif BLOCK_N % PAGE_SIZE == 0:
        PAGES: tl.constexpr = BLOCK_N // PAGE_SIZE
        offs_p = start_n // PAGE_SIZE + tl.arange(0, PAGES)
        ids = tl.load(BT_ROW + offs_p, mask=offs_p * PAGE_SIZE < end, other=0).to(tl.int64)
        return tl.reshape(tl.broadcast_to(ids[:, None], (PAGES, PAGE_SIZE)), (BLOCK_N,))
    else:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        return tl.load(BT_ROW + offs_n // PAGE_SIZE, mask=offs_n < end, other=0).to(tl.int64)


@triton.jit
def _page_rows(page, start_n, slot_rows, stride_p, stride_s, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """int64 (BLOCK_N,) element offsets page * stride_p + slot * stride_s of the keys start_n ..
    start_n + BLOCK_N, from their ids (:func:`_page_ids`) and ``slot_rows`` (:func:`_slot_rows`).
    Ids are scaled here, after _page_ids' broadcast: scaled before it, the compiler loses the
    offsets' 16-byte divisibility (see [Note] page ids)."""
    if PAGE_SIZE % BLOCK_N == 0:
        return (page * stride_p + tl.cast(start_n % PAGE_SIZE, tl.int64) * stride_s) + slot_rows
    elif BLOCK_N % PAGE_SIZE == 0:
        return page * stride_p + slot_rows
    else:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        return page * stride_p + (offs_n % PAGE_SIZE).to(tl.int64) * stride_s


@triton.jit
def _decode_kernel(
    Q, K, V, SEQLENS, BLOCK_TABLE, ALIBI, SINKS, OUT, LSE,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,  # paged: page, slot, head
    stride_vb, stride_vs, stride_vh,
    stride_btb, stride_ab, stride_ah, stride_sink,
    stride_ob, stride_os, stride_oh, stride_osplit,
    stride_lb, stride_lh, stride_ls, stride_lsplit,
    Hkv, Sn, n_new, scale, softcap, window_left, window_right,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PAGE_SIZE: tl.constexpr, KV_SAME_ROWS: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLIT: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_SINKS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One (b, hkv, split, row block): partial attention of BLOCK_M packed rows over its keys.

    SPLIT: write the normalized partial out (fp32) and its natural-log lse (no sink) to the
    workspace at split index pid_s; otherwise write the final out (OUT's dtype) and lse.
    KV_SAME_ROWS: K and V share page/slot (or batch/seq) strides, so V reuses K's row offsets.
    """
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = (pid_bh // Hkv).to(tl.int64)
    hkv = (pid_bh % Hkv).to(tl.int64)

    # packed rows -> (token t, query head h); padding rows (row_ok False) load q = 0, store nothing
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Sn * G
    t = rows // G
    h = hkv * G + rows % G
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * stride_qb + t.to(tl.int64)[:, None] * stride_qs + h[:, None] * stride_qh
                + offs_d[None, :], mask=_rows_mask(row_ok, offs_d, HEAD_DIM, BLOCK_D), other=0.0)
    if HAS_ALIBI:
        slope = tl.load(ALIBI + b * stride_ab + h * stride_ah, mask=row_ok, other=0.0)

    # keys this row block may keep: [lo, hi), tile-aligned; this split's run of whole tiles
    Sk = tl.load(SEQLENS + b) + n_new
    off = Sk - Sn
    pos = t + off
    lo = 0
    hi = Sk
    if HAS_LEFT:
        lo = tl.maximum((pid_m * BLOCK_M) // G + off - window_left, 0)
    if HAS_RIGHT:
        t_last = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // G, Sn - 1)
        hi = tl.minimum(t_last + off + window_right + 1, Sk)
    lo = lo // BLOCK_N * BLOCK_N
    n_tiles = (tl.maximum(hi - lo, 0) + BLOCK_N - 1) // BLOCK_N
    per_split = (n_tiles + NUM_SPLITS - 1) // NUM_SPLITS
    start = lo + pid_s * per_split * BLOCK_N
    end = tl.minimum(start + per_split * BLOCK_N, hi)

    k_base = K + hkv * stride_kh
    v_base = V + hkv * stride_vh
    if PAGE_SIZE == 0:
        k_base += b * stride_kb
        v_base += b * stride_vb
    else:  # see [Note] page ids
        bt_base = BLOCK_TABLE + b * stride_btb
        k_slots = _slot_rows(stride_ks, PAGE_SIZE, BLOCK_N)
        v_slots = _slot_rows(stride_vs, PAGE_SIZE, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = offs_n < end
        if PAGE_SIZE == 0:
            k_rows = offs_n.to(tl.int64) * stride_ks
        else:
            page = _page_ids(bt_base, start_n, end, PAGE_SIZE, BLOCK_N)
            k_rows = _page_rows(page, start_n, k_slots, stride_kb, stride_ks, PAGE_SIZE, BLOCK_N)
        if KV_SAME_ROWS:
            v_rows = k_rows
        elif PAGE_SIZE == 0:
            v_rows = offs_n.to(tl.int64) * stride_vs
        else:
            v_rows = _page_rows(page, start_n, v_slots, stride_vb, stride_vs, PAGE_SIZE, BLOCK_N)
        k = tl.load(k_base + k_rows[:, None] + offs_d[None, :],
                    mask=_rows_mask(kv_ok, offs_d, HEAD_DIM, BLOCK_D), other=0.0)
        v = tl.load(v_base + v_rows[:, None] + offs_dv[None, :],
                    mask=_rows_mask(kv_ok, offs_dv, HEAD_DIM_V, BLOCK_DV), other=0.0)

        # score pipeline (API.md order): scale, softcap, ALiBi, window/causal keep
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        if HAS_SOFTCAP:
            s = softcap * _tanh(s / softcap)
        if HAS_ALIBI:
            s -= slope[:, None] * tl.abs(pos[:, None] - offs_n[None, :]).to(tl.float32)
        keep = kv_ok[None, :]
        if HAS_LEFT:
            keep = keep & (offs_n[None, :] >= pos[:, None] - window_left)
        if HAS_RIGHT:
            keep = keep & (offs_n[None, :] <= pos[:, None] + window_right)
        s = tl.where(keep, s * LOG2E, float("-inf"))

        # online softmax, see [Note] fully masked rows
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_sub)
        p = tl.exp2(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if not SPLIT:  # sinks add exp(sink) to the denominator only (split partials: in combine)
        if HAS_SINKS:
            sink = tl.load(SINKS + h * stride_sink, mask=row_ok, other=0.0) * LOG2E
            m_fin = tl.maximum(m_i, sink)
            alpha = tl.exp2(m_i - m_fin)
            l_i = l_i * alpha + tl.exp2(sink - m_fin)
            acc = acc * alpha[:, None]
            m_i = m_fin
    l_ok = l_i > 0
    l_safe = tl.where(l_ok, l_i, 1.0)
    lse = tl.where(l_ok, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))
    t64 = t.to(tl.int64)
    o_ptrs = (OUT + b * stride_ob + t64[:, None] * stride_os + h[:, None] * stride_oh
              + pid_s * stride_osplit + offs_dv[None, :])
    tl.store(o_ptrs, (acc / l_safe[:, None]).to(OUT.dtype.element_ty),
             mask=_rows_mask(row_ok, offs_dv, HEAD_DIM_V, BLOCK_DV))
    tl.store(LSE + b * stride_lb + h * stride_lh + t64 * stride_ls + pid_s * stride_lsplit, lse, mask=row_ok)


def decode_attention(q, k_cache, v_cache, cache_seqlens, block_table, n_new, *, scale, window, softcap,
                     alibi_slopes, sinks, plan):
    """Attend q (B, Sn, Hq, D) to the first cache_seqlens[b] + n_new keys of each sequence.

    k_cache/v_cache: (B, Smax, Hkv, D[v]) with block_table None, or paged (num_blocks,
    page_size, Hkv, D[v]) with block_table int32 (B, max_blocks); any strides, last dim
    stride 1. cache_seqlens int32 (B,) on device (never read on the host). ``plan`` is a
    :class:`tileattn.backends.triton.kvcache.DecodePlan`. Returns out (B, Sn, Hq, Dv) in
    q.dtype (contiguous) and lse (B, Hq, Sn) float32 (natural log, sink included).
    """
    B, Sn, Hq, D = q.shape
    Hkv, Dv = k_cache.shape[2], v_cache.shape[3]
    out = torch.empty((B, Sn, Hq, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Sn), dtype=torch.float32, device=q.device)
    splits = plan.num_splits
    if splits > 1:  # fp32 workspace sized from shapes only (CUDA-graph safe)
        dst_o = torch.empty((B, Sn, Hq, splits, Dv), dtype=torch.float32, device=q.device)
        dst_lse = torch.empty((B, Sn, Hq, splits), dtype=torch.float32, device=q.device)
        o_strides = dst_o.stride()[:4]
        l_strides = (dst_lse.stride(0), dst_lse.stride(2), dst_lse.stride(1), dst_lse.stride(3))
    else:
        dst_o, dst_lse = out, lse
        o_strides = (*out.stride()[:3], 0)
        l_strides = (*lse.stride(), 0)
    paged = block_table is not None
    left, right = window
    fast(_decode_kernel)[(B * Hkv, splits, plan.m_blocks)](
        q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, sinks, dst_o, dst_lse,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0) if paged else 0,
        *(alibi_slopes.stride() if alibi_slopes is not None else (0, 0)),
        sinks.stride(0) if sinks is not None else 0,
        *o_strides, *l_strides,
        Hkv, Sn, n_new, scale, softcap, left, right,
        G=Hq // Hkv, HEAD_DIM=D, HEAD_DIM_V=Dv,
        BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
        BLOCK_D=next_pow2(D), BLOCK_DV=next_pow2(Dv),
        PAGE_SIZE=k_cache.shape[1] if paged else 0, NUM_SPLITS=splits, SPLIT=splits > 1,
        KV_SAME_ROWS=k_cache.stride()[:2] == v_cache.stride()[:2],
        HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, HAS_SOFTCAP=softcap > 0,
        HAS_ALIBI=alibi_slopes is not None, HAS_SINKS=sinks is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    if splits > 1:
        combine_splits(dst_o, dst_lse, sinks, out, lse)
    return out, lse
