"""The jax-triton kernels of the two-stream gated delta rule's noisy views, launched by
`two_stream_triton` (whose docstring gives the schedule, the walks and the backward's steps).

Forward: `noisy_kernel` (with STORE_ROWS it also stores the window rows the backward reads).
Backward: `noisy_dvn_kernel` (the intra-block output terms' cotangent of V'),
`noisy_seed_rows_kernel` and `noisy_seed_ctx_kernel` (the seed products' backward) and
`noisy_bwd_kernel` (the reverse walk over each window's row tiles). The rest are their shared
`triton.jit` helpers. Defined only where triton imports (the GPU machine, or a CPU test with
Triton's interpreter); elsewhere `triton` is None and the module holds no kernels.
"""
from pallas_kernels.gated_delta_rule import triton as gdr_triton

try:  # Only the GPU machine (or a CPU test with Triton's interpreter) has triton.
  import triton  # pylint: disable=g-import-not-at-top
  import triton.language as tl  # pylint: disable=g-import-not-at-top
except ImportError:  # pragma: no cover
  triton = None

if triton is not None:
  # Row tiles up to this size have the lean walks (`two_stream_triton`'s docstring); 32-row
  # tiles keep one walk with the banded terms, as the second copy of the loop raised their spills
  # (ptxas, sm_90a, block 32: WY pass 2.7 -> 26 KB per thread at 32 registers, forward 1.0 ->
  # 1.5 KB).
  LEAN_WALK_MAX_TILE = tl.constexpr(16)

  @triton.jit
  def _round_to_bf16(x):
    """fp32 x rounded to the nearest bf16 (ties to even), kept in fp32."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)

  @triton.jit
  def _mm(a, b, PREC: tl.constexpr):
    """fp32 a @ b: PREC 'bf16' rounds both operands to bf16 (fp32 accumulation); 'bf16_emulated'
    the same in fp32 arithmetic (Triton 3.6's interpreter multiplies bf16 tensors wrongly); else
    tl.dot's input_precision ('tf32', 'tf32x3')."""
    if PREC == 'bf16':
      return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif PREC == 'bf16_emulated':
      return tl.dot(_round_to_bf16(a), _round_to_bf16(b), input_precision='ieee')
    else:
      return tl.dot(a, b, input_precision=PREC)

  @triton.jit
  def _program_ids(NV: tl.constexpr, HQ: tl.constexpr, HV: tl.constexpr, VDP: tl.constexpr,
                   BV: tl.constexpr):
    """This program's (batch, value head, view, V tile) from program_id(1), its key head and its
    V columns."""
    pid = tl.program_id(1)
    NVT: tl.constexpr = VDP // BV
    i_e = pid % NVT
    i_u = (pid // NVT) % NV
    i_h = (pid // (NVT * NV)) % HV
    i_b = pid // (NVT * NV * HV)
    return i_b, i_h, i_u, i_e, i_h // (HV // HQ), i_e * BV + tl.arange(0, BV)

  @triton.jit
  def _window_context(kc, vc, gc, h, n, NV: tl.constexpr, HQ: tl.constexpr, HV: tl.constexpr,
                      N: tl.constexpr, K: tl.constexpr, VDP: tl.constexpr, BV: tl.constexpr,
                      C: tl.constexpr, CTX_BF16: tl.constexpr = False):
    """`_program_ids`, and clean chunk n's context: k [C, K], v' [C, BV], G [C], h_n [K, BV]
    (fp32; with CTX_BF16 k, v' and h_n rounded to bf16, as bf16 products would round them)."""
    i_b, i_h, i_u, i_e, kh, o_v = _program_ids(NV, HQ, HV, VDP, BV)
    o_k = tl.arange(0, K)
    ctok = (i_b * N * C + n * C + tl.arange(0, C)).to(tl.int64)
    k_ctx = tl.load(kc + (ctok * HQ + kh)[:, None] * K + o_k[None, :]).to(tl.float32)
    v_ctx = tl.load(vc + (ctok * HV + i_h)[:, None] * VDP + o_v[None, :])
    g_ctx = tl.load(gc + ctok * HV + i_h)
    h_n = tl.load(h + (((i_b * N + n) * HV + i_h).to(tl.int64) * K + o_k)[:, None] * VDP
                  + o_v[None, :])
    if CTX_BF16:
      k_ctx, v_ctx, h_n = k_ctx.to(tl.bfloat16), v_ctx.to(tl.bfloat16), h_n.to(tl.bfloat16)
    return i_b, i_h, i_u, i_e, kh, o_v, k_ctx, v_ctx, g_ctx, h_n

  @triton.jit
  def _slot_rows(q, k, v, g, beta, bsl, seed, lo, carry, slot, base, mbase, kh, i_h, o_v,
                 HQ: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, VDP: tl.constexpr,
                 ROWS: tl.constexpr):
    """Noisy inputs and metadata of the slots `slot` [R] of this view (tokens from `base`,
    metadata from `mbase`): q, k [R, K], v [R, BV], g, beta, block start, seed, lo, carry [R].
    ROWS > 0: the noisy inputs hold only slots [0, ROWS) per view, later slots read as zeros
    (what padding them would give); ROWS = 0: they are padded to every slot read."""
    tok = base + slot
    p_qk = (tok * HQ + kh)[:, None] * K + tl.arange(0, K)[None, :]
    p_v = (tok * HV + i_h)[:, None] * VDP + o_v[None, :]
    p_gb = tok * HV + i_h
    mslot = (mbase + slot).to(tl.int64)
    if ROWS > 0:
      m = slot < ROWS
      b_q = tl.load(q + p_qk, mask=m[:, None], other=0.0)
      b_k = tl.load(k + p_qk, mask=m[:, None], other=0.0)
      b_v = tl.load(v + p_v, mask=m[:, None], other=0.0)
      b_g = tl.load(g + p_gb, mask=m, other=0.0)
      b_beta = tl.load(beta + p_gb, mask=m, other=0.0)
    else:
      b_q, b_k, b_v = tl.load(q + p_qk), tl.load(k + p_qk), tl.load(v + p_v)
      b_g, b_beta = tl.load(g + p_gb), tl.load(beta + p_gb)
    return (b_q.to(tl.float32), b_k.to(tl.float32), b_v.to(tl.float32), b_g, b_beta,
            tl.load(bsl + mslot), tl.load(seed + mslot), tl.load(lo + mslot),
            tl.load(carry + mslot))

  @triton.jit
  def _decay(x_r, x_c, mask):
    """[R, R'] e^{x_r - x_c} where mask, else 0. The exponent is masked, not the result:
    e^{positive} outside the mask (across blocks) could overflow."""
    return tl.exp(tl.where(mask, x_r[:, None] - x_c[None, :], float('-inf')))

  @triton.jit
  def _block_masks(b_bs, row, col):
    """[S, S] masks of a row tile's in-block pairs (block starts b_bs [S]; row, col: the tile's
    [S, 1] and [1, S] indices) within one block: causal (col <= row) and strict (col < row)."""
    same = b_bs[:, None] == b_bs[None, :]
    return same & (col <= row), same & (col < row)

  @triton.jit
  def _seed_terms(ipos, g_ctx, b_seed, b_lo, b_carry, n):
    """How rows reach their seed state from window n (prefix identity; two_stream_pallas's
    `seed_terms`): the one-hot [R, C] of the seed, e [R, C] = e^{G_seed - G_i} on the seed's
    local sum (else 0) and coef [R] = e^{G_seed} where the row also reads h_n (else 0)."""
    at_seed = ipos[None, :] == b_seed[:, None]
    g_seed = tl.sum(tl.where(at_seed, g_ctx[None, :], 0.0), axis=1)
    local = (ipos[None, :] >= b_lo[:, None]) & (ipos[None, :] <= b_seed[:, None])
    e = _decay(g_seed, g_ctx, local)
    coef = tl.where(b_carry == n, tl.exp(g_seed), 0.0)
    return at_seed, e, coef

  @triton.jit
  def _wy_step(b_k, b_v, b_g, b_beta, b_bs, k_p, g_p, gam_p, bs_p, w_p, u_p, row, col,
               S: tl.constexpr, PREC: tl.constexpr, CROSS: tl.constexpr):
    """The blocks' WY step for one row tile, banded against the previous tile (`_p`; bs_p = -1
    where there is none): in-block cumulative log-decay gam [S], decays d_ii [S, S] (causal, same
    block) and d_ip [S, S] (against the previous tile), e^gam, and the rows of W [S, K], U [S, BV]
    (kernels.md 6.1). CROSS = False: no block crosses into the tile (`_blocks_cross_tiles`), the
    banded terms are zero and not computed (d_ip is then 0)."""
    causal, strict = _block_masks(b_bs, row, col)
    gam = tl.sum(tl.where(causal, b_g[None, :], 0.0), axis=1)
    if CROSS:
      same_p = b_bs[:, None] == bs_p[None, :]
      gam += tl.sum(tl.where(same_p, g_p[None, :], 0.0), axis=1)
    d_ii = _decay(gam, gam, causal)
    a_ii = tl.where(strict, b_beta[:, None] * _mm(b_k, tl.trans(b_k), PREC) * d_ii, 0.0)
    t_ii = gdr_triton.ut_inverse(a_ii, S, 'tf32x3')
    eg = tl.exp(gam)
    x_w = b_k * (b_beta * eg)[:, None]
    x_u = b_v * b_beta[:, None]
    if CROSS:
      d_ip = _decay(gam, gam_p, same_p)
      a_ip = b_beta[:, None] * _mm(b_k, tl.trans(k_p), PREC) * d_ip
      x_w -= _mm(a_ip, w_p, PREC)
      x_u -= _mm(a_ip, u_p, PREC)
    else:
      d_ip = tl.zeros([S, S], dtype=tl.float32)
    return gam, d_ii, d_ip, eg, _mm(t_ii, x_w, PREC), _mm(t_ii, x_u, PREC), t_ii

  @triton.jit
  def _seed_product(x, k_ctx, v_ctx, h_n, e, coef, PREC: tl.constexpr):
    """Rows x [R, K] times their seed states (prefix identity): ((x Kc^T) * E) V' + coef (x h_n),
    [R, BV]."""
    return (_mm(_mm(x, tl.trans(k_ctx), PREC) * e, v_ctx, PREC)
            + coef[:, None] * _mm(x, h_n, PREC))

  @triton.jit
  def _walk_tile(q, k, v, g, beta, bsl, seed, lo, carry, slot, base, mbase, kh, i_h, o_v, n, ipos,
                 k_ctx, v_ctx, g_ctx, h_n, k_p, g_p, gam_p, bs_p, w_p, u_p, row, col,
                 HQ: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, VDP: tl.constexpr,
                 S: tl.constexpr, PREC: tl.constexpr, CROSS: tl.constexpr,
                 ROWS: tl.constexpr = 0):
    """One row tile of a window's forward walk (the slots `slot`): its noisy q, k, g and block
    starts, its WY step against the previous tile (`_wy_step`: gam, d_ii, d_ip, e^gam, W, U), its
    seed terms (E, coef) and corrected values V' = U - W S(seed). ROWS: as `_slot_rows`; CROSS:
    as `_wy_step`."""
    b_q, b_k, b_v, b_g, b_beta, b_bs, b_seed, b_lo, b_carry = _slot_rows(
        q, k, v, g, beta, bsl, seed, lo, carry, slot, base, mbase, kh, i_h, o_v, HQ, HV, K, VDP,
        ROWS)
    gam, d_ii, d_ip, eg, w, u, t_ii = _wy_step(b_k, b_v, b_g, b_beta, b_bs, k_p, g_p, gam_p,
                                               bs_p, w_p, u_p, row, col, S, PREC, CROSS)
    _, e, coef = _seed_terms(ipos, g_ctx, b_seed, b_lo, b_carry, n)  # e [S, C]
    vn = u - _seed_product(w, k_ctx, v_ctx, h_n, e, coef, PREC)
    return b_q, b_k, b_g, b_bs, b_seed, gam, d_ii, d_ip, eg, e, coef, w, u, vn, t_ii

  @triton.jit
  def _owned(slot, slot_seed, n, T: tl.constexpr, C: tl.constexpr):
    """Whether window n computes these slots' outputs: slots of [0, T) whose seed lies in clean
    chunk n (each slot has exactly one such window)."""
    return (slot < T) & (slot_seed // C == n)

  @triton.jit
  def _own_span(seed, mbase, n, T: tl.constexpr, C: tl.constexpr, S: tl.constexpr,
                N_TILES: tl.constexpr):
    """(first slot, row tiles) of window n's walk: the slots of [0, T) whose seed lies in chunk n
    lie in [nC, (n + 1)C + S) and span at most C + S - 1 (a block reaches max_block <= S slots
    past its seed), so N_TILES tiles from the first cover them; with blocks that divide C, C / S
    tiles do, where a walk from nC takes N_TILES = C / S + 1 (its first rows belong to blocks
    seeded in chunk n - 1, its last tile mostly to the next window's). No tiles where the window
    owns no slot; its first own slot starts a block, so the walk needs no carry into it."""
    o_w = n * C + tl.arange(0, 2 * C)  # C >= S, both powers of two
    own = _owned(o_w, tl.load(seed + mbase + o_w, mask=o_w < T, other=0), n, T, C)
    first = tl.min(tl.where(own, o_w, T), axis=0)
    last = tl.max(tl.where(own, o_w, -1), axis=0)
    return first, tl.minimum(tl.where(last >= first, (last - first + S) // S, 0), N_TILES)

  @triton.jit
  def _blocks_cross_tiles(bsl, mbase, first, n_tiles, n, T: tl.constexpr, C: tl.constexpr,
                          S: tl.constexpr):
    """Whether a block crosses into one of the walk's row tiles (those starting at slot first +
    iS, 0 < i < n_tiles): whether some tile's first slot lies in a block started before it
    (blocks are runs of slots, so no later slot of the tile can). The walk lies within 2C slots
    of nC (`_own_span`)."""
    o_w = n * C + tl.arange(0, 2 * C)
    at_tile = ((o_w - first) % S == 0) & (o_w > first) & (o_w < first + n_tiles * S) & (o_w < T)
    bs = tl.load(bsl + mbase + o_w, mask=at_tile, other=0)
    return tl.max(tl.where(at_tile & (bs < o_w), 1, 0), axis=0) > 0

  @triton.jit
  def _store_rows(wy_w, wy_u, wy_vn, wy_gam, wy_t, lrow, inw, i_e, o_v, w, u, vn, gam, t_ii,
                  K: tl.constexpr, VDP: tl.constexpr, S: tl.constexpr, STORED_T: tl.constexpr):
    """Stores one row tile's W, gam (and T) from the first V tile, and its U, V' columns, at
    rows lrow of the stored rows' layout, those in the window (inw) only."""
    lead = inw & (i_e == 0)
    tl.store(wy_w + lrow[:, None] * K + tl.arange(0, K)[None, :], w.to(wy_w.dtype.element_ty),
             mask=lead[:, None])
    tl.store(wy_gam + lrow, gam, mask=lead)
    if STORED_T:
      tl.store(wy_t + lrow[:, None] * S + tl.arange(0, S)[None, :], t_ii, mask=lead[:, None])
    p_v = lrow[:, None] * VDP + o_v[None, :]
    tl.store(wy_u + p_v, u.to(wy_u.dtype.element_ty), mask=inw[:, None])
    tl.store(wy_vn + p_v, vn.to(wy_vn.dtype.element_ty), mask=inw[:, None])

  @triton.jit
  def noisy_kernel(q, k, v, g, beta, bsl, seed, lo, carry, kc, vc, gc, h, o,
                   wy_w, wy_u, wy_vn, wy_gam, wy_t,
                   NV: tl.constexpr, HQ: tl.constexpr, HV: tl.constexpr, N: tl.constexpr,
                   T: tl.constexpr, TPAD: tl.constexpr, K: tl.constexpr, VDP: tl.constexpr,
                   BV: tl.constexpr, C: tl.constexpr, S: tl.constexpr, N_TILES: tl.constexpr,
                   SCALE: tl.constexpr, PREC: tl.constexpr, STORE_ROWS: tl.constexpr = False,
                   STORED_T: tl.constexpr = False):
    """Window n of one (batch, value head, view, V tile): noisy outputs of the slots whose seed
    lies in clean chunk n, each stored by that window only, so every slot of [0, T) is written
    once (layouts: see `_forward`; the noisy inputs hold T slots per view, the slot metadata
    TPAD). The walk starts at the window's first own slot, a block start, and takes as many row
    tiles as its own slots span (`_own_span`): at most N_TILES. STORE_ROWS: also every walked
    window row's W, U, V', gam (and with STORED_T its row of the tile's (I + A)^-1) for the
    kernel backward (`_stored_rows`)."""
    n = tl.program_id(0)
    i_b, i_h, i_u, i_e, kh, o_v, k_ctx, v_ctx, g_ctx, h_n = _window_context(
        kc, vc, gc, h, n, NV, HQ, HV, N, K, VDP, BV, C, PREC == 'bf16')
    first, n_tiles = _own_span(seed, i_b * TPAD, n, T, C, S, N_TILES)
    o_s = tl.arange(0, S)
    ipos = n * C + tl.arange(0, C)  # clean positions of chunk n
    row = o_s[:, None]
    col = o_s[None, :]
    base = ((i_b * NV + i_u) * T).to(tl.int64)  # this view's row of slots
    lbase = _stored_row_base(i_b, i_h, i_u, n, NV, HV, N, N_TILES, S)
    args = (q, k, v, g, beta, bsl, seed, lo, carry, o, wy_w, wy_u, wy_vn, wy_gam, wy_t, n, first,
            n_tiles, i_b, i_h, i_u, i_e, kh, o_v, k_ctx, v_ctx, g_ctx, h_n, ipos, row, col, base,
            lbase)
    # Where no block crosses into a tile of the walk, the walk without the banded terms.
    if S > LEAN_WALK_MAX_TILE:
      _forward_walk(*args, NV, HQ, HV, T, TPAD, K, VDP, BV, C, S, SCALE, PREC, STORE_ROWS,
                    STORED_T, True)
    elif _blocks_cross_tiles(bsl, i_b * TPAD, first, n_tiles, n, T, C, S):
      _forward_walk(*args, NV, HQ, HV, T, TPAD, K, VDP, BV, C, S, SCALE, PREC, STORE_ROWS,
                    STORED_T, True)
    else:
      _forward_walk(*args, NV, HQ, HV, T, TPAD, K, VDP, BV, C, S, SCALE, PREC, STORE_ROWS,
                    STORED_T, False)

  @triton.jit
  def _forward_walk(q, k, v, g, beta, bsl, seed, lo, carry, o, wy_w, wy_u, wy_vn, wy_gam, wy_t,
                    n, first, n_tiles, i_b, i_h, i_u, i_e, kh, o_v, k_ctx, v_ctx, g_ctx, h_n,
                    ipos, row, col, base, lbase, NV: tl.constexpr, HQ: tl.constexpr,
                    HV: tl.constexpr, T: tl.constexpr, TPAD: tl.constexpr, K: tl.constexpr,
                    VDP: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, S: tl.constexpr,
                    SCALE: tl.constexpr, PREC: tl.constexpr, STORE_ROWS: tl.constexpr,
                    STORED_T: tl.constexpr, CROSS: tl.constexpr):
    """`noisy_kernel`'s walk over its n_tiles row tiles from slot `first`; CROSS: as
    `_wy_step` (without, nothing is carried from tile to tile)."""
    o_s = tl.arange(0, S)
    k_p = tl.zeros([S, K], dtype=tl.float32)
    w_p = tl.zeros([S, K], dtype=tl.float32)
    u_p = tl.zeros([S, BV], dtype=tl.float32)
    vn_p = tl.zeros([S, BV], dtype=tl.float32)
    g_p = tl.zeros([S], dtype=tl.float32)
    gam_p = tl.zeros([S], dtype=tl.float32)
    bs_p = tl.full([S], -1, dtype=tl.int32)
    for i in range(n_tiles):
      slot = first + i * S + o_s
      b_q, b_k, b_g, b_bs, b_seed, gam, d_ii, d_ip, eg, e, coef, w, u, vn, t_ii = _walk_tile(
          q, k, v, g, beta, bsl, seed, lo, carry, slot, base, i_b * TPAD, kh, i_h, o_v, n, ipos,
          k_ctx, v_ctx, g_ctx, h_n, k_p, g_p, gam_p, bs_p, w_p, u_p, row, col, HQ, HV, K, VDP, S,
          PREC, CROSS, T)
      if STORE_ROWS:
        _store_rows(wy_w, wy_u, wy_vn, wy_gam, wy_t, lbase + slot - n * C, slot - n * C < C + S,
                    i_e, o_v, w, u, vn, gam, t_ii, K, VDP, S, STORED_T)
      # Output rows: their seed states' part (prefix identity) and the in-block part.
      qe = b_q * eg[:, None]
      b_o = (_seed_product(qe, k_ctx, v_ctx, h_n, e, coef, PREC)
             + _mm(_mm(b_q, tl.trans(b_k), PREC) * d_ii, vn, PREC))
      if CROSS:
        b_o += _mm(_mm(b_q, tl.trans(k_p), PREC) * d_ip, vn_p, PREC)
      own = _owned(slot, b_seed, n, T, C)
      orow = ((i_b * NV + i_u) * T + slot).to(tl.int64)
      tl.store(o + (orow * HV + i_h)[:, None] * VDP + o_v[None, :], SCALE * b_o,
               mask=own[:, None])
      if CROSS:
        k_p, g_p, gam_p, bs_p, w_p, u_p, vn_p = b_k, b_g, gam, b_bs, w, u, vn


if triton is not None:

  @triton.jit
  def _prev_rows(k, bsl, wy_w, wy_u, wy_vn, wy_gam, slot, base, mbase, lrow, has_prev, kh, o_v,
                 HQ: tl.constexpr, K: tl.constexpr, VDP: tl.constexpr, T: tl.constexpr):
    """The previous row tile's noisy k [S, K] (zeros past T: the noisy inputs hold T slots per
    view) and block starts, and its stored W [S, K], U, V' [S, BV] and gam [S]; zeros (block
    starts -1) where has_prev is false (the window's first tile)."""
    o_k = tl.arange(0, K)
    tok = base + slot
    mslot = (mbase + slot).to(tl.int64)
    m = has_prev & (slot >= 0)
    k_p = tl.load(k + (tok * HQ + kh)[:, None] * K + o_k[None, :], mask=(m & (slot < T))[:, None],
                  other=0.0).to(tl.float32)
    bs_p = tl.load(bsl + mslot, mask=m, other=-1)
    w_p = tl.load(wy_w + lrow[:, None] * K + o_k[None, :], mask=m[:, None],
                  other=0.0).to(tl.float32)
    p_v = lrow[:, None] * VDP + o_v[None, :]
    u_p = tl.load(wy_u + p_v, mask=m[:, None], other=0.0).to(tl.float32)
    vn_p = tl.load(wy_vn + p_v, mask=m[:, None], other=0.0).to(tl.float32)
    gam_p = tl.load(wy_gam + lrow, mask=m, other=0.0)
    return k_p, bs_p, w_p, u_p, vn_p, gam_p

  @triton.jit
  def _noisy_qk(q, k, tok, m, kh, HQ: tl.constexpr, K: tl.constexpr):
    """Noisy q, k [R, K] of tokens tok [R] (key head kh) in fp32, zeros where m [R] is false."""
    p_qk = (tok * HQ + kh)[:, None] * K + tl.arange(0, K)[None, :]
    return (tl.load(q + p_qk, mask=m[:, None], other=0.0).to(tl.float32),
            tl.load(k + p_qk, mask=m[:, None], other=0.0).to(tl.float32))

  @triton.jit
  def _stored_row_base(i_b, i_h, i_u, n, NV: tl.constexpr, HV: tl.constexpr, N: tl.constexpr,
                       N_TILES: tl.constexpr, S: tl.constexpr):
    """Where window n's rows (N_TILES * S = C + S) of one (batch, value head, view) start in the
    stored rows' layout [B, N, HV, V, C + S, ...] (the differentiated forward's stored rows,
    dV' and the seed kernels' row cotangents)."""
    return ((((i_b * N + n) * HV + i_h) * NV + i_u) * (N_TILES * S)).to(tl.int64)

  @triton.jit
  def _slot_rows_of(i_b, i_u, i_h, slot, NV: tl.constexpr, HV: tl.constexpr, T: tl.constexpr):
    """Rows [R] of these slots of one (batch, view, value head) in the slot layout [B, V, T,
    HV, ...] of dO and of the backward kernel's outputs (each slot's belong to its owner window,
    `_owned`: zero dO in every other window)."""
    return (((i_b * NV + i_u) * T + slot) * HV + i_h).to(tl.int64)

  @triton.jit
  def _context_rows(i_b, i_h, i_u, n, NV: tl.constexpr, HV: tl.constexpr, N: tl.constexpr,
                    C: tl.constexpr):
    """Rows [C] of clean chunk n in the seed kernels' per-view context gradients [B, V, N C,
    HV, ...]."""
    return ((((i_b * NV + i_u) * N + n) * C + tl.arange(0, C)) * HV + i_h).to(tl.int64)

  @triton.jit
  def noisy_dvn_kernel(q, k, bsl, seed, wy_gam, do, wy_dvn,
                       NV: tl.constexpr, HQ: tl.constexpr, HV: tl.constexpr, N: tl.constexpr,
                       T: tl.constexpr, TPAD: tl.constexpr, K: tl.constexpr, VDP: tl.constexpr,
                       BV: tl.constexpr, C: tl.constexpr, S: tl.constexpr, N_TILES: tl.constexpr,
                       SCALE: tl.constexpr, PREC: tl.constexpr):
    """The backward's first pass, window n of one (batch, value head, view, V tile): the
    cotangent of V' [BV] from the intra-block output terms, dV'_i = (Q_i K_i^T * D_ii)^T dO_i +
    (Q_{i+1} K_i^T * D_{i+1,i})^T dO_{i+1} (scaled; stored one tile late), from noisy q, k, the
    block starts and the gam the forward stored (`noisy_kernel` with STORE_ROWS). Layout of the
    stored rows [B, N, HV, V, C + S, ...]. dO (`do`, the slot layout [B, V, T, HV, Vp]) is read
    at the window's own slots (`_owned`), zero at the others. The forward's walk (`_own_span`):
    row r is slot nC + r, the walk starts at row r0 = first - nC; rows it does not reach are left
    unset (the later kernels walk the same rows), rows past C + S are not stored."""
    n = tl.program_id(0)
    i_b, i_h, i_u, i_e, kh, o_v = _program_ids(NV, HQ, HV, VDP, BV)
    first, n_tiles = _own_span(seed, i_b * TPAD, n, T, C, S, N_TILES)
    args = (q, k, bsl, seed, wy_gam, do, wy_dvn, n, first - n * C, n_tiles, i_b, i_h, i_u, kh,
            o_v)
    if S > LEAN_WALK_MAX_TILE:
      _dvn_walk(*args, NV, HQ, HV, N, T, TPAD, K, VDP, BV, C, S, N_TILES, SCALE, PREC, True)
    elif _blocks_cross_tiles(bsl, i_b * TPAD, first, n_tiles, n, T, C, S):
      _dvn_walk(*args, NV, HQ, HV, N, T, TPAD, K, VDP, BV, C, S, N_TILES, SCALE, PREC, True)
    else:
      _dvn_walk(*args, NV, HQ, HV, N, T, TPAD, K, VDP, BV, C, S, N_TILES, SCALE, PREC, False)

  @triton.jit
  def _dvn_walk(q, k, bsl, seed, wy_gam, do, wy_dvn, n, r0, n_tiles, i_b, i_h, i_u, kh, o_v,
                NV: tl.constexpr, HQ: tl.constexpr, HV: tl.constexpr, N: tl.constexpr,
                T: tl.constexpr, TPAD: tl.constexpr, K: tl.constexpr, VDP: tl.constexpr,
                BV: tl.constexpr, C: tl.constexpr, S: tl.constexpr, N_TILES: tl.constexpr,
                SCALE: tl.constexpr, PREC: tl.constexpr, CROSS: tl.constexpr):
    """`noisy_dvn_kernel`'s walk over its n_tiles row tiles from window row r0; CROSS: as
    `_wy_step` (without, only dV' is carried). The decays come from the stored gam (rows past the
    window: -1e30, so that they reach no row)."""
    o_s = tl.arange(0, S)
    row = o_s[:, None]
    col = o_s[None, :]
    base = ((i_b * NV + i_u) * T).to(tl.int64)
    mbase = i_b * TPAD
    lbase = _stored_row_base(i_b, i_h, i_u, n, NV, HV, N, N_TILES, S)
    k_p = tl.zeros([S, K], dtype=tl.float32)
    gam_p = tl.zeros([S], dtype=tl.float32)
    bs_p = tl.full([S], -1, dtype=tl.int32)
    dvn_p = tl.zeros([S, BV], dtype=tl.float32)  # the previous tile's dV', less tile i's term
    for i in range(n_tiles):
      r = r0 + i * S + o_s
      slot = n * C + r
      inw = r < C + S
      b_q, b_k = _noisy_qk(q, k, base + slot, slot < T, kh, HQ, K)
      mslot = (mbase + slot).to(tl.int64)
      b_bs = tl.load(bsl + mslot)
      own = _owned(slot, tl.load(seed + mslot), n, T, C)
      lrow = lbase + r
      gam = tl.load(wy_gam + lrow, mask=inw, other=-1e30)
      dos = SCALE * tl.load(do + _slot_rows_of(i_b, i_u, i_h, slot, NV, HV, T)[:, None] * VDP
                            + o_v[None, :], mask=own[:, None], other=0.0).to(tl.float32)
      causal, _ = _block_masks(b_bs, row, col)
      d_ii = _decay(gam, gam, causal)
      if CROSS:
        same_p = b_bs[:, None] == bs_p[None, :]
        d_ip = _decay(gam, gam_p, same_p)
        dvn_p += _mm(tl.trans(_mm(b_q, tl.trans(k_p), PREC) * d_ip), dos, PREC)
      p_v = lrow[:, None] * VDP + o_v[None, :]
      tl.store(wy_dvn + p_v - S * VDP, dvn_p.to(wy_dvn.dtype.element_ty),  # tile i - 1
               mask=(r >= r0 + S)[:, None])
      dvn_p = _mm(tl.trans(_mm(b_q, tl.trans(b_k), PREC) * d_ii), dos, PREC)
      if CROSS:
        k_p, gam_p, bs_p = b_k, gam, b_bs
    r = r0 + (n_tiles - 1) * S + o_s  # the last tile's rows (none without tiles)
    tl.store(wy_dvn + (lbase + r)[:, None] * VDP + o_v[None, :],
             dvn_p.to(wy_dvn.dtype.element_ty),
             mask=((r < C + S) & (n_tiles > 0))[:, None])

  @triton.jit
  def noisy_bwd_kernel(q, k, v, beta, bsl, seed, wy_w, wy_u, wy_vn, wy_gam, wy_dvn, wy_t, do,
                       dqe_in, dws_in,
                       dq, dk, dv, dg, db,
                       NV: tl.constexpr, HQ: tl.constexpr, HV: tl.constexpr, N: tl.constexpr,
                       T: tl.constexpr, TPAD: tl.constexpr, K: tl.constexpr, VDP: tl.constexpr,
                       BV: tl.constexpr, C: tl.constexpr, S: tl.constexpr, N_TILES: tl.constexpr,
                       SCALE: tl.constexpr, PREC: tl.constexpr, STORED_T: tl.constexpr):
    """Gradients of window n of one (batch, value head, view, V tile), walking its row tiles
    backwards: one reverse-mode step of the forward's tile recurrence per tile, from the stored
    W, U, V', gam (`noisy_kernel` with STORE_ROWS), dV' (`noisy_dvn_kernel`) and the seed
    products' row cotangents of e^gam Q and W (dqe_in, dws_in [B, N, HV, V, C + S, K],
    `noisy_seed_rows_kernel`), carrying cotangents to the previous tile (of its W, U, k and gam,
    through the banded terms). No clean context is read. Reads dO and writes dq, dk [.., NVT,
    K], dv [.., BV], dg, dbeta [.., NVT] at the window's own slots (slot layout [B, V, T, HV,
    ...]; partial sums over this V tile's columns where V is contracted; the seed terms, full
    sums, enter with the first V tile): every slot has one owner, whose walk alone gives it
    nonzero gradients, as its dO is zero in every other window. The forward's tiles
    (`_own_span`) in reverse; rows past C + S read as zeros (gam as -1e30)."""
    n = tl.program_id(0)
    NVT: tl.constexpr = VDP // BV
    i_b, i_h, i_u, i_e, kh, o_v = _program_ids(NV, HQ, HV, VDP, BV)
    first, n_tiles = _own_span(seed, i_b * TPAD, n, T, C, S, N_TILES)
    r0 = first - n * C
    o_s = tl.arange(0, S)
    o_k = tl.arange(0, K)
    row = o_s[:, None]
    col = o_s[None, :]
    lead = (o_s >= 0) & (i_e == 0)
    base = ((i_b * NV + i_u) * T).to(tl.int64)  # this view's row of slots
    lbase = _stored_row_base(i_b, i_h, i_u, n, NV, HV, N, N_TILES, S)
    args = (q, k, v, beta, bsl, seed, wy_w, wy_u, wy_vn, wy_gam, wy_dvn, wy_t, do, dqe_in, dws_in,
            dq, dk, dv, dg, db, n, n_tiles, r0, i_b, i_h, i_u, i_e, kh, o_v, o_s, o_k, row, col,
            lead, base, lbase, i_b * TPAD)
    # Where no block crosses into a tile of the walk, no tile reads its predecessor: the walk
    # without the banded terms, half the products and no carried cotangents.
    if S > LEAN_WALK_MAX_TILE:
      _bwd_walk(*args, NV, HQ, HV, T, K, VDP, BV, C, S, NVT, SCALE, PREC, STORED_T, True)
    elif _blocks_cross_tiles(bsl, i_b * TPAD, first, n_tiles, n, T, C, S):
      _bwd_walk(*args, NV, HQ, HV, T, K, VDP, BV, C, S, NVT, SCALE, PREC, STORED_T, True)
    else:
      _bwd_walk(*args, NV, HQ, HV, T, K, VDP, BV, C, S, NVT, SCALE, PREC, STORED_T, False)

  @triton.jit
  def _bwd_walk(q, k, v, beta, bsl, seed, wy_w, wy_u, wy_vn, wy_gam, wy_dvn, wy_t, do, dqe_in,
                dws_in, dq, dk, dv, dg, db, n, n_tiles, r0, i_b, i_h, i_u, i_e, kh, o_v, o_s, o_k,
                row, col, lead, base, lbase, mbase, NV: tl.constexpr, HQ: tl.constexpr,
                HV: tl.constexpr, T: tl.constexpr, K: tl.constexpr, VDP: tl.constexpr,
                BV: tl.constexpr, C: tl.constexpr, S: tl.constexpr, NVT: tl.constexpr,
                SCALE: tl.constexpr, PREC: tl.constexpr,
                STORED_T: tl.constexpr, CROSS: tl.constexpr):
    """`noisy_bwd_kernel`'s walk over tiles i = n_tiles - 1 .. 0. CROSS: some block crosses into
    a tile from its predecessor (`_blocks_cross_tiles`); without, every banded term with the
    previous tile (A_ip, D_ip and the cotangents they carry) is zero and is not computed."""
    # Cotangents carried from tile i + 1 into tile i (of its U, W, k and gam), and tile i + 1's
    # gam cotangent and block starts (its rows' gam sum g of this tile's rows in their block).
    c_du = tl.zeros([S, BV], dtype=tl.float32)
    c_dw = tl.zeros([S, K], dtype=tl.float32)
    c_dk = tl.zeros([S, K], dtype=tl.float32)
    c_dgam = tl.zeros([S], dtype=tl.float32)
    nx_dgam = tl.zeros([S], dtype=tl.float32)
    nx_bs = tl.full([S], -1, dtype=tl.int32)
    for j in range(n_tiles):
      i = n_tiles - 1 - j
      r = r0 + i * S + o_s  # window rows; r >= C + S only in the last tile, never own rows
      slot = n * C + r
      inw = r < C + S
      tok = base + slot
      m_t = slot < T  # the noisy inputs hold T slots per view: zeros past them, as the forward
      b_q, b_k = _noisy_qk(q, k, tok, m_t, kh, HQ, K)
      b_v = tl.load(v + (tok * HV + i_h)[:, None] * VDP + o_v[None, :], mask=m_t[:, None],
                    other=0.0).to(tl.float32)
      b_beta = tl.load(beta + tok * HV + i_h, mask=m_t, other=0.0)
      b_bs = tl.load(bsl + (mbase + slot).to(tl.int64))
      own = _owned(slot, tl.load(seed + (mbase + slot).to(tl.int64)), n, T, C)
      orow = _slot_rows_of(i_b, i_u, i_h, slot, NV, HV, T)
      lrow = lbase + r  # in the stored rows' layout [B, N, HV, V, C + S, ...]
      p_v = orow[:, None] * VDP + o_v[None, :]
      p_lv = lrow[:, None] * VDP + o_v[None, :]
      p_lk = lrow[:, None] * K + o_k[None, :]
      m_v = inw[:, None]
      w = tl.load(wy_w + p_lk, mask=m_v, other=0.0).to(tl.float32)
      u = tl.load(wy_u + p_lv, mask=m_v, other=0.0).to(tl.float32)
      vn = tl.load(wy_vn + p_lv, mask=m_v, other=0.0).to(tl.float32)
      # Rows past the window: cotangents 0, and decays 0 (not e^{-gam} of a real row: 0 * inf).
      # (Their own block start, tl.where(inw, b_bs, -2), left ptxas 32 registers: 5.8 KB spilled.)
      gam = tl.load(wy_gam + lrow, mask=inw, other=-1e30)
      dvn = tl.load(wy_dvn + p_lv, mask=m_v, other=0.0).to(tl.float32)
      dqe = tl.load(dqe_in + p_lk, mask=(lead & inw)[:, None], other=0.0).to(tl.float32)
      dws = tl.load(dws_in + p_lk, mask=(lead & inw)[:, None], other=0.0).to(tl.float32)
      if CROSS:
        k_p, bs_p, w_p, u_p, vn_p, gam_p = _prev_rows(
            k, bsl, wy_w, wy_u, wy_vn, wy_gam, slot - S, base, mbase, lrow - S, i > 0, kh,
            o_v, HQ, K, VDP, T)
      dos = SCALE * tl.load(do + p_v, mask=own[:, None], other=0.0).to(tl.float32)

      # The tile's forward quantities again (the WY step, from the stored gam).
      causal, strict = _block_masks(b_bs, row, col)
      d_ii = _decay(gam, gam, causal)
      kk = _mm(b_k, tl.trans(b_k), PREC)
      qk = _mm(b_q, tl.trans(b_k), PREC)
      a_ii = tl.where(strict, b_beta[:, None] * kk * d_ii, 0.0)
      if CROSS:
        same_p = b_bs[:, None] == bs_p[None, :]
        d_ip = _decay(gam, gam_p, same_p)
        kkp = _mm(b_k, tl.trans(k_p), PREC)
        qkp = _mm(b_q, tl.trans(k_p), PREC)
        a_ip = b_beta[:, None] * kkp * d_ip
      if STORED_T:
        t_ii = tl.load(wy_t + lrow[:, None] * S + col, mask=m_v, other=0.0)
      else:
        t_ii = gdr_triton.ut_inverse(a_ii, S, 'tf32x3')
      eg = tl.exp(gam)

      # O = scale [seed(e^gam Q) + (Q K^T * D_ii) V' + (Q K_p^T * D_ip) V'_p] (dV': stored).
      ds_ii = _mm(dos, tl.trans(vn), PREC) * d_ii
      b_dq = _mm(ds_ii, b_k, PREC) + dqe * eg[:, None]
      b_dk = _mm(tl.trans(ds_ii), b_q, PREC)
      m_ii = ds_ii * qk
      dgam = tl.sum(m_ii, axis=1) - tl.sum(m_ii, axis=0) + tl.sum(dqe * b_q, axis=1) * eg
      # V' = U - seed(W): dU = dV', dW = the seed product's (dws) and the next tile's.
      dw = dws
      du = dvn
      if CROSS:
        ds_ip = _mm(dos, tl.trans(vn_p), PREC) * d_ip
        b_dq += _mm(ds_ip, k_p, PREC)
        b_dk += c_dk
        m_ip = ds_ip * qkp
        dgam += tl.sum(m_ip, axis=1) + c_dgam
        n_dk = _mm(tl.trans(ds_ip), b_q, PREC)
        n_dgam = -tl.sum(m_ip, axis=0)
        dw += c_dw
        du += c_du
      # The WY step: W = T (diag(beta e^gam) K - A_ip W_p), U = T (diag(beta) V - A_ip U_p),
      # T = (I + A_ii)^-1: dA = -T^T dX X^T for each solved X.
      rw = _mm(tl.trans(t_ii), dw, PREC)
      ru = _mm(tl.trans(t_ii), du, PREC)
      da_ii = tl.where(strict, -(_mm(rw, tl.trans(w), PREC) + _mm(ru, tl.trans(u), PREC)), 0.0)
      dkk = da_ii * d_ii * b_beta[:, None]
      b_dk += _mm(dkk, b_k, PREC) + _mm(tl.trans(dkk), b_k, PREC)
      b_db = tl.sum(da_ii * d_ii * kk, axis=1)
      p_ii = da_ii * a_ii
      dgam += tl.sum(p_ii, axis=1) - tl.sum(p_ii, axis=0)
      if CROSS:
        n_dw = -_mm(tl.trans(a_ip), rw, PREC)
        n_du = -_mm(tl.trans(a_ip), ru, PREC)
        da_ip = tl.where(same_p,
                         -(_mm(rw, tl.trans(w_p), PREC) + _mm(ru, tl.trans(u_p), PREC)), 0.0)
        dkkp = da_ip * d_ip * b_beta[:, None]
        b_dk += _mm(dkkp, k_p, PREC)
        n_dk += _mm(tl.trans(dkkp), b_k, PREC)
        b_db += tl.sum(da_ip * d_ip * kkp, axis=1)
        p_ip = da_ip * a_ip
        dgam += tl.sum(p_ip, axis=1)
        n_dgam -= tl.sum(p_ip, axis=0)
      rk = tl.sum(rw * b_k, axis=1)
      b_dk += rw * (b_beta * eg)[:, None]
      b_db += rk * eg + tl.sum(ru * b_v, axis=1)
      dgam += rk * b_beta * eg
      b_dv = ru * b_beta[:, None]
      # gam_r sums g over its block up to r: this tile's and the next tile's rows of the block.
      b_dg = tl.sum(tl.where(causal, dgam[:, None], 0.0), axis=0)
      if CROSS:
        b_dg += tl.sum(tl.where(nx_bs[:, None] == b_bs[None, :], nx_dgam[:, None], 0.0), axis=0)

      p_1 = orow * NVT + i_e
      p_k = p_1[:, None] * K + o_k[None, :]
      tl.store(dq + p_k, b_dq.to(dq.dtype.element_ty), mask=own[:, None])
      tl.store(dk + p_k, b_dk.to(dk.dtype.element_ty), mask=own[:, None])
      tl.store(dv + p_v, b_dv.to(dv.dtype.element_ty), mask=own[:, None])
      tl.store(dg + p_1, b_dg, mask=own)
      tl.store(db + p_1, b_db, mask=own)
      if CROSS:
        c_du, c_dw, c_dk, c_dgam = n_du, n_dw, n_dk, n_dgam
        nx_dgam, nx_bs = dgam, b_bs

  @triton.jit
  def _seed_tile_terms(seed, lo, carry, r, n, i_b, g_ctx, TPAD: tl.constexpr, C: tl.constexpr,
                       S: tl.constexpr):
    """What window rows r [S] of window n share across the views (the slot metadata): whether
    they are in the window inw [S], and how they reach their seed state (`_seed_terms`: at_seed,
    E, coef). Rows r >= C + S, past the window, read its last row (their cotangents are zeroed
    by `_seed_tile_rows`)."""
    inw = r < C + S
    mslot = (i_b * TPAD + n * C + tl.minimum(r, C + S - 1)).to(tl.int64)
    at_seed, e, coef = _seed_terms(n * C + tl.arange(0, C), g_ctx, tl.load(seed + mslot),
                                   tl.load(lo + mslot), tl.load(carry + mslot), n)
    return inw, at_seed, e, coef

  @triton.jit
  def _seed_tile_rows(q, seed, do, wy_w, wy_gam, wy_dvn, r, n, i_b, i_h, i_u, kh, o_v, inw,
                      NV: tl.constexpr, HQ: tl.constexpr, HV: tl.constexpr, N: tl.constexpr,
                      T: tl.constexpr, TPAD: tl.constexpr, K: tl.constexpr, VDP: tl.constexpr,
                      C: tl.constexpr, S: tl.constexpr, N_TILES: tl.constexpr,
                      SCALE: tl.constexpr):
    """Window rows r [S] of window n in view i_u for the seed kernels (rows past the window read
    its last row, and slots past T the q and dO of slot T - 1, with their cotangents dy zeroed,
    so they add nothing: ptxas spilled 480 / 208 B with masked loads, 88 / 216 so, one view per
    program; so do the rows of slots the window does not own, whose dO is another window's):
    their index in the stored layout lrow [S], and the two row sets x [S, K] whose seed products
    the output reads, each with the cotangent dy [S, len(o_v)] of its product: x = e^gam Q (dy =
    scale dO) and x = W (V' = U - seed(W): dy = -dV')."""
    o_k = tl.arange(0, K)
    r = tl.minimum(r, C + S - 1)
    slot = n * C + r
    b_seed = tl.load(seed + (i_b * TPAD + slot).to(tl.int64))
    tok = ((i_b * NV + i_u) * T).to(tl.int64) + tl.minimum(slot, T - 1)
    lrow = _stored_row_base(i_b, i_h, i_u, n, NV, HV, N, N_TILES, S) + r
    gam = tl.load(wy_gam + lrow)
    keep = tl.where(inw & _owned(slot, b_seed, n, T, C), 1.0, 0.0)[:, None]
    xq = tl.load(q + (tok * HQ + kh)[:, None] * K + o_k[None, :]).to(tl.float32)
    p_do = _slot_rows_of(i_b, i_u, i_h, tl.minimum(slot, T - 1), NV, HV, T)
    dyq = (SCALE * keep) * tl.load(do + p_do[:, None] * VDP + o_v[None, :]).to(tl.float32)
    xw = tl.load(wy_w + lrow[:, None] * K + o_k[None, :]).to(tl.float32)
    dyw = -keep * tl.load(wy_dvn + lrow[:, None] * VDP + o_v[None, :]).to(tl.float32)
    return lrow, xq * tl.exp(gam)[:, None], dyq, xw, dyw

  @triton.jit
  def _seed_row_grads(x, dy, k_ctx, v_ctx, h_n, e, coef, at_seed, PREC: tl.constexpr):
    """The backward of y = seed(x) = ((x Kc^T) * E) V' + coef (x h_n) over one row tile, in the
    row-wise parts: dx [S, K], and this tile's terms of dKc [C, K] and dG [C] (the seed's G
    enters E and coef, each clean G_i enters E):

        sx = x Kc^T, z = (dy V'^T) * E, dx = z Kc + coef (dy h_n^T), dKc = z^T x,
        dG_i = sum_r [i = seed_r] dseed_r - sum_r (z * sx)_ri,
        dseed_r = sum_c (z * sx)_rc + coef_r x_r . (dy h_n^T)_r.
    """
    sx = _mm(x, tl.trans(k_ctx), PREC)
    ze = _mm(dy, tl.trans(v_ctx), PREC) * e
    dyh = coef[:, None] * _mm(dy, tl.trans(h_n), PREC)
    pe = ze * sx
    dseed = tl.sum(pe, axis=1) + tl.sum(x * dyh, axis=1)
    dg = tl.sum(tl.where(at_seed, dseed[:, None], 0.0), axis=0) - tl.sum(pe, axis=0)
    return _mm(ze, k_ctx, PREC) + dyh, _mm(tl.trans(ze), x, PREC), dg

  @triton.jit
  def noisy_seed_rows_kernel(q, seed, lo, carry, kc, vc, gc, h, do, wy_w, wy_gam, wy_dvn,
                             dqe, dws, dkc, dgc,
                             NV: tl.constexpr, HQ: tl.constexpr, HV: tl.constexpr,
                             N: tl.constexpr, T: tl.constexpr, TPAD: tl.constexpr,
                             K: tl.constexpr, VDP: tl.constexpr, C: tl.constexpr, S: tl.constexpr,
                             N_TILES: tl.constexpr, SCALE: tl.constexpr, PREC: tl.constexpr):
    """The seed products' backward, row-wise part, window n of one (batch, value head), every
    view and all V columns: the rows' cotangents of e^gam Q (dqe) and of W (dws) [B, N, HV, V,
    C + S, K], and the window's terms of the clean k's dkc [B, N C, HV, 1, K] and G's dgc
    [B, N C, HV, 1], summed over the views (`_seed_row_grads`). The views share the slot
    metadata, so each row tile's seed terms serve all of them."""
    n = tl.program_id(0)
    # NV = 1 here and in _context_rows: no view in the program id, nor in the context gradients.
    i_b, i_h, _view, _tile, kh, o_v, k_ctx, v_ctx, g_ctx, h_n = _window_context(
        kc, vc, gc, h, n, 1, HQ, HV, N, K, VDP, VDP, C, PREC == 'bf16')
    o_k = tl.arange(0, K)
    first, n_tiles = _own_span(seed, i_b * TPAD, n, T, C, S, N_TILES)
    acc_dkc = tl.zeros([C, K], dtype=tl.float32)
    acc_dg = tl.zeros([C], dtype=tl.float32)
    for i in range(n_tiles):
      r = first - n * C + i * S + tl.arange(0, S)
      inw, at_seed, e, coef = _seed_tile_terms(seed, lo, carry, r, n, i_b, g_ctx, TPAD, C, S)
      for i_u in range(NV):
        lrow, xq, dyq, xw, dyw = _seed_tile_rows(
            q, seed, do, wy_w, wy_gam, wy_dvn, r, n, i_b, i_h, i_u, kh, o_v, inw, NV, HQ, HV, N,
            T, TPAD, K, VDP, C, S, N_TILES, SCALE)
        p_lk = lrow[:, None] * K + o_k[None, :]
        dx, dk_q, dg_q = _seed_row_grads(xq, dyq, k_ctx, v_ctx, h_n, e, coef, at_seed, PREC)
        tl.store(dqe + p_lk, dx.to(dqe.dtype.element_ty), mask=inw[:, None])
        dx, dk_w, dg_w = _seed_row_grads(xw, dyw, k_ctx, v_ctx, h_n, e, coef, at_seed, PREC)
        tl.store(dws + p_lk, dx.to(dws.dtype.element_ty), mask=inw[:, None])
        acc_dkc += dk_q + dk_w
        acc_dg += dg_q + dg_w
    crow = _context_rows(i_b, i_h, 0, n, 1, HV, N, C)
    tl.store(dkc + crow[:, None] * K + o_k[None, :], acc_dkc)
    tl.store(dgc + crow, acc_dg)

  @triton.jit
  def noisy_seed_ctx_kernel(q, seed, lo, carry, kc, vc, gc, h, do, wy_w, wy_gam, wy_dvn,
                            dvc, dh,
                            NV: tl.constexpr, HQ: tl.constexpr, HV: tl.constexpr,
                            N: tl.constexpr, T: tl.constexpr, TPAD: tl.constexpr,
                            K: tl.constexpr, VDP: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                            S: tl.constexpr, N_TILES: tl.constexpr, SCALE: tl.constexpr,
                            PREC: tl.constexpr):
    """The seed products' backward, the parts that contract the rows, window n of one (batch,
    value head, V tile), summed over the views: the clean v''s dvc [B, N C, HV, Vp] = sum over
    both row sets of ((x Kc^T) * E)^T dy, and h_n's dh [B, N, HV, K, Vp] = sum of x^T (coef
    dy)."""
    n = tl.program_id(0)
    # (Triton drops the loads of v' and h_n, which this kernel does not read.) NV = 1: as in
    # noisy_seed_rows_kernel.
    i_b, i_h, _view, _tile, kh, o_v, k_ctx, v_ctx, g_ctx, h_n = _window_context(
        kc, vc, gc, h, n, 1, HQ, HV, N, K, VDP, BV, C, PREC == 'bf16')
    o_k = tl.arange(0, K)
    acc_dvc = tl.zeros([C, BV], dtype=tl.float32)
    acc_dh = tl.zeros([K, BV], dtype=tl.float32)
    first, n_tiles = _own_span(seed, i_b * TPAD, n, T, C, S, N_TILES)
    for i in range(n_tiles):
      r = first - n * C + i * S + tl.arange(0, S)
      inw, at_seed, e, coef = _seed_tile_terms(seed, lo, carry, r, n, i_b, g_ctx, TPAD, C, S)
      for i_u in range(NV):
        lrow, xq, dyq, xw, dyw = _seed_tile_rows(
            q, seed, do, wy_w, wy_gam, wy_dvn, r, n, i_b, i_h, i_u, kh, o_v, inw, NV, HQ, HV, N,
            T, TPAD, K, VDP, C, S, N_TILES, SCALE)
        acc_dvc += (_mm(tl.trans(_mm(xq, tl.trans(k_ctx), PREC) * e), dyq, PREC)
                    + _mm(tl.trans(_mm(xw, tl.trans(k_ctx), PREC) * e), dyw, PREC))
        acc_dh += (_mm(tl.trans(xq), coef[:, None] * dyq, PREC)
                   + _mm(tl.trans(xw), coef[:, None] * dyw, PREC))
    crow = _context_rows(i_b, i_h, 0, n, 1, HV, N, C)
    tl.store(dvc + crow[:, None] * VDP + o_v[None, :], acc_dvc)
    hrow = ((i_b * N + n) * HV + i_h).to(tl.int64) * K + o_k
    tl.store(dh + hrow[:, None] * VDP + o_v[None, :], acc_dh)
