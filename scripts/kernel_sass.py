"""Offline sm_90 compile of the forward, dQ and dK/dV kernels (no GPU needed): registers, stack
(spills), SASS line count and hash per variant (bf16, D=128, the sm_90 default blocks: forward
128x128 8 warps 3 stages, dK/dV 32x128, dQ 128x64 2 stages; plain, causal, window, features,
negative scale; TMA and pointer loads; dense and varlen). Compare two trees, as decode_sass.py:

    python scripts/kernel_sass.py .                      # this tree
    git worktree add /tmp/old REF && python scripts/kernel_sass.py /tmp/old
    python scripts/kernel_sass.py . "fwd causal" "dq"    # only variants whose label contains these

SASS_DIR=dir keeps each kernel's SASS (appended per variant). Specialization: pointers and
strides 16-divisible, absent tensors and mask strides as constexpr None / 0.
"""
import hashlib
import os
import re
import subprocess
import sys
import tempfile

tree = os.path.abspath(sys.argv[1])
only = sys.argv[2:]
sys.path.insert(0, tree)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
import tileattn.backends.triton.backward_kernels  # noqa: E402
import tileattn.backends.triton.forward  # noqa: E402,F401

F = sys.modules["tileattn.backends.triton.forward"]
BK = sys.modules["tileattn.backends.triton.backward_kernels"]
assert F.__file__.startswith(tree), F.__file__

PTR = dict(Lse="*fp32", Sinks="*fp32", Slopes="*fp32", Mask="*bf16", CuSeqlensQ="*i32", CuSeqlensK="*i32",
           Lse2Pad="*fp32", DeltaPad="*fp32", LogLPad="*fp32", FlagsQ="*i8", FlagsK="*i8", SinkDelta="*fp32", DMask="*fp32", DQ="*bf16", Out="*bf16")

def build(fn, feat, varlen):
    sig, cx, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        p = fn.params[i]
        if p.is_constexpr:
            sig[name] = "constexpr"; cx[name] = feat[name] if name in feat else p.default; continue
        if name[0].isupper():
            if name.startswith("CuSeqlens") and not varlen:
                sig[name] = "constexpr"; cx[name] = None; continue
            if name in ("Mask",) and feat.get("MASK_KIND", 0) == 0:
                sig[name] = "constexpr"; cx[name] = None; continue
            if name == "Sinks" and not feat.get("SINKS"): sig[name]="constexpr"; cx[name]=None; continue
            if name == "Slopes" and not feat.get("ALIBI"): sig[name]="constexpr"; cx[name]=None; continue
            if name == "DMask" : sig[name]="constexpr"; cx[name]=None; continue
            if name == "Flags": sig[name]="constexpr"; cx[name]=None; continue  # FLAG_ROWS=False: never read
            if name == "SinkDelta" and not feat.get("SINKS"): sig[name]="*fp32"; attrs[(i,)] = [["tt.divisibility", 16]]; continue
            sig[name] = "*i1" if name == "Mask" and feat.get("MASK_KIND") == 1 else PTR.get(name, "*bf16"); attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("qk_scale", "softcap_scale", "softcap_log2", "dropout_p", "scale", "x_scale"):
            sig[name] = "fp32"
        elif name.startswith("stride_m") and feat.get("MASK_KIND", 0) == 0:
            sig[name] = "constexpr"; cx[name] = 0
        elif name in ("stride_ab", "stride_ah") and not feat.get("ALIBI"):
            sig[name] = "constexpr"; cx[name] = 0
        elif name in ("seed",):
            sig[name] = "i64"
        elif name in ("window_left", "window_right", "seqlen_q_dense", "seqlen_k_dense", "max_seqlen_q", "max_seqlen_k", "tune_sq", "tune_sk"):
            sig[name] = "i32"
        elif name in ("group", "head_group"):
            sig[name] = "i32"
        else:
            sig[name] = "i32"; attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, sig, cx, attrs)

def compile_one(fn, feat, varlen, warps, stages):
    k = triton.compile(build(fn, feat, varlen), target=GPUTarget("cuda", 90, 128), options=dict(num_warps=warps, num_stages=stages))
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        open(cubin, "wb").write(k.asm["cubin"])
        sass, res = (subprocess.run([cuobjdump, flag, cubin], capture_output=True, text=True).stdout for flag in ("-sass", "-res-usage"))
    body = "\n".join(re.sub(r"/\*[0-9a-f]{4}\*/", "", l).strip() for l in sass.splitlines() if "/*" in l)
    if os.environ.get("SASS_DIR"):
        open(os.path.join(os.environ["SASS_DIR"], f"{fn.__name__}.sass"), "a").write(sass)
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", res).groups()
    return f"regs {regs} stack {stack} sass-lines {len(body.splitlines())} sha {hashlib.sha1(body.encode()).hexdigest()[:12]}"

base = dict(HEAD_D=128, HEAD_DV=128, BLOCK_D=128, BLOCK_DV=128, SOFTCAP=False, ALIBI=False, MASK_KIND=0,
            HAS_LEFT=False, HAS_RIGHT=False, SINKS=False, DROPOUT=False, DOT_PREC="tf32")
VARIANTS = {
  "plain": {}, "causal": dict(HAS_RIGHT=True), "window": dict(HAS_LEFT=True, HAS_RIGHT=True),
  "causal_sinks_softcap": dict(HAS_RIGHT=True, SINKS=True, SOFTCAP=True),
  "neg_scale": dict(HAS_RIGHT=True, NEG_SCALE=True),
  "bool_mask": dict(MASK_KIND=1), "causal_bool_mask": dict(HAS_RIGHT=True, MASK_KIND=1),
  "all": dict(HAS_LEFT=True, HAS_RIGHT=True, SINKS=True, SOFTCAP=True, ALIBI=True, MASK_KIND=2, DROPOUT=True),
}
jobs = []
for name, extra in VARIANTS.items():
    for tma in (True, False):
        for varlen in (False, True):
            if name != "causal" and (varlen or not tma): continue
            f = dict(base, **extra, USE_TMA=tma, IS_VARLEN=varlen)
            jobs.append((f"fwd {name} tma={tma} varlen={varlen}", F._fwd_kernel, dict(f, BLOCK_M=128, BLOCK_N=128), 8, 3))
            fb = dict(f); fb.pop("SINKS")
            jobs.append((f"dkdv {name} tma={tma} varlen={varlen}", BK._bwd_dkdv_kernel, dict(fb, BLOCK_M=32, BLOCK_N=128), 8, 3))
            jobs.append((f"dq {name} tma={tma} varlen={varlen}", BK._bwd_dq_kernel, dict(f, BLOCK_M=128, BLOCK_N=64, MASK_GRAD=False, ROW_PAD=128), 8, 2))
for label, fn, feat, w, s in jobs:
    if only and not any(o in label for o in only): continue
    feat = {k: v for k, v in feat.items() if k in fn.arg_names}
    try:
        print(f"{label:<45} {compile_one(fn, feat, 'varlen=True' in label, w, s)}", flush=True)
    except Exception as e:
        print(f"{label:<45} ERROR {type(e).__name__}: {str(e)[:400]}", flush=True)
