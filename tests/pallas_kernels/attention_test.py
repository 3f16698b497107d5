"""Metadata visibility rule and the query-tiled XLA attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import api
from pallas_kernels.attention import mask as mask_lib


def _naive_attention(q, k, v, vis, scale):
  """Dense float64 softmax attention with GQA; rows that see nothing give zeros."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, h, d = q.shape
  rep = h // k.shape[2]
  k = np.repeat(k, rep, axis=2)
  v = np.repeat(v, rep, axis=2)
  s = np.einsum('bthd,bshd->bhts', q, k) * scale
  vis = np.asarray(vis)[:, None]
  s = np.where(vis, s, -np.inf)
  m = np.max(s, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  p = np.where(vis, np.exp(s - m), 0.0)
  p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
  return np.einsum('bhts,bshd->bthd', p, v)


def test_clean_metadata_is_causal_within_segments():
  seg = jnp.array([[1, 1, 1, 2, 2, 0]])
  pos = jnp.array([[0, 1, 2, 0, 1, 0]])
  meta = mask_lib.clean_meta(seg, pos)
  vis = np.asarray(mask_lib.visible(meta, meta))[0]
  expected = (np.asarray(seg)[0][:, None] == np.asarray(seg)[0][None]) & (
      np.arange(6)[None] <= np.arange(6)[:, None])
  np.testing.assert_array_equal(vis, expected)


def test_two_stream_rule_table():
  # One segment, T=4 clean tokens + one noisy view whose blocks are slots {1, 2} and {3}.
  t = 4
  seg = np.ones((1, 2 * t), np.int32)
  pos = np.tile(np.arange(t), 2)[None]
  views = np.array([[0] * t + [1] * t])
  block_starts = np.array([[0, 1, 2, 3, 0, 1, 1, 3]])
  meta = mask_lib.TokenMeta(*(jnp.asarray(x, jnp.int32) for x in (seg, pos, views, block_starts)))
  vis = np.asarray(mask_lib.visible(meta, meta))[0]
  # noisy slot 5 (position 1, block start 1): sees clean position 0 and noisy slots 5, 6 only.
  np.testing.assert_array_equal(np.nonzero(vis[5])[0], [0, 5, 6])
  # noisy slot 7 (position 3, block start 3): clean 0..2 and itself.
  np.testing.assert_array_equal(np.nonzero(vis[7])[0], [0, 1, 2, 7])
  # clean queries never see noisy keys.
  assert not vis[:t, t:].any()


def test_keys_first_layout_is_the_transpose():
  """visible_transposed(q, k) == visible(q, k) with the last two axes swapped, on random metadata
  (segments, views 0..2, positions, block starts) with Tq != Tk."""
  rng = np.random.default_rng(1)

  def meta(n):
    views = rng.integers(0, 3, (2, n))
    pos = rng.integers(0, 12, (2, n))
    starts = np.where(views > 0, pos - rng.integers(0, 3, (2, n)), pos)
    return mask_lib.TokenMeta(*(jnp.asarray(x, jnp.int32)
                                for x in (rng.integers(0, 2, (2, n)), pos, views, starts)))

  q, k = meta(11), meta(17)
  want = np.asarray(mask_lib.visible(q, k))
  assert want.any() and not want.all()
  np.testing.assert_array_equal(mask_lib.visible_transposed(q, k), want.swapaxes(1, 2))


@pytest.mark.parametrize('t, tile', [(37, 8), (64, 64), (50, 512)],
                         ids=['ragged', 'exact', 'single'])
def test_tiled_attention_matches_dense(t, tile):
  rng = np.random.default_rng(0)
  b, h, hkv, d = 2, 4, 2, 8
  q = rng.standard_normal((b, t, h, d), np.float32)
  k = rng.standard_normal((b, t, hkv, d), np.float32)
  v = rng.standard_normal((b, t, hkv, d), np.float32)
  seg = np.sort(rng.integers(0, 3, (b, t)), axis=1).astype(np.int32)
  pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
  meta = mask_lib.clean_meta(seg, pos)
  out = api.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), meta, meta, q_tile=tile)
  ref = _naive_attention(q, k, v, mask_lib.visible(meta, meta), d**-0.5)
  np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=2e-5)


def test_tiled_attention_gradients_match_untiled():
  rng = np.random.default_rng(1)
  b, t, h, d = 1, 40, 2, 8
  q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d), np.float32)) for _ in range(3))
  meta = mask_lib.clean_meta(jnp.zeros((b, t), jnp.int32), jnp.arange(t)[None])
  f = lambda tile: jax.grad(lambda q, k, v: jnp.sum(
      jnp.sin(api.attention(q, k, v, meta, meta, q_tile=tile))), argnums=(0, 1, 2))(q, k, v)
  for a, b_ in zip(f(8), f(64)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=1e-5, rtol=1e-5)


def test_query_that_sees_nothing_gets_zeros():
  q = jnp.ones((1, 2, 1, 4))
  kv = jnp.ones((1, 3, 1, 4))
  q_meta = mask_lib.clean_meta(jnp.array([[5, 1]]), jnp.array([[0, 0]]))
  k_meta = mask_lib.clean_meta(jnp.ones((1, 3), jnp.int32), jnp.arange(3)[None])
  out = np.asarray(api.attention(q, kv, kv, q_meta, k_meta))
  assert np.all(out[0, 0] == 0) and np.all(np.isfinite(out))


def test_bad_arguments_raise():
  x = jnp.ones((1, 2, 2, 4))
  meta = mask_lib.clean_meta(jnp.zeros((1, 2), jnp.int32), jnp.arange(2)[None])
  with pytest.raises(ValueError, match='unknown attention implementation'):
    api.attention(x, x, x, meta, meta, implementation='cudnn9')
  with pytest.raises(ValueError, match='incompatible'):
    api.attention(x, jnp.ones((1, 2, 3, 4)), jnp.ones((1, 2, 3, 4)), meta, meta)
