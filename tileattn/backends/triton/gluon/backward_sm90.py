"""FA3-design fused backward for Hopper (sm_90) in Gluon: one pass per K/V block, dQ by atomics.

Glossary (names fixed across tileattn kernels):
    BLOCK_N      keys per program (128); each consumer warpgroup owns HALF_N = 64 of them
    BLOCK_M      query rows per step (64); Q and dO tiles of STAGES steps live in shared memory
    HALF_D       HEAD_D / 2: consumer c computes dQ columns [c * HALF_D, + HALF_D)
    lse2         row statistic M (lse * log2(e), or the exact row max for large |lse|), +inf for
                 empty rows and rows past Sq; log_l beside it (0 unless [Note] large lse)
    delta        rowsum(out * dout), fp32 (backward_launch's preprocess writes all three, padded,
                 packed per 64-row block as Stats (B * Hq, rows_pad / 64, 3, 64): lse2, log_l, delta)
    t            s * qk_scale, qk_scale = scale * log2(e); p = exp2((t - lse2) - log_l)
    dp, ds       dout . v_j and ds = p * (dp - delta) (natural-log units, before ``scale``)
    right        row m keeps key n iff n <= m + right: Sk - Sq when causal, 2^30 otherwise

Layout: q, k, v, dout (B, S, H, D) with unit last stride, read through 4-D TMA descriptors with a
(1, rows, 1, cols) box (zero fill past Sq / Sk). Query head h reads kv head h // group. dk, dv
(B, Sk, Hkv, D) are stored from registers with a row mask. DQAcc fp32 (B, Hq, rows_pad, D),
zeroed, rows_pad = Sq rounded up to BLOCK_M: every step writes each consumer's (BLOCK_M, D / 2)
dQ partial to shared memory and adds it with a bulk TMA reduce-add (cp.reduce.async.bulk.tensor,
fp32 adds in L2; rows past Sq get exact zeros: p = 0 there); the launcher scales and converts
it. The adds make dq's rounding order-dependent: ``deterministic=True`` runs the ``tl`` kernels
instead.

Program p (one CTA, no persistence) owns keys [n0, n0 + 128) of one (batch, kv head). It walks
the G query heads of the group (GQA: dK/dV summed over them in registers, no atomics) and, for
each, the query row blocks that keep any of its keys: rows [m_lo, Sq), m_lo = n0 - right
rounded down to BLOCK_M (0 unless causal). Steps [0, n_masked) test the keep rule (the causal
diagonal, keys past Sk in the last key block); the rest keep every pair. Three partitions:

    loader    (1 warp, 24 regs)   K, V (two 64-key halves each) once; then Q_i, dO_i per step
                                  into ring slot it % STAGES after the slot's empty barrier
    consumer  (4 warps, default)  keys [n0, n0 + 64)
    consumer  (4 warps, 240 regs) keys [n0 + 64, n0 + 128)

A consumer's step (wgmma M = 64 query rows; the steps are one flat loop over (query head,
row block), the keep rule a select on every step with bound HALF_N where all pairs are kept):
    S    = Q K_c^T                          (async from shared memory; wait)
    P    = exp2((t - lse2) - log_l)         (0 where key j > min(m + right, Sk - 1))
    P -> shared slot c
    dP   = dO V_c^T; dV_c += P^T dO         (async; dP is issued only now so that its 32
                                             accumulator registers are not live beside P's
                                             fp32 and bf16 copies: D=128 fits 240 registers)
    dS   = P (dP - delta) -> shared slot (it % 2, c); arrive ds_ready
    dK_c += dS^T Q                          (async, dS^T from shared memory)
    wait ds_ready (both halves): dQ[:, c] = dS_0 K_0[:, c-th half] + dS_1 K_1[:, c-th half]
                                            (B: column slices of K in shared memory)
    wait all; release Q/dO slot; wait the previous reduce; dQ[:, c] -> shared; TMA reduce-add
A consumer writes dS slot s at step it + 2 only after the other consumer's step it + 1 has
arrived on ds_ready, which that consumer does after its step-it dQ wgmma completed: two dS
slots suffice.

Exactness (what the launcher routes here, backward_launch.py):
- Large |lse|: the preprocess takes the ``tl`` dQ kernel's route ([Note] large lse in
  backward_kernels.py): a row block whose |lse2| exceeds LSE_EXACT gets its exact row max M
  (in lse2's place) and log2 l from ``_row_stats``; this kernel always subtracts both, so P is
  exact to fp32 rounding at any magnitude (one extra FADD per score).
- Non-finite inputs (score.py [Note] hidden values): a pair this kernel does not keep still
  enters the three dots through its operand (0 * NaN = NaN): a NaN/inf q row, k/v key or dO
  row would reach gradients of pairs that never saw it. Plain calls hide nothing but the
  zero-filled tails (finite), so they spread exactly as the ``tl`` kernels (which run no
  exact pass without a mask or window). Causal calls do hide pairs: the launcher checks q,
  k, v, dout, lse and delta for non-finite values (NaN or +inf lse) and, if any, runs the
  ``tl`` kernels instead (one host sync per causal call; under CUDA-graph capture, where a
  sync is illegal, causal calls always take ``tl``). Finite inputs give finite p <= 1 on kept
  pairs and selects elsewhere: nothing non-finite arises.
"""

from triton._C.libtriton import ir
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, \
    warpgroup_mma_wait


@builtin
def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
    """dst[box at coord] += src (shared memory) by a bulk TMA reduce (cp.reduce.async.bulk.tensor
    .add, fp32 adds in L2): the op ``tl``'s descriptor atomic_add lowers to, which triton 3.6's
    Gluon builder has (create_async_tma_reduce) but its hopper ``tma`` module does not export.
    Issued by one thread of the partition and committed as a bulk group: ``tma.store_wait(0)``
    waits until src may be written again."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle)


@gluon.jit
def _bwd_loader(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, kv_ready, q_ready, q_empty, off_b,
                off_hk, n0, m_lo, n_m, group):
    """Producer warp: K and V once (kv_ready); then per (query head, row block) step Q_i and
    dO_i into ring slot it % STAGES once both consumers released it."""
    HALF_N: gl.constexpr = k_smem.shape[2]
    BLOCK_M: gl.constexpr = q_smem.shape[2]
    STAGES: gl.constexpr = q_smem.shape[0]
    mbarrier.expect(kv_ready, 2 * (k_desc.block_type.nbytes + v_desc.block_type.nbytes))
    for h in gl.static_range(2):
        tma.async_copy_global_to_shared(k_desc, [off_b, n0 + h * HALF_N, off_hk, 0], kv_ready, k_smem.index(h))
        tma.async_copy_global_to_shared(v_desc, [off_b, n0 + h * HALF_N, off_hk, 0], kv_ready, v_smem.index(h))
    it = 0
    for g in range(group):
        off_h = off_hk * group + g
        for i in range(n_m):
            slot = it % STAGES
            mbarrier.wait(q_empty.index(slot), ((it // STAGES) & 1) ^ 1)
            mbarrier.expect(q_ready.index(slot), q_desc.block_type.nbytes + do_desc.block_type.nbytes)
            m0 = m_lo + i * BLOCK_M
            tma.async_copy_global_to_shared(q_desc, [off_b, m0, off_h, 0], q_ready.index(slot), q_smem.index(slot))
            tma.async_copy_global_to_shared(do_desc, [off_b, m0, off_h, 0], q_ready.index(slot), do_smem.index(slot))
            it += 1


@gluon.jit
def _step(c: gl.constexpr, it, m0, off_b, off_h, k2, v2, k_smem, q_smem, do_smem, p_smem, ds_smem, dq_smem, dq_desc, q_ready, q_empty,
          ds_ready, dk, dv, offs_n, stats_blk, Stats, seqlen_k, right, qk_scale, masked):
    """One query row block (ring tile ``it``, rows [m0, m0 + BLOCK_M)) for consumer c's keys
    offs_n; returns (dk, dv). See the module docstring for the order of the six wgmmas."""
    BLOCK_M: gl.constexpr = q_smem.shape[2]
    HEAD_D: gl.constexpr = q_smem.shape[4]
    STAGES: gl.constexpr = q_smem.shape[0]
    HALF_N: gl.constexpr = k2.shape[0]
    HALF_D: gl.constexpr = HEAD_D // 2
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HALF_N, 16])
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HALF_D, 16])
    rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    slot = it % STAGES
    mbarrier.wait(q_ready.index(slot), (it // STAGES) & 1)
    q2 = q_smem.index(slot).reshape([BLOCK_M, HEAD_D])
    do2 = do_smem.index(slot).reshape([BLOCK_M, HEAD_D])
    zero_s = gl.zeros([BLOCK_M, HALF_N], gl.float32, s_layout)
    s = warpgroup_mma(q2, k2.permute((1, 0)), zero_s, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=[s])
    stats = Stats + stats_blk.to(gl.int64) * (3 * BLOCK_M) + rows  # padded: no mask
    lse2 = gl.load(stats)
    log_l = gl.load(stats + BLOCK_M)
    p = gl.exp2((s * qk_scale - lse2[:, None]) - log_l[:, None])
    # keep iff key n0c + j <= min(m + right, Sk - 1): one compare of the local column j per element
    # (steps past n_masked keep every pair: the bound is HALF_N there)
    cols = gl.arange(0, HALF_N, layout=gl.SliceLayout(0, s_layout))
    bound = gl.where(masked, gl.minimum(m0 + rows + right, seqlen_k - 1) - offs_n, HALF_N)
    p = gl.where(cols[None, :] <= bound[:, None], p, 0.0)
    p_c = p_smem.index(c)
    p_c.store(p.to(q2.dtype))
    fence_async_shared()
    dp = warpgroup_mma(do2, v2.permute((1, 0)), zero_s, use_acc=False, is_async=True)
    dv = warpgroup_mma(p_c.permute((1, 0)), do2, dv, is_async=True)
    dp = warpgroup_mma_wait(1, deps=[dp])  # in order: dp is done, dV may still run
    delta = gl.load(Stats + stats_blk.to(gl.int64) * (3 * BLOCK_M) + 2 * BLOCK_M + rows)
    ds = p * (dp - delta[:, None])  # p = 0 outside the keep rule; dp is finite there (module docstring)
    ds_slot = it % 2
    ds_c = ds_smem.index(2 * ds_slot + c)
    ds_c.store(ds.to(q2.dtype))
    fence_async_shared()
    mbarrier.arrive(ds_ready.index(ds_slot), count=1)
    dk = warpgroup_mma(ds_c.permute((1, 0)), q2, dk, is_async=True)
    mbarrier.wait(ds_ready.index(ds_slot), (it // 2) & 1)
    dq = warpgroup_mma(ds_smem.index(2 * ds_slot), k_smem.index(0).reshape([HALF_N, HEAD_D]).slice(c * HALF_D, HALF_D, 1),
                       gl.zeros([BLOCK_M, HALF_D], gl.float32, dq_layout), use_acc=False, is_async=True)
    dq = warpgroup_mma(ds_smem.index(2 * ds_slot + 1), k_smem.index(1).reshape([HALF_N, HEAD_D]).slice(c * HALF_D, HALF_D, 1),
                       dq, is_async=True)
    dv, dk, dq = warpgroup_mma_wait(0, deps=[dv, dk, dq])
    mbarrier.arrive(q_empty.index(slot), count=1)
    # dQ[:, half c] += dq through shared memory: the previous step's reduce must have read it
    tma.store_wait(0)
    dq_c = dq_smem.index(c)
    dq_c.reshape([BLOCK_M, HALF_D]).store(dq)
    fence_async_shared()
    _tma_reduce_add(dq_desc, [off_b, off_h, m0, c * HALF_D], dq_c)
    return dk, dv


@gluon.jit
def _bwd_consumer(c: gl.constexpr, k_smem, v_smem, q_smem, do_smem, p_smem, ds_smem, dq_smem, dq_desc, kv_ready, q_ready, q_empty,
                  ds_ready, DK, DV, Stats, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
                  off_b, off_hk, n0, m_lo, n_m, n_masked, group, num_heads, rows_pad, seqlen_k, right, scale, qk_scale):
    """Consumer warpgroup c (0 or 1): dK, dV of keys [n0 + 64 c, + 64) over every step, then
    stores them (dk times scale) with a row mask at Sk."""
    HALF_N: gl.constexpr = k_smem.shape[2]
    HEAD_D: gl.constexpr = k_smem.shape[4]
    BLOCK_M: gl.constexpr = q_smem.shape[2]
    kv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HEAD_D, 16])
    k2 = k_smem.index(c).reshape([HALF_N, HEAD_D])
    v2 = v_smem.index(c).reshape([HALF_N, HEAD_D])
    offs_n = n0 + c * HALF_N
    dk = gl.zeros([HALF_N, HEAD_D], gl.float32, kv_layout)
    dv = gl.zeros([HALF_N, HEAD_D], gl.float32, kv_layout)
    mbarrier.wait(kv_ready, 0)
    blocks = rows_pad // BLOCK_M  # Stats blocks per (batch, query head)
    for it in range(group * n_m):  # (query head g of the group, row block i), i fastest
        g = it // n_m
        i = it - g * n_m
        off_h = off_hk * group + g
        dk, dv = _step(c, it, m_lo + i * BLOCK_M, off_b, off_h, k2, v2, k_smem, q_smem, do_smem, p_smem, ds_smem,
                       dq_smem, dq_desc, q_ready, q_empty, ds_ready, dk, dv, offs_n,
                       (off_b * num_heads + off_h) * blocks + m_lo // BLOCK_M + i, Stats, seqlen_k, right, qk_scale,
                       i < n_masked)
    tma.store_wait(0)  # the last reduce has read dq_smem before the CTA exits
    rows = n0 + c * HALF_N + gl.arange(0, HALF_N, layout=gl.SliceLayout(1, kv_layout))
    cols = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, kv_layout))
    keep = (rows < seqlen_k)[:, None]
    b64 = off_b.to(gl.int64)
    r64 = rows.to(gl.int64)[:, None]
    gl.store(DK + b64 * stride_kb + off_hk * stride_kh + r64 * stride_kn + cols[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=keep)
    gl.store(DV + b64 * stride_vb + off_hk * stride_vh + r64 * stride_vn + cols[None, :], dv.to(DV.dtype.element_ty),
             mask=keep)


@gluon.jit(do_not_specialize=["seqlen_q", "seqlen_k"])
def bwd_kernel(q_desc, do_desc, k_desc, v_desc, dq_desc, DK, DV, Stats,
               stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
               num_heads, num_kv_heads, seqlen_q, seqlen_k, rows_pad, scale, qk_scale,
               STAGES: gl.constexpr, CAUSAL: gl.constexpr):
    """Grid (cdiv(Sk, 128) * B * Hkv,): key blocks fastest (a head's programs share its Q / dO in
    L2); num_warps=4 (the default consumer) + 4 + 1 worker warps. DK / DV strides are dk's / dv's
    (B, Sk, Hkv, D) strides; dq_desc: DQAcc (B, Hq, rows_pad, D) fp32, box (1, 1, BLOCK_M, D / 2);
    scale multiplies dk (dq: the launcher)."""
    HALF_N: gl.constexpr = k_desc.block_type.shape[1]
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = 2 * HALF_N
    num_n = gl.cdiv(seqlen_k, BLOCK_N)
    pid = gl.program_id(0)
    n0 = (pid % num_n) * BLOCK_N
    bh = pid // num_n
    off_b = bh // num_kv_heads
    off_hk = bh % num_kv_heads
    group = num_heads // num_kv_heads
    n_last = gl.minimum(n0 + BLOCK_N, seqlen_k) - 1
    num_m = gl.cdiv(seqlen_q, BLOCK_M)
    if CAUSAL:
        right = seqlen_k - seqlen_q
        m_lo = gl.maximum(n0 - right, 0) // BLOCK_M * BLOCK_M
        n_m = gl.maximum(num_m - m_lo // BLOCK_M, 0)
        n_masked = gl.minimum(gl.cdiv(gl.maximum(n_last - right - m_lo, 0), BLOCK_M), n_m)
    else:
        right = seqlen_k * 0 + 2**30
        m_lo = seqlen_k * 0
        n_m = num_m
        n_masked = num_m * 0
    if n0 + BLOCK_N > seqlen_k:  # keys past Sk are zero-filled: their p must be zeroed
        n_masked = n_m

    k_smem = gl.allocate_shared_memory(k_desc.dtype, [2] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [2] + v_desc.block_type.shape, v_desc.layout)
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(do_desc.dtype, [STAGES] + do_desc.block_type.shape, do_desc.layout)
    pds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HALF_N], q_desc.dtype)
    p_smem = gl.allocate_shared_memory(q_desc.dtype, [2, BLOCK_M, HALF_N], pds_layout)  # (consumer)
    ds_smem = gl.allocate_shared_memory(q_desc.dtype, [4, BLOCK_M, HALF_N], pds_layout)  # (2 * slot + consumer)
    dq_smem = gl.allocate_shared_memory(dq_desc.dtype, [2] + dq_desc.block_type.shape, dq_desc.layout)  # (consumer)
    kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_ready, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=2)  # one arrive per consumer warpgroup
    for i in gl.static_range(2):
        mbarrier.init(ds_ready.index(i), count=2)

    shared = (k_smem, v_smem, q_smem, do_smem, p_smem, ds_smem, dq_smem, dq_desc, kv_ready, q_ready, q_empty, ds_ready, DK,
              DV, Stats, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, off_b, off_hk, n0,
              m_lo, n_m, n_masked, group, num_heads, rows_pad, seqlen_k, right, scale, qk_scale)
    gl.warp_specialize([
        (_bwd_consumer, (0,) + shared),
        (_bwd_consumer, (1,) + shared),
        (_bwd_loader, (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, kv_ready, q_ready, q_empty,
                       off_b, off_hk, n0, m_lo, n_m, group)),
    ], [4, 1], [240, 24])
