"""Exact merge of split-KV partials: out = sum_s exp(lse_s - lse) * out_s, lse = logsumexp_s lse_s.

Each split s of a row attended a disjoint run of keys and left its normalized partial output
out_s and natural-log lse_s (-inf for a split that kept no key). Sinks enter here once: the
sink logit joins the logsumexp as one more term with a zero output. A row with no kept key
in any split (and no sink) gets out = 0, lse = -inf, never NaN.
"""

import triton
import triton.language as tl

from tileattn.backends.triton.launch import fast
from tileattn.plan import next_pow2

from .score import LN2, LOG2E



@triton.jit
def _rows_mask(row_ok, offs_d, DIM: tl.constexpr, BLOCK: tl.constexpr):
    """(rows, BLOCK) mask, shared by the decode kernels: row_ok per row, and d < DIM only when
    the block pads the head dim (a mask constant along d keeps loads vectorized)."""
    if BLOCK == DIM:
        return row_ok[:, None]
    else:
        return row_ok[:, None] & (offs_d < DIM)[None, :]


@triton.jit
def _combine_kernel(
    PART_O, PART_LSE, SINKS, OUT, LSE,
    stride_pr, stride_ps, stride_lr,
    stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ls, stride_sink,
    Sn, Hq,
    NUM_SPLITS: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_DV: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    """One row r = (b * Sn + t) * Hq + h: PART_O[r] (NUM_SPLITS, Dv), PART_LSE[r] (NUM_SPLITS,)."""
    row = tl.program_id(0).to(tl.int64)
    h = row % Hq
    t = (row // Hq) % Sn
    b = row // (Hq * Sn)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_ok = offs_s < NUM_SPLITS
    lse_s = tl.load(PART_LSE + row * stride_lr + offs_s, mask=s_ok, other=float("-inf")) * LOG2E
    m = tl.max(lse_s, 0)
    if HAS_SINKS:
        sink = tl.load(SINKS + h * stride_sink) * LOG2E
        m = tl.maximum(m, sink)
    m_sub = tl.where(m == float("-inf"), 0.0, m)  # all splits empty: weights exp2(-inf) = 0
    w = tl.exp2(lse_s - m_sub)
    denom = tl.sum(w, 0)
    if HAS_SINKS:
        denom += tl.exp2(sink - m_sub)
    empty = denom == 0.0  # a NaN denominator (a split kept a NaN key) stays NaN
    d_safe = tl.where(empty, 1.0, denom)
    o = tl.load(PART_O + row * stride_pr + offs_s[:, None] * stride_ps + offs_dv[None, :],
                mask=_rows_mask(s_ok, offs_dv, HEAD_DIM_V, BLOCK_DV), other=0.0)
    out = tl.sum(o * (w / d_safe)[:, None], 0)
    tl.store(OUT + b * stride_ob + t * stride_os + h * stride_oh + offs_dv,
             out.to(OUT.dtype.element_ty), mask=offs_dv < HEAD_DIM_V)
    tl.store(LSE + b * stride_lb + h * stride_lh + t * stride_ls,
             tl.where(empty, float("-inf"), (m_sub + tl.log2(d_safe)) * LN2))


def combine_splits(part_o, part_lse, sinks, out, lse):
    """Merge partials into ``out`` (B, Sn, Hq, Dv) and ``lse`` (B, Hq, Sn) in place.

    part_o float32 (B, Sn, Hq, S, Dv) contiguous, part_lse float32 (B, Sn, Hq, S) contiguous
    (natural log, no sink), sinks None or float32 (Hq,).
    """
    B, Sn, Hq, S, Dv = part_o.shape
    fast(_combine_kernel)[(B * Sn * Hq,)](
        part_o, part_lse, sinks, out, lse,
        part_o.stride(2), part_o.stride(3), part_lse.stride(2),
        out.stride(0), out.stride(1), out.stride(2), *lse.stride(),
        sinks.stride(0) if sinks is not None else 0,
        Sn, Hq,
        NUM_SPLITS=S, HEAD_DIM_V=Dv, BLOCK_S=next_pow2(S),
        BLOCK_DV=next_pow2(Dv), HAS_SINKS=sinks is not None,
        num_warps=4 if S * Dv >= 2048 else 1,
    )
    return out, lse
