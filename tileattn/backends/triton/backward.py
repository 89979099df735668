"""Triton flash-attention backward: the contract's ``backward`` (dense and varlen), launcher only.

Kernels live in ``backward_kernels.py`` (dQ over query blocks, which also writes lse * log2(e)
and delta = rowsum(out * dout) to padded buffers, then dK/dV over key blocks). Inputs follow
``tileattn.backends``: q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv), dout/out
(B, Sq, Hq, Dv), lse fp32 (B, Hq, Sq) [varlen: (Tq, Hq, D), (Tk, Hkv, D[v]), lse (Hq, Tq)], any
strides. Returns dq, dk, dv contiguous in their inputs' dtypes, dsinks fp32 (Hq,) or None,
dmask fp32 (B, Hq, Sq, Sk) or None.

Determinism: there are no atomics anywhere and every gradient element is produced by one
program in a fixed order, so gradients are bitwise reproducible for any ``deterministic``
(the autotuner's choice is cached per shape bucket, so repeated calls run the same config).
dsinks_h = -sum_i exp(sink_h - lse_i) * delta_i is a plain torch reduction (deterministic).

Tile loads: on sm_90 from TMA_MIN_SEQLEN keys or rows on, the inner loops read their tiles
through per-program tensor descriptors (TMA), else through pointers; ``TILEATTN_TMA`` overrides.

Example::

    spec = ScoreSpec(scale=0.125, window=(-1, 0))  # causal
    out, lse = forward(q, k, v, spec)
    dq, dk, dv, _, _ = backward(dout, q, k, v, out, lse, spec)
"""

import os
from collections import namedtuple

import torch

from tileattn.backends.triton.backward_kernels import _bwd_dkdv_kernel, _bwd_dq_kernel
from tileattn.backends.triton.forward import _ensure_tma_allocator, _strides
from tileattn.backends.triton.launch import fast
from tileattn.plan import autotuner, bucket, cdiv, device_target, first_misaligned, head_block

# each sequence's rows in the lse2 / delta buffers are padded to a multiple of this; every
# config's BLOCK_M divides it (see backward_kernels [Note] padded row stats)
ROW_PAD = 128

Cfg = namedtuple("Cfg", "block_m block_n num_warps num_stages why")
# (target, "16" | "32" bit dtype, head-dim block) -> configs, default first. Registers and spills
# quoted from offline sm_90 compiles (triton 3.6 + cuobjdump) of the plain kernel unless marked
# causal; measured times on the H100 should replace these reasons. The autotuner times the list.
# dK/dV: BLOCK_N keys per program, BLOCK_M query rows per inner step.
_DKDV = {
    ("sm_90", "16", 64): (Cfg(32, 128, 8, 3, "128 keys per program, 32-row steps; no spill, causal included"),
                          Cfg(64, 128, 8, 3, "Flex H100 shape (BLOCK_M1=64, BLOCK_N1=128); causal spills 688 B"),
                          Cfg(64, 64, 8, 3, "more programs for short sequences; causal spills 608 B")),
    ("sm_90", "16", 128): (Cfg(32, 128, 8, 3, "128 keys per program, 32-row steps: no spill (causal: 192 B)"),
                           Cfg(16, 128, 8, 3, "16-row steps: no spill with causal masking"),
                           Cfg(64, 128, 8, 3, "Flex H100 D=128 choice; spills 176 B (causal: 1.1 kB)")),
    ("sm_90", "16", 256): (Cfg(16, 64, 8, 2, "dk/dv 64x256 fp32 over two warpgroups; no spill (causal: 128 B)"),
                           Cfg(32, 64, 8, 2, "longer row steps; spills 40 B (causal: 336 B)"),
                           Cfg(64, 64, 8, 2, "Flex H100 D=256 shape; spills 408 B")),
    ("cuda", "16", 64): (Cfg(64, 64, 4, 3, "Ampere-class default"),),
    ("cuda", "16", 128): (Cfg(32, 128, 8, 2, "Ampere-class default"),),
    ("cuda", "16", 256): (Cfg(16, 64, 8, 2, "D=256: small tiles to fit registers and shared memory"),),
    ("cuda", "32", 64): (Cfg(16, 32, 8, 1, "fp32 ieee dots run on FMA units: small tiles; 96 regs"),),
    ("cuda", "32", 128): (Cfg(16, 32, 8, 1, "fp32 ieee dots run on FMA units: small tiles; 127 regs"),),
    ("cuda", "32", 256): (Cfg(16, 32, 8, 1, "fp32 ieee dots run on FMA units: small tiles; 204 regs"),),
    ("interpreter", "", 0): (Cfg(32, 64, 4, 1, "interpreter: BLOCK_M != BLOCK_N catches swapped roles"),),
}
# dQ: BLOCK_M query rows per program, BLOCK_N keys per inner step.
_DQ = {
    ("sm_90", "16", 64): (Cfg(128, 64, 8, 3, "Flex H100 shape (BLOCK_M2=128, BLOCK_N2=64); 136 regs"),
                          Cfg(128, 128, 8, 3, "longer key steps, fewer loop trips; 224 regs"),
                          Cfg(64, 64, 4, 3, "more programs for short sequences; 153 regs")),
    ("sm_90", "16", 128): (Cfg(128, 64, 8, 3, "Flex H100 D=128 choice; 234 regs, no spill"),
                           Cfg(128, 64, 8, 2, "shallower pipeline; 224 regs"),
                           Cfg(128, 32, 8, 3, "short key steps; 176 regs")),
    ("sm_90", "16", 256): (Cfg(128, 32, 8, 2, "dq 128x256 fp32 over two warpgroups; no spill"),
                           Cfg(64, 32, 8, 2, "more programs; 237 regs"),
                           Cfg(64, 64, 8, 2, "Flex H100 D=256 shape; spills 96 B")),
    ("cuda", "16", 64): (Cfg(64, 64, 4, 3, "Ampere-class default"),),
    ("cuda", "16", 128): (Cfg(128, 64, 8, 2, "Ampere-class default"),),
    ("cuda", "16", 256): (Cfg(64, 32, 8, 2, "D=256: small tiles to fit registers and shared memory"),),
    ("cuda", "32", 64): (Cfg(32, 16, 8, 1, "fp32 ieee dots run on FMA units: small tiles; 120 regs"),),
    ("cuda", "32", 128): (Cfg(32, 16, 8, 1, "fp32 ieee dots run on FMA units: small tiles; 106 regs"),),
    ("cuda", "32", 256): (Cfg(32, 16, 8, 1, "fp32 ieee dots run on FMA units: small tiles; 177 regs"),),
    ("interpreter", "", 0): (Cfg(64, 32, 4, 1, "interpreter: BLOCK_M != BLOCK_N catches swapped roles"),),
}


def _configs(table, t, block_d, block_dv, work):
    """Candidate configs for tensors like ``t``; only the default one with TILEATTN_AUTOTUNE=0 or
    when ``work`` (bucketed Sq * Sk) is below 512 x 512: small calls are launch-bound, and
    timing them would only add compiles."""
    if t.device.type != "cuda":
        return table[("interpreter", "", 0)]
    width = "32" if t.dtype == torch.float32 else "16"
    target = "sm_90" if width == "16" and device_target(t)[0] == "sm_90" else "cuda"
    configs = table[(target, width, max(64, block_d, block_dv))]
    return configs[:1] if os.environ.get("TILEATTN_AUTOTUNE") == "0" or work < 512 * 512 else configs


def _dkdv_smem(c, block_d, block_dv, es):
    """Shared memory of a dK/dV program: its k, v tile (BLOCK_N keys) + num_stages q, do tiles."""
    return es * (block_d + block_dv) * (c.block_n + max(c.num_stages, 1) * c.block_m)


def _dq_smem(c, block_d, block_dv, es):
    """Shared memory of a dQ program: its q, do tile (BLOCK_M rows) + num_stages k, v tiles."""
    return es * (block_d + block_dv) * (c.block_m + max(c.num_stages, 1) * c.block_n)


# which -> (shared memory, rows one program holds, the bucketed length those rows cover)
_TUNING = {"dkdv": (_dkdv_smem, lambda c: c.block_n, "tune_sk"),
           "dq": (_dq_smem, lambda c: c.block_m, "tune_sq")}


def _launcher(kernel, which, configs, features):
    """(kernel to launch, direct-launch meta kwargs): an autotuner cached per feature set, or the kernel."""
    if len(configs) == 1:
        c = configs[0]
        return fast(kernel), dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages)
    return fast(autotuner(kernel, (which, configs, features), configs, *_TUNING[which])), {}


# Tensor-descriptor loads pay a per-program descriptor setup: measured on the H200 (bf16, D=128,
# H=16, 16k tokens, backward TFLOP/s TMA vs pointers, two runs): N=16k 396-399 vs 385-389, causal
# 355-374 vs 343-361; N=4k 371-381 vs 357-372, causal 311-318 vs 306-311; N=1k 308-316 vs 313-319,
# causal 211-213 vs 217-224. So TMA from 4096 keys or rows on.
TMA_MIN_SEQLEN = 4096


def _use_tma(q, k, v, dout, max_seqlen):
    """Tensor-descriptor loads for the inner loops' tiles (q, dout in dK/dV; k, v in dQ)?

    On sm_90 for 16-bit data whose pointers and row strides are 16-byte aligned, when the
    longer of the (maximum) query and key lengths is at least TMA_MIN_SEQLEN.
    ``TILEATTN_TMA=0`` turns it off; ``=1`` forces it at any length (also in the interpreter).
    """
    env = os.environ.get("TILEATTN_TMA")
    if env == "0" or q.dtype == torch.float32:
        return False
    if env != "1" and not (q.is_cuda and device_target(q)[0] == "sm_90" and max_seqlen >= TMA_MIN_SEQLEN):
        return False
    return (first_misaligned(q=q, k=k, v=v, dout=dout) is None
            and all(t.shape[-1] * t.element_size() % 16 == 0 for t in (q, k, v, dout)))


# Causal backward programs get longer toward key block 0 (dK/dV) or the last row block (dQ).
# Launching a group of heads' long programs first keeps the short ones for the tail, as long as
# the group's tiles the programs re-read (q/dout or k/v) fit in this share of L2 (50 MB H100).
# H200, bf16 D=128 causal bwd TFLOP/s, head-major vs groups (same process, two rounds): N=1k
# 219-225 vs 226-232 (32 heads), N=4k 317 vs 323-329 (8 heads); N=16k 371-372 vs 352-366 with
# pairs of heads, so groups smaller than MIN_HEAD_GROUP stay head-major.
L2_SHARE = 16 << 20
MIN_HEAD_GROUP = 4


def _head_group(uneven, rows, row_bytes, num_bh):
    """Heads per scheduling group (``_block_and_head``): 1 (head-major) unless the programs'
    work is ``uneven`` (a right window edge, as causal), else the largest power of two <= num_bh
    whose ``rows`` x ``row_bytes`` re-read tiles fit in L2_SHARE (1 if below MIN_HEAD_GROUP)."""
    fit = min(L2_SHARE // max(1, rows * row_bytes), num_bh)
    if not uneven or fit < MIN_HEAD_GROUP:
        return 1
    return 1 << (fit.bit_length() - 1)


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
    block_d, block_dv = head_block(head_d), head_block(head_dv)
    right = spec.window[1]
    use_tma = _use_tma(q, k, v, dout, max(max_seqlen_q, max_seqlen_k))
    score_flags = spec.constexprs()
    sinks_flag = score_flags.pop("SINKS")  # only the dQ kernel takes it
    flags = dict(HEAD_D=head_d, HEAD_DV=head_dv, BLOCK_D=block_d, BLOCK_DV=block_dv, IS_VARLEN=varlen,
                 **score_flags, USE_TMA=use_tma, DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32")
    features = tuple(sorted(flags.items())) + (("MASK_GRAD", mask_grad), ("SINKS", sinks_flag))
    common = (*_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(dout, varlen))
    tail = (*(alibi_slopes.stride() if alibi_slopes is not None else (0, 0)),
            *(attn_mask.stride() if attn_mask is not None else (0, 0, 0, 0)))
    scalars = (spec.scale, *spec.scalars(), bucket(max_seqlen_q), bucket(max_seqlen_k))

    work = bucket(max_seqlen_q) * bucket(max_seqlen_k)
    if use_tma and q.is_cuda:
        _ensure_tma_allocator()
    # [Note] padded row stats: sequence b's rows start at b * stat_stride_b (+ cu_seqlens_q[b])
    stat_stride_b = ROW_PAD if varlen else cdiv(seqlen_q, ROW_PAD) * ROW_PAD
    rows = q.shape[0] + batch * ROW_PAD if varlen else batch * stat_stride_b
    lse2_pad = torch.empty((hq, rows), dtype=torch.float32, device=q.device)
    delta_pad = torch.empty_like(lse2_pad)
    sink_delta = torch.empty_like(lse) if sinks is not None else lse  # not written without sinks
    # dQ first: it writes lse2 and delta = rowsum(out * dout), which the dK/dV kernel reads
    kernel, meta = _launcher(_bwd_dq_kernel, "dq", _configs(_DQ, q, block_d, block_dv, work), features)
    kernel[lambda m: (cdiv(max_seqlen_q, m["BLOCK_M"]) * batch * hq,)](  # 1-D: no 65535 cap
        q, k, v, dout, out, lse, lse2_pad, delta_pad, sink_delta, dq, dmask, alibi_slopes, attn_mask,
        cu_seqlens_q, cu_seqlens_k, *common, *_strides(out, varlen), *_strides(dq, varlen),
        stride_lb, stride_lh, stat_stride_b, rows, *tail,
        hq, hq // hkv, seqlen_q, seqlen_k, max_seqlen_q,
        _head_group(right >= 0, max_seqlen_k, (head_d + head_dv) * k.element_size(), batch * hq),
        *scalars, MASK_GRAD=mask_grad, SINKS=sinks_flag, ROW_PAD=ROW_PAD,
        **flags, **meta)
    kernel, meta = _launcher(_bwd_dkdv_kernel, "dkdv", _configs(_DKDV, q, block_d, block_dv, work), features)
    kernel[lambda m: (cdiv(max_seqlen_k, m["BLOCK_N"]) * batch * hkv,)](  # 1-D: no 65535 cap
        q, k, v, dout, lse2_pad, delta_pad, dk, dv, alibi_slopes, attn_mask, cu_seqlens_q, cu_seqlens_k,
        *common, *_strides(dk, varlen), *_strides(dv, varlen), stat_stride_b, rows, *tail,
        hkv, hq // hkv, seqlen_q, seqlen_k, max_seqlen_k,
        _head_group(right >= 0, max_seqlen_q * (hq // hkv), (head_d + head_dv) * q.element_size(), batch * hkv),
        *scalars, **flags, **meta)

    dsinks = None
    if sinks is not None:  # P_sink,i = exp(sink - lse_i) times dS = 0 - delta_i (from fp32 p * dp)
        sink = sinks.float().view(-1, 1) if varlen else sinks.float().view(1, -1, 1)
        p_sink = torch.exp(sink - lse).masked_fill(sink == float("-inf"), 0.0)  # a -inf sink has no term
        dsinks = -(p_sink * sink_delta).sum(dim=1 if varlen else (0, 2))
    return dq, dk, dv, dsinks, dmask
