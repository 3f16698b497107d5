"""Readable oracles for the gated delta rule (fp32). Only tests and the XLA path's checks use them.

Per value head, state S in R^{K x V}, for token t with key k_t, query q_t, value v_t,
log-decay g_t <= 0 and write strength beta_t:

    S   <- exp(g_t) * S
    d_t  = beta_t * (v_t - S^T k_t)
    S   <- S + k_t d_t^T
    o_t  = scale * S^T q_t

i.e. S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T. Where the segment id changes
(a new document in a packed row) S is reset to zero before the token; `initial_state` seeds t = 0.
Value head h reads key head h // (HV // H).
"""
import jax
import jax.numpy as jnp


def expand_heads(x: jax.Array, hv: int) -> jax.Array:
  """[B, T, H, K] -> [B, T, HV, K]: value head h uses key head h // (HV // H) (grouped)."""
  return jnp.repeat(x, hv // x.shape[2], axis=2)


def segment_starts(segment_ids: jax.Array | None, b: int, t: int) -> jax.Array:
  """bool [B, T]: token t starts a new segment (never at t = 0)."""
  if segment_ids is None:
    return jnp.zeros((b, t), bool)
  return jnp.concatenate([jnp.zeros((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)


def naive_recurrent_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None,
                                     segment_ids=None, output_final_state=False):
  """Token-by-token recurrence (lax.scan over T).

  Args:
    q, k: [B, T, H, K]; v: [B, T, HV, V]; g (log space), beta: [B, T, HV];
    initial_state: [B, HV, K, V] or None; segment_ids: [B, T] or None.

  Returns:
    (o [B, T, HV, V] in v.dtype, final state [B, HV, K, V] fp32 or None).
  """
  b, t, _, kd = q.shape
  hv, vd = v.shape[2], v.shape[3]
  scale = kd ** -0.5 if scale is None else scale
  f32 = lambda x: x.astype(jnp.float32)
  q = expand_heads(f32(q), hv) * scale
  k = expand_heads(f32(k), hv)
  s0 = jnp.zeros((b, hv, kd, vd), jnp.float32) if initial_state is None else f32(initial_state)
  starts = segment_starts(segment_ids, b, t)

  def step(s, x):
    q_t, k_t, v_t, g_t, b_t, start = x
    s = jnp.where(start[:, None, None, None], 0.0, s)
    s = s * jnp.exp(g_t)[..., None, None]
    d = b_t[..., None] * (v_t - jnp.einsum('bhkv,bhk->bhv', s, k_t))
    s = s + jnp.einsum('bhk,bhv->bhkv', k_t, d)
    return s, jnp.einsum('bhkv,bhk->bhv', s, q_t)

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, f32(v), f32(g), f32(beta), starts))
  s, o = jax.lax.scan(step, s0, xs)
  return jnp.moveaxis(o, 0, 1).astype(v.dtype), (s if output_final_state else None)


def naive_chunk_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None,
                                 output_final_state=False, chunk_size=64):
  """The chunked (WY / UT-transform) form written plainly, one segment per row (no resets).

  Per chunk with entering state S0, cumulative log-decay G_i, decay D_ij = exp(G_i - G_j) (j <= i):
    A = strict_lower(beta_i k_i.k_j D_ij); T = (I + A)^-1; W = T diag(beta e^G) K;
    U = T diag(beta) V
    V' = U - W S0;  O = diag(e^G) Q S0 + (Q K^T * D) V';
    S_C = e^{G_C} S0 + K^T diag(e^{G_C - G}) V'
  """
  b, t, _, kd = q.shape
  hv, vd = v.shape[2], v.shape[3]
  scale = kd ** -0.5 if scale is None else scale
  c = chunk_size
  n = -(-t // c)
  pad = n * c - t
  f32 = lambda x: x.astype(jnp.float32)
  padt = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
  q = padt(expand_heads(f32(q), hv) * scale)
  k = padt(expand_heads(f32(k), hv))
  vv, gg, bb = padt(f32(v)), padt(f32(g)), padt(f32(beta))
  s = jnp.zeros((b, hv, kd, vd), jnp.float32) if initial_state is None else f32(initial_state)
  outs = []
  tri = jnp.tril(jnp.ones((c, c), bool))
  strict = jnp.tril(jnp.ones((c, c), bool), -1)
  for i in range(n):
    sl = slice(i * c, (i + 1) * c)
    qc, kc, vc = (jnp.moveaxis(x[:, sl], 2, 1) for x in (q, k, vv))  # B HV C .
    gc, bc = (jnp.moveaxis(x[:, sl], 2, 1) for x in (gg, bb))  # B HV C
    cum = jnp.cumsum(gc, -1)
    diff = jnp.where(tri, cum[..., :, None] - cum[..., None, :], -jnp.inf)
    decay = jnp.exp(diff)
    a = jnp.where(strict, bc[..., :, None] * (kc @ jnp.swapaxes(kc, -1, -2)) * decay, 0.0)
    eye = jnp.eye(c)
    tinv = jax.scipy.linalg.solve_triangular(eye + a, jnp.broadcast_to(eye, a.shape), lower=True,
                                             unit_diagonal=True)
    w = tinv @ (kc * (bc * jnp.exp(cum))[..., None])
    u = tinv @ (vc * bc[..., None])
    v_new = u - w @ s
    o = (qc * jnp.exp(cum)[..., None]) @ s + ((qc @ jnp.swapaxes(kc, -1, -2)) * decay) @ v_new
    outs.append(o)
    last = cum[..., -1:]
    s = jnp.exp(last)[..., None] * s + jnp.swapaxes(
        kc * jnp.exp(last - cum)[..., None], -1, -2) @ v_new
  o = jnp.moveaxis(jnp.concatenate(outs, axis=2), 1, 2)[:, :t]
  return o.astype(v.dtype), (s if output_final_state else None)
