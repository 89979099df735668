"""The launch configurations every Triton pass chooses from, each with its reason.

One record (:class:`Config`) for the forward, the backward's dQ and dK/dV kernels and decode.
Tables map (target, "16" | "32" bit dtype, head-dim block) to a short list, default first; on
CUDA the launcher times a list of several once per tuning key (see ``tune.py``). Registers and
spills quoted in the reasons come from offline sm_90 compiles (triton 3.6 + cuobjdump) of the
plain kernel unless marked causal. The thresholds below (TMA, head grouping, decode splits)
are the rules the planners apply; docs/performance.md's decision log holds the measurements
behind them.
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Config:
    """One launch configuration: BLOCK_M x BLOCK_N tiles, warps, software-pipeline stages.

    Forward and dQ: a program owns block_m query rows and steps over block_n keys. dK/dV: a
    program owns block_n keys and steps over block_m query rows. Decode: block_m packed rows
    (new tokens x query heads of one KV head) per program, block_n keys per step.
    ``why`` is the reason it is in a list; it does not take part in equality.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    why: str = field(default="", compare=False)

    def __str__(self):
        return f"BLOCK_M={self.block_m} BLOCK_N={self.block_n} warps={self.num_warps} stages={self.num_stages}"

    def meta(self) -> dict:
        """Meta-parameters of a direct launch."""
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, num_warps=self.num_warps, num_stages=self.num_stages)


_C = Config
INTERPRETER = ("interpreter", "", 0)  # the interpreter's key: one config whatever the dtype and head dim

# ----------------------------------------------------------------------------- forward
# sm_90 entries all use HGMMA and none spills registers.
FORWARD = {
    ("sm_90", "16", 64): (
        _C(128, 64, 4, 3, "one warpgroup, 189-252 regs and 66 KB smem: two CTAs per SM"),
        _C(128, 128, 8, 3, "Flex/tutorial-sized 128x128 tile on two warpgroups"),
        _C(128, 64, 4, 4, "deeper K/V pipeline"),
    ),
    ("sm_90", "16", 128): (
        _C(128, 64, 8, 3, "Flex H100 bf16 D=128: two warpgroups share 128 rows, 148-167 regs"),
        _C(128, 128, 8, 3, "Flex H100 fp16 D=128: fewer softmax rescales, 225 KB smem, 190-255 regs"),
        _C(64, 64, 4, 3, "one warpgroup, 64 rows: short or ragged queries, more CTAs"),
    ),
    ("sm_90", "16", 256): (
        _C(64, 64, 4, 2, "D=256: acc 64x256 fp32 in one warpgroup, 161 KB smem"),
        _C(128, 64, 8, 2, "two warpgroups, 128 rows: halves K/V re-reads, 192 KB smem"),
        _C(64, 32, 4, 3, "Flex H100 D=256 choice"),
    ),
    ("cuda", "16", 64): (_C(128, 64, 4, 3, "Ampere-class default (Flex A100 D=64)"),),
    ("cuda", "16", 128): (_C(128, 64, 8, 3, "Ampere-class default (Flex A100 D=128)"),
                          _C(64, 64, 4, 3, "fewer registers per CTA")),
    ("cuda", "16", 256): (_C(64, 32, 4, 2, "D=256: small tiles to fit registers and shared memory"),),
    # fp32 uses ieee dots, i.e. FMA units: larger tiles spill (32x32 at D=128: 904 B of stack).
    ("cuda", "32", 64): (_C(32, 16, 4, 2, "fp32 ieee dots on FMA units: 80 regs, no spills"),),
    ("cuda", "32", 128): (_C(32, 16, 4, 2, "fp32 ieee dots on FMA units: 148 regs, no spills"),),
    ("cuda", "32", 256): (_C(16, 16, 4, 2, "fp32, D=256: 186 regs, no spills"),),
    INTERPRETER: (_C(64, 32, 4, 1, "interpreter: few programs, several key tiles on short tests"),),
}
# sm_90 with an attn_mask (16-bit), by head-dim block: mask tiles (one pointer and value per
# score) and the full feature set spill at BLOCK_N=64 (56-280 B of stack at D=64/128).
FORWARD_MASK = {
    64: (_C(128, 32, 8, 3, "attn_mask at D<=64: 128x32 on two warpgroups, 157-198 regs, no spills"),
         _C(128, 32, 4, 3, "attn_mask, one warpgroup: 232-255 regs, no spills")),
    128: (_C(128, 32, 8, 3, "attn_mask at D=128: 188-255 regs, no spills (128x64 spills)"),
          _C(64, 32, 4, 3, "attn_mask, one warpgroup: 185-253 regs, no spills")),
}

# ----------------------------------------------------------------------------- backward
# dK/dV: BLOCK_N keys per program, BLOCK_M query rows per inner step.
DKDV = {
    ("sm_90", "16", 64): (_C(32, 128, 8, 3, "128 keys per program, 32-row steps; no spill, causal included"),
                          _C(64, 128, 8, 3, "Flex H100 shape (BLOCK_M1=64, BLOCK_N1=128); causal spills 688 B"),
                          _C(64, 64, 8, 3, "more programs for short sequences; causal spills 608 B")),
    ("sm_90", "16", 128): (_C(32, 128, 8, 3, "128 keys per program, 32-row steps: no spill (causal: 192 B)"),
                           _C(16, 128, 8, 3, "16-row steps: no spill with causal masking"),
                           _C(64, 128, 8, 3, "Flex H100 D=128 choice; spills 176 B (causal: 1.1 kB)")),
    ("sm_90", "16", 256): (_C(16, 64, 8, 2, "dk/dv 64x256 fp32 over two warpgroups; no spill (causal: 128 B)"),
                           _C(32, 64, 8, 2, "longer row steps; spills 40 B (causal: 336 B)"),
                           _C(64, 64, 8, 2, "Flex H100 D=256 shape; spills 408 B")),
    ("cuda", "16", 64): (_C(64, 64, 4, 3, "Ampere-class default"),),
    ("cuda", "16", 128): (_C(32, 128, 8, 2, "Ampere-class default"),),
    ("cuda", "16", 256): (_C(16, 64, 8, 2, "D=256: small tiles to fit registers and shared memory"),),
    ("cuda", "32", 64): (_C(16, 32, 8, 1, "fp32 ieee dots run on FMA units: small tiles; 96 regs"),),
    ("cuda", "32", 128): (_C(16, 32, 8, 1, "fp32 ieee dots run on FMA units: small tiles; 127 regs"),),
    ("cuda", "32", 256): (_C(16, 32, 8, 1, "fp32 ieee dots run on FMA units: small tiles; 204 regs"),),
    INTERPRETER: (_C(32, 64, 4, 1, "interpreter: BLOCK_M != BLOCK_N catches swapped roles"),),
}
# dQ: BLOCK_M query rows per program, BLOCK_N keys per inner step.
DQ = {
    ("sm_90", "16", 64): (_C(128, 64, 8, 3, "Flex H100 shape (BLOCK_M2=128, BLOCK_N2=64); 136 regs"),
                          _C(128, 128, 8, 3, "longer key steps, fewer loop trips; 224 regs"),
                          _C(64, 64, 4, 3, "more programs for short sequences; 153 regs")),
    ("sm_90", "16", 128): (_C(128, 64, 8, 3, "Flex H100 D=128 choice; 234 regs, no spill"),
                           _C(128, 64, 8, 2, "shallower pipeline; 224 regs"),
                           _C(128, 32, 8, 3, "short key steps; 176 regs")),
    ("sm_90", "16", 256): (_C(128, 32, 8, 2, "dq 128x256 fp32 over two warpgroups; no spill"),
                           _C(64, 32, 8, 2, "more programs; 237 regs"),
                           _C(64, 64, 8, 2, "Flex H100 D=256 shape; spills 96 B")),
    ("cuda", "16", 64): (_C(64, 64, 4, 3, "Ampere-class default"),),
    ("cuda", "16", 128): (_C(128, 64, 8, 2, "Ampere-class default"),),
    ("cuda", "16", 256): (_C(64, 32, 8, 2, "D=256: small tiles to fit registers and shared memory"),),
    ("cuda", "32", 64): (_C(32, 16, 8, 1, "fp32 ieee dots run on FMA units: small tiles; 120 regs"),),
    ("cuda", "32", 128): (_C(32, 16, 8, 1, "fp32 ieee dots run on FMA units: small tiles; 106 regs"),),
    ("cuda", "32", 256): (_C(32, 16, 8, 1, "fp32 ieee dots run on FMA units: small tiles; 177 regs"),),
    INTERPRETER: (_C(64, 32, 4, 1, "interpreter: BLOCK_M != BLOCK_N catches swapped roles"),),
}
TABLES = {"forward": FORWARD, "dq": DQ, "dkdv": DKDV}

# Each sequence's rows in the backward's lse2 / delta buffers are padded to a multiple of
# ROW_PAD; every dQ and dK/dV BLOCK_M must divide it (backward_kernels, [Note] padded row stats).
ROW_PAD = 128
# The backward tunes only when the bucketed Sq * Sk reaches this: smaller calls are
# launch-bound, and timing them would only add compiles.
BWD_TUNE_MIN_WORK = 512 * 512

# ----------------------------------------------------------------------------- TMA thresholds
# Tensor-descriptor tile loads pay a per-program descriptor setup. The forward uses them only
# at a head-dim block of 256 (pointer loads are as fast at long sequences and faster at short
# ones below that); the backward from 4096 keys or rows on.
FWD_TMA_MIN_HEAD_BLOCK = 256
BWD_TMA_MIN_SEQLEN = 4096

# ----------------------------------------------------------------------------- backward schedule
# Causal backward programs get longer toward key block 0 (dK/dV) or the last row block (dQ).
# Launching a group of heads' long programs first keeps the short ones for the tail, as long as
# the group's re-read tiles (q/dout or k/v) fit in this share of L2 (50 MB on an H100/H200);
# groups smaller than MIN_HEAD_GROUP stay head-major (pairs of heads were slower at 16k).
L2_SHARE = 16 << 20
MIN_HEAD_GROUP = 4

# ----------------------------------------------------------------------------- decode
MIN_KEYS_PER_SPLIT = 256  # below this a split's prologue/epilogue outweighs its KV reads
MAX_SPLITS = 128
# K + V bytes of one 16-bit key tile (a pipeline stage): 128 keys at D = Dv = 128; wider heads
# keep 32 KB (three stages plus their larger q tile must fit in shared memory)
STAGE_BYTES, WIDE_STAGE_BYTES = 64 * 1024, 32 * 1024
# The fastest split count makes B * Hkv * splits about one program per SM at every batch, and
# 128-key tiles win except where a split spans at most SHORT_SPLIT_KEYS keys of capacity
# (two 128-key tiles per split pipeline poorly): there 64-key tiles.
SHORT_SPLIT_KEYS = 256
DECODE_STAGES, DECODE_PAGED_STAGES = 3, 5  # paged: page ids take a stage ahead of the K/V gathers


# ----------------------------------------------------------------------------- shared-memory models
def forward_smem(c, block_d, block_dv, es):
    """Forward program: the q tile plus num_stages buffered K and V tiles (bytes)."""
    return es * (c.block_m * block_d + max(c.num_stages, 1) * c.block_n * (block_d + block_dv))


def dkdv_smem(c, block_d, block_dv, es):
    """dK/dV program: its k, v tile (BLOCK_N keys) + num_stages q, do tiles (bytes)."""
    return es * (block_d + block_dv) * (c.block_n + max(c.num_stages, 1) * c.block_m)


def dq_smem(c, block_d, block_dv, es):
    """dQ program: its q, do tile (BLOCK_M rows) + num_stages k, v tiles (bytes)."""
    return es * (block_d + block_dv) * (c.block_m + max(c.num_stages, 1) * c.block_n)


# pass -> (shared memory model, rows one program holds, the bucketed length those rows cover):
# the autotuner's prune drops configs that cannot fit or would compute only padding
TUNING = {"forward": (forward_smem, lambda c: c.block_m, "tune_sq"),
          "dq": (dq_smem, lambda c: c.block_m, "tune_sq"),
          "dkdv": (dkdv_smem, lambda c: c.block_n, "tune_sk")}
