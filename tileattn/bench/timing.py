"""Timers. All return milliseconds; the caller has already run ``fn`` once (warm-up: compile,
autotune, handle creation stay out of the numbers).

- GPU: ``triton.testing.do_bench`` median. It flushes L2 (zeroes a 256 MB buffer) before every
  call and times each call with CUDA events, so inputs smaller than L2 are read from HBM;
  while the flush runs the host queues the next call, so host overhead under ~80 us is hidden.
- GPU graph: ``triton.testing.do_bench_cudagraph`` median: the calls are captured in one CUDA
  graph and replayed (no launch gaps, no L2 flush: the caller rotates input sets instead).
- CPU: ``time.perf_counter`` median of repeats filling about ``seconds`` (3 to 100; the first
  repeat sizes the count).
"""

import math
import statistics
import time

import torch


def gpu_ms(fn, warmup_ms=25, rep_ms=100) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def gpu_graph_ms(fn, rep_ms=20) -> float:
    import triton.testing
    return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cpu_ms(fn, seconds=1.0, min_reps=3, max_reps=100) -> float:
    times = [_seconds(fn)]
    n = max(min_reps, min(max_reps, math.ceil(seconds / max(times[0], 1e-9))))
    times += [_seconds(fn) for _ in range(n - 1)]
    return statistics.median(times) * 1e3


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
