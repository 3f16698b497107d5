"""Pure-JAX attention under metadata visibility, tiled over queries.

Memory is O(B * H * q_tile * S): each query tile builds its own mask and scores, and the tile
function is rematerialised in the backward pass, so neither a [T, S] mask nor a [T, S] score tensor
ever exists.
"""
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.attention import mask as mask_lib


def _attend_tile(q, k, v, q_meta, k_meta, scale):
  """q: [B, t, Hkv, G, D]; k, v: [B, S, Hkv, D]; returns [B, t, Hkv, G, D]."""
  s = jnp.einsum('btkgd,bskd->bkgts', q, k, preferred_element_type=jnp.float32) * scale
  vis = mask_lib.visible(q_meta, k_meta)[:, None, None]  # B 1 1 t S
  s = jnp.where(vis, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)  # rows that see nothing give zeros, not NaN
  p = jnp.exp(s - m)
  denom = jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
  p = (p / denom).astype(v.dtype)
  return jnp.einsum('bkgts,bskd->btkgd', p, v, preferred_element_type=jnp.float32)


def attention_xla(q, k, v, q_meta: mask_lib.TokenMeta, k_meta: mask_lib.TokenMeta, *,
                  scale: float, q_tile: int = 512):
  """Softmax attention with GQA and metadata visibility.

  Args:
    q: [B, T, H, D]; k, v: [B, S, Hkv, D] with H a multiple of Hkv (query head h
      uses kv head h // (H/Hkv)).
    q_meta: fields [B, T]; k_meta: fields [B, S].
    scale: score scale (usually D ** -0.5).
    q_tile: queries per tile.

  Returns:
    [B, T, H, D] in q.dtype; a query that sees no key gets zeros.
  """
  b, t, h, d = q.shape
  hkv = k.shape[2]
  qg = q.reshape(b, t, hkv, h // hkv, d)
  tile = min(q_tile, t)
  n_tiles = -(-t // tile)
  pad = n_tiles * tile - t
  if n_tiles == 1:
    out = _attend_tile(qg, k, v, q_meta, k_meta, scale)
    return out.reshape(b, t, h, d).astype(q.dtype)
  qg = jnp.pad(qg, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
  q_meta = mask_lib.TokenMeta(*(jnp.pad(x, ((0, 0), (0, pad)), constant_values=-1) for x in q_meta))
  tiles_q = qg.reshape(b, n_tiles, tile, *qg.shape[2:]).swapaxes(0, 1)
  tiles_meta = mask_lib.TokenMeta(*(x.reshape(b, n_tiles, tile).swapaxes(0, 1) for x in q_meta))
  fn = jax.checkpoint(functools.partial(_attend_tile, k=k, v=v, k_meta=k_meta, scale=scale))
  out = jax.lax.map(lambda args: fn(args[0], q_meta=args[1]), (tiles_q, tiles_meta))
  out = out.swapaxes(0, 1).reshape(b, n_tiles * tile, h, d)[:, :t]
  return out.astype(q.dtype)
