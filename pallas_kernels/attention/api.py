"""Dispatch for metadata-masked softmax attention."""
import jax

from pallas_kernels.attention import mask as mask_lib
from pallas_kernels.attention import xla

IMPLEMENTATIONS = ('xla',)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_meta: mask_lib.TokenMeta,
              k_meta: mask_lib.TokenMeta, *, scale: float | None = None,
              implementation: str | None = None, q_tile: int = 512) -> jax.Array:
  """Attention of q [B, T, H, D] over k, v [B, S, Hkv, D] under `mask.visible(q_meta, k_meta)`.

  Raises:
    ValueError: unknown implementation or inconsistent shapes.
  """
  if implementation not in (None, *IMPLEMENTATIONS):
    raise ValueError(f'unknown attention implementation {implementation!r}; '
                     f'known: {IMPLEMENTATIONS} or None')
  if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
    raise ValueError(f'expected q [B,T,H,D], k = v [B,S,Hkv,D]; got {q.shape}, {k.shape}, {v.shape}')
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
    raise ValueError(f'incompatible q {q.shape} and k {k.shape}')
  if scale is None:
    scale = q.shape[-1] ** -0.5
  return xla.attention_xla(q, k, v, q_meta, k_meta, scale=scale, q_tile=q_tile)
