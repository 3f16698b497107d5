"""Noisy views of the two-stream gated delta rule as jax-triton kernels (forward and backward).

The same schedule as `two_stream_pallas` (see its docstring and kernels.md 6.1), written against
Triton directly: one program per (window n, batch x value head x view x V tile) walks window n's
row tiles, solving each tile's blocks against itself and the carried previous tile, and rebuilds
every block's seed state from the clean chunk checkpoint h_n and clean chunk n through the prefix
identity, so no per-block state is ever formed; each slot's output is stored by its seed's window
only, straight into the slot layout. The JAX side (clean pass, padding, slot metadata, the
backward's window cotangents and sums) is `two_stream_pallas`'s.
Backward: `jax.vjp` of the pure-JAX chunked schedule (default, as the Pallas kernel's), or
`noisy_bwd_kernel` (backward='kernel'): per window, each step rebuilds the WY step of two row
tiles and backpropagates the later tile's output cotangent through it, into the noisy inputs and
the window's clean inputs.

`interpret=True` runs the kernel in Triton's interpreter on the host (`_common.triton_interpret`;
the CPU tests). The kernels widen noisy q, k, v and clean k to fp32 as they load them: the forward
reads them as given, the backward kernel fp32 copies (each the faster on an H200, see below).
"""
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta_rule import triton as gdr_triton
from pallas_kernels.gated_delta_rule import two_stream_pallas as tsp

_F32 = jnp.float32
# The backward kernel's products: bf16 operands for 16-bit inputs, TF32x3 for fp32 inputs. Its
# V tile and row tiles are bounded by shared memory (Hopper has 227 KiB; sm_90a at K = 128, by
# launch.kernel_registers): with bf16 operands, 16-row tiles take 78 / 92 / 120 KiB at V tiles
# 16 / 32 / 64 and 32-row tiles 156 KiB at 32; with fp32 operands (TF32, as all dtypes were
# before), 16-row tiles took 202 KiB at 16 and 236 at 32, and 32-row tiles 244-364 KiB.
_BWD_PRODUCTS = {'bfloat16': 'bf16', 'float16': 'bf16', 'float32': 'tf32x3'}
_BWD_BLOCK_V = {'bf16': 32, 'tf32x3': 16}
MAX_FP32_KERNEL_BACKWARD_BLOCK = 16
MAX_FP32_KERNEL_BACKWARD_K = 64


def kernel_backward_takes(max_block: int, dtype, k_dim: int) -> bool:
  """Whether `backward='kernel'` fits shared memory for this max_block, input dtype and key size.
  fp32 (TF32x3 products) at 16-row tiles and V tile 16: 148 KiB at K = 64, 260 KiB at K = 128."""
  return jnp.dtype(dtype) != _F32 or (max_block <= MAX_FP32_KERNEL_BACKWARD_BLOCK
                                      and k_dim <= MAX_FP32_KERNEL_BACKWARD_K)


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
  def _window_context(kc, vc, gc, h, n, NV: tl.constexpr, HQ: tl.constexpr, HV: tl.constexpr,
                      N: tl.constexpr, K: tl.constexpr, VDP: tl.constexpr, BV: tl.constexpr,
                      C: tl.constexpr, CTX_BF16: tl.constexpr = False):
    """This program's (batch, value head, view, V tile) from program_id(1), its key head, its V
    columns, and clean chunk n's context: k [C, K], v' [C, BV], G [C], h_n [K, BV] (fp32; with
    CTX_BF16 k, v' and h_n rounded to bf16, as bf16 products would round them)."""
    pid = tl.program_id(1)
    NVT: tl.constexpr = VDP // BV
    i_e = pid % NVT
    i_u = (pid // NVT) % NV
    i_h = (pid // (NVT * NV)) % HV
    i_b = pid // (NVT * NV * HV)
    kh = i_h // (HV // HQ)
    o_k = tl.arange(0, K)
    o_v = i_e * BV + tl.arange(0, BV)
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
                 HQ: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, VDP: tl.constexpr):
    """Noisy inputs and metadata of the slots `slot` [R] of this view (tokens from `base`,
    metadata from `mbase`): q, k [R, K], v [R, BV], g, beta, block start, seed, lo, carry [R]."""
    tok = base + slot
    p_qk = (tok * HQ + kh)[:, None] * K + tl.arange(0, K)[None, :]
    mslot = (mbase + slot).to(tl.int64)
    return (tl.load(q + p_qk).to(tl.float32), tl.load(k + p_qk).to(tl.float32),
            tl.load(v + (tok * HV + i_h)[:, None] * VDP + o_v[None, :]).to(tl.float32),
            tl.load(g + tok * HV + i_h), tl.load(beta + tok * HV + i_h), tl.load(bsl + mslot),
            tl.load(seed + mslot), tl.load(lo + mslot), tl.load(carry + mslot))

  @triton.jit
  def _seed_terms(ipos, g_ctx, b_seed, b_lo, b_carry, n):
    """How rows reach their seed state from window n (prefix identity; two_stream_pallas's
    `_seed_terms`): the one-hot [R, C] of the seed, e [R, C] = e^{G_seed - G_i} on the seed's
    local sum (else 0) and coef [R] = e^{G_seed} where the row also reads h_n (else 0)."""
    at_seed = ipos[None, :] == b_seed[:, None]
    g_seed = tl.sum(tl.where(at_seed, g_ctx[None, :], 0.0), axis=1)
    local = (ipos[None, :] >= b_lo[:, None]) & (ipos[None, :] <= b_seed[:, None])
    e = tl.exp(tl.where(local, g_seed[:, None] - g_ctx[None, :], float('-inf')))
    coef = tl.where(b_carry == n, tl.exp(g_seed), 0.0)
    return at_seed, e, coef

  @triton.jit
  def noisy_kernel(q, k, v, g, beta, bsl, seed, lo, carry, kc, vc, gc, h, o,
                   NV: tl.constexpr, HQ: tl.constexpr, HV: tl.constexpr, N: tl.constexpr,
                   T: tl.constexpr, TPAD: tl.constexpr, K: tl.constexpr, VDP: tl.constexpr,
                   BV: tl.constexpr, C: tl.constexpr, S: tl.constexpr, N_TILES: tl.constexpr,
                   SCALE: tl.constexpr, PREC: tl.constexpr):
    """Window n of one (batch, value head, view, V tile): noisy outputs of slots
    [nC, nC + N_TILES S), each stored by the window of its seed's chunk only, so every slot of
    [0, T) is written once (layouts: see `_forward`)."""
    n = tl.program_id(0)
    i_b, i_h, i_u, i_e, kh, o_v, k_ctx, v_ctx, g_ctx, h_n = _window_context(
        kc, vc, gc, h, n, NV, HQ, HV, N, K, VDP, BV, C, PREC == 'bf16')
    o_s = tl.arange(0, S)
    ipos = n * C + tl.arange(0, C)  # clean positions of chunk n
    row = o_s[:, None]
    col = o_s[None, :]
    base = ((i_b * NV + i_u) * TPAD).to(tl.int64)  # this view's row of slots
    k_p = tl.zeros([S, K], dtype=tl.float32)
    w_p = tl.zeros([S, K], dtype=tl.float32)
    u_p = tl.zeros([S, BV], dtype=tl.float32)
    vn_p = tl.zeros([S, BV], dtype=tl.float32)
    g_p = tl.zeros([S], dtype=tl.float32)
    gam_p = tl.zeros([S], dtype=tl.float32)
    bs_p = tl.full([S], -1, dtype=tl.int32)
    for i in range(N_TILES):
      slot = n * C + i * S + o_s
      b_q, b_k, b_v, b_g, b_beta, b_bs, b_seed, b_lo, b_carry = _slot_rows(
          q, k, v, g, beta, bsl, seed, lo, carry, slot, base, i_b * TPAD, kh, i_h, o_v,
          HQ, HV, K, VDP)

      # The blocks' WY step, banded: this tile against itself and the previous tile.
      same = b_bs[:, None] == b_bs[None, :]
      causal = same & (col <= row)
      strict = same & (col < row)
      same_p = b_bs[:, None] == bs_p[None, :]
      gam = (tl.sum(tl.where(causal, b_g[None, :], 0.0), axis=1)
             + tl.sum(tl.where(same_p, g_p[None, :], 0.0), axis=1))
      # Mask the exponent, not the result: e^{positive} outside the blocks could overflow.
      d_ii = tl.exp(tl.where(causal, gam[:, None] - gam[None, :], float('-inf')))
      d_ip = tl.exp(tl.where(same_p, gam[:, None] - gam_p[None, :], float('-inf')))
      a_ii = tl.where(strict, b_beta[:, None] * _mm(b_k, tl.trans(b_k), PREC) * d_ii, 0.0)
      a_ip = b_beta[:, None] * _mm(b_k, tl.trans(k_p), PREC) * d_ip
      t_ii = gdr_triton.ut_inverse(a_ii, S, 'tf32x3')
      eg = tl.exp(gam)
      w = _mm(t_ii, b_k * (b_beta * eg)[:, None] - _mm(a_ip, w_p, PREC), PREC)
      u = _mm(t_ii, b_v * b_beta[:, None] - _mm(a_ip, u_p, PREC), PREC)

      # Rows times their seed state, from h_n and clean chunk n (prefix identity).
      _, e, coef = _seed_terms(ipos, g_ctx, b_seed, b_lo, b_carry, n)  # e [S, C]
      wk = _mm(w, tl.trans(k_ctx), PREC) * e
      vn = u - (_mm(wk, v_ctx, PREC) + coef[:, None] * _mm(w, h_n, PREC))
      qe = b_q * eg[:, None]
      qk_ctx = _mm(qe, tl.trans(k_ctx), PREC) * e
      b_o = (_mm(qk_ctx, v_ctx, PREC)
             + coef[:, None] * _mm(qe, h_n, PREC)
             + _mm(_mm(b_q, tl.trans(b_k), PREC) * d_ii, vn, PREC)
             + _mm(_mm(b_q, tl.trans(k_p), PREC) * d_ip, vn_p, PREC))
      own = (b_seed // C == n) & (slot < T)  # this window is the slot's seed's
      orow = ((i_b * NV + i_u) * T + slot).to(tl.int64)
      tl.store(o + (orow * HV + i_h)[:, None] * VDP + o_v[None, :], SCALE * b_o,
               mask=own[:, None])
      k_p, g_p, gam_p, bs_p, w_p, u_p, vn_p = b_k, b_g, gam, b_bs, w, u, vn


if triton is not None:

  @triton.jit
  def _halves(x, S: tl.constexpr, X: tl.constexpr):
    """[2S, X] -> its rows [0, S) and [S, 2S)."""
    return tl.split(tl.permute(tl.reshape(x, (2, S, X)), (1, 2, 0)))

  @triton.jit
  def _halves1(x, S: tl.constexpr):
    """[2S] -> its entries [0, S) and [S, 2S)."""
    return tl.split(tl.trans(tl.reshape(x, (2, S))))

  @triton.jit
  def _cross_bwd(x, xk, xh, dy, e, coef, at_seed, k_ctx, v_ctx, h_n, PREC: tl.constexpr):
    """Backward of cross(X) = ((X Kc^T) * E) V' + coef (X h) for the cotangent dy [R, BV]:
    (dX [R, K], dKc [C, K], dV' [C, BV], dG [C], dh [K, BV]); xk = X Kc^T, xh = X h."""
    dye = _mm(dy, tl.trans(v_ctx), PREC) * e
    dx = (_mm(dye, k_ctx, PREC)
          + coef[:, None] * _mm(dy, tl.trans(h_n), PREC))
    pe = dye * xk  # d/d(G_seed - G_i) of the local terms
    dseed = tl.sum(pe, axis=1) + coef * tl.sum(dy * xh, axis=1)  # d/dG_seed
    d_g = tl.sum(tl.where(at_seed, dseed[:, None], 0.0), axis=0) - tl.sum(pe, axis=0)
    d_kc = _mm(tl.trans(dye), x, PREC)
    d_vc = _mm(tl.trans(xk * e), dy, PREC)
    d_h = _mm(tl.trans(x), dy * coef[:, None], PREC)
    return dx, d_kc, d_vc, d_g, d_h

  @triton.jit
  def noisy_bwd_kernel(q, k, v, g, beta, bsl, seed, lo, carry, kc, vc, gc, h, do,
                       dq, dk, dv, dg, db, dkc, dvc, dgc, dh,
                       NV: tl.constexpr, HQ: tl.constexpr, HV: tl.constexpr, N: tl.constexpr,
                       TPF: tl.constexpr, K: tl.constexpr, VDP: tl.constexpr, BV: tl.constexpr,
                       C: tl.constexpr, S: tl.constexpr, N_TILES: tl.constexpr,
                       SCALE: tl.constexpr, PREC: tl.constexpr):
    """Gradients of one window of one (batch, value head, view, V tile), kernels.md 6.2 (the
    Pallas `_noisy_bwd_kernel`'s algorithm; layouts in `two_stream_pallas.backward_shapes`).
    Step i rebuilds the WY step of row tiles (i - 1, i) as one 2S-row system and backpropagates
    tile i's output cotangent through it; tile i - 1 is then complete and stored."""
    n = tl.program_id(0)
    NVT: tl.constexpr = VDP // BV
    R: tl.constexpr = 2 * S
    ROWS: tl.constexpr = S + N_TILES * S
    i_b, i_h, i_u, i_e, kh, o_v, k_ctx, v_ctx, g_ctx, h_n = _window_context(
        kc, vc, gc, h, n, NV, HQ, HV, N, K, VDP, BV, C)
    o_r = tl.arange(0, R)
    o_s = tl.arange(0, S)
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, K)
    ipos = n * C + o_c
    row = o_r[:, None]
    col = o_r[None, :]
    in_tile = o_r >= S  # rows of tile i: only their outputs are backpropagated
    base = ((i_b * NV + i_u) * TPF).to(tl.int64)
    wbase = (((i_b * NV + i_u) * N + n) * ROWS).to(tl.int64)
    acc_dq = tl.zeros([S, K], dtype=tl.float32)
    acc_dk = tl.zeros([S, K], dtype=tl.float32)
    acc_dv = tl.zeros([S, BV], dtype=tl.float32)
    acc_dg = tl.zeros([S], dtype=tl.float32)
    acc_db = tl.zeros([S], dtype=tl.float32)
    s_dkc = tl.zeros([C, K], dtype=tl.float32)
    s_dvc = tl.zeros([C, BV], dtype=tl.float32)
    s_dgc = tl.zeros([C], dtype=tl.float32)
    s_dh = tl.zeros([K, BV], dtype=tl.float32)
    for i in range(N_TILES):
      slot = n * C + i * S + o_r  # front-padded slots of tiles (i - 1, i)
      b_q, b_k, b_v, b_g, b_beta, b_bs, b_seed, b_lo, b_carry = _slot_rows(
          q, k, v, g, beta, bsl, seed, lo, carry, slot, base, i_b * TPF, kh, i_h, o_v,
          HQ, HV, K, VDP)
      wrow = wbase + i * S + o_r
      b_do = tl.load(do + (wrow * HV + i_h)[:, None] * VDP + o_v[None, :])
      dos = SCALE * tl.where(in_tile[:, None], b_do, 0.0)

      # Stage 1: the WY step and the seed products of both tiles.
      same = b_bs[:, None] == b_bs[None, :]
      causal = same & (col <= row)
      strict = same & (col < row)
      gam = tl.sum(tl.where(causal, b_g[None, :], 0.0), axis=1)
      dmat = tl.exp(tl.where(causal, gam[:, None] - gam[None, :], float('-inf')))
      kk = _mm(b_k, tl.trans(b_k), PREC)
      qk = _mm(b_q, tl.trans(b_k), PREC)
      a = tl.where(strict, b_beta[:, None] * kk * dmat, 0.0)
      t = gdr_triton.ut_inverse(a, R, 'tf32x3')
      eg = tl.exp(gam)
      kb = b_k * (b_beta * eg)[:, None]
      vb = b_v * b_beta[:, None]
      w = _mm(t, kb, PREC)
      qe = b_q * eg[:, None]
      at_seed, e, coef = _seed_terms(ipos, g_ctx, b_seed, b_lo, b_carry, n)
      wk = _mm(w, tl.trans(k_ctx), PREC)
      wh = _mm(w, h_n, PREC)
      vn = (_mm(t, vb, PREC) - _mm(wk * e, v_ctx, PREC)
            - coef[:, None] * wh)

      # Stage 2: the intra-block output term O += (Q K^T * D) V_new.
      dvn = _mm(tl.trans(qk * dmat), dos, PREC)
      ds = _mm(dos, tl.trans(vn), PREC) * dmat
      b_dq = _mm(ds, b_k, PREC)
      b_dk = _mm(tl.trans(ds), b_q, PREC)
      m = ds * qk
      dgam = tl.sum(m, axis=1) - tl.sum(m, axis=0)

      # Stage 3: the seed products, for X = e^G Q (cotangent dO) and X = W (cotangent -dV_new).
      dqe, kc_q, vc_q, gc_q, h_q = _cross_bwd(
          qe, _mm(qe, tl.trans(k_ctx), PREC),
          _mm(qe, h_n, PREC), dos, e, coef, at_seed, k_ctx, v_ctx, h_n, PREC)
      dw, kc_w, vc_w, gc_w, h_w = _cross_bwd(w, wk, wh, -dvn, e, coef, at_seed, k_ctx, v_ctx,
                                             h_n, PREC)
      s_dkc += kc_q + kc_w
      s_dvc += vc_q + vc_w
      s_dgc += gc_q + gc_w
      s_dh += h_q + h_w
      b_dq += dqe * eg[:, None]
      dgam += tl.sum(dqe * qe, axis=1)

      # Stage 4: the WY backward: W = T diag(beta e^Gam) K, U = T diag(beta) V, dU = dV_new.
      tt = tl.trans(t)
      dkb = _mm(tt, dw, PREC)
      dvb = _mm(tt, dvn, PREC)
      dkb_k = tl.sum(dkb * b_k, axis=1)
      b_dk += dkb * (b_beta * eg)[:, None]
      b_dv = dvb * b_beta[:, None]
      b_db = dkb_k * eg + tl.sum(dvb * b_v, axis=1)
      dgam += dkb_k * b_beta * eg
      dt = (_mm(dw, tl.trans(kb), PREC)
            + _mm(dvn, tl.trans(vb), PREC))
      da = tl.where(strict, -_mm(_mm(tt, dt, PREC), tt,
                                    PREC), 0.0)
      dkk = da * dmat * b_beta[:, None]
      b_dk += (_mm(dkk, b_k, PREC)
               + _mm(tl.trans(dkk), b_k, PREC))
      b_db += tl.sum(da * dmat * kk, axis=1)
      m = dkk * kk
      dgam += tl.sum(m, axis=1) - tl.sum(m, axis=0)
      b_dg = tl.sum(tl.where(causal, dgam[:, None], 0.0), axis=0)

      # Stage 5: tile i - 1 is complete: store it (window rows [iS, iS + S)); carry tile i.
      orow = wbase + i * S + o_s
      prev, cur = _halves(b_dq, S, K)
      tl.store(dq + ((orow * HV + i_h) * NVT + i_e)[:, None] * K + o_k[None, :], prev + acc_dq)
      acc_dq = cur
      prev, cur = _halves(b_dk, S, K)
      tl.store(dk + ((orow * HV + i_h) * NVT + i_e)[:, None] * K + o_k[None, :], prev + acc_dk)
      acc_dk = cur
      prev, cur = _halves(b_dv, S, BV)
      tl.store(dv + (orow * HV + i_h)[:, None] * VDP + o_v[None, :], prev + acc_dv)
      acc_dv = cur
      prev1, cur1 = _halves1(b_dg, S)
      tl.store(dg + (orow * HV + i_h) * NVT + i_e, prev1 + acc_dg)
      acc_dg = cur1
      prev1, cur1 = _halves1(b_db, S)
      tl.store(db + (orow * HV + i_h) * NVT + i_e, prev1 + acc_db)
      acc_db = cur1
    orow = wbase + N_TILES * S + o_s
    tl.store(dq + ((orow * HV + i_h) * NVT + i_e)[:, None] * K + o_k[None, :], acc_dq)
    tl.store(dk + ((orow * HV + i_h) * NVT + i_e)[:, None] * K + o_k[None, :], acc_dk)
    tl.store(dv + (orow * HV + i_h)[:, None] * VDP + o_v[None, :], acc_dv)
    tl.store(dg + (orow * HV + i_h) * NVT + i_e, acc_dg)
    tl.store(db + (orow * HV + i_h) * NVT + i_e, acc_db)
    crow = ((i_b * NV + i_u) * N * C + n * C + o_c).to(tl.int64)
    tl.store(dkc + ((crow * HV + i_h) * NVT + i_e)[:, None] * K + o_k[None, :], s_dkc)
    tl.store(dvc + (crow * HV + i_h)[:, None] * VDP + o_v[None, :], s_dvc)
    tl.store(dgc + (crow * HV + i_h) * NVT + i_e, s_dgc)
    tl.store(dh + ((((i_b * NV + i_u) * N + n) * HV + i_h).to(tl.int64) * K + o_k)[:, None] * VDP
             + o_v[None, :], s_dh)


# How the fused forward reads and multiplies 16-bit inputs, as measured on an H200 (bench_schedules,
# clean + noisy forward, T = 4096, H = 16, K = V = 128, bf16, block 4, V = 2, one run, 2026-12-02):
# bf16 products (operands rounded to bf16, fp32 accumulation; the clean context k, v' and h_n
# loaded as bf16) with noisy q, k, v and clean k read as given took 1.72 ms; bf16 products from
# fp32 copies 1.82; TF32 products from fp32 copies 1.89 and 1.94; bf16 at a V tile of 64, 2.41.
# Reading as given also saves the copies (temp 0.189 against 0.314 GiB). The backward kernel reads
# fp32 copies: as given it took 22.6 ms against 18.4-18.8 (2026-12-01). The UT inverse stays
# TF32x3, as are all products for fp32 inputs.


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


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7, 8))
def _forward(clean, noisy, segment_ids, block_starts, scale, chunk_size, max_block, launch,
             interpret):
  b, nv, t, hq, kd = noisy[0].shape
  hv, vd = clean[2].shape[2:]
  block_v, num_warps = launch
  z = tsp._sizes(t, kd, vd, chunk_size, max_block, block_v)  # pylint: disable=protected-access
  wd = z.c + z.s
  # pylint: disable-next=protected-access
  ctx = tsp._clean_pass(clean, segment_ids, z.c, 'triton', interpret)
  noisy_p, meta, ctx, _ = tsp._operands(  # pylint: disable=protected-access
      clean[1], ctx, noisy, segment_ids, block_starts, z, keep_dtype=True)
  # Layouts: noisy q, k [B, V, Tp, H, Kp], v [B, V, Tp, HV, Vp] (the inputs' dtype, as clean k), g, beta [B, V, Tp, HV] (fp32);
  # slot meta [B, Tp] int32; clean k [B, N C, H, Kp], v' [B, N C, HV, Vp], G [B, N C, HV];
  # h [B, N, HV, Kp, Vp]; out [B, V, T, HV, Vp] (slots: no window layout to pick from).
  prec = _forward_products(noisy[0].dtype)
  o = gdr_triton._jt(interpret).triton_call(  # pylint: disable=protected-access
      *noisy_p, *meta, *ctx, kernel=noisy_kernel,
      out_shape=jax.ShapeDtypeStruct((b, nv, t, hv, z.vdp), _F32),
      grid=(z.n, b * hv * nv * (z.vdp // z.bv)), num_warps=num_warps,
      num_stages=2,
      NV=nv, HQ=hq, HV=hv, N=z.n, T=t, TPAD=z.tpad, K=z.kp, VDP=z.vdp, BV=z.bv, C=z.c, S=z.s,
      N_TILES=wd // z.s, SCALE=scale, PREC=prec)
  return o[..., :vd]


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8, 9))
def _backward(clean, noisy, segment_ids, block_starts, do, scale, chunk_size, max_block, launch,
              interpret):
  """Gradients of `_forward` for the cotangent do [B, V, T, HV, V]: (d clean, d noisy)."""
  b, nv, _, hq, _ = noisy[0].shape
  hv = clean[2].shape[2]
  prec = _BWD_PRODUCTS[jnp.dtype(noisy[0].dtype).name]
  ops = tsp.backward_operands(clean, noisy, segment_ids, block_starts, do, chunk_size, max_block,
                              min(launch[0], _BWD_BLOCK_V[prec]), 'triton', interpret)
  z = ops.z
  if prec == 'bf16' and not _compiled():
    prec = 'bf16_emulated'  # built for Triton's interpreter (TRITON_INTERPRET=1)
  outs = gdr_triton._jt(interpret).triton_call(  # pylint: disable=protected-access
      *ops.noisy, *ops.meta, *ops.ctx, ops.do, kernel=noisy_bwd_kernel,
      out_shape=tsp.backward_shapes(ops, b, nv, hv),
      grid=(z.n, b * hv * nv * (z.vdp // z.bv)), num_warps=8, num_stages=1,
      NV=nv, HQ=hq, HV=hv, N=z.n, TPF=z.s + z.tpad, K=z.kp, VDP=z.vdp, BV=z.bv, C=z.c, S=z.s,
      N_TILES=(z.c + z.s) // z.s, SCALE=scale, PREC=prec)
  return tsp.backward_sums(ops, outs, clean, noisy)


_noisy = tsp.fused_noisy_op(_forward, _backward, clean_family='triton')


def noisy_delta_rule_triton(clean: tuple[jax.Array, ...], noisy: tuple[jax.Array, ...],
                            segment_ids: jax.Array, block_starts: jax.Array, *, scale: float,
                            chunk_size: int = 64, max_block: int = 32,
                            interpret: bool = False, backward: str = 'autodiff') -> jax.Array:
  """Noisy-view outputs of the two-stream gated delta rule: the 'chunked' schedule's forward as one
  jax-triton kernel. Same contract as `two_stream_pallas.noisy_delta_rule_pallas`: backward
  'autodiff' (of the pure-JAX chunked schedule) or 'kernel' (`noisy_bwd_kernel`, kernels.md 6.2);
  `interpret=True` runs Triton's interpreter on the host.

  Raises:
    ValueError: max_block below 1, HV not a multiple of H, an unknown backward, or (not
      interpreting) no GPU.
  """
  tsp.check_arguments(clean, noisy, max_block)
  if backward not in tsp.BACKWARDS:
    raise ValueError(f'unknown backward {backward!r}; known: {tsp.BACKWARDS}')
  if backward == 'kernel' and not kernel_backward_takes(max_block, noisy[0].dtype,
                                                         noisy[0].shape[-1]):
    raise ValueError(f'the triton backward kernel takes max_block <= '
                     f'{MAX_FP32_KERNEL_BACKWARD_BLOCK} and key size <= '
                     f'{MAX_FP32_KERNEL_BACKWARD_K} with fp32 inputs (got {max_block} and '
                     f'{noisy[0].shape[-1]}: more shared memory than a GPU has); use 16-bit '
                     "inputs or backward='autodiff'")
  if not interpret and jax.default_backend() != 'gpu':
    raise ValueError(f'the triton two-stream kernel needs a GPU (backend is '
                     f'{jax.default_backend()!r})')
  if triton is None:
    raise ValueError('the triton two-stream kernel needs the triton package')
  return _noisy(tuple(clean), tuple(noisy), segment_ids, block_starts, float(scale),
                int(chunk_size), int(max_block), forward_launch(noisy[0].dtype, max_block),
                bool(interpret), backward)
