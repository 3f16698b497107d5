"""Fixtures of the launch entry-point tests."""
import pytest
from flax import nnx

from flare_jax.checkpoint import model_io
from flare_jax.model import config as config_lib
from flare_jax.model import transformer


@pytest.fixture(scope='session')
def ckpt(tmp_path_factory) -> str:
  """A randomly initialised tiny model saved as a checkpoint directory (byte tokenizer)."""
  cfg = config_lib.VARIANTS['tiny']
  out = str(tmp_path_factory.mktemp('launch') / 'ckpt')
  model_io.save_model(transformer.FlareLM(cfg, rngs=nnx.Rngs(0)), out, cfg=cfg)
  return out
