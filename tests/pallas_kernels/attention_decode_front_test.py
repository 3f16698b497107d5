"""The decode front kernel (`attention.decode_front`: q/k norms, partial RoPE, the query rows and
the cache writes of a cached attention call) against the model's XLA ops on the same product.

CPU: interpret mode, small heads (D = 16, rotary 4 / 8), T in {1, 2, 4}, GQA groups 1 / 2 / 4,
ragged starts (one clamped at the cache's end), fp32 and bf16; then the decode kernel on the
front's rows equals it on the XLA rows. GPU: Qwen3.5-2B's attention at batch 8 in bf16.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flare_jax.model import cache as cache_lib
from pallas_kernels._common import testing
from pallas_kernels.add_rms_norm import xla as norm_xla
from pallas_kernels.attention import decode_front
from pallas_kernels.attention import decode_pallas
from pallas_kernels.attention import rope
from tests.pallas_kernels import attention_decode_test as decode_test

_ON_GPU = jax.default_backend() == 'gpu'
_THETA = 1e7
_EPS = 1e-6


def _case(rng, b, t, h, hkv, d, s, rotary_dim, dtype, starts):
  """(product [B, T, N], positions, q/k norm weights, k/v caches of random stale data)."""
  n = 2 * h * d + 2 * hkv * d + 3  # a few columns past v, as a wider merged product may have
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
  positions = jnp.asarray(np.asarray(starts)[:, None] + np.arange(t)[None], jnp.int32)
  weights = [jnp.asarray(0.1 * rng.standard_normal(d), dtype) for _ in range(2)]
  return (normal(b, t, n), positions, *weights, normal(b, s, hkv, d), normal(b, s, hkv, d),
          rotary_dim)


def _xla_front(product, positions, q_norm, k_norm, k_cache, v_cache, rotary_dim, h):
  """The model's ops (`Attention.project`, `cache.write_rows`, `query_rows_layout`)."""
  b, t, _ = product.shape
  hkv, d = k_cache.shape[2:]
  qg = product[..., :2 * h * d].reshape(b, t, h, 2, d)[:, :, :, 0]
  k = product[..., 2 * h * d:(2 * h + hkv) * d].reshape(b, t, hkv, d)
  v = product[..., (2 * h + hkv) * d:(2 * h + 2 * hkv) * d].reshape(b, t, hkv, d)
  turn = lambda x: rope.apply_partial_rope(x, positions, rotary_dim=rotary_dim, theta=_THETA)
  q = turn(norm_xla.rms_norm(qg, q_norm, _EPS))
  k = turn(norm_xla.rms_norm(k, k_norm, _EPS))
  start = positions[:, 0]
  return (decode_pallas.query_rows_layout(q, hkv), cache_lib.write_rows(k_cache, k, start),
          cache_lib.write_rows(v_cache, v, start))


def _kernel_front(product, positions, q_norm, k_norm, k_cache, v_cache, rotary_dim, h):
  d, hkv = k_cache.shape[3], k_cache.shape[2]
  cos, sin = rope.rope_tables(positions, rotary_dim=rotary_dim, theta=_THETA,
                              dtype=product.dtype)
  return decode_front.decode_front_pallas(
      product, cos, sin, positions[:, 0], q_norm, k_norm, k_cache, v_cache, num_heads=h,
      k_col=2 * h * d, v_col=(2 * h + hkv) * d, eps=_EPS, interpret=not _ON_GPU)


def _assert_front_matches(case, h, tol):
  want_q, want_k, want_v = _xla_front(*case, h)
  got_q, got_k, got_v = _kernel_front(*case, h)
  product, positions = case[0], case[1]
  t, grp = product.shape[1], h // case[4].shape[2]
  real = t * grp  # rows past T x G are padding: the decode kernel's metadata hides them
  assert got_q.shape == want_q.shape and got_q.dtype == product.dtype
  assert testing.rms_ratio(got_q[:, :, :real], want_q[:, :, :real]) <= tol
  np.testing.assert_array_equal(got_v, want_v)  # v is copied
  assert testing.rms_ratio(got_k, want_k) <= tol
  # every slot but this call's is untouched, bit for bit
  slots = np.arange(case[4].shape[1])[None]
  start = np.minimum(np.asarray(positions[:, :1]), case[4].shape[1] - t)  # write_rows' clamp
  stale = (slots < start) | (slots >= start + t)
  np.testing.assert_array_equal(np.asarray(got_k)[stale], np.asarray(case[4])[stale])
  return got_q, got_k, got_v


@pytest.mark.parametrize('t, h, hkv, rotary_dim', [(1, 4, 2, 4), (2, 4, 1, 8), (4, 2, 2, 4),
                                                   (1, 8, 2, 8)])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_matches_the_models_xla_ops(rng, t, h, hkv, rotary_dim, dtype):
  if _ON_GPU:
    pytest.skip('CPU interpret-mode case')
  case = _case(rng, 2, t, h, hkv, 16, 32, rotary_dim, dtype, starts=[5, 32 - t + 1])
  # fp32: the same arithmetic up to summation order; bf16: one rounding of the RoPE apart
  _assert_front_matches(case, h, 1e-6 if dtype == jnp.float32 else 8e-3)


def test_decode_kernel_on_the_front_rows_matches_it_on_the_xla_rows(rng):
  if _ON_GPU:
    pytest.skip('CPU interpret-mode case')
  b, t, h, hkv, d, s = 2, 2, 4, 2, 16, 64
  case = _case(rng, b, t, h, hkv, d, s, 8, jnp.float32, starts=[3, 40])
  rows, k_cache, v_cache = _kernel_front(*case, h)
  want_rows, _, _ = _xla_front(*case, h)
  metas = decode_test._cache_meta([3, 40], t, s, t)  # pylint: disable=protected-access
  got = decode_pallas.attention_decode_rows(rows, k_cache, v_cache, *metas, num_heads=h,
                                            block_k=16, interpret=True)
  want = decode_pallas.attention_decode_rows(want_rows, k_cache, v_cache, *metas, num_heads=h,
                                             block_k=16, interpret=True)
  assert testing.rms_ratio(got, want) <= 1e-6


def test_shapes_the_kernel_does_not_take_are_named():
  takes = decode_front.front_takes
  assert takes(1, 8, 2, 256, 64) is None
  assert 'T=3' in takes(3, 8, 2, 256, 64)
  assert 'group' in takes(1, 6, 2, 256, 64)
  assert 'query rows' in takes(32, 8, 2, 256, 64)
  assert 'D=96' in takes(1, 8, 2, 96, 32)
  assert 'rotary dim 0' in takes(1, 8, 2, 256, 0)
  assert 'rotary dim 48' in takes(1, 8, 2, 256, 48)
  case = _case(np.random.default_rng(0), 1, 1, 4, 2, 16, 32, 4, jnp.float32, starts=[0])
  with pytest.raises(ValueError, match='columns'):
    product, positions, qn, kn, kc, vc, _ = case
    cos, sin = rope.rope_tables(positions, rotary_dim=4, theta=_THETA, dtype=product.dtype)
    decode_front.decode_front_pallas(product, cos, sin, positions[:, 0], qn, kn, kc, vc,
                                     num_heads=4, k_col=100, v_col=132, eps=_EPS)


def test_column_runs_are_powers_of_two_covering_the_head():
  assert decode_front.column_runs(256, 32) == [(0, 32), (32, 32), (64, 64), (128, 128)]
  assert decode_front.column_runs(16, 2) == [(0, 2), (2, 2), (4, 4), (8, 8)]
  assert decode_front.column_runs(128, 0) == [(0, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize('t', [1, 4])
def test_gpu_matches_the_models_xla_ops(rng, t):
  b, s, h, hkv, d = decode_test._GPU_SHAPES  # pylint: disable=protected-access
  case = _case(rng, b, t, h, hkv, d, s, 64, jnp.bfloat16, starts=list(range(3, 3 + 31 * b, 31)))
  _assert_front_matches(case, h, 8e-3)
