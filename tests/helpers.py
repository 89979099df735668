"""Test helpers: RELIABILITY.md's tolerance rule (from ``tileattn.tolerance``) and small input factories."""

import math

import torch

from tileattn import paged, tolerance


def _fail(name, msg):
    raise AssertionError(f"{name}: {msg}")


def assert_close(name, out, ref_hi, ref_lo, c=2.0, dtype=None, fp32_plain=False):
    """Check kernel output ``out`` against the oracle by RELIABILITY.md's rule
    (:func:`tileattn.tolerance.check`, which documents the arguments); raise AssertionError."""
    verdict = tolerance.check(out, ref_hi, ref_lo, c=c, dtype=dtype, fp32_plain=fp32_plain)
    if not verdict.ok:
        _fail(name, verdict.why)


def assert_cancelled(name, out, *terms, scale=1.0):
    """A gradient that is exactly 0 by cancellation (:func:`tileattn.tolerance.check_cancelled`)."""
    verdict = tolerance.check_cancelled(out, *terms, scale=scale)
    if not verdict.ok:
        _fail(name, verdict.why.replace("|value|", f"|{name}|"))


def randn(shape, dtype, device, requires_grad=False):
    """Standard-normal tensor of ``shape`` (fresh draw), optionally a grad leaf."""
    return torch.randn(shape, dtype=dtype, device=device).requires_grad_(requires_grad)


def leaf(x, dtype=None):
    """Detached copy of ``x`` (same strides when dtype is unchanged) as a grad leaf."""
    x = x.detach() if dtype is None else x.detach().to(dtype)
    return x.requires_grad_()


def make_qkv(B, Sq, Sk, Hq, Hkv, D, Dv=None, *, dtype=torch.float32, device="cpu", layout="bshd",
             requires_grad=False):
    """q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv) in native shape.

    ``layout``: "bshd" contiguous; "bhsd" transposed views of (B, H, S, D) storage;
    "padded" slices of a wider last dim (non-contiguous rows, last-dim stride 1).
    With ``requires_grad`` the (possibly non-contiguous) tensors are leaves.
    """
    Dv = D if Dv is None else Dv

    def make(S, H, d):
        if layout == "bshd":
            x = randn((B, S, H, d), dtype, device)
        elif layout == "bhsd":
            x = randn((B, H, S, d), dtype, device).transpose(1, 2)
        elif layout == "padded":
            x = randn((B, S, H, d + 8), dtype, device)[..., :d]
        else:
            raise ValueError(f"unknown layout {layout!r}")
        return x.requires_grad_(requires_grad)

    return make(Sq, Hq, D), make(Sk, Hkv, D), make(Sk, Hkv, Dv)


def cu_seqlens(lens, device="cpu"):
    """int32 (B+1,) cumulative offsets of sequence lengths ``lens``, starting at 0."""
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def to_paged(cache, block_size, spare=3, table=None):
    """Scatter contiguous ``cache`` (B, Smax, H, D) into shuffled pages (+``spare`` unused ones).

    Returns paged (B * ceil(Smax/bs) + spare, block_size, H, D) and block_table int32
    (B, ceil(Smax/bs)); page block_table[b, t // bs] slot t % bs holds cache[b, t]. Pass the
    ``table`` returned for k to page v the same way.
    """
    B, Smax, H, D = cache.shape
    per = math.ceil(Smax / block_size)
    n = B * per + spare
    if table is None:
        table = torch.randperm(n, device=cache.device)[:B * per].view(B, per)
    table = table.to(torch.int32)
    pages = torch.randn(n, block_size, H, D, dtype=cache.dtype, device=cache.device)
    pos = torch.arange(Smax, device=cache.device).expand(B, Smax)
    paged.scatter_(pages, table, pos, cache)
    return pages, table
