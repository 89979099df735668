"""The score pipeline in ``@triton.jit`` helpers, written once for forward, backward and decode.

The host side is :class:`tileattn.score.ScoreSpec`: its ``constexprs()`` are the feature flags
(SOFTCAP, ALIBI, MASK_KIND, HAS_LEFT, HAS_RIGHT, SINKS, DROPOUT) and its ``scalars()`` the
base-2 constants (qk_scale, softcap_scale, softcap_log2, window_left, window_right, dropout_p,
seed) every kernel receives under these names.

Sub notation (every kernel of this package uses it)::

    i, offs_m   query row within its sequence           (BLOCK_M,)
    j, offs_n   key column within its sequence          (BLOCK_N,)
    diag        seqlen_k - seqlen_q: row i's diagonal is key j = i + diag (bottom-right)
    qk          raw q . k dot products, fp32             (BLOCK_M, BLOCK_N)
    t           score in base-2 units: t = s * log2(e), so softmax uses exp2
    m_i, l_i    online-softmax running max (base 2) and denominator, fp32 (BLOCK_M,)
    region      0: edge tiles cut by the window's left side, 1: fully kept tiles (no keep
                test), 2: edge tiles cut by the right side / the ragged end (:func:`block_ranges`)

Score pipeline (API.md order): s = qk * scale -> softcap -> ALiBi -> float mask | bool mask ->
causal/window keep -> softmax with sinks -> dropout. Here it is split into
:func:`score_log2` (the value of a kept score) and :func:`keep_tile` / :func:`load_mask_tile`
(which scores are kept), so the backward can recompute exactly the forward's ``t`` and
differentiate each piece (:func:`score_and_dcap`): ALiBi and the float mask are additive, and
softcap gives ``d t / d qk = qk_scale * (1 - tanh^2)`` with ``tanh = (t - alibi - mask) / softcap_log2``.

[Note] empty rows
    A row may keep no key at all (a window left of key 0, ``Sq > Sk`` causal, an all-False
    mask, a zero-length key sequence). Its running max stays ``-inf``; :func:`softmax_step`
    then subtracts 0 instead of ``-inf`` (no ``inf - inf`` NaN), so ``p = 0`` and ``l_i = 0``.
    The epilogue divides by ``l_i`` only where it is positive: ``out = 0`` and
    ``lse = m_i + log2(l_i) = -inf``. With sinks, ``m_i`` starts at the sink logit and
    ``l_i`` at 1 (``exp2(sink - sink)``, :func:`softmax_init`), so an empty row ends with
    ``out = 0`` and ``lse = sink``: the sink is the one term of the denominator. A sink of
    ``-inf`` (a head that opts out) starts at ``(-inf, 1)``; the first kept key rescales that 1
    by ``exp2(-inf - m) = 0``, and an empty row ends at ``l_i = 0``, ``lse = -inf``.

[Note] hidden values
    A key a row does not keep (causal, window, bool mask, another split's key; reference.py
    [Note] hidden keys) gets p = 0, but 0 * NaN = NaN inside ``tl.dot``: a non-finite value
    (or, in dQ's ``ds @ k``, key) would reach every row of its tile. The kernels keep their
    fast loop as it is and test its result once at the end (:func:`any_nonfinite`, one
    reduction): only when a row ended non-finite does a second, exact pass re-walk the same
    tiles with the final row statistics, adding a non-finite operand's kept pairs one by one
    (:func:`add_nonfinite`) and zeroing it for the dot. Finite inputs never take that pass;
    a legitimately NaN row takes it and ends as NaN again. The backward's ``dp = dout @ v^T``
    has the same hazard (a hidden non-finite value makes dp NaN where p = 0): its edge tiles
    set ds to 0 outside the keep test.

[Note] negative scale
    Any finite scale is allowed. The plain path hands :func:`softmax_step` the raw ``qk`` and
    ``x_scale = qk_scale`` so that the row max is taken before scaling and ``qk * qk_scale - m``
    is one FMA; that max is the scores' max only when ``qk_scale > 0``. Kernels therefore take
    the raw path only when the host says the scale is positive (``NEG_SCALE`` False) and pass a
    finished ``t`` (``x_scale = 1``) otherwise.
"""

import triton
import triton.language as tl

from tileattn import score as _spec

LOG2E: tl.constexpr = tl.constexpr(_spec.LOG2E)  # host code reads tileattn.score.LOG2E
LN2: tl.constexpr = tl.constexpr(_spec.LN2)
LSE_EXACT: tl.constexpr = tl.constexpr(_spec.LSE_EXACT)


@triton.jit
def seq_bounds(off_bh, num_heads, CuSeqlensQ, CuSeqlensK, seqlen_q_dense, seqlen_k_dense, IS_VARLEN: tl.constexpr):
    """The varlen prologue: (off_b, off_h, q_start, seqlen_q, k_start, seqlen_k) of program index
    ``off_bh = off_b * num_heads + off_h``; starts and lengths int32 from cu_seqlens (IS_VARLEN),
    else starts 0 and the dense lengths."""
    off_b = off_bh // num_heads
    off_h = off_bh % num_heads
    if IS_VARLEN:
        q_start = tl.load(CuSeqlensQ + off_b)
        seqlen_q = tl.load(CuSeqlensQ + off_b + 1) - q_start
        k_start = tl.load(CuSeqlensK + off_b)
        seqlen_k = tl.load(CuSeqlensK + off_b + 1) - k_start
    else:
        q_start = 0
        k_start = 0
        seqlen_q = seqlen_q_dense
        seqlen_k = seqlen_k_dense
    return off_b, off_h, q_start, seqlen_q, k_start, seqlen_k


@triton.jit
def block_ranges(s0, len_self, len_other, window_left, window_right,
                 BLOCK_SELF: tl.constexpr, BLOCK_OTHER: tl.constexpr,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, TAIL_FULL: tl.constexpr):
    """Block boundaries ``lo <= full_lo <= full_hi <= hi`` on the other axis for [s0, s0+BLOCK_SELF).

    Forward and dQ: self = query rows, other = keys, ``TAIL_FULL`` False. Row i keeps key j iff
    ``i + diag - left <= j <= i + diag + right`` (diag = len_other - len_self). dK/dV calls it
    transposed: self = keys, other = rows, left/right and HAS_LEFT/HAS_RIGHT swapped (key j is
    kept by rows ``j - diag - right <= i <= j - diag + left``: the same rule with -diag), and
    ``TAIL_FULL`` True: a ragged last row block needs no keep test (rows past the sequence have
    zero gradients, see backward_kernels [Note] empty rows in the backward), while a ragged
    last key tile does (keys past seqlen_k must not enter the softmax).

    Blocks in [lo, hi) hold every kept pair of these rows (others are never loaded); blocks in
    [full_lo, full_hi) are kept entirely (regions, see the module docstring); [lo, full_lo)
    and [full_hi, hi) need :func:`keep_tile`. Starts are multiples of BLOCK_OTHER. Returned as
    one tuple so a region loop indexes ``ranges[region]``, ``ranges[region + 1]``.
    """
    diag = len_other - len_self
    s_last = tl.minimum(s0 + BLOCK_SELF, len_self) - 1
    lo = len_other * 0
    hi = len_other
    full_lo = lo
    full_end = len_other
    if HAS_LEFT:
        lo = tl.maximum(s0 + diag - window_left, 0) // BLOCK_OTHER * BLOCK_OTHER
        full_lo = tl.cdiv(tl.maximum(s_last + diag - window_left, 0), BLOCK_OTHER) * BLOCK_OTHER
    if HAS_RIGHT:
        hi = tl.minimum(s_last + diag + window_right + 1, len_other)
        full_end = tl.minimum(s0 + diag + window_right + 1, len_other)
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    if TAIL_FULL:
        full_hi = tl.where(full_end >= len_other, len_other, tl.maximum(full_end, 0) // BLOCK_OTHER * BLOCK_OTHER)
    else:
        full_hi = tl.maximum(full_end, 0) // BLOCK_OTHER * BLOCK_OTHER
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def head_terms(Mask, Slopes, b64, h64, stride_mb, stride_mh, stride_ab, stride_ah,
               MASK_KIND: tl.constexpr, ALIBI: tl.constexpr):
    """(mask_base, alibi_log2) of batch row / sequence b64 and query head h64 (int64): the
    attn_mask's (b, h) pointer (0, never read, without a mask) and slope * log2(e) (0.0 without
    ALiBi)."""
    if MASK_KIND != 0:
        mask_base = Mask + b64 * stride_mb + h64 * stride_mh
    else:
        mask_base = 0
    if ALIBI:
        alibi_log2 = tl.load(Slopes + b64 * stride_ab + h64 * stride_ah) * LOG2E
    else:
        alibi_log2 = 0.0
    return mask_base, alibi_log2


@triton.jit
def keep_tile(offs_m, offs_n, diag, seqlen_k, window_left, window_right,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """bool (BLOCK_M, BLOCK_N): key j exists and lies in row i's window [i+diag-left, i+diag+right]."""
    keep = (offs_n < seqlen_k)[None, :]
    rel = (offs_m[:, None] + diag) - offs_n[None, :]
    if HAS_LEFT:
        keep = keep & (rel <= window_left)
    if HAS_RIGHT:
        keep = keep & (rel >= -window_right)
    return keep


@triton.jit
def load_mask_tile(mask_base, start_m, start_n, stride_mm, stride_mn, seqlen_q, seqlen_k,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr):
    """Tile [start_m, +BLOCK_M) x [start_n, +BLOCK_N) of the user's attn_mask, as stored (bool or
    float); 0 (nothing loaded) when MASK_KIND == 0.

    ``mask_base`` already points at this (batch, head); broadcast dims have stride 0. Out-of-range
    elements read as 0 (False / +0.0); those rows or columns are dropped elsewhere anyway.
    """
    if MASK_KIND == 0:
        tile = 0
    else:
        rows = tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        ptrs = (mask_base + start_m.to(tl.int64) * stride_mm + start_n.to(tl.int64) * stride_mn
                + rows[:, None] * stride_mm + cols[None, :] * stride_mn)
        inside = ((start_m + rows) < seqlen_q)[:, None] & ((start_n + cols) < seqlen_k)[None, :]
        tile = tl.load(ptrs, mask=inside, other=0)
    return tile


@triton.jit
def score_log2(qk, offs_m, offs_n, diag, qk_scale, softcap_scale, softcap_log2, alibi_log2, mask_tile,
               SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASK_KIND: tl.constexpr):
    """Base-2 score ``t = log2(e) * s`` of the pipeline's steps 1-4 (keep decisions excluded).

    qk_scale = scale*log2(e); softcap_scale = scale/c; softcap_log2 = c*log2(e);
    alibi_log2 = slope*log2(e), a scalar or (BLOCK_M, 1) (decode: one head per packed row);
    MASK_KIND: 0 none, 1 bool (not a score term), 2 float (added).
    """
    if SOFTCAP:
        # c * tanh(x) with tanh(x) = 1 - 2 / (exp(2x) + 1): exact limits +-1 for |x| -> inf.
        e2x = tl.math.exp2(qk * (softcap_scale * 2.0 * LOG2E))
        t = softcap_log2 * (1.0 - 2.0 / (e2x + 1.0))
    else:
        t = qk * qk_scale
    if ALIBI:
        rel = (offs_m[:, None] + diag) - offs_n[None, :]
        t = t - alibi_log2 * tl.abs(rel).to(tl.float32)
    if MASK_KIND == 2:
        t = t + mask_tile.to(tl.float32) * LOG2E
    return t


@triton.jit
def score_and_dcap(qk, offs_m, offs_n, diag, qk_scale, softcap_scale, softcap_log2, alibi_log2, mask_tile,
                   SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASK_KIND: tl.constexpr):
    """(t, dcap): :func:`score_log2`'s base-2 score and d(capped s)/d(s) = 1 - tanh^2 (1.0 without softcap).

    With softcap the pipeline runs in two calls, cap first, then ALiBi/mask on the capped value
    (scale 1.0 is exact), so t is bit-for-bit the forward's and tanh = t_cap / (c * log2(e)).
    """
    if SOFTCAP:
        t = score_log2(qk, offs_m, offs_n, diag, qk_scale, softcap_scale, softcap_log2, alibi_log2, mask_tile,
                       True, False, 0)
        tanh = t * (1.0 / softcap_log2)
        dcap = 1.0 - tanh * tanh
        if ALIBI or MASK_KIND == 2:
            t = score_log2(t, offs_m, offs_n, diag, 1.0, softcap_scale, softcap_log2, alibi_log2, mask_tile,
                           False, ALIBI, MASK_KIND)
    else:
        t = score_log2(qk, offs_m, offs_n, diag, qk_scale, softcap_scale, softcap_log2, alibi_log2, mask_tile,
                       False, ALIBI, MASK_KIND)
        dcap = 1.0
    return t, dcap


@triton.jit
def step_input(qk, offs_m, offs_n, diag, qk_scale, softcap_scale, softcap_log2, alibi_log2, mask_tile,
               SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASK_KIND: tl.constexpr, NEG_SCALE: tl.constexpr):
    """(x, x_scale) for :func:`softmax_step`: raw ``qk`` with ``qk_scale`` on the plain path with a
    positive scale (one FMA per score), else the finished ``t`` with 1.0 ([Note] negative scale)."""
    if SOFTCAP or ALIBI or MASK_KIND == 2 or NEG_SCALE:
        x = score_log2(qk, offs_m, offs_n, diag, qk_scale, softcap_scale, softcap_log2, alibi_log2, mask_tile,
                       SOFTCAP, ALIBI, MASK_KIND)
        x_scale = 1.0
    else:
        x = qk
        x_scale = qk_scale
    return x, x_scale


@triton.jit
def dropout_keep(seed, dropout_p, offs_m, offs_n, off_h, off_b):
    """bool (BLOCK_M, BLOCK_N) keep decision of ``tileattn._philox`` for rows i, columns j."""
    c0 = offs_n[None, :] + offs_m[:, None] * 0
    c1 = offs_m[:, None] + offs_n[None, :] * 0
    c2 = c0 * 0 + off_h
    c3 = c0 * 0 + off_b
    r, _, _, _ = tl.philox(seed, c0, c1, c2, c3)
    return tl.random.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def softmax_init(sink_log2, BLOCK_M: tl.constexpr, SINKS: tl.constexpr):
    """Initial (m_i, l_i) (BLOCK_M,): (-inf, 0), or with sinks (sink * log2(e), 1) ([Note] empty rows).
    ``sink_log2``: a scalar or (BLOCK_M,), unused without SINKS."""
    if SINKS:
        m_i = tl.zeros([BLOCK_M], tl.float32) + sink_log2
        l_i = tl.zeros([BLOCK_M], tl.float32) + 1.0
    else:
        m_i = tl.zeros([BLOCK_M], tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], tl.float32)
    return m_i, l_i


@triton.jit
def softmax_step(x, x_scale, m_i, l_i, MAY_EMPTY: tl.constexpr):
    """One online-softmax update with base-2 scores ``t = x * x_scale`` (x_scale > 0; -inf = dropped).

    Passing raw ``qk`` with ``x_scale = qk_scale`` lets the plain path take the row max before
    scaling and fuse ``qk * qk_scale - m`` into one FMA; a finished ``t`` comes with 1.0
    (:func:`step_input`, [Note] negative scale).
    Returns (p, alpha, m_new, l_new): p = exp2(t - m_new) unnormalized probabilities, alpha the
    rescale factor of the old accumulator. MAY_EMPTY: a row of ``t`` may be all -inf, or m_i
    may be -inf (see [Note] empty rows); False lets the plain path skip the guard.
    """
    m_new = tl.maximum(m_i, tl.max(x, 1) * x_scale)
    if MAY_EMPTY:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.math.exp2(x * x_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_new = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_new


@triton.jit
def sink_fold(m_i, l_i, acc, sink_log2):
    """Add a sink logit (base 2, (BLOCK_M,)) to a finished row state (decode, after its loop):
    the denominator gains ``exp2(sink)``, the output none. Returns (m_i, l_i, acc). A row and a
    sink both at -inf stay empty (subtract 0, [Note] empty rows)."""
    m_fin = tl.maximum(m_i, sink_log2)
    m_use = tl.where(m_fin == float("-inf"), 0.0, m_fin)
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.math.exp2(sink_log2 - m_use)
    acc = acc * alpha[:, None]
    return m_fin, l_i, acc


@triton.jit
def nonfinite(x):
    """bool tile: x's inf and NaN elements."""
    return (x != x) | (tl.abs(x) == float("inf"))


@triton.jit
def any_nonfinite(x):
    """Scalar: does tile x hold an inf or NaN ([Note] hidden values)?"""
    return tl.max(tl.max(nonfinite(x).to(tl.int32), 1), 0) > 0


@triton.jit
def add_nonfinite(acc, a, b, bad, keep):
    """``acc`` plus what the kept pairs of ``a @ b`` take from b's non-finite elements ``bad``
    ([Note] hidden values; the caller zeroes them for its dot): for each key j holding one,
    the rows i that keep j get b_jd times sign(a_ij) where b_jd is +-inf, NaN where b_jd is
    NaN or a_ij is 0 (0 * inf) or NaN. a (BLOCK_M, BLOCK_N), b (BLOCK_N, E), keep bool
    (BLOCK_M, BLOCK_N). Loops over the bad keys only (exact pass: rare)."""
    BLOCK_N: tl.constexpr = b.shape[0]
    offs = tl.arange(0, BLOCK_N)
    col_bad = tl.max(bad.to(tl.int32), 1) > 0
    j = tl.min(tl.where(col_bad, offs, BLOCK_N), 0)
    while j < BLOCK_N:
        pick = (offs == j)[None, :] & keep
        kept_j = tl.max(pick.to(tl.int32), 1) > 0                                        # (BLOCK_M,)
        a_j = tl.sum(tl.where(pick, a.to(tl.float32), 0.0), 1)
        sign = tl.where(a_j > 0.0, 1.0, tl.where(a_j < 0.0, -1.0, float("nan")))        # 0 or NaN: NaN
        b_j = tl.sum(tl.where((offs == j)[:, None] & bad, b.to(tl.float32), 0.0), 0)   # (E,): 0 if finite
        acc = acc + tl.where(kept_j[:, None] & (b_j != 0.0)[None, :], sign[:, None] * b_j[None, :], 0.0)
        j = tl.min(tl.where(col_bad & (offs > j), offs, BLOCK_N), 0)
    return acc


@triton.jit
def finish_rows(acc, m_i, l_i, out_scale):
    """(out fp32 (BLOCK_M, BLOCK_DV), lse natural log (BLOCK_M,)) of a finished row state:
    out = acc / l_i * out_scale, lse = (m_i + log2 l_i) * ln 2; an empty row (l_i == 0, so acc
    == 0) gives out 0 and lse -inf ([Note] empty rows). A row that kept a NaN score has
    l_i = NaN: its out and lse are NaN, as the oracle's."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    inv_l = (1.0 / l_safe) * out_scale
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    return acc * inv_l[:, None], lse


@triton.jit
def load_rows(base, start, nrows, stride_row, ncols,
              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load rows [start, start+BLOCK_R) x cols [0, BLOCK_C) of a (nrows, ncols) row-major view; 0 outside."""
    rows = tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    ptrs = base + start.to(tl.int64) * stride_row + rows[:, None] * stride_row + cols[None, :]
    if CHECK_ROWS and CHECK_COLS:
        x = tl.load(ptrs, mask=((start + rows) < nrows)[:, None] & (cols < ncols)[None, :], other=0.0)
    elif CHECK_ROWS:
        x = tl.load(ptrs, mask=((start + rows) < nrows)[:, None], other=0.0)
    elif CHECK_COLS:
        x = tl.load(ptrs, mask=(cols < ncols)[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    return x
