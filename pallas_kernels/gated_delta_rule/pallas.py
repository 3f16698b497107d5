"""Chunked gated delta rule in Pallas: Triton lowering on GPU, `interpret=True` on CPU.

The WY / UT-transform form of kernels.md section 2, split like fla's kernels (section 3). Per chunk
of C tokens with entering state S0, G = cumsum(g) inside the chunk and decay D_ij = exp(G_i - G_j):

  forward                                            backward (from the saved W, G, h, v_new, T)
  1 _intra:  A = strict(beta_i k_i.k_j D_ij)        1 _dv_local: scale (Q K^T * D)^T dO
             T = (I + A)^-1  (16-row blocks)          2 _dhu (serial, reverse): dv2 = dv_local +
             W = T diag(beta e^G) K, U = T diag(beta) V  diag(e^{G_C-G}) K dS; dS <- e^{G_C} dS
  2 _state_pass (serial over chunks per (b, h, V-tile), S in fp32):   + scale (e^G Q)^T dO - W^T dv2
             v_new = U - W S0, store h = S0,          3 _bwd_chunk: dq, dk, dv, dbeta, dg (reverse
             S <- e^{G_C} S0 + K^T diag(e^{G_C - G}) v_new   cumsum inside the chunk) from O, S_C
  3 _output: O = scale (diag(e^G) Q S0 + (Q K^T * D) v_new)    and WY.

Unlike fla, which recomputes W, U and h in its backward, the forward keeps W, G, h, v_new and T
(T stored only when differentiating): no second _intra and _state_pass, for about 1.5x the bytes of
q, k, v held between the passes.

Document resets (segment_ids) are masks inside chunks, as in `xla.py`: scores only within a segment
(`same`), the entering state reaches only tokens of the segment active at the chunk start (`carry`),
only the chunk's last segment writes the leaving state (`writes`), and the entering state survives
only if the chunk's last token still carries it. Shapes are padded to what the Triton lowering
takes: T to a multiple of C, K and V to powers of two >= 16 (padding is exact: zero keys/values,
g = beta = 0).
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gated_delta_rule import configs
from pallas_kernels.gated_delta_rule import xla

_SUB = 16  # rows of the diagonal blocks solved by forward substitution
_F32 = jnp.float32


# ---------------------------------------------------------------------------------------------
# In-kernel helpers (plain jnp on values; they lower to Triton and run in interpret mode).
# ---------------------------------------------------------------------------------------------
def _iota(n, dim):
  return jax.lax.broadcasted_iota(jnp.int32, (n, n), dim)


def _precision(dtype):
  # f32 operands: IEEE (HIGHEST) so interpret mode and GPU agree to ~1e-6; 16-bit operands: MMA.
  return jax.lax.Precision.HIGHEST if dtype == _F32 else jax.lax.Precision.DEFAULT


def _dot(a, b, cdt, *, ta=False, tb=False, precision=None):
  """a @ b (optionally transposed operands) with operands cast to `cdt`, fp32 accumulation."""
  a, b = a.astype(cdt), b.astype(cdt)
  dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
  prec = _precision(cdt) if precision is None else precision
  return jax.lax.dot_general(a, b, dims, precision=prec, preferred_element_type=_F32)


def _cumsum(x):
  """Inclusive cumsum of a [C] vector (a masked reduction: lowers everywhere)."""
  c = x.shape[0]
  return jnp.sum(jnp.where(_iota(c, 1) <= _iota(c, 0), x[None, :], 0.0), axis=1)


def _rev_cumsum(x):
  c = x.shape[0]
  return jnp.sum(jnp.where(_iota(c, 1) >= _iota(c, 0), x[None, :], 0.0), axis=1)


def _last(x):
  """x[-1] of a [C] vector, as a scalar."""
  c = x.shape[0]
  return jnp.sum(jnp.where(jax.lax.broadcasted_iota(jnp.int32, (c,), 0) == c - 1, x, 0.0))


def _masks(c, seg):
  """(causal i >= j, strict i > j), restricted to the same segment when `seg` is given."""
  r, col = _iota(c, 0), _iota(c, 1)
  causal, strict = r >= col, r > col
  if seg is not None:
    same = seg[:, None] == seg[None, :]
    causal, strict = causal & same, strict & same
  return causal, strict


def _decay(gc, mask):
  """where(mask, exp(G_i - G_j), 0) for [C] cumulative log-decays."""
  return jnp.where(mask, jnp.exp(gc[:, None] - gc[None, :]), 0.0)


def _ut_inverse(a, merge_precision):
  """(I + A)^-1 for strictly lower-triangular [C, C] A (fp32), C in {16, 32, 64}.

  The 16x16 diagonal blocks are inverted together by forward substitution: at step i, rows i,
  16+i, ... are updated at once (their column supports are disjoint blocks, so one summed row
  vector carries all of them). The off-diagonal blocks follow from T = (I + N)^-1 D with D the
  block-diagonal inverse and N = D L (L the strictly block-lower part of A, N nilpotent of order
  C/16):
  (I + N)^-1 = prod_k (I + (-N)^(2^k)).
  """
  c = a.shape[0]
  r, col = _iota(c, 0), _iota(c, 1)
  blk = jax.lax.div(r, _SUB) == jax.lax.div(col, _SUB)
  rsub = jax.lax.rem(r, _SUB)
  a_bd = jnp.where(blk, a, 0.0)
  eye = (r == col).astype(_F32)

  def step(i, x):
    sel = rsub == i
    av = jnp.sum(jnp.where(sel, a_bd, 0.0), axis=0)  # rows i, 16+i, ... summed
    y = jnp.sum(av[:, None] * x, axis=0)
    return jnp.where(sel & blk, eye - y[None, :], x)

  d = jax.lax.fori_loop(1, min(_SUB, c), step, eye)
  if c <= _SUB:
    return d
  mdot = lambda x, y: _dot(x, y, _F32, precision=merge_precision)
  neg_n = -mdot(d, jnp.where(blk, 0.0, a))
  acc = eye + neg_n
  p, order = neg_n, 2
  while order < c // _SUB:
    p = mdot(p, p)
    acc = mdot(acc, eye + p)
    order *= 2
  return mdot(acc, d)


# ---------------------------------------------------------------------------------------------
# Kernels. Refs arrive in the order (inputs..., outputs...); optional segment refs are unpacked by
# flag.
# ---------------------------------------------------------------------------------------------
def _intra_kernel(*refs, has_seg, store_t, cdt):
  k_ref, v_ref, g_ref, b_ref, *rest = refs
  if has_seg:
    seg_ref, carry_ref, *rest = rest
  w_ref, u_ref, gc_ref, *rest = rest
  k = k_ref[...]
  v = v_ref[...]
  c = k.shape[0]
  beta = b_ref[...].astype(_F32)
  gc = _cumsum(g_ref[...].astype(_F32))
  seg = seg_ref[...] if has_seg else None
  _, strict = _masks(c, seg)
  kk = _dot(k, k, cdt, tb=True)
  a = beta[:, None] * kk * _decay(gc, strict)
  t = _ut_inverse(a, _precision(cdt))
  kscale = beta * jnp.exp(gc)
  if has_seg:
    kscale = kscale * carry_ref[...]
  w_ref[...] = _dot(t, k * kscale[:, None], cdt).astype(w_ref.dtype)
  u_ref[...] = _dot(t, v * beta[:, None], cdt).astype(u_ref.dtype)
  gc_ref[...] = gc
  if store_t:
    rest[0][...] = t.astype(rest[0].dtype)


def _state_pass_kernel(*refs, has_seg, n_chunks, c, cdt):
  k_ref, w_ref, u_ref, gc_ref, h0_ref, *rest = refs
  if has_seg:
    carry_ref, writes_ref, *rest = rest
  h_ref, vn_ref, ht_ref = rest
  kd = h0_ref.shape[0]

  def body(n, s):
    h_ref[pl.ds(n * kd, kd), :] = s.astype(h_ref.dtype)
    rows = pl.ds(n * c, c)
    vn = u_ref[rows, :].astype(_F32) - _dot(w_ref[rows, :], s, cdt)
    vn_ref[rows, :] = vn.astype(vn_ref.dtype)
    gc = gc_ref[rows]
    gl = _last(gc)
    kdec = jnp.exp(gl - gc)
    keep = jnp.exp(gl)
    if has_seg:
      kdec = kdec * writes_ref[rows]
      keep = keep * _last(carry_ref[rows])
    return keep * s + _dot(k_ref[rows, :], vn * kdec[:, None], cdt, ta=True)

  ht_ref[...] = jax.lax.fori_loop(0, n_chunks, body, h0_ref[...].astype(_F32))


def _output_kernel(*refs, has_seg, scale, cdt):
  q_ref, k_ref, h_ref, vn_ref, gc_ref, *rest = refs
  if has_seg:
    seg_ref, carry_ref, *rest = rest
  (o_ref,) = rest
  q = q_ref[...]
  c = q.shape[0]
  gc = gc_ref[...]
  causal, _ = _masks(c, seg_ref[...] if has_seg else None)
  qg = jnp.exp(gc)
  if has_seg:
    qg = qg * carry_ref[...]
  qk = _dot(q, k_ref[...], cdt, tb=True) * _decay(gc, causal)
  o = qg[:, None] * _dot(q, h_ref[...], cdt) + _dot(qk, vn_ref[...], cdt)
  o_ref[...] = (o * scale).astype(o_ref.dtype)


def _dv_local_kernel(*refs, has_seg, scale, cdt):
  q_ref, k_ref, gc_ref, do_ref, *rest = refs
  if has_seg:
    seg_ref, *rest = rest
  (dv_ref,) = rest
  k = k_ref[...]
  c = k.shape[0]
  gc = gc_ref[...]
  causal, _ = _masks(c, seg_ref[...] if has_seg else None)
  # (Q K^T * D)^T without a transpose: entry (j, i) = k_j.q_i exp(G_i - G_j) for i >= j.
  kq = _dot(k, q_ref[...], cdt, tb=True) * jnp.transpose(_decay(gc, causal))
  dv_ref[...] = (scale * _dot(kq, do_ref[...], cdt)).astype(dv_ref.dtype)


def _dhu_kernel(*refs, has_seg, n_chunks, c, scale, cdt):
  q_ref, k_ref, w_ref, gc_ref, do_ref, dvl_ref, dht_ref, *rest = refs
  if has_seg:
    carry_ref, writes_ref, *rest = rest
  dh_ref, dv2_ref, dh0_ref = rest
  kd = dht_ref.shape[0]

  def body(i, ds):
    n = n_chunks - 1 - i
    dh_ref[pl.ds(n * kd, kd), :] = ds.astype(dh_ref.dtype)
    rows = pl.ds(n * c, c)
    gc = gc_ref[rows]
    gl = _last(gc)
    kdec, qdec, keep = jnp.exp(gl - gc), jnp.exp(gc), jnp.exp(gl)
    if has_seg:
      carry = carry_ref[rows]
      kdec, qdec, keep = kdec * writes_ref[rows], qdec * carry, keep * _last(carry)
    dv = dvl_ref[rows, :].astype(_F32) + kdec[:, None] * _dot(k_ref[rows, :], ds, cdt)
    dv2_ref[rows, :] = dv.astype(dv2_ref.dtype)
    qg = q_ref[rows, :] * qdec[:, None]
    return (keep * ds + scale * _dot(qg, do_ref[rows, :], cdt, ta=True)
            - _dot(w_ref[rows, :], dv, cdt, ta=True))

  dh0_ref[...] = jax.lax.fori_loop(0, n_chunks, body, dht_ref[...].astype(_F32))


def _bwd_chunk_kernel(*refs, has_seg, scale, cdt):
  (q_ref, k_ref, v_ref, vn_ref, do_ref, dv2_ref, h_ref, dh_ref, gc_ref, b_ref, t_ref,
   *rest) = refs
  if has_seg:
    seg_ref, carry_ref, writes_ref, *rest = rest
  dq_ref, dk_ref, dv_ref, db_ref, dg_ref = rest
  q, k, v = q_ref[...], k_ref[...], v_ref[...]
  vn, do, dv2 = vn_ref[...], do_ref[...], dv2_ref[...]
  h, dh = h_ref[...], dh_ref[...]
  c = q.shape[0]
  gc = gc_ref[...]
  beta = b_ref[...].astype(_F32)
  gl = _last(gc)
  causal, strict = _masks(c, seg_ref[...] if has_seg else None)
  qdec, kdec, keep = jnp.exp(gc), jnp.exp(gl - gc), jnp.exp(gl)
  if has_seg:
    carry = carry_ref[...]
    qdec, kdec, keep = qdec * carry, kdec * writes_ref[...], keep * _last(carry)
  qf, kf = q.astype(_F32), k.astype(_F32)

  # Output and leaving-state terms (fla's chunk_bwd_dqkwg).
  dq = _dot(do, h, cdt, tb=True) * (scale * qdec)[:, None]
  dk = _dot(vn, dh, cdt, tb=True) * kdec[:, None]
  dw = -_dot(dv2, h, cdt, tb=True)
  dg_last = keep * jnp.sum(h.astype(_F32) * dh.astype(_F32)) + jnp.sum(dk * kf)
  ds = _dot(do, vn, cdt, tb=True) * _decay(gc, causal) * scale
  dq = dq + _dot(ds, k, cdt)
  dk = dk + _dot(ds, q, cdt, ta=True)
  last = jax.lax.broadcasted_iota(jnp.int32, (c,), 0) == c - 1
  dgc = jnp.sum(dq * qf, axis=1) - jnp.sum(dk * kf, axis=1) + jnp.where(last, dg_last, 0.0)

  # WY backward (fla's prepare_wy_repr_bwd): W = T diag(beta e^G) K, U = T diag(beta) V.
  t = t_ref[...]
  kscale = beta * qdec
  dt = _dot(dw, k * kscale[:, None], cdt, tb=True) + _dot(dv2, v * beta[:, None], cdt, tb=True)
  dkb = _dot(t, dw, cdt, ta=True)
  dvb = _dot(t, dv2, cdt, ta=True)
  dkb_k = jnp.sum(dkb * kf, axis=1)
  dk = dk + dkb * kscale[:, None]
  db = dkb_k * qdec + jnp.sum(dvb * v.astype(_F32), axis=1)
  dgc = dgc + dkb_k * kscale
  dv_ref[...] = (dvb * beta[:, None]).astype(dv_ref.dtype)
  # T = (I + A)^-1 -> dA = -T^T dT T^T on A's support; A_ij = beta_i k_i.k_j exp(G_i - G_j).
  da = _dot(_dot(t, dt, cdt, ta=True), t, cdt, tb=True)
  da = -da * _decay(gc, strict)
  kk = _dot(k, k, cdt, tb=True)
  dab = da * beta[:, None]
  dk = dk + _dot(dab, k, cdt) + _dot(dab, k, cdt, ta=True)
  db = db + jnp.sum(da * kk, axis=1)
  ada = dab * kk
  dgc = dgc + jnp.sum(ada, axis=1) - jnp.sum(ada, axis=0)
  dq_ref[...] = dq.astype(dq_ref.dtype)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  db_ref[...] = db
  dg_ref[...] = _rev_cumsum(dgc)


# ---------------------------------------------------------------------------------------------
# pallas_call wrappers. Layout [B, Tp, H(V), X]; per-chunk blocks (None, C, None, X).
# ---------------------------------------------------------------------------------------------
class _Dims:
  """Static sizes of one call (after padding)."""

  def __init__(self, q, v, chunk_size):
    self.b, self.tp, self.h, self.kd = q.shape
    self.hv, self.vd = v.shape[2], v.shape[3]
    self.c = chunk_size
    self.n = self.tp // chunk_size
    self.grp = self.hv // self.h


def _params(interpret, num_warps, num_stages):
  if interpret:
    return None
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _chunk_specs(d: _Dims):
  """BlockSpec makers for a grid (n, b, h)."""
  qk = lambda x: pl.BlockSpec((None, d.c, None, x), lambda n, b, h: (b, n, h // d.grp, 0))
  val = lambda x: pl.BlockSpec((None, d.c, None, x), lambda n, b, h: (b, n, h, 0))
  vec = pl.BlockSpec((None, d.c, None), lambda n, b, h: (b, n, h))
  tok = pl.BlockSpec((None, d.c), lambda n, b, h: (b, n))
  state = lambda x: pl.BlockSpec((None, None, d.kd, x), lambda n, b, h: (b, h, n, 0))
  return qk, val, vec, tok, state


def _intra(k, v, g, beta, segs, d: _Dims, bs, *, store_t, interpret):
  cdt = k.dtype
  qk, val, vec, tok, _ = _chunk_specs(d)
  in_specs = [qk(d.kd), val(d.vd), vec, vec] + ([tok, tok] if segs else [])
  out_shape = [jax.ShapeDtypeStruct((d.b, d.tp, d.hv, d.kd), cdt),
               jax.ShapeDtypeStruct((d.b, d.tp, d.hv, d.vd), cdt),
               jax.ShapeDtypeStruct((d.b, d.tp, d.hv), _F32)]
  out_specs = [val(d.kd), val(d.vd), vec]
  if store_t:
    out_shape.append(jax.ShapeDtypeStruct((d.b, d.tp, d.hv, d.c), cdt))
    out_specs.append(val(d.c))
  kernel = functools.partial(_intra_kernel, has_seg=bool(segs), store_t=store_t, cdt=cdt)
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=(d.n, d.b, d.hv), in_specs=in_specs, out_specs=out_specs,
      compiler_params=_params(interpret, bs.num_warps_chunk, bs.num_stages_chunk),
      interpret=interpret, name='gdr_intra')(k, v, g, beta, *segs[:2])


def _state_pass(k, w, u, gc, h0, segs, d: _Dims, bs, *, interpret, state_dtype=None):
  cdt = k.dtype
  sdt = state_dtype or cdt
  bv = min(bs.bv, d.vd)
  seq = lambda x, hmap: pl.BlockSpec((None, d.tp, None, x), lambda b, h, j: (b, 0, hmap(h), 0))
  seqv = pl.BlockSpec((None, d.tp, None, bv), lambda b, h, j: (b, 0, h, j))
  in_specs = [seq(d.kd, lambda h: h // d.grp), seq(d.kd, lambda h: h), seqv,
              pl.BlockSpec((None, d.tp, None), lambda b, h, j: (b, 0, h)),
              pl.BlockSpec((None, None, d.kd, bv), lambda b, h, j: (b, h, 0, j))]
  if segs:
    in_specs += [pl.BlockSpec((None, d.tp), lambda b, h, j: (b, 0))] * 2
  out_shape = [jax.ShapeDtypeStruct((d.b, d.hv, d.n * d.kd, d.vd), sdt),
               jax.ShapeDtypeStruct((d.b, d.tp, d.hv, d.vd), sdt),
               jax.ShapeDtypeStruct((d.b, d.hv, d.kd, d.vd), _F32)]
  out_specs = [pl.BlockSpec((None, None, d.n * d.kd, bv), lambda b, h, j: (b, h, 0, j)), seqv,
               pl.BlockSpec((None, None, d.kd, bv), lambda b, h, j: (b, h, 0, j))]
  kernel = functools.partial(_state_pass_kernel, has_seg=bool(segs), n_chunks=d.n, c=d.c, cdt=cdt)
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=(d.b, d.hv, d.vd // bv), in_specs=in_specs,
      out_specs=out_specs, compiler_params=_params(interpret, bs.num_warps, bs.num_stages),
      interpret=interpret, name='gdr_state_pass')(k, w, u, gc, h0, *segs[1:])


def _output(q, k, h, vn, gc, segs, d: _Dims, bs, *, scale, out_dtype, interpret):
  cdt = q.dtype
  bv = min(bs.bv_out, d.vd)
  qk = lambda x: pl.BlockSpec((None, d.c, None, x), lambda j, n, b, hh: (b, n, hh // d.grp, 0))
  valv = pl.BlockSpec((None, d.c, None, bv), lambda j, n, b, hh: (b, n, hh, j))
  vec = pl.BlockSpec((None, d.c, None), lambda j, n, b, hh: (b, n, hh))
  tok = pl.BlockSpec((None, d.c), lambda j, n, b, hh: (b, n))
  hs = pl.BlockSpec((None, None, d.kd, bv), lambda j, n, b, hh: (b, hh, n, j))
  in_specs = [qk(d.kd), qk(d.kd), hs, valv, vec] + ([tok, tok] if segs else [])
  kernel = functools.partial(_output_kernel, has_seg=bool(segs), scale=scale, cdt=cdt)
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((d.b, d.tp, d.hv, d.vd), out_dtype),
      grid=(d.vd // bv, d.n, d.b, d.hv), in_specs=in_specs, out_specs=valv,
      compiler_params=_params(interpret, bs.num_warps_out, bs.num_stages_chunk),
      interpret=interpret, name='gdr_output')(q, k, h, vn, gc, *segs[:2])


def _dv_local(q, k, gc, do, segs, d: _Dims, bs, *, scale, interpret):
  cdt = q.dtype
  bv = min(bs.bv_out, d.vd)
  qk = lambda x: pl.BlockSpec((None, d.c, None, x), lambda j, n, b, hh: (b, n, hh // d.grp, 0))
  valv = pl.BlockSpec((None, d.c, None, bv), lambda j, n, b, hh: (b, n, hh, j))
  vec = pl.BlockSpec((None, d.c, None), lambda j, n, b, hh: (b, n, hh))
  tok = pl.BlockSpec((None, d.c), lambda j, n, b, hh: (b, n))
  in_specs = [qk(d.kd), qk(d.kd), vec, valv] + ([tok] if segs else [])
  kernel = functools.partial(_dv_local_kernel, has_seg=bool(segs), scale=scale, cdt=cdt)
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((d.b, d.tp, d.hv, d.vd), cdt),
      grid=(d.vd // bv, d.n, d.b, d.hv), in_specs=in_specs, out_specs=valv,
      compiler_params=_params(interpret, bs.num_warps_out, bs.num_stages_chunk),
      interpret=interpret, name='gdr_dv_local')(q, k, gc, do, *segs[:1])


def _dhu(q, k, w, gc, do, dvl, dht, segs, d: _Dims, bs, *, scale, interpret):
  cdt = q.dtype
  bv, dh_warps, dh_stages = bs.dh_launch()
  bv = min(bv, d.vd)
  seq = lambda x, hmap: pl.BlockSpec((None, d.tp, None, x), lambda b, h, j: (b, 0, hmap(h), 0))
  seqv = pl.BlockSpec((None, d.tp, None, bv), lambda b, h, j: (b, 0, h, j))
  key = lambda h: h // d.grp
  st = pl.BlockSpec((None, None, d.kd, bv), lambda b, h, j: (b, h, 0, j))
  in_specs = [seq(d.kd, key), seq(d.kd, key), seq(d.kd, lambda h: h),
              pl.BlockSpec((None, d.tp, None), lambda b, h, j: (b, 0, h)), seqv, seqv, st]
  if segs:
    in_specs += [pl.BlockSpec((None, d.tp), lambda b, h, j: (b, 0))] * 2
  out_shape = [jax.ShapeDtypeStruct((d.b, d.hv, d.n * d.kd, d.vd), cdt),
               jax.ShapeDtypeStruct((d.b, d.tp, d.hv, d.vd), cdt),
               jax.ShapeDtypeStruct((d.b, d.hv, d.kd, d.vd), _F32)]
  out_specs = [pl.BlockSpec((None, None, d.n * d.kd, bv), lambda b, h, j: (b, h, 0, j)), seqv, st]
  kernel = functools.partial(_dhu_kernel, has_seg=bool(segs), n_chunks=d.n, c=d.c, scale=scale,
                             cdt=cdt)
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=(d.b, d.hv, d.vd // bv), in_specs=in_specs,
      out_specs=out_specs, compiler_params=_params(interpret, dh_warps, dh_stages),
      interpret=interpret, name='gdr_dhu')(q, k, w, gc, do, dvl, dht, *segs[1:])


def _bwd_chunk(q, k, v, vn, do, dv2, h, dh, gc, beta, t, segs, d: _Dims, bs, *, scale,
               interpret):
  cdt = q.dtype
  qk, val, vec, tok, state = _chunk_specs(d)
  in_specs = ([qk(d.kd), qk(d.kd)] + [val(d.vd)] * 4 + [state(d.vd)] * 2 + [vec, vec, val(d.c)]
              + ([tok] * 3 if segs else []))
  dqk_dtype, dv_dtype = configs.grad_dtypes(q.dtype, v.dtype, d.grp)
  out_shape = [jax.ShapeDtypeStruct((d.b, d.tp, d.hv, d.kd), dqk_dtype),
               jax.ShapeDtypeStruct((d.b, d.tp, d.hv, d.kd), dqk_dtype),
               jax.ShapeDtypeStruct((d.b, d.tp, d.hv, d.vd), dv_dtype),
               jax.ShapeDtypeStruct((d.b, d.tp, d.hv), _F32),
               jax.ShapeDtypeStruct((d.b, d.tp, d.hv), _F32)]
  out_specs = [val(d.kd), val(d.kd), val(d.vd), vec, vec]
  kernel = functools.partial(_bwd_chunk_kernel, has_seg=bool(segs), scale=scale, cdt=cdt)
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=(d.n, d.b, d.hv), in_specs=in_specs, out_specs=out_specs,
      compiler_params=_params(interpret, bs.num_warps_bwd, bs.num_stages_chunk),
      interpret=interpret, name='gdr_bwd_chunk')(q, k, v, vn, do, dv2, h, dh, gc, beta, t, *segs)


# ---------------------------------------------------------------------------------------------
# The custom_vjp (padding and segment masks come from configs, shared with triton.py).
# ---------------------------------------------------------------------------------------------
def _forward(q, k, v, g, beta, h0, segs, scale, chunk_size, interpret, store_t=False,
             state_dtype=None):
  """Padded inputs -> (dims, block sizes, w, gc, h, v_new, final state, T or None); h and v_new
  in state_dtype (default: the inputs' dtype)."""
  del scale  # the output kernel's
  d = _Dims(q, v, chunk_size)
  bs = configs.block_sizes_for(d.vd, 'pallas', q.dtype)
  w, u, gc, *t = _intra(k, v, g, beta, segs, d, bs, store_t=store_t, interpret=interpret)
  h, vn, ht = _state_pass(k, w, u, gc, h0, segs, d, bs, interpret=interpret,
                          state_dtype=state_dtype)
  return d, bs, w, gc, h, vn, ht, (t[0] if t else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def chunk_checkpoints_padded(k, v, g, beta, segs, chunk_size, interpret=False):
  """Padded inputs (zero initial state) -> fp32 (h [B, N, HV, Kp, Vp] entering each chunk, v_new
  [B, Tp, HV, Vp]): the forward's intra and state-pass kernels alone (`api.chunk_checkpoints`).
  Differentiable through XLA's checkpoints, recomputed (no Pallas kernel backs this pullback)."""
  return _checkpoints_fwd(k, v, g, beta, segs, chunk_size, interpret)[0]


def _checkpoints_fwd(k, v, g, beta, segs, chunk_size, interpret):
  h0 = jnp.zeros((k.shape[0], v.shape[2], k.shape[3], v.shape[3]), _F32)
  _, _, _, _, h, vn, _, _ = _forward(k, k, v, g, beta, h0, segs, None, chunk_size, interpret,
                                     state_dtype=_F32)
  b, hv, _, vd = h.shape  # the kernels keep h as [B, HV, N Kp, Vp]; the op returns it chunk-major
  h = jnp.swapaxes(h.reshape(b, hv, -1, k.shape[3], vd), 1, 2)
  return (h, vn), (k, v, g, beta, segs)


def _xla_checkpoints(k, v, g, beta, segs, chunk_size):
  """XLA's checkpoints of padded inputs (segs[0] numbers the documents)."""
  seg_ids = segs[0].astype(jnp.int32) if segs else None
  h, vn, _ = xla.chunk_gated_delta_rule_fwd_h(k, k, v, g, beta, segment_ids=seg_ids,
                                              chunk_size=chunk_size)
  return h, vn


def _checkpoints_bwd(chunk_size, interpret, res, cts):
  del interpret
  k, v, g, beta, segs = res
  _, pullback = jax.vjp(lambda *x: _xla_checkpoints(*x, segs, chunk_size), k, v, g, beta)
  return pullback(cts) + (jax.tree.map(jnp.zeros_like, segs),)


chunk_checkpoints_padded.defvjp(_checkpoints_fwd, _checkpoints_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
@functools.partial(jax.jit, static_argnames=('scale', 'chunk_size', 'interpret'))
def _gdr(q, k, v, g, beta, h0, segs, scale, chunk_size, interpret):
  return _gdr_outputs(q, k, v, g, beta, h0, segs, scale, chunk_size, interpret, False)[0]


@functools.partial(jax.jit, static_argnames=('scale', 'chunk_size', 'interpret'))
def _gdr_fwd(q, k, v, g, beta, h0, segs, scale, chunk_size, interpret):
  return _gdr_outputs(q, k, v, g, beta, h0, segs, scale, chunk_size, interpret, True)


def _gdr_outputs(q, k, v, g, beta, h0, segs, scale, chunk_size, interpret, for_backward):
  """((o, final state), residuals): as in triton.py, the residuals keep the forward's w, g cumsum,
  chunk states, corrected values and T, so the backward recomputes nothing."""
  t, vd = q.shape[1], v.shape[3]
  kd = q.shape[3]
  pq, pk, pv, pg, pb, ph0 = configs.pad_inputs(q, k, v, g, beta, h0, chunk_size)
  d, bs, w, gc, h, vn, ht, tmat = _forward(pq, pk, pv, pg, pb, ph0, segs, scale, chunk_size,
                                           interpret, store_t=for_backward)
  o = _output(pq, pk, h, vn, gc, segs, d, bs, scale=scale, out_dtype=v.dtype, interpret=interpret)
  out = (o[:, :t, :, :vd], ht[:, :, :kd, :vd])
  return out, ((q, k, v, g, beta, h0, segs, w, gc, h, vn, tmat) if for_backward else None)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _gdr_bwd(scale, chunk_size, interpret, res, cts):
  q, k, v, g, beta, h0, segs, w, gc, h, vn, tmat = res
  do, dht = cts
  b, _, hq, _ = q.shape
  pq, pk, pv, _, pb, _ = configs.pad_inputs(q, k, v, g, beta, h0, chunk_size)
  d = _Dims(pq, pv, chunk_size)
  bs = configs.block_sizes_for(d.vd, 'pallas', pq.dtype)
  pdo, pdht = configs.pad_cotangents(do, dht, pq, pv)
  dvl = _dv_local(pq, pk, gc, pdo, segs, d, bs, scale=scale, interpret=interpret)
  dh, dv2, dh0 = _dhu(pq, pk, w, gc, pdo, dvl, pdht, segs, d, bs, scale=scale, interpret=interpret)
  dq, dk, dv, db, dg = _bwd_chunk(pq, pk, pv, vn, pdo, dv2, h, dh, gc, pb, tmat, segs, d, bs,
                                  scale=scale, interpret=interpret)
  if d.grp > 1:  # value heads sharing a key head
    dq = dq.reshape(b, d.tp, hq, d.grp, d.kd).sum(3)
    dk = dk.reshape(b, d.tp, hq, d.grp, d.kd).sum(3)
  return configs.crop_grads((dq, dk, dv, dg, db, dh0), q, k, v, g, beta, h0, segs)


_gdr.defvjp(_gdr_fwd, _gdr_bwd)


def chunk_gated_delta_rule_pallas(q, k, v, g, beta, *, scale=None, initial_state=None,
                                  segment_ids=None, output_final_state=False, chunk_size=64,
                                  interpret=False):
  """Chunked gated delta rule with Pallas kernels (forward and backward).

  Args:
    q, k: [B, T, H, K], l2-normalised by the caller; v: [B, T, HV, V], HV a multiple of H.
    g: [B, T, HV] log-decay (<= 0); beta: [B, T, HV].
    scale: multiplies q (default K ** -0.5).
    initial_state: [B, HV, K, V] fp32 seeding t = 0 (zeros if None).
    segment_ids: int [B, T]; the state resets to zero where the id changes.
    output_final_state: also return the fp32 state after the last token.
    chunk_size: 16, 32 or 64.
    interpret: run the kernels in the Pallas interpreter (CPU tests).

  Returns:
    (o [B, T, HV, V] in v.dtype, final state [B, HV, K, V] fp32 or None). Differentiable in q, k, v,
    g, beta and initial_state (custom_vjp with backward kernels).

  Raises:
    ValueError: a chunk size, head size or dtype the kernels do not take.
  """
  configs.check_inputs(q, k, v, chunk_size, 'Pallas')
  scale, h0, segs = configs.call_arguments(q, v, initial_state, segment_ids, scale, chunk_size)
  o, ht = _gdr(q, k, v, g, beta, h0, segs, scale, chunk_size, interpret)
  return o, (ht if output_final_state else None)
