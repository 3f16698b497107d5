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

Gradients: `jax.custom_vjp` whose backward is `jax.vjp` of the pure-JAX `noisy_delta_rule_chunked`
(a kernel backward, kernels.md 6.2, is a later step).
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import backend
from pallas_kernels.gated_delta_rule import pallas as gdr_pallas
from pallas_kernels.gated_delta_rule import reference
from pallas_kernels.gated_delta_rule import two_stream_xla
from pallas_kernels.gated_delta_rule import xla as gdr_xla

_F32 = jnp.float32
_EXACT = jax.lax.Precision.HIGHEST  # fp32 inputs, and the unit-lower solve always
_MMA = jax.lax.Precision.DEFAULT  # 16-bit inputs: TF32 tensor-core products, as the chunked kernels
_FAR = 2 ** 30  # `lo` of slots whose seed state is zero: no clean token is that far
_BLOCK_V = 64  # V tile (keeps the [K, V] checkpoint tile and the [S, V] carries in registers)


def _mm(a, b, prec, *, tb=False):
  """fp32 a @ b (b optionally transposed) at `prec` (_EXACT: IEEE on GPU; _MMA: TF32)."""
  # pylint: disable-next=protected-access
  return gdr_pallas._dot(a, b, _F32, tb=tb, precision=prec)


def _iota(shape, dim):
  return jax.lax.broadcasted_iota(jnp.int32, shape, dim)


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
    g_seed = jnp.sum(jnp.where(ipos == seed[:, None], g_ctx[None, :], 0.0), axis=1)  # one-hot
    local = (ipos >= lo[:, None]) & (ipos <= seed[:, None])  # empty unless the seed is in chunk n
    e = jnp.exp(jnp.where(local, g_seed[:, None] - g_ctx[None, :], -jnp.inf))  # S C
    coef = jnp.where(carry == n, jnp.exp(g_seed), 0.0)

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


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7, 8))
def _forward(clean, noisy, segment_ids, block_starts, scale, chunk_size, max_block, block_v,
             interpret):
  f32 = lambda a: a.astype(_F32)
  qc, kc, vc, gc, bc = clean
  qn, kn, vn, gn, bn = (f32(a) for a in noisy)
  b, nv, t, hq, kd = qn.shape
  hv, vd = vc.shape[2], vc.shape[3]
  grp = hv // hq
  s = backend.next_pow2(max(max_block, 16))  # row tile: a block spans at most two tiles
  c = backend.next_pow2(max(chunk_size, s))  # blocks reach at most one chunk ahead of their seed
  kp, vdp = backend.next_pow2(max(kd, 16)), backend.next_pow2(max(vd, 16))
  bv = min(block_v, vdp)
  n = -(-t // c)
  tpad = n * c + s  # window n reads slots [nC, (n + 1)C + S)

  # --- Stage 1: clean chunk checkpoints (fp32), padded to whole chunks and K, V tiles. ---
  h, v_new, _ = gdr_xla.chunk_gated_delta_rule_fwd_h(qc, kc, vc, gc, bc, scale=scale,
                                                     segment_ids=segment_ids, chunk_size=c)
  g_cum = gdr_xla.chunk_cumsum(f32(gc), c)
  kc_p = _pad_to(f32(kc), (b, n * c, hq, kp))
  vn_p = _pad_to(v_new, (b, n * c, hv, vdp))
  gc_p = _pad_to(g_cum, (b, n * c, hv))
  h_p = _pad_to(h, (b, n, hv, kp, vdp))

  # --- Stage 2: slot metadata and the noisy views, padded to whole windows. ---
  meta, group = _slot_meta(segment_ids, block_starts, c, tpad)
  qn, kn = (_pad_to(x, (b, nv, tpad, hq, kp)) for x in (qn, kn))
  vn = _pad_to(vn, (b, nv, tpad, hv, vdp))
  gn, bn = (_pad_to(x, (b, nv, tpad, hv)) for x in (gn, bn))

  # --- Stage 3: the kernel, grid (window, batch, value head, view, V tile). ---
  qk_spec = pl.BlockSpec((None, None, tpad, None, kp), lambda i, r, j, u, e: (r, u, 0, j // grp, 0))
  v_spec = pl.BlockSpec((None, None, tpad, None, bv), lambda i, r, j, u, e: (r, u, 0, j, e))
  gb_spec = pl.BlockSpec((None, None, tpad, None), lambda i, r, j, u, e: (r, u, 0, j))
  meta_spec = pl.BlockSpec((None, tpad), lambda i, r, j, u, e: (r, 0))
  ctx_specs = [pl.BlockSpec((None, c, None, kp), lambda i, r, j, u, e: (r, i, j // grp, 0)),
               pl.BlockSpec((None, c, None, bv), lambda i, r, j, u, e: (r, i, j, e)),
               pl.BlockSpec((None, c, None), lambda i, r, j, u, e: (r, i, j)),
               pl.BlockSpec((None, None, None, kp, bv), lambda i, r, j, u, e: (r, i, j, 0, e))]
  wd = c + s
  out_spec = pl.BlockSpec((None, None, None, wd, None, bv),
                          lambda i, r, j, u, e: (r, u, i, 0, j, e))
  prec = _EXACT if noisy[0].dtype == _F32 else _MMA
  kernel = functools.partial(_noisy_kernel, c=c, s=s, n_tiles=wd // s, scale=scale, prec=prec)
  o = pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((b, nv, n, wd, hv, vdp), _F32),
      grid=(n, b, hv, nv, vdp // bv),
      in_specs=[qk_spec, qk_spec, v_spec, gb_spec, gb_spec] + [meta_spec] * 4 + ctx_specs,
      out_specs=out_spec,
      compiler_params=gdr_pallas._params(interpret, 4, 2),  # pylint: disable=protected-access
      interpret=interpret, name='two_stream_noisy_fwd')(
          qn, kn, vn, gn, bn, *meta, kc_p, vn_p, gc_p, h_p)

  # --- Stage 4: each slot from its seed's window: its own chunk's (rows [0, C)) or the previous
  # chunk's (rows [C, C + max_block), max_block <= S). ---
  o_own = o[:, :, :, :c]  # B V N C HV Vd
  o_prev = jnp.pad(o[:, :, :-1, c:], ((0, 0), (0, 0), (1, 0), (0, c - s), (0, 0), (0, 0)))
  own = jnp.pad(group, ((0, 0), (0, n * c - t)), constant_values=n)  # padding: own window
  own = own.reshape(b, 1, n, c, 1, 1) == jnp.arange(n)[:, None, None, None]
  o = jnp.where(own, o_own, o_prev).reshape(b, nv, n * c, hv, vdp)
  return o[:, :, :t, :, :vd]


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
  """Gradients of the pure-JAX chunked schedule (recomputes its forward)."""
  del block_v, interpret
  clean, noisy, segment_ids, block_starts = res
  fn = lambda c, x: two_stream_xla.noisy_delta_rule_chunked(
      c, x, segment_ids, block_starts, scale=scale, chunk_size=chunk_size, max_block=max_block)
  d_clean, d_noisy = jax.vjp(fn, clean, noisy)[1](do)
  return d_clean, d_noisy, None, None


_noisy.defvjp(_noisy_fwd, _noisy_bwd)


def noisy_delta_rule_pallas(clean: tuple[jax.Array, ...], noisy: tuple[jax.Array, ...],
                            segment_ids: jax.Array, block_starts: jax.Array, *, scale: float,
                            chunk_size: int = 64, max_block: int = 32,
                            interpret: bool | None = None) -> jax.Array:
  """Noisy-view outputs of the two-stream gated delta rule: the 'chunked' schedule's forward as one
  Pallas kernel.

  Same contract as `two_stream_xla.noisy_delta_rule_chunked`. Differentiable: the backward
  is `jax.vjp` of that pure-JAX schedule (no backward kernel yet).

  Args:
    clean, noisy, segment_ids, block_starts, scale, max_block: as there.
    chunk_size: chunk length C of the clean pass and of the noisy windows; raised to a power of two
      >= max(16, max_block) (the result does not depend on C).
    interpret: run the kernel in the Pallas interpreter; None: off GPU only.

  Returns:
    o [B, V, T, HV, V] fp32.

  Raises:
    ValueError: max_block below 1, or HV not a multiple of H.
  """
  if max_block < 1:
    raise ValueError(f'max_block must be >= 1, got {max_block}')
  hq, hv = noisy[0].shape[3], clean[2].shape[2]
  if hv % hq:
    raise ValueError(f'HV={hv} is not a multiple of H={hq}')
  if interpret is None:
    interpret = backend.default_backend() != 'gpu'
  return _noisy(tuple(clean), tuple(noisy), segment_ids, block_starts, float(scale),
                int(chunk_size), int(max_block), _BLOCK_V, bool(interpret))
