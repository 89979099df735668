"""Shared ``@triton.jit`` helpers: the score pipeline (written once for forward, backward, decode)
and the masked row-tile load of forward and backward.

Sub notation (every kernel of this package uses it)::

    i, offs_m   query row within its sequence           (BLOCK_M,)
    j, offs_n   key column within its sequence          (BLOCK_N,)
    diag        seqlen_k - seqlen_q: row i's diagonal is key j = i + diag (bottom-right)
    qk          raw q . k dot products, fp32             (BLOCK_M, BLOCK_N)
    t           score in base-2 units: t = s * log2(e), so softmax uses exp2
    m_i, l_i    online-softmax running max (base 2) and denominator, fp32 (BLOCK_M,)

Score pipeline (API.md order): s = qk * scale -> softcap -> ALiBi -> float mask | bool mask ->
causal/window keep -> softmax with sinks -> dropout. Here it is split into
:func:`score_log2` (the value of a kept score) and :func:`keep_tile` / :func:`load_mask_tile`
(which scores are kept), so the backward can recompute exactly the forward's ``t`` and
differentiate each piece: ALiBi and the float mask are additive, and softcap gives
``d t / d qk = qk_scale * (1 - tanh^2)`` with ``tanh = (t - alibi - mask) / softcap_log2``.

[Note] empty rows
    A row may keep no key at all (a window left of key 0, ``Sq > Sk`` causal, an all-False
    mask, a zero-length key sequence). Its running max stays ``-inf``; :func:`softmax_step`
    then subtracts 0 instead of ``-inf`` (no ``inf - inf`` NaN), so ``p = 0`` and ``l_i = 0``.
    The epilogue divides by ``l_i`` only where it is positive: ``out = 0`` and
    ``lse = m_i + log2(l_i) = -inf``. With sinks, ``m_i`` starts at the sink logit and
    ``l_i`` at 1 (``exp2(sink - sink)``), so an empty row ends with ``out = 0`` and
    ``lse = sink``: the sink is the one term of the denominator.
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # host side; kernels spell the literal (jit code reads no plain globals)


@triton.jit
def block_ranges(m0, seqlen_q, seqlen_k, window_left, window_right,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Key-block boundaries ``lo <= full_lo <= full_hi <= hi`` for query rows [m0, m0+BLOCK_M).

    Tiles in [lo, hi) hold every kept key of these rows (others are never loaded); tiles in
    [full_lo, full_hi) are kept entirely for every real row (no window, no j < seqlen_k test);
    [lo, full_lo) and [full_hi, hi) need :func:`keep_tile`. All starts are multiples of BLOCK_N.
    """
    diag = seqlen_k - seqlen_q
    m_last = tl.minimum(m0 + BLOCK_M, seqlen_q) - 1
    lo = seqlen_k * 0
    hi = seqlen_k
    full_lo = lo
    full_end = seqlen_k
    if HAS_LEFT:
        lo = tl.maximum(m0 + diag - window_left, 0) // BLOCK_N * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(m_last + diag - window_left, 0), BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(m_last + diag + window_right + 1, seqlen_k)
        full_end = tl.minimum(m0 + diag + window_right + 1, seqlen_k)
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(full_end, 0) // BLOCK_N * BLOCK_N
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


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
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tile [start_m, +BLOCK_M) x [start_n, +BLOCK_N) of the user's attn_mask, as stored (bool or float).

    ``mask_base`` already points at this (batch, head); broadcast dims have stride 0. Out-of-range
    elements read as 0 (False / +0.0); those rows or columns are dropped elsewhere anyway.
    """
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    ptrs = (mask_base + start_m.to(tl.int64) * stride_mm + start_n.to(tl.int64) * stride_mn
            + rows[:, None] * stride_mm + cols[None, :] * stride_mn)
    inside = ((start_m + rows) < seqlen_q)[:, None] & ((start_n + cols) < seqlen_k)[None, :]
    return tl.load(ptrs, mask=inside, other=0)


@triton.jit
def score_log2(qk, offs_m, offs_n, diag, qk_scale, softcap_scale, softcap_log2, alibi_log2, mask_tile,
               SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASK_KIND: tl.constexpr):
    """Base-2 score ``t = log2(e) * s`` of the pipeline's steps 1-4 (keep decisions excluded).

    qk_scale = scale*log2(e); softcap_scale = scale/c; softcap_log2 = c*log2(e);
    alibi_log2 = slope*log2(e); MASK_KIND: 0 none, 1 bool (not a score term), 2 float (added).
    """
    if SOFTCAP:
        # c * tanh(x) with tanh(x) = 1 - 2 / (exp(2x) + 1): exact limits +-1 for |x| -> inf.
        e2x = tl.math.exp2(qk * (softcap_scale * 2.0 * 1.4426950408889634))
        t = softcap_log2 * (1.0 - 2.0 / (e2x + 1.0))
    else:
        t = qk * qk_scale
    if ALIBI:
        rel = (offs_m[:, None] + diag) - offs_n[None, :]
        t = t - alibi_log2 * tl.abs(rel).to(tl.float32)
    if MASK_KIND == 2:
        t = t + mask_tile.to(tl.float32) * 1.4426950408889634
    return t


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
def softmax_step(x, x_scale, m_i, l_i, MAY_EMPTY: tl.constexpr):
    """One online-softmax update with base-2 scores ``t = x * x_scale`` (x_scale > 0; -inf = dropped).

    Passing raw ``qk`` with ``x_scale = qk_scale`` lets the plain path take the row max before
    scaling and fuse ``qk * qk_scale - m`` into one FMA; a finished ``t`` comes with 1.0.
    Returns (p, alpha, m_new, l_new): p = exp2(t - m_new) unnormalized probabilities, alpha the
    rescale factor of the old accumulator. MAY_EMPTY: a row of ``t`` may be all -inf
    (see [Note] empty rows); False lets the plain path skip the guard.
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
