"""Host-side overhead of one eager decode call (B=1, 4k keys): wall time and a cProfile top list."""

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


if __name__ == "__main__":
    main()
