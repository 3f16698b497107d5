"""Weighted next-token NLL from hidden states, tiled over the sequence so the [N, vocab] logits of a
long two-stream row never exist at once (each tile is rematerialised in the backward pass)."""
import jax
import jax.numpy as jnp


def weighted_nll_sum(model, hidden: jax.Array, labels: jax.Array, weights: jax.Array,
                     tile: int = 512) -> jax.Array:
  """sum(weights * -log p(labels)) with logits = model.logits(hidden).

  Args:
    hidden: [B, N, D]; labels: [B, N] int; weights: [B, N] fp32.
  """
  b, n, d = hidden.shape
  tile = min(tile, n)
  n_tiles = -(-n // tile)
  pad = n_tiles * tile - n
  padn = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
  hidden, labels, weights = padn(hidden), padn(labels), padn(weights)

  @jax.checkpoint
  def tile_nll(args):
    h, y, w = args
    logits = model.logits(h)  # B tile vocab, fp32
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
    return jnp.sum(w * (logz - picked))

  split = lambda x: jnp.moveaxis(x.reshape(b, n_tiles, tile, *x.shape[2:]), 1, 0)
  return jnp.sum(jax.lax.map(tile_nll, (split(hidden), split(labels), split(weights))))
