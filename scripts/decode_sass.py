"""Offline sm_90 compile of the decode kernel (no GPU needed): registers, stack and a hash of the
SASS for the benchmark's decode shape (bf16, Hq=32, Hkv=8, D=128, one new token, 16 and 1 splits) over
contiguous and paged caches, K/V sharing row offsets or not; then, where the kernel has them, the fused
decode features (rotary, cache_batch_idx, cache_leftpad) one at a time. Compare two trees' kernels:

    python scripts/decode_sass.py .            # this tree
    git worktree add /tmp/old REF && python scripts/decode_sass.py /tmp/old

Specialization (16-divisibility of pointers and strides, ints equal to 1 as constants) follows
what Triton derives at launch for those inputs.
"""
import hashlib
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.abspath(sys.argv[1]))
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import tileattn.backends.triton.decode as dec  # noqa: E402

assert dec.__file__.startswith(os.path.abspath(sys.argv[1])), dec.__file__
fn = dec._decode_kernel


def build(vals, consts):
    """ASTSource with Triton's launch-time specialization of these argument values."""
    sig, cx, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        v = consts.get(name, vals.get(name))
        if name in consts or v is None or (isinstance(v, int) and v == 1):
            sig[name], cx[name] = "constexpr", v
        elif isinstance(v, str):
            sig[name], attrs[(i,)] = v, [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, sig, cx, attrs)


def case(page, same_rows, vstride_scale=1, splits=16, **features):
    """Compile one layout (page 0 = contiguous); V's page/slot strides scaled when not same_rows.
    ``features``: decode-feature constexprs (ROTARY, ROTARY_DIM, BATCH_IDX, LEFTPAD; off by default)."""
    ks = ((page or 4096) * 8 * 128, 8 * 128, 128)  # page (or sequence), slot (or key), head
    vs = tuple(s * vstride_scale for s in ks[:2]) + (ks[2],) if not same_rows else ks
    on = features.get
    vals = dict(Q="*bf16", K="*bf16", V="*bf16", K_NEW="*bf16", V_NEW="*bf16", SEQLENS="*i32",
                Cos="*bf16" if on("ROTARY") else None, Sin="*bf16" if on("ROTARY") else None,
                BatchIdx="*i32" if on("BATCH_IDX") else None, Leftpad="*i32" if on("LEFTPAD") else None,
                BLOCK_TABLE="*i32" if page else None, Slopes=None, Sinks=None, OUT="*fp32", LSE="*fp32",
                stride_qb=4096, stride_qs=4096, stride_qh=128, stride_knb=1024, stride_kns=1024,
                stride_knh=128, stride_vnb=1024, stride_vns=1024, stride_vnh=128, stride_kb=ks[0], stride_ks=ks[1], stride_kh=ks[2],
                stride_vb=vs[0], stride_vs=vs[1], stride_vh=vs[2], stride_btb=256, stride_ab=0, stride_ah=0,
                stride_sink=0, stride_ob=65536, stride_os=65536, stride_oh=2048, stride_osplit=128,
                stride_lb=512, stride_lh=16, stride_ls=512, stride_lsplit=1, Hkv=8, Sn=1, n_new=1,
                qk_scale=0.127, softcap_scale=0.0, softcap_log2=0.0, window_left=-1, window_right=0,
                scale=0.088, softcap=0.0)  # the last two: trees before the ScoreSpec scalars
    consts = dict(G=4, HEAD_D=128, HEAD_DV=128, BLOCK_M=16, BLOCK_N=128, BLOCK_NEW=16, BLOCK_D=128,
                  BLOCK_DV=128, HAS_NEW=True, PAGE_SIZE=page, KV_SAME_ROWS=same_rows, NUM_SPLITS=splits,
                  SPLIT=splits > 1, HAS_LEFT=False, HAS_RIGHT=True, SOFTCAP=False, ALIBI=False, SINKS=False,
                  DOT_PREC="tf32", NEG_SCALE=False, ROTARY=0, ROTARY_DIM=0, BATCH_IDX=False, LEFTPAD=False,
                  HIDES=False)
    consts.update(features)
    # trees before the one constexpr naming (score.py): HEAD_DIM, HAS_SOFTCAP, ..., pointers ALIBI / SINKS
    if "HEAD_DIM" in fn.arg_names:
        consts.update(HEAD_DIM=128, HEAD_DIM_V=128, HAS_SOFTCAP=False, HAS_ALIBI=False, HAS_SINKS=False,
                      DOT_PRECISION="tf32", ALIBI=None, SINKS=None)
    src = build(vals, consts)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 128), options=dict(num_warps=4, num_stages=5 if page else 3))
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "decode.cubin")
        with open(cubin, "wb") as f:
            f.write(k.asm["cubin"])
        sass, res = (subprocess.run([cuobjdump, flag, cubin], capture_output=True, text=True).stdout
                     for flag in ("-sass", "-res-usage"))
    # instructions without their addresses, so equal code hashes equal
    body = "\n".join(re.sub(r"/\*[0-9a-f]{4}\*/", "", line).strip() for line in sass.splitlines() if "/*" in line)
    if os.environ.get("SASS_DIR"):  # keep the SASS for a closer look
        name = f"splits{splits}-page{page}-{same_rows}-{vstride_scale}{''.join(map(str, features.values()))}.sass"
        with open(os.path.join(os.environ["SASS_DIR"], name), "w") as f:
            f.write(sass)
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", res).groups()
    sha = hashlib.sha1(body.encode()).hexdigest()[:12]
    return f"regs {regs} stack {stack} smem {k.metadata.shared} sass-lines {len(body.splitlines())} sha {sha}"


for splits in (16, 1):
    for page, same, scale in ((0, True, 1), (16, True, 1), (256, True, 1), (5, True, 1), (16, False, 2)):
        label = f"splits={splits:<2} page={page:<3} same_rows={same!s:5}"
        try:
            print(f"{label} {case(page, same, scale, splits)}", flush=True)
        except Exception as e:
            print(f"{label}: {type(e).__name__}: {str(e)[:300]}", flush=True)
if "ROTARY" in fn.arg_names:  # the fused decode features, each on its own (16 splits)
    for page, feats in ((0, dict(ROTARY=1, ROTARY_DIM=128)), (16, dict(ROTARY=2, ROTARY_DIM=64)),
                        (0, dict(BATCH_IDX=True)), (0, dict(LEFTPAD=True)), (16, dict(LEFTPAD=True))):
        label = f"splits=16 page={page:<3} {' '.join(f'{k}={v}' for k, v in feats.items())}"
        try:
            print(f"{label} {case(page, True, 1, 16, **feats)}", flush=True)
        except Exception as e:
            print(f"{label}: {type(e).__name__}: {str(e)[:300]}", flush=True)
