"""Triton ``forward_kvcache``: append new k/v, then split-KV attention (plan + run).

Plan: block sizes, row blocks and the split count depend on shapes, dtype, cache capacity
and the SM count only -- never on device values -- so one plan serves every layer of a
decode step and a captured CUDA graph can be replayed with new ``cache_seqlens``.
Run: :func:`~.decode.decode_attention` appends new k/v and attends in one kernel (+ the
combine kernel when the plan has several splits).

    >>> q = torch.randn(2, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    >>> kc, vc = (torch.zeros(2, 4096, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in "kv")
    >>> kn, vn = (torch.randn(2, 1, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in "kv")
    >>> seqlens = torch.tensor([17, 4000], dtype=torch.int32, device="cuda")
    >>> spec = ScoreSpec(scale=128 ** -0.5, window=(-1, 0))   # causal
    >>> out, lse = forward_kvcache(q, kc, vc, kn, vn, spec, cache_seqlens=seqlens, block_table=None,
    ...     num_splits=0)   # out (2, 1, 32, 128) bf16, lse (2, 32, 1) fp32
"""

import functools
import os
from dataclasses import dataclass

import torch
import triton

from tileattn._checks import cache_capacity

from .decode import decode_attention

MIN_KEYS_PER_SPLIT = 256  # below this a split's prologue/epilogue outweighs its KV reads
MAX_SPLITS = 128
# K + V bytes of one 16-bit key tile (a pipeline stage): 128 keys at D = Dv = 128; wider heads
# keep 32 KB (three stages plus their larger q tile must fit in shared memory)
STAGE_BYTES, WIDE_STAGE_BYTES = 64 * 1024, 32 * 1024
# Measured on the H200 (bf16, Hq=32, Hkv=8, D=128, CUDA-graph replay, scripts/decode_probe.py
# sweep of 1-64 splits x 64/128-key tiles): the fastest split count makes B * Hkv * splits
# about one program per SM at every batch (B=1/32k: 16 splits 36.8 us vs 50 splits 40-45 us;
# B=16/4k: 1 split 64.0 us vs 4 splits 73-75 us), and 128-key tiles win everywhere except
# where a split spans at most SHORT_SPLIT_KEYS of capacity: B=1/4k (16 splits of 256 keys),
# 64-key tiles 10.2 / 10.7 / 10.4 us vs 10.7 / 11.2 / 10.9 (contiguous / paged 16 / paged
# 256); B=4/4k (1024 keys per split) 22.7 vs 21.4, B=1/32k paged 16 39.4 vs 37.4.
SHORT_SPLIT_KEYS = 256


@dataclass(frozen=True)
class DecodePlan:
    """Launch shape of one decode call: grid (B * Hkv, num_splits, m_blocks)."""

    block_m: int  # packed rows (Sn * G) per program, >= 16 for tl.dot
    block_n: int  # keys per inner-loop tile
    m_blocks: int  # row blocks: cdiv(Sn * G, block_m)
    num_splits: int
    num_warps: int
    num_stages: int


def choose_num_splits(batch, hkv, max_seqlen_k_capacity, num_sms, *, m_blocks=1):
    """Split count for flash-decoding from host-known sizes only.

    About one program per SM: ``num_sms // (batch * hkv * m_blocks)`` splits, at least one,
    no split shorter than MIN_KEYS_PER_SPLIT keys of capacity, at most MAX_SPLITS. E.g. on 132
    SMs with Hkv = 8: batch 1 x 4k -> 16, batch 1 x 32k -> 16, batch 4 -> 4, batch >= 16 -> 1.
    """
    programs = batch * hkv * m_blocks
    splits = num_sms // programs
    return max(1, min(splits, max_seqlen_k_capacity // MIN_KEYS_PER_SPLIT, MAX_SPLITS))


@functools.lru_cache(maxsize=None)
def _num_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # interpreter: few programs keep CPU tests fast (B=1, Hkv=2: 4 splits)


@functools.lru_cache(maxsize=256)
def _make_plan(B, Sn, Hq, Hkv, D, Dv, elt_size, capacity, paged, num_splits, device, forced_block_n):
    rows = Sn * (Hq // Hkv)
    width = triton.next_power_of_2(D) + triton.next_power_of_2(Dv)
    block_m = 16 if elt_size == 4 else min(64, max(16, triton.next_power_of_2(rows)))
    m_blocks = triton.cdiv(rows, block_m)
    if num_splits <= 0:
        num_splits = choose_num_splits(B, Hkv, capacity, _num_sms(device), m_blocks=m_blocks)
    if elt_size == 4:  # fp32: ieee dots run on FMA from registers; larger tiles spill (ptxas)
        block_n = 64 if width <= 128 else 16
    else:
        block_n, stage_bytes = 128, STAGE_BYTES if width <= 256 else WIDE_STAGE_BYTES
        while block_n > 16 and block_n * width * elt_size > stage_bytes:
            block_n //= 2
        if capacity <= SHORT_SPLIT_KEYS * num_splits:  # two 128-key tiles per split pipeline poorly
            block_n = min(block_n, 64)
    block_n = forced_block_n or block_n
    # 64 rows x 128 columns on 4 warps: 255 registers, paged ones spill (ptxas sm_90: 96-104 B)
    num_warps = 8 if block_m * triton.next_power_of_2(max(D, Dv)) >= 64 * 128 else 4
    # paged: page ids take a pipeline stage ahead of the K/V gathers (decode.py, [Note] page ids)
    return DecodePlan(block_m, block_n, m_blocks, num_splits, num_warps, num_stages=5 if paged else 3)


def plan_kvcache(q, k_cache, v_cache, block_table, num_splits=0):
    """DecodePlan for q (B, Sn, Hq, D) over these caches (cached by shapes; no device reads).

    Capacity per sequence: Smax for a contiguous cache, max_blocks * page_size when paged.
    ``num_splits`` > 0 is kept as given; 0 asks :func:`choose_num_splits`. The environment
    variable ``TILEATTN_DECODE_BLOCK_N`` (a power of two >= 16) forces the key tile (tuning).
    """
    B, Sn, Hq, D = q.shape
    return _make_plan(B, Sn, Hq, k_cache.shape[2], D, v_cache.shape[3], k_cache.element_size(),
                      cache_capacity(k_cache, block_table), block_table is not None, int(num_splits),
                      q.device, int(os.environ.get("TILEATTN_DECODE_BLOCK_N", 0)))


def forward_kvcache(q, k_cache, v_cache, k_new, v_new, spec, *, cache_seqlens, block_table, num_splits):
    """Backend contract (see ``tileattn.backends``): append k_new/v_new in place, then attend.

    q (B, Sn, Hq, D); caches (B, Smax, Hkv, D[v]) or paged (num_blocks, page_size, Hkv, D[v])
    with block_table int32 (B, max_blocks); k_new/v_new None or (B, Sn, Hkv, D[v]);
    cache_seqlens int32 (B,) on device. Query head h reads KV head h // (Hq // Hkv).
    Returns out (B, Sn, Hq, Dv) in q.dtype and lse (B, Hq, Sn) float32.
    """
    plan = plan_kvcache(q, k_cache, v_cache, block_table, num_splits)
    return decode_attention(q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, spec, plan=plan)
