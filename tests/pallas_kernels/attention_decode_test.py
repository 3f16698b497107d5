"""The decode attention kernel (`attention.decode_pallas`: few queries over a KV cache) against the
XLA path, with the model's cache metadata (`attention.cache_key_meta`).

CPU: interpret mode, small shapes and key tiles, GQA, ragged rows with stale cache slots past
each row's tokens (random data: any leak shows), clean calls, a noisy block, a clean token
followed by a noisy block, fp32 and bf16. GPU: Qwen3.5-2B's attention at batch 8 in bf16. Both: a
clean T-token call equals T one-token calls bit for bit for the tokens they share.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flare_jax.model import attention as model_attention
from pallas_kernels._common import testing
from pallas_kernels.attention import api
from pallas_kernels.attention import decode_pallas
from pallas_kernels.attention import mask as mask_lib
from pallas_kernels.attention import xla

_ON_GPU = jax.default_backend() == 'gpu'


def _cache_meta(starts, t, s, noisy_from):
  """(q_meta [B, T], k_meta [B, S]) of T new tokens at positions starts[b].., the tokens from
  `noisy_from` on one noisy block (view 1), as the model builds them over a cache of S slots."""
  b = len(starts)
  pos = np.asarray(starts)[:, None] + np.arange(t)[None]
  noisy = np.arange(t)[None] >= noisy_from
  block_start = np.where(noisy, np.asarray(starts)[:, None] + noisy_from, pos)
  field = lambda x: jnp.asarray(np.broadcast_to(x, (b, t)), jnp.int32)
  q_meta = mask_lib.TokenMeta(field(0), field(pos), field(noisy.astype(int)), field(block_start))
  return q_meta, model_attention.cache_key_meta(q_meta, s)


def _qkv(rng, b, t, s, h, hkv, d, dtype):
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
  return normal(b, t, h, d), normal(b, s, hkv, d), normal(b, s, hkv, d)


def _kernel(q, k, v, q_meta, k_meta, **kw):
  return decode_pallas.attention_decode_pallas(q, k, v, q_meta, k_meta,
                                               interpret=not _ON_GPU, **kw)


def _assert_matches_xla(q, k, v, q_meta, k_meta, tol, **kw):
  got = _kernel(q, k, v, q_meta, k_meta, **kw)
  scale = q.shape[-1] ** -0.5
  with jax.default_matmul_precision('highest'):
    want = xla.attention_xla(q.astype(jnp.float32), k.astype(jnp.float32),
                             v.astype(jnp.float32), q_meta, k_meta, scale=scale)
  assert got.shape == q.shape and got.dtype == q.dtype
  err = testing.rms_ratio(got.astype(jnp.float32), want)
  assert err <= tol, err
  return err


@pytest.mark.parametrize('t, noisy_from', [(1, 1), (3, 3), (4, 0), (5, 1)])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_matches_the_xla_path(rng, t, noisy_from, dtype):
  """Clean decode steps and verify passes, a noisy block, a clean token then a noisy block;
  the key walk split over the default 4 programs (one tile each)."""
  if _ON_GPU:
    pytest.skip('CPU interpret-mode case (the GPU cases are below)')
  q, k, v = _qkv(rng, 3, t, 64, 4, 2, 16, dtype)
  q_meta, k_meta = _cache_meta([0, 21, 58 - t], t, 64, noisy_from)  # last row in the last tile
  _assert_matches_xla(q, k, v, q_meta, k_meta, 1e-5 if dtype == jnp.float32 else 1e-2,
                      block_k=16)


@pytest.mark.parametrize('num_splits', [1, 3, 6])
def test_any_split_of_the_key_walk_matches_the_xla_path(rng, num_splits):
  """One program per walk, 3 over 4 tiles (the last split empty), more splits than tiles (one
  per tile)."""
  if _ON_GPU:
    pytest.skip('CPU interpret-mode case')
  q, k, v = _qkv(rng, 3, 5, 64, 4, 2, 16, jnp.float32)
  q_meta, k_meta = _cache_meta([0, 21, 53], 5, 64, 1)
  _assert_matches_xla(q, k, v, q_meta, k_meta, 1e-5, block_k=16, num_splits=num_splits)


def test_splits_fill_the_target_grid_up_to_one_per_tile():
  assert decode_pallas.splits_for(8, 2, 4, target_programs=264) == 4  # capped at the tiles
  assert decode_pallas.splits_for(8, 2, 512, target_programs=264) == 17  # 272 programs
  assert decode_pallas.splits_for(64, 4, 512, target_programs=264) == 2
  assert decode_pallas.splits_for(512, 8, 512, target_programs=264) == 1


def _assert_one_token_calls_equal_one_call(q, k, v, starts, **kw):
  t, s = q.shape[1], k.shape[1]
  o_all = _kernel(q, k, v, *_cache_meta(starts, t, s, t), **kw)
  for i in range(t):
    o = _kernel(q[:, i:i + 1], k, v, *_cache_meta(np.asarray(starts) + i, 1, s, 1), **kw)
    np.testing.assert_array_equal(np.asarray(o, np.float32), np.asarray(o_all[:, i:i + 1],
                                                                        np.float32))


def test_one_token_calls_equal_one_clean_call_bit_for_bit(rng):
  if _ON_GPU:
    pytest.skip('CPU interpret-mode case')
  q, k, v = _qkv(rng, 2, 4, 64, 4, 2, 16, jnp.bfloat16)
  _assert_one_token_calls_equal_one_call(q, k, v, [5, 30], block_k=16)


def test_shapes_the_kernel_does_not_take_are_named():
  def takes(q_shape, kv_shape, dtype=jnp.bfloat16, v_dtype=None):
    spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt)
    return decode_pallas.kernel_takes(spec(q_shape, dtype), spec(kv_shape, dtype),
                                      spec(kv_shape, v_dtype or dtype))
  assert 'query rows' in takes((1, 17, 16, 256), (1, 64, 4, 256))
  assert 'D=96' in takes((1, 1, 16, 96), (1, 64, 4, 96))
  assert 'D=512 > 256' in takes((1, 1, 16, 512), (1, 64, 4, 512))
  assert 'S=100' in takes((1, 1, 16, 256), (1, 100, 4, 256))
  assert 'dtypes differ' in takes((8, 4, 8, 256), (8, 256, 2, 256), v_dtype=jnp.float32)
  assert takes((8, 4, 8, 256), (8, 256, 2, 256)) is None
  with pytest.raises(ValueError, match='num_splits=0'):
    decode_pallas.attention_decode_pallas(*(jnp.zeros(x) for x in (
        (1, 1, 4, 16), (1, 64, 2, 16), (1, 64, 2, 16))), *_cache_meta([0], 1, 64, 1),
                                          num_splits=0)
  with pytest.raises(ValueError, match='S=100'):
    decode_pallas.attention_decode_pallas(*(jnp.zeros(x) for x in (
        (1, 1, 4, 16), (1, 100, 2, 16), (1, 100, 2, 16))), *_cache_meta([0], 1, 100, 1))


def test_cache_attention_dispatch(rng):
  q, k, v = _qkv(rng, 2, 2, 64, 4, 2, 16, jnp.float32)
  metas = _cache_meta([3, 9], 2, 64, 2)
  x = api.cache_attention(q, k, v, *metas, decode_implementation='xla')
  p = api.cache_attention(q, k, v, *metas, decode_implementation='pallas')
  if not _ON_GPU:  # the kernel needs a GPU: 'pallas' falls back to xla, the same numbers
    np.testing.assert_array_equal(p, x)
  np.testing.assert_array_equal(x, api.attention(q, k, v, *metas, implementation='xla'))
  with pytest.raises(ValueError, match='unknown decode attention implementation'):
    api.cache_attention(q, k, v, *metas, decode_implementation='triton')


_GPU_SHAPES = (8, 256, 8, 2, 256)  # Qwen3.5-2B's attention at batch 8: B, S, H, Hkv, D


@pytest.mark.gpu
@pytest.mark.parametrize('t, noisy_from', [(1, 1), (4, 4), (4, 0), (5, 1)])
def test_gpu_decode_shapes_match_the_xla_path(rng, t, noisy_from):
  b, s, h, hkv, d = _GPU_SHAPES
  q, k, v = _qkv(rng, b, t, s, h, hkv, d, jnp.bfloat16)
  starts = (np.arange(b) * 29) % (s - t)
  err = _assert_matches_xla(q, k, v, *_cache_meta(starts, t, s, noisy_from), 1e-2)
  print(f'\ndecode attention T={t} noisy from {noisy_from}: relative RMS {err:.2e}')


@pytest.mark.gpu
def test_gpu_one_token_calls_equal_one_clean_call_bit_for_bit(rng):
  b, s, h, hkv, d = _GPU_SHAPES
  q, k, v = _qkv(rng, b, 4, s, h, hkv, d, jnp.bfloat16)
  _assert_one_token_calls_equal_one_call(q, k, v, (np.arange(b) * 29) % (s - 4))
