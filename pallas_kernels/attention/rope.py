"""Partial rotate-half RoPE of Qwen3.5: the first `rotary_dim` features of each head rotate, the
rest pass through. One definition for the model's XLA path and the decode front kernel."""
import jax
import jax.numpy as jnp


def rope_tables(positions: jax.Array, *, rotary_dim: int, theta: float,
                dtype) -> tuple[jax.Array, jax.Array]:
  """(cos, sin), each [B, T, rotary_dim // 2] in `dtype`, of positions [B, T] (computed in fp32, as
  transformers does): feature i < rotary_dim / 2 and its partner i + rotary_dim / 2 turn by
  position * theta ** (-2 i / rotary_dim)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(freqs).astype(dtype), jnp.sin(freqs).astype(dtype)


def apply_partial_rope(x: jax.Array, positions: jax.Array, *, rotary_dim: int,
                       theta: float) -> jax.Array:
  """Rotate-half RoPE on the first `rotary_dim` features of each head; the rest pass through.

  Args:
    x: [B, T, H, D].
    positions: [B, T] int.

  Returns:
    [B, T, H, D] in x.dtype (`rope_tables` in x.dtype).
  """
  if rotary_dim == 0:
    return x
  cos, sin = rope_tables(positions, rotary_dim=rotary_dim, theta=theta, dtype=x.dtype)
  cos, sin = (jnp.concatenate([c, c], axis=-1)[:, :, None, :] for c in (cos, sin))  # B T 1 rot
  x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
  half = rotary_dim // 2
  rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
  return jnp.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1)
