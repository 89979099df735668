"""Triton flash-attention forward: one kernel family for dense and varlen, every API.md feature.

Layout: q (B, Sq, Hq, D) / k (B, Sk, Hkv, D) / v (B, Sk, Hkv, Dv) with any strides (last dim
stride 1), or varlen q (Tq, Hq, D) / k, v (Tk, Hkv, D[v]) with int32 cu_seqlens read on device.
Returns out (B, Sq, Hq, Dv) contiguous in q.dtype [varlen (Tq, Hq, Dv)] and lse float32
(B, Hq, Sq) [varlen (Hq, Tq)], natural log. Query head h reads kv head h // (Hq // Hkv).

One program owns BLOCK_M query rows of one (batch or sequence, query head). The 1-D grid puts
the row block fastest, so programs running together share one head's K/V in L2. Causal and
window calls walk only the key blocks that hold kept keys (``score.block_ranges``) and
split them into masked edge tiles and fully kept middle tiles that skip the keep arithmetic::

    Sq=4, Sk=6 causal (bottom-right, diag = Sk - Sq = 2):   row 0  x x x . . .
                                                            row 1  x x x x . .
                                                            row 2  x x x x x .
                                                            row 3  x x x x x x

Every feature is a ``tl.constexpr`` so the plain path compiles none of their code.
``tileattn.plan`` picks blocks, warps, stages and the Hopper TMA path; see ``plan.describe``.
"""

import contextlib

import torch
import triton
import triton.language as tl

from tileattn.backends.triton import plan as _plan
from tileattn.backends.triton.score import (LOG2E, add_nonfinite, any_nonfinite, block_ranges, dropout_keep,
                                            finish_rows, head_terms, keep_tile, load_mask_tile, load_rows, nonfinite,
                                            seq_bounds, softmax_init, softmax_step, step_input)
from tileattn.backends.triton.launch import fast


@triton.jit(do_not_specialize=["seqlen_q_dense", "seqlen_k_dense", "max_seqlen_q", "window_left", "window_right",
                               "seed", "tune_sq", "tune_sk"])
def _fwd_kernel(Q, K, V, Out, Lse, Sinks, Slopes, Mask, CuSeqlensQ, CuSeqlensK, Flags,
                stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh,
                stride_vb, stride_vn, stride_vh, stride_ob, stride_om, stride_oh,
                stride_lb, stride_lh, stride_ab, stride_ah, stride_mb, stride_mh, stride_mm, stride_mn,
                num_heads, group, seqlen_q_dense, seqlen_k_dense, max_seqlen_q,
                qk_scale, softcap_scale, softcap_log2, window_left, window_right, dropout_p, seed,
                tune_sq, tune_sk,
                HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr,
                SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASK_KIND: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SINKS: tl.constexpr, DROPOUT: tl.constexpr,
                USE_TMA: tl.constexpr, DOT_PREC: tl.constexpr, NEG_SCALE: tl.constexpr = False,
                FLAG_ROWS: tl.constexpr = False, REDO: tl.constexpr = False):
    """Grid (cdiv(max_seqlen_q, BLOCK_M) * B * Hq,). tune_sq/tune_sk: autotune key only.
    NEG_SCALE: qk_scale < 0 (score [Note] negative scale). Flags: int8 laid out as Lse, one per
    row (score [Note] hidden values): FLAG_ROWS stores whether the row's out ended non-finite;
    REDO recomputes only the row blocks holding a flagged row (with the exact pass 1), the
    other programs exit. The launcher runs REDO after a FLAG_ROWS launch or the Gluon forward."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(max_seqlen_q, BLOCK_M)
    off_bh = pid // num_m
    m_blk = pid % num_m
    if HAS_RIGHT:
        m_blk = num_m - 1 - m_blk  # causal-like: the longest rows (last blocks) start first
    off_b, off_h, q_start, seqlen_q, k_start, seqlen_k = seq_bounds(off_bh, num_heads, CuSeqlensQ, CuSeqlensK,
                                                                    seqlen_q_dense, seqlen_k_dense, IS_VARLEN)
    off_hk = off_h // group
    m0 = m_blk * BLOCK_M
    if m0 >= seqlen_q:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    # lse (and the row flags) of this program's rows
    l_off = off_b.to(tl.int64) * stride_lb + off_h.to(tl.int64) * stride_lh + q_start
    if REDO:
        if tl.max(tl.load(Flags + l_off + offs_m, mask=offs_m < seqlen_q, other=0), 0) == 0:
            return

    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    k_base = K + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh
    o_base = Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
    l_base = Lse + l_off
    if IS_VARLEN:
        q_base += q_start.to(tl.int64) * stride_qm
        o_base += q_start.to(tl.int64) * stride_om
        k_base += k_start.to(tl.int64) * stride_kn
        v_base += k_start.to(tl.int64) * stride_vn
    if USE_TMA:
        # Per-program descriptors bounded by this sequence: TMA zero-fills rows >= seqlen and
        # columns >= HEAD_D, and clips the output store the same way.
        nk = tl.maximum(seqlen_k, 1)
        q_src = tl.make_tensor_descriptor(q_base, [seqlen_q, HEAD_D], [stride_qm, 1], [BLOCK_M, BLOCK_D])
        k_src = tl.make_tensor_descriptor(k_base, [nk, HEAD_D], [stride_kn, 1], [BLOCK_N, BLOCK_D])
        v_src = tl.make_tensor_descriptor(v_base, [nk, HEAD_DV], [stride_vn, 1], [BLOCK_N, BLOCK_DV])
        q = q_src.load([m0, 0])
    else:
        k_src = k_base
        v_src = v_base
        q = load_rows(q_base, m0, seqlen_q, stride_qm, HEAD_D, BLOCK_M, BLOCK_D, True, HEAD_D != BLOCK_D)

    diag = seqlen_k - seqlen_q
    if SINKS:  # [Note] empty rows (score.py): the sink starts the running max and the sum
        sink_log2 = tl.load(Sinks + off_h) * LOG2E
    else:
        sink_log2 = 0.0
    m_i, l_i = softmax_init(sink_log2, BLOCK_M, SINKS)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    mask_base, alibi_log2 = head_terms(Mask, Slopes, off_b.to(tl.int64), off_h.to(tl.int64), stride_mb, stride_mh,
                                       stride_ab, stride_ah, MASK_KIND, ALIBI)

    ranges = block_ranges(m0, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT,
                          False)
    offs_n0 = tl.arange(0, BLOCK_N)
    # regions (score.py): 0 left edge (only with a left window side), 1 fully kept middle, 2 right
    # edge; edge tiles (region != 1) may hold dropped keys (keep_tile, masked loads). A REDO launch
    # runs pass 1 after pass 0: acc again with the final m_i, non-finite values contained (score
    # [Note] hidden values).
    for exact in tl.static_range(1 + REDO):
        if exact:
            m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
            acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        for region in tl.static_range(1 - HAS_LEFT, 3):
            for start_n in range(ranges[region], ranges[region + 1], BLOCK_N):
                start_n = tl.multiple_of(start_n, BLOCK_N)
                offs_n = start_n + offs_n0
                if USE_TMA:
                    k = k_src.load([start_n, 0])
                else:
                    k = load_rows(k_src, start_n, seqlen_k, stride_kn, HEAD_D, BLOCK_N, BLOCK_D, region != 1,
                                  HEAD_D != BLOCK_D)
                qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
                mask_tile = load_mask_tile(mask_base, m0, start_n, stride_mm, stride_mn, seqlen_q, seqlen_k,
                                           BLOCK_M, BLOCK_N, MASK_KIND)
                x, x_scale = step_input(qk, offs_m, offs_n, diag, qk_scale, softcap_scale, softcap_log2,
                                        alibi_log2, mask_tile, SOFTCAP, ALIBI, MASK_KIND, NEG_SCALE)
                if region != 1:
                    x = tl.where(keep_tile(offs_m, offs_n, diag, seqlen_k, window_left, window_right, HAS_LEFT,
                                           HAS_RIGHT), x, float("-inf"))
                if MASK_KIND == 1:
                    x = tl.where(mask_tile != 0, x, float("-inf"))
                if exact:
                    p = tl.math.exp2(x * x_scale - m_fin[:, None])
                else:
                    p, alpha, m_i, l_i = softmax_step(x, x_scale, m_i, l_i, region != 1 or MASK_KIND != 0)
                    acc = acc * alpha[:, None]
                if USE_TMA:
                    v = v_src.load([start_n, 0])
                else:
                    v = load_rows(v_src, start_n, seqlen_k, stride_vn, HEAD_DV, BLOCK_N, BLOCK_DV, region != 1,
                                  HEAD_DV != BLOCK_DV)
                if DROPOUT:
                    p = tl.where(dropout_keep(seed, dropout_p, offs_m, offs_n, off_h, off_b), p, 0.0)
                p = p.to(v.dtype)
                if exact:
                    bad = nonfinite(v)
                    if any_nonfinite(v):
                        keep = (offs_n < seqlen_k)[None, :]
                        if region != 1:
                            keep = keep_tile(offs_m, offs_n, diag, seqlen_k, window_left, window_right,
                                             HAS_LEFT, HAS_RIGHT)
                        if MASK_KIND == 1:
                            keep = keep & (mask_tile != 0)
                        acc = add_nonfinite(acc, p, v, bad, keep)
                        v = tl.where(bad, 0.0, v).to(v.dtype)
                acc = tl.dot(p, v, acc, input_precision=DOT_PREC)

    if FLAG_ROWS:  # rows that ended non-finite, for the REDO launch (score [Note] hidden values)
        tl.store(Flags + l_off + offs_m, tl.max(nonfinite(acc).to(tl.int8), 1), mask=offs_m < seqlen_q)
    out, lse = finish_rows(acc, m_i, l_i, 1.0 / (1.0 - dropout_p) if DROPOUT else 1.0)  # [Note] empty rows
    out = out.to(Out.dtype.element_ty)
    tl.store(l_base + offs_m, lse, mask=offs_m < seqlen_q)
    if USE_TMA:
        o_dst = tl.make_tensor_descriptor(o_base, [seqlen_q, HEAD_DV], [stride_om, 1], [BLOCK_M, BLOCK_DV])
        o_dst.store([m0, 0], out)
    else:
        rows = tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_DV)
        o_ptrs = o_base + m0.to(tl.int64) * stride_om + rows[:, None] * stride_om + cols[None, :]
        tl.store(o_ptrs, out, mask=(offs_m < seqlen_q)[:, None] & (cols < HEAD_DV)[None, :])


def _strides(t, varlen):
    """(batch, seq, head) strides; varlen tensors (T, H, D) get batch stride 0."""
    s = t.stride()
    return (0, s[0], s[1]) if varlen else s[:3]


def _tma_scratch(size: int, alignment: int, stream):
    """``triton.set_allocator`` hook: global memory for the kernel's device-side TMA descriptors."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_tma_allocator():
    """Device-side ``tl.make_tensor_descriptor`` needs an allocator; install ours only if none is set."""
    try:
        from triton.runtime import _allocation
        unset = isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    except (ImportError, AttributeError):
        unset = True
    if unset:
        triton.set_allocator(_tma_scratch)


def _outputs(q, v, varlen, batch, seqlen_q, hq):
    """out (B, Sq, Hq, Dv) / varlen (Tq, Hq, Dv) in q.dtype; lse fp32 (B, Hq, Sq) / varlen (Hq, Tq)."""
    if varlen:
        out = torch.empty((q.shape[0], hq, v.shape[-1]), dtype=q.dtype, device=q.device)
        lse = torch.empty((hq, q.shape[0]), dtype=torch.float32, device=q.device)
        return out, lse, (0, lse.stride(0))
    out = torch.empty((batch, seqlen_q, hq, v.shape[-1]), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, hq, seqlen_q), dtype=torch.float32, device=q.device)
    return out, lse, (lse.stride(0), lse.stride(1))


def launch_tl(q, k, v, out, lse, lse_strides, spec, fplan, batch, seqlen_q, seqlen_k, max_seqlen_q, tune_sk,
              cu_seqlens_q=None, cu_seqlens_k=None, flags=None, redo=False):
    """Launch ``_fwd_kernel`` into out / lse (see :func:`run_forward`). ``flags`` (int8 laid out
    as lse): the kernel stores each row's non-finite flag there, or with ``redo`` recomputes only
    the row blocks holding a flagged row (score [Note] hidden values)."""
    varlen = cu_seqlens_q is not None
    hq = q.shape[-2]
    sinks, alibi_slopes, attn_mask = spec.sinks, spec.alibi_slopes, spec.attn_mask
    grid = lambda meta: (_plan.cdiv(max_seqlen_q, meta["BLOCK_M"]) * batch * hq,)  # noqa: E731
    # a redo takes the first config: most of its programs exit at once, nothing to tune on
    kernel, meta = _plan.kernel_for(_fwd_kernel, "forward", fplan.configs, fplan.autotune and not redo,
                                    fplan.tune_key())
    if fplan.use_tma and q.is_cuda:
        _ensure_tma_allocator()
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        fast(kernel)[grid](
            q, k, v, out, lse, sinks, alibi_slopes, attn_mask, cu_seqlens_q, cu_seqlens_k, flags,
            *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(out, varlen), *lse_strides,
            *(alibi_slopes.stride() if alibi_slopes is not None else (0, 0)),
            *(attn_mask.stride() if attn_mask is not None else (0, 0, 0, 0)),
            hq, hq // k.shape[-2], seqlen_q, seqlen_k, max_seqlen_q, *spec.scalars(),
            _plan.bucket(max_seqlen_q), _plan.bucket(tune_sk),
            HEAD_D=q.shape[-1], HEAD_DV=v.shape[-1], BLOCK_D=fplan.block_d, BLOCK_DV=fplan.block_dv,
            IS_VARLEN=varlen, **spec.constexprs(), USE_TMA=fplan.use_tma,
            DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", FLAG_ROWS=flags is not None and not redo,
            REDO=redo, **meta,
        )


def run_forward(q, k, v, spec, fplan, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                max_seqlen_k=None):
    """Launch the forward for ``spec`` (a ScoreSpec) with an explicit ``plan.ForwardPlan`` (the
    contract's ``forward`` plans first)."""
    varlen = cu_seqlens_q is not None
    hq = q.shape[-2]
    if varlen:
        batch, seqlen_q, seqlen_k = cu_seqlens_q.numel() - 1, 0, 0
        if max_seqlen_q is None:  # host sync; the API passes it
            max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if batch > 0 else 0
        tune_sk = max_seqlen_q if max_seqlen_k is None else max_seqlen_k
    else:
        batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
        max_seqlen_q, tune_sk = seqlen_q, seqlen_k
    out, lse, lse_strides = _outputs(q, v, varlen, batch, seqlen_q, hq)
    if out.numel() == 0 or max_seqlen_q == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    shape = (q, k, v, out, lse, lse_strides, spec, fplan, batch, seqlen_q, seqlen_k, max_seqlen_q, tune_sk,
             cu_seqlens_q, cu_seqlens_k)
    if fplan.kernel == "gluon":  # dense, plain or causal, sm_90 (plan.forward.gluon_rule)
        from tileattn.backends.triton import gluon
        with torch.cuda.device(q.device):
            flags = gluon.forward(q, k, v, out, lse, spec.scale, spec.window[1] == 0)
    else:
        # calls whose tiles may hide a key flag their non-finite rows (score [Note] hidden values)
        c = spec.constexprs()
        hides = c["MASK_KIND"] == 1 or c["HAS_LEFT"] or c["HAS_RIGHT"]
        flags = torch.empty(lse.shape, dtype=torch.int8, device=lse.device) if hides else None
        launch_tl(*shape, flags)
    if flags is not None:  # the flagged rows again, exactly
        launch_tl(*shape, flags, redo=True)
    return out, lse


def forward(q, k, v, spec, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None):
    """Backend-contract forward (see ``tileattn.backends``) -> (out, lse)."""
    fplan = _plan.plan_forward(q, k, v, spec, varlen=cu_seqlens_q is not None)
    return run_forward(q, k, v, spec, fplan, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                       max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
