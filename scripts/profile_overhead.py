"""Host-side overhead of eager calls (decode B=1/4k keys, prefill N=1k): times and cProfile top lists."""

import cProfile
import pstats
import time

import torch

import tileattn


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


if __name__ == "__main__":
    main()
    forward_overhead()
