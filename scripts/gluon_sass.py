"""Offline sm_90 compile of the Gluon forward (no GPU needed): registers, stack (spills), shared
memory, HGMMA / setmaxnreg / local-memory counts per variant (bf16, D = 64 / 128, causal or not).

    python scripts/gluon_sass.py                 # every variant
    python scripts/gluon_sass.py "d128 causal"   # only labels containing this
    SASS_DIR=dir python scripts/gluon_sass.py    # keep each variant's SASS and PTX
"""
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402
from triton.runtime.jit import mangle_type  # noqa: E402

from tileattn.backends.triton.gluon import forward_sm90 as G  # noqa: E402
from tileattn.backends.triton.gluon.launch import descriptors, kernel_meta  # noqa: E402


def compile_one(D, causal, dtype=torch.bfloat16):
    q = torch.empty(2, 256, 4, D, dtype=dtype)
    k = torch.empty(2, 256, 2, D, dtype=dtype)
    descs = descriptors(q, k, k, q)
    meta = kernel_meta(D, causal)
    fn = G.fwd_kernel
    sig, cx, attrs = {}, {}, {}
    values = dict(zip(("q_desc", "k_desc", "v_desc", "o_desc"), descs))
    for i, name in enumerate(fn.arg_names):
        if fn.params[i].is_constexpr:
            sig[name], cx[name] = "constexpr", meta[name]
        elif name in values:
            sig[name] = mangle_type(values[name])
        elif name == "Lse":
            sig[name] = "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "Flags":
            sig[name] = "*i8"
        elif name == "qk_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    src = GluonASTSource(fn, sig, cx, attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 128), options=dict(num_warps=4, maxnreg=meta["maxnreg"]))
    return report(k, f"d{D} {'causal' if causal else 'plain'}", 14)


def report(k, label, width, extra=()):
    """One line of a compiled Gluon kernel's facts (``SASS_DIR`` keeps its SASS, PTX and TTGIR):
    registers, stack, shared memory, HGMMA / STL / LDL counts and any ``extra`` SASS opcodes,
    the setmaxnreg values of its PTX."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        open(cubin, "wb").write(k.asm["cubin"])
        sass, res = (subprocess.run([cuobjdump, flag, cubin], capture_output=True, text=True).stdout
                     for flag in ("-sass", "-res-usage"))
    if os.environ.get("SASS_DIR"):
        for ext, text in (("sass", sass), ("ptx", k.asm["ptx"]), ("ttgir", k.asm["ttgir"])):
            open(os.path.join(os.environ["SASS_DIR"], f"{label.replace(' ', '_')}.{ext}"), "w").write(text)
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", res).groups()
    shared = re.search(r"SHARED:(\d+)", res).group(1)
    counts = " ".join(f"{op} {len(re.findall(op, sass))}" for op in ("HGMMA", *extra, "STL", "LDL"))
    setmaxnreg = re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+\d+", k.asm["ptx"])
    return (f"{label:<{width}} regs {regs} stack {stack} smem {k.metadata.shared} ({shared}) {counts} "
            f"setmaxnreg {[int(x.split()[-1]) for x in setmaxnreg]}")


def run_variants(compile_one, prefix, width):
    """Print compile_one(D, causal) for D in (64, 128), plain and causal, whose label
    ("<prefix>d128 causal") contains one of the command line's words (all without any)."""
    only = sys.argv[1:]
    for D in (64, 128):
        for causal in (False, True):
            label = f"{prefix}d{D} {'causal' if causal else 'plain'}"
            if only and not any(o in label for o in only):
                continue
            try:
                print(compile_one(D, causal), flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"{label:<{width}} ERROR {type(e).__name__}: {str(e)[:1500]}", flush=True)


if __name__ == "__main__":
    run_variants(compile_one, "", 14)
