"""Host time per eager call of each entry point, on CPU, with the Triton kernel launch stubbed out.

What it covers: everything tileattn runs in Python for an eager call on the Triton backend --
validation, ScoreSpec, backend resolution, planning, output allocation, launch signature -- on
CPU tensors (fp16; the host path is the same for bf16). What it does not: Triton's C launcher
and the CUDA driver (a fake compiled kernel takes the launch), CUDA allocation (CPU
``torch.empty`` stands in), and CUDA-only host calls (current stream, device guards).
Stand-ins: the plan targets an H200 (132 SMs, so B=1/4k plans 16 splits as on the GPU);
``debug_checks`` is False (the GPU's default; CPU tensors would otherwise have their values
read); backend "auto" resolves to "triton", and such calls may take the eager fast path (as CUDA
tensors do; the interpreter's are kept off it). The GPU's own numbers: ``eager_latency.py``.

    .venv/bin/python benchmarks/probes/host_time.py [--calls N] [--profile NAME] [--json OUT]
"""

import argparse
import cProfile
import json
import os
import pstats
import statistics
import time

import torch

import tileattn
from tileattn import _checks, api
from tileattn.backends.triton import launch
from tileattn.backends.triton.plan import Target, decode as plan_decode, forward as plan_forward
from tileattn.flash_attn import flash_attn_with_kvcache
from tileattn.integrations import transformers as tt

H200 = Target("sm_90", "H200 (stand-in)", 132)


class _FakeCompiled:
    function = packed_metadata = None

    def run(self, *args):
        pass


class _StubLaunch:
    """Stands in for ``kernel[grid](...)``: no compile, no launch; a tuned kernel's first config."""

    def __init__(self, kernel):
        self.best_config = kernel.tuner.configs[0] if hasattr(kernel, "tuner") else None

    def __getitem__(self, grid):
        return lambda *args, **kwargs: _FakeCompiled()


def install_stubs():
    """The stand-ins listed in the module docstring (for this process)."""
    os.environ["TRITON_INTERPRET"] = "1"  # lets backend="triton" take CPU tensors (kernels are not run)
    init = launch.FastKernel.__init__

    def stub_init(self, kernel):
        init(self, kernel)
        self.kernel = _StubLaunch(kernel)

    launch.FastKernel.__init__ = stub_init
    launch._current_device = lambda: 0
    launch._current_stream = lambda device: 0
    plan_decode.device_target = plan_forward.device_target = lambda t: H200
    _checks.debug_checks = lambda t: False
    resolve = api._backend
    api._backend = lambda name, q, needs: resolve("triton" if name == "auto" else name, q, needs)
    api._interpreted = lambda name, q: False  # CPU tensors on "triton" may take the fast path, as CUDA ones do


def cases():
    """name -> zero-argument call; the shapes of eager_latency.py (B=1, Hq=32, Hkv=8, D=128)."""
    dt = torch.float16
    q = torch.randn(1, 1, 32, 128, dtype=dt)
    kc, vc = (torch.randn(1, 4096, 8, 128, dtype=dt) for _ in "kv")
    kp, vp = (torch.randn(256, 16, 8, 128, dtype=dt) for _ in "kv")
    table = torch.arange(256, dtype=torch.int32)[None]
    kn, vn = (torch.randn(1, 1, 8, 128, dtype=dt) for _ in "kv")
    seqlens = torch.tensor([4000], dtype=torch.int32)
    out = {
        "kvcache contiguous": lambda: tileattn.attention_with_kvcache(q, kc, vc, cache_seqlens=seqlens),
        "kvcache contiguous + append": lambda: tileattn.attention_with_kvcache(q, kc, vc, kn, vn,
                                                                                cache_seqlens=seqlens),
        "kvcache paged 16": lambda: tileattn.attention_with_kvcache(q, kp, vp, cache_seqlens=seqlens,
                                                                     block_table=table),
        "kvcache int seqlens": lambda: tileattn.attention_with_kvcache(q, kc, vc, cache_seqlens=4000),
        "flash_attn_with_kvcache": lambda: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, causal=True),
    }
    module = torch.nn.Module()
    for sk in (512, 4096):
        qs = torch.randn(1, 32, 1, 128, dtype=dt)
        ks, vs = (torch.randn(1, 8, sk, 128, dtype=dt) for _ in "kv")
        kr, vr = (t.repeat_interleave(4, dim=1) for t in (ks, vs))
        pad = torch.ones(1, 1, 1, sk, dtype=torch.bool)
        out[f"sdpa gqa Sk={sk}"] = lambda qs=qs, ks=ks, vs=vs: tileattn.sdpa(qs, ks, vs, enable_gqa=True)
        out[f"sdpa bool mask Sk={sk}"] = lambda qs=qs, kr=kr, vr=vr, pad=pad: tileattn.sdpa(qs, kr, vr, pad)
        out[f"transformers layer Sk={sk}"] = lambda qs=qs, ks=ks, vs=vs: tt.attention_forward(
            module, qs, ks, vs, None, scaling=128 ** -0.5, is_causal=True)
    return out


def host_us(call, calls):
    """Median over 5 rounds of the mean host time per call, us (after warm-up)."""
    for _ in range(20):
        call()
    rounds = []
    for _ in range(5):
        start = time.perf_counter_ns()
        for _ in range(calls):
            call()
        rounds.append((time.perf_counter_ns() - start) / calls / 1e3)
    return statistics.median(rounds)


def profile(call, calls, top=25):
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        call()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--profile", help="cProfile one case (a name from the table)")
    parser.add_argument("--json", help="write {case: us} here")
    args = parser.parse_args()
    install_stubs()
    table = cases()
    if args.profile:
        call = table[args.profile]
        call()
        profile(call, args.calls)
        return
    with torch.no_grad():
        results = {name: host_us(call, args.calls) for name, call in table.items()}
    for name, us in results.items():
        print(f"{name:34s} {us:8.1f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
