"""Host side of the Gluon sm_90 fused backward: the preprocess, the hazard check, the launch, dq.

Imported only after :func:`tileattn.backends.triton.gluon.available` said Gluon imports, and
only for the calls ``plan/backward.py``'s ``gluon_bwd_rule`` routes here (dense, 16-bit, D == Dv
in {64, 128}, plain or causal, positive scale, ``deterministic=False``, knob on).

Order: (1) ``_bwd_prep_kernel`` (``tl``) writes lse2, log_l, delta per (batch, query head) row,
padded to BLOCK_M and packed per 64-row block (one base pointer, immediate offsets in the kernel)
([Note] large lse of backward_kernels.py: row blocks with |lse2| > LSE_EXACT get the exact
row max and log2 l from the same ``_row_stats``) and flags a NaN / +inf lse or a non-finite
delta; (2) causal calls only: that flag or a non-finite q, k, v is read on the host
(one sync) and, if set, :func:`backward` returns None so the caller runs the ``tl`` kernels
(backward_sm90.py, "Exactness"); (3) ``bwd_kernel``; (4) dq = scale * DQAcc (summed by TMA
reduce-adds) in q's dtype.
"""

import torch
import triton
import triton.language as tl
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from tileattn.backends.triton.backward_kernels import _row_stats
from tileattn.backends.triton.score import LOG2E, LSE_EXACT, block_ranges, load_rows

from .backward_sm90 import bwd_kernel
from .launch import GL_DTYPES

BLOCK_M = 64  # query rows per step (and the stats' row padding)
HALF_N = 64  # keys per consumer warpgroup; BLOCK_N = 128 per program


@triton.jit
def _bwd_prep_kernel(Q, K, Out, DOut, Lse, Stats, Flag,
                     stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_ob, stride_om, stride_oh,
                     stride_dob, stride_dom, stride_doh, stride_lb, stride_lh,
                     num_heads, group, seqlen_q, seqlen_k, rows_pad, qk_scale, window_right,
                     HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Grid (cdiv(Sq, BLOCK_M), B * Hq): rows [m0, m0 + BLOCK_M) of one (batch, query head).
    Stats (B * Hq, rows_pad / BLOCK_M, 3, BLOCK_M) fp32, per row block [lse2, log_l, delta]:
    lse * log2(e) (+inf for empty rows and rows past Sq), 0, rowsum(out * dout); a row block with |lse2| > LSE_EXACT stores its exact row
    max and log2 l instead ([Note] large lse). Flag (int32, zeroed) gets 1 where a row < Sq has a
    NaN or +inf lse or a non-finite delta."""
    m0 = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    b64 = (off_bh // num_heads).to(tl.int64)
    h64 = (off_bh % num_heads).to(tl.int64)
    o = load_rows(Out + b64 * stride_ob + h64 * stride_oh, m0, seqlen_q, stride_om, HEAD_D, BLOCK_M, HEAD_D,
                  True, False)
    do = load_rows(DOut + b64 * stride_dob + h64 * stride_doh, m0, seqlen_q, stride_dom, HEAD_D, BLOCK_M, HEAD_D,
                   True, False)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # 0 past Sq
    offs_m = m0 + tl.arange(0, BLOCK_M)
    lse = tl.load(Lse + b64 * stride_lb + h64 * stride_lh + offs_m, mask=offs_m < seqlen_q, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    log_l = tl.zeros([BLOCK_M], tl.float32)
    big = tl.max(tl.where(lse2 == float("inf"), 0.0, tl.abs(lse2)), 0) > LSE_EXACT
    if big:
        q = load_rows(Q + b64 * stride_qb + h64 * stride_qh, m0, seqlen_q, stride_qm, HEAD_D, BLOCK_M, HEAD_D,
                      True, False)
        k_base = K + b64 * stride_kb + (h64 // group) * stride_kh
        ranges = block_ranges(m0, seqlen_q, seqlen_k, -1, window_right, BLOCK_M, BLOCK_N, False, CAUSAL, False)
        row_m, row_l = _row_stats(q, k_base, offs_m, m0, seqlen_q, seqlen_k, seqlen_k - seqlen_q, ranges, stride_kn,
                                  K, 0, 0, 0.0, 0.0, qk_scale, 0.0, 0.0, -1, window_right, HEAD_D, BLOCK_M, BLOCK_N,
                                  HEAD_D, False, False, 0, False, CAUSAL, False, False, "tf32")
        log_l = tl.where(lse2 == float("inf"), 0.0, row_l)
        lse2 = tl.where(lse2 == float("inf"), lse2, row_m)
    blk = Stats + (off_bh.to(tl.int64) * (rows_pad // BLOCK_M) + tl.program_id(0)) * (3 * BLOCK_M) + tl.arange(0, BLOCK_M)
    tl.store(blk, lse2)
    tl.store(blk + BLOCK_M, log_l)
    tl.store(blk + 2 * BLOCK_M, delta)
    bad = (lse != lse) | (lse == float("inf")) | ((delta - delta) != 0.0)  # delta - delta: NaN unless finite
    if tl.max(bad.to(tl.int32), 0) > 0:
        tl.store(Flag, 1)


def _tma_ready(t):
    """t itself when TMA can read it (unit last stride, 16-byte aligned pointer and strides), else a copy."""
    ok = t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])
    return t if ok else t.contiguous()


def _capturing() -> bool:
    return torch.cuda.is_current_stream_capturing()


def backward(dout, q, k, v, out, lse, scale: float, causal: bool):
    """(dq, dk, dv) for q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), dout/out like q, lse (B, Hq, Sq) fp32;
    None when a causal call must run the ``tl`` kernels (non-finite values, or CUDA-graph capture)."""
    if causal and _capturing():
        return None
    batch, seqlen_q, hq, D = q.shape
    seqlen_k, hkv = k.shape[1], k.shape[2]
    dev = q.device
    rows_pad = triton.cdiv(seqlen_q, BLOCK_M) * BLOCK_M
    stats = torch.empty((batch * hq, rows_pad // BLOCK_M, 3, BLOCK_M), dtype=torch.float32, device=dev)
    flag = torch.zeros(1, dtype=torch.int32, device=dev)
    qk_scale = scale * LOG2E
    _bwd_prep_kernel[(rows_pad // BLOCK_M, batch * hq)](
        q, k, out, dout, lse, stats, flag,
        *_bhs(q), *_bhs(k), *_bhs(out), *_bhs(dout), lse.stride(0), lse.stride(1),
        hq, hq // hkv, seqlen_q, seqlen_k, rows_pad, qk_scale, 0 if causal else -1,
        HEAD_D=D, BLOCK_M=BLOCK_M, BLOCK_N=64, CAUSAL=causal, num_warps=4)
    if causal:
        finite = torch.isfinite(q).all() & torch.isfinite(k).all() & torch.isfinite(v).all()
        if bool(flag.item()) or not bool(finite):  # host sync (module docstring)
            return None
    q, k, v, dout = (_tma_ready(t) for t in (q, k, v, dout))
    dq_acc = torch.zeros((batch, hq, rows_pad, D), dtype=torch.float32, device=dev)
    dk = torch.empty(k.shape, dtype=k.dtype, device=dev)
    dv = torch.empty(v.shape, dtype=v.dtype, device=dev)
    num_n = triton.cdiv(seqlen_k, 2 * HALF_N)
    bwd_kernel[(num_n * batch * hkv,)](
        *descriptors(q, k, v, dout, dq_acc), dk, dv, stats, *_bhs(dk), *_bhs(dv),
        hq, hkv, seqlen_q, seqlen_k, rows_pad, scale, qk_scale,
        STAGES=2 if D > 64 else 3, CAUSAL=causal, num_warps=4, maxnreg=168)
    dq = (dq_acc[:, :, :seqlen_q] * scale).transpose(1, 2).to(q.dtype).contiguous()
    return dq, dk, dv


def _bhs(t):
    """(batch, sequence, head) strides of a (B, S, H, D) tensor, in the kernels' argument order."""
    return t.stride(0), t.stride(1), t.stride(2)


def descriptors(q, k, v, dout, dq_acc):
    """TMA descriptors: q, dout (1, BLOCK_M, 1, D) boxes; k, v (1, HALF_N, 1, D); dq_acc (fp32
    (B, Hq, rows_pad, D)) with (1, 1, BLOCK_M, D / 2) boxes: each consumer's bulk reduce-add of
    its dQ column half."""
    D = q.shape[-1]
    box, dq_box = [1, BLOCK_M, 1, D], [1, 1, BLOCK_M, D // 2]
    row_layout = gl.NVMMASharedLayout.get_default_for(box, GL_DTYPES[q.dtype])
    dq_layout = gl.NVMMASharedLayout.get_default_for(dq_box, gl.float32)
    return (TensorDescriptor(q, list(q.shape), list(q.stride()), box, row_layout),
            TensorDescriptor(dout, list(dout.shape), list(dout.stride()), box, row_layout),
            TensorDescriptor(k, list(k.shape), list(k.stride()), [1, HALF_N, 1, D], row_layout),
            TensorDescriptor(v, list(v.shape), list(v.stride()), [1, HALF_N, 1, D], row_layout),
            TensorDescriptor(dq_acc, list(dq_acc.shape), list(dq_acc.stride()), dq_box, dq_layout))
