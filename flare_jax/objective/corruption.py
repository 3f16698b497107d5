"""Noise: which maskable slots each noisy view masks.

Per view and block a ratio t ~ U(eps, 1] is drawn (keyed by the block's first slot). Schedules:
  * 'uniform': each maskable slot of the block is masked independently with probability t.
  * 'position_dependent': slot i of a block with n maskable slots is masked with probability
    min(1, 2 t (i + 1) / (n + 1)), so later slots are masked more at the same mean ratio (after
    Efficient-DLM, whose exact schedule is not public).
  * 'all_masked': every maskable slot is masked in every view.
With two views (V=2) and a random schedule the second view masks exactly the maskable slots the
first leaves visible (complementary masks), so every maskable slot is hidden in exactly one view.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from flare_jax.objective import layout as layout_lib

NOISE_SCHEDULES = ('uniform', 'position_dependent', 'all_masked')


class CorruptionResult(NamedTuple):
  masked: jax.Array  # [B, V, T] bool, a subset of layout.maskable per view
  ratio: jax.Array  # [B, T] the block ratio t at each slot (view 1)


def corrupt(rng: jax.Array, layout: layout_lib.BlockLayout, *, num_views: int,
            schedule: str = 'uniform', eps: float = 1e-3) -> CorruptionResult:
  """Draws the per-view masks. Pure and jit-able (num_views, schedule static)."""
  if schedule not in NOISE_SCHEDULES:
    raise ValueError(f'unknown noise schedule {schedule!r}; known: {NOISE_SCHEDULES}')
  if num_views not in (1, 2):
    raise ValueError(f'num_views must be 1 or 2, got {num_views}')
  maskable = layout.maskable
  b, t = maskable.shape
  if schedule == 'all_masked':
    masked = jnp.broadcast_to(maskable[:, None], (b, num_views, t))
    return CorruptionResult(masked, jnp.ones((b, t)))
  ratio_rng, slot_rng = jax.random.split(rng)
  per_start = eps + (1.0 - eps) * (1.0 - jax.random.uniform(ratio_rng, (b, t)))  # (eps, 1]
  ratio = jnp.take_along_axis(per_start, layout.block_start, axis=1)
  prob = ratio
  if schedule == 'position_dependent':
    # A block's maskable slots are contiguous: rank within the run and the run's length.
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    bs = layout.block_start
    pad = lambda x, fill, left: (jnp.concatenate([jnp.full((b, 1), fill, x.dtype), x[:, :-1]], 1)
                                 if left else jnp.concatenate([x[:, 1:], jnp.full((b, 1), fill,
                                                                                  x.dtype)], 1))
    opens = maskable & ~(pad(maskable, False, True) & (pad(bs, -1, True) == bs))
    closes = maskable & ~(pad(maskable, False, False) & (pad(bs, -1, False) == bs))
    run_first = jax.lax.cummax(jnp.where(opens, pos, 0), axis=1)
    run_last = jax.lax.cummin(jnp.where(closes, pos, t), axis=1, reverse=True)
    rank, count = pos - run_first, run_last - run_first + 1
    prob = jnp.minimum(1.0, 2.0 * ratio * (rank + 1) / (count + 1))
  first = maskable & (jax.random.uniform(slot_rng, (b, t)) < prob)
  views = [first] if num_views == 1 else [first, maskable & ~first]
  return CorruptionResult(jnp.stack(views, axis=1), ratio)
