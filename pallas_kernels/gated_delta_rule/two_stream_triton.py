"""Noisy views of the two-stream gated delta rule as jax-triton kernels (forward and backward).

The same schedule as `two_stream_pallas` (see its docstring and kernels.md 6.1), written against
Triton directly: one program per (window n, batch x value head x view x V tile) walks window n's
row tiles from the first slot the window owns (forward and backward alike), solving each tile's
blocks against itself and the carried previous tile, and rebuilds every block's seed state from
the clean chunk checkpoint h_n and clean chunk n through the prefix identity, so no per-block
state is ever formed; each slot's output is stored by its seed's window only, straight into the
slot layout. The JAX side (clean pass, slot metadata, the backward's operands and sums) is
`two_stream_pallas`'s.

Backward: `jax.vjp` of the pure-JAX chunked schedule (backward='autodiff'), or the kernels
(backward='kernel', `_backward`):
- the forward, differentiated (`noisy_kernel` with STORE_ROWS), stores every window row's W, U,
  V', gam and its row of the tile's (I + A)^-1 as residuals: 2 B x (K + 2 V) + 4 B x (1 + S)
  per window row for 16-bit inputs (4 B x (K + 2 V + 1 + S) for fp32), C + S rows per chunk of
  C slots, head and view (~137 MB per call at B = 1, T = 4096, two views, 16 heads of 128).
  Under a block remat, as every shipped config sets, the outer forward runs without STORE_ROWS
  and the backward reruns it with, so none are kept across layers;
- `noisy_dvn_kernel` takes the intra-block output terms' cotangent of V';
- `noisy_seed_rows_kernel` (the rows' cotangents of e^gam q and W, the clean k's and G's
  gradients) and `noisy_seed_ctx_kernel` (the clean v''s and h_n's) take the seed products'
  backward; each program sums the views, which share the slot metadata and so each row tile's
  seed terms;
- `noisy_bwd_kernel` walks every window backwards, one reverse-mode step of the tile recurrence
  per row tile, carrying cotangents to the previous tile.
The stored rows and the row cotangents passed between the kernels (dV', the seed products' dqe,
dws) are bf16 for 16-bit inputs, fp32 for fp32 (`_row_dtype`); gam and the tile inverses fp32.
At 32-row tiles (block 32), whose registers spill, the kernel backward is slower than autodiff's,
so 'auto' picks it for 16-bit inputs at row tiles up to 16 only
(`two_stream_gdn.resolve_schedule`).

Inputs: the kernels read noisy q, k, v and clean k as given, widening them to fp32 as they load,
and unpadded: slots past T of the last window are masked (the forward, the dV' pass and the
backward kernel) or clamped to slot T - 1 with zero cotangents (the seed kernels). The backward
kernel stores dv, and dq and dk where nothing is summed after it, in the inputs' dtype.

Walks: each window's walk starts at its first own slot and takes only the tiles its own slots
span (`_own_span`). Where no block crosses into any row tile of a window's walk
(`_blocks_cross_tiles`, one check per window: true only around a document end or a block that
does not divide the row tile), every term against the previous tile (A_ip, D_ip and the
cotangents they carry) is zero, and the forward, the dV' pass and the backward kernel walk the
window with a second copy of their loop compiled without them (`CROSS = False`, the lean walks;
row tiles up to LEAN_WALK_MAX_TILE).

`interpret=True` runs the kernels in Triton's interpreter on the host (`_common.triton_interpret`;
the CPU tests).

H100, bf16, B = 1, T = 4096, two views, 16 heads of 128, block 4, the whole two-stream pass's
forward+backward (clean stream included), back to back (2026-12-07/08): 2.56-2.58 ms against
3 x 0.69-0.70 ms for the clean pass alone (1.22-1.23x); by the profiler, the backward kernel
0.44 ms, the seed rows kernel 0.42, the forward 0.41, the seed context kernel 0.26, the dV' pass
0.075. How each design step above measured, and what was tried and dropped: docs/benchmarks.md,
"Two-stream GDN schedules" (the history this docstring used to carry is kept there as well).
"""
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta_rule import triton as gdr_triton
from pallas_kernels.gated_delta_rule import two_stream_pallas as tsp

_F32 = jnp.float32
# The backward kernels' products: bf16 operands for 16-bit inputs, TF32x3 for fp32 inputs.
_BWD_PRODUCTS = {'bfloat16': 'bf16', 'float16': 'bf16', 'float32': 'tf32x3'}
# Row tiles up to this size have the forward store each tile's (I + A)^-1 for the backward kernel
# to load (H200, bf16, T = 4096, block 4: backward kernel 1.33 against 2.21 ms recomputing it);
# 32-row tiles recompute it (storing leaves ptxas 32 registers and 17 KB of spills per thread).
STORED_INVERSE_MAX_TILE = 16


def backward_launch(dtype, max_block: int) -> tuple[int, int, int, int]:
  """(V tile, warps and pipeline stages of `noisy_bwd_kernel`, warps of `noisy_dvn_kernel`).

  ptxas (sm_90a, K = V = 128, bf16, launch.kernel_registers), bytes spilled per thread by (WY
  pass, backward): 16-row tiles at V tile 128 with 4 / 8 warps, 216 / 1,396 (the backward at 4
  warps: 1,692; V tile 64 at 8: 124 / 884); 32-row tiles at V tile 32 with 4 / 4 warps, 2,128 /
  3,048, where 8 warps for the backward (V tiles 32 and 64) left it 32 registers and 11-12 KB of
  spills. Shared memory: at most 80 KiB (bf16), 144 KiB (fp32, whose K = 128 kernels spill 12-56
  KB per thread: correct, not fast). Loading the stored tile inverses (STORED_INVERSE_MAX_TILE)
  cut the 16-row backward's spill to 920. H200, T = 4096, two views, fwd+bwd of the two-stream
  pass, back to back: block 4 at (128, 8, 4) 6.13 ms (5.26 with the stored inverses), at
  (64, 4, 4) 6.93 (an earlier version of the kernels); block 32 at (32, 4, 4) 30.6 ms, at
  (32, 4, 8) 33.7, at (16, 4, 4) 51.5 (walks from nC). Walking only the own tiles (`_own_span`)
  took block 4's spills to 564 (WY pass, from 196) and 1,200 (backward, from 920), and the
  kernel backward's fwd+bwd from 4.96 to 4.75 ms (H100, back to back, 2026-12-06); the lean
  walks (module docstring) to 748 / 1,652 B and 4.07-4.10 ms (H100, 2026-12-07). Two pipeline
  stages for the backward kernel (16-bit inputs): 3.71 ms against 3.87 / 3.85 with one (H100,
  block 4, the slot layout, back to back, 2026-12-07; the kernel 0.571 against 0.734 ms by the
  profiler); ptxas: 532 B spilled, 89 KiB of shared memory (block 4), 32-row tiles unchanged.
  fp32 inputs keep one stage: two spill 26,968 B per thread against 20,032 (block 4)."""
  if jnp.dtype(dtype).itemsize == 2:
    return (128, 8, 2, 4) if tsp.row_tile(max_block) <= 16 else (32, 4, 2, 4)
  return 32, 8, 1, 4


def seed_backward_launch() -> tuple[int, int, int]:
  """(V tile, warps of `noisy_seed_ctx_kernel`; warps of `noisy_seed_rows_kernel`). ptxas
  (sm_90a, K = V = 128, bf16, block 4, launch.kernel_registers): the context kernel at (64, 4)
  spills 24 B per thread, the rows kernel at 8 warps 52 B (at 4 warps: 552). H100, the kernel
  backward's fwd+bwd (block 4, back to back, 2026-12-06): 4.75 / 4.76 ms against 4.81 with the
  context kernel at (128, 8) (84 B spilled). Walking only the window's own tiles (masked rows
  past C + S) took the spills to 88 B (rows) and 216 B (context), measured only together with
  the lean walks (module docstring)."""
  return 64, 4, 8


def forward_launch(dtype, max_block: int) -> tuple[int, int]:
  """(V tile, warps) of the fused forward. H200, T = 4096, H = 16, K = V = 128, bf16 (bf16
  products), V = 2, bench_schedules --schedules=triton --modes=fwd --noisy_block_v/--noisy_warps,
  back to back, 2026-12-02: V tile 128 at 4 warps 0.94 ms, at 8 1.16; 64 at 4 warps 1.26, at 8
  1.68; 32 at 2 warps 1.46, at 4 1.84 (block 4); 128 at 4 / 8 warps 0.94 / 1.15 at block 1,
  0.94 / 1.17 at block 16, 0.63 / 0.77 at block 8 with one view (128 at 4 warps: 255 registers,
  216 B spilled per thread, by launch.kernel_registers; still the fastest). ptxas (sm_90a,
  launch.kernel_registers) rules out 128 for 32-row tiles (32 registers, 16 KB spilled per
  thread) and for fp32 (272 KiB of shared memory)."""
  rows = tsp.row_tile(max_block)
  if jnp.dtype(dtype).itemsize == 2 and rows <= 16:
    return 128, 4
  return 64, tsp.forward_num_warps(rows)

try:  # Only the GPU machine (or a CPU test with Triton's interpreter) has triton.
  import triton  # pylint: disable=g-import-not-at-top
  import triton.language as tl  # pylint: disable=g-import-not-at-top
except ImportError:  # pragma: no cover
  triton = None

if triton is not None:
  # Row tiles up to this size have the lean walks (module docstring); 32-row tiles keep one walk
  # with the banded terms, as the second copy of the loop raised their spills (ptxas, sm_90a,
  # block 32: WY pass 2.7 -> 26 KB per thread at 32 registers, forward 1.0 -> 1.5 KB).
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


# How the fused forward reads and multiplies 16-bit inputs, as measured on an H200 (bench_schedules,
# clean + noisy forward, T = 4096, H = 16, K = V = 128, bf16, block 4, V = 2, one run, 2026-12-02):
# bf16 products (operands rounded to bf16, fp32 accumulation; the clean context k, v' and h_n
# loaded as bf16) with noisy q, k, v and clean k read as given took 1.72 ms; bf16 products from
# fp32 copies 1.82; TF32 products from fp32 copies 1.89 and 1.94; bf16 at a V tile of 64, 2.41.
# Reading as given also saves the copies (temp 0.189 against 0.314 GiB). The backward's kernels
# read them as given too (the old two-tile backward kernel was faster on fp32 copies, 18.4-18.8 ms
# against 22.6, 2026-12-01; the current ones were not compared). The UT inverse stays TF32x3, as
# are all products for fp32 inputs.


def _forward_products(dtype) -> str:
  """The fused forward's PREC: TF32x3 for fp32 inputs; bf16 (emulated in fp32 under Triton's
  interpreter) for 16-bit ones."""
  if jnp.dtype(dtype) == _F32:
    return 'tf32x3'
  return 'bf16' if _compiled() else 'bf16_emulated'


def _compiled() -> bool:
  """Whether the kernels are built for a GPU, not for Triton's interpreter (TRITON_INTERPRET=1),
  whose bf16 products are wrong (`_common.triton_interpret`)."""
  return type(noisy_kernel).__name__ != 'InterpretedFunction'


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7, 8, 9))
def _forward(clean, noisy, segment_ids, block_starts, scale, chunk_size, max_block, launch,
             interpret, store_rows=False):
  """Noisy outputs [B, V, T, HV, V] fp32; with store_rows also the window rows the kernel
  backward reads (`_stored_rows`: W, U, V', gam, T), as the forward computes them."""
  b, nv, t, hq, kd = noisy[0].shape
  hv, vd = clean[2].shape[2:]
  block_v, num_warps = launch
  z = tsp._sizes(t, kd, vd, chunk_size, max_block, block_v)  # pylint: disable=protected-access
  wd = z.c + z.s
  # pylint: disable-next=protected-access
  ctx = tsp._clean_pass(clean, segment_ids, z.c, 'triton', interpret)
  noisy_p, meta, ctx, _ = tsp._operands(  # pylint: disable=protected-access
      clean[1], ctx, noisy, segment_ids, block_starts, z, keep_dtype=True, pad_slots=False)
  # Layouts: noisy q, k [B, V, T, H, Kp], v [B, V, T, HV, Vp] (the inputs' dtype, as clean k),
  # g, beta [B, V, T, HV] (fp32), not padded to Tp: the kernel reads slots past T as zeros;
  # slot meta [B, Tp] int32; clean k [B, N C, H, Kp], v' [B, N C, HV, Vp], G [B, N C, HV];
  # h [B, N, HV, Kp, Vp]; out [B, V, T, HV, Vp] (slots: no window layout to pick from).
  prec = _forward_products(noisy[0].dtype)
  none = jax.ShapeDtypeStruct((1,), _F32)
  rows = _stored_rows(b, nv, hv, z, noisy[0].dtype) if store_rows else (none,) * 5
  o, *rows = gdr_triton._jt(interpret).triton_call(  # pylint: disable=protected-access
      *noisy_p, *meta, *ctx, kernel=noisy_kernel,
      out_shape=[jax.ShapeDtypeStruct((b, nv, t, hv, z.vdp), _F32)] + list(rows),
      grid=(z.n, b * hv * nv * (z.vdp // z.bv)), num_warps=num_warps,
      num_stages=2,
      NV=nv, HQ=hq, HV=hv, N=z.n, T=t, TPAD=z.tpad, K=z.kp, VDP=z.vdp, BV=z.bv, C=z.c, S=z.s,
      N_TILES=wd // z.s, SCALE=scale, PREC=prec, STORE_ROWS=store_rows,
      STORED_T=_stores_inverse(z))
  return (o[..., :vd], tuple(rows)) if store_rows else o[..., :vd]


def _stores_inverse(z) -> bool:
  return z.s <= STORED_INVERSE_MAX_TILE


def _row_dtype(dtype):
  """The stored rows' W, U, V', dV' and seed cotangents' dtype for q/k/v of `dtype`: bf16 for
  16-bit inputs, whose backward kernels take the rows only into bf16 products (but for one
  elementwise term of the seed backward) and the cotangents into gradients stored in bf16, fp32
  otherwise."""
  return jnp.bfloat16 if jnp.dtype(dtype).itemsize == 2 else _F32


def _stored(b, nv, hv, z, *tail, dtype=_F32):
  """The aval of per-window-row values in the stored rows' layout [B, N, HV, V, C + S, *tail]."""
  return jax.ShapeDtypeStruct((b, z.n, hv, nv, z.c + z.s) + tail, dtype)


def _stored_rows(b, nv, hv, z, input_dtype):
  """Avals of the window rows the kernel backward reads (`_stored`): W [K], U, V' [Vp] (in
  `_row_dtype(input_dtype)`), gam and each 16-row tile's (I + A)^-1 row [S] (fp32; a stand-in
  where larger tiles recompute it)."""
  stored = functools.partial(_stored, b, nv, hv, z)
  rows = _row_dtype(input_dtype)
  return (stored(z.kp, dtype=rows), stored(z.vdp, dtype=rows), stored(z.vdp, dtype=rows), stored(),
          stored(z.s) if _stores_inverse(z) else jax.ShapeDtypeStruct((1,), _F32))


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8, 9))
def _backward(clean, noisy, segment_ids, block_starts, do, scale, chunk_size, max_block, launch,
              interpret, *, rows):
  """Gradients of `_forward` for the cotangent do [B, V, T, HV, V]: (d clean, d noisy), given
  the window rows the differentiated forward stored (`rows`, `_stored_rows`).

  Three steps: `noisy_dvn_kernel` takes the cotangent of V' from the intra-block output terms;
  `noisy_seed_rows_kernel` and `noisy_seed_ctx_kernel` take the seed products' backward: the
  rows' cotangents of e^gam q and W, and the clean context's gradients; `noisy_bwd_kernel`
  walks each window's tiles backwards into the noisy inputs' gradients (at the slots each window
  owns, in the slot layout, as dO is read). Plain JAX then
  sums V tiles and GQA heads where there are several and pulls the context gradients (the
  views already summed by the seed kernels) through the clean pass (`backward_sums`)."""
  del launch  # the forward's; the backward's is `backward_launch`
  b, nv, t, hq, _ = noisy[0].shape
  hv = clean[2].shape[2]
  prec = _BWD_PRODUCTS[jnp.dtype(noisy[0].dtype).name]
  block_v, num_warps, num_stages, dvn_warps = backward_launch(noisy[0].dtype, max_block)
  ops = tsp.backward_operands(clean, noisy, segment_ids, block_starts, do, chunk_size, max_block,
                              block_v, 'triton', interpret, front_tile=False, keep_dtype=True,
                              slot_do=True, pad_slots=False)
  z = ops.z
  if prec == 'bf16' and not _compiled():
    prec = 'bf16_emulated'  # built for Triton's interpreter (TRITON_INTERPRET=1)
  nvt, wd = z.vdp // z.bv, z.c + z.s
  slots = lambda *tail, dtype=_F32: jax.ShapeDtypeStruct((b, nv, t, hv) + tail, dtype)
  stored = functools.partial(_stored, b, nv, hv, z)
  rows_dtype = _row_dtype(noisy[0].dtype)  # of dV' and the seed kernels' row cotangents too
  sizes = dict(NV=nv, HQ=hq, HV=hv, N=z.n, T=t, TPAD=z.tpad, K=z.kp, VDP=z.vdp, BV=z.bv, C=z.c,
               S=z.s, N_TILES=wd // z.s, SCALE=scale, PREC=prec, STORED_T=_stores_inverse(z))
  grid = (z.n, b * hv * nv * nvt)
  call = gdr_triton._jt(interpret).triton_call  # pylint: disable=protected-access
  # Every kernel walks only each window's own tiles (`_own_span`).
  w, u, vn, gam, t_rows = rows
  dvn = call(ops.noisy[0], ops.noisy[1], *ops.meta[:2], gam, ops.do, kernel=noisy_dvn_kernel,
             out_shape=stored(z.vdp, dtype=rows_dtype), grid=grid,
             num_warps=dvn_warps, num_stages=1,
             **{k: v for k, v in sizes.items() if k != 'STORED_T'})
  seed_ops = (ops.noisy[0],) + ops.meta[1:] + ops.ctx + (ops.do, w, gam, dvn)
  ctx_v = lambda *tail: jax.ShapeDtypeStruct((b, z.n * z.c, hv) + tail, _F32)
  seed_sizes = {k: sizes[k] for k in ('NV', 'HQ', 'HV', 'N', 'T', 'TPAD', 'K', 'VDP', 'C', 'S',
                                      'N_TILES', 'SCALE', 'PREC')}
  ctx_block_v, ctx_warps, rows_warps = seed_backward_launch()
  dqe, dws, dkc, dgc = call(
      *seed_ops, kernel=noisy_seed_rows_kernel,
      out_shape=[stored(z.kp, dtype=rows_dtype), stored(z.kp, dtype=rows_dtype),
                 ctx_v(1, z.kp), ctx_v(1)],
      grid=(z.n, b * hv), num_warps=rows_warps, num_stages=1, **seed_sizes)
  ctx_block_v = min(ctx_block_v, z.vdp)
  dvc, dh = call(
      *seed_ops, kernel=noisy_seed_ctx_kernel,
      out_shape=[ctx_v(z.vdp), jax.ShapeDtypeStruct((b, z.n, hv, z.kp, z.vdp), _F32)],
      grid=(z.n, b * hv * (z.vdp // ctx_block_v)), num_warps=ctx_warps, num_stages=1,
      BV=ctx_block_v, **seed_sizes)
  # The seed kernels sum the views themselves: a views axis of one for `backward_sums`.
  ctx_grads = tuple(x[:, None] for x in (dkc, dvc, dgc, dh))
  q, k, v, _, beta = ops.noisy
  # dv in v's dtype; dq and dk in theirs where nothing is summed after the kernel (one V tile,
  # a key head per value head): no fp32 copies for XLA to convert.
  qk_dtype = noisy[0].dtype if nvt == 1 and hv == hq else _F32
  outs = call(q, k, v, beta, *ops.meta[:2], w, u, vn, gam, dvn, t_rows, ops.do, dqe, dws,
              kernel=noisy_bwd_kernel,
              out_shape=[slots(nvt, z.kp, dtype=qk_dtype), slots(nvt, z.kp, dtype=qk_dtype),
                         slots(z.vdp, dtype=noisy[2].dtype), slots(nvt), slots(nvt)],
              grid=grid, num_warps=num_warps, num_stages=num_stages, **sizes)
  return tsp.backward_sums(ops, tuple(outs) + tuple(ctx_grads), clean, noisy)


_noisy = tsp.fused_noisy_op(_forward, _backward, clean_family='triton', stores_rows=True)


def noisy_delta_rule_triton(clean: tuple[jax.Array, ...], noisy: tuple[jax.Array, ...],
                            segment_ids: jax.Array, block_starts: jax.Array, *, scale: float,
                            chunk_size: int = 64, max_block: int = 32,
                            interpret: bool = False, backward: str = 'autodiff') -> jax.Array:
  """Noisy-view outputs of the two-stream gated delta rule: the 'chunked' schedule's forward as one
  jax-triton kernel. Same contract as `two_stream_pallas.noisy_delta_rule_pallas`: backward
  'autodiff' (of the pure-JAX chunked schedule) or 'kernel' (`_backward`: four kernels, then
  plain JAX sums); `interpret=True` runs Triton's interpreter on the host.

  Raises:
    ValueError: as `two_stream_pallas.check_arguments`, or (not interpreting) no GPU.
  """
  tsp.check_arguments(clean, noisy, max_block, backward, interpret)
  if not interpret and jax.default_backend() != 'gpu':
    raise ValueError(f'the triton two-stream kernel needs a GPU (backend is '
                     f'{jax.default_backend()!r})')
  if triton is None:
    raise ValueError('the triton two-stream kernel needs the triton package')
  return _noisy(tuple(clean), tuple(noisy), segment_ids, block_starts, float(scale),
                int(chunk_size), int(max_block), forward_launch(noisy[0].dtype, max_block),
                bool(interpret), backward)
