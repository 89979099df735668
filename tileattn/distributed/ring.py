"""Ring attention engine: the forward and backward of one or more ranks over a transport.

Forward, per rank: for each source's K/V (as it arrives round the ring, or all at once
after an all-gather), make the step's calls (``schedule.plan_blocks``) through the public
``tileattn.attention(..., return_lse=True)`` and fold them into the running (out, lse)
(``merge.Merge``); the sink joins once, at the end.

Backward, per rank: the same calls through the backend's backward (``ops.bwd_impl``) with
the block's own lse and dout scaled by e^(lse_block - lse) (``merge.block_dout``: exact).
dQ stays home; dK/dV accumulators travel with the K/V they belong to, one hop behind
(ring-flash-attn's schedule): at step s a rank adds its part to the accumulator that
arrived and sends it on, and after the last step each accumulator is home. Under the
all-gather schedule the per-source dK/dV are reduce-scattered back to their owners.
"""

from dataclasses import dataclass

import torch

from .. import attention, ops
from .merge import Merge, block_dout, dsinks
from .schedule import plan_blocks


@dataclass(frozen=True)
class Config:
    """One call's settings, the same on every rank (checked by ``comm.agree``)."""

    world: int
    local_len: int
    layout: str
    causal: bool
    window: tuple
    scale: float
    softcap: float
    schedule: str
    backend: str

    def blocks(self, rank, src):
        return plan_blocks(rank, src, self.world, self.local_len, self.layout, self.causal, self.window)


def _keys(x, ranges):
    """Rows ``ranges`` of a source's k or v shard (a view for one range)."""
    parts = [x[:, lo:hi] for lo, hi in ranges]
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _mask(block, cfg, n, m, device):
    """Bool (n, m) keep mask of a pair the window cannot express (``block.shift`` set)."""
    if block.shift is None:
        return None
    rel = block.shift + torch.arange(m, device=device)[None, :] - torch.arange(n, device=device)[:, None]
    left, right = cfg.window[0], 0 if cfg.causal else cfg.window[1]
    keep = torch.ones(n, m, dtype=torch.bool, device=device)
    if left >= 0:
        keep &= rel >= -left
    if right >= 0:
        keep &= rel <= right
    return keep


def _steps(tp, kv, schedule):
    """Per step, one (src, (k, v)) per local rank: round the ring (the next transfer runs
    while the caller computes), or from one all-gather."""
    if schedule == "allgather":
        gathered = tp.all_gather(kv)
        for src in range(tp.world):
            yield [(src, g[src]) for g in gathered]
        return
    for step in range(tp.world):
        pending = tp.shift(kv) if step + 1 < tp.world else None
        yield [((r - step) % tp.world, x) for r, x in zip(tp.ranks, kv)]
        if pending is not None:
            kv = pending.wait()


def forward(tp, cfg, qs, ks, vs, sinks):
    """Per local rank: out (B, S, Hq, Dv) in q's dtype, lse (B, Hq, S) fp32, and the
    blocks' lse {(src, j): (B, Hq, n)} for the backward."""
    merges = [Merge(q, v.shape[-1]) for q, v in zip(qs, vs)]
    saved = [{} for _ in qs]
    for pairs in _steps(tp, [(k, v) for k, v in zip(ks, vs)], cfg.schedule):
        for i, (src, (k, v)) in enumerate(pairs):
            for j, b in enumerate(cfg.blocks(tp.ranks[i], src)):
                kk, vv = _keys(k, b.k), _keys(v, b.k)
                q = qs[i][:, b.q[0]:b.q[1]]
                out_b, lse_b = attention(q, kk, vv, window=b.window, scale=cfg.scale, softcap=cfg.softcap,
                                         attn_mask=_mask(b, cfg, q.shape[1], kk.shape[1], q.device),
                                         return_lse=True, backend=cfg.backend)
                merges[i].add(b.q, out_b, lse_b)
                saved[i][src, j] = lse_b
    results = [m.finish(sinks, q.dtype) for m, q in zip(merges, qs)]
    return [o for o, _ in results], [lse for _, lse in results], saved


def _block_grads(cfg, i, rank, src, k, v, ctx):
    """This rank's dK, dV (fp32, k/v's shapes) for source ``src``; adds into ctx.dq[i]."""
    dk, dv = torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)
    q, out, lse, dout = ctx.qs[i], ctx.outs[i], ctx.lses[i], ctx.douts[i]
    for j, b in enumerate(cfg.blocks(rank, src)):
        rows = slice(*b.q)
        kk, vv = _keys(k, b.k).contiguous(), _keys(v, b.k).contiguous()
        n, m = b.q[1] - b.q[0], kk.shape[1]
        lse_b = ctx.saved[i][src, j]
        dout_b = block_dout(dout[:, rows], lse_b, lse[..., rows])
        dq_b, dk_b, dv_b, _, _ = ops.bwd_impl(
            dout_b, q[:, rows].contiguous(), kk, vv, out[:, rows].contiguous(), lse_b, None, None, n, m, cfg.scale,
            *b.window, cfg.softcap, None, None, _mask(b, cfg, n, m, q.device), 0.0, None, False, False, cfg.backend)
        ctx.dq[i][:, rows] += dq_b
        at = 0
        for lo, hi in b.k:
            dk[:, lo:hi] += dk_b[:, at:at + hi - lo]
            dv[:, lo:hi] += dv_b[:, at:at + hi - lo]
            at += hi - lo
    return dk, dv


def backward(tp, cfg, ctx, ks, vs):
    """(dks, dvs) fp32 per local rank; dqs accumulate in ctx.dq."""
    kv = [(k, v) for k, v in zip(ks, vs)]
    if cfg.schedule == "allgather":
        gathered = tp.all_gather(kv)
        grads = [[_block_grads(cfg, i, r, src, *g[src], ctx) for src in range(tp.world)]
                 for i, (r, g) in enumerate(zip(tp.ranks, gathered))]
        return zip(*tp.reduce_scatter(grads))
    pending = None
    for pairs in _steps(tp, kv, "ring"):
        grads = [_block_grads(cfg, i, tp.ranks[i], src, k, v, ctx) for i, (src, (k, v)) in enumerate(pairs)]
        if pending is not None:
            grads = [(a[0] + b[0], a[1] + b[1]) for a, b in zip(grads, pending.wait())]
        pending = tp.shift(grads)
    return zip(*pending.wait())


class RingFunction(torch.autograd.Function):
    """autograd over ``forward``/``backward`` for the local ranks of ``tp``.

    apply(tp, cfg, sinks, *qs, *ks, *vs) -> (*outs, *lses); lse is not differentiable."""

    @staticmethod
    def forward(ctx, tp, cfg, sinks, *qkv):
        n = len(tp.ranks)
        qs, ks, vs = qkv[:n], qkv[n:2 * n], qkv[2 * n:]
        outs, lses, saved = forward(tp, cfg, qs, ks, vs, sinks)
        ctx.tp, ctx.cfg, ctx.saved = tp, cfg, saved
        ctx.save_for_backward(sinks, *qkv, *outs, *lses)
        ctx.mark_non_differentiable(*lses)
        return (*outs, *lses)

    @staticmethod
    def backward(ctx, *grads):
        tp, cfg, n = ctx.tp, ctx.cfg, len(ctx.tp.ranks)
        sinks, *rest = ctx.saved_tensors
        qs, ks, vs, outs, lses = (rest[j * n:(j + 1) * n] for j in range(5))
        ctx.qs, ctx.outs, ctx.lses = qs, outs, lses
        ctx.douts = [torch.zeros_like(o) if g is None else g for g, o in zip(grads[:n], outs)]
        ctx.dq = [torch.zeros_like(q, dtype=torch.float32) for q in qs]
        dks, dvs = backward(tp, cfg, ctx, ks, vs)
        dsink = None
        if sinks is not None and ctx.needs_input_grad[2]:
            dsink = sum(dsinks(sinks, d, o, lse) for d, o, lse in zip(ctx.douts, outs, lses)).to(sinks.dtype)
        return (None, None, dsink, *(d.to(q.dtype) for d, q in zip(ctx.dq, qs)),
                *(d.to(k.dtype) for d, k in zip(dks, ks)), *(d.to(v.dtype) for d, v in zip(dvs, vs)))
