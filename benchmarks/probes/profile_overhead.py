"""Host-side overhead of eager calls (decode B=1/4k keys, prefill N=1k): times and cProfile top lists,
then host time per call beside SDPA and compiled FlexAttention on a tiny shape (the GPU waits on
the host there, so the loop's wall time is the host's), then host time per training step.
Public API only (``tileattn.attention``, ``attention_with_kvcache``); CUDA only.

    python3 benchmarks/probes/profile_overhead.py [main forward_overhead host_vs_peers train_step_host]
    python3 benchmarks/probes/profile_overhead.py step_timeline [OUT_DIR]  # profiler timeline of training steps
    python3 benchmarks/probes/profile_overhead.py step_cprofile            # cProfile of the eager step, one thread
"""

import cProfile
import pstats
import sys
import time
import traceback

import torch

import tileattn


def _train_inputs():
    """q, k, v (requiring grad) and dout of the training-step probes: B=16, N=1k, H=16, D=128, bf16."""
    q, k, v, dout = (torch.randn(16, 1024, 16, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    return q, k, v, dout


def _grad_step(q, k, v, dout):
    """The benchmark's eager causal training step: ``autograd.grad`` of tileattn's output."""
    return torch.autograd.grad(tileattn.attention(q, k, v, causal=True), (q, k, v), dout)


def main():
    q = torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    kc, vc = (torch.randn(1, 8192, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    kn, vn = (torch.randn(1, 1, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    seqlens = torch.tensor([4095], dtype=torch.int32, device="cuda")

    def call():
        return tileattn.attention_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=seqlens)

    for _ in range(20):
        call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(200):
        call()
    torch.cuda.synchronize()
    print(f"eager decode call: {(time.perf_counter() - start) / 200 * 1e6:.1f} us")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        call()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def forward_overhead():
    """Prefill forward at N=1k (B=16, H=16, D=128): eager vs CUDA-graph time, with and without grad."""
    import triton

    for grad in (False, True):
        q, k, v = (torch.randn(16, 1024, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
                   for _ in range(3))

        def call():
            return tileattn.attention(q, k, v)

        eager = triton.testing.do_bench(call, return_mode="median")
        with torch.no_grad():
            graph = triton.testing.do_bench_cudagraph(call, return_mode="median")
        print(f"fwd N=1k grad={grad}: eager {eager * 1e3:.0f} us, graph {graph * 1e3:.0f} us")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(50):
        call()
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)


def host_vs_peers(reps=300):
    """Host us per eager forward call (B=1, N=128, H=16, D=128): tileattn, SDPA, FlexAttention."""
    from torch.nn.attention.flex_attention import flex_attention
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    q, k, v = (torch.randn(1, 128, 16, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    flex = torch.compile(flex_attention, dynamic=False)
    calls = {"tileattn causal": lambda: tileattn.attention(q, k, v, causal=True),
             "tileattn": lambda: tileattn.attention(q, k, v),
             "sdpa causal": lambda: sdpa(qt, kt, vt, is_causal=True),
             "flex": lambda: flex(qt, kt, vt)}
    for name, call in calls.items():
        for _ in range(30):
            call()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            call()
        host = (time.perf_counter() - start) / reps
        torch.cuda.synchronize()
        print(f"{name}: host {host * 1e6:.1f} us per call")


def _host_and_queue(fn, reps):
    """(host us per call with the GPU kept busy, GPU-queue us per call, sync note) of ``fn``."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        sync = "no sync"
    except RuntimeError:
        sync = "SYNC: " + traceback.format_exc(limit=-3)[-600:]
    torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU work queued ahead of the calls
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    host = (time.perf_counter() - start) / reps
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return host * 1e6, begin.elapsed_time(end) * 1e3 / reps, sync


def train_step_host(reps=10):
    """Host us per eager call at N=1k (B=16, H=16, D=128) while the GPU is kept busy (so the loop's
    wall time is the host's), the GPU-queue time of the same calls, and whether a call
    synchronizes with the GPU (torch's sync debug mode). Pieces: forward without and with grad,
    the whole forward+backward; then a cProfile of the causal step (the backward runs on
    autograd's device thread, which cProfile does not see: ``step_cprofile`` turns it off)."""
    for causal in (False, True):
        q, k, v, dout = _train_inputs()

        def fwd():
            with torch.no_grad():
                tileattn.attention(q, k, v, causal=causal)

        def step():
            tileattn.attention(q, k, v, causal=causal).backward(dout)

        pieces = {"fwd no grad": fwd,
                  "fwd with grad": lambda: tileattn.attention(q, k, v, causal=causal),
                  "fwd+bwd": step}
        for _ in range(3):
            for fn in pieces.values():
                fn()
        for name, fn in pieces.items():
            host, queue, sync = _host_and_queue(fn, reps)
            print(f"causal={int(causal)} {name}: host {host:.0f} us per call, GPU queue {queue:.0f} us per call, "
                  f"{sync}", flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(20):
        step()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)


def step_timeline(out_dir="."):
    """GPU and host timeline of eager training steps ``out.backward(dout)`` after an L2 flush
    (causal N=1k, B=16, H=16, D=128), for tileattn, SDPA and Flex: per step, each kernel's start
    and end and each runtime launch call's time, in us from the step's start (torch.profiler;
    writes ``timeline-<name>.json`` chrome traces to ``out_dir``). Unlike the benchmark's
    ``autograd.grad`` step, ``backward`` also accumulates into ``.grad`` (three add kernels),
    and the profiler slows the host."""
    import json
    import os

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from torch.nn.functional import scaled_dot_product_attention as sdpa
    from torch.profiler import ProfilerActivity, profile, record_function

    q, k, v, dout = _train_inputs()
    qt, kt, vt, dt = (t.transpose(1, 2) for t in (q, k, v, dout))
    flex = torch.compile(flex_attention, dynamic=False)
    causal_mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, 1024, 1024)
    steps = {"tileattn": lambda: tileattn.attention(q, k, v, causal=True).backward(dout),
             "sdpa": lambda: sdpa(qt, kt, vt, is_causal=True).backward(dt),
             "flex": lambda: flex(qt, kt, vt, block_mask=causal_mask).backward(dt)}
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    for name, fn in steps.items():
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(6):
                flush.zero_()
                with record_function(f"step{i}"):
                    fn()
            torch.cuda.synchronize()
        path = os.path.join(out_dir, f"timeline-{name}.json")
        prof.export_chrome_trace(path)
        events = json.load(open(path))["traceEvents"]
        spans = sorted((e for e in events if e.get("ph") == "X" and "dur" in e), key=lambda e: e["ts"])
        for i in (3, 4, 5):
            start = next(e for e in spans if e["name"] == f"step{i}" and e.get("cat") == "user_annotation")
            t0, t1 = start["ts"], start["ts"] + start["dur"]
            flush_end = max(e["ts"] + e["dur"] for e in spans if e.get("cat") == "kernel" and e["ts"] < t0)
            lines = [f"{name} step{i}: host {start['dur']:.0f} us, L2 flush ends at {flush_end - t0:+.0f}"]
            nxt = next((e["ts"] for e in spans if e["name"] == f"step{i + 1}"), float("inf"))
            for e in spans:
                if e.get("cat") == "kernel" and t0 <= e["ts"] < nxt:
                    lines.append(f"  kernel {e['ts'] - t0:7.0f} .. {e['ts'] + e['dur'] - t0:7.0f}  {e['name'][:60]}")
                elif e.get("cat") == "cuda_runtime" and t0 <= e["ts"] < t1 and "aunch" in e["name"]:
                    lines.append(f"  launch {e['ts'] - t0:7.0f}            {e['name'][:40]} (tid {e.get('tid')})")
            print("\n".join(lines), flush=True)


def step_cprofile(reps=50):
    """cProfile of the eager training step as the benchmark runs it (``autograd.grad``, causal
    N=1k, B=16, H=16, D=128) with autograd's device threads off, so the backward's Python is
    profiled too: the top functions by own time."""
    q, k, v, dout = _train_inputs()

    def step():
        return _grad_step(q, k, v, dout)

    with torch.autograd.set_multithreading_enabled(False):
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(reps):
            step()
        prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(35)


if __name__ == "__main__":
    if sys.argv[1:2] in (["step_timeline"], ["step_cprofile"]):
        globals()[sys.argv[1]](*sys.argv[2:])
        sys.exit()
    for name in sys.argv[1:] or ["main", "forward_overhead", "host_vs_peers", "train_step_host"]:
        globals()[name]()
