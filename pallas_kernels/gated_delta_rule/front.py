"""The Gated DeltaNet front (short conv, activations, l2 norm, gates) and its fused decode form.

The model's mixer (flare_jax.model.gated_deltanet) runs, per token:

  conv  pre = causal depthwise conv of the in-projected q|k|v channels (Kc taps, no bias);
  act   q, k, v = split(silu(pre)); q, k = l2norm(q), l2norm(k);
  gates beta = sigmoid(b); g = -exp(A_log) softplus(a + dt_bias);
  then the gated delta rule over (q, k, v, g, beta);
  norm  y = w * rmsnorm(o) * silu(z) per value head (`gated_norm`), before the out-projection.

Those functions live here, one source for the model and the decode kernel's reference:
`fused_decode_xla` is that whole chain for a cached pass of a few tokens (conv window in, window
out; the output norm optional), the contract `decode_pallas` implements in one kernel.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.add_rms_norm import xla as norm_xla
from pallas_kernels.gated_delta_rule import xla

_F32 = jnp.float32
L2_EPS = 1e-6  # HF's l2norm eps


def l2_normalize(x: jax.Array, eps: float = L2_EPS) -> jax.Array:
  """x * rsqrt(sum(x^2) + eps) over the last axis, fp32 (HF's l2norm; eps inside the sqrt)."""
  x = x.astype(_F32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def causal_conv(x: jax.Array, w: jax.Array, segment_ids: jax.Array,
                window: jax.Array | None = None):
  """Depthwise causal conv that never reads across a document boundary.

  out[t, c] = sum_j w[j, c] * x[t - (Kc-1) + j, c], taking only inputs of t's segment; positions
  before the sequence come from `window` (the previous Kc-1 inputs) and count as t's segment iff no
  document starts between the sequence start and t.

  Args:
    x: [B, T, C] pre-conv inputs.
    w: [Kc, C] taps; w[Kc-1] multiplies the current token (HF conv1d.weight[c, 0, j] = w[j, c]).
    segment_ids: [B, T].
    window: [B, Kc-1, C] or None (zeros).

  Returns:
    (out [B, T, C] in fp32, padded inputs [B, Kc-1+T, C]).
  """
  b, t, c = x.shape
  kc = w.shape[0]
  if window is None:
    window = jnp.zeros((b, kc - 1, c), x.dtype)
  xpad = jnp.concatenate([window.astype(x.dtype), x], axis=1)
  seg_pad = jnp.concatenate([jnp.repeat(segment_ids[:, :1], kc - 1, axis=1), segment_ids], axis=1)
  out = jnp.zeros((b, t, c), _F32)
  for j in range(kc):
    same = (seg_pad[:, j:j + t] == segment_ids)[..., None]
    tap = jnp.where(same, xpad[:, j:j + t].astype(_F32), 0.0)
    out = out + tap * w[j].astype(_F32)
  return out, xpad


def last_window(xpad: jax.Array, n_valid: jax.Array, kc: int) -> jax.Array:
  """The Kc-1 inputs ending at each row's last valid token:
  xpad[b, n_valid[b] : n_valid[b]+Kc-1]."""
  return jax.vmap(lambda xp, n: jax.lax.dynamic_slice_in_dim(xp, n, kc - 1, axis=0))(xpad, n_valid)


def leaving_window(xpad: jax.Array, valid: jax.Array | None, kc: int) -> jax.Array:
  """The conv window a pass leaves: `last_window` at each row's valid length, or (valid None:
  every row ends at T, as in decode steps) a static slice rather than a per-row gather."""
  if valid is None:
    return xpad[:, xpad.shape[1] - (kc - 1):]
  return last_window(xpad, jnp.sum(valid, axis=1, dtype=jnp.int32), kc)


def mask_invalid(g: jax.Array, beta: jax.Array, valid: jax.Array | None):
  """(g, beta) [B, T, HV] with padding tokens (valid [B, T] False) made identity steps."""
  if valid is None:
    return g, beta
  return jnp.where(valid[..., None], g, 0.0), jnp.where(valid[..., None], beta, 0.0)


def split_heads(act: jax.Array, num_key_heads: int, key_dim: int, value_dim: int):
  """Post-activation q|k|v channels [B, T, C] -> l2-normed q, k [B, T, NK, DK] fp32 and
  v [B, T, NV, DV] (C = 2 NK DK + NV DV)."""
  b, t, _ = act.shape
  kd = num_key_heads * key_dim
  q = act[..., :kd].reshape(b, t, num_key_heads, key_dim)
  k = act[..., kd:2 * kd].reshape(b, t, num_key_heads, key_dim)
  v = act[..., 2 * kd:].reshape(b, t, -1, value_dim)
  return l2_normalize(q), l2_normalize(k), v


def gates(b_in: jax.Array, a_in: jax.Array, a_log: jax.Array, dt_bias: jax.Array):
  """(g, beta), fp32 [B, T, HV]: beta = sigmoid(b); g = -exp(A_log) softplus(a + dt_bias)."""
  beta = jax.nn.sigmoid(b_in.astype(_F32))
  g = -jnp.exp(a_log.astype(_F32)) * jax.nn.softplus(a_in.astype(_F32) + dt_bias.astype(_F32))
  return g, beta


def gated_norm(o: jax.Array, z: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """weight * rmsnorm(o) * silu(z) over the last axis (one value head), in fp32."""
  y = norm_xla.rms_normalize(o, eps) * weight.astype(_F32)
  return y * jax.nn.silu(z.astype(_F32))


class OutputGate(NamedTuple):
  """The gated norm (`gated_norm`) of a cached pass's outputs, taken into the pass: weight [V],
  z = z_src[..., z_col:z_col + HV V] ([B, T, .]; z_src may be a wider buffer, as a merged
  in-projection's product)."""
  z_src: jax.Array
  weight: jax.Array
  eps: float
  z_col: int = 0


def gate_outputs(o: jax.Array, gate: OutputGate) -> jax.Array:
  """o [B, T, HV, V] -> `gated_norm(o, z)` in o.dtype."""
  b, t, hv, vd = o.shape
  z = gate.z_src[..., gate.z_col:gate.z_col + hv * vd].reshape(b, t, hv, vd)
  return gated_norm(o, z, gate.weight, gate.eps).astype(o.dtype)


def fused_decode_xla(x, b_in, a_in, conv_weight, a_log, dt_bias, *, window, initial_state,
                     num_key_heads: int, scale: float | None = None, segment_ids=None, valid=None,
                     output_final_state: bool = True, output_gate: OutputGate | None = None):
  """The mixer from the in-projections to the delta rule's outputs, for a cached pass.

  Args:
    x: [B, T, C] pre-conv q|k|v inputs (C = 2 NK K + HV V); b_in, a_in: [B, T, HV].
    conv_weight: [Kc, C]; a_log, dt_bias: [HV].
    window: [B, Kc-1, C] the conv inputs before the pass; initial_state: [B, HV, K, V] fp32.
    num_key_heads: NK. scale: multiplies q (default K ** -0.5).
    segment_ids: [B, T] or None; the recurrence and the conv restart where the id changes (the
      window counts as the first token's document).
    valid: bool [B, T] or None: a per-row prefix of real tokens; the rest are identity steps and
      the leaving window ends at the last valid token.
    output_final_state: with it, also the leaving (window, state); without it (a noisy block) the
      outputs alone, by the block-parallel form.

  Returns:
    (o [B, T, HV, V] in x.dtype, (window [B, Kc-1, C] in window.dtype, state fp32) or None).
  """
  bsz, t, _ = x.shape
  kd, vd = initial_state.shape[2:]
  seg = jnp.zeros((bsz, t), jnp.int32) if segment_ids is None else segment_ids
  pre, xpad = causal_conv(x, conv_weight, seg, window)
  q, k, v = split_heads(jax.nn.silu(pre), num_key_heads, kd, vd)
  g, beta = mask_invalid(*gates(b_in, a_in, a_log, dt_bias), valid)
  # The rule computes in fp32; its operands are rounded to x's dtype, as in the training pass.
  q, k, v = (a.astype(x.dtype) for a in (q, k, v))
  gated = lambda o: o if output_gate is None else gate_outputs(o, output_gate)
  if not output_final_state:
    return gated(xla.block_gated_delta_rule_xla(q, k, v, g, beta, initial_state=initial_state,
                                                scale=scale, segment_ids=segment_ids)), None
  o, state = xla.recurrent_gated_delta_rule_xla(q, k, v, g, beta, scale=scale,
                                                initial_state=initial_state,
                                                segment_ids=segment_ids, output_final_state=True)
  leaving = leaving_window(xpad, valid, conv_weight.shape[0])
  return gated(o), (leaving.astype(window.dtype), state)
