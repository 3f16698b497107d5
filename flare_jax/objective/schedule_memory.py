"""Compiled memory of the GDN noisy-block schedules (shapes only; the table in README.md).

  python -m flare_jax.objective.schedule_memory [--t 4096]
"""
import argparse

import jax
import jax.numpy as jnp

from flare_jax.model import two_stream_gdn
from flare_jax.objective import layout as layout_lib


def temp_bytes(schedule: str, t: int, block_size: int, *, views: int = 2, heads: int = 16,
               dim: int = 128, chunk: int = 64, backward: bool = True) -> int:
  """XLA temporary bytes of one GDN layer's noisy pass (one row: one document, all response)."""
  seg = jnp.ones((1, t), jnp.int32)
  resp = jnp.ones((1, t), bool)
  starts = layout_lib.block_layout(seg, seg, resp, block_size=block_size).block_start
  s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  clean = (s(1, t, heads, dim),) * 3 + (s(1, t, heads),) * 2
  noisy = (s(1, views, t, heads, dim),) * 3 + (s(1, views, t, heads),) * 2

  def out_sum(c, n):
    return jnp.sum(two_stream_gdn.noisy_delta_rule(c, n, seg, starts, scale=dim ** -0.5,
                                                   schedule=schedule, chunk_size=chunk,
                                                   max_block=block_size))

  fn = jax.grad(out_sum, argnums=(0, 1)) if backward else out_sum
  return jax.jit(fn).lower(clean, noisy).compile().memory_analysis().temp_size_in_bytes


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--t', type=int, default=4096)
  args = parser.parse_args()
  print('| schedule | B | forward | forward + backward |\n|---|---|---|---|')
  for block in (1, 4):
    for schedule in two_stream_gdn.SCHEDULES:
      gib = [temp_bytes(schedule, args.t, block, backward=bw) / 2 ** 30 for bw in (False, True)]
      print(f'| {schedule} | {block} | {gib[0]:.2f} GiB | {gib[1]:.2f} GiB |', flush=True)


if __name__ == '__main__':
  main()
