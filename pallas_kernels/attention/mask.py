"""The one visibility rule of flare-jax, evaluated from per-token metadata.

Every token carries (segment, position, view, block_start):
  * segment: document id within a packed row; tokens of different segments never see each other.
  * view: 0 for the clean (causal) stream, v >= 1 for noisy view v.
  * block_start: for a noisy token, the position of the first slot of its block (ignored for clean).

  query \\ key          clean key, same segment                noisy key, same segment
  clean query          key.pos <= query.pos (causal)          never
  noisy query          key.pos <  query.block_start           same view and same block
                                                              (bidirectional)

Plain causal and packed-document attention are the special case where every token is clean. Kernels
evaluate `visible` per tile, so it is written with broadcasting jnp ops only.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp


class TokenMeta(NamedTuple):
  """Per-token metadata, each [B, T] int32."""

  segment_ids: jax.Array
  positions: jax.Array
  views: jax.Array
  block_starts: jax.Array


def clean_meta(segment_ids: jax.Array, positions: jax.Array) -> TokenMeta:
  """Metadata of a clean (causal) sequence: view 0 everywhere."""
  segment_ids = jnp.asarray(segment_ids, jnp.int32)
  positions = jnp.asarray(positions, jnp.int32)
  return TokenMeta(segment_ids, positions, jnp.zeros_like(positions), positions)


def visible(q: TokenMeta, k: TokenMeta) -> jax.Array:
  """Visibility of keys to queries.
  Fields broadcast like `q.x[..., :, None]` vs `k.x[..., None, :]`.

  Args:
    q: query metadata, fields [..., Tq].
    k: key metadata, fields [..., Tk].

  Returns:
    bool [..., Tq, Tk].
  """
  return _rule(TokenMeta(*(x[..., :, None] for x in q)), TokenMeta(*(x[..., None, :] for x in k)))


def visible_transposed(q: TokenMeta, k: TokenMeta) -> jax.Array:
  """`visible(q, k)` laid out keys first: bool [..., Tk, Tq] (what a kernel walking one key tile
  over query tiles computes, without transposing a tile)."""
  return _rule(TokenMeta(*(x[..., None, :] for x in q)), TokenMeta(*(x[..., :, None] for x in k)))


def _rule(q: TokenMeta, k: TokenMeta) -> jax.Array:
  """The rule on query and key fields already laid out to broadcast against each other."""
  same_segment = q.segment_ids == k.segment_ids
  key_clean = k.views == 0
  # Last clean position a query may see: itself (clean) or the slot before its block (noisy).
  horizon = jnp.where(q.views == 0, q.positions, q.block_starts - 1)
  sees_clean = key_clean & (k.positions <= horizon)
  sees_noisy = (~key_clean) & (q.views == k.views) & (q.block_starts == k.block_starts)
  return same_segment & (sees_clean | sees_noisy)
