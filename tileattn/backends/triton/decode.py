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
    m_i, l_i    online-softmax running max and sum, base 2 (``score.py``'s notation: the same
                helpers as the forward compute t = s * log2(e)); lse is stored in natural log
    b_cache     the cache row of batch row b: BatchIdx[b] with BATCH_IDX (contiguous caches), else b
    pad         Leftpad[b] with LEFTPAD: the sequence's first key slot (keys before it are not
                part of it), else 0; positions stay slot numbers (see [Note] leftpad)
    ROTARY      0 none, 1 pairs (d, d + ROTARY_DIM / 2), 2 interleaved pairs (2i, 2i + 1): q and
                the new keys rotate on their first ROTARY_DIM dims (see [Note] rotary)

Causal mask picture for Sn = 3 new tokens over Sk = 7 keys (off = 4, x = kept)::

    key j  0 1 2 3 4 5 6
    t = 0  x x x x x . .
    t = 1  x x x x x x .
    t = 2  x x x x x x x

[Note] fully masked rows
    As score.py's [Note] empty rows: a row whose kept keys so far are none has m_i = -inf;
    exponents then subtract 0 instead of m_i, so p = exp2(-inf) = 0 and l_i stays 0. At the
    end such a row writes out = 0 and lse = -inf (the sink logit when sinks are given), never
    NaN. Sinks are folded in after the loop (:func:`score.sink_fold`), or by the combine.

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
    strides match (KV_SAME_ROWS). Page ids are scaled by the page stride after the broadcast:
    scaled before, the compiler loses the offsets' 16-byte divisibility and the gathers are
    many times slower.

[Note] new keys
    New k/v (B, Sn, Hkv, D) are appended by this kernel, not by a kernel launched before it
    (a launch is a visible share of a B=1 step). Each split attends its share of the new
    keys from k_new/v_new, never from the cache, so no program reads a slot that another one
    is writing; the cache loop stops at cache_seqlens[b]. The first BLOCK_NEW new rows are
    loaded before cache_seqlens (their addresses do not depend on it) and attended before the
    cache loop; rows past BLOCK_NEW (chunked prefill) are loaded tile by tile. Program
    (b, hkv, split 0, row block 0) then stores them, also before the loop, from a second load
    of rows it has just read (not timed apart: reusing k_new/v_new changes the kernel's code
    and needs a GPU run). Nothing of the new rows stays live through the loop: holding
    k_new/v_new in registers until after it made the paged loop slower, and storing after the
    loop was slower than storing before it.

[Note] rotary
    flash-attn's rotary embedding, fused: new key j of row b turns at position Sk_old + j
    (Sk_old = cache_seqlens[b]); query row t at Sk_old + t when causal or windowed, else every
    row at Sk_old. :func:`_rotary` loads each element and its pair partner, and cos/sin
    (seqlen_ro, ROTARY_DIM / 2, contiguous) at the row's position, and returns x * cos +
    partner * (-sin for a pair's first element, +sin for its second) in fp32, rounded to q's or
    the cache's dtype as flash-attn does. The rotated keys are the ones attended and appended.
    q and the new keys are loaded after cache_seqlens then (their cos/sin rows depend on it).

[Note] leftpad
    cache_leftpad[b] = pad: the sequence's keys are cache slots pad .. Sk - 1. Positions are
    not renumbered: causal and window edges and ALiBi distances depend on slot differences
    only, and rotary positions are slots (flash-attn's rule; reference.py is the contract).
    The key range starts at max(lo, pad), tile-aligned down; keys before pad in the first tile
    are neither loaded (zeros, so junk in padding slots never reaches a sum) nor kept.
"""

import torch
import triton
import triton.language as tl

from tileattn.backends.triton.launch import fast
from tileattn.backends.triton.plan import next_pow2

from .combine import _rows_mask, combine_splits
from .score import (LOG2E, add_nonfinite, any_nonfinite, finish_rows, keep_tile, nonfinite, sink_fold, softmax_step,
                    step_input)


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
def _attend_tile(q, k, v, offs_n, n_lo, n_end, pos, alibi_log2, m_i, l_i, acc, qk_scale, softcap_scale,
                 softcap_log2, window_left, window_right, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, NEG_SCALE: tl.constexpr, CHECK_LO: tl.constexpr,
                 DOT_PREC: tl.constexpr, EXACT: tl.constexpr):
    """Online-softmax update of m_i, l_i (BLOCK_M,) and acc (BLOCK_M, BLOCK_DV) with the keys k
    (N, BLOCK_D) and values v (N, BLOCK_DV) at key positions offs_n (N,); keys at or past n_end
    (and, with CHECK_LO, before n_lo) are dropped. Rows sit at key positions pos (BLOCK_M,);
    alibi_log2 (BLOCK_M, 1) is each row's slope * log2(e). Returns the updated (m_i, l_i, acc).
    The score and keep rules are the forward's (score.py, diag 0: positions are absolute).
    EXACT (score [Note] hidden values): m_i is final, only acc grows, non-finite values contained."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    x, x_scale = step_input(qk, pos, offs_n, 0, qk_scale, softcap_scale, softcap_log2, alibi_log2, 0,
                            SOFTCAP, ALIBI, 0, NEG_SCALE)
    keep = keep_tile(pos, offs_n, 0, n_end, window_left, window_right, HAS_LEFT, HAS_RIGHT)
    if CHECK_LO:
        keep = keep & (offs_n >= n_lo)[None, :]
    if EXACT:
        m_use = tl.where(m_i == float("-inf"), 0.0, m_i)
        p = tl.where(keep, tl.math.exp2(x * x_scale - m_use[:, None]), 0.0).to(v.dtype)
        if any_nonfinite(v):
            bad = nonfinite(v)
            acc = add_nonfinite(acc, p, v, bad, keep)
            v = tl.where(bad, 0.0, v).to(v.dtype)
        acc = tl.dot(p, v, acc, input_precision=DOT_PREC)
    else:
        p, alpha, m_i, l_i = softmax_step(tl.where(keep, x, float("-inf")), x_scale, m_i, l_i, True)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_i, l_i, acc


@triton.jit
def _load_new(base, offs_j, j_ok, stride_s, offs_d, DIM: tl.constexpr, BLOCK: tl.constexpr, CACHE):
    """New keys (or values) j = offs_j (N,) of one KV head, (N, BLOCK) in CACHE's dtype."""
    x = tl.load(base + offs_j.to(tl.int64)[:, None] * stride_s + offs_d[None, :],
                mask=_rows_mask(j_ok, offs_d, DIM, BLOCK), other=0.0)
    return x.to(CACHE.dtype.element_ty)


@triton.jit
def _rotary(row_ptrs, row_ok, offs_d, pos, Cos, Sin, DIM: tl.constexpr, BLOCK: tl.constexpr, ROTARY: tl.constexpr,
            ROTARY_DIM: tl.constexpr):
    """fp32 (N, BLOCK): the rows at row_ptrs (N,) (columns offs_d; rows with row_ok False = 0)
    with their first ROTARY_DIM dims rotated at positions pos (N,) (see [Note] rotary)."""
    HALF: tl.constexpr = ROTARY_DIM // 2
    x = tl.load(row_ptrs[:, None] + offs_d[None, :], mask=_rows_mask(row_ok, offs_d, DIM, BLOCK), other=0.0)
    if ROTARY == 2:  # interleaved: pairs (2i, 2i + 1) turn by angle i
        first = offs_d % 2 == 0
        partner = offs_d ^ 1
        angle = offs_d // 2
    else:  # pairs (i, i + HALF) turn by angle i
        first = offs_d < HALF
        partner = tl.where(first, offs_d + HALF, offs_d - HALF)
        angle = tl.where(first, offs_d, offs_d - HALF)
    turns = row_ok[:, None] & (offs_d < ROTARY_DIM)[None, :]
    x_pair = tl.load(row_ptrs[:, None] + partner[None, :], mask=turns, other=0.0)
    cs = pos.to(tl.int64)[:, None] * HALF + angle[None, :]
    cos = tl.load(Cos + cs, mask=turns, other=1.0).to(tl.float32)
    sin = tl.load(Sin + cs, mask=turns, other=0.0).to(tl.float32)
    return x.to(tl.float32) * cos + x_pair.to(tl.float32) * tl.where(first[None, :], -sin, sin)


@triton.jit
def _new_keys(kn_base, offs_j, j_ok, stride_s, offs_d, Sk_old, Cos, Sin, DIM: tl.constexpr, BLOCK: tl.constexpr,
              CACHE, ROTARY: tl.constexpr, ROTARY_DIM: tl.constexpr):
    """New keys j = offs_j (N,) of one KV head, (N, BLOCK) in CACHE's dtype; with ROTARY turned
    at positions Sk_old + j (see [Note] rotary)."""
    if ROTARY == 0:
        return _load_new(kn_base, offs_j, j_ok, stride_s, offs_d, DIM, BLOCK, CACHE)
    else:
        k = _rotary(kn_base + offs_j.to(tl.int64) * stride_s, j_ok, offs_d, Sk_old + offs_j, Cos, Sin, DIM, BLOCK,
                    ROTARY, ROTARY_DIM)
        return k.to(CACHE.dtype.element_ty)


@triton.jit
def _new_rows(p, p_ok, bt_base, stride_kb, stride_ks, stride_vb, stride_vs, PAGE_SIZE: tl.constexpr):
    """int64 (N,) offsets of cache positions p (N,) in K and V: rows of the sequence's
    contiguous cache, or slots of the pages its block-table row (bt_base) names."""
    if PAGE_SIZE == 0:
        return p.to(tl.int64) * stride_ks, p.to(tl.int64) * stride_vs
    else:
        page = tl.load(bt_base + p // PAGE_SIZE, mask=p_ok, other=0).to(tl.int64)
        slot = (p % PAGE_SIZE).to(tl.int64)
        return page * stride_kb + slot * stride_ks, page * stride_vb + slot * stride_vs


@triton.jit
def _store_rows(base, rows, x, row_ok, offs_d, DIM: tl.constexpr, BLOCK: tl.constexpr):
    """Store x (N, BLOCK) at base + rows (N,) (columns offs_d; rows with row_ok False skipped)."""
    tl.store(base + rows[:, None] + offs_d[None, :], x, mask=_rows_mask(row_ok, offs_d, DIM, BLOCK))


@triton.jit
def _decode_kernel(
    Q, K, V, K_NEW, V_NEW, SEQLENS, BLOCK_TABLE, Slopes, Sinks, Cos, Sin, BatchIdx, Leftpad, OUT, LSE,
    stride_qb, stride_qs, stride_qh,
    stride_knb, stride_kns, stride_knh, stride_vnb, stride_vns, stride_vnh,
    stride_kb, stride_ks, stride_kh,  # paged: page, slot, head
    stride_vb, stride_vs, stride_vh,
    stride_btb, stride_ab, stride_ah, stride_sink,
    stride_ob, stride_os, stride_oh, stride_osplit,
    stride_lb, stride_lh, stride_ls, stride_lsplit,
    Hkv, Sn, n_new, qk_scale, softcap_scale, softcap_log2, window_left, window_right,
    G: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_NEW: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, HAS_NEW: tl.constexpr, PAGE_SIZE: tl.constexpr, KV_SAME_ROWS: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SPLIT: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, SINKS: tl.constexpr, ROTARY: tl.constexpr, ROTARY_DIM: tl.constexpr,
    BATCH_IDX: tl.constexpr, LEFTPAD: tl.constexpr, HIDES: tl.constexpr, DOT_PREC: tl.constexpr,
    NEG_SCALE: tl.constexpr = False,
):
    """One (b, hkv, split, row block): partial attention of BLOCK_M packed rows over its keys;
    with new keys (HAS_NEW), program (b, hkv, 0, 0) also appends them (see [Note] new keys).

    SPLIT: write the normalized partial out (fp32) and its natural-log lse (no sink) to the
    workspace at split index pid_s; otherwise write the final out (OUT's dtype) and lse.
    KV_SAME_ROWS: K and V share page/slot (or batch/seq) strides, so V reuses K's row offsets.
    Score flags and scalars as the forward's (``tileattn.score.ScoreSpec``). ROTARY (with new
    keys), BATCH_IDX (contiguous caches) and LEFTPAD as in the glossary; all off, the kernel is
    the plain one.
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
    if ROTARY == 0:  # else loaded after cache_seqlens ([Note] rotary)
        q = tl.load(Q + b * stride_qb + t.to(tl.int64)[:, None] * stride_qs + h[:, None] * stride_qh
                    + offs_d[None, :], mask=_rows_mask(row_ok, offs_d, HEAD_D, BLOCK_D), other=0.0)
    alibi_log2 = 0.0
    if ALIBI:  # one head per packed row: (BLOCK_M, 1)
        alibi_log2 = (tl.load(Slopes + b * stride_ab + h * stride_ah, mask=row_ok, other=0.0) * LOG2E)[:, None]
    if HAS_NEW:  # issued before the length load: their addresses do not depend on it
        offs_j = tl.arange(0, BLOCK_NEW)
        kn_base = K_NEW + b * stride_knb + hkv * stride_knh
        vn_base = V_NEW + b * stride_vnb + hkv * stride_vnh
        if ROTARY == 0:
            k_new = _load_new(kn_base, offs_j, offs_j < n_new, stride_kns, offs_d, HEAD_D, BLOCK_D, K)
        v_new = _load_new(vn_base, offs_j, offs_j < n_new, stride_vns, offs_dv, HEAD_DV, BLOCK_DV, V)

    # keys this row block may keep: [lo, hi), tile-aligned; this split's run of whole tiles
    Sk_old = tl.load(SEQLENS + b)
    Sk = Sk_old + n_new
    off = Sk - Sn
    pos = t + off
    if ROTARY != 0:  # with new keys: off = Sk_old; q rows at their positions when causal or windowed
        q_pos = pos if HAS_LEFT or HAS_RIGHT else t * 0 + Sk_old
        q = _rotary(Q + b * stride_qb + t.to(tl.int64) * stride_qs + h * stride_qh, row_ok, offs_d, q_pos, Cos, Sin,
                    HEAD_D, BLOCK_D, ROTARY, ROTARY_DIM).to(Q.dtype.element_ty)
        k_new = _new_keys(kn_base, offs_j, offs_j < n_new, stride_kns, offs_d, Sk_old, Cos, Sin, HEAD_D, BLOCK_D, K,
                          ROTARY, ROTARY_DIM)
    lo = 0
    hi = Sk
    if HAS_LEFT:
        lo = tl.maximum((pid_m * BLOCK_M) // G + off - window_left, 0)
    pad = 0
    if LEFTPAD:  # see [Note] leftpad
        pad = tl.load(Leftpad + b)
        lo = tl.maximum(lo, pad)
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
        b_cache = b
        if BATCH_IDX:
            b_cache = tl.load(BatchIdx + b).to(tl.int64)
        k_base += b_cache * stride_kb
        v_base += b_cache * stride_vb
        bt_base = BLOCK_TABLE  # None
    else:  # see [Note] page ids
        bt_base = BLOCK_TABLE + b * stride_btb
        k_slots = _slot_rows(stride_ks, PAGE_SIZE, BLOCK_N)
        v_slots = _slot_rows(stride_vs, PAGE_SIZE, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    if HAS_NEW:  # this split's new keys j in [new_lo, new_hi), see [Note] new keys
        new_lo = tl.maximum(start - Sk_old, 0)
        new_hi = tl.minimum(end - Sk_old, n_new)
    cache_end = tl.minimum(end, Sk_old)
    # Pass 1 (score [Note] hidden values): only when pass 0 left a non-finite row and a loaded key
    # may be hidden from some row (HIDES, decode_attention says when)
    for exact in tl.static_range(1 + HIDES):
        if exact:
            redo = any_nonfinite(acc)
        else:
            redo = True
        if redo:
            if exact:
                acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
            if HAS_NEW:
                if (new_lo < BLOCK_NEW) & (new_lo < new_hi):
                    m_i, l_i, acc = _attend_tile(q, k_new, v_new, Sk_old + offs_j, Sk_old + new_lo, Sk_old + new_hi,
                                                 pos, alibi_log2, m_i, l_i, acc, qk_scale, softcap_scale,
                                                 softcap_log2, window_left, window_right, SOFTCAP, ALIBI, HAS_LEFT,
                                                 HAS_RIGHT, NEG_SCALE, True, DOT_PREC, exact)
                for j0 in range(tl.maximum(new_lo, BLOCK_NEW), new_hi, BLOCK_NEW):  # Sn > BLOCK_NEW only
                    offs_jn = j0 + offs_j
                    kv_ok = offs_jn < new_hi
                    k = _new_keys(kn_base, offs_jn, kv_ok, stride_kns, offs_d, Sk_old, Cos, Sin, HEAD_D, BLOCK_D, K,
                                  ROTARY, ROTARY_DIM)
                    v = _load_new(vn_base, offs_jn, kv_ok, stride_vns, offs_dv, HEAD_DV, BLOCK_DV, V)
                    m_i, l_i, acc = _attend_tile(q, k, v, Sk_old + offs_jn, 0, Sk_old + new_hi, pos, alibi_log2,
                                                 m_i, l_i, acc, qk_scale, softcap_scale, softcap_log2, window_left,
                                                 window_right, SOFTCAP, ALIBI, HAS_LEFT, HAS_RIGHT, NEG_SCALE, False,
                                                 DOT_PREC, exact)
            for start_n in range(start, cache_end, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                kv_ok = offs_n < cache_end
                if LEFTPAD:
                    kv_ok = kv_ok & (offs_n >= pad)
                if PAGE_SIZE == 0:
                    k_rows = offs_n.to(tl.int64) * stride_ks
                else:
                    page = _page_ids(bt_base, start_n, cache_end, PAGE_SIZE, BLOCK_N)
                    k_rows = _page_rows(page, start_n, k_slots, stride_kb, stride_ks, PAGE_SIZE, BLOCK_N)
                if KV_SAME_ROWS:
                    v_rows = k_rows
                elif PAGE_SIZE == 0:
                    v_rows = offs_n.to(tl.int64) * stride_vs
                else:
                    v_rows = _page_rows(page, start_n, v_slots, stride_vb, stride_vs, PAGE_SIZE, BLOCK_N)
                k = tl.load(k_base + k_rows[:, None] + offs_d[None, :],
                            mask=_rows_mask(kv_ok, offs_d, HEAD_D, BLOCK_D), other=0.0)
                v = tl.load(v_base + v_rows[:, None] + offs_dv[None, :],
                            mask=_rows_mask(kv_ok, offs_dv, HEAD_DV, BLOCK_DV), other=0.0)
                m_i, l_i, acc = _attend_tile(q, k, v, offs_n, pad, cache_end, pos, alibi_log2, m_i, l_i, acc,
                                             qk_scale, softcap_scale, softcap_log2, window_left, window_right,
                                             SOFTCAP, ALIBI, HAS_LEFT, HAS_RIGHT, NEG_SCALE, LEFTPAD, DOT_PREC, exact)

    if HAS_NEW:
        if (pid_s == 0) & (pid_m == 0):  # one program per (b, hkv) appends the new keys
            for j0 in range(0, n_new, BLOCK_NEW):
                offs_jn = j0 + offs_j
                j_ok = offs_jn < n_new
                k_rows, v_rows = _new_rows(Sk_old + offs_jn, j_ok, bt_base, stride_kb, stride_ks,
                                           stride_vb, stride_vs, PAGE_SIZE)
                _store_rows(k_base, k_rows, _new_keys(kn_base, offs_jn, j_ok, stride_kns, offs_d, Sk_old, Cos, Sin,
                                                      HEAD_D, BLOCK_D, K, ROTARY, ROTARY_DIM),
                            j_ok, offs_d, HEAD_D, BLOCK_D)
                _store_rows(v_base, v_rows, _load_new(vn_base, offs_jn, j_ok, stride_vns, offs_dv, HEAD_DV,
                                                      BLOCK_DV, V), j_ok, offs_dv, HEAD_DV, BLOCK_DV)

    if not SPLIT:  # sinks add exp(sink) to the denominator only (split partials: in combine)
        if SINKS:
            sink_log2 = tl.load(Sinks + h * stride_sink, mask=row_ok, other=0.0) * LOG2E
            m_i, l_i, acc = sink_fold(m_i, l_i, acc, sink_log2)
    out, lse = finish_rows(acc, m_i, l_i, 1.0)
    t64 = t.to(tl.int64)
    o_ptrs = (OUT + b * stride_ob + t64[:, None] * stride_os + h[:, None] * stride_oh
              + pid_s * stride_osplit + offs_dv[None, :])
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty),
             mask=_rows_mask(row_ok, offs_dv, HEAD_DV, BLOCK_DV))
    tl.store(LSE + b * stride_lb + h * stride_lh + t64 * stride_ls + pid_s * stride_lsplit, lse, mask=row_ok)


def _hides(flags, Sn, has_new, splits) -> bool:
    """Can a key this kernel loads be hidden from one of its rows (score [Note] hidden values)?
    The window's left side cuts the first tile; with several new tokens causal hides later new
    keys from earlier rows, and a split's new-key tile holds other splits' keys. One new token
    without a left side keeps every key it loads (past the end: zero-filled)."""
    return bool(flags["HAS_LEFT"] or (Sn > 1 and (flags["HAS_RIGHT"] or (has_new and splits > 1))))


def decode_attention(q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, spec, *, plan, rotary=None,
                     cache_batch_idx=None, cache_leftpad=None):
    """Append k_new/v_new to the caches, then attend q (B, Sn, Hq, D) to the first
    cache_seqlens[b] (+ Sn with new keys) keys of each sequence.

    k_cache/v_cache: (B, Smax, Hkv, D[v]) with block_table None, or paged (num_blocks,
    page_size, Hkv, D[v]) with block_table int32 (B, max_blocks); any strides, last dim
    stride 1. k_new/v_new: None, or (B, Sn, Hkv, D[v]) with last dim stride 1, written in
    place at positions cache_seqlens[b] .. + Sn (the caller checked the capacity).
    cache_seqlens int32 (B,) on device (never read on the host). ``plan`` is a
    :class:`tileattn.backends.triton.plan.DecodePlan` for these shapes. ``rotary``: None or
    (cos, sin, interleaved) with cos/sin (seqlen_ro, rotary_dim / 2) (k_new given);
    ``cache_batch_idx``: None or int32 (B,) cache rows of a contiguous cache (B_cache, Smax, ...);
    ``cache_leftpad``: None or int32 (B,) first key slots (see the kernel's notes). Returns out
    (B, Sn, Hq, Dv) in q.dtype (contiguous) and lse (B, Hq, Sn) float32 (natural log, sink included).
    """
    B, Sn, Hq, D = q.shape
    Hkv, Dv = k_cache.shape[2], v_cache.shape[3]
    out = torch.empty((B, Sn, Hq, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Sn), dtype=torch.float32, device=q.device)
    splits = plan.num_splits
    if splits > 1:  # the plan's fp32 partials for this stream and thread (plan [Note] decode workspace)
        dst_o, dst_lse = plan.workspace()
        o_strides = dst_o.stride()[:4]
        l_strides = (dst_lse.stride(0), dst_lse.stride(2), dst_lse.stride(1), dst_lse.stride(3))
    else:
        dst_o, dst_lse = out, lse
        o_strides = (*out.stride()[:3], 0)
        l_strides = (*lse.stride(), 0)
    paged = block_table is not None
    has_new = k_new is not None
    alibi_slopes, sinks = spec.alibi_slopes, spec.sinks
    flags = spec.constexprs()
    cos, sin, interleaved = rotary if rotary is not None else (None, None, False)
    if cos is not None:  # row stride ROTARY_DIM / 2
        cos, sin = cos.contiguous(), sin.contiguous()
    fast(_decode_kernel)[(B * Hkv, splits, plan.m_blocks)](
        q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, alibi_slopes, sinks, cos, sin,
        cache_batch_idx, cache_leftpad, dst_o, dst_lse,
        q.stride(0), q.stride(1), q.stride(2),
        *(k_new.stride()[:3] if has_new else (0, 0, 0)), *(v_new.stride()[:3] if has_new else (0, 0, 0)),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0) if paged else 0,
        *(alibi_slopes.stride() if alibi_slopes is not None else (0, 0)),
        sinks.stride(0) if sinks is not None else 0,
        *o_strides, *l_strides,
        Hkv, Sn, Sn if has_new else 0, *spec.scalars()[:5],  # qk_scale .. window_right
        G=Hq // Hkv, HEAD_D=D, HEAD_DV=Dv,
        BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_NEW=min(plan.block_n, max(16, next_pow2(Sn))),
        BLOCK_D=next_pow2(D), BLOCK_DV=next_pow2(Dv), HAS_NEW=has_new,
        PAGE_SIZE=k_cache.shape[1] if paged else 0, NUM_SPLITS=splits, SPLIT=splits > 1,
        KV_SAME_ROWS=k_cache.stride()[:2] == v_cache.stride()[:2],
        **{name: flags[name] for name in ("HAS_LEFT", "HAS_RIGHT", "SOFTCAP", "ALIBI", "SINKS", "NEG_SCALE")},
        ROTARY=0 if cos is None else 1 + bool(interleaved), ROTARY_DIM=0 if cos is None else 2 * cos.shape[1],
        BATCH_IDX=cache_batch_idx is not None, LEFTPAD=cache_leftpad is not None,
        HIDES=_hides(flags, Sn, has_new, splits),
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    if splits > 1:
        combine_splits(dst_o, dst_lse, sinks, out, lse)
    return out, lse
