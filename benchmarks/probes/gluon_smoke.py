"""Smoke run of the Gluon sm_90 forward before the test suite (run under ``timeout``: a barrier
deadlock shows as a timeout here, not as a hung pytest): small odd shapes, max error vs SDPA-math
in fp32, and the compiled kernel's registers / spills / shared memory."""
import torch

from tileattn.backends.triton import gluon
from tileattn.backends.triton.gluon.forward_sm90 import fwd_kernel

for D in (64, 128):
    for (Sq, Sk) in ((1, 1), (77, 129), (129, 77), (300, 1000), (1000, 300)):
        for causal in (False, True):
            q = torch.randn(2, Sq, 4, D, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(2, Sk, 2, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            out = torch.full_like(q, float("nan"))
            lse = torch.full((2, 4, Sq), float("nan"), device="cuda")
            gluon.forward(q, k, v, out, lse, D ** -0.5, causal)
            torch.cuda.synchronize()
            kr, vr = (x.float().repeat_interleave(2, 2).transpose(1, 2) for x in (k, v))
            s = q.float().transpose(1, 2) @ kr.transpose(-1, -2) * D ** -0.5
            if causal:
                keep = torch.ones(Sq, Sk, device="cuda", dtype=torch.bool).tril(Sk - Sq)
                s = s.masked_fill(~keep, float("-inf"))
            ref_lse = s.logsumexp(-1)
            ref = torch.nan_to_num(s.softmax(-1)) @ vr
            err = (out.float().transpose(1, 2) - ref).abs().max().item()
            lerr = (lse - ref_lse).nan_to_num(0.0, 0.0, 0.0).abs().max().item()
            print(f"D={D} Sq={Sq} Sk={Sk} causal={causal}: out err {err:.4f} lse err {lerr:.4f} "
                  f"nan {out.isnan().sum().item()}/{lse.isnan().sum().item()}", flush=True)
try:
    for k in list(fwd_kernel.device_caches[0][0].values()):
        print("compiled: regs", k.n_regs, "spills", k.n_spills, "shared", k.metadata.shared)
except (AttributeError, IndexError, KeyError, TypeError) as e:
    print("no kernel facts:", e)
