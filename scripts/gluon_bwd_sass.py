"""Offline sm_90 compile of the Gluon fused backward (no GPU needed): registers, stack (spills),
shared memory, HGMMA / setmaxnreg / local-memory / atomic counts per variant (bf16, D = 64 / 128,
causal or not).

    python scripts/gluon_bwd_sass.py                 # every variant
    python scripts/gluon_bwd_sass.py "d128 causal"   # only labels containing this
    SASS_DIR=dir python scripts/gluon_bwd_sass.py    # keep each variant's SASS, PTX and TTGIR
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402
from triton.runtime.jit import mangle_type  # noqa: E402

from tileattn.backends.triton.gluon import backward_sm90 as G  # noqa: E402
from tileattn.backends.triton.gluon.backward_launch import descriptors  # noqa: E402

from gluon_sass import report, run_variants  # noqa: E402  (this folder: the shared compile report)

PTRS = {"DK": "*bf16", "DV": "*bf16", "Stats": "*fp32"}


def compile_one(D, causal, dtype=torch.bfloat16):
    q = torch.empty(2, 256, 4, D, dtype=dtype)
    k = torch.empty(2, 256, 2, D, dtype=dtype)
    dq_acc = torch.empty(2, 4, 256, D, dtype=torch.float32)
    values = dict(zip(("q_desc", "do_desc", "k_desc", "v_desc", "dq_desc"), descriptors(q, k, k, q, dq_acc)))
    meta = dict(STAGES=2 if D > 64 else 3, CAUSAL=causal)
    fn = G.bwd_kernel
    sig, cx, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if fn.params[i].is_constexpr:
            sig[name], cx[name] = "constexpr", meta[name]
        elif name in values:
            sig[name] = mangle_type(values[name])
        elif name in PTRS:
            sig[name] = PTRS[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("scale", "qk_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    k = triton.compile(GluonASTSource(fn, sig, cx, attrs), target=GPUTarget("cuda", 90, 128),
                       options=dict(num_warps=4, maxnreg=168))
    return report(k, f"bwd d{D} {'causal' if causal else 'plain'}", 18, extra=("RED",))


if __name__ == "__main__":
    run_variants(compile_one, "bwd ", 18)
