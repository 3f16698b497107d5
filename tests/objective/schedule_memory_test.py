"""The lean GDN schedule keeps chunk checkpoints only: its compiled memory stays well below the
simple schedule's, which stores a state per token."""
import jax
import jax.numpy as jnp

from flare_jax.model import two_stream_gdn


def _temp_bytes(schedule: str, t: int) -> int:
  b, h, k, views = 1, 2, 32, 2
  s = lambda *shape, dt=jnp.float32: jax.ShapeDtypeStruct(shape, dt)
  seg = jnp.zeros((b, t), jnp.int32)
  starts = jnp.arange(t)[None]  # one-token blocks: the simple schedule keeps every state

  def loss(q, k_, v, g, beta, qn, kn, vn, gn, bn):
    o = two_stream_gdn.noisy_delta_rule((q, k_, v, g, beta), (qn, kn, vn, gn, bn), seg, starts,
                                        scale=k ** -0.5, schedule=schedule, chunk_size=64)
    return jnp.sum(o)

  args = (s(b, t, h, k), s(b, t, h, k), s(b, t, h, k), s(b, t, h), s(b, t, h),
          s(b, views, t, h, k), s(b, views, t, h, k), s(b, views, t, h, k), s(b, views, t, h),
          s(b, views, t, h))
  compiled = jax.jit(jax.grad(loss, argnums=range(5))).lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_lean_schedule_memory_grows_far_slower_with_length_than_the_simple_one():
  state_bytes = 2 * 32 * 32 * 4  # one fp32 state of the test's 2 heads
  simple = {t: _temp_bytes('simple', t) for t in (512, 1024)}
  lean = {t: _temp_bytes('lean', t) for t in (512, 1024)}
  slope_simple = (simple[1024] - simple[512]) / 512
  slope_lean = (lean[1024] - lean[512]) / 512
  # The simple schedule keeps (at least) one state per token; the lean one per-token activations
  # and one state per 64-token chunk.
  assert slope_simple >= state_bytes, slope_simple
  assert slope_lean * 4 < slope_simple, (slope_lean, slope_simple)
