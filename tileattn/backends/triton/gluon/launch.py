"""Host side of the Gluon sm_90 forward: 4-D TMA descriptors, the meta-parameters, the launch.

Imported only after :func:`tileattn.backends.triton.gluon.available` said Gluon imports, and
only for the dense, 16-bit, D in {64, 128}, plain-or-causal calls the planner routes here
(``plan/forward.py``, ``gluon_rule``).
"""

import functools

import torch
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .forward_sm90 import fwd_kernel

HALF_M = 64  # query rows per consumer warpgroup (wgmma M = 64); BLOCK_M = 128 per CTA
BLOCK_N = 128
GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def kernel_meta(head_dim: int, causal: bool) -> dict:
    """Constexprs and launch options: 2-stage K/V ring at D=128 (Q and O 2 x 32 KB + 4 x 32 KB of
    227 KB), 3 stages at D=64; maxnreg 168 = (240 + 240 + 24) / 3 per thread of 3 warpgroups."""
    return dict(HEAD_D=head_dim, BLOCK_N=BLOCK_N, STAGES=2 if head_dim > 64 else 3, CAUSAL=causal, maxnreg=168)


def shared_bytes(head_dim: int, itemsize: int) -> int:
    """Tile bytes in shared memory per CTA (mbarriers aside): Q and out, two 64-row halves
    each, and kernel_meta's K/V ring of BLOCK_N-row tiles."""
    stages = kernel_meta(head_dim, False)["STAGES"]
    return itemsize * head_dim * (2 * 2 * HALF_M + 2 * stages * BLOCK_N)


@functools.lru_cache(maxsize=None)
def _layouts(head_dim: int, dtype):
    """Shared-memory layouts (128-byte swizzle) of the Q/O and K/V boxes."""
    return (gl.NVMMASharedLayout.get_default_for([1, HALF_M, 1, head_dim], GL_DTYPES[dtype]),
            gl.NVMMASharedLayout.get_default_for([1, BLOCK_N, 1, head_dim], GL_DTYPES[dtype]))


def descriptors(q, k, v, out):
    """TMA descriptors over the native (B, S, H, D) tensors with a (1, rows, 1, D) box."""
    D = q.shape[-1]
    q_layout, kv_layout = _layouts(D, q.dtype)
    return (TensorDescriptor(q, list(q.shape), list(q.stride()), [1, HALF_M, 1, D], q_layout),
            TensorDescriptor(k, list(k.shape), list(k.stride()), [1, BLOCK_N, 1, D], kv_layout),
            TensorDescriptor(v, list(v.shape), list(v.stride()), [1, BLOCK_N, 1, D], kv_layout),
            TensorDescriptor(out, list(out.shape), list(out.stride()), [1, HALF_M, 1, D], q_layout))


@functools.lru_cache(maxsize=None)
def _num_sms(device) -> int:
    """Persistent grid size: one CTA per SM (128-192 KB of shared memory each)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def forward(q, k, v, out, lse, scale: float, causal: bool, stages=None):
    """Fill ``out`` (B, Sq, Hq, D) and ``lse`` (B, Hq, Sq) for q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D).
    Returns the causal call's row flags int8 (B, Hq, Sq), nonzero where out ended non-finite
    (forward_sm90 [Note] hidden values: the caller redoes those rows), None for plain calls.
    ``stages``: the K/V ring depth instead of kernel_meta's (probes)."""
    batch, seqlen_q, hq, D = q.shape
    seqlen_k = k.shape[1]
    meta = kernel_meta(D, causal)
    meta["STAGES"] = stages or meta["STAGES"]
    maxnreg = meta.pop("maxnreg")
    n_work = (seqlen_q + 2 * HALF_M - 1) // (2 * HALF_M) * batch * hq
    # causal: one CTA per item, so the hardware hands the next (shorter) item to whichever SM
    # frees first; a persistent round-robin grid measured 318 / 443 TFLOP/s at 1k / 16k against
    # 358 / 608 this way (H200, D=128). Plain items are equal: one CTA per SM walks them and
    # hides each item's Q load and out store under its neighbours' work.
    grid = (n_work if causal else min(n_work, _num_sms(q.device)),)
    flags = torch.empty(lse.shape, dtype=torch.int8, device=lse.device) if causal else None
    fwd_kernel[grid](*descriptors(q, k, v, out), lse, lse if flags is None else flags, lse.stride(0), lse.stride(1),
                     hq, hq // k.shape[2], seqlen_q, seqlen_k, scale * 1.4426950408889634, n_work, **meta,
                     num_warps=4, maxnreg=maxnreg)
    return flags
