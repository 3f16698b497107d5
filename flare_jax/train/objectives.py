"""Maps the config's objective section to a loss function and a host-side batch validator."""
import functools

import ml_collections as mlc

from flare_jax.model import config as config_lib
from flare_jax.objective import two_stream

OBJECTIVES = ('ar', 'flare')


def objective_config(c: mlc.ConfigDict) -> two_stream.ObjectiveConfig:
  o = c.objective
  return two_stream.ObjectiveConfig(block_size=o.block_size, num_views=o.num_views,
                                    logit_shift=o.logit_shift, noise=o.noise,
                                    noise_eps=o.noise_eps, gdn_schedule=o.gdn_schedule,
                                    loss_tile=o.loss_tile)


def make_loss_fn(c: mlc.ConfigDict, model_cfg: config_lib.ModelConfig):
  """loss_fn(model, batch, rng) -> (mean loss, metrics incl. n_targets)."""
  del model_cfg
  if c.objective.name not in OBJECTIVES:
    raise ValueError(f'unknown objective.name {c.objective.name!r}; known: {OBJECTIVES}')
  if c.objective.name == 'ar':
    return two_stream.ar_loss
  return functools.partial(two_stream.flare_loss, cfg=objective_config(c))


def make_batch_validator(c: mlc.ConfigDict, model_cfg: config_lib.ModelConfig):
  del c
  return functools.partial(two_stream.validate_batch, vocab_size=model_cfg.vocab_size,
                           mask_id=model_cfg.resolved_mask_token_id)


def num_streams(c: mlc.ConfigDict) -> int:
  """Tokens processed per row token: 1 (AR) or 1 + V (two-stream)."""
  return 1 if c.objective.name == 'ar' else 1 + c.objective.num_views
