"""Test helpers: RELIABILITY.md's tolerance rule and small input factories."""

import math

import torch

from tileattn import paged


def _fail(name, msg):
    raise AssertionError(f"{name}: {msg}")


def assert_close(name, out, ref_hi, ref_lo, c=2.0, dtype=None, fp32_plain=False):
    """Check kernel output ``out`` against the oracle by RELIABILITY.md's rule.

    ``ref_hi``: float64 reference from the same quantized inputs; ``ref_lo``: the plain
    reference in the kernel's dtype (``reference.*(upcast=False)``; may be None for fp32).
    ``dtype``: the kernel's compute dtype, default ``out.dtype`` -- pass q's dtype for lse,
    which is fp32 whatever the inputs. ``c``: 2 for forward outputs, 3 for gradients.

    - Positions where ref_hi is +-inf (empty rows' lse = -inf) must hold the same value in
      out; the finite rest is compared. NaN/Inf in out where ref_hi is finite fails.
    - fp32 kernel dtype: max|out - ref_hi| <= 1e-5 * max|ref_hi| (relative to the largest
      reference magnitude, so near-zero entries are not over-weighted). With ``fp32_plain``
      (inputs that make the problem ill-conditioned, e.g. |scale| up to 1e4: one ulp of a
      score moves P by |score| * 6e-8) the bound is the larger of that and
      c * max|ref_lo - ref_hi|, ref_lo being an fp32-level yardstick (plain fp32 math, or the
      float64 oracle on inputs perturbed by a few fp32 ulps).
    - fp16/bf16: with floor = 2 * max|(r + 0.3 - 0.3) - r|, r = ref_hi rounded to dtype and the
      arithmetic done in dtype, require max|out - ref_hi| <= c * max|ref_lo - ref_hi| + floor
      and mean|out - ref_hi| <= 1.5 * mean|ref_lo - ref_hi| + floor.
    """
    dtype = dtype or out.dtype
    if out.shape != ref_hi.shape:
        _fail(name, f"shape {tuple(out.shape)} != reference shape {tuple(ref_hi.shape)}")
    out64, hi = out.detach().to(device=ref_hi.device, dtype=torch.float64), ref_hi.detach().double()
    if hi.isnan().any():
        _fail(name, "the reference itself has NaN (bug in the test or the oracle)")
    fin = hi.isfinite()
    bad = ~fin & (out64 != hi)
    if bad.any():
        at = tuple(bad.nonzero()[0].tolist())
        _fail(name, f"{int(bad.sum())} entries differ where the reference is infinite, "
                    f"first at {at}: got {out64[at].item()}, expected {hi[at].item()}")
    out64, hi = out64[fin], hi[fin]
    nonfinite = ~out64.isfinite()
    if nonfinite.any():
        _fail(name, f"{int(nonfinite.sum())} NaN/Inf entries where the reference is finite")
    if hi.numel() == 0:
        return
    err = (out64 - hi).abs()
    if dtype == torch.float32:
        bound = 1e-5 * max(hi.abs().max().item(), torch.finfo(torch.float32).tiny)
        if fp32_plain:
            lo = ref_lo.detach().to(device=ref_hi.device, dtype=torch.float64)[fin]
            if not lo.isfinite().all():
                _fail(name, "ref_lo is not finite where ref_hi is: the tolerance would be meaningless")
            bound = max(bound, c * (lo - hi).abs().max().item())
        if err.max().item() > bound:
            _fail(name, f"fp32 max abs err {err.max().item():.3e} > bound {bound:.3e} (1e-5 * max|ref|"
                        f"{' or c x plain fp32 error' if fp32_plain else ''})")
        return
    lo = ref_lo.detach().to(device=ref_hi.device, dtype=torch.float64)[fin]
    if not lo.isfinite().all():
        _fail(name, "ref_lo is not finite where ref_hi is: the tolerance would be meaningless")
    lo_err = (lo - hi).abs()
    r = ref_hi.detach()[fin].to(dtype)
    floor = 2 * ((r + 0.3 - 0.3) - r).abs().max().item()
    max_bound = c * lo_err.max().item() + floor
    mean_bound = 1.5 * lo_err.mean().item() + floor
    msg = (f"{dtype}: max err {err.max().item():.3e} (bound {max_bound:.3e} = {c} * ref_lo max err "
           f"{lo_err.max().item():.3e} + floor {floor:.3e}); mean err {err.mean().item():.3e} "
           f"(bound {mean_bound:.3e})")
    if err.max().item() > max_bound or err.mean().item() > mean_bound:
        _fail(name, msg)


def assert_cancelled(name, out, *terms, scale=1.0):
    """For a gradient whose exact value is 0 everywhere because terms cancel (every row keeps
    one key: dS = P (dP - delta) = 0), where the relative rule has no scale: ``out`` must be
    finite and within fp32 noise of the cancelling terms, 1e-5 * |scale| * prod(max|term|)."""
    bound = 1e-5 * abs(scale)
    for t in terms:
        bound *= t.detach().abs().max().double().item()
    got = out.detach().double()
    if got.numel() and (not got.isfinite().all() or got.abs().max().item() > bound):
        _fail(name, f"should cancel to 0: max |{name}| {got.abs().max().item():.3e} > fp32 noise bound {bound:.3e}")


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
