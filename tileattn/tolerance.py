"""The tolerance rule (docs/design/RELIABILITY.md), written once: tests and ``tileattn verify``
both judge a kernel output against the float64 oracle with :func:`check`.

    >>> out = tileattn.attention(q, k, v)                              # q, k, v fp16
    >>> hi, _ = tileattn.reference.attention(q, k, v)                  # float64, same inputs
    >>> lo, _ = tileattn.reference.attention(q, k, v, upcast=False)    # plain fp16 math
    >>> tileattn.tolerance.check(out, hi, lo).ok
    True
"""

from typing import NamedTuple

import torch


class Verdict(NamedTuple):
    """``ok``; ``err``: max |out - ref_hi| over finite reference entries; ``bound``: the max
    error allowed; ``why``: the failure in words ("" when ok)."""

    ok: bool
    err: float
    bound: float
    why: str = ""


def _fail(why: str, err=float("nan"), bound=float("nan")) -> Verdict:
    return Verdict(False, err, bound, why)


def check(out, ref_hi, ref_lo=None, *, c=2.0, dtype=None, fp32_plain=False) -> Verdict:
    """Judge kernel output ``out`` against the oracle.

    ``ref_hi``: float64 reference from the same quantized inputs (same shape as out);
    ``ref_lo``: the plain reference in the kernel's dtype (``reference.*(upcast=False)``; may
    be None for fp32). ``dtype``: the kernel's compute dtype, default ``out.dtype`` -- pass q's
    dtype for lse, which is fp32 whatever the inputs. ``c``: 2 for forward outputs, 3 for
    gradients.

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
        return _fail(f"shape {tuple(out.shape)} != reference shape {tuple(ref_hi.shape)}")
    out64, hi = out.detach().to(device=ref_hi.device, dtype=torch.float64), ref_hi.detach().double()
    if hi.isnan().any():
        return _fail("the reference itself has NaN (bug in the caller or the oracle)")
    fin = hi.isfinite()
    bad = ~fin & (out64 != hi)
    if bad.any():
        at = tuple(bad.nonzero()[0].tolist())
        return _fail(f"{int(bad.sum())} entries differ where the reference is infinite, "
                     f"first at {at}: got {out64[at].item()}, expected {hi[at].item()}")
    out64, hi = out64[fin], hi[fin]
    nonfinite = ~out64.isfinite()
    if nonfinite.any():
        return _fail(f"{int(nonfinite.sum())} NaN/Inf entries where the reference is finite")
    if hi.numel() == 0:
        return Verdict(True, 0.0, 0.0)
    err = (out64 - hi).abs()
    if dtype == torch.float32:
        bound = 1e-5 * max(hi.abs().max().item(), torch.finfo(torch.float32).tiny)
        if fp32_plain:
            lo = ref_lo.detach().to(device=ref_hi.device, dtype=torch.float64)[fin]
            if not lo.isfinite().all():
                return _fail("ref_lo is not finite where ref_hi is: the tolerance would be meaningless")
            bound = max(bound, c * (lo - hi).abs().max().item())
        ok = err.max().item() <= bound
        why = "" if ok else (f"fp32 max abs err {err.max().item():.3e} > bound {bound:.3e} (1e-5 * max|ref|"
                             f"{' or c x plain fp32 error' if fp32_plain else ''})")
        return Verdict(ok, err.max().item(), bound, why)
    lo = ref_lo.detach().to(device=ref_hi.device, dtype=torch.float64)[fin]
    if not lo.isfinite().all():
        return _fail("ref_lo is not finite where ref_hi is: the tolerance would be meaningless")
    lo_err = (lo - hi).abs()
    r = ref_hi.detach()[fin].to(dtype)
    floor = 2 * ((r + 0.3 - 0.3) - r).abs().max().item()
    max_bound = c * lo_err.max().item() + floor
    mean_bound = 1.5 * lo_err.mean().item() + floor
    ok = err.max().item() <= max_bound and err.mean().item() <= mean_bound
    why = "" if ok else (f"{dtype}: max err {err.max().item():.3e} (bound {max_bound:.3e} = {c} * ref_lo max err "
                         f"{lo_err.max().item():.3e} + floor {floor:.3e}); mean err {err.mean().item():.3e} "
                         f"(bound {mean_bound:.3e})")
    return Verdict(ok, err.max().item(), max_bound, why)


def check_cancelled(out, *terms, scale=1.0) -> Verdict:
    """For a gradient whose exact value is 0 everywhere because terms cancel (every row keeps
    one key: dS = P (dP - delta) = 0), where the relative rule has no scale: ``out`` must be
    finite and within fp32 noise of the cancelling terms, 1e-5 * |scale| * prod(max|term|)."""
    bound = 1e-5 * abs(scale)
    for t in terms:
        bound *= t.detach().abs().max().double().item()
    got = out.detach().double()
    if not got.numel():
        return Verdict(True, 0.0, bound)
    err = got.abs().max().item()
    if not got.isfinite().all() or err > bound:
        return _fail(f"should cancel to 0: max |value| {err:.3e} > fp32 noise bound {bound:.3e}", err, bound)
    return Verdict(True, err, bound)

