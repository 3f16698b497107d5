"""The reference, and the model's one definition of its RMSNorm (`flare_jax.model.layers`)."""
import jax
import jax.numpy as jnp


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
  """x * rsqrt(mean(x^2) + eps) over the last axis, in fp32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """Zero-centred RMSNorm: x_hat * (1 + scale), in fp32, returned in x.dtype."""
  y = rms_normalize(x, eps) * (1.0 + scale.astype(jnp.float32))
  return y.astype(x.dtype)


def add_rms_norm(h: jax.Array, delta: jax.Array, scale: jax.Array, *,
                 eps: float) -> tuple[jax.Array, jax.Array]:
  """(s, rms_norm(s)) for s = h + delta in h.dtype (the residual stream's own rounding).

  Args:
    h, delta: [..., D].
    scale: [D].
  """
  s = h + delta.astype(h.dtype)
  return s, rms_norm(s, scale, eps)
