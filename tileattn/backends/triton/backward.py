"""Triton flash-attention backward: the contract's ``backward`` (dense and varlen), launcher only.

Kernels live in ``backward_kernels.py`` (dQ over query blocks, which also writes lse * log2(e)
and delta = rowsum(out * dout) to padded buffers (exact row statistics where |lse| is large),
then dK/dV over key blocks). Inputs follow
``tileattn.backends``: q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv), dout/out
(B, Sq, Hq, Dv), lse fp32 (B, Hq, Sq) [varlen: (Tq, Hq, D), (Tk, Hkv, D[v]), lse (Hq, Tq)], any
strides. Returns dq, dk, dv contiguous in their inputs' dtypes, dsinks fp32 (Hq,) or None,
dmask fp32 (B, Hq, Sq, Sk) or None.

Determinism: there are no atomics anywhere and every gradient element is produced by one
program in a fixed order, so gradients are bitwise reproducible for any ``deterministic``
(the autotuner's choice is cached per shape bucket, so repeated calls run the same config).
dsinks_h = -sum_i exp(sink_h - lse_i) * delta_i: the dQ kernel stores each row's term (its
P_sink from the exact row statistics), a plain torch sum adds them (deterministic).

Configs, tile loads (TMA or pointers) and head grouping come from the planner
(``plan.plan_backward``; ``tileattn.plan.describe(..., backward=True)`` prints them).

Example::

    spec = ScoreSpec(scale=0.125, window=(-1, 0))  # causal
    out, lse = forward(q, k, v, spec)
    dq, dk, dv, _, _ = backward(dout, q, k, v, out, lse, spec)
"""

import torch

from tileattn.backends.triton import plan as _plan
from tileattn.backends.triton.backward_kernels import _bwd_dkdv_kernel, _bwd_dq_kernel
from tileattn.backends.triton.forward import _ensure_tma_allocator, _strides
from tileattn.backends.triton.launch import fast
from tileattn.backends.triton.plan import ROW_PAD, cdiv


def backward(dout, q, k, v, out, lse, spec, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
             max_seqlen_k=None, deterministic=False, mask_grad=False):
    """Backend-contract backward (see ``tileattn.backends``) -> (dq, dk, dv, dsinks, dmask).

    Always deterministic (no atomics); ``deterministic`` is accepted for the contract.
    dmask (``mask_grad``, dense only) = dL/d(additive score term) fp32 (B, Hq, Sq, Sk).
    """
    varlen = cu_seqlens_q is not None
    sinks, alibi_slopes, attn_mask = spec.sinks, spec.alibi_slopes, spec.attn_mask
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    out = out if out.stride(-1) == 1 else out.contiguous()
    lse = lse.contiguous()
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    hq, hkv = q.shape[-2], k.shape[-2]
    if varlen:
        batch = cu_seqlens_q.numel() - 1
        if max_seqlen_q is None or max_seqlen_k is None:  # host sync; the API passes both
            max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if batch > 0 else 0
            max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max()) if batch > 0 else 0
        seqlen_q = seqlen_k = 0
        stride_lb, stride_lh = 0, lse.stride(0)
    else:
        batch, seqlen_q = q.shape[:2]
        seqlen_k = k.shape[1]
        max_seqlen_q, max_seqlen_k = seqlen_q, seqlen_k
        stride_lb, stride_lh = lse.stride(0), lse.stride(1)
    mask_grad = mask_grad and not varlen
    dmask = torch.zeros((batch, hq, seqlen_q, seqlen_k), dtype=torch.float32, device=q.device) if mask_grad else None
    if q.numel() == 0 or k.numel() == 0 or batch == 0 or max_seqlen_q == 0 or max_seqlen_k == 0:
        dsinks = None if sinks is None else torch.zeros_like(sinks, dtype=torch.float32)
        return dq.zero_(), dk.zero_(), dv.zero_(), dsinks, dmask

    head_d, head_dv = q.shape[-1], v.shape[-1]
    bplan = _plan.plan_backward(q, k, v, dout, spec, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                                varlen=varlen)
    if bplan.kernel == "gluon" and not deterministic:  # fused sm_90 kernel (dQ by atomics); None: run tl
        from tileattn.backends.triton.gluon.backward_launch import backward as gluon_backward
        grads = gluon_backward(dout, q, k, v, out, lse, spec.scale, spec.window[1] == 0)
        if grads is not None:
            return (*grads, None, dmask)
    block_d, block_dv, use_tma = bplan.block_d, bplan.block_dv, bplan.use_tma
    dq_group, dkdv_group = bplan.head_groups(batch, hq, hkv, max_seqlen_q, max_seqlen_k)
    score_flags = spec.constexprs()
    sinks_flag = score_flags.pop("SINKS")  # only the dQ kernel takes it
    del score_flags["NEG_SCALE"]  # the backward takes its row statistics from lse: any sign works
    flags = dict(HEAD_D=head_d, HEAD_DV=head_dv, BLOCK_D=block_d, BLOCK_DV=block_dv, IS_VARLEN=varlen,
                 **score_flags, USE_TMA=use_tma, DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32")
    features = tuple(sorted(flags.items())) + (("MASK_GRAD", mask_grad), ("SINKS", sinks_flag))
    common = (*_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(dout, varlen))
    tail = (*(alibi_slopes.stride() if alibi_slopes is not None else (0, 0)),
            *(attn_mask.stride() if attn_mask is not None else (0, 0, 0, 0)))
    scalars = (spec.scale, *spec.scalars(), _plan.bucket(max_seqlen_q), _plan.bucket(max_seqlen_k))

    if use_tma and q.is_cuda:
        _ensure_tma_allocator()
    # [Note] padded row stats: sequence b's rows start at b * stat_stride_b (+ cu_seqlens_q[b])
    stat_stride_b = ROW_PAD if varlen else cdiv(seqlen_q, ROW_PAD) * ROW_PAD
    rows = q.shape[0] + batch * ROW_PAD if varlen else batch * stat_stride_b
    lse2_pad = torch.empty((hq, rows), dtype=torch.float32, device=q.device)
    delta_pad = torch.empty_like(lse2_pad)
    log_l_pad = torch.empty_like(lse2_pad)  # backward_kernels [Note] large lse
    sink_delta = torch.empty_like(lse) if sinks is not None else lse  # not written without sinks
    # [Note] redo (backward_kernels): the main launches flag the rows / keys that ended non-finite
    flags_q = torch.empty(lse.shape, dtype=torch.int8, device=q.device)
    flags_k = torch.empty((hkv, k.shape[0]) if varlen else (batch, hkv, seqlen_k), dtype=torch.int8, device=q.device)
    flag_strides = (0, flags_k.stride(0)) if varlen else flags_k.stride()[:2]
    # dQ first: it writes lse2 and delta = rowsum(out * dout), which the dK/dV kernel reads; then
    # both again for their flagged blocks only (REDO: first config, most programs exit at once)
    for redo in (False, True):
        kernel, meta = _plan.kernel_for(_bwd_dq_kernel, "dq", bplan.dq.configs, bplan.dq.autotune and not redo,
                                        features)
        fast(kernel)[lambda m: (cdiv(max_seqlen_q, m["BLOCK_M"]) * batch * hq,)](  # 1-D: no 65535 cap
            q, k, v, dout, out, lse, lse2_pad, delta_pad, log_l_pad, sinks, sink_delta, dq, dmask, alibi_slopes,
            attn_mask, cu_seqlens_q, cu_seqlens_k, flags_q, *common, *_strides(out, varlen), *_strides(dq, varlen),
            stride_lb, stride_lh, stat_stride_b, rows, *tail,
            hq, hq // hkv, seqlen_q, seqlen_k, max_seqlen_q,
            dq_group,
            *scalars, MASK_GRAD=mask_grad, SINKS=sinks_flag, ROW_PAD=ROW_PAD, REDO=redo,
            **flags, **meta)
        kernel, meta = _plan.kernel_for(_bwd_dkdv_kernel, "dkdv", bplan.dkdv.configs,
                                        bplan.dkdv.autotune and not redo, features)
        fast(kernel)[lambda m: (cdiv(max_seqlen_k, m["BLOCK_N"]) * batch * hkv,)](  # 1-D: no 65535 cap
            q, k, v, dout, lse2_pad, delta_pad, log_l_pad, dk, dv, alibi_slopes, attn_mask, cu_seqlens_q,
            cu_seqlens_k, flags_k, *common, *_strides(dk, varlen), *_strides(dv, varlen), stat_stride_b, rows,
            *tail, *flag_strides,
            hkv, hq // hkv, seqlen_q, seqlen_k, max_seqlen_k,
            dkdv_group,
            *scalars, REDO=redo, **flags, **meta)

    dsinks = None
    if sinks is not None:  # row terms P_sink,i * delta_i (delta from fp32 p * dp), from the dQ kernel
        dsinks = -sink_delta.sum(dim=1 if varlen else (0, 2))
    return dq, dk, dv, dsinks, dmask
