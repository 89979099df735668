"""Decode plan (FlashInfer's plan/run split): the launch shape of split-KV decode and its workspace.

A :class:`DecodePlan` depends on host-known sizes only -- shapes, dtype, cache capacity, the SM
count -- never on device values (``cache_seqlens``), so one plan serves every layer of a decode
step and a captured CUDA graph replays with new lengths. Choices:

1. Rows: the Sn * G query rows of one KV head are packed into BLOCK_M (>= 16 for tl.dot, at
   most 64; 16 for fp32) rows per program, ``m_blocks`` row blocks.
2. Splits (:func:`choose_num_splits`): about one program per SM, no split shorter than
   MIN_KEYS_PER_SPLIT keys of capacity, at most MAX_SPLITS; a caller's count wins.
3. Key tile: 16-bit data takes the largest power of two <= 128 whose K + V tile fits
   STAGE_BYTES (WIDE_STAGE_BYTES when D + Dv > 256), 64 where a split spans at most
   SHORT_SPLIT_KEYS keys of capacity; fp32 (FMA dots from registers) 64, or 16 past 128 columns.
4. Warps: 8 from 64 rows x 128 columns on (4 warps reach 255 registers and paged ones spill).
5. Stages: 3, paged 5 (page ids take a stage ahead of the K/V gathers; decode.py [Note] page ids).

[Note] decode workspace
    With several splits each program writes a partial (out, lse) in fp32, which the combine
    kernel merges. The plan owns these buffers: one pair per (CUDA stream, host thread),
    allocated on first use and reused by every later call -- every layer of a step -- on that
    stream and thread. Calls on one stream run in order, so a layer's kernel never overwrites
    partials the previous layer's combine has not read; calls on other streams or threads get
    their own pair (two threads issuing onto one stream could otherwise interleave a decode
    kernel between another call's decode and combine). At most MAX_WORKSPACES pairs are kept
    per plan; dropping the oldest (or the whole plan, when the plan cache drops it) is safe
    in eager mode because the caching allocator hands freed memory out again only in its
    stream's order. Under CUDA-graph capture a call allocates its pair as before (in the
    graph's private pool, which the graph owns and its replays reuse): a cached pair used by a
    graph would have to outlive the graph, which the plan cannot promise.
"""

import functools
import threading
from dataclasses import dataclass, field

import torch

from tileattn import paged

from . import configs as C
from .configs import Config
from .facts import Overrides, active, cdiv, device_target, knob_decode_block_n, next_pow2

MAX_WORKSPACES = 8
_WORKSPACE_LOCK = threading.Lock()


def choose_num_splits(batch, hkv, max_seqlen_k_capacity, num_sms, *, m_blocks=1):
    """Split count for flash-decoding from host-known sizes only.

    About one program per SM: ``num_sms // (batch * hkv * m_blocks)`` splits, at least one,
    no split shorter than MIN_KEYS_PER_SPLIT keys of capacity, at most MAX_SPLITS. E.g. on 132
    SMs with Hkv = 8: batch 1 x 4k -> 16, batch 1 x 32k -> 16, batch 4 -> 4, batch >= 16 -> 1.
    """
    programs = batch * hkv * m_blocks
    splits = num_sms // programs
    return max(1, min(splits, max_seqlen_k_capacity // C.MIN_KEYS_PER_SPLIT, C.MAX_SPLITS))


@dataclass(frozen=True)
class DecodePlan:
    """Launch shape of one decode call: grid (B * Hkv, num_splits, m_blocks), ``config``'s tiles,
    warps and stages; each choice's reason in ``why`` (rows, splits, block_n, warps, stages).
    Owns the split workspace ([Note] decode workspace)."""

    batch: int
    seqlen_new: int
    hq: int
    hkv: int
    head_dim: int
    head_dim_v: int
    dtype: torch.dtype
    capacity: int
    page_size: int  # 0: contiguous cache
    device: torch.device
    target: str
    config: Config
    m_blocks: int
    num_splits: int
    why: tuple = field(compare=False)
    _workspaces: dict = field(default_factory=dict, compare=False, repr=False)

    block_m = property(lambda self: self.config.block_m)
    block_n = property(lambda self: self.config.block_n)
    num_warps = property(lambda self: self.config.num_warps)
    num_stages = property(lambda self: self.config.num_stages)

    @property
    def paged(self) -> bool:
        return self.page_size > 0

    def check(self, q, v_cache) -> None:
        """Raise unless the plan was made for q (B, Sn, Hq, D) and v_cache's Dv (the workspace's
        shape; a plan of another shape would index it out of bounds)."""
        B, Sn, Hq, D = q.shape
        if (B, Sn, Hq, D, v_cache.shape[-1], q.device) != (self.batch, self.seqlen_new, self.hq, self.head_dim,
                                                            self.head_dim_v, self.device):
            raise ValueError(f"tileattn: decode plan made for B={self.batch}, Sn={self.seqlen_new}, Hq={self.hq}, "
                             f"D={self.head_dim}, Dv={self.head_dim_v} on {self.device}; got q {tuple(q.shape)} on "
                             f"{q.device}, Dv={v_cache.shape[-1]}")

    def workspace(self):
        """(partial out (B, Sn, Hq, S, Dv), partial lse (B, Sn, Hq, S)) fp32 of the current stream
        and thread, or None with one split ([Note] decode workspace)."""
        if self.num_splits == 1:
            return None
        device = self.device
        stream = None
        if device.type == "cuda":
            if torch.cuda.is_current_stream_capturing():  # the graph owns its call's pair
                return self._allocate()
            stream = torch._C._cuda_getCurrentRawStream(device.index)
        key = (stream, threading.get_ident())
        ws = self._workspaces.get(key)
        if ws is None:
            ws = self._allocate()
            with _WORKSPACE_LOCK:
                while len(self._workspaces) >= MAX_WORKSPACES:
                    self._workspaces.pop(next(iter(self._workspaces)))
                self._workspaces[key] = ws
        return ws

    def _allocate(self):
        shape = (self.batch, self.seqlen_new, self.hq, self.num_splits)
        return (torch.empty((*shape, self.head_dim_v), dtype=torch.float32, device=self.device),
                torch.empty(shape, dtype=torch.float32, device=self.device))

    def describe(self, spec=None) -> str:
        rows_why, splits_why, block_n_why, warps_why, stages_why = self.why
        cache = f"paged (page {self.page_size})" if self.paged else "contiguous"
        lines = [f"tileattn decode plan: {self.target}, {self.dtype}, B={self.batch}, Sn={self.seqlen_new}, "
                 f"Hq={self.hq}, Hkv={self.hkv}, D={self.head_dim}, Dv={self.head_dim_v}, {cache} cache of "
                 f"{self.capacity} keys per sequence",
                 f"  features: {', '.join(spec.features()) or 'plain' if spec is not None else '(any)'}",
                 f"  kernel: _decode_kernel, grid ({self.batch * self.hkv} = B*Hkv, {self.num_splits} splits, "
                 f"{self.m_blocks} row blocks), new keys appended in the kernel",
                 f"  rows: BLOCK_M={self.block_m}, {self.m_blocks} row block(s)  -- {rows_why}",
                 f"  splits: {self.num_splits}  -- {splits_why}",
                 f"  key tile: BLOCK_N={self.block_n}  -- {block_n_why}",
                 f"  warps: {self.num_warps}  -- {warps_why}",
                 f"  stages: {self.num_stages}  -- {stages_why}"]
        if self.num_splits > 1:
            lines.append(f"  combine: _combine_kernel merges {self.num_splits} fp32 partials per row; workspace "
                         f"{self.batch}x{self.seqlen_new}x{self.hq}x{self.num_splits}x{self.head_dim_v} owned by "
                         "the plan, one per (stream, thread); per call under graph capture")
        else:
            lines.append("  combine: none (one split writes out and lse directly)")
        return "\n".join(lines)


def plan_decode(q, k_cache, v_cache, block_table=None, *, num_splits=0, overrides: Overrides = None,
                target=None) -> DecodePlan:
    """DecodePlan for q (B, Sn, Hq, D) over these caches (cached by shapes; no device reads).

    Capacity per sequence: Smax for a contiguous cache, max_blocks * page_size when paged.
    ``num_splits`` > 0 is kept as given; 0 asks the overrides' ``decode_num_splits``, then
    :func:`choose_num_splits`. The key tile, warps and stages follow the module docstring unless
    overridden (``decode_block_n``, else the TILEATTN_DECODE_BLOCK_N knob; ``decode_num_warps``,
    ``decode_num_stages``). No choice depends on the score features, so the plan is not keyed by
    ``spec.key()``: one plan (and its workspace) serves calls with any features.
    """
    B, Sn, Hq, D = q.shape
    ov = active(overrides)
    page_size = k_cache.shape[1] if block_table is not None else 0
    return _plan(B, Sn, Hq, k_cache.shape[2], D, v_cache.shape[3], k_cache.dtype, paged.capacity(k_cache, block_table),
                 page_size, int(num_splits), q.device, target or device_target(q),
                 ov.decode_block_n or knob_decode_block_n(), ov)


@functools.lru_cache(maxsize=256)
def _plan(B, Sn, Hq, Hkv, D, Dv, dtype, capacity, page_size, num_splits, device, target, forced_block_n,
          ov) -> DecodePlan:
    es = dtype.itemsize
    G = Hq // Hkv
    rows = Sn * G
    width = next_pow2(D) + next_pow2(Dv)
    block_m = 16 if es == 4 else min(64, max(16, next_pow2(rows)))
    m_blocks = cdiv(rows, block_m)
    rows_why = (f"Sn * G = {rows} packed rows" + (" (fp32: 16 rows)" if es == 4 else ", 16 <= BLOCK_M <= 64"))
    if num_splits > 0:
        splits_why = "given by the caller"
    elif ov.decode_num_splits:
        num_splits, splits_why = ov.decode_num_splits, "forced by overrides"
    else:
        num_splits = choose_num_splits(B, Hkv, capacity, target.num_sms, m_blocks=m_blocks)
        splits_why = (f"about one program per SM: {target.num_sms} SMs // (B*Hkv*row blocks = {B * Hkv * m_blocks}), "
                      f"splits of >= {C.MIN_KEYS_PER_SPLIT} keys of capacity, <= {C.MAX_SPLITS}")
    if es == 4:  # fp32: ieee dots run on FMA from registers; larger tiles spill (ptxas)
        block_n = 64 if width <= 128 else 16
        block_n_why = "fp32: FMA dots from registers, larger tiles spill"
    else:
        block_n, stage_bytes = 128, C.STAGE_BYTES if width <= 256 else C.WIDE_STAGE_BYTES
        while block_n > 16 and block_n * width * es > stage_bytes:
            block_n //= 2
        block_n_why = f"largest tile <= 128 keys whose K + V fit {stage_bytes >> 10} KB per stage"
        if capacity <= C.SHORT_SPLIT_KEYS * num_splits and block_n > 64:
            block_n, block_n_why = 64, f"splits of <= {C.SHORT_SPLIT_KEYS} keys: two 128-key tiles pipeline poorly"
    if forced_block_n:
        block_n, block_n_why = forced_block_n, "forced (overrides or TILEATTN_DECODE_BLOCK_N)"
    num_warps = 8 if block_m * next_pow2(max(D, Dv)) >= 64 * 128 else 4
    warps_why = ("64 rows x 128 columns: 4 warps reach 255 registers, paged ones spill" if num_warps == 8 else
                 "tile small enough for one warpgroup")
    if ov.decode_num_warps:
        num_warps, warps_why = ov.decode_num_warps, "forced by overrides"
    num_stages = C.DECODE_PAGED_STAGES if page_size else C.DECODE_STAGES
    stages_why = "paged: page ids take a stage ahead of the K/V gathers" if page_size else "K/V double-buffered"
    if ov.decode_num_stages:
        num_stages, stages_why = ov.decode_num_stages, "forced by overrides"
    return DecodePlan(B, Sn, Hq, Hkv, D, Dv, dtype, capacity, page_size, device, target.desc,
                      Config(block_m, block_n, num_warps, num_stages), m_blocks, num_splits,
                      (rows_why, splits_why, block_n_why, warps_why, stages_why))


cache_clear = _plan.cache_clear
