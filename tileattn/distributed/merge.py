"""Exact merge of partial attention results through their lse (natural log, fp32).

Each call over a subset of keys gives ``out_b`` (softmax over its keys) and ``lse_b``. Over
the union, ``lse = logaddexp(lse_a, lse_b)`` and ``out = out_a e^(lse_a - lse) +
out_b e^(lse_b - lse)``. The sink adds ``e^sink`` to the denominator once, after the last
block: ``lse' = logaddexp(lse, sink)``, ``out' = out e^(lse - lse')``.

[Note] empty rows
    A row no key of a block reaches has lse_b = -inf and out_b = 0: its weight must be
    exactly 0, and a row empty in every block stays (out 0, lse -inf), never NaN. The
    weights are therefore taken against ``m = max(lse_a, lse_b)`` replaced by 0 where it is
    -inf, and divided by their sum replaced by 1 where it is 0.
"""

import torch


class Merge:
    """Running (out, lse) of one rank's queries: out fp32 (B, S, Hq, Dv), lse (B, Hq, S)."""

    def __init__(self, q: torch.Tensor, dv: int):
        B, S, H, _ = q.shape
        self.out = torch.zeros(B, S, H, dv, dtype=torch.float32, device=q.device)
        self.lse = torch.full((B, H, S), float("-inf"), dtype=torch.float32, device=q.device)

    def add(self, rows: tuple, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
        """Fold a block's (out_b (B, n, Hq, Dv), lse_b (B, Hq, n)) into query rows [rows)."""
        sl = slice(*rows)
        lse_a, out_a = self.lse[..., sl], self.out[:, sl]
        m = torch.maximum(lse_a, lse_b)
        m = torch.where(m == float("-inf"), 0.0, m)
        wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)
        total = wa + wb
        self.lse[..., sl] = m + torch.log(total)
        norm = torch.where(total == 0, 1.0, total)
        out_a.mul_(_rows(wa / norm)).add_(out_b.float() * _rows(wb / norm))

    def finish(self, sinks, dtype):
        """(out in ``dtype``, lse fp32) with the sink term (``sinks`` (Hq,) or None) folded in once."""
        if sinks is not None:
            self.add((0, self.lse.shape[-1]), torch.zeros_like(self.out),
                     sinks.float()[None, :, None].expand_as(self.lse))
        return self.out.to(dtype), self.lse


def _rows(w: torch.Tensor) -> torch.Tensor:
    """(B, Hq, n) row weights as (B, n, Hq, 1) to scale a (B, n, Hq, Dv) output."""
    return w.transpose(1, 2).unsqueeze(-1)


def block_dout(dout: torch.Tensor, lse_b: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """dout scaled per row by e^(lse_b - lse), in dout's dtype.

    [Note] block backward
        A backend's backward recomputes P_b = e^(s - lse_b) with the block's own lse (exact at
        any magnitude, the backend's own rule), while the true weights are P = P_b e^(lse_b -
        lse). With w = e^(lse_b - lse) in [0, 1] per row: dV = P^T dO = P_b^T (w dO), and
        dS = P (dO V^T - delta) = P_b (w dO V^T - w delta) with w delta = rowsum((w dO) * O),
        O the merged output. So the block's backward on (w dO, O, lse_b) is exact. w = 0 for
        rows the block does not reach and rows empty everywhere (lse = -inf)."""
    w = torch.where(lse == float("-inf"), 0.0, torch.exp(lse_b - lse))
    return (dout.float() * _rows(w)).to(dout.dtype)


def dsinks(sinks: torch.Tensor, dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """This rank's dL/dsinks (Hq,) fp32: -sum_i e^(sink - lse_i) delta_i, delta_i = dO_i . O_i."""
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2)  # (B, Hq, S)
    p = torch.where(lse == float("-inf"), 0.0, torch.exp(sinks.float()[None, :, None] - lse))
    return -(p * delta).sum((0, 2))
