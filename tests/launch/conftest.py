"""Fixtures of the launch entry-point tests."""
import json
import shutil

import pytest
from flax import nnx

from flare_jax.checkpoint import model_io
from flare_jax.model import config as config_lib
from flare_jax.model import transformer
from flare_jax.sampling import training_record


@pytest.fixture(scope='session')
def ckpt(tmp_path_factory) -> str:
  """A randomly initialised tiny model saved as a checkpoint directory (byte tokenizer)."""
  cfg = config_lib.VARIANTS['tiny']
  out = str(tmp_path_factory.mktemp('launch') / 'ckpt')
  model_io.save_model(transformer.FlareLM(cfg, rngs=nnx.Rngs(0)), out, cfg=cfg)
  return out


@pytest.fixture
def recorded_ckpt(ckpt, tmp_path):
  """A copy of `ckpt` whose training record says it was trained with objective `name` and
  FLARE `block_size` / `logit_shift`: call with those; returns (directory, record)."""
  def make(name='flare', block_size=2, logit_shift=True):
    out = tmp_path / f'ckpt_{name}_{block_size}_{logit_shift}'
    shutil.copytree(ckpt, out)
    objective = dict(name=name, block_size=block_size, num_views=2, logit_shift=logit_shift,
                     noise='uniform')
    record = training_record.make_record(objective, 10, '', None)
    (out / model_io.TRAINING_FILE).write_text(json.dumps(record))
    return str(out), record
  return make
