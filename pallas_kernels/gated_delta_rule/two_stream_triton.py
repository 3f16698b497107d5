"""Noisy views of the two-stream gated delta rule as one jax-triton kernel (forward).

The same schedule as `two_stream_pallas` (see its docstring and kernels.md 6.1), written against
Triton directly: one program per (window n, batch x value head x view x V tile) walks window n's
row tiles, solving each tile's blocks against itself and the carried previous tile, and rebuilds
every block's seed state from the clean chunk checkpoint h_n and clean chunk n through the prefix
identity, so no per-block state is ever formed. The JAX side (clean pass, padding, slot metadata,
picking each slot's output from its seed's window) is `two_stream_pallas`'s. The backward is
`jax.vjp` of the pure-JAX chunked schedule (`two_stream_xla.noisy_delta_rule_chunked`), as the
Pallas kernel's default.

`interpret=True` runs the kernel in Triton's interpreter on the host (`_common.triton_interpret`;
the CPU tests).
"""
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta_rule import triton as gdr_triton
from pallas_kernels.gated_delta_rule import two_stream_pallas as tsp

_F32 = jnp.float32
_BLOCK_V = 64

try:  # Only the GPU machine (or a CPU test with Triton's interpreter) has triton.
  import triton  # pylint: disable=g-import-not-at-top
  import triton.language as tl  # pylint: disable=g-import-not-at-top
except ImportError:  # pragma: no cover
  triton = None

if triton is not None:

  @triton.jit
  def noisy_kernel(q, k, v, g, beta, bsl, seed, lo, carry, kc, vc, gc, h, o,
                   NV: tl.constexpr, HQ: tl.constexpr, HV: tl.constexpr, N: tl.constexpr,
                   TPAD: tl.constexpr, K: tl.constexpr, VDP: tl.constexpr, BV: tl.constexpr,
                   C: tl.constexpr, S: tl.constexpr, N_TILES: tl.constexpr,
                   SCALE: tl.constexpr, PREC: tl.constexpr):
    """Window n of one (batch, value head, view, V tile): noisy outputs of slots
    [nC, nC + N_TILES S) (layouts: see `_forward`)."""
    n = tl.program_id(0)
    pid = tl.program_id(1)
    NVT: tl.constexpr = VDP // BV
    i_e = pid % NVT
    i_u = (pid // NVT) % NV
    i_h = (pid // (NVT * NV)) % HV
    i_b = pid // (NVT * NV * HV)
    kh = i_h // (HV // HQ)
    o_s = tl.arange(0, S)
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, K)
    o_v = i_e * BV + tl.arange(0, BV)
    # Clean context of chunk n: k [C, K], v' [C, BV], G [C], h_n [K, BV].
    ctok = (i_b * N * C + n * C + o_c).to(tl.int64)
    k_ctx = tl.load(kc + (ctok * HQ + kh)[:, None] * K + o_k[None, :])
    v_ctx = tl.load(vc + (ctok * HV + i_h)[:, None] * VDP + o_v[None, :])
    g_ctx = tl.load(gc + ctok * HV + i_h)
    h_n = tl.load(h + (((i_b * N + n) * HV + i_h).to(tl.int64) * K + o_k)[:, None] * VDP
                  + o_v[None, :])
    ipos = n * C + o_c  # clean positions of chunk n
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
      tok = base + slot
      p_qk = (tok * HQ + kh)[:, None] * K + o_k[None, :]
      p_v = (tok * HV + i_h)[:, None] * VDP + o_v[None, :]
      b_q = tl.load(q + p_qk)
      b_k = tl.load(k + p_qk)
      b_v = tl.load(v + p_v)
      b_g = tl.load(g + tok * HV + i_h)
      b_beta = tl.load(beta + tok * HV + i_h)
      mslot = (i_b * TPAD + slot).to(tl.int64)
      b_bs = tl.load(bsl + mslot)
      b_seed = tl.load(seed + mslot)
      b_lo = tl.load(lo + mslot)
      b_carry = tl.load(carry + mslot)

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
      a_ii = tl.where(strict, b_beta[:, None] * tl.dot(b_k, tl.trans(b_k), input_precision=PREC)
                      * d_ii, 0.0)
      a_ip = b_beta[:, None] * tl.dot(b_k, tl.trans(k_p), input_precision=PREC) * d_ip
      t_ii = gdr_triton.ut_inverse(a_ii, S, 'tf32x3')
      eg = tl.exp(gam)
      w = tl.dot(t_ii, b_k * (b_beta * eg)[:, None] - tl.dot(a_ip, w_p, input_precision=PREC),
                 input_precision=PREC)
      u = tl.dot(t_ii, b_v * b_beta[:, None] - tl.dot(a_ip, u_p, input_precision=PREC),
                 input_precision=PREC)

      # Rows times their seed state, from h_n and clean chunk n (prefix identity).
      at_seed = ipos[None, :] == b_seed[:, None]
      g_seed = tl.sum(tl.where(at_seed, g_ctx[None, :], 0.0), axis=1)
      local = (ipos[None, :] >= b_lo[:, None]) & (ipos[None, :] <= b_seed[:, None])
      e = tl.exp(tl.where(local, g_seed[:, None] - g_ctx[None, :], float('-inf')))  # [S, C]
      coef = tl.where(b_carry == n, tl.exp(g_seed), 0.0)
      wk = tl.dot(w, tl.trans(k_ctx), input_precision=PREC) * e
      vn = u - (tl.dot(wk, v_ctx, input_precision=PREC)
                + coef[:, None] * tl.dot(w, h_n, input_precision=PREC))
      qe = b_q * eg[:, None]
      qk_ctx = tl.dot(qe, tl.trans(k_ctx), input_precision=PREC) * e
      b_o = (tl.dot(qk_ctx, v_ctx, input_precision=PREC)
             + coef[:, None] * tl.dot(qe, h_n, input_precision=PREC)
             + tl.dot(tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * d_ii, vn,
                      input_precision=PREC)
             + tl.dot(tl.dot(b_q, tl.trans(k_p), input_precision=PREC) * d_ip, vn_p,
                      input_precision=PREC))
      wrow = (((i_b * NV + i_u) * N + n) * (N_TILES * S) + i * S + o_s).to(tl.int64)
      tl.store(o + (wrow * HV + i_h)[:, None] * VDP + o_v[None, :], SCALE * b_o)
      k_p, g_p, gam_p, bs_p, w_p, u_p, vn_p = b_k, b_g, gam, b_bs, w, u, vn


def _num_warps(row_tile: int) -> int:
  """Four warps up to 16-row tiles; eight for 32 (with four, ptxas gave the kernel 32 registers
  and spilled 24 KB per thread at K = V tile = 128 / 64, launch.kernel_registers' check)."""
  return 4 if row_tile <= 16 else 8


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7, 8))
def _forward(clean, noisy, segment_ids, block_starts, scale, chunk_size, max_block, block_v,
             interpret):
  b, nv, t, hq, kd = noisy[0].shape
  hv, vd = clean[2].shape[2:]
  z = tsp._sizes(t, kd, vd, chunk_size, max_block, block_v)  # pylint: disable=protected-access
  wd = z.c + z.s
  ctx = tsp._clean_pass(clean, segment_ids, scale, z.c)  # pylint: disable=protected-access
  noisy_p, meta, ctx, group = tsp._operands(  # pylint: disable=protected-access
      clean[1], ctx, noisy, segment_ids, block_starts, z)
  # Layouts: noisy q, k [B, V, Tp, H, Kp], v [B, V, Tp, HV, Vp], g, beta [B, V, Tp, HV] (fp32);
  # slot meta [B, Tp] int32; clean k [B, N C, H, Kp], v' [B, N C, HV, Vp], G [B, N C, HV];
  # h [B, N, HV, Kp, Vp]; out [B, V, N, C + S, HV, Vp].
  prec = 'tf32x3' if noisy[0].dtype == _F32 else 'tf32'
  o = gdr_triton._jt(interpret).triton_call(  # pylint: disable=protected-access
      *noisy_p, *meta, *ctx, kernel=noisy_kernel,
      out_shape=jax.ShapeDtypeStruct((b, nv, z.n, wd, hv, z.vdp), _F32),
      grid=(z.n, b * hv * nv * (z.vdp // z.bv)), num_warps=_num_warps(z.s), num_stages=2,
      NV=nv, HQ=hq, HV=hv, N=z.n, TPAD=z.tpad, K=z.kp, VDP=z.vdp, BV=z.bv, C=z.c, S=z.s,
      N_TILES=wd // z.s, SCALE=scale, PREC=prec)
  return tsp._from_windows(o, group, z.c, t, vd)  # pylint: disable=protected-access


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _noisy(clean, noisy, segment_ids, block_starts, scale, chunk_size, max_block, block_v,
           interpret):
  return _forward(clean, noisy, segment_ids, block_starts, scale, chunk_size, max_block, block_v,
                  interpret)


def _noisy_fwd(clean, noisy, segment_ids, block_starts, scale, chunk_size, max_block, block_v,
               interpret):
  o = _forward(clean, noisy, segment_ids, block_starts, scale, chunk_size, max_block, block_v,
               interpret)
  return o, (clean, noisy, segment_ids, block_starts)


def _noisy_bwd(scale, chunk_size, max_block, block_v, interpret, res, do):
  del block_v, interpret
  return tsp.chunked_schedule_vjp(res, do, scale, chunk_size, max_block) + (None, None)


_noisy.defvjp(_noisy_fwd, _noisy_bwd)


def noisy_delta_rule_triton(clean: tuple[jax.Array, ...], noisy: tuple[jax.Array, ...],
                            segment_ids: jax.Array, block_starts: jax.Array, *, scale: float,
                            chunk_size: int = 64, max_block: int = 32,
                            interpret: bool = False) -> jax.Array:
  """Noisy-view outputs of the two-stream gated delta rule: the 'chunked' schedule's forward as one
  jax-triton kernel. Same contract as `two_stream_pallas.noisy_delta_rule_pallas` (its default
  autodiff backward); `interpret=True` runs Triton's interpreter on the host.

  Raises:
    ValueError: max_block below 1, HV not a multiple of H, or (not interpreting) no GPU.
  """
  tsp.check_arguments(clean, noisy, max_block)
  if not interpret and jax.default_backend() != 'gpu':
    raise ValueError(f'the triton two-stream kernel needs a GPU (backend is '
                     f'{jax.default_backend()!r})')
  if triton is None:
    raise ValueError('the triton two-stream kernel needs the triton package')
  return _noisy(tuple(clean), tuple(noisy), segment_ids, block_starts, float(scale),
                int(chunk_size), int(max_block), _BLOCK_V, bool(interpret))
