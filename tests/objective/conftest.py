"""Shared fixtures of the objective tests: packed rows and tiny fp32 models."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flare_jax.model import config as config_lib
from flare_jax.model import transformer


@pytest.fixture
def make_row(rng):
  """make_row(lengths, prompt, width) -> one packed row [1, T]: documents of `lengths` tokens,
  each a prompt of `prompt` tokens then a response, padded (segment 0) to `width`."""
  def make(lengths=(20, 26, 10), prompt=(3, 4, 2), width=None):
    t = width or sum(lengths)
    seg = np.zeros((1, t), np.int32)
    pos = np.zeros((1, t), np.int32)
    resp = np.zeros((1, t), bool)
    start = 0
    for i, (n, p) in enumerate(zip(lengths, prompt)):
      seg[0, start:start + n] = i + 1
      pos[0, start:start + n] = np.arange(n)
      resp[0, start + p:start + n] = True
      start += n
    tok = rng.integers(0, 256, (1, t)).astype(np.int32)
    return {k: jnp.asarray(v) for k, v in dict(tokens=tok, segment_ids=seg, positions=pos,
                                                 response_mask=resp).items()}
  return make


@pytest.fixture
def make_model():
  """make_model(layer_types, chunk, seed) -> the tiny FlareLM in float32 with those layers."""
  def make(layer_types=(config_lib.LINEAR, config_lib.FULL), chunk=16, seed=0):
    cfg = config_lib.VARIANTS['tiny'].replace(dtype='float32', layer_types=layer_types,
                                              gdn_chunk_size=chunk)
    return transformer.FlareLM(cfg, rngs=nnx.Rngs(seed))
  return make
