"""FA3-design forward for Hopper (sm_90) in Gluon: TMA producer warp, two consumer warpgroups.

Glossary (names fixed across tileattn kernels):
    BLOCK_M      query rows per CTA (128); each consumer warpgroup owns HALF_M = 64 of them
    BLOCK_N      keys per K/V tile (128); STAGES tiles of K and of V live in shared memory
    m_i, l_i     running row max (base 2, scaled) and row sum of exp2 of the online softmax
    acc          fp32 output accumulator (HALF_M, HEAD_D) of one consumer, in wgmma registers
    qk_scale     scale * log2(e): exp2(s * qk_scale - m_i) == exp(scale * s - m_i * ln 2)
    diag         Sk - Sq: causal row i keeps keys j <= i + diag (bottom-right aligned)
    n_full       tiles [0, n_full) are kept entirely by every row of the CTA; tiles
                 [n_full, n_tiles) hold the diagonal or the ragged last keys and are masked

Layout: q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), out (B, Sq, Hq, D) with unit last stride and
16-byte aligned strides, read and written through 4-D TMA descriptors with a (1, rows, 1, D)
box: TMA zero-fills rows past Sq / Sk and clips the output store at Sq. lse (B, Hq, Sq) fp32,
natural log. Query head h reads kv head h // group.

One CTA per (BLOCK_M query rows, batch, query head), three partitions (``gl.warp_specialize``):

    loader    (1 warp, 24 regs)   Q once, then K_j and V_j into ring slot j % STAGES after
                                  the slot's empty barrier; each tile completes a ready barrier
    consumer0 (4 warps, default)  rows [m0, m0 + 64)
    consumer1 (4 warps, 240 regs) rows [m0 + 64, m0 + 128)

Each consumer runs the FA3 intra-warpgroup pipeline: QK^T of tile j (async wgmma, Q and K from
shared memory) is issued before P_{j-1} V_{j-1} (async wgmma, P from registers); the wait for
QK_j leaves PV_{j-1} running under softmax(j). A consumer releases K_j after QK_j and V_j after
PV_j (empty barriers count both consumers). The two warpgroups share no barrier besides the
ring, so one's softmax runs while the other's wgmma holds the tensor cores.

Causal CTAs start longest-first (the last row blocks get the lowest program ids). Empty rows
(Sq > Sk causal) end with out 0 and lse -inf, as the ``tl`` kernel's [Note] empty rows.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, \
    warpgroup_mma_wait

LN2: gl.constexpr = gl.constexpr(0.6931471805599453)


@gluon.jit
def _loader(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
            off_b, off_h, off_hk, m0, n_tiles):
    """Producer warp: both Q halves on q_bar, then K_j / V_j into slot j % STAGES once both
    consumers released the slot (a fresh barrier passes the parity-1 wait)."""
    HALF_M: gl.constexpr = q_smem.shape[2]
    BLOCK_N: gl.constexpr = k_smem.shape[2]
    STAGES: gl.constexpr = k_smem.shape[0]
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [off_b, m0, off_h, 0], q_bar, q_smem.index(0))
    tma.async_copy_global_to_shared(q_desc, [off_b, m0 + HALF_M, off_h, 0], q_bar, q_smem.index(1))
    for j in range(n_tiles):
        slot = j % STAGES
        phase = (j // STAGES) & 1
        mbarrier.wait(k_empty.index(slot), phase ^ 1)
        mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [off_b, j * BLOCK_N, off_hk, 0], k_ready.index(slot),
                                        k_smem.index(slot))
        mbarrier.wait(v_empty.index(slot), phase ^ 1)
        mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [off_b, j * BLOCK_N, off_hk, 0], v_ready.index(slot),
                                        v_smem.index(slot))


@gluon.jit
def _tile_2d(smem4, ROWS: gl.constexpr, HEAD_D: gl.constexpr):
    """(ROWS, HEAD_D) view of a (1, ROWS, 1, HEAD_D) TMA box (same bytes, same swizzle)."""
    return smem4.reshape([ROWS, HEAD_D])


@gluon.jit
def _softmax(s, m_i, l_i, offs_m, start_n, seqlen_k, right, qk_scale, MASKED: gl.constexpr):
    """One online-softmax step on raw scores s (HALF_M, BLOCK_N) fp32 (scale > 0, so the row max
    of raw scores orders as the scaled ones). MASKED: keep keys j < seqlen_k with j <= i + right
    (right = diag when causal, 2^30 otherwise), and guard rows whose max is still -inf
    (subtract 0: p = 0, no inf - inf). Returns (p, alpha, m_new, l_new)."""
    if MASKED:
        BLOCK_N: gl.constexpr = s.shape[1]
        offs_n = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s.type.layout))
        keep = (offs_n < seqlen_k)[None, :] & (offs_n[None, :] <= (offs_m + right)[:, None])
        s = gl.where(keep, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    if MASKED:
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = gl.exp2(s * qk_scale - m_use[:, None])
    alpha = gl.exp2(m_i - m_use)
    l_new = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_new


@gluon.jit
def _step(j, q2, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, p_prev, acc, m_i, l_i, offs_m, seqlen_k, right,
          qk_scale, s_layout: gl.constexpr, p_layout: gl.constexpr, HALF_M: gl.constexpr, BLOCK_N: gl.constexpr,
          HEAD_D: gl.constexpr, STAGES: gl.constexpr, MASKED: gl.constexpr):
    """Tile j >= 1: issue QK_j, issue P_{j-1} V_{j-1}, wait QK_j (PV stays in flight), release
    K_j, softmax(j), wait PV, release V_{j-1}, rescale acc. Returns (p_j, acc, m_i, l_i)."""
    slot = j % STAGES
    mbarrier.wait(k_ready.index(slot), (j // STAGES) & 1)
    k2 = _tile_2d(k_smem.index(slot), BLOCK_N, HEAD_D)
    s = warpgroup_mma(q2, k2.permute((1, 0)), gl.zeros([HALF_M, BLOCK_N], gl.float32, s_layout), use_acc=False,
                      is_async=True)
    prev = (j - 1) % STAGES
    mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
    v2 = _tile_2d(v_smem.index(prev), BLOCK_N, HEAD_D)
    acc = warpgroup_mma(p_prev, v2, acc, is_async=True)
    s = warpgroup_mma_wait(1, deps=[s])
    mbarrier.arrive(k_empty.index(slot), count=1)
    p, alpha, m_i, l_i = _softmax(s, m_i, l_i, offs_m, j * BLOCK_N, seqlen_k, right, qk_scale, MASKED)
    acc, p_prev = warpgroup_mma_wait(0, deps=[acc, p_prev])
    mbarrier.arrive(v_empty.index(prev), count=1)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout))[:, None]
    return gl.convert_layout(p.to(q2.dtype), p_layout), acc, m_i, l_i


@gluon.jit
def _consumer(q_half, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, o_desc, lse_base,
              off_b, off_h, row0, seqlen_q, seqlen_k, right, n_full, n_tiles, qk_scale):
    """One warpgroup: rows [row0, row0 + HALF_M) against tiles [0, n_tiles); writes out and lse.
    Sizes come from the shared-memory shapes (partition arguments carry no constexprs in 3.6)."""
    HALF_M: gl.constexpr = q_half.shape[1]
    HEAD_D: gl.constexpr = q_half.shape[3]
    BLOCK_N: gl.constexpr = k_smem.shape[2]
    STAGES: gl.constexpr = k_smem.shape[0]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)

    offs_m = row0 + gl.arange(0, HALF_M, layout=row_layout)
    m_i = gl.full([HALF_M], float("-inf"), gl.float32, row_layout)
    l_i = gl.zeros([HALF_M], gl.float32, row_layout)
    acc = gl.zeros([HALF_M, HEAD_D], gl.float32, o_layout)
    q2 = _tile_2d(q_half, HALF_M, HEAD_D)
    mbarrier.wait(q_bar, 0)

    if n_tiles > 0:
        # tile 0 (always masked: it may be the diagonal or ragged tile, and it starts m_i)
        mbarrier.wait(k_ready.index(0), 0)
        k2 = _tile_2d(k_smem.index(0), BLOCK_N, HEAD_D)
        s = warpgroup_mma(q2, k2.permute((1, 0)), gl.zeros([HALF_M, BLOCK_N], gl.float32, s_layout), use_acc=False,
                          is_async=True)
        s = warpgroup_mma_wait(0, deps=[s])
        mbarrier.arrive(k_empty.index(0), count=1)
        p, alpha, m_i, l_i = _softmax(s, m_i, l_i, offs_m, 0, seqlen_k, right, qk_scale, True)
        p = gl.convert_layout(p.to(q2.dtype), p_layout)
        for j in range(1, n_full):
            p, acc, m_i, l_i = _step(j, q2, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, p, acc, m_i, l_i,
                                     offs_m, seqlen_k, right, qk_scale, s_layout, p_layout, HALF_M, BLOCK_N, HEAD_D,
                                     STAGES, False)
        for j in range(gl.maximum(n_full, 1), n_tiles):
            p, acc, m_i, l_i = _step(j, q2, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, p, acc, m_i, l_i,
                                     offs_m, seqlen_k, right, qk_scale, s_layout, p_layout, HALF_M, BLOCK_N, HEAD_D,
                                     STAGES, True)
        last = (n_tiles - 1) % STAGES
        mbarrier.wait(v_ready.index(last), ((n_tiles - 1) // STAGES) & 1)
        v2 = _tile_2d(v_smem.index(last), BLOCK_N, HEAD_D)
        acc = warpgroup_mma(p, v2, acc, is_async=True)
        acc, p = warpgroup_mma_wait(0, deps=[acc, p])
        mbarrier.arrive(v_empty.index(last), count=1)

    # epilogue: out = acc / l_i (empty rows: 0), lse = (m_i + log2 l_i) ln 2 (empty rows: -inf)
    empty = l_i == 0.0
    l_safe = gl.where(empty, 1.0, l_i)
    lse = gl.where(empty, float("-inf"), (m_i + gl.log2(l_safe)) * LN2)
    inv_l = gl.convert_layout(1.0 / l_safe, gl.SliceLayout(1, o_layout))
    out = (acc * inv_l[:, None]).to(q2.dtype)
    gl.store(lse_base + offs_m, lse, mask=offs_m < seqlen_q)
    q2.store(out)  # Q's slot is free: every wgmma reading it has completed
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [off_b, row0, off_h, 0], q_half)
    tma.store_wait(0)


@gluon.jit
def _consumer_worker(q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, o_desc, lse_base,
                     off_b, off_h, m0, seqlen_q, seqlen_k, right, n_full, n_tiles, qk_scale):
    """Second consumer warpgroup: the upper HALF_M rows."""
    _consumer(q_smem.index(1), k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, o_desc, lse_base,
              off_b, off_h, m0 + q_smem.shape[2], seqlen_q, seqlen_k, right, n_full, n_tiles, qk_scale)


@gluon.jit
def _consumer_default(q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, o_desc, lse_base,
                      off_b, off_h, m0, seqlen_q, seqlen_k, right, n_full, n_tiles, qk_scale):
    """First consumer warpgroup (the default partition): the lower HALF_M rows."""
    _consumer(q_smem.index(0), k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, o_desc, lse_base,
              off_b, off_h, m0, seqlen_q, seqlen_k, right, n_full, n_tiles, qk_scale)


@gluon.jit(do_not_specialize=["seqlen_q", "seqlen_k"])
def fwd_kernel(q_desc, k_desc, v_desc, o_desc, Lse, stride_lb, stride_lh, num_heads, group, seqlen_q, seqlen_k,
               qk_scale, HEAD_D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr):
    """Grid (cdiv(Sq, BLOCK_M) * B * Hq,), num_warps=4 (the default consumer) + 4 + 1 worker warps."""
    HALF_M: gl.constexpr = q_desc.block_type.shape[1]

    BLOCK_M: gl.constexpr = 2 * HALF_M
    pid = gl.program_id(0)
    num_m = gl.cdiv(seqlen_q, BLOCK_M)
    off_bh = pid // num_m
    m_blk = pid % num_m
    if CAUSAL:
        m_blk = num_m - 1 - m_blk  # longest rows first
    off_b = off_bh // num_heads
    off_h = off_bh % num_heads
    off_hk = off_h // group
    m0 = m_blk * BLOCK_M

    # key tiles: [0, n_tiles) hold every kept key of rows [m0, m0 + BLOCK_M); [0, n_full) are kept
    # by every row (no diagonal, no ragged end)
    hi = seqlen_k
    full_end = seqlen_k // BLOCK_N * BLOCK_N
    right = seqlen_k * 0 + 2**30  # row i keeps keys j <= i + right
    if CAUSAL:
        right = seqlen_k - seqlen_q
        hi = gl.minimum(hi, gl.maximum(gl.minimum(m0 + BLOCK_M, seqlen_q) + right, 0))
        full_end = gl.minimum(full_end, gl.maximum(m0 + right + 1, 0))
    n_tiles = gl.cdiv(hi, BLOCK_N)
    n_full = gl.minimum(full_end // BLOCK_N, n_tiles)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # one arrive per consumer warpgroup
        mbarrier.init(v_empty.index(i), count=2)

    lse_base = Lse + off_b.to(gl.int64) * stride_lb + off_h.to(gl.int64) * stride_lh
    consumer_args = (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, o_desc, lse_base,
                     off_b, off_h, m0, seqlen_q, seqlen_k, right, n_full, n_tiles, qk_scale)
    gl.warp_specialize([
        (_consumer_default, consumer_args),
        (_consumer_worker, consumer_args),
        (_loader, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
                   off_b, off_h, off_hk, m0, n_tiles)),
    ], [4, 1], [240, 24])
