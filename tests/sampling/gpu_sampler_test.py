"""GPU: the sampler with the decode kernels (`gdn_decode_impl`, `attn_decode_impl` and `norm_impl`
'pallas'; the first two are the GPU defaults) decodes as with XLA's cached passes, and greedy
AR-Trust still equals greedy AR with them.

fp32 compute at 'highest' matmul precision: in 16-bit compute the one-token AR step and the
block-wide verify pass round differently (README), which is not what these tests are about.
"""
import jax
import numpy as np
import pytest
from flax import nnx

from flare_jax.model import config as config_lib
from flare_jax.model import transformer
from flare_jax.sampling import sampler as sampler_lib

pytestmark = pytest.mark.gpu


def _sampler(decode_impl: str) -> sampler_lib.Sampler:
  """A sampler whose GDN, attention and residual norm cached passes all run `decode_impl`."""
  cfg = config_lib.VARIANTS['small'].replace(dtype='float32', gdn_decode_impl=decode_impl,
                                             attn_decode_impl=decode_impl, norm_impl=decode_impl)
  return sampler_lib.Sampler(transformer.FlareLM(cfg, rngs=nnx.Rngs(5)))


def _prompts():
  rng = np.random.default_rng(0)
  lengths = np.asarray([3, 11, 7, 1], np.int32)
  return rng.integers(0, 256, (4, 11)).astype(np.int32), lengths


def test_kernels_and_xla_decode_the_same_tokens():
  prompts, lengths = _prompts()
  cfg = sampler_lib.SamplerConfig(mode='ar', max_new_tokens=24)
  with jax.default_matmul_precision('highest'):
    kernel = _sampler('pallas').generate(prompts, lengths, cfg)
    xla = _sampler('xla').generate(prompts, lengths, cfg)
  np.testing.assert_array_equal(kernel.tokens, xla.tokens)


def _assert_equals_greedy_ar(new_tokens: int, **mode):
  """`mode` (SamplerConfig fields) decodes the prompts to greedy AR's tokens, with the kernels."""
  prompts, lengths = _prompts()
  sampler = _sampler('pallas')
  with jax.default_matmul_precision('highest'):
    ar = sampler.generate(prompts, lengths, sampler_lib.SamplerConfig(
        mode='ar', max_new_tokens=new_tokens))
    other = sampler.generate(prompts, lengths, sampler_lib.SamplerConfig(
        max_new_tokens=new_tokens, **mode))
  np.testing.assert_array_equal(other.tokens, ar.tokens)


@pytest.mark.parametrize('block', [2, 4, 8])
def test_greedy_ar_trust_equals_greedy_ar_with_the_kernels(block):
  _assert_equals_greedy_ar(24, mode='ar_trust', block_size=block)


def test_diffusion_trust_one_token_blocks_at_full_threshold_equal_greedy_ar_with_the_kernels():
  _assert_equals_greedy_ar(12, mode='diffusion_trust', block_size=1, threshold=1.0)


@pytest.mark.skipif(jax.device_count() < 2, reason='needs 2 GPUs')
@pytest.mark.parametrize('mode', ['ar', 'ar_trust', 'diffusion_trust'])
def test_data_parallel_decoding_with_the_kernels_matches_one_gpu(mode):
  """The decode kernels run inside the per-device program of the data-parallel sampler."""
  prompts, lengths = _prompts()
  cfg = config_lib.VARIANTS['small'].replace(dtype='float32', gdn_decode_impl='pallas',
                                             attn_decode_impl='pallas')
  model = transformer.FlareLM(cfg, rngs=nnx.Rngs(5))
  sampler_cfg = sampler_lib.SamplerConfig(mode=mode, max_new_tokens=16, commit='fixed',
                                          tokens_per_pass=2)
  with jax.default_matmul_precision('highest'):
    one = sampler_lib.Sampler(model).generate(prompts, lengths, sampler_cfg)
    split = sampler_lib.Sampler(model, devices=jax.devices()[:2]).generate(
        prompts, lengths, sampler_cfg)
  np.testing.assert_array_equal(split.tokens, one.tokens)


@pytest.mark.parametrize('mode', ['ar', 'ar_trust', 'diffusion_trust'])
def test_segmented_decoding_with_the_kernels_equals_one_pass(mode):
  """`should_stop` runs the loop in jitted segments with the kernels: a test that never stops
  gives the one-pass tokens; a stopped row keeps a prefix of them."""
  prompts, lengths = _prompts()
  sampler = _sampler('pallas')
  cfg = sampler_lib.SamplerConfig(mode=mode, max_new_tokens=20, block_size=4)
  with jax.default_matmul_precision('highest'):
    one = jax.device_get(sampler.generate(prompts, lengths, cfg))
    never = sampler.generate(prompts, lengths, cfg, should_stop=lambda r, ids: False,
                             check_every=3)
    part = jax.device_get(sampler.generate(prompts, lengths, cfg, check_every=3,
                                           should_stop=lambda r, ids: r == 1 and len(ids) >= 2))
  np.testing.assert_array_equal(never.tokens, one.tokens)
  np.testing.assert_array_equal(never.n_forward, one.n_forward)
  n = int(part.num_tokens[1])
  assert 2 <= n < int(one.num_tokens[1])
  np.testing.assert_array_equal(part.tokens[1, :n], one.tokens[1, :n])
  np.testing.assert_array_equal(np.delete(part.tokens, 1, 0), np.delete(one.tokens, 1, 0))
