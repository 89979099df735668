"""FA3-design forward for Hopper (sm_90) in Gluon: TMA producer warp, two consumer warpgroups.

Glossary (names fixed across tileattn kernels):
    BLOCK_M      query rows per work item (128); each consumer warpgroup owns HALF_M = 64 of them
    BLOCK_N      keys per K/V tile (128); STAGES tiles of K and of V live in shared memory
    m_i, l_i     running row max (base 2, scaled) and row sum of exp2 of the online softmax
    acc          fp32 output accumulator (HALF_M, HEAD_D) of one consumer, in wgmma registers
    qk_scale     scale * log2(e): exp2(s * qk_scale - m_i) == exp(scale * s - m_i * ln 2)
    right        row i keeps keys j <= i + right: Sk - Sq when causal (bottom-right aligned),
                 2^30 otherwise
    n_full       tiles [0, n_full) are kept entirely by every row of the item; tiles
                 [n_full, n_tiles) hold the diagonal or the ragged last keys and are masked

Layout: q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), out (B, Sq, Hq, D) with unit last stride and
16-byte aligned strides, read and written through 4-D TMA descriptors with a (1, rows, 1, D)
box: TMA zero-fills rows past Sq / Sk and clips the output store at Sq. lse (B, Hq, Sq) fp32,
natural log. Query head h reads kv head h // group.

Program p walks work items p, p + grid, ... of (BLOCK_M query rows, batch, query head): one CTA
per SM for plain calls (persistent), one CTA per item for causal ones (launch.py says why), with
three partitions (``gl.warp_specialize``):

    loader    (1 warp, 24 regs)   per item: Q once both consumers released it, then K_j and
                                  V_j into ring slot it % STAGES after the slot's empty barrier
    consumer  (4 warps, default)  rows [m0, m0 + 64) of each item
    consumer  (4 warps, 240 regs) rows [m0 + 64, m0 + 128)

The ring and its phases run on across items, so the loader fetches the next item's Q and K/V
while the consumers finish the last PV and write out (each through its own shared slot and a
TMA store waited for only before the slot's next use).

Each consumer runs the FA3 intra-warpgroup pipeline: QK^T of tile j (async wgmma, Q and K from
shared memory) is issued before P_{j-1} V_{j-1} (async wgmma, P from registers); the wait for
QK_j leaves PV_{j-1} running under softmax(j). A consumer releases K_j after QK_j and V_j after
PV_j (empty barriers count both consumers). The two warpgroups share no barrier besides the
ring, so one's softmax runs while the other's wgmma holds the tensor cores.

Causal items run longest first (the last row blocks get the lowest item ids). Empty rows
(Sq > Sk causal) end with out 0 and lse -inf, as the ``tl`` kernel's [Note] empty rows.

[Note] hidden values (Gluon): a causal call's diagonal tile holds keys some rows do not keep;
their p is 0, but 0 * NaN = NaN inside P @ V, so a non-finite value there would reach those
rows (the ``tl`` kernels' score.py [Note] hidden values). Causal calls write a per-row flag
(int8, laid out as lse) that says the row's out ended non-finite; the launcher then runs the
``tl`` forward on the flagged row blocks only, whose exact pass contains it. Plain calls hide
no key (keys past Sk are zero-filled) and write no flags.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, \
    warpgroup_mma_wait

LN2: gl.constexpr = gl.constexpr(0.6931471805599453)


@gluon.jit
def _work(t, num_m, num_heads, group, seqlen_q, seqlen_k, causal, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """Work item t of the persistent loop: (off_b, off_h, off_hk, m0, right, n_full, n_tiles).
    Row blocks run fastest (CTAs at work together share one head's K/V in L2); causal items go
    longest first (last row block first). Key tiles [0, n_tiles) hold every kept key of rows
    [m0, m0 + BLOCK_M); [0, n_full) are kept by every row (no diagonal, no ragged end); row i
    keeps keys j <= i + right (right = Sk - Sq causal, 2^30 otherwise)."""
    off_bh = t // num_m
    m_blk = t % num_m
    off_b = off_bh // num_heads
    off_h = off_bh % num_heads
    hi = seqlen_k
    full_end = seqlen_k // BLOCK_N * BLOCK_N
    right = seqlen_k * 0 + 2**30
    if causal:
        m_blk = num_m - 1 - m_blk
        right = seqlen_k - seqlen_q
        hi = gl.minimum(hi, gl.maximum(gl.minimum(m_blk * BLOCK_M + BLOCK_M, seqlen_q) + right, 0))
        full_end = gl.minimum(full_end, gl.maximum(m_blk * BLOCK_M + right + 1, 0))
    n_tiles = gl.cdiv(hi, BLOCK_N)
    return off_b, off_h, off_h // group, m_blk * BLOCK_M, right, gl.minimum(full_end // BLOCK_N, n_tiles), n_tiles


@gluon.jit
def _loader(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty,
            num_m, n_work, num_heads, group, seqlen_q, seqlen_k, causal):
    """Producer warp. Per work item: both Q halves on q_ready once both consumers released Q
    (q_empty), then K_j / V_j into ring slot it % STAGES once both consumers released the slot
    (``it`` counts tiles over all items; a fresh barrier passes the parity-1 wait)."""
    HALF_M: gl.constexpr = q_smem.shape[2]
    BLOCK_N: gl.constexpr = k_smem.shape[2]
    STAGES: gl.constexpr = k_smem.shape[0]
    it = 0
    w = 0
    for t in range(gl.program_id(0), n_work, gl.num_programs(0)):
        off_b, off_h, off_hk, m0, right, n_full, n_tiles = _work(t, num_m, num_heads, group, seqlen_q, seqlen_k,
                                                                  causal, 2 * HALF_M, BLOCK_N)
        mbarrier.wait(q_empty, (w & 1) ^ 1)
        mbarrier.expect(q_ready, 2 * q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [off_b, m0, off_h, 0], q_ready, q_smem.index(0))
        tma.async_copy_global_to_shared(q_desc, [off_b, m0 + HALF_M, off_h, 0], q_ready, q_smem.index(1))
        for j in range(n_tiles):
            slot = it % STAGES
            phase = (it // STAGES) & 1
            mbarrier.wait(k_empty.index(slot), phase ^ 1)
            mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [off_b, j * BLOCK_N, off_hk, 0], k_ready.index(slot),
                                            k_smem.index(slot))
            mbarrier.wait(v_empty.index(slot), phase ^ 1)
            mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [off_b, j * BLOCK_N, off_hk, 0], v_ready.index(slot),
                                            v_smem.index(slot))
            it += 1
        w += 1


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
def _step(j, it, q2, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, p_prev, acc, m_i, l_i, offs_m, seqlen_k, right,
          qk_scale, s_layout: gl.constexpr, p_layout: gl.constexpr, HALF_M: gl.constexpr, BLOCK_N: gl.constexpr,
          HEAD_D: gl.constexpr, STAGES: gl.constexpr, MASKED: gl.constexpr):
    """Tile j >= 1 of this item (ring tile ``it``): issue QK_j, issue P_{j-1} V_{j-1}, wait QK_j
    (PV stays in flight), release K_j, softmax(j), wait PV, release V_{j-1}, rescale acc.
    Returns (p_j, acc, m_i, l_i)."""
    slot = it % STAGES
    mbarrier.wait(k_ready.index(slot), (it // STAGES) & 1)
    k2 = _tile_2d(k_smem.index(slot), BLOCK_N, HEAD_D)
    s = warpgroup_mma(q2, k2.permute((1, 0)), gl.zeros([HALF_M, BLOCK_N], gl.float32, s_layout), use_acc=False,
                      is_async=True)
    prev = (it - 1) % STAGES
    mbarrier.wait(v_ready.index(prev), ((it - 1) // STAGES) & 1)
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
def _consumer(half, q_smem, o_smem, k_smem, v_smem, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty, o_desc, Lse,
              Flags, stride_lb, stride_lh, num_m, n_work, num_heads, group, seqlen_q, seqlen_k, causal, qk_scale):
    """Consumer warpgroup ``half`` (0 or 1): rows [m0 + half * HALF_M, + HALF_M) of each work
    item against its tiles; writes lse (and, causal, the rows' non-finite flags: [Note] hidden
    values), and out through its own shared slot and a TMA store that is waited for only
    before the slot's next use. Sizes come from the shared-memory shapes (partition arguments
    carry no constexprs in 3.6)."""
    HALF_M: gl.constexpr = q_smem.shape[2]
    HEAD_D: gl.constexpr = q_smem.shape[4]
    BLOCK_N: gl.constexpr = k_smem.shape[2]
    STAGES: gl.constexpr = k_smem.shape[0]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    q_half = q_smem.index(half)
    o_half = o_smem.index(half)
    q2 = _tile_2d(q_half, HALF_M, HEAD_D)
    o2 = _tile_2d(o_half, HALF_M, HEAD_D)

    it = 0
    w = 0
    for t in range(gl.program_id(0), n_work, gl.num_programs(0)):
        off_b, off_h, off_hk, m0, right, n_full, n_tiles = _work(t, num_m, num_heads, group, seqlen_q, seqlen_k,
                                                                  causal, 2 * HALF_M, BLOCK_N)
        row0 = m0 + half * HALF_M
        offs_m = row0 + gl.arange(0, HALF_M, layout=row_layout)
        m_i = gl.full([HALF_M], float("-inf"), gl.float32, row_layout)
        l_i = gl.zeros([HALF_M], gl.float32, row_layout)
        acc = gl.zeros([HALF_M, HEAD_D], gl.float32, o_layout)
        mbarrier.wait(q_ready, w & 1)
        if n_tiles > 0:
            # tile 0 (always masked: it may be the diagonal or ragged tile, and it starts m_i)
            slot = it % STAGES
            mbarrier.wait(k_ready.index(slot), (it // STAGES) & 1)
            k2 = _tile_2d(k_smem.index(slot), BLOCK_N, HEAD_D)
            s = warpgroup_mma(q2, k2.permute((1, 0)), gl.zeros([HALF_M, BLOCK_N], gl.float32, s_layout),
                              use_acc=False, is_async=True)
            s = warpgroup_mma_wait(0, deps=[s])
            mbarrier.arrive(k_empty.index(slot), count=1)
            p, alpha, m_i, l_i = _softmax(s, m_i, l_i, offs_m, 0, seqlen_k, right, qk_scale, True)
            p = gl.convert_layout(p.to(q2.dtype), p_layout)
            for j in range(1, n_full):
                p, acc, m_i, l_i = _step(j, it + j, q2, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, p, acc,
                                         m_i, l_i, offs_m, seqlen_k, right, qk_scale, s_layout, p_layout, HALF_M,
                                         BLOCK_N, HEAD_D, STAGES, False)
            for j in range(gl.maximum(n_full, 1), n_tiles):
                p, acc, m_i, l_i = _step(j, it + j, q2, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, p, acc,
                                         m_i, l_i, offs_m, seqlen_k, right, qk_scale, s_layout, p_layout, HALF_M,
                                         BLOCK_N, HEAD_D, STAGES, True)
            mbarrier.arrive(q_empty, count=1)  # the last QK has completed: the loader may refill Q
            it += n_tiles
            last = (it - 1) % STAGES
            mbarrier.wait(v_ready.index(last), ((it - 1) // STAGES) & 1)
            v2 = _tile_2d(v_smem.index(last), BLOCK_N, HEAD_D)
            acc = warpgroup_mma(p, v2, acc, is_async=True)
            acc, p = warpgroup_mma_wait(0, deps=[acc, p])
            mbarrier.arrive(v_empty.index(last), count=1)
        else:
            mbarrier.arrive(q_empty, count=1)

        # epilogue: out = acc / l_i (empty rows: 0), lse = (m_i + log2 l_i) ln 2 (empty rows: -inf)
        empty = l_i == 0.0
        l_safe = gl.where(empty, 1.0, l_i)
        lse = gl.where(empty, float("-inf"), (m_i + gl.log2(l_safe)) * LN2)
        inv_l = gl.convert_layout(1.0 / l_safe, gl.SliceLayout(1, o_layout))
        out = (acc * inv_l[:, None]).to(q2.dtype)
        row_off = off_b.to(gl.int64) * stride_lb + off_h.to(gl.int64) * stride_lh
        gl.store(Lse + row_off + offs_m, lse, mask=offs_m < seqlen_q)
        # [Note] hidden values; a masked store, not an `if causal:` (that branch fails to lower in 3.6)
        bad = gl.max(gl.where((acc != acc) | (gl.abs(acc) == float("inf")), 1, 0), 1)
        gl.store(Flags + row_off + offs_m, gl.convert_layout(bad, row_layout).to(gl.int8),
                 mask=(offs_m < seqlen_q) & (causal != 0))
        tma.store_wait(0)  # the previous item's out has left o_half
        o2.store(out)
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [off_b, row0, off_h, 0], o_half)
        w += 1
    tma.store_wait(0)


@gluon.jit(do_not_specialize=["seqlen_q", "seqlen_k"])
def fwd_kernel(q_desc, k_desc, v_desc, o_desc, Lse, Flags, stride_lb, stride_lh, num_heads, group, seqlen_q,
               seqlen_k, qk_scale, n_work, HEAD_D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
               CAUSAL: gl.constexpr):
    """Grid (min(n_work, SMs),) or (n_work,), n_work = cdiv(Sq, BLOCK_M) * B * Hq; num_warps=4 (the
    default consumer) + 4 + 1 worker warps. Program p takes work items p, p + grid, ...
    Flags: int8 laid out as Lse, written when CAUSAL ([Note] hidden values); never written (any
    pointer) otherwise."""
    HALF_M: gl.constexpr = q_desc.block_type.shape[1]
    num_m = gl.cdiv(seqlen_q, 2 * HALF_M)
    causal = seqlen_q * 0 + CAUSAL  # partitions take no constexprs (3.6): a uniform runtime flag

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    o_smem = gl.allocate_shared_memory(o_desc.dtype, [2] + o_desc.block_type.shape, o_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_ready, count=1)
    mbarrier.init(q_empty, count=2)  # one arrive per consumer warpgroup
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)
        mbarrier.init(v_empty.index(i), count=2)

    shared = (q_smem, o_smem, k_smem, v_smem, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty, o_desc, Lse,
              Flags, stride_lb, stride_lh, num_m, n_work, num_heads, group, seqlen_q, seqlen_k, causal, qk_scale)
    gl.warp_specialize([
        (_consumer, (seqlen_q * 0,) + shared),
        (_consumer, (seqlen_q * 0 + 1,) + shared),
        (_loader, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, v_ready, k_empty,
                   v_empty, num_m, n_work, num_heads, group, seqlen_q, seqlen_k, causal)),
    ], [4, 1], [240, 24])
