"""A paper model of the ring: per-step compute vs transfer time, and where transfers hide.

One ring step on a rank attends its S/W queries to one source's S/W keys while the next
K/V block moves one hop (``batch_isend_irecv``), so a step costs max(compute, transfer) and
the transfer hides when compute >= transfer. Per step, with n = S/W, g = Hq/Hkv, b bytes
per element, F the attention rate and BW the link bandwidth per direction:

    forward   compute  = 4 B Hq n^2 D c / F_fwd        (QK^T and PV, 2 flops per MAC;
                                                         c = 1/2 under causal zigzag)
              transfer = 2 B n Hkv D b / BW            (K and V)
    backward  compute  = 10 B Hq n^2 D c / F_bwd       (5 matmuls)
              transfer = 2 B n Hkv D (b + 4) / BW      (K, V and the fp32 dK/dV accumulators)

so the forward hides once n >= n* = Hkv b F / (2 Hq BW c): a crossover linear in 1/g.
On the H200 (F ~ 550 TFLOP/s forward, NVLink ~ 450 GB/s per direction) with fp16 and no
GQA, n* ~ 1.2k tokens per rank non-causal, ~2.4k causal. The all-gather schedule moves the
same (W-1) K/V blocks up front without overlap: it costs (W-1) transfer times once, which
pays where g is large (small K/V) or steps are latency-bound.

Run ``python -m tileattn.distributed.model`` for the table (H200 defaults; flags below).
Example:
    >>> step_times(seqlen=131072, world=8, hq=32, hkv=8, head_dim=128).fwd_hidden
    True
"""

import argparse
from dataclasses import dataclass

H200_FWD_TFLOPS = 550.0  # attention forward rate on the H200 (brief's figure)
H200_BWD_TFLOPS = 400.0  # assumed: backward kernels run at ~0.7x the forward rate
NVLINK_GBS = 450.0       # per direction, H200 NVLink
LATENCY_US = 10.0        # assumed per-transfer startup (launch + NCCL handshake)


@dataclass(frozen=True)
class Step:
    """Microseconds for one ring step, forward and backward, and the all-gather's cost."""

    local_len: int
    fwd_compute: float
    fwd_transfer: float
    bwd_compute: float
    bwd_transfer: float
    allgather: float

    @property
    def fwd_hidden(self) -> bool:
        return self.fwd_compute >= self.fwd_transfer

    @property
    def bwd_hidden(self) -> bool:
        return self.bwd_compute >= self.bwd_transfer


def step_times(*, seqlen, world, hq, hkv, head_dim, batch=1, causal=True, elem_bytes=2,
               fwd_tflops=H200_FWD_TFLOPS, bwd_tflops=H200_BWD_TFLOPS, link_gbs=NVLINK_GBS,
               latency_us=LATENCY_US) -> Step:
    """The model above for a global ``seqlen`` over ``world`` ranks (zigzag when causal)."""
    n = seqlen // world
    pairs = batch * hq * n * n * (0.5 if causal else 1.0)
    kv = 2 * batch * n * hkv * head_dim
    bw = link_gbs * 1e3  # bytes per microsecond
    return Step(local_len=n,
                fwd_compute=4 * pairs * head_dim / (fwd_tflops * 1e6),
                fwd_transfer=latency_us + kv * elem_bytes / bw,
                bwd_compute=10 * pairs * head_dim / (bwd_tflops * 1e6),
                bwd_transfer=latency_us + kv * (elem_bytes + 4) / bw,
                allgather=(world - 1) * (latency_us + kv * elem_bytes / bw))


def table(seqlens=(8192, 32768, 131072, 1048576), worlds=(2, 4, 8), hq=32, hkv=8, head_dim=128, **kw) -> str:
    """A text table of ``step_times`` over sequence lengths and world sizes."""
    head = (f"Hq={hq} Hkv={hkv} D={head_dim}, per-step microseconds (compute / transfer, * = transfer hidden)\n"
            f"{'S':>8} {'W':>2} {'S/W':>7} | {'fwd compute':>12} {'transfer':>9} | {'bwd compute':>12} "
            f"{'transfer':>9} | {'all-gather':>10}")
    rows = [head, "-" * len(head.splitlines()[1])]
    for s in seqlens:
        for w in worlds:
            t = step_times(seqlen=s, world=w, hq=hq, hkv=hkv, head_dim=head_dim, **kw)
            rows.append(f"{s:>8} {w:>2} {t.local_len:>7} | {t.fwd_compute:>12.1f} {t.fwd_transfer:>8.1f}"
                        f"{'*' if t.fwd_hidden else ' '} | {t.bwd_compute:>12.1f} {t.bwd_transfer:>8.1f}"
                        f"{'*' if t.bwd_hidden else ' '} | {t.allgather:>10.1f}")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Paper model of ring attention: compute vs transfer per step")
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--noncausal", action="store_true")
    p.add_argument("--link-gbs", type=float, default=NVLINK_GBS)
    p.add_argument("--fwd-tflops", type=float, default=H200_FWD_TFLOPS)
    a = p.parse_args(argv)
    print(table(hq=a.hq, hkv=a.hkv, head_dim=a.head_dim, causal=not a.noncausal, link_gbs=a.link_gbs,
                fwd_tflops=a.fwd_tflops))


if __name__ == "__main__":
    main()
