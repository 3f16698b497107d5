"""Fast pure-JAX chunked gated delta rule with document resets:
the CPU path and the kernels' fallback.

All intra-chunk work (the UT transform, W, U, the decayed q k^T) runs for every chunk at once; only
the state pass is a `lax.scan` over chunks. Documents may start anywhere: inside a chunk, tokens
interact only with earlier tokens of their own segment, the entering state reaches only the segment
active at the chunk start, and only the chunk's last segment writes the leaving state.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta_rule import reference


class ChunkIntra(NamedTuple):
  """Per-chunk quantities, [B, N, HV, C, ...] fp32 (q already scaled)."""

  q: jax.Array  # C K
  k: jax.Array  # C K
  w: jax.Array  # C K: T diag(beta e^G carry) K
  u: jax.Array  # C V: T diag(beta) V
  qk: jax.Array  # C C: (q k^T * decay) restricted to the same segment, j <= i
  q_in: jax.Array  # C K: rows of q e^G that read the entering state (zero outside the carry
                   # segment)
  k_out: jax.Array  # C K: rows of k e^{G_C - G} that write the leaving state (last segment only)
  keep: jax.Array  # []: e^{G_C} if the entering state survives the chunk, else 0


_EXACT = jax.lax.Precision.HIGHEST  # full fp32 (no TF32 on GPU): errors compound through the levels


def unit_lower_inverse(a: jax.Array, matmul=None) -> jax.Array:
  """(I + a)^-1 for strictly lower-triangular a [..., C, C], by recursive 2x2 block inversion.

  Bottom-up over block sizes s = 1, 2, 4, ...: each pair of diagonal blocks merges as
  [[A11, 0], [A21, A22]]^-1 = [[X11, 0], [-X22 A21 X11, X22]] (fla's solve_tril does the same).
  Only batched matmuls, strided slices and concatenations (no gather, no LAPACK custom call). On
  XLA:CPU (jaxlib 0.10.2) `solve_triangular` lowers to lapack_strsm_ffi, which splits a large batch
  over the intra-op thread pool and blocks waiting for the pieces (jax::ParallelBatchMap); when the
  thunk executor runs independent solves at once (the backward has several, and every fake device
  runs its own), they can occupy every pool thread and the step deadlocks with the process idle.
  C that is not a power of two is padded with identity rows. `matmul(x, y)` (default: jnp.matmul
  at HIGHEST precision) multiplies the blocks.
  """
  mm = matmul or (lambda x, y: jnp.matmul(x, y, precision=_EXACT))
  c = a.shape[-1]
  p = 1 << max(c - 1, 0).bit_length()
  if p != c:
    a = jnp.pad(a, ((0, 0),) * (a.ndim - 2) + ((0, p - c), (0, p - c)))
  lead = a.shape[:-2]
  inv = jnp.ones(lead + (p, 1, 1), a.dtype)  # inverses of the 1x1 diagonal blocks
  s = 1
  while s < p:
    nb = p // s
    # Blocks (2j+1, 2j) of the nb x nb grid: flat index nb + j (2 nb + 2) of the (row, col) grid.
    grid = jnp.swapaxes(a.reshape(lead + (nb, s, nb, s)), -3, -2).reshape(lead + (nb * nb, s, s))
    a21 = grid[..., nb::2 * nb + 2, :, :]  # ... nb/2 s s
    x11, x22 = inv[..., 0::2, :, :], inv[..., 1::2, :, :]
    x21 = -mm(mm(x22, a21), x11)
    inv = jnp.concatenate([jnp.concatenate([x11, jnp.zeros_like(x11)], -1),
                           jnp.concatenate([x21, x22], -1)], -2)
    s *= 2
  return inv[..., 0, :c, :c]


def chunk_cumsum(g: jax.Array, c: int) -> jax.Array:
  """g [B, T, HV] -> inclusive cumulative sum inside each chunk of c tokens, [B, T, HV]."""
  b, t, hv = g.shape
  n = -(-t // c)
  gp = jnp.pad(g, ((0, 0), (0, n * c - t), (0, 0)))
  return jnp.cumsum(gp.reshape(b, n, c, hv), axis=2).reshape(b, n * c, hv)[:, :t]


def _prepare(q, k, v, g, beta, segment_ids, scale, chunk_size):
  b, t, _, kd = q.shape
  hv, vd = v.shape[2], v.shape[3]
  c = chunk_size
  n = -(-t // c)
  pad = n * c - t
  f32 = lambda x: x.astype(jnp.float32)
  if segment_ids is None:
    segment_ids = jnp.zeros((b, t), jnp.int32)
  starts = reference.segment_starts(segment_ids, b, t)
  # Padding continues the last segment with identity steps (g = 0, beta = 0).
  padt = lambda x, mode='constant': jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2),
                                            mode=mode)
  seg = padt(segment_ids, 'edge')
  starts = padt(starts)
  chunked = lambda x: jnp.moveaxis(x.reshape(b, n, c, *x.shape[2:]), 3, 2) if x.ndim == 4 else (
      jnp.moveaxis(x.reshape(b, n, c, x.shape[2]), 3, 2))
  qc = chunked(padt(reference.expand_heads(f32(q), hv) * scale))  # B N HV C K
  kc = chunked(padt(reference.expand_heads(f32(k), hv)))
  vc = chunked(padt(f32(v)))  # B N HV C V
  gc = chunked(padt(f32(g)))  # B N HV C
  bc = chunked(padt(f32(beta)))
  segc = seg.reshape(b, n, 1, c)
  first_resets = starts.reshape(b, n, c)[..., 0][..., None, None]  # B N 1 1

  cum = jnp.cumsum(gc, axis=-1)
  tri = jnp.tril(jnp.ones((c, c), bool))
  same = segc[..., :, None] == segc[..., None, :]  # B N 1 C C
  causal_same = tri & same
  decay = jnp.exp(jnp.where(causal_same, cum[..., :, None] - cum[..., None, :], -jnp.inf))
  kkt = kc @ jnp.swapaxes(kc, -1, -2)
  strict = causal_same & ~jnp.eye(c, dtype=bool)
  a = jnp.where(strict, bc[..., :, None] * kkt * decay, 0.0)
  carry = (segc == segc[..., :1]) & ~first_resets  # B N 1 C: reads the entering state
  rhs = jnp.concatenate([kc * (bc * jnp.exp(cum) * carry)[..., None], vc * bc[..., None]], -1)
  sol = jnp.matmul(unit_lower_inverse(a), rhs, precision=_EXACT)  # (I + A)^-1 rhs
  w, u = sol[..., :kd], sol[..., kd:]
  qk = (qc @ jnp.swapaxes(kc, -1, -2)) * decay
  q_in = qc * (jnp.exp(cum) * carry)[..., None]
  last = cum[..., -1:]
  writes = segc == segc[..., -1:]
  k_out = kc * (jnp.exp(last - cum) * writes)[..., None]
  keep = jnp.exp(last[..., 0]) * carry[..., -1]  # B N HV
  return ChunkIntra(qc, kc, w, u, qk, q_in, k_out, keep), (b, t, n, c, hv, vd)


def _state_pass(intra: ChunkIntra, s0):
  """Scan over chunks.
  Returns (entering states h [B, N, HV, K, V], v_new [B, N, HV, C, V], final)."""

  def step(s, x):
    w, u, k_out, keep = x
    v_new = u - w @ s
    s_next = keep[..., None, None] * s + jnp.swapaxes(k_out, -1, -2) @ v_new
    return s_next, (s, v_new)

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (intra.w, intra.u, intra.k_out, intra.keep))
  final, (h, v_new) = jax.lax.scan(step, s0, xs)
  return jnp.moveaxis(h, 0, 1), jnp.moveaxis(v_new, 0, 1), final


def chunk_gated_delta_rule_fwd_h(q, k, v, g, beta, *, scale=None, initial_state=None,
                                 segment_ids=None, chunk_size=64):
  """The chunk checkpoints: every chunk's entering state and corrected values.

  Returns:
    (h [B, N, HV, K, V] state entering chunk n (before any reset at the chunk's first token),
     v_new [B, T, HV, V] corrected values V' = U - W S0, final state [B, HV, K, V]), all fp32.
  """
  kd = q.shape[-1]
  scale = kd ** -0.5 if scale is None else scale
  intra, (b, t, n, c, hv, vd) = _prepare(q, k, v, g, beta, segment_ids, scale, chunk_size)
  s0 = _initial(initial_state, b, hv, kd, vd)
  h, v_new, final = _state_pass(intra, s0)
  v_new = jnp.moveaxis(v_new, 2, 3).reshape(b, n * c, hv, vd)[:, :t]
  return h, v_new, final


def block_gated_delta_rule_xla(q, k, v, g, beta, *, initial_state, scale=None,
                               segment_ids=None):
  """Outputs [B, T, HV, V] of T tokens continuing `initial_state`, as one chunk of T tokens (the
  WY form): the state is read once and no state is formed, neither per token nor at the end. For
  short blocks whose leaving state is not needed (noisy blocks at decode)."""
  kd = q.shape[-1]
  scale = kd ** -0.5 if scale is None else scale
  intra, (b, t, n, c, hv, vd) = _prepare(q, k, v, g, beta, segment_ids, scale, q.shape[1])
  s0 = _initial(initial_state, b, hv, kd, vd)[:, None]  # B 1 HV K V: the one chunk's entering state
  o = intra.q_in @ s0 + intra.qk @ (intra.u - intra.w @ s0)  # B 1 HV C V
  return jnp.moveaxis(o, 2, 3).reshape(b, n * c, hv, vd)[:, :t].astype(v.dtype)


def _initial(initial_state, b, hv, kd, vd):
  if initial_state is None:
    return jnp.zeros((b, hv, kd, vd), jnp.float32)
  return initial_state.astype(jnp.float32)


def chunk_gated_delta_rule_xla(q, k, v, g, beta, *, scale=None, initial_state=None,
                               segment_ids=None, output_final_state=False, chunk_size=64):
  """Chunked gated delta rule (see `reference` for the recurrence and argument shapes)."""
  kd = q.shape[-1]
  scale = kd ** -0.5 if scale is None else scale
  intra, (b, t, n, c, hv, vd) = _prepare(q, k, v, g, beta, segment_ids, scale, chunk_size)
  s0 = _initial(initial_state, b, hv, kd, vd)
  h, v_new, final = _state_pass(intra, s0)
  o = intra.q_in @ h + intra.qk @ v_new  # B N HV C V
  o = jnp.moveaxis(o, 2, 3).reshape(b, n * c, hv, vd)[:, :t]
  return o.astype(v.dtype), (final if output_final_state else None)


def recurrent_gated_delta_rule_xla(q, k, v, g, beta, *, scale=None, initial_state=None,
                                   segment_ids=None, output_final_state=False):
  """Token loop for a few tokens (decoding), each step reading the [K, V] state twice (once for
  both S^T k and S^T q, once for the update) and writing it once:

      a = e^g (0 at a segment start);  d = beta (v - a S^T k);  o = a S^T q + (k.q) d;
      S <- a S + k d^T.

  The reference's S <- e^g S; S += beta k (v - S^T k)^T; o = S^T q, rearranged. Every step runs the
  same ops whatever the number of tokens, so T single-token calls equal one T-token call bit for
  bit (what greedy AR-Trust == AR rests on). Shapes as `reference.naive_recurrent_gated_delta_rule`.
  """
  b, t, _, kd = q.shape
  hv, vd = v.shape[2], v.shape[3]
  scale = kd ** -0.5 if scale is None else scale
  f32 = lambda x: x.astype(jnp.float32)
  kq = jnp.stack([reference.expand_heads(f32(k), hv),
                  reference.expand_heads(f32(q), hv) * scale], axis=3)  # B T HV 2 K
  decay = jnp.where(reference.segment_starts(segment_ids, b, t)[..., None], 0.0, jnp.exp(f32(g)))
  s0 = _initial(initial_state, b, hv, kd, vd)

  def step(s, x):
    kq_t, v_t, a_t, b_t = x  # [B HV 2 K], [B HV V], [B HV], [B HV]
    a_t = a_t[..., None]
    sk, sq = jnp.moveaxis(a_t[..., None] * jnp.einsum('bhkv,bhnk->bhnv', s, kq_t), 2, 0)
    d = b_t[..., None] * (f32(v_t) - sk)
    o = sq + jnp.sum(kq_t[:, :, 0] * kq_t[:, :, 1], axis=-1, keepdims=True) * d
    s = a_t[..., None] * s + kq_t[:, :, 0, :, None] * d[:, :, None, :]
    return s, o

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (kq, v, decay, f32(beta)))
  s, o = jax.lax.scan(step, s0, xs)
  return jnp.moveaxis(o, 0, 1).astype(v.dtype), (s if output_final_state else None)
