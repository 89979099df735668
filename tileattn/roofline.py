"""Ask before running: the plan, memory, FLOPs and predicted time of one ``attention`` call.

    >>> r = tileattn.plan.estimate(2, 4096, 4096, 16, 16, 128, dtype=torch.bfloat16, causal=True,
    ...                            backward=True, preset="h200")
    >>> r.blocks, r.sram_bytes, r.flops, r.bound, round(r.predicted_s * 1e6)   # forward; r.bwd_* too
    ('BLOCK_M=128 BLOCK_N=64 warps=8 stages=3', 131072, 137472507904, 'compute', 174)

``tileattn plan`` prints the same :class:`PlanReport`. The models, written out so a reader can
check a number by hand (es = element bytes of the dtype; Q = B*Sq*Hq*D, K = B*Sk*Hkv*D,
V = B*Sk*Hkv*Dv, O = B*Sq*Hq*Dv elements; L = B*Hq*Sq fp32 row statistics; S = B*Hq*Sq*Sk):

- FLOPs: forward ``2 * B * Hq * pairs * (D + Dv)``, pairs = the (query, key) pairs the causal
  mask or window keeps (bottom-right aligned); backward 2.5x the forward (five matmuls for two).
- HBM bytes, tileattn forward: ``es * (Q + K + V + O) + 4 * L`` (each tensor read or written
  once: K/V tiles re-read by later query blocks are assumed to hit L2). Backward (Triton: dQ
  kernel, then dK/dV kernel; each reads q, k, v, dout; dQ also out and lse and writes dq, lse2,
  delta; dK/dV reads lse2, delta and writes dk, dv): ``3 * es * (Q + K + V + O) + 20 * L``.
- HBM bytes, the materialized (naive) forward: ``es * (Q + K + V + O) + 4 * es * S`` (the
  score matrix S written and read by the softmax, P written and read by P @ V).
- Memory beyond inputs and output: tileattn keeps lse (``4 * L``); the naive forward holds S
  and P at once (``2 * es * S``); ``memory_saved_bytes`` is the difference.
- SRAM: Triton, shared memory of one program of the first config of each pass
  (``configs.forward_smem``/``dq_smem``/``dkdv_smem``: q tile + num_stages K/V tiles);
  CPU backend, the fp32 working set of one (batch, KV head) tile: ``4 * (R*D + N*(D+Dv) +
  R*N + R*Dv)`` with R = G * min(Sq, BLOCK_ROWS // G) packed rows, N = min(Sk, BLOCK_N) keys.
- Decode (``decode=True``: ``attention_with_kvcache``, Sq = new tokens, Sk = attended keys,
  causal): FLOPs as the forward; HBM bytes as the forward plus, with S > 1 splits, the fp32
  partials written and read by the combine, ``2 * 4 * B*Sq*Hq * S * (Dv + 1)``; passes 1, or
  2 with the combine; SRAM of the decode program as the forward's model with its config.
  CPU backend: one (batch, KV head) tile of G*Sq rows x min(Sk, 256) keys.
- Predicted time: ``max(flops / peak FLOP/s, bytes / peak bytes/s)`` at the preset's ceilings
  (the copy ceiling counts read + write; a read-only stream like decode can beat it slightly).
"""

from dataclasses import dataclass, replace
from typing import NamedTuple, Optional

import torch


class Preset(NamedTuple):
    """A device to plan for: the Triton target (None: the CPU backend), SMs, ceilings."""

    name: str
    desc: str
    target: Optional[str]  # "sm_90" | "cuda" | None (CPU backend)
    num_sms: int
    tflops16: float  # dense 16-bit matmul, TFLOP/s
    tflops32: float  # fp32 (Triton's fp32 path: ieee dots on FMA units), TFLOP/s
    gbps: float  # HBM (or DRAM) GB/s
    source: str


PRESETS = {
    "h200": Preset("h200", "NVIDIA H200 (sm_90, 132 SMs)", "sm_90", 132, 789.0, 67.0, 4260.0,
                   "measured on our H200: bf16 matmul 8192^3 789 TFLOP/s, 2 GiB device copy 4.26 TB/s "
                   "(docs/performance.md); fp32: 67 TFLOP/s datasheet"),
    "h100": Preset("h100", "NVIDIA H100 SXM (sm_90, 132 SMs)", "sm_90", 132, 789.0, 67.0, 3350.0,
                   "matmul as measured on the H200 (same SMs and clocks); HBM3 3.35 TB/s and fp32 67 TFLOP/s "
                   "datasheet"),
    "a100": Preset("a100", "NVIDIA A100 SXM 80GB (sm_80, 108 SMs)", "cuda", 108, 312.0, 19.5, 2039.0,
                   "datasheet: 312 TFLOP/s bf16 dense, 19.5 fp32, 2.04 TB/s"),
    "cpu": Preset("cpu", "CPU backend (tiled torch, fp32 compute)", None, 0, 0.172, 0.172, 25.7,
                  "our 2-core development machine: fp32 matmul 172 GFLOP/s (docs/performance.md), copy 25.7 GB/s; "
                  "other CPUs differ: use --measure"),
}


@dataclass(frozen=True)
class PlanReport:
    """What :func:`estimate` found. Bytes and FLOPs are exact integers of the models in the
    module docstring; times in seconds; ``bwd_*`` are None without ``backward``; ``measured_*``
    and ``roofline_*`` (predicted / measured: the fraction of the ceiling reached) only with
    ``measure``."""

    preset: str
    device: str
    dtype: torch.dtype
    shape: tuple  # (B, Sq, Sk, Hq, Hkv, D, Dv)
    features: str
    variant: str  # kernel (or CPU backend path) and what one program does
    blocks: str  # the forward's first config (Triton) or the CPU tile
    why: str  # the reasons: config list, loads
    describe: str  # the planner's full text
    sram_bytes: int  # forward, per program (CPU: per tile)
    bwd_sram_bytes: Optional[tuple]  # (dQ, dK/dV) per program; CPU: (tile,)
    passes: int  # kernels (or sweeps) of the forward
    bwd_passes: Optional[int]
    flops: int
    bwd_flops: Optional[int]
    hbm_bytes: int
    bwd_hbm_bytes: Optional[int]
    naive_hbm_bytes: int
    extra_bytes: int
    naive_extra_bytes: int
    memory_saved_bytes: int
    predicted_s: float
    bwd_predicted_s: Optional[float]
    bound: str  # "compute" | "memory" (the forward)
    measured_s: Optional[float] = None
    bwd_measured_s: Optional[float] = None

    @property
    def roofline(self) -> Optional[float]:
        return self.predicted_s / self.measured_s if self.measured_s else None

    @property
    def bwd_roofline(self) -> Optional[float]:
        return self.bwd_predicted_s / self.bwd_measured_s if self.bwd_measured_s and self.bwd_predicted_s else None


def kept_pairs(sq: int, sk: int, window=(-1, -1)) -> int:
    """(query, key) pairs kept by a bottom-right aligned window (left, right); -1 = unbounded
    (causal = (-1, 0)). Row i keeps keys i + off - left .. i + off + right, off = sk - sq."""
    left, right, off, total = window[0], window[1], sk - sq, 0
    for i in range(sq):
        lo = 0 if left < 0 else max(0, i + off - left)
        hi = sk - 1 if right < 0 else min(sk - 1, i + off + right)
        total += max(0, hi - lo + 1)
    return total


def local_preset() -> str:
    """The preset of this machine's device: a known GPU by name, else "cpu" without CUDA."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().upper()
    for key in ("H200", "H100", "A100"):
        if key in name:
            return key.lower()
    raise ValueError(f"tileattn: no ceilings known for {torch.cuda.get_device_name()}; pass preset= "
                     f"(one of {', '.join(PRESETS)})")


def _triton_decode(plan, C, target, q, k, v, es, spec_kw):
    d = plan.kvcache_plan(q, k, v, target=target)
    c, splits = d.config, d.num_splits
    kw = {n: x for n, x in spec_kw.items() if n != "dropout_p"}
    return dict(variant=f"_decode_kernel (split-KV, {'paged' if d.paged else 'contiguous'}): grid (B*Hkv, {splits} "
                        f"split(s), {d.m_blocks} row block(s)), G*Sq query rows packed per program"
                        + (", then _combine_kernel" if splits > 1 else ""),
                blocks=f"{c} splits={splits}", why="; ".join(d.why),
                describe=plan.describe_kvcache(q, k, v, target=target, **kw),
                sram_bytes=C.forward_smem(c, plan.head_block(q.shape[-1]), plan.head_block(v.shape[-1]), es),
                passes=1 + (splits > 1), splits=splits)


def _triton_plan(p, dtype, shape, backward, decode, spec_kw):
    from . import plan
    B, Sq, Sk, Hq, Hkv, D, Dv = shape
    meta = dict(device="meta", dtype=dtype)
    q, k, v = torch.empty(B, Sq, Hq, D, **meta), torch.empty(B, Sk, Hkv, D, **meta), torch.empty(B, Sk, Hkv, Dv, **meta)
    target = plan.Target(p.target, f"{p.desc} (preset {p.name})", p.num_sms)
    from .backends.triton.plan import configs as C
    if decode:
        return _triton_decode(plan, C, target, q, k, v, dtype.itemsize, spec_kw)
    fwd = plan.forward_plan(q, k, v, target=target, **spec_kw)
    es, c = dtype.itemsize, fwd.configs[0]
    describe = plan.describe(q, k, v, backward=backward, target=target, **spec_kw)
    if fwd.kernel == "gluon":
        from .backends.triton.gluon import launch as G
        meta = G.kernel_meta(D, False)
        out = dict(variant="gluon fwd_kernel (FA3 design): a TMA loader warp and two 64-row wgmma consumer "
                           "warpgroups per CTA, K/V ring in shared memory",
                   blocks=f"BLOCK_M=128 (2 x {G.HALF_M}) BLOCK_N={G.BLOCK_N} stages={meta['STAGES']}",
                   why="sm_90, dense 16-bit, D == Dv in {64, 128}, plain or causal (plan.forward.gluon_rule)",
                   describe=describe, sram_bytes=G.shared_bytes(D, es), passes=1)
    else:
        out = dict(variant=f"_fwd_kernel (dense, {'TMA' if fwd.use_tma else 'pointer'} loads): one program per "
                           "BLOCK_M query rows of one (batch, query head), walking BLOCK_N key tiles",
                   blocks=str(c), why=f"{c.why}; configs: {fwd.configs_why}; {fwd.loads_why}",
                   describe=describe, sram_bytes=C.forward_smem(c, fwd.block_d, fwd.block_dv, es), passes=1)
    if backward:
        bwd = plan.backward_plan(q, k, v, target=target, **spec_kw)
        out.update(bwd_passes=2, bwd_sram_bytes=(C.dq_smem(bwd.dq.configs[0], bwd.block_d, bwd.block_dv, es),
                                                 C.dkdv_smem(bwd.dkdv.configs[0], bwd.block_d, bwd.block_dv, es)))
    return out


def _cpu_plan(shape, backward, decode):
    from .backends.cpu import _tiles
    from .backends.cpu import decode as cpu_decode
    B, Sq, Sk, Hq, Hkv, D, Dv = shape
    g = Hq // Hkv
    if decode:
        rows, keys = g * Sq, min(Sk, cpu_decode.BLOCK_N)
        return dict(variant="CPU backend decode: per sequence, online softmax over key tiles (fp32)",
                    blocks=f"rows={rows} keys={keys}", why=f"G*Sq = {rows} packed rows per KV head, BLOCK_N="
                    f"{cpu_decode.BLOCK_N} keys per tile", describe="tileattn CPU backend decode (split-KV merged by lse)",
                    sram_bytes=4 * (rows * D + keys * (D + Dv) + rows * keys + rows * Dv), passes=1)
    rows, keys = g * min(Sq, max(1, _tiles.BLOCK_ROWS // g)), min(Sk, _tiles.BLOCK_N)
    tile = 4 * (rows * D + keys * (D + Dv) + rows * keys + rows * Dv)
    text = (f"tileattn CPU backend: tiles of {rows} packed rows ({g} query heads x {rows // g} rows of one KV head) "
            f"x {keys} keys, fp32 online softmax; backward: one sweep recomputing P per tile (dQ, dK, dV together)")
    out = dict(variant="CPU backend: tiled online softmax in torch (fp32)", blocks=f"rows={rows} keys={keys}",
               why=f"BLOCK_ROWS={_tiles.BLOCK_ROWS} query rows over the G={g} packed heads, BLOCK_N={_tiles.BLOCK_N} "
                   "keys (L2-sized tiles); k/v never repeated for GQA",
               describe=text, sram_bytes=tile, passes=1)
    if backward:
        out.update(bwd_passes=1, bwd_sram_bytes=(tile,))
    return out


def estimate(B, Sq, Sk, Hq, Hkv, D, Dv=None, *, dtype=torch.bfloat16, causal=False, window=(-1, -1),
             softcap=0.0, alibi=False, sinks=False, dropout_p=0.0, backward=False, decode=False, preset=None,
             measure=False) -> PlanReport:
    """Plan, memory, FLOPs and predicted time of ``tileattn.attention`` on q (B, Sq, Hq, D),
    k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv) (Dv defaults to D) with these features (``alibi``,
    ``sinks``: whether the call passes them). ``preset``: one of :data:`PRESETS` (default:
    this machine's); GPU presets need Triton (the planner's tables). ``measure``: also time the
    call here (random inputs; needs the preset to be this machine's). ``decode``: plan
    ``attention_with_kvcache`` of Sq new tokens over Sk cached keys instead (causal, no
    backward or dropout)."""
    Dv = Dv or D
    if decode and (backward or dropout_p or measure):
        raise ValueError("tileattn: a decode estimate has no backward, dropout or measure")
    causal = causal or decode
    if Hq % Hkv:
        raise ValueError(f"tileattn: Hq ({Hq}) must be a multiple of Hkv ({Hkv})")
    name = preset or local_preset()
    if name not in PRESETS:
        raise ValueError(f"tileattn: unknown preset {name!r}; known: {', '.join(PRESETS)}")
    p, shape = PRESETS[name], (B, Sq, Sk, Hq, Hkv, D, Dv)
    spec_kw = dict(causal=causal, window=tuple(window), softcap=softcap, dropout_p=dropout_p,
                   alibi_slopes=torch.zeros(Hq) if alibi else None, sinks=torch.zeros(Hq) if sinks else None)
    planned = _triton_plan(p, dtype, shape, backward, decode, spec_kw) if p.target else _cpu_plan(shape, backward, decode)
    splits = planned.pop("splits", 1)
    es = dtype.itemsize
    Q, K, V, O = B * Sq * Hq * D, B * Sk * Hkv * D, B * Sk * Hkv * Dv, B * Sq * Hq * Dv
    L, S = B * Hq * Sq, B * Hq * Sq * Sk
    flops = 2 * B * Hq * kept_pairs(Sq, Sk, (window[0], 0) if causal else tuple(window)) * (D + Dv)
    hbm = es * (Q + K + V + O) + 4 * L + (8 * L * splits * (Dv + 1) if splits > 1 else 0)
    peak = (p.tflops16 if es == 2 and p.target else p.tflops32) * 1e12
    t_flops, t_bytes = flops / peak, hbm / (p.gbps * 1e9)
    bwd_flops = int(2.5 * flops) if backward else None
    bwd_hbm = 3 * es * (Q + K + V + O) + 20 * L if backward else None
    features = ", ".join(n for n, on in (("causal", causal), (f"window={tuple(window)}", tuple(window) != (-1, -1)),
                                         (f"softcap={softcap}", softcap), ("alibi", alibi), ("sinks", sinks),
                                         (f"dropout={dropout_p}", dropout_p)) if on) or "plain"
    report = PlanReport(
        preset=name, device=p.desc, dtype=dtype, shape=shape, features=features, flops=flops, hbm_bytes=hbm,
        bwd_flops=bwd_flops, bwd_hbm_bytes=bwd_hbm, naive_hbm_bytes=es * (Q + K + V + O) + 4 * es * S,
        extra_bytes=4 * L, naive_extra_bytes=2 * es * S, memory_saved_bytes=2 * es * S - 4 * L,
        predicted_s=max(t_flops, t_bytes), bound="compute" if t_flops >= t_bytes else "memory",
        bwd_predicted_s=max(bwd_flops / peak, bwd_hbm / (p.gbps * 1e9)) if backward else None,
        **{"bwd_passes": None, "bwd_sram_bytes": None, **planned})
    return _measured(report, spec_kw) if measure else report


def _measured(r: PlanReport, spec_kw) -> PlanReport:
    """``r`` with the forward (and backward) timed on this machine's device."""
    from .api import attention
    from .bench import timing
    if r.preset != local_preset():
        raise ValueError(f"tileattn: measure needs the preset of this machine ({local_preset()}), got {r.preset!r}")
    B, Sq, Sk, Hq, Hkv, D, Dv = r.shape
    device = "cpu" if r.preset == "cpu" else "cuda"
    make = lambda *s: torch.randn(*s, device=device, dtype=r.dtype, requires_grad=r.bwd_flops is not None)  # noqa: E731
    q, k, v = make(B, Sq, Hq, D), make(B, Sk, Hkv, D), make(B, Sk, Hkv, Dv)
    kw = {n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in spec_kw.items()}
    ms = timing.gpu_ms if device == "cuda" else timing.cpu_ms
    fwd = lambda: attention(q, k, v, **kw)  # noqa: E731
    fwd()
    out = {"measured_s": ms(fwd) / 1e3}
    if r.bwd_flops is not None:
        o = fwd()
        dout = torch.randn_like(o)
        bwd = lambda: torch.autograd.grad(o, (q, k, v), dout, retain_graph=True)  # noqa: E731
        bwd()
        out["bwd_measured_s"] = ms(bwd) / 1e3
    return replace(r, **out)
