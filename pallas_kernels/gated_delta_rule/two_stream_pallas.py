"""Noisy views of the two-stream gated delta rule in Pallas: Triton on GPU, interpret on CPU.

The forward of the 'chunked' schedule (`two_stream_xla.py`, its pure-JAX reference; kernels.md 6.1)
as one pallas_call. A noisy block starting at slot bs is one chunked-delta-rule step from the clean
state S(p) after p = bs - 1, and S(p) enters only through row products, rebuilt from the clean chunk
checkpoint h_c (c = p // C) by the prefix identity (G the clean in-chunk cumulative log-decay):

    x S(p) = [carry] e^{G_p} (x h_c) + sum_{lo(p) <= i <= p} e^{G_p - G_i} (x.k_i) v'_i

One program per (window n, batch b, value head hv, view, V tile). Window n holds the noisy slots
[nC, (n + 1)C + S), S = the row tile, which contain every block whose seed lies in clean chunk n;
the program reads only h_n and clean chunk n (k, v', G). It walks the window in row tiles of S >=
max_block rows, so a block spans at most two consecutive tiles and the unit-lower solve is a block
forward substitution: X_i = (I + A_ii)^-1 (RHS_i - A_{i,i-1} X_{i-1}), carrying the previous tile.
No per-block state is ever formed (in registers or in HBM). Each slot then takes its output from
its seed's window (its own chunk's or the previous one), outside the kernel.

Padding is exact: K and V to powers of two >= 16 (zero keys, queries, values), T to whole windows
(zero k/v, g = beta = 0, each padding slot a block of its own), C to a power of two >= 16.

Gradients (kernels.md 6.2): a second pallas_call on the same grid walks each window's row tiles
again. Step i rebuilds the WY step of tiles (i - 1, i) as one 2S-row system with no carry from
tile i - 2, which is exact for every block reaching into tile i (a block spans at most two tiles),
and backpropagates tile i's output cotangent through it: into the noisy q, k, v, g, beta of both
tiles (tile i - 1 is then complete and stored) and into the window's clean inputs (k, v', G of
chunk n and h_n, summed in registers and stored once per program). Plain JAX sums the overlapping
windows, V tiles, views and GQA heads, and carries the v', G, h cotangents into the clean q, k, v,
g, beta through `jax.vjp` of the clean chunked pass. Opt-in (`backward='kernel'`): it matches in
interpret mode, but at K = 128 with the forward's V tile of 64 it asked an H200 for 356 KB of
shared memory (232 KB available); its V tile is now 32, not yet run on a GPU. The default backward
is still `jax.vjp` of the pure-JAX `noisy_delta_rule_chunked`
(`backward='autodiff'`).
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import backend
from pallas_kernels.gated_delta_rule import api as gdr_api
from pallas_kernels.gated_delta_rule import pallas as gdr_pallas
from pallas_kernels.gated_delta_rule import reference
from pallas_kernels.gated_delta_rule import two_stream_xla
from pallas_kernels.gated_delta_rule import xla as gdr_xla

_F32 = jnp.float32
_EXACT = jax.lax.Precision.HIGHEST  # fp32 inputs, and the unit-lower solve always
_MMA = jax.lax.Precision.DEFAULT  # 16-bit inputs: TF32 tensor-core products, as the chunked kernels
_FAR = 2 ** 30  # `lo` of slots whose seed state is zero: no clean token is that far
# The backward's products with 16-bit inputs: operands rounded to bf16, fp32 accumulation. TF32
# operands (fp32 in shared memory) made it ask an H200 for 280 KiB of shared memory at V tile 32
# (356 KiB at 64; 227 KiB are there); bf16 operands halve that (ptxas offline, sm_90a, K = 128:
# 252 -> 92 KiB at 32, 118 KiB at 64). Gradient RMS ratios against the fp32 schedule rose from
# 2.9e-3 to 4.5e-3 (CPU interpreter, T = 256, K = 128; fla's limits 8e-3 and 2e-2). The forward
# keeps TF32: its output limit is 5e-3, and bf16 products put it at 4.0e-3.
_BF16 = 'bf16'
_BLOCK_V = 64  # V tile (keeps the [K, V] checkpoint tile and the [S, V] carries in registers)


def _mm(a, b, prec, *, ta=False, tb=False):
  """fp32 a @ b (operands optionally transposed) at `prec`: _EXACT (IEEE on GPU), _MMA (TF32) or
  _BF16 (bf16 operands)."""
  # pylint: disable=protected-access
  if prec == _BF16:
    return gdr_pallas._dot(a, b, jnp.bfloat16, ta=ta, tb=tb)
  return gdr_pallas._dot(a, b, _F32, ta=ta, tb=tb, precision=prec)


def forward_num_warps(row_tile: int) -> int:
  """Warps of a fused forward kernel (Pallas and Triton): four up to 16-row tiles, eight for 32.
  With four, ptxas gave both kernels 32 registers and spilled 17-24 KB per thread at K = 128
  (launch.kernel_registers, sm_90a)."""
  return 4 if row_tile <= 16 else 8


def forward_launch(dtype, max_block: int) -> tuple[int, int]:
  """(V tile, warps) of the Pallas fused forward for these inputs."""
  del dtype
  return _BLOCK_V, forward_num_warps(row_tile(max_block))


def row_tile(max_block: int) -> int:
  """Rows S of the fused kernels' tiles: max_block raised to a power of two >= 16."""
  return backend.next_pow2(max(max_block, 16))


def _iota(shape, dim):
  return jax.lax.broadcasted_iota(jnp.int32, shape, dim)


def _tile_rows(ref, start, size):
  """Index of rows [start, start + size) of a 1-D or 2-D ref."""
  return (pl.ds(start, size),) + (slice(None),) * (len(ref.shape) - 1)


def seed_terms(g_ctx, ipos, seed, lo, carry, n):
  """How rows reach their seed state from window n's context (prefix identity).

  g_ctx [C] the clean G of chunk n; ipos [R, C] its positions; seed, lo, carry [R] (see
  `_noisy_kernel`). Returns (e [R, C] = e^{G_seed - G_i} on the seed's local sum, else 0;
  coef [R] = e^{G_seed} where the row also reads h_n, else 0; the one-hot [R, C] of the seed).
  """
  at_seed = ipos == seed[:, None]
  g_seed = jnp.sum(jnp.where(at_seed, g_ctx[None, :], 0.0), axis=1)  # one-hot: exact
  local = (ipos >= lo[:, None]) & (ipos <= seed[:, None])  # empty unless the seed is in chunk n
  e = jnp.exp(jnp.where(local, g_seed[:, None] - g_ctx[None, :], -jnp.inf))
  coef = jnp.where(carry == n, jnp.exp(g_seed), 0.0)
  return e, coef, at_seed


def _noisy_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, bs_ref, seed_ref, lo_ref, carry_ref,
                  kc_ref, vc_ref, gc_ref, h_ref, o_ref, *, c, s, n_tiles, scale, prec):
  """One window of one view: noisy outputs of slots [nC, nC + n_tiles S).

  Refs (per program): q, k [Tp, K], v [Tp, BV], g, beta [Tp] fp32 (the whole padded noisy row of
  this view and head); bs, seed, lo, carry [Tp] int32 (block start; seed position; first clean
  position of the seed's local sum, _FAR if the seed state is zero; the seed's chunk if it also
  reads the checkpoint, else -1); clean chunk n: kc [C, K], vc = v' [C, BV], gc = G [C]; h [K, BV]
  the state entering chunk n. Output o [n_tiles S, BV]; only rows of blocks seeded in chunk n are
  meaningful. Products run at `prec`; the unit-lower solve always in IEEE fp32.
  """
  n = pl.program_id(0)
  mm = lambda a, b, tb=False: _mm(a, b, prec, tb=tb)
  kp, bv = q_ref.shape[-1], o_ref.shape[-1]
  k_ctx, v_ctx, g_ctx, h = kc_ref[...], vc_ref[...], gc_ref[...], h_ref[...]
  ipos = n * c + _iota((s, c), 1)  # S C: clean positions of chunk n
  row, col = _iota((s, s), 0), _iota((s, s), 1)

  def tile(i, prev):
    k_p, g_p, gam_p, bs_p, w_p, u_p, vn_p = prev  # the previous row tile (bs_p = -1 before 0)
    rows = pl.ds(n * c + i * s, s)
    q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
    g, beta, bs = g_ref[rows], b_ref[rows], bs_ref[rows]
    seed, lo, carry = seed_ref[rows], lo_ref[rows], carry_ref[rows]

    # --- The blocks' WY step, banded: this tile against itself and the previous tile. ---
    same = bs[:, None] == bs[None, :]
    causal, strict = same & (col <= row), same & (col < row)
    same_p = bs[:, None] == bs_p[None, :]  # blocks continuing from the previous tile
    gam = (jnp.sum(jnp.where(causal, g[None, :], 0.0), axis=1)  # in-block inclusive cumsum
           + jnp.sum(jnp.where(same_p, g_p[None, :], 0.0), axis=1))
    # Mask the exponent, not the result: e^{positive} outside the blocks could overflow.
    d_ii = jnp.exp(jnp.where(causal, gam[:, None] - gam[None, :], -jnp.inf))
    d_ip = jnp.exp(jnp.where(same_p, gam[:, None] - gam_p[None, :], -jnp.inf))
    a_ii = jnp.where(strict, beta[:, None] * mm(k, k, tb=True) * d_ii, 0.0)
    a_ip = beta[:, None] * mm(k, k_p, tb=True) * d_ip
    t_ii = gdr_pallas._ut_inverse(a_ii, _EXACT)  # pylint: disable=protected-access
    eg = jnp.exp(gam)
    w = mm(t_ii, k * (beta * eg)[:, None] - mm(a_ip, w_p))
    u = mm(t_ii, v * beta[:, None] - mm(a_ip, u_p))

    # --- Rows times the seed state, from h_n and clean chunk n (prefix identity). ---
    e, coef, _ = seed_terms(g_ctx, ipos, seed, lo, carry, n)  # S C, S

    def cross(x):  # x S(seed) row by row, x [S, K]
      return mm(mm(x, k_ctx, tb=True) * e, v_ctx) + coef[:, None] * mm(x, h)

    vn = u - cross(w)  # corrected values
    o = (cross(q * eg[:, None]) + mm(mm(q, k, tb=True) * d_ii, vn)
         + mm(mm(q, k_p, tb=True) * d_ip, vn_p))
    o_ref[pl.ds(i * s, s), :] = (scale * o).astype(o_ref.dtype)
    return k, g, gam, bs, w, u, vn

  zk, zv, zs = jnp.zeros((s, kp), _F32), jnp.zeros((s, bv), _F32), jnp.zeros((s,), _F32)
  init = (zk, zs, zs, jnp.full((s,), -1, jnp.int32), zk, zv, zv)
  jax.lax.fori_loop(0, n_tiles, tile, init)


def _noisy_bwd_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, bs_ref, seed_ref, lo_ref, carry_ref,
                      kc_ref, vc_ref, gc_ref, h_ref, do_ref, dq_ref, dk_ref, dv_ref, dg_ref,
                      db_ref, dkc_ref, dvc_ref, dgc_ref, dh_ref, *, c, s, n_tiles, scale, prec):
  """Gradients of one window of one view (kernels.md 6.2), for `_noisy_kernel`'s inputs.

  Refs as `_noisy_kernel`'s, except that the noisy rows (q, k, v, g, beta, bs, seed, lo, carry) are
  front-padded by S slots (the tile before slot 0); do [S + n_tiles S, BV] the cotangent of the
  window's rows, after S zero rows. Outputs, per program: dq, dk [S + n_tiles S, K], dv [.., BV],
  dg, dbeta [..] (row r is window row r - S); dkc [C, K], dvc [C, BV], dgc [C] (for clean chunk
  n's k, v', G) and dh [K, BV] (for h_n).
  """
  n = pl.program_id(0)
  mm = lambda a, b, ta=False, tb=False: _mm(a, b, prec, ta=ta, tb=tb)
  r = 2 * s  # rows of tiles (i - 1, i)
  kp, bv = q_ref.shape[-1], do_ref.shape[-1]
  k_ctx, v_ctx, g_ctx, h = kc_ref[...], vc_ref[...], gc_ref[...], h_ref[...]
  ipos = n * c + _iota((r, c), 1)  # R C: clean positions of chunk n
  row, col = _iota((r, r), 0), _iota((r, r), 1)
  in_tile = _iota((r, bv), 0) >= s  # rows of tile i: only their outputs are backpropagated

  def step(i, acc):
    rows = pl.ds(n * c + i * s, r)  # slots [nC + (i - 1) S, nC + (i + 1) S)
    q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
    g, beta, bs = g_ref[rows], b_ref[rows], bs_ref[rows]
    e, coef, at_seed = seed_terms(g_ctx, ipos, seed_ref[rows], lo_ref[rows], carry_ref[rows], n)
    dos = scale * jnp.where(in_tile, do_ref[pl.ds(i * s, r), :], 0.0)

    # --- Stage 1: recompute the WY step and the seed products of both tiles. Rows of tile i - 1
    # in blocks from tile i - 2 come out wrong, but reach nothing that is backpropagated. ---
    same = bs[:, None] == bs[None, :]
    causal, strict = same & (col <= row), same & (col < row)
    gam = jnp.sum(jnp.where(causal, g[None, :], 0.0), axis=1)  # in-block inclusive cumsum
    dmat = jnp.exp(jnp.where(causal, gam[:, None] - gam[None, :], -jnp.inf))
    kk, qk = mm(k, k, tb=True), mm(q, k, tb=True)
    a = jnp.where(strict, beta[:, None] * kk * dmat, 0.0)
    t = gdr_pallas._ut_inverse(a, _EXACT)  # pylint: disable=protected-access
    eg = jnp.exp(gam)
    kb, vb = k * (beta * eg)[:, None], v * beta[:, None]
    w, qe = mm(t, kb), q * eg[:, None]
    wk, wh = mm(w, k_ctx, tb=True), mm(w, h)
    vn = mm(t, vb) - mm(wk * e, v_ctx) - coef[:, None] * wh  # corrected values

    # --- Stage 2: the intra-block output term, O += (Q K^T * D) V_new. ---
    dvn = mm(qk * dmat, dos, ta=True)
    ds = mm(dos, vn, tb=True) * dmat
    dq, dk = mm(ds, k), mm(ds, q, ta=True)
    m = ds * qk
    dgam = jnp.sum(m, axis=1) - jnp.sum(m, axis=0)

    # --- Stage 3: the seed products cross(X) = ((X Kc^T) * E) V' + coef (X h), for X = e^G Q
    # (cotangent dO) and X = W (cotangent -dV_new). ---
    def cross_bwd(x, xk, xh, dy):
      dye = mm(dy, v_ctx, tb=True) * e  # R C
      dx = mm(dye, k_ctx) + coef[:, None] * mm(dy, h, tb=True)
      pe = dye * xk  # d/d(G_seed - G_i) of the local terms
      dseed = jnp.sum(pe, axis=1) + coef * jnp.sum(dy * xh, axis=1)  # d/dG_seed
      dgc = jnp.sum(jnp.where(at_seed, dseed[:, None], 0.0), axis=0) - jnp.sum(pe, axis=0)
      clean = (mm(dye, x, ta=True), mm(xk * e, dy, ta=True), dgc,
               mm(x, dy * coef[:, None], ta=True))  # dKc, dV', dG, dh
      return dx, clean

    dqe, clean_q = cross_bwd(qe, mm(qe, k_ctx, tb=True), mm(qe, h), dos)
    dw, clean_w = cross_bwd(w, wk, wh, -dvn)
    dq = dq + dqe * eg[:, None]
    dgam = dgam + jnp.sum(dqe * qe, axis=1)

    # --- Stage 4: the WY backward: W = T diag(beta e^Gam) K, U = T diag(beta) V, dU = dV_new. ---
    dkb, dvb = mm(t, dw, ta=True), mm(t, dvn, ta=True)
    dkb_k = jnp.sum(dkb * k, axis=1)
    dk = dk + dkb * (beta * eg)[:, None]
    dv = dvb * beta[:, None]
    dbeta = dkb_k * eg + jnp.sum(dvb * v, axis=1)
    dgam = dgam + dkb_k * beta * eg
    dt = mm(dw, kb, tb=True) + mm(dvn, vb, tb=True)
    da = jnp.where(strict, -mm(mm(t, dt, ta=True), t, tb=True), 0.0)  # T = (I + A)^-1
    dkk = da * dmat * beta[:, None]  # A = beta_i (k_i.k_j) D_ij
    dk = dk + mm(dkk, k) + mm(dkk, k, ta=True)
    dbeta = dbeta + jnp.sum(da * dmat * kk, axis=1)
    m = dkk * kk
    dgam = dgam + jnp.sum(m, axis=1) - jnp.sum(m, axis=0)
    dg = jnp.sum(jnp.where(causal, dgam[:, None], 0.0), axis=0)  # Gam = in-block cumsum of g

    # --- Stage 5: tile i - 1 is complete: store it; carry tile i and the clean sums. ---
    out = []
    for ref, x, x_acc in zip((dq_ref, dk_ref, dv_ref, dg_ref, db_ref), (dq, dk, dv, dg, dbeta),
                             acc[:5]):
      prev, cur = jnp.split(x, 2, axis=0)  # split, not slices: the Triton lowering has no slice
      ref[_tile_rows(ref, i * s, s)] = prev + x_acc
      out.append(cur)
    return tuple(out) + tuple(a + b + d for a, b, d in zip(acc[5:], clean_q, clean_w))

  zs = lambda *shape: jnp.zeros(shape, _F32)
  init = (zs(s, kp), zs(s, kp), zs(s, bv), zs(s), zs(s), zs(c, kp), zs(c, bv), zs(c), zs(kp, bv))
  acc = jax.lax.fori_loop(0, n_tiles, step, init)
  for ref, x in zip((dq_ref, dk_ref, dv_ref, dg_ref, db_ref), acc[:5]):
    ref[_tile_rows(ref, n_tiles * s, s)] = x
  for ref, x in zip((dkc_ref, dvc_ref, dgc_ref, dh_ref), acc[5:]):
    ref[...] = x


def _slot_meta(segment_ids, block_starts, c, tpad):
  """Per-slot int32 [B, Tp] arrays: block start, seed, lo, carry (see `_noisy_kernel`)."""
  b, t = segment_ids.shape
  pos = jnp.arange(t)
  take = lambda x, i: jnp.take_along_axis(x, i, axis=1)
  seed = jnp.maximum(block_starts - 1, 0)
  valid = (block_starts >= 1) & (take(segment_ids, seed) == segment_ids)
  starts = reference.segment_starts(segment_ids, b, t)
  doc_start = take(jax.lax.cummax(jnp.where(starts, pos, 0), axis=1), seed)  # of the seed's doc
  group = seed // c  # the seed's clean chunk = the window that computes the slot
  lo = jnp.where(valid, jnp.maximum(group * c, doc_start), _FAR)
  carry = jnp.where(valid & (doc_start < group * c), group, -1)
  pad = lambda x, fill: jnp.pad(x.astype(jnp.int32), ((0, 0), (0, tpad - t)),
                                constant_values=fill)
  own = jnp.broadcast_to(jnp.arange(t, tpad, dtype=jnp.int32), (b, tpad - t))  # own blocks
  bs = jnp.concatenate([block_starts.astype(jnp.int32), own], axis=1)
  return (bs, pad(seed, 0), pad(lo, _FAR), pad(carry, -1)), group


def _pad_to(x, shape):
  return jnp.pad(x, [(0, n - d) for d, n in zip(x.shape, shape)])


class _Sizes(NamedTuple):
  """Static sizes of one call (see `_sizes`)."""

  s: int  # row tile: a block spans at most two tiles
  c: int  # chunk: blocks reach at most one chunk ahead of their seed
  kp: int  # K padded
  vdp: int  # V padded
  bv: int  # V tile
  n: int  # windows (clean chunks)
  tpad: int  # noisy slots after padding: window n reads slots [nC, (n + 1)C + S)


def chunk_length(chunk_size: int, max_block: int) -> int:
  """Chunk length C of the fused kernels' clean pass and noisy windows: chunk_size raised to a
  power of two >= the row tile."""
  return backend.next_pow2(max(chunk_size, row_tile(max_block)))


def padded_heads(kd: int, vd: int) -> tuple[int, int]:
  """(K, V) as the kernels hold them: powers of two, at least 16."""
  return backend.next_pow2(max(kd, 16)), backend.next_pow2(max(vd, 16))


def _sizes(t, kd, vd, chunk_size, max_block, block_v) -> _Sizes:
  s = row_tile(max_block)
  c = chunk_length(chunk_size, max_block)
  kp, vdp = padded_heads(kd, vd)
  n = -(-t // c)
  return _Sizes(s, c, kp, vdp, min(block_v, vdp), n, n * c + s)


def _clean_pass(clean, segment_ids, c, family=None, interpret=False):
  """What the noisy windows read of the clean stream, fp32: chunk checkpoints h [B, N, HV, K, V],
  corrected values v' [B, T, HV, V] and in-chunk cumulative log-decays G [B, T, HV].

  family: None (XLA's chunk scan) or 'pallas' | 'triton': that family's chunked kernels where they
  take the inputs (`api.chunk_checkpoints`; differentiable either way). H200 profile, T=4096, H=16,
  K=128, bf16: XLA's scan ~1.2 ms of the fused Triton forward's 3.5; intra + state pass 0.17 ms.
  Checkpoints carried by `clean` (two_stream_xla.given_checkpoints) are used as they are.
  """
  kc, vc, gc, bc = clean[1:5]
  h, v_new = two_stream_xla.given_checkpoints(clean, c) or gdr_api.chunk_checkpoints(
      kc, vc, gc, bc, segment_ids=segment_ids, chunk_size=c, family=family, interpret=interpret)
  return h, v_new, gdr_xla.chunk_cumsum(gc.astype(_F32), c)


def _operands(kc, ctx, noisy, segment_ids, block_starts, z: _Sizes, keep_dtype=False,
              pad_slots=True):
  """The kernels' padded operands: noisy (q, k, v, g, beta) [B, V, Tp, ...], slot meta [B, Tp],
  clean context (k, v', G [B, NC, ...], h), and each slot's group (its seed's chunk) [B, T].
  Noisy q, k, v and clean k are fp32, or with keep_dtype in their own dtype (for kernels that
  widen them as they load them: no convert pass, half the bytes for 16-bit inputs). Without
  pad_slots the noisy inputs keep their T slots (for kernels that mask their reads past T: no
  pad pass, which copies every noisy input)."""
  h, v_new, g_cum = ctx
  b, nv, _, hq, _ = noisy[0].shape
  hv = v_new.shape[2]
  wide = (lambda a: a) if keep_dtype else (lambda a: a.astype(_F32))
  ctx = (_pad_to(wide(kc), (b, z.n * z.c, hq, z.kp)),
         _pad_to(v_new, (b, z.n * z.c, hv, z.vdp)), _pad_to(g_cum, (b, z.n * z.c, hv)),
         _pad_to(h, (b, z.n, hv, z.kp, z.vdp)))
  meta, group = _slot_meta(segment_ids, block_starts, z.c, z.tpad)
  qn, kn, vn = (wide(a) for a in noisy[:3])
  gn, bn = (a.astype(_F32) for a in noisy[3:])
  slots = z.tpad if pad_slots else qn.shape[2]
  qn, kn = (_pad_to(x, (b, nv, slots, hq, z.kp)) for x in (qn, kn))
  vn = _pad_to(vn, (b, nv, slots, hv, z.vdp))
  gn, bn = (_pad_to(x, (b, nv, slots, hv)) for x in (gn, bn))
  return (qn, kn, vn, gn, bn), meta, ctx, group


def _in_specs(z: _Sizes, grp, rows):
  """BlockSpecs of the kernels' inputs on the grid (window, batch, value head, view, V tile): noisy
  q, k, v, g, beta and slot meta (whole rows of `rows` slots), then clean chunk n and h_n."""
  qk = pl.BlockSpec((None, None, rows, None, z.kp), lambda i, r, j, u, e: (r, u, 0, j // grp, 0))
  v = pl.BlockSpec((None, None, rows, None, z.bv), lambda i, r, j, u, e: (r, u, 0, j, e))
  gb = pl.BlockSpec((None, None, rows, None), lambda i, r, j, u, e: (r, u, 0, j))
  meta = pl.BlockSpec((None, rows), lambda i, r, j, u, e: (r, 0))
  ctx = [pl.BlockSpec((None, z.c, None, z.kp), lambda i, r, j, u, e: (r, i, j // grp, 0)),
         pl.BlockSpec((None, z.c, None, z.bv), lambda i, r, j, u, e: (r, i, j, e)),
         pl.BlockSpec((None, z.c, None), lambda i, r, j, u, e: (r, i, j)),
         pl.BlockSpec((None, None, None, z.kp, z.bv), lambda i, r, j, u, e: (r, i, j, 0, e))]
  return [qk, qk, v, gb, gb] + [meta] * 4 + ctx


def _from_windows(o, group, c, t, vd):
  """Window rows [B, V, N, C + S, HV, Vp] -> slots [B, V, T, HV, Vd]: each slot from its seed's
  window, its own chunk's (rows [0, C)) or the previous chunk's (rows [C, C + max_block))."""
  b, nv, n, wd, hv, vdp = o.shape
  o_own = o[:, :, :, :c]  # B V N C HV Vp
  o_prev = jnp.pad(o[:, :, :-1, c:], ((0, 0), (0, 0), (1, 0), (0, 2 * c - wd), (0, 0), (0, 0)))
  own = jnp.pad(group, ((0, 0), (0, n * c - t)), constant_values=n)  # padding: own window
  own = own.reshape(b, 1, n, c, 1, 1) == jnp.arange(n)[:, None, None, None]
  o = jnp.where(own, o_own, o_prev).reshape(b, nv, n * c, hv, vdp)
  return o[:, :, :t, :, :vd]


def _overlap_add(x, c, t, front):
  """Window rows [B, V, N, front + C + S, ...] (row r of window n is slot nC + r - front; front is
  0 or S) -> slots [B, V, T, ...], summed where windows overlap."""
  b, nv, n, rows = x.shape[:4]
  s = rows - c - front
  rest = ((0, 0),) * (x.ndim - 4)
  y = x[:, :, :, front:front + c]
  if front:  # chunk n's last rows, in window n + 1's front tile
    y = y + jnp.pad(x[:, :, 1:, :front], ((0, 0), (0, 0), (0, 1), (c - front, 0)) + rest)
  y = y + jnp.pad(x[:, :, :-1, front + c:], ((0, 0), (0, 0), (1, 0), (0, c - s)) + rest)
  return y.reshape((b, nv, n * c) + x.shape[4:])[:, :, :t]


def _key_heads(x, hq):
  """[..., HV, X] -> [..., H, X]: sums the value heads that share a key head (x itself where
  each key head has one: no fp32 round trip of a 16-bit x)."""
  if x.shape[-2] == hq:
    return x
  return x.reshape(x.shape[:-2] + (hq, -1, x.shape[-1])).sum(-2)


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7, 8))
def _forward(clean, noisy, segment_ids, block_starts, scale, chunk_size, max_block, launch,
             interpret):
  b, nv, t, hq, kd = noisy[0].shape
  hv, vd = clean[2].shape[2:]
  block_v, num_warps = launch
  z = _sizes(t, kd, vd, chunk_size, max_block, block_v)
  wd = z.c + z.s

  # --- Stage 1: clean chunk checkpoints (fp32); padded operands and slot metadata. ---
  ctx = _clean_pass(clean, segment_ids, z.c, 'pallas', interpret)
  noisy_p, meta, ctx, group = _operands(clean[1], ctx, noisy, segment_ids, block_starts, z)

  # --- Stage 2: the kernel, grid (window, batch, value head, view, V tile). ---
  out_spec = pl.BlockSpec((None, None, None, wd, None, z.bv),
                          lambda i, r, j, u, e: (r, u, i, 0, j, e))
  prec = _EXACT if noisy[0].dtype == _F32 else _MMA
  kernel = functools.partial(_noisy_kernel, c=z.c, s=z.s, n_tiles=wd // z.s, scale=scale,
                             prec=prec)
  o = pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((b, nv, z.n, wd, hv, z.vdp), _F32),
      grid=(z.n, b, hv, nv, z.vdp // z.bv), in_specs=_in_specs(z, hv // hq, z.tpad),
      out_specs=out_spec,
      # pylint: disable-next=protected-access
      compiler_params=gdr_pallas._params(interpret, num_warps, 2),
      interpret=interpret, name='two_stream_noisy_fwd')(*noisy_p, *meta, *ctx)

  # --- Stage 3: each slot from its seed's window. ---
  return _from_windows(o, group, z.c, t, vd)


class BackwardOperands(NamedTuple):
  """What a backward kernel reads (see `backward_operands`) and what its sums need."""

  z: _Sizes
  noisy: tuple  # q, k, v, g, beta [B, V, front + Tp, ...]
  meta: tuple  # block start, seed, lo, carry [B, front + Tp]
  ctx: tuple  # clean k [B, N C, H, Kp], v' [B, N C, HV, Vp], G [B, N C, HV], h [B, N, HV, Kp, Vp]
  do: jax.Array  # window cotangents [B, V, N, front + C + S, HV, Vp], or slots [B, V, T, HV, Vp]
  clean_vjp: object  # pullback of the clean pass
  front: int  # zero rows in front of every noisy row and window: S, or 0 (`backward_operands`)
  slots: bool  # dO and the noisy gradients in the slot layout, not per window


def backward_operands(clean, noisy, segment_ids, block_starts, do, chunk_size, max_block,
                      block_v, clean_family=None, interpret=False, *, front_tile=True,
                      keep_dtype=False, slot_do=False, pad_slots=True) -> BackwardOperands:
  """Stages 1-2 of the backward: the clean intermediates the kernel reads (with their pullback;
  `_clean_pass`'s family), padded operands (`_operands`, fp32 unless keep_dtype), and the window
  cotangents (the transpose of the slot selection) or, with slot_do, dO as given, V padded (a
  kernel that reads each slot's dO in its owner window and writes the noisy gradients per
  slot); with front_tile, a tile of zero rows in front of every noisy row and window (the tile
  before the first); without pad_slots, noisy inputs of T slots (`_operands`)."""
  b, nv, t, _, kd = noisy[0].shape
  vd = clean[2].shape[3]
  z = _sizes(t, kd, vd, chunk_size, max_block, block_v)
  s, c, wd = z.s, z.c, z.c + z.s
  ctx, clean_vjp = jax.vjp(lambda x: _clean_pass(x, segment_ids, c, clean_family, interpret),
                           clean)
  noisy_p, meta, ctx_p, group = _operands(clean[1], ctx, noisy, segment_ids, block_starts, z,
                                          keep_dtype, pad_slots)
  hv = clean[2].shape[2]
  if slot_do:
    if front_tile:
      raise ValueError('slot_do takes no front tile')
    do_s = jnp.pad(do, ((0, 0),) * 4 + ((0, z.vdp - vd),))
    return BackwardOperands(z, noisy_p, meta, ctx_p, do_s, clean_vjp, 0, True)
  o_aval = jax.ShapeDtypeStruct((b, nv, z.n, wd, hv, z.vdp), _F32)
  (do_w,) = jax.linear_transpose(lambda o: _from_windows(o, group, c, t, vd), o_aval)(
      do.astype(_F32))
  if not front_tile:
    return BackwardOperands(z, noisy_p, meta, ctx_p, do_w, clean_vjp, 0, False)

  def front(x, axis, fill=0):
    return jnp.pad(x, [(s, 0) if a == axis else (0, 0) for a in range(x.ndim)],
                   constant_values=fill)

  return BackwardOperands(z, tuple(front(x, 2) for x in noisy_p),
                          tuple(front(x, 1, fill) for x, fill in zip(meta, (-1, 0, _FAR, -1))),
                          ctx_p, front(do_w, 3), clean_vjp, s, False)


def backward_shapes(ops: BackwardOperands, b, nv, hv):
  """Output avals of a backward kernel: per window (row r is window row r - front) dq, dk
  [.., front + C + S, HV, NVT, Kp], dv [.., HV, Vp], dg, dbeta [.., HV, NVT]; clean sums dkc
  [B, V, N C, HV, NVT, Kp], dvc [B, V, N C, HV, Vp], dgc [B, V, N C, HV, NVT], dh
  [B, V, N, HV, Kp, Vp] (NVT = V tiles)."""
  z = ops.z
  rows, nvt = ops.front + z.c + z.s, z.vdp // z.bv
  win = lambda *tail: jax.ShapeDtypeStruct((b, nv, z.n, rows, hv) + tail, _F32)
  ctx_out = lambda *tail: jax.ShapeDtypeStruct((b, nv) + tail, _F32)
  return [win(nvt, z.kp), win(nvt, z.kp), win(z.vdp), win(nvt), win(nvt),
          ctx_out(z.n * z.c, hv, nvt, z.kp), ctx_out(z.n * z.c, hv, z.vdp),
          ctx_out(z.n * z.c, hv, nvt), ctx_out(z.n, hv, z.kp, z.vdp)]


def _sum_tiles(x):
  """Sums the V tiles' partial gradients x [..., NVT, K]; with one tile, x as it is (a kernel
  may have written it in the output dtype already)."""
  return x[..., 0, :] if x.shape[-2] == 1 else x.sum(-2)


def backward_sums(ops: BackwardOperands, outs, clean, noisy):
  """Stage 4: sums windows (unless `ops.slots`), V tiles, views and value heads sharing a key
  head; then through the clean pass. Returns (d clean, d noisy) in the inputs' dtypes."""
  dq, dk, dv, dg, db, dkc, dvc, dgc, dh = outs
  t, hq, kd = noisy[0].shape[2:]
  vd = clean[2].shape[3]
  c = ops.z.c
  add = (lambda x: x) if ops.slots else (lambda x: _overlap_add(x, c, t, ops.front))
  d_noisy = (_key_heads(add(_sum_tiles(dq)), hq)[..., :kd],
             _key_heads(add(_sum_tiles(dk)), hq)[..., :kd],
             add(dv)[..., :vd], add(dg.sum(-1)), add(db.sum(-1)))
  d_ctx = (dh.sum(1)[..., :kd, :vd], dvc.sum(1)[:, :t, :, :vd], dgc.sum((1, 4))[:, :t])
  (d_clean,) = ops.clean_vjp(d_ctx)
  dkc = _key_heads(dkc.sum((1, 4)), hq)[:, :t, :, :kd]
  d_clean = d_clean[:1] + (d_clean[1] + dkc,) + d_clean[2:]
  cast = lambda ds, xs: tuple(d.astype(x.dtype) for d, x in zip(ds, xs))
  return cast(d_clean, clean), cast(d_noisy, noisy)


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8, 9))
def _backward(clean, noisy, segment_ids, block_starts, do, scale, chunk_size, max_block, launch,
              interpret):
  """Gradients of `_forward` for the cotangent do [B, V, T, HV, V]: (d clean, d noisy); the V
  tile is the forward's."""
  b, nv, _, hq, _ = noisy[0].shape
  hv = clean[2].shape[2]
  ops = backward_operands(clean, noisy, segment_ids, block_starts, do, chunk_size, max_block,
                          launch[0])
  z = ops.z
  s, c, wd, nvt = z.s, z.c, z.c + z.s, z.vdp // z.bv
  rows = s + wd
  # --- Stage 3: the kernel, on the forward's grid. ---
  spec = pl.BlockSpec
  qk_spec = spec((None, None, None, rows, None, None, z.kp),
                 lambda i, r, j, u, e: (r, u, i, 0, j, e, 0))
  gb_spec = spec((None, None, None, rows, None, None), lambda i, r, j, u, e: (r, u, i, 0, j, e))
  out_specs = [qk_spec, qk_spec,
               spec((None, None, None, rows, None, z.bv), lambda i, r, j, u, e: (r, u, i, 0, j, e)),
               gb_spec, gb_spec,
               spec((None, None, c, None, None, z.kp), lambda i, r, j, u, e: (r, u, i, j, e, 0)),
               spec((None, None, c, None, z.bv), lambda i, r, j, u, e: (r, u, i, j, e)),
               spec((None, None, c, None, None), lambda i, r, j, u, e: (r, u, i, j, e)),
               spec((None, None, None, None, z.kp, z.bv), lambda i, r, j, u, e: (r, u, i, j, 0, e))]
  do_spec = spec((None, None, None, rows, None, z.bv), lambda i, r, j, u, e: (r, u, i, 0, j, e))
  prec = _EXACT if noisy[0].dtype == _F32 else _BF16
  kernel = functools.partial(_noisy_bwd_kernel, c=c, s=s, n_tiles=wd // s, scale=scale, prec=prec)
  outs = pl.pallas_call(
      kernel, out_shape=backward_shapes(ops, b, nv, hv), grid=(z.n, b, hv, nv, nvt),
      in_specs=_in_specs(z, hv // hq, s + z.tpad) + [do_spec], out_specs=out_specs,
      compiler_params=gdr_pallas._params(interpret, 8, 1),  # pylint: disable=protected-access
      interpret=interpret, name='two_stream_noisy_bwd')(*ops.noisy, *ops.meta, *ops.ctx, ops.do)
  return backward_sums(ops, outs, clean, noisy)


def chunked_schedule_vjp(res, do, scale, chunk_size, max_block, clean_family, interpret):
  """(d clean, d noisy) by autodiff of the pure-JAX chunked schedule at res = (clean, noisy,
  segment_ids, block_starts), its clean pass from `clean_family`'s kernels (None: XLA) unless
  `clean` carries it: the fused kernels' default backward (recomputes the clean pass). Runs at
  the kernels' chunk length (the result does not depend on it; given checkpoints do)."""
  clean, noisy, segment_ids, block_starts = res
  fn = lambda c, x: two_stream_xla.noisy_delta_rule_chunked(
      c, x, segment_ids, block_starts, scale=scale,
      chunk_size=chunk_length(chunk_size, max_block), max_block=max_block,
      clean_family=clean_family, interpret=interpret)
  return jax.vjp(fn, clean, noisy)[1](do)


BACKWARDS = ('kernel', 'autodiff')
# fp32 inputs keep fp32 operands in shared memory, so past head size 64 the backward kernels ask
# for more than the 227 KiB a Hopper SM has (ptxas offline, sm_90a, launch.kernel_registers, K = V
# = 128: Triton's seed rows kernel 344 KiB; the Pallas kernel 280 KiB at V tile 32 with fp32
# operands, 2026-12-01; K = V = 64: Triton's largest 144 KiB). On an H100 with this limit lifted
# (2026-12-07, K = V = 128), both families' backward failed at launch: Triton's asked for 352,256
# B, Pallas's 266,240, of 232,448; at K = V = 64 both ran and matched the reference.
FP32_KERNEL_BACKWARD_MAX_HEAD = 64


def check_arguments(clean, noisy, max_block: int, backward: str, interpret: bool) -> None:
  """Raises ValueError for a max_block below 1, HV not a multiple of H, an unknown backward, or
  backward='kernel' compiled for fp32 inputs whose padded K or V exceeds
  FP32_KERNEL_BACKWARD_MAX_HEAD (the interpreters have no shared memory to run out of)."""
  if max_block < 1:
    raise ValueError(f'max_block must be >= 1, got {max_block}')
  hq, hv = noisy[0].shape[3], clean[2].shape[2]
  if hv % hq:
    raise ValueError(f'HV={hv} is not a multiple of H={hq}')
  if backward not in BACKWARDS:
    raise ValueError(f'unknown backward {backward!r}; known: {BACKWARDS}')
  kd, vd = noisy[0].shape[-1], noisy[2].shape[-1]
  if (backward == 'kernel' and not interpret and jnp.dtype(noisy[0].dtype) == _F32
      and max(padded_heads(kd, vd)) > FP32_KERNEL_BACKWARD_MAX_HEAD):
    raise ValueError(
        f"backward='kernel' with fp32 inputs takes head sizes up to "
        f'{FP32_KERNEL_BACKWARD_MAX_HEAD} (K = {kd}, V = {vd}: its kernels would need more '
        f"shared memory than a GPU has); use backward='autodiff' or 16-bit inputs")


def fused_noisy_op(forward, kernel_backward, clean_family=None, stores_rows=False):
  """The differentiable op noisy(clean, noisy, segment_ids, block_starts, scale, chunk_size,
  max_block, launch, interpret, backward) of a fused forward kernel, shared by the Pallas and
  jax-triton kernels; launch is the family's `forward_launch` (V tile, warps). `forward` and
  `kernel_backward` take those arguments (the latter the residuals (clean, noisy, segment_ids,
  block_starts) and the cotangent first, and no backward); backward 'kernel' runs
  kernel_backward, 'autodiff' `chunked_schedule_vjp` with the clean pass of `clean_family`
  (None: XLA). Both recompute the clean pass unless `clean` carries its checkpoints.
  stores_rows: for backward 'kernel', the forward (called with store_rows=True) also returns the
  window rows the kernel backward reads, kept as residuals and passed to it (rows=...), so that
  the backward does not walk the forward again."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
  def noisy_op(clean, noisy, segment_ids, block_starts, scale, chunk_size, max_block, launch,
               interpret, backward):
    del backward
    return forward(clean, noisy, segment_ids, block_starts, scale, chunk_size, max_block,
                   launch, interpret)

  def fwd(clean, noisy, segment_ids, block_starts, scale, chunk_size, max_block, launch,
          interpret, backward):
    args = (clean, noisy, segment_ids, block_starts, scale, chunk_size, max_block, launch,
            interpret)
    if stores_rows and backward == 'kernel':
      o, rows = forward(*args, True)
    else:
      o, rows = forward(*args), None
    return o, (clean, noisy, segment_ids, block_starts, rows)

  def bwd(scale, chunk_size, max_block, launch, interpret, backward, res, do):
    *res, rows = res
    if backward == 'kernel':
      extra = {} if rows is None else {'rows': rows}
      grads = kernel_backward(*res, do, scale, chunk_size, max_block, launch, interpret, **extra)
    else:
      grads = chunked_schedule_vjp(res, do, scale, chunk_size, max_block, clean_family,
                                   interpret)
    return tuple(grads) + (None, None)

  noisy_op.defvjp(fwd, bwd)
  return noisy_op


_noisy = fused_noisy_op(_forward, _backward)


def noisy_delta_rule_pallas(clean: tuple[jax.Array, ...], noisy: tuple[jax.Array, ...],
                            segment_ids: jax.Array, block_starts: jax.Array, *, scale: float,
                            chunk_size: int = 64, max_block: int = 32,
                            interpret: bool | None = None, backward: str = 'autodiff') -> jax.Array:
  """Noisy-view outputs of the two-stream gated delta rule: the 'chunked' schedule's forward as one
  Pallas kernel.

  Same contract as `two_stream_xla.noisy_delta_rule_chunked`. Differentiable in clean and noisy.

  Args:
    clean, noisy, segment_ids, block_starts, scale, max_block: as there.
    chunk_size: chunk length C of the clean pass and of the noisy windows; raised to a power of two
      >= max(16, max_block) (the result does not depend on C).
    interpret: run the kernels in the Pallas interpreter; None: off GPU only.
    backward: 'autodiff' (`jax.vjp` of the pure-JAX schedule) or 'kernel' (a Pallas backward,
      kernels.md 6.2; bf16 products for 16-bit inputs).

  Returns:
    o [B, V, T, HV, V] fp32.

  Raises:
    ValueError: as `check_arguments`.
  """
  if interpret is None:
    interpret = backend.default_backend() != 'gpu'
  check_arguments(clean, noisy, max_block, backward, interpret)
  return _noisy(tuple(clean), tuple(noisy), segment_ids, block_starts, float(scale),
                int(chunk_size), int(max_block), forward_launch(noisy[0].dtype, max_block),
                bool(interpret), backward)
