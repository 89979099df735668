"""Triton flash-attention backward kernels (flash-attention 2 structure), every API.md feature.

Two kernels, launched in order by ``backward.py``:

1. ``_bwd_dq_kernel``: one program per (batch or sequence, query head, BLOCK_M rows); computes
   its rows' ``delta_i = rowsum(out_i * dout_i)`` and stores it with lse2 for the dK/dV kernel
   ([Note] padded row stats), loops over key blocks, writes dq, with ``MASK_GRAD`` the dmask
   tiles (fp32), and with sinks its rows' sum of fp32 P * dP to a separate buffer for dsinks.
   Computing delta here saves the launch that would re-read out and dout.
2. ``_bwd_dkdv_kernel``: one program per (batch or sequence, kv head, BLOCK_N keys); it loops
   over the G = Hq / Hkv query heads of its group and their query blocks, so dK/dV of a kv head
   is the sum over its query heads without repeating k/v in memory and without atomics.

Block skipping, causal Sq=6, Sk=4 (bottom-right: diag = Sk - Sq = -2), BLOCK_M = BLOCK_N = 2::

    key j   0 1 | 2 3
    row 0   . . | . .     the dK/dV program of keys 0..1 never loads rows 0..1 (they keep
    row 1   . . | . .     nothing), masks row block 2..3 (the diagonal cuts it) and runs row
    row 2   x . | . .     block 4..5 without any keep test; the program of keys 2..3 visits
    row 3   x x | . .     only row block 4..5 (masked). The dQ program of rows 2..3 visits
    row 4   x x | x .     key block 0..1 only (masked); rows 0..1 get dq = 0.
    row 5   x x | x x

Every output element is written by exactly one program, in a fixed loop order, with no
atomics: the backward is bitwise reproducible by construction (``deterministic=True`` costs
nothing; the flag has no effect).

Sub notation (on top of ``score.py``'s ``i, j, diag, qk, t, region``)::

    lse2       lse_i * log2(e), fp32 (BLOCK_M,); +inf for an empty row, see [Note] empty rows
    delta      rowsum(out * dout) (BLOCK_M,) = sum_j P_ij dP_ij (dropout included)
    p          P_ij = exp2(t_ij - lse2_i): the forward's probabilities, recomputed from lse
    dp         dL/dP_ij = (dout_i . v_j) * keep_ij / (1 - dropout_p)
    ds         dS_ij = P_ij (dp_ij - delta_i): gradient of the score after softcap, in natural
               log units; it is also the float mask's gradient (dmask)
    dcap       d(capped score)/d(raw score): 1 - tanh^2 with softcap, else 1
    dq, dk     scale * (ds * dcap) @ k, scale * (ds * dcap)^T @ q;  dv = P_dropped^T @ dout
    ...T       the dK/dV kernel works on transposed (BLOCK_N keys, BLOCK_M rows) tiles: it calls
               the score.py helpers with rows and columns swapped and ``-diag`` (|rel| and the
               window test are symmetric under that swap), so the score pipeline stays single

[Note] empty rows in the backward
    A row that kept no key (and has no sink) has lse = -inf. Its lse2 is replaced by +inf, so
    every p = exp2(t - inf) = 0 (also for t = -inf) and all its gradients are exactly 0. Rows
    past the sequence end get lse2 = +inf for the same effect, so the dK/dV kernel needs no
    row test on its fully kept tiles. With a finite sink, lse >= the sink logit is finite; a
    sink of -inf is no term at all (an empty row keeps lse = -inf, gradients 0).

[Note] padded row stats
    The dK/dV inner loop needs lse2 and delta of every row block it visits. Loading them from
    lse with a row mask and fixing up empty rows there costs a large share of the loop's
    instructions (the loop is short: about 20 HGMMA per step). So the dQ kernel,
    which runs first, stores lse2 and delta of every (query head, sequence) row to fp32
    buffers (Hq, rows) where each sequence's rows are followed by padding up to the next
    multiple of ROW_PAD (>= and a multiple of every BLOCK_M), filled with +inf / 0 by the
    sequence's last row block, so every row block dK/dV can visit reads them without masks.
    Row r of sequence b of head h sits at h * stat_stride_h +
    b * stat_stride_b + q_start_b + r: dense, stat_stride_b = Sq rounded up to ROW_PAD (q_start
    0); varlen, stat_stride_b = ROW_PAD after cu_seqlens_q[b] (Tq + B * ROW_PAD rows per head,
    not B * max_seqlen_q, so skewed lengths cost no memory).

[Note] large lse
    P = exp2(t - lse2) subtracts two numbers of the scores' magnitude, and the saved fp32 lse
    is only known to ~|lse2| * 2^-23: at |lse2| ~ 1e5 every P is off by ~1%. The main dQ launch
    stores NaN as lse2 of rows with |lse2| > LSE_EXACT, so their dq and the dk / dv of every key
    they keep end NaN and are redone ([Note] redo). The REDO dQ program re-runs the forward's
    online softmax over its keys (:func:`_row_stats`: the row max M, one of the same t bits, and
    log2 l), stores M in lse2's place and log2 l beside it (0 for every other row), and both
    REDO kernels take P = exp2((t - M) - log2 l): exact to fp32 rounding at any magnitude.

[Note] redo
    The main dQ and dK/dV launches run the plain loops and store, per query row and per key,
    whether its gradient ended non-finite (FlagsQ, FlagsK). Then each kernel runs again with
    REDO: only the blocks holding a flagged row or key compute, with the exact statistics
    ([Note] large lse) and ds kept to kept pairs, a hidden non-finite key contained (score.py
    [Note] hidden values); the other programs exit after one flag load. Finite inputs at
    ordinary magnitudes pay two launches of exiting programs.
"""

import triton
import triton.language as tl

from tileattn.backends.triton.score import (LOG2E, LSE_EXACT, add_nonfinite, any_nonfinite, block_ranges, dropout_keep,
                                            head_terms, keep_tile, load_mask_tile, load_rows, nonfinite,
                                            score_and_dcap, seq_bounds, softmax_init, softmax_step)


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _store_rows(base, x, start, nrows, stride_row, ncols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Store x (BLOCK_R, BLOCK_C) to rows [start, +BLOCK_R) of a row-major (nrows, ncols) view."""
    rows = tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    ptrs = base + start.to(tl.int64) * stride_row + rows[:, None] * stride_row + cols[None, :]
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=((start + rows) < nrows)[:, None] & (cols < ncols)[None, :])


@triton.jit
def _tile_sources(a_base, b_base, nrows, stride_a, stride_b, COLS_A: tl.constexpr, COLS_B: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, USE_TMA: tl.constexpr):
    """What the inner loop loads its (BLOCK_R, BLOCK_A) / (BLOCK_R, BLOCK_B) tiles from: tensor
    descriptors over the sequence's rows (TMA zero-fills rows >= nrows and padding columns), or
    the row-0 pointers themselves (``load_rows`` masks)."""
    if USE_TMA:
        n = tl.maximum(nrows, 1)
        a_src = tl.make_tensor_descriptor(a_base, [n, COLS_A], [stride_a, 1], [BLOCK_R, BLOCK_A])
        b_src = tl.make_tensor_descriptor(b_base, [n, COLS_B], [stride_b, 1], [BLOCK_R, BLOCK_B])
    else:
        a_src = a_base
        b_src = b_base
    return a_src, b_src


@triton.jit
def _load_tiles(a_src, b_src, start, nrows, stride_a, stride_b, COLS_A: tl.constexpr, COLS_B: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows [start, start+BLOCK_R) of both sources of :func:`_tile_sources`, 0 past nrows / COLS."""
    if USE_TMA:
        a = a_src.load([start, 0])
        b = b_src.load([start, 0])
    else:
        a = load_rows(a_src, start, nrows, stride_a, COLS_A, BLOCK_R, BLOCK_A, True, COLS_A != BLOCK_A)
        b = load_rows(b_src, start, nrows, stride_b, COLS_B, BLOCK_R, BLOCK_B, True, COLS_B != BLOCK_B)
    return a, b


@triton.jit
def _block_and_head(pid, num_blocks, head_group):
    """(block index, batch * head index) of program ``pid`` in a 1-D grid of num_blocks * B * H.

    Heads are taken ``head_group`` at a time and, within a group, the block index is the slow
    one: the group's programs of block 0 launch first, for all its heads. Under causal masking
    block 0 holds the most work (key block 0 of dK/dV; the last row block of dQ once reversed),
    so the longest programs start early and the short ones fill the tail; the group's q/dout
    (or k/v) stays small enough to be shared in L2. head_group = 1 is head-major order.
    """
    per_group = head_group * num_blocks
    first = (pid // per_group) * head_group
    size = tl.minimum(head_group, tl.num_programs(0) // num_blocks - first)
    r = pid % per_group
    return r // size, first + r % size


@triton.jit
def _load_lse2(lse_base, offs, seqlen):
    """lse * log2(e) of rows ``offs``; +inf for empty rows and rows past ``seqlen`` ([Note] empty rows)."""
    lse = tl.load(lse_base + offs, mask=offs < seqlen, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _store_row_stats(lse2_row, delta_row, log_l_row, lse2, delta, log_l, m0, seqlen, BLOCK_M: tl.constexpr,
                     ROW_PAD: tl.constexpr):
    """Store a row block's lse2, delta and log2(l) at rows [m0, m0+BLOCK_M) of one (head,
    sequence)'s padded rows; the sequence's last row block also fills the rows after it, up to
    seqlen rounded up to ROW_PAD, with +inf / 0 / 0 ([Note] padded row stats, [Note] large lse)."""
    offs = tl.arange(0, BLOCK_M)
    tl.store(lse2_row + m0 + offs, lse2)
    tl.store(delta_row + m0 + offs, delta)
    tl.store(log_l_row + m0 + offs, log_l)
    if m0 + BLOCK_M >= seqlen:
        for r in range(m0 + BLOCK_M, tl.cdiv(seqlen, ROW_PAD) * ROW_PAD, BLOCK_M):
            tl.store(lse2_row + r + offs, tl.full([BLOCK_M], float("inf"), tl.float32))
            tl.store(delta_row + r + offs, tl.zeros([BLOCK_M], tl.float32))
            tl.store(log_l_row + r + offs, tl.zeros([BLOCK_M], tl.float32))


@triton.jit
def _row_stats(q, k_src, offs_m, m0, seqlen_q, seqlen_k, diag, ranges, stride_kn, mask_base, stride_mm,
               stride_mn, alibi_log2, sink_log2, qk_scale, softcap_scale, softcap_log2, window_left, window_right,
               HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASK_KIND: tl.constexpr, HAS_LEFT: tl.constexpr,
               HAS_RIGHT: tl.constexpr, SINKS: tl.constexpr, USE_TMA: tl.constexpr, DOT_PREC: tl.constexpr):
    """(M, log2 l) (BLOCK_M,) of rows offs_m: the forward's online softmax re-run over the kept
    keys with the backward's t bits ([Note] large lse); an empty row gives (+inf, 0), so P = 0."""
    m_i, l_i = softmax_init(sink_log2, BLOCK_M, SINKS)
    offs_n0 = tl.arange(0, BLOCK_N)
    for region in tl.static_range(1 - HAS_LEFT, 3):
        for n0 in range(ranges[region], ranges[region + 1], BLOCK_N):
            n0 = tl.multiple_of(n0, BLOCK_N)
            offs_n = n0 + offs_n0
            if USE_TMA:
                k = k_src.load([n0, 0])
            else:
                k = load_rows(k_src, n0, seqlen_k, stride_kn, HEAD_D, BLOCK_N, BLOCK_D, True, HEAD_D != BLOCK_D)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
            mask_tile = load_mask_tile(mask_base, m0, n0, stride_mm, stride_mn, seqlen_q, seqlen_k,
                                       BLOCK_M, BLOCK_N, MASK_KIND)
            t, _ = score_and_dcap(qk, offs_m, offs_n, diag, qk_scale, softcap_scale, softcap_log2, alibi_log2,
                                  mask_tile, SOFTCAP, ALIBI, MASK_KIND)
            keep = keep_tile(offs_m, offs_n, diag, seqlen_k, window_left, window_right, HAS_LEFT, HAS_RIGHT)
            if MASK_KIND == 1:
                keep = keep & (mask_tile != 0)
            _, _, m_i, l_i = softmax_step(tl.where(keep, t, float("-inf")), 1.0, m_i, l_i, True)
    empty = l_i == 0.0
    return tl.where(empty, float("inf"), m_i), tl.where(empty, 0.0, tl.math.log2(tl.where(empty, 1.0, l_i)))


# ----------------------------------------------------------------------------- dK / dV


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DOut, Lse2Pad, DeltaPad, LogLPad, DK, DV, Slopes, Mask, CuSeqlensQ, CuSeqlensK, FlagsK,
                     stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh,
                     stride_vb, stride_vn, stride_vh, stride_dob, stride_dom, stride_doh,
                     stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
                     stat_stride_b, stat_stride_h, stride_ab, stride_ah, stride_mb, stride_mh, stride_mm, stride_mn,
                     stride_fb, stride_fh, num_kv_heads, group, seqlen_q_dense, seqlen_k_dense, max_seqlen_k, head_group,
                     scale, qk_scale, softcap_scale, softcap_log2, window_left, window_right, dropout_p, seed,
                     tune_sq, tune_sk,
                     HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr,
                     SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASK_KIND: tl.constexpr,
                     HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DROPOUT: tl.constexpr, USE_TMA: tl.constexpr,
                     DOT_PREC: tl.constexpr, REDO: tl.constexpr = False):
    """Grid (cdiv(max_seqlen_k, BLOCK_N) * B * Hkv,): dk, dv of BLOCK_N keys of one kv head.

    Program order: ``_block_and_head`` (head_group heads at a time, key block 0 first; programs
    running together share their heads' q/dout in L2). Query head h = kv_head * group + g for
    g < group (GQA). Every key row < seqlen_k is stored, zeros when no row keeps it.
    Lse2Pad / DeltaPad / LogLPad: padded row stats from the dQ kernel ([Note] padded row stats).
    FlagsK (int8 per key, strides stride_fb / stride_fh, varlen rows from cu_seqlens_k): the
    main launch stores whether each key's dk or dv ended non-finite; the REDO launch runs only
    the key blocks holding a flagged key ([Note] redo). tune_sq / tune_sk: autotune key only.
    """
    pid_n, off_bh = _block_and_head(tl.program_id(0), tl.cdiv(max_seqlen_k, BLOCK_N), head_group)
    off_b, off_hk, q_start, seqlen_q, k_start, seqlen_k = seq_bounds(off_bh, num_kv_heads, CuSeqlensQ, CuSeqlensK,
                                                                     seqlen_q_dense, seqlen_k_dense, IS_VARLEN)
    n0 = pid_n * BLOCK_N
    run = n0 < seqlen_k
    if REDO:
        keys = n0 + tl.arange(0, BLOCK_N)
        flags = tl.load(FlagsK + off_b.to(tl.int64) * stride_fb + off_hk.to(tl.int64) * stride_fh + k_start + keys,
                        mask=keys < seqlen_k, other=0)
        run = run & (tl.max(flags, 0) > 0)
    if run:
        b64 = off_b.to(tl.int64)
        q0 = tl.full([], q_start, tl.int64)
        k0 = tl.full([], k_start, tl.int64)
        kv_off = b64 * stride_kb + off_hk.to(tl.int64) * stride_kh + k0 * stride_kn
        k = load_rows(K + kv_off, n0, seqlen_k, stride_kn, HEAD_D, BLOCK_N, BLOCK_D, True, HEAD_D != BLOCK_D)
        kv_off = b64 * stride_vb + off_hk.to(tl.int64) * stride_vh + k0 * stride_vn
        v = load_rows(V + kv_off, n0, seqlen_k, stride_vn, HEAD_DV, BLOCK_N, BLOCK_DV, True, HEAD_DV != BLOCK_DV)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        diag = seqlen_k - seqlen_q
        # transposed: row blocks of these keys (window sides swapped); region 0 is cut by the
        # diagonal / window's right side, region 2 by the window's left side
        ranges = block_ranges(n0, seqlen_k, seqlen_q, window_right, window_left, BLOCK_N, BLOCK_M,
                              HAS_RIGHT, HAS_LEFT, True)
        offs_m0 = tl.arange(0, BLOCK_M)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
        # REDO (score [Note] hidden values, [Note] large lse): ds kept to kept pairs, P from M and log2 l
        # not pipelined: with one query row block (Sq specialized to 1) this becomes the innermost
        # loop, and the pipeliner cannot predicate the descriptor creation in it
        for g in tl.range(group, num_stages=1):
            off_h = off_hk * group + g
            h64 = off_h.to(tl.int64)
            q_base = Q + b64 * stride_qb + h64 * stride_qh + q0 * stride_qm
            do_base = DOut + b64 * stride_dob + h64 * stride_doh + q0 * stride_dom
            q_src, do_src = _tile_sources(q_base, do_base, seqlen_q, stride_qm, stride_dom,
                                          HEAD_D, HEAD_DV, BLOCK_M, BLOCK_D, BLOCK_DV, USE_TMA)
            stats = h64 * stat_stride_h + b64 * stat_stride_b + q0
            lse2_row = Lse2Pad + stats
            delta_row = DeltaPad + stats
            log_l_row = LogLPad + stats
            mask_base, alibi_log2 = head_terms(Mask, Slopes, b64, h64, stride_mb, stride_mh, stride_ab,
                                               stride_ah, MASK_KIND, ALIBI)
            # transposed regions (see ranges above); the window cuts edge tiles (region != 1: keep_tile)
            for region in tl.static_range(1 - HAS_RIGHT, 2 + HAS_LEFT):
                for m0 in range(ranges[region], ranges[region + 1], BLOCK_M):
                    m0 = tl.multiple_of(m0, BLOCK_M)
                    offs_m = m0 + offs_m0
                    q, do = _load_tiles(q_src, do_src, m0, seqlen_q, stride_qm, stride_dom, HEAD_D,
                                        HEAD_DV, BLOCK_M, BLOCK_D, BLOCK_DV, USE_TMA)
                    lse2 = tl.load(lse2_row + offs_m)  # padded: no mask ([Note] padded row stats)
                    delta = tl.load(delta_row + offs_m)

                    qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)
                    maskT = load_mask_tile(mask_base, n0, m0, stride_mn, stride_mm, seqlen_k, seqlen_q,
                                           BLOCK_N, BLOCK_M, MASK_KIND)
                    tT, dcapT = score_and_dcap(qkT, offs_n, offs_m, -diag, qk_scale, softcap_scale,
                                               softcap_log2, alibi_log2, maskT, SOFTCAP, ALIBI, MASK_KIND)
                    if REDO:  # [Note] large lse
                        pT = tl.math.exp2((tT - lse2[None, :]) - tl.load(log_l_row + offs_m)[None, :])
                    else:
                        pT = tl.math.exp2(tT - lse2[None, :])
                    if region != 1 or REDO:
                        keepT = keep_tile(offs_n, offs_m, -diag, seqlen_q, window_right, window_left,
                                          HAS_RIGHT, HAS_LEFT)
                        if MASK_KIND == 1:
                            keepT = keepT & (maskT != 0)
                        pT = tl.where(keepT, pT, 0.0)
                    elif MASK_KIND == 1:
                        pT = tl.where(maskT != 0, pT, 0.0)

                    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
                    if DROPOUT:
                        drop = dropout_keep(seed, dropout_p, offs_m, offs_n, off_h, off_b)
                        dropT = tl.trans(drop.to(tl.int8)) != 0
                        # a product, not a select: a dropped NaN weight stays NaN (reference.py)
                        dropw = tl.where(dropT, 1.0 / (1.0 - dropout_p), 0.0)
                        dv = tl.dot((pT * dropw).to(do.dtype), do, dv, input_precision=DOT_PREC)
                        dpT = dpT * dropw
                    else:
                        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
                    dsT = pT * (dpT - delta[None, :])
                    if SOFTCAP:
                        dsT = dsT * dcapT
                    if REDO:  # a hidden non-finite value or row statistic makes dpT or delta NaN
                        dsT = tl.where(keepT, dsT, 0.0)
                    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PREC)
        if not REDO:  # key rows that ended non-finite, for the REDO launch
            bad = tl.maximum(tl.max(nonfinite(dk).to(tl.int8), 1), tl.max(nonfinite(dv).to(tl.int8), 1))
            tl.store(FlagsK + b64 * stride_fb + off_hk.to(tl.int64) * stride_fh + k0 + offs_n, bad,
                     mask=offs_n < seqlen_k)
        dk_base = DK + b64 * stride_dkb + off_hk.to(tl.int64) * stride_dkh + k0 * stride_dkn
        _store_rows(dk_base, dk * scale, n0, seqlen_k, stride_dkn, HEAD_D, BLOCK_N, BLOCK_D)
        dv_base = DV + b64 * stride_dvb + off_hk.to(tl.int64) * stride_dvh + k0 * stride_dvn
        _store_rows(dv_base, dv, n0, seqlen_k, stride_dvn, HEAD_DV, BLOCK_N, BLOCK_DV)


# ----------------------------------------------------------------------------- dQ (+ dmask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DOut, Out, Lse, Lse2Pad, DeltaPad, LogLPad, Sinks, SinkDelta, DQ, DMask, Slopes,
                   Mask, CuSeqlensQ, CuSeqlensK, FlagsQ,
                   stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh,
                   stride_vb, stride_vn, stride_vh, stride_dob, stride_dom, stride_doh,
                   stride_ob, stride_om, stride_oh, stride_dqb, stride_dqm, stride_dqh,
                   stride_lb, stride_lh, stat_stride_b, stat_stride_h, stride_ab, stride_ah, stride_mb, stride_mh,
                   stride_mm, stride_mn,
                   num_heads, group, seqlen_q_dense, seqlen_k_dense, max_seqlen_q, head_group,
                   scale, qk_scale, softcap_scale, softcap_log2, window_left, window_right, dropout_p, seed,
                   tune_sq, tune_sk,
                   HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr,
                   SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASK_KIND: tl.constexpr, MASK_GRAD: tl.constexpr,
                   HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DROPOUT: tl.constexpr, SINKS: tl.constexpr,
                   USE_TMA: tl.constexpr, DOT_PREC: tl.constexpr, ROW_PAD: tl.constexpr, REDO: tl.constexpr = False):
    """Grid (cdiv(max_seqlen_q, BLOCK_M) * B * Hq,): dq of BLOCK_M rows of one query head.

    Program order: ``_block_and_head`` (head_group heads at a time, sharing K/V in L2); with
    HAS_RIGHT the row blocks are reversed so the longest rows start first. DMask (MASK_GRAD,
    dense only): contiguous fp32 (B, Hq, Sq, Sk), zero-filled by the launcher; this kernel
    writes the tiles it visits. SINKS: SinkDelta (laid out like Lse) gets P_sink * sum_j P dP from
    fp32 p and dp, so dsinks does not inherit out's rounding: with few keys that rounding alone
    exceeds the fp16 tolerance. Lse2Pad / DeltaPad / LogLPad get lse * log2(e) (or M) and
    rowsum(Out * DOut) (and log2 l) of the program's rows and the sequence's padding ([Note]
    padded row stats, [Note] large lse); re-running the kernel (autotuning) writes the same values.
    FlagsQ (int8, laid out like Lse): the main launch stores whether each row's dq ended
    non-finite; the REDO launch runs only the row blocks holding a flagged row ([Note] redo).
    """
    num_m = tl.cdiv(max_seqlen_q, BLOCK_M)
    pid_m, off_bh = _block_and_head(tl.program_id(0), num_m, head_group)
    if HAS_RIGHT:
        pid_m = num_m - 1 - pid_m
    off_b, off_h, q_start, seqlen_q, k_start, seqlen_k = seq_bounds(off_bh, num_heads, CuSeqlensQ, CuSeqlensK,
                                                                    seqlen_q_dense, seqlen_k_dense, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    run = m0 < seqlen_q
    if REDO:
        rows = m0 + tl.arange(0, BLOCK_M)
        flags = tl.load(FlagsQ + off_b.to(tl.int64) * stride_lb + off_h.to(tl.int64) * stride_lh + q_start + rows,
                        mask=rows < seqlen_q, other=0)
        run = run & (tl.max(flags, 0) > 0)
    if run:
        b64 = off_b.to(tl.int64)
        h64 = off_h.to(tl.int64)
        hk64 = (off_h // group).to(tl.int64)
        q0 = tl.full([], q_start, tl.int64)
        k0 = tl.full([], k_start, tl.int64)
        q = load_rows(Q + b64 * stride_qb + h64 * stride_qh + q0 * stride_qm, m0, seqlen_q, stride_qm,
                      HEAD_D, BLOCK_M, BLOCK_D, True, HEAD_D != BLOCK_D)
        do = load_rows(DOut + b64 * stride_dob + h64 * stride_doh + q0 * stride_dom, m0, seqlen_q, stride_dom,
                       HEAD_DV, BLOCK_M, BLOCK_DV, True, HEAD_DV != BLOCK_DV)
        o = load_rows(Out + b64 * stride_ob + h64 * stride_oh + q0 * stride_om, m0, seqlen_q, stride_om,
                      HEAD_DV, BLOCK_M, BLOCK_DV, True, HEAD_DV != BLOCK_DV)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # 0 past seqlen_q (masked loads)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        lse2 = _load_lse2(Lse + b64 * stride_lb + h64 * stride_lh + q0, offs_m, seqlen_q)
        k_base = K + b64 * stride_kb + hk64 * stride_kh + k0 * stride_kn
        v_base = V + b64 * stride_vb + hk64 * stride_vh + k0 * stride_vn
        k_src, v_src = _tile_sources(k_base, v_base, seqlen_k, stride_kn, stride_vn,
                                     HEAD_D, HEAD_DV, BLOCK_N, BLOCK_D, BLOCK_DV, USE_TMA)
        mask_base, alibi_log2 = head_terms(Mask, Slopes, b64, h64, stride_mb, stride_mh, stride_ab, stride_ah,
                                           MASK_KIND, ALIBI)
        if MASK_GRAD:
            dmask_base = DMask + (b64 * num_heads + h64) * seqlen_q * seqlen_k
        else:
            dmask_base = DQ  # never written
        diag = seqlen_k - seqlen_q
        ranges = block_ranges(m0, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M, BLOCK_N,
                              HAS_LEFT, HAS_RIGHT, False)
        if SINKS:
            sink_log2 = tl.load(Sinks + off_h) * LOG2E
        else:
            sink_log2 = 0.0
        # [Note] large lse: the main launch makes such rows NaN (here and, through Lse2Pad, in dK/dV's
        # main launch), so they are flagged; the REDO launch gives them M (in lse2's place) and log2 l
        big = (lse2 != float("inf")) & (tl.abs(lse2) > LSE_EXACT)
        log_l = tl.zeros([BLOCK_M], tl.float32)
        if REDO:
            if tl.max(big.to(tl.int32), 0) > 0:
                row_m, row_l = _row_stats(q, k_src, offs_m, m0, seqlen_q, seqlen_k, diag, ranges, stride_kn,
                                          mask_base, stride_mm, stride_mn, alibi_log2, sink_log2, qk_scale,
                                          softcap_scale, softcap_log2, window_left, window_right, HEAD_D, BLOCK_M,
                                          BLOCK_N, BLOCK_D, SOFTCAP, ALIBI, MASK_KIND, HAS_LEFT, HAS_RIGHT, SINKS,
                                          USE_TMA, DOT_PREC)
                log_l = tl.where(big, row_l, 0.0)
                lse2 = tl.where(big, row_m, lse2)
        else:
            lse2 = tl.where(big, float("nan"), lse2)
        stats = h64 * stat_stride_h + b64 * stat_stride_b + q0
        _store_row_stats(Lse2Pad + stats, DeltaPad + stats, LogLPad + stats, lse2, delta, log_l, m0, seqlen_q,
                         BLOCK_M, ROW_PAD)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        pdp = tl.zeros([BLOCK_M], tl.float32)  # SINKS: sum_j p * dp, delta without out's rounding (dsinks)
        offs_n0 = tl.arange(0, BLOCK_N)
        # regions (score.py) as the forward's; in edge tiles (region != 1) keys past seqlen_k must be
        # zeroed by keep_tile since their p may overflow. REDO (score [Note] hidden values): ds kept to
        # kept pairs, a non-finite key contained, P from M and log2 l.
        for region in tl.static_range(1 - HAS_LEFT, 3):
            for n0 in range(ranges[region], ranges[region + 1], BLOCK_N):
                n0 = tl.multiple_of(n0, BLOCK_N)
                offs_n = n0 + offs_n0
                k, v = _load_tiles(k_src, v_src, n0, seqlen_k, stride_kn, stride_vn, HEAD_D, HEAD_DV,
                                   BLOCK_N, BLOCK_D, BLOCK_DV, USE_TMA)
                qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
                mask_tile = load_mask_tile(mask_base, m0, n0, stride_mm, stride_mn, seqlen_q, seqlen_k,
                                           BLOCK_M, BLOCK_N, MASK_KIND)
                t, dcap = score_and_dcap(qk, offs_m, offs_n, diag, qk_scale, softcap_scale, softcap_log2,
                                         alibi_log2, mask_tile, SOFTCAP, ALIBI, MASK_KIND)
                if REDO:
                    p = tl.math.exp2((t - lse2[:, None]) - log_l[:, None])
                else:
                    p = tl.math.exp2(t - lse2[:, None])
                if region != 1 or REDO:
                    keep = keep_tile(offs_m, offs_n, diag, seqlen_k, window_left, window_right, HAS_LEFT,
                                     HAS_RIGHT)
                    if MASK_KIND == 1:
                        keep = keep & (mask_tile != 0)
                    p = tl.where(keep, p, 0.0)
                elif MASK_KIND == 1:
                    p = tl.where(mask_tile != 0, p, 0.0)
                dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
                if DROPOUT:
                    drop = dropout_keep(seed, dropout_p, offs_m, offs_n, off_h, off_b)
                    dp = dp * tl.where(drop, 1.0 / (1.0 - dropout_p), 0.0)  # a product, as dK/dV's
                ds = p * (dp - delta[:, None])
                if REDO:  # a hidden non-finite value makes dp NaN where p = 0
                    ds = tl.where(keep, ds, 0.0)
                if SINKS:
                    if REDO:
                        pdp += tl.sum(tl.where(keep, p * dp, 0.0), 1)
                    else:
                        pdp += tl.sum(p * dp, 1)
                if MASK_GRAD:
                    ptrs = (dmask_base + m0.to(tl.int64) * seqlen_k + n0
                            + tl.arange(0, BLOCK_M)[:, None] * tl.cast(seqlen_k, tl.int64)
                            + offs_n0[None, :])
                    tl.store(ptrs, ds, mask=(offs_m < seqlen_q)[:, None] & (offs_n < seqlen_k)[None, :])
                if SOFTCAP:
                    ds = ds * dcap
                    if REDO:  # dcap is NaN at a hidden non-finite key
                        ds = tl.where(keep, ds, 0.0)
                if REDO:
                    if any_nonfinite(k):
                        bad = nonfinite(k)
                        dq = add_nonfinite(dq, ds, k, bad, keep)
                        k = tl.where(bad, 0.0, k).to(k.dtype)
                dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
        if SINKS:  # the sink's probability (0 for a -inf sink or an empty row) times sum_j P dP
            p_sink = tl.math.exp2((sink_log2 - lse2) - log_l)
            tl.store(SinkDelta + b64 * stride_lb + h64 * stride_lh + q0 + offs_m, p_sink * pdp,
                     mask=offs_m < seqlen_q)
        if not REDO:  # rows that ended non-finite, for the REDO launch
            tl.store(FlagsQ + b64 * stride_lb + h64 * stride_lh + q0 + offs_m, tl.max(nonfinite(dq).to(tl.int8), 1),
                     mask=offs_m < seqlen_q)
        dq_base = DQ + b64 * stride_dqb + h64 * stride_dqh + q0 * stride_dqm
        _store_rows(dq_base, dq * scale, m0, seqlen_q, stride_dqm, HEAD_D, BLOCK_M, BLOCK_D)
