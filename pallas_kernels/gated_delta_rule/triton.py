"""Chunked gated delta rule as `@triton.jit` kernels launched with jax-triton (GPU only).

The same algorithm, kernel split, padding and segment masks as `pallas.py` (see its docstring and
kernels.md sections 2-4), written against Triton directly: pointer arithmetic on the padded
[B, Tp, H(V), X] layouts, one program per (chunk, batch x value head) for the parallel kernels and
per (V tile, batch x value head) for the two sequential state passes.
jax-triton 0.3.1 (`out_shape=`).

triton is imported in a try/except and jax_triton only when called: importing this module on a
CPU-only machine never fails; calling it there raises a ValueError (the api falls back).
`interpret=True` runs the same pipeline with every kernel in Triton's interpreter on the host
(`_common.triton_interpret`; fp32, for the CPU tests).
"""
import functools

import jax
import jax.numpy as jnp

from pallas_kernels._common import triton_interpret
from pallas_kernels.gated_delta_rule import configs

_F32 = jnp.float32


try:  # Only the GPU machine has triton; importing this module elsewhere must not fail.
  import triton  # pylint: disable=g-import-not-at-top
  import triton.language as tl  # pylint: disable=g-import-not-at-top
except ImportError:  # pragma: no cover - CPU-only environments
  triton = None

if triton is not None:

  @triton.jit
  def ut_inverse(a, C: tl.constexpr, PREC: tl.constexpr):
    """(I + A)^-1 for strictly lower [C, C] fp32 A (pallas._ut_inverse's algorithm).

    The C/16 diagonal 16x16 blocks are inverted by forward substitution as one [C/16, 16, 16]
    tensor (row i of every block per step, 1/(C/16) of the work on the full [C, C] tile), then
    T = (I + N)^-1 D with D the block-diagonal inverse and N = D L nilpotent.
    """
    NB: tl.constexpr = C // 16
    o16 = tl.arange(0, 16)
    eye16 = tl.where(o16[:, None] == o16[None, :], 1.0, 0.0)  # [16, 16]
    ob = tl.arange(0, NB)
    same_blk4 = (ob[:, None, None, None] == ob[None, None, :, None])  # [NB, 1, NB, 1]
    # ad[b, i, j] = a[16b + i, 16b + j]: the diagonal blocks.
    ad = tl.sum(tl.where(same_blk4, tl.reshape(a, (NB, 16, NB, 16)), 0.0), axis=2)
    xd = tl.broadcast_to(eye16[None, :, :], (NB, 16, 16))
    row = o16[None, :, None]  # [1, 16, 1]
    for i in range(1, 16):
      sel = row == i
      av = tl.sum(tl.where(sel, ad, 0.0), axis=1)  # [NB, 16]: row i of every block
      y = tl.sum(av[:, :, None] * xd, axis=1)  # [NB, 16]: row i of A_b X_b
      xd = tl.where(sel, eye16[None, :, :] - y[:, None, :], xd)
    if C == 16:
      return tl.reshape(xd, (16, 16))
    o = tl.arange(0, C)
    blk = (o[:, None] // 16) == (o[None, :] // 16)
    eye = tl.where(o[:, None] == o[None, :], 1.0, 0.0)
    x4 = tl.broadcast_to(xd[:, :, None, :], (NB, 16, NB, 16))
    x = tl.where(blk, tl.reshape(x4, (C, C)), 0.0)
    neg_n = -tl.dot(x, tl.where(blk, 0.0, a), input_precision=PREC)
    acc = eye + neg_n
    if C > 32:
      p = tl.dot(neg_n, neg_n, input_precision=PREC)
      acc = tl.dot(acc, eye + p, input_precision=PREC)
    return tl.dot(acc, x, input_precision=PREC)

  @triton.jit
  def intra_kernel(k, v, g, beta, seg, carry, w, u, gc, tm,
                   TP: tl.constexpr, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr,
                   V: tl.constexpr, C: tl.constexpr, HAS_SEG: tl.constexpr, STORE_T: tl.constexpr,
                   PREC: tl.constexpr, IO_PREC: tl.constexpr):
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // HV
    i_h = i_bh % HV
    kh = i_h // (HV // H)
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, K)
    o_v = tl.arange(0, V)
    tok = (i_b * TP + i_n * C + o_c).to(tl.int64)
    b_k = tl.load(k + (tok * H + kh)[:, None] * K + o_k[None, :])
    b_g = tl.load(g + tok * HV + i_h)
    b_b = tl.load(beta + tok * HV + i_h)
    b_gc = tl.cumsum(b_g, axis=0)
    strict = o_c[:, None] > o_c[None, :]
    ks = b_b * tl.exp(b_gc)
    if HAS_SEG:
      b_seg = tl.load(seg + tok)
      strict = strict & (b_seg[:, None] == b_seg[None, :])
      ks = ks * tl.load(carry + tok)
    kk = tl.dot(b_k, tl.trans(b_k), input_precision=IO_PREC)
    a = tl.where(strict, b_b[:, None] * kk * tl.exp(b_gc[:, None] - b_gc[None, :]), 0.0)
    t = ut_inverse(a, C, PREC).to(b_k.dtype)
    tl.store(gc + tok * HV + i_h, b_gc)
    if STORE_T:
      tl.store(tm + (tok * HV + i_h)[:, None] * C + o_c[None, :], t.to(tm.dtype.element_ty))
    # W, then U: v is loaded only once W is stored (fewer live [C, *] tiles).
    b_w = tl.dot(t, (b_k * ks[:, None]).to(b_k.dtype), input_precision=IO_PREC)
    tl.store(w + (tok * HV + i_h)[:, None] * K + o_k[None, :], b_w.to(w.dtype.element_ty))
    b_v = tl.load(v + (tok * HV + i_h)[:, None] * V + o_v[None, :])
    b_u = tl.dot(t, (b_v * b_b[:, None]).to(b_v.dtype), input_precision=IO_PREC)
    tl.store(u + (tok * HV + i_h)[:, None] * V + o_v[None, :], b_u.to(u.dtype.element_ty))

  @triton.jit
  def _state_rows(i_b, i_h, n, NT: tl.constexpr, HV: tl.constexpr, K: tl.constexpr):
    """Row offsets [K] of chunk n's [K, V] state of batch row i_b and value head i_h in the
    chunk-major layout [B, NT, HV, K, V] of the chunk states h and their cotangents dh (the layout
    the two-stream noisy op reads its checkpoints in: no transpose between them)."""
    return ((i_b * NT + n) * HV + i_h).to(tl.int64) * K + tl.arange(0, K)

  @triton.jit
  def state_pass_kernel(k, w, u, gc, h0, carry, writes, h, vn, ht, h_lo, vn_lo,
                        TP: tl.constexpr, NT: tl.constexpr, H: tl.constexpr, HV: tl.constexpr,
                        K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
                        HAS_SEG: tl.constexpr, IO_PREC: tl.constexpr, LOW_COPIES: tl.constexpr):
    """The serial pass over chunks: chunk states h (entering each chunk), corrected values vn and
    the final state ht; with LOW_COPIES, h and vn also rounded to h_lo's dtype (the same
    round-to-nearest-even as an XLA convert, without its pass over them)."""
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // HV
    i_h = i_bh % HV
    kh = i_h // (HV // H)
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, K)
    o_v = i_v * BV + tl.arange(0, BV)
    st = (i_bh * K + o_k).to(tl.int64)[:, None] * V + o_v[None, :]
    b_s = tl.load(h0 + st)
    for n in range(NT):
      # Every load before the stores, above which they could not be moved (no aliasing is
      # known), so that their latency overlaps the stores: H100, T = 4096, 16 heads, bf16,
      # profiled in separate runs: 0.094 against 0.110 ms (0.169 against 0.185 in the two-stream
      # pass). The same order in dhu_kernel was slower there (0.435 against 0.343).
      tok = (i_b * TP + n * C + o_c).to(tl.int64)
      p_v = (tok * HV + i_h)[:, None] * V + o_v[None, :]
      b_w = tl.load(w + (tok * HV + i_h)[:, None] * K + o_k[None, :])
      b_u = tl.load(u + p_v).to(tl.float32)
      b_gc = tl.load(gc + tok * HV + i_h)
      gl = tl.load(gc + (i_b * TP + n * C + C - 1).to(tl.int64) * HV + i_h)
      kdec = tl.exp(gl - b_gc)
      keep = tl.exp(gl)
      if HAS_SEG:
        kdec = kdec * tl.load(writes + tok)
        keep = keep * tl.load(carry + i_b * TP + n * C + C - 1)
      b_kt = tl.load(k + (tok * H + kh)[None, :] * K + o_k[:, None])  # [K, C]
      hoff = _state_rows(i_b, i_h, n, NT, HV, K)[:, None] * V + o_v[None, :]
      tl.store(h + hoff, b_s.to(h.dtype.element_ty))
      if LOW_COPIES:
        tl.store(h_lo + hoff, b_s.to(h_lo.dtype.element_ty))
      b_vn = b_u - tl.dot(b_w, b_s.to(b_w.dtype), input_precision=IO_PREC)
      tl.store(vn + p_v, b_vn.to(vn.dtype.element_ty))
      if LOW_COPIES:
        tl.store(vn_lo + p_v, b_vn.to(vn_lo.dtype.element_ty))
      b_s = keep * b_s + tl.dot(b_kt, (b_vn * kdec[:, None]).to(b_kt.dtype),
                                input_precision=IO_PREC)
    tl.store(ht + st, b_s)

  @triton.jit
  def output_kernel(q, k, h, vn, gc, seg, carry, o,
                    TP: tl.constexpr, NT: tl.constexpr, H: tl.constexpr, HV: tl.constexpr,
                    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
                    SCALE: tl.constexpr, HAS_SEG: tl.constexpr, IO_PREC: tl.constexpr):
    NV: tl.constexpr = V // BV
    i_v = tl.program_id(0) % NV
    i_n = tl.program_id(0) // NV
    i_bh = tl.program_id(1)
    i_b = i_bh // HV
    i_h = i_bh % HV
    kh = i_h // (HV // H)
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, K)
    o_v = i_v * BV + tl.arange(0, BV)
    tok = (i_b * TP + i_n * C + o_c).to(tl.int64)
    b_q = tl.load(q + (tok * H + kh)[:, None] * K + o_k[None, :])
    b_kt = tl.load(k + (tok * H + kh)[None, :] * K + o_k[:, None])
    b_h = tl.load(h + _state_rows(i_b, i_h, i_n, NT, HV, K)[:, None] * V + o_v[None, :])
    p_v = (tok * HV + i_h)[:, None] * V + o_v[None, :]
    b_vn = tl.load(vn + p_v)
    b_gc = tl.load(gc + tok * HV + i_h)
    causal = o_c[:, None] >= o_c[None, :]
    qdec = tl.exp(b_gc)
    if HAS_SEG:
      b_seg = tl.load(seg + tok)
      causal = causal & (b_seg[:, None] == b_seg[None, :])
      qdec = qdec * tl.load(carry + tok)
    qk = tl.dot(b_q, b_kt, input_precision=IO_PREC)
    qk = tl.where(causal, qk * tl.exp(b_gc[:, None] - b_gc[None, :]), 0.0)
    b_o = (tl.dot(b_q, b_h.to(b_q.dtype), input_precision=IO_PREC) * qdec[:, None]
           + tl.dot(qk.to(b_vn.dtype), b_vn, input_precision=IO_PREC))
    tl.store(o + p_v, (b_o * SCALE).to(o.dtype.element_ty))

  @triton.jit
  def dv_local_kernel(q, k, gc, do, seg, dv,
                      TP: tl.constexpr, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr,
                      V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, SCALE: tl.constexpr,
                      HAS_SEG: tl.constexpr, IO_PREC: tl.constexpr):
    NV: tl.constexpr = V // BV
    i_v = tl.program_id(0) % NV
    i_n = tl.program_id(0) // NV
    i_bh = tl.program_id(1)
    i_b = i_bh // HV
    i_h = i_bh % HV
    kh = i_h // (HV // H)
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, K)
    o_v = i_v * BV + tl.arange(0, BV)
    tok = (i_b * TP + i_n * C + o_c).to(tl.int64)
    b_k = tl.load(k + (tok * H + kh)[:, None] * K + o_k[None, :])
    b_qt = tl.load(q + (tok * H + kh)[None, :] * K + o_k[:, None])
    b_gc = tl.load(gc + tok * HV + i_h)
    # Entry (j, i) = k_j.q_i exp(G_i - G_j) for i >= j: (Q K^T * D)^T.
    upper = o_c[:, None] <= o_c[None, :]
    if HAS_SEG:
      b_seg = tl.load(seg + tok)
      upper = upper & (b_seg[:, None] == b_seg[None, :])
    kq = tl.dot(b_k, b_qt, input_precision=IO_PREC)
    kq = tl.where(upper, kq * tl.exp(b_gc[None, :] - b_gc[:, None]), 0.0) * SCALE
    p_v = (tok * HV + i_h)[:, None] * V + o_v[None, :]
    b_do = tl.load(do + p_v)
    b_dv = tl.dot(kq.to(b_do.dtype), b_do, input_precision=IO_PREC)
    tl.store(dv + p_v, b_dv.to(dv.dtype.element_ty))

  @triton.jit
  def dhu_kernel(q, k, w, gc, do, dvl, dht, carry, writes, dh_ext, dvn_ext, dh, dv2, dh0,
                 TP: tl.constexpr, NT: tl.constexpr, H: tl.constexpr, HV: tl.constexpr,
                 K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
                 SCALE: tl.constexpr, HAS_SEG: tl.constexpr, HAS_EXT: tl.constexpr,
                 IO_PREC: tl.constexpr):
    """Backward state pass: dh[n] = cotangent of the state leaving chunk n, dv2 = of v_new.
    HAS_EXT adds outside cotangents of the checkpoints (`chunk_checkpoints`): dh_ext
    [B, N, HV, K, V] of the state entering each chunk and dvn_ext [B, TP, HV, V] of v_new (both
    fp32)."""
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // HV
    i_h = i_bh % HV
    kh = i_h // (HV // H)
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, K)
    o_v = i_v * BV + tl.arange(0, BV)
    st = (i_bh * K + o_k).to(tl.int64)[:, None] * V + o_v[None, :]
    b_ds = tl.load(dht + st)
    for i in range(NT):
      n = NT - 1 - i
      hoff = _state_rows(i_b, i_h, n, NT, HV, K)[:, None] * V + o_v[None, :]
      tl.store(dh + hoff, b_ds.to(dh.dtype.element_ty))
      tok = (i_b * TP + n * C + o_c).to(tl.int64)
      b_gc = tl.load(gc + tok * HV + i_h)
      gl = tl.load(gc + (i_b * TP + n * C + C - 1).to(tl.int64) * HV + i_h)
      kdec = tl.exp(gl - b_gc)
      qdec = tl.exp(b_gc)
      keep = tl.exp(gl)
      if HAS_SEG:
        kdec = kdec * tl.load(writes + tok)
        qdec = qdec * tl.load(carry + tok)
        keep = keep * tl.load(carry + i_b * TP + n * C + C - 1)
      b_k = tl.load(k + (tok * H + kh)[:, None] * K + o_k[None, :])
      p_v = (tok * HV + i_h)[:, None] * V + o_v[None, :]
      b_dv = tl.load(dvl + p_v).to(tl.float32) + kdec[:, None] * tl.dot(
          b_k, b_ds.to(b_k.dtype), input_precision=IO_PREC)
      if HAS_EXT:
        b_dv += tl.load(dvn_ext + p_v)
      tl.store(dv2 + p_v, b_dv.to(dv2.dtype.element_ty))
      b_qt = tl.load(q + (tok * H + kh)[None, :] * K + o_k[:, None])
      b_wt = tl.load(w + (tok * HV + i_h)[None, :] * K + o_k[:, None])
      b_do = tl.load(do + p_v)
      b_ds = (keep * b_ds
              + SCALE * tl.dot((b_qt * qdec[None, :]).to(b_do.dtype), b_do,
                               input_precision=IO_PREC)
              - tl.dot(b_wt, b_dv.to(b_wt.dtype), input_precision=IO_PREC))
      if HAS_EXT:  # the state entering chunk n (before its resets) is checkpoint n
        b_ds += tl.load(dh_ext + hoff)
    tl.store(dh0 + st, b_ds)

  @triton.jit
  def _bwd_value_terms(b_vn, b_do, b_dv2, v, dv, p_v, b_tt, b_b, acc_ds, acc_dt, acc_db,
                       IO_PREC: tl.constexpr):
    """One V tile's terms of `bwd_chunk_kernel` that need no state, given its tiles of V_new, dO
    and dU = dv2: the intra-chunk score gradient dO V_new^T, the UT transform's dT from dU,
    dbeta's dv part; stores dv."""
    acc_ds = tl.dot(b_do, tl.trans(b_vn), acc_ds, input_precision=IO_PREC)
    b_v = tl.load(v + p_v)
    acc_dt = tl.dot(b_dv2, tl.trans((b_v * b_b[:, None]).to(b_v.dtype)), acc_dt,
                    input_precision=IO_PREC)
    b_dvb = tl.dot(b_tt, b_dv2, input_precision=IO_PREC)
    acc_db += tl.sum(b_dvb * b_v.to(tl.float32), axis=1)
    tl.store(dv + p_v, (b_dvb * b_b[:, None]).to(dv.dtype.element_ty))
    return acc_ds, acc_dt, acc_db

  @triton.jit
  def bwd_chunk_kernel(q, k, v, vn, do, dv2, h, dh, gc, beta, tm, seg, carry, writes,
                       dq, dk, dv, db, dg,
                       TP: tl.constexpr, NT: tl.constexpr, H: tl.constexpr, HV: tl.constexpr,
                       K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
                       SCALE: tl.constexpr, HAS_SEG: tl.constexpr, IO_PREC: tl.constexpr,
                       SPLIT_V_PASS: tl.constexpr):
    """dq, dk, dv, dbeta, dg of one chunk. Every V-indexed operand (h, dh, vn, do, dv2, v) is
    walked in [*, BV] tiles that feed [C, K] / [C, C] accumulators, so only one V tile of the
    [K, V] states is live at a time (fewer registers spilled). SPLIT_V_PASS walks the V tiles
    twice, the state terms then the value terms (`_bwd_value_terms`), so that only three or two
    of the five accumulators take products at a time (`BlockSizes.split_bwd_v_pass`)."""
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // HV
    i_h = i_bh % HV
    kh = i_h // (HV // H)
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, K)
    tok = (i_b * TP + i_n * C + o_c).to(tl.int64)
    p_qk = (tok * H + kh)[:, None] * K + o_k[None, :]
    b_gc = tl.load(gc + tok * HV + i_h)
    b_b = tl.load(beta + tok * HV + i_h)
    b_t = tl.load(tm + (tok * HV + i_h)[:, None] * C + o_c[None, :])
    b_tt = tl.trans(b_t)
    # V-tile pass: state terms of dq / dk / dW, the intra-chunk score gradient, the UT transform's
    # dT from dU, and dv (which needs only T and dU = dv2).
    acc_dq = tl.zeros([C, K], dtype=tl.float32)  # dO H^T
    acc_dk = tl.zeros([C, K], dtype=tl.float32)  # V_new dH^T
    acc_dw = tl.zeros([C, K], dtype=tl.float32)  # dU H^T (dW = -it)
    acc_ds = tl.zeros([C, C], dtype=tl.float32)  # dO V_new^T
    acc_dt = tl.zeros([C, C], dtype=tl.float32)  # dU (diag(beta) V)^T
    acc_db = tl.zeros([C], dtype=tl.float32)
    hdh = 0.0
    for i_v in range(V // BV):
      o_v = i_v * BV + tl.arange(0, BV)
      p_v = (tok * HV + i_h)[:, None] * V + o_v[None, :]
      p_st = _state_rows(i_b, i_h, i_n, NT, HV, K)[:, None] * V + o_v[None, :]
      b_h = tl.load(h + p_st)
      b_dh = tl.load(dh + p_st)
      b_vn = tl.load(vn + p_v)
      b_do = tl.load(do + p_v)
      b_dv2 = tl.load(dv2 + p_v)
      b_ht = tl.trans(b_h).to(b_do.dtype)
      acc_dq = tl.dot(b_do, b_ht, acc_dq, input_precision=IO_PREC)
      acc_dk = tl.dot(b_vn, tl.trans(b_dh).to(b_vn.dtype), acc_dk, input_precision=IO_PREC)
      acc_dw = tl.dot(b_dv2, b_ht, acc_dw, input_precision=IO_PREC)
      hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32))
      if not SPLIT_V_PASS:
        acc_ds, acc_dt, acc_db = _bwd_value_terms(b_vn, b_do, b_dv2, v, dv, p_v, b_tt, b_b,
                                                  acc_ds, acc_dt, acc_db, IO_PREC)
    if SPLIT_V_PASS:
      for i_v in range(V // BV):
        p_v = (tok * HV + i_h)[:, None] * V + (i_v * BV + tl.arange(0, BV))[None, :]
        acc_ds, acc_dt, acc_db = _bwd_value_terms(
            tl.load(vn + p_v), tl.load(do + p_v), tl.load(dv2 + p_v), v, dv, p_v, b_tt, b_b,
            acc_ds, acc_dt, acc_db, IO_PREC)
    gl = tl.load(gc + (i_b * TP + i_n * C + C - 1).to(tl.int64) * HV + i_h)
    causal = o_c[:, None] >= o_c[None, :]
    strict = o_c[:, None] > o_c[None, :]
    qdec = tl.exp(b_gc)
    kdec = tl.exp(gl - b_gc)
    keep = tl.exp(gl)
    if HAS_SEG:
      b_seg = tl.load(seg + tok)
      same = b_seg[:, None] == b_seg[None, :]
      causal = causal & same
      strict = strict & same
      qdec = qdec * tl.load(carry + tok)
      kdec = kdec * tl.load(writes + tok)
      keep = keep * tl.load(carry + i_b * TP + i_n * C + C - 1)
    b_q = tl.load(q + p_qk)
    b_k = tl.load(k + p_qk)
    dt_ = b_q.dtype
    # Output and leaving-state terms.
    b_dq = acc_dq * (SCALE * qdec)[:, None]
    b_dk = acc_dk * kdec[:, None]
    dg_last = keep * hdh + tl.sum(b_dk * b_k.to(tl.float32))
    b_ds = tl.where(causal, acc_ds * tl.exp(b_gc[:, None] - b_gc[None, :]), 0.0) * SCALE
    b_dq += tl.dot(b_ds.to(dt_), b_k, input_precision=IO_PREC)
    b_dk += tl.dot(tl.trans(b_ds).to(dt_), b_q, input_precision=IO_PREC)
    dgc = (tl.sum(b_dq * b_q.to(tl.float32), axis=1) - tl.sum(b_dk * b_k.to(tl.float32), axis=1)
           + tl.where(o_c == C - 1, dg_last, 0.0))
    # WY backward: W = T diag(beta e^G) K, U = T diag(beta) V.
    kscale = b_b * qdec
    b_dw = (-acc_dw).to(dt_)
    b_dt = tl.dot(b_dw, tl.trans((b_k * kscale[:, None]).to(dt_)), acc_dt,
                  input_precision=IO_PREC)
    b_dkb = tl.dot(b_tt, b_dw, input_precision=IO_PREC)
    dkb_k = tl.sum(b_dkb * b_k.to(tl.float32), axis=1)
    b_dk += b_dkb * kscale[:, None]
    b_db = dkb_k * qdec + acc_db
    dgc += dkb_k * kscale
    b_da = tl.dot(tl.dot(b_tt, b_dt.to(dt_), input_precision=IO_PREC).to(dt_), b_tt,
                  input_precision=IO_PREC)
    b_da = tl.where(strict, -b_da * tl.exp(b_gc[:, None] - b_gc[None, :]), 0.0)
    kk = tl.dot(b_k, tl.trans(b_k), input_precision=IO_PREC)
    dab = b_da * b_b[:, None]
    b_dk += (tl.dot(dab.to(dt_), b_k, input_precision=IO_PREC)
             + tl.dot(tl.trans(dab).to(dt_), b_k, input_precision=IO_PREC))
    b_db += tl.sum(b_da * kk, axis=1)
    ada = dab * kk
    dgc += tl.sum(ada, axis=1) - tl.sum(ada, axis=0)
    p_dqk = (tok * HV + i_h)[:, None] * K + o_k[None, :]
    tl.store(dq + p_dqk, b_dq.to(dq.dtype.element_ty))
    tl.store(dk + p_dqk, b_dk.to(dk.dtype.element_ty))
    tl.store(db + tok * HV + i_h, b_db)
    tl.store(dg + tok * HV + i_h, tl.sum(dgc, axis=0) - tl.cumsum(dgc, axis=0) + dgc)

  _KERNELS = dict(intra=intra_kernel, state_pass=state_pass_kernel, output=output_kernel,
                  dv_local=dv_local_kernel, dhu=dhu_kernel, bwd_chunk=bwd_chunk_kernel)


def _kernels():
  if triton is None:
    raise ValueError('the triton gated delta rule needs the triton package')
  return _KERNELS


def _jt(interpret=False):
  """The module whose `triton_call` launches the kernels: jax_triton, or the interpreter's."""
  if interpret:
    return triton_interpret
  try:
    import jax_triton  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # CPU-only jax, or jax_triton missing
    raise ValueError(f'the triton gated delta rule needs jax_triton and a GPU: {e}') from e
  return jax_triton


class _Dims:
  """Static sizes of one call (after padding) and the dot precisions for its dtype."""

  def __init__(self, q, v, chunk_size):
    self.b, self.tp, self.h, self.kd = q.shape
    self.hv, self.vd = v.shape[2], v.shape[3]
    self.c = chunk_size
    self.n = self.tp // chunk_size
    self.grp = self.hv // self.h
    f32 = q.dtype == _F32
    # fp32 inputs: three TF32 products per dot (fp32-level accuracy on tensor cores). IEEE fp32
    # dots lower to FMA loops that ptxas spilled at 24-130 KB per thread (minutes to compile,
    # launch.kernel_registers). 16-bit inputs: fla's choice, TF32.
    self.prec = 'tf32x3' if f32 else 'tf32'
    self.io_prec = 'tf32x3' if f32 else 'tf32'

  def meta(self, **kw):
    return dict(TP=self.tp, H=self.h, HV=self.hv, K=self.kd, V=self.vd, C=self.c, **kw)


def _dummy():
  return jnp.zeros((1,), _F32)


def _segs3(segs):
  return tuple(segs) if segs else (_dummy(),) * 3


def _forward(q, k, v, g, beta, h0, segs, chunk_size, interpret, store_t=False, state_dtype=None,
             checkpoints=False):
  """Padded inputs -> (dims, block sizes, w, gc, h, v_new, final state, T or None, low copies);
  h and v_new in state_dtype (default: the inputs' dtype); low copies: None, or with a
  state_dtype other than the inputs', h and v_new also in the inputs' dtype. checkpoints: the
  checkpoint ops' pass (`configs.BlockSizes.get_default`)."""
  jt = _jt(interpret)
  kn = _kernels()
  d = _Dims(q, v, chunk_size)
  bs = configs.block_sizes_for(d.vd, 'triton', q.dtype, checkpoints)
  seg, carry, writes = _segs3(segs)
  cdt = k.dtype
  tshape = (d.b, d.tp, d.hv, d.c) if store_t else (1,)
  w, u, gc, tm = jt.triton_call(
      k, v, g, beta, seg, carry, kernel=kn['intra'],
      out_shape=[jax.ShapeDtypeStruct((d.b, d.tp, d.hv, d.kd), cdt),
                 jax.ShapeDtypeStruct((d.b, d.tp, d.hv, d.vd), cdt),
                 jax.ShapeDtypeStruct((d.b, d.tp, d.hv), _F32),
                 jax.ShapeDtypeStruct(tshape, cdt)],
      grid=(d.n, d.b * d.hv), num_warps=bs.num_warps_chunk, num_stages=bs.num_stages_chunk,
      **d.meta(HAS_SEG=bool(segs), STORE_T=store_t, PREC=d.prec, IO_PREC=d.io_prec))
  bv = min(bs.bv, d.vd)
  sdt = jnp.dtype(state_dtype or cdt)
  low = sdt != cdt
  h_shape, vn_shape = (d.b, d.n, d.hv, d.kd, d.vd), (d.b, d.tp, d.hv, d.vd)
  h, vn, ht, h_lo, vn_lo = jt.triton_call(
      k, w, u, gc, h0, carry, writes, kernel=kn['state_pass'],
      out_shape=[jax.ShapeDtypeStruct(h_shape, sdt), jax.ShapeDtypeStruct(vn_shape, sdt),
                 jax.ShapeDtypeStruct((d.b, d.hv, d.kd, d.vd), _F32)]
      + [jax.ShapeDtypeStruct(x if low else (1,), cdt) for x in (h_shape, vn_shape)],
      grid=(d.vd // bv, d.b * d.hv), num_warps=bs.num_warps, num_stages=bs.num_stages,
      **d.meta(NT=d.n, BV=bv, HAS_SEG=bool(segs), IO_PREC=d.io_prec, LOW_COPIES=low))
  return d, bs, w, gc, h, vn, ht, (tm if store_t else None), ((h_lo, vn_lo) if low else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def chunk_checkpoints_padded(k, v, g, beta, segs, chunk_size, interpret=False):
  """Padded inputs (zero initial state) -> fp32 (h [B, N, HV, Kp, Vp] entering each chunk, v_new
  [B, Tp, HV, Vp]): the forward's intra and state-pass kernels alone (`api.chunk_checkpoints`).
  Differentiable in k, v, g, beta by the backward kernels, with the checkpoints' cotangents
  entering the backward state pass (no output cotangent)."""
  return _checkpoints_fwd(k, v, g, beta, segs, chunk_size, interpret)[0]


@functools.partial(jax.jit, static_argnums=(5, 6))
def _checkpoints_fwd(k, v, g, beta, segs, chunk_size, interpret):
  _, _, w, gc, h, vn, h_c, vn_c, tm = _clean_pass_forward(k, k, v, g, beta, segs, chunk_size,
                                                          interpret)
  return (h, vn), (k, v, beta, segs, w, gc, h_c, vn_c, tm)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _checkpoints_bwd(chunk_size, interpret, res, cts):
  k, v, beta, segs, w, gc, h, vn, tm = res
  _, dk, dv, dg, db = _clean_pass_backward(k, k, v, beta, None, segs, w, gc, h, vn, tm, cts,
                                           scale=1.0, chunk_size=chunk_size, interpret=interpret)
  return dk, dv, dg, db, jax.tree.map(jnp.zeros_like, segs)


chunk_checkpoints_padded.defvjp(_checkpoints_fwd, _checkpoints_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def output_and_checkpoints_padded(q, k, v, g, beta, segs, scale, chunk_size, interpret=False):
  """Padded inputs (zero initial state) -> (o [B, Tp, HV, Vp] in v's dtype, fp32 checkpoints h
  [B, N, HV, Kp, Vp] and v_new [B, Tp, HV, Vp]): the chunked forward and `chunk_checkpoints_padded`
  from one intra and one state pass. Its backward is one set of backward kernels, the output's
  and the checkpoints' cotangents entering together (the two-stream schedules' shared clean
  pass)."""
  return _output_and_checkpoints_fwd(q, k, v, g, beta, segs, scale, chunk_size, interpret)[0]


@functools.partial(jax.jit, static_argnums=(6, 7, 8))
def _output_and_checkpoints_fwd(q, k, v, g, beta, segs, scale, chunk_size, interpret):
  d, bs, w, gc, h, vn, h_c, vn_c, tm = _clean_pass_forward(q, k, v, g, beta, segs, chunk_size,
                                                           interpret)
  o = _output(q, k, h_c, vn_c, gc, segs, d, bs, scale, v.dtype, interpret)
  return (o, h, vn), (q, k, v, beta, segs, w, gc, h_c, vn_c, tm)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _output_and_checkpoints_bwd(scale, chunk_size, interpret, res, cts):
  q, k, v, beta, segs, w, gc, h, vn, tm = res
  do, dh_ext, dvn_ext = cts
  grads = _clean_pass_backward(q, k, v, beta, do.astype(v.dtype), segs, w, gc, h, vn, tm,
                               (dh_ext, dvn_ext), scale=scale, chunk_size=chunk_size,
                               interpret=interpret)
  return grads + (jax.tree.map(jnp.zeros_like, segs),)


output_and_checkpoints_padded.defvjp(_output_and_checkpoints_fwd, _output_and_checkpoints_bwd)


def _clean_pass_forward(q, k, v, g, beta, segs, chunk_size, interpret):
  """The checkpoint ops' forward on padded inputs, zero initial state: (dims, block sizes, w, g
  cumsum, fp32 h and v_new (the ops' outputs), h and v_new in the inputs' dtype (what the output
  and backward kernels read), the UT matrices T)."""
  h0 = jnp.zeros((k.shape[0], v.shape[2], k.shape[3], v.shape[3]), _F32)
  d, bs, w, gc, h, vn, _, tm, lows = _forward(q, k, v, g, beta, h0, segs, chunk_size, interpret,
                                              store_t=True, state_dtype=_F32, checkpoints=True)
  h_c, vn_c = lows or (h, vn)
  return d, bs, w, gc, h, vn, h_c, vn_c, tm


def _clean_pass_backward(q, k, v, beta, pdo, segs, w, gc, h, vn, tm, checkpoint_cts, *, scale,
                         chunk_size, interpret):
  """The checkpoint ops' backward: (dq, dk, dv, dg, dbeta) padded, key heads summed, for the
  output cotangent pdo (None: no output) and the checkpoints' cotangents (dh, dv_new)."""
  d = _Dims(q, v, chunk_size)
  dq, dk, dv, db, dg, _ = _backward_passes(
      q, k, v, beta, pdo, jnp.zeros((d.b, d.hv, d.kd, d.vd), _F32), segs, w, gc, h, vn, tm,
      tuple(x.astype(_F32) for x in checkpoint_cts), scale=scale, chunk_size=chunk_size,
      interpret=interpret, grad_dtypes=configs.grad_dtypes(q.dtype, v.dtype, d.grp))
  return (_key_heads(dq, d).astype(q.dtype), _key_heads(dk, d).astype(k.dtype),
          dv.astype(v.dtype), dg, db)


def _output(pq, pk, h, vn, gc, segs, d: '_Dims', bs, scale, dtype, interpret):
  """The output kernel: o [B, Tp, HV, Vp] in `dtype` from the chunk states h and corrected values
  vn (the inputs' dtype)."""
  seg, carry, _ = _segs3(segs)
  bv = min(bs.bv_out, d.vd)
  return _jt(interpret).triton_call(
      pq, pk, h, vn, gc, seg, carry, kernel=_kernels()['output'],
      out_shape=jax.ShapeDtypeStruct((d.b, d.tp, d.hv, d.vd), dtype),
      grid=(d.vd // bv * d.n, d.b * d.hv), num_warps=bs.num_warps_out,
      num_stages=bs.num_stages_chunk,
      **d.meta(NT=d.n, BV=bv, SCALE=scale, HAS_SEG=bool(segs), IO_PREC=d.io_prec))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
@functools.partial(jax.jit, static_argnames=('scale', 'chunk_size', 'interpret'))
def _gdr(q, k, v, g, beta, h0, segs, scale, chunk_size, interpret):
  return _gdr_outputs(q, k, v, g, beta, h0, segs, scale, chunk_size, interpret,
                      for_backward=False)[0]


@functools.partial(jax.jit, static_argnames=('scale', 'chunk_size', 'interpret'))
def _gdr_fwd(q, k, v, g, beta, h0, segs, scale, chunk_size, interpret):
  return _gdr_outputs(q, k, v, g, beta, h0, segs, scale, chunk_size, interpret,
                      for_backward=True)


def _gdr_outputs(q, k, v, g, beta, h0, segs, scale, chunk_size, interpret, for_backward):
  """((o, final state), residuals). The residuals keep the forward's intermediates (w, g cumsum,
  chunk states h, corrected values vn, the UT matrix T), so the backward recomputes nothing (see
  pallas.py's docstring)."""
  t, kd, vd = q.shape[1], q.shape[3], v.shape[3]
  pq, pk, pv, pg, pb, ph0 = configs.pad_inputs(q, k, v, g, beta, h0, chunk_size)
  d, bs, w, gc, h, vn, ht, tm, _ = _forward(pq, pk, pv, pg, pb, ph0, segs, chunk_size, interpret,
                                            store_t=for_backward)
  o = _output(pq, pk, h, vn, gc, segs, d, bs, scale, v.dtype, interpret)
  res = (q, k, v, g, beta, h0, segs, w, gc, h, vn, tm) if for_backward else None
  return (o[:, :t, :, :vd], ht[:, :, :kd, :vd]), res


def _backward_passes(pq, pk, pv, pb, pdo, pdht, segs, w, gc, h, vn, tm, ext, *, scale, chunk_size,
                     interpret, grad_dtypes):
  """The backward kernels on padded operands -> padded (dq, dk, dv, dbeta, dg, dh0), value heads
  not yet summed into key heads. pdo None: no output cotangent (zeros; dv_local is skipped).
  ext: () or (dh_ext, dvn_ext), outside cotangents of the chunk checkpoints
  (`chunk_checkpoints_padded`)."""
  jt = _jt(interpret)
  kn = _kernels()
  d = _Dims(pq, pv, chunk_size)
  bs = configs.block_sizes_for(d.vd, 'triton', pq.dtype, checkpoints=bool(ext))
  seg, carry, writes = _segs3(segs)
  cdt = pq.dtype
  has_seg = bool(segs)
  dqk_dtype, dv_dtype = grad_dtypes
  bvo = min(bs.bv_out, d.vd)
  if pdo is None:
    pdo = dvl = jnp.zeros((d.b, d.tp, d.hv, d.vd), cdt)
  else:
    dvl = jt.triton_call(
        pq, pk, gc, pdo, seg, kernel=kn['dv_local'],
        out_shape=jax.ShapeDtypeStruct((d.b, d.tp, d.hv, d.vd), cdt),
        grid=(d.vd // bvo * d.n, d.b * d.hv), num_warps=bs.num_warps_out,
        num_stages=bs.num_stages_chunk,
        **d.meta(BV=bvo, SCALE=scale, HAS_SEG=has_seg, IO_PREC=d.io_prec))
  bv, dh_warps, dh_stages = bs.dh_launch()
  bv = min(bv, d.vd)
  dh, dv2, dh0 = jt.triton_call(
      pq, pk, w, gc, pdo, dvl, pdht, carry, writes, *(ext or (_dummy(), _dummy())),
      kernel=kn['dhu'],
      out_shape=[jax.ShapeDtypeStruct((d.b, d.n, d.hv, d.kd, d.vd), cdt),
                 jax.ShapeDtypeStruct((d.b, d.tp, d.hv, d.vd), cdt),
                 jax.ShapeDtypeStruct((d.b, d.hv, d.kd, d.vd), _F32)],
      grid=(d.vd // bv, d.b * d.hv), num_warps=dh_warps, num_stages=dh_stages,
      **d.meta(NT=d.n, BV=bv, SCALE=scale, HAS_SEG=has_seg, HAS_EXT=bool(ext),
               IO_PREC=d.io_prec))
  dq, dk, dv, db, dg = jt.triton_call(
      pq, pk, pv, vn, pdo, dv2, h, dh, gc, pb, tm, seg, carry, writes, kernel=kn['bwd_chunk'],
      out_shape=[jax.ShapeDtypeStruct((d.b, d.tp, d.hv, d.kd), dqk_dtype),
                 jax.ShapeDtypeStruct((d.b, d.tp, d.hv, d.kd), dqk_dtype),
                 jax.ShapeDtypeStruct((d.b, d.tp, d.hv, d.vd), dv_dtype),
                 jax.ShapeDtypeStruct((d.b, d.tp, d.hv), _F32),
                 jax.ShapeDtypeStruct((d.b, d.tp, d.hv), _F32)],
      grid=(d.n, d.b * d.hv), num_warps=bs.num_warps_bwd, num_stages=bs.num_stages_chunk,
      **d.meta(NT=d.n, BV=min(bs.bv_bwd, d.vd), SCALE=scale, HAS_SEG=has_seg,
               IO_PREC=d.io_prec, SPLIT_V_PASS=bs.split_bwd_v_pass))
  return dq, dk, dv, db, dg, dh0


def _key_heads(x, d: _Dims):
  """Sums the value heads sharing a key head: [B, Tp, HV, K] -> [B, Tp, H, K]."""
  return x if d.grp == 1 else x.reshape(d.b, d.tp, d.h, d.grp, d.kd).sum(3)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _gdr_bwd(scale, chunk_size, interpret, res, cts):
  q, k, v, g, beta, h0, segs, w, gc, h, vn, tm = res
  do, dht = cts
  pq, pk, pv, _, pb, _ = configs.pad_inputs(q, k, v, g, beta, h0, chunk_size)
  d = _Dims(pq, pv, chunk_size)
  pdo, pdht = configs.pad_cotangents(do, dht, pq, pv)
  dq, dk, dv, db, dg, dh0 = _backward_passes(
      pq, pk, pv, pb, pdo, pdht, segs, w, gc, h, vn, tm, (), scale=scale, chunk_size=chunk_size,
      interpret=interpret, grad_dtypes=configs.grad_dtypes(q.dtype, v.dtype, d.grp))
  dq, dk = _key_heads(dq, d), _key_heads(dk, d)
  return configs.crop_grads((dq, dk, dv, dg, db, dh0), q, k, v, g, beta, h0, segs)


_gdr.defvjp(_gdr_fwd, _gdr_bwd)


def chunk_gated_delta_rule_triton(q, k, v, g, beta, *, scale=None, initial_state=None,
                                  segment_ids=None, output_final_state=False, chunk_size=64,
                                  interpret=False):
  """Chunked gated delta rule with jax-triton kernels (forward and backward; GPU only).

  Same contract as `pallas.chunk_gated_delta_rule_pallas`. `interpret=True` runs every kernel in
  Triton's interpreter on the host instead (any backend; float32; see the module docstring).

  Raises:
    ValueError: no GPU / jax_triton, or a chunk size, head size or dtype the kernels do not take.
  """
  configs.check_inputs(q, k, v, chunk_size, 'Triton')
  if not interpret and jax.default_backend() != 'gpu':
    raise ValueError(f'the triton gated delta rule needs a GPU (backend is '
                     f'{jax.default_backend()!r})')
  _jt(interpret)
  _kernels()
  scale, h0, segs = configs.call_arguments(q, v, initial_state, segment_ids, scale, chunk_size)
  o, ht = _gdr(q, k, v, g, beta, h0, segs, scale, chunk_size, interpret)
  return o, (ht if output_final_state else None)
