"""What a checkpoint's training record (`model_io.load_training`) means for decoding it.

The record: {"objective": "flare" | "ar", "steps": N, "init_from": DIR | null,
"flare": {"block_size", "num_views", "logit_shift", "noise"} | null}; "flare" holds the settings of
the latest FLARE training in the model's history (an AR run from a FLARE model keeps its init's).
"""
from collections.abc import Mapping
from typing import Any

from flare_jax.objective import two_stream
from flare_jax.sampling import sampler

# When the checkpoint does not say (converted or older checkpoints): the sampler's default.
DEFAULT_BLOCK_SIZE = sampler.SamplerConfig.block_size
NOISY_MODES = ('ar_trust', 'diffusion_trust')
IMPORTED = 'imported'  # the objective of a checkpoint converted from one with no record


def imported_record(source: str) -> dict:
  """The record of a checkpoint converted from `source`, a Hugging Face checkpoint that carries
  no record: nothing says its noisy passes were trained."""
  return {'objective': IMPORTED, 'steps': 0, 'init_from': source, 'flare': None}


def make_record(objective: Mapping[str, Any], steps: int, init_from: str,
                init_record: Mapping[str, Any] | None) -> dict:
  """The record of a run of `steps` steps with config `objective` (its name, block_size,
  num_views, logit_shift, noise) from `init_from` (whose record is `init_record`)."""
  if objective['name'] == 'flare':
    flare = {k: objective[k] for k in ('block_size', 'num_views', 'logit_shift', 'noise')}
  else:
    flare = (init_record or {}).get('flare')
  return {'objective': objective['name'], 'steps': steps, 'init_from': init_from or None,
          'flare': flare}


def trained_block_size(record: Mapping[str, Any] | None) -> int | None:
  """The block size the model's noisy passes were trained with, if the record says."""
  flare = (record or {}).get('flare')
  return int(flare['block_size']) if flare else None


def trained_objective(record: Mapping[str, Any] | None) -> two_stream.ObjectiveConfig:
  """The FLARE objective the model was trained with (block size, views, logit shift, noise), if
  the record says; else the objective's defaults (what a conversion would start with)."""
  flare = (record or {}).get('flare')
  return two_stream.ObjectiveConfig(**flare) if flare else two_stream.ObjectiveConfig()


def default_block_size(record: Mapping[str, Any] | None) -> int:
  """The block size to decode with when none is asked for: the trained one, else
  DEFAULT_BLOCK_SIZE."""
  return trained_block_size(record) or DEFAULT_BLOCK_SIZE


def check_mode(mode: str, record: Mapping[str, Any] | None) -> str | None:
  """A warning for decoding a checkpoint in `mode`, or None.

  Raises:
    ValueError: a noisy mode for a model trained without logit shift (the sampler's noisy passes
      use the logit-shift layout: slot p predicts token p+1).
  """
  if mode not in NOISY_MODES or record is None:
    return None
  flare = record.get('flare')
  consequence = (f'{mode} drafts or denoises poorly (AR-Trust stays exact, Diffusion-Trust does '
                 'not)')
  if flare is None and record.get('objective') == IMPORTED:
    return (f'this checkpoint was converted from {record.get("init_from")}, which records no '
            'FLARE training: unless it was FLARE-trained elsewhere, its noisy passes are '
            f'untrained and {consequence}')
  if flare is None:
    return (f'this checkpoint was never trained with the FLARE objective (objective '
            f'{record.get("objective")!r}): its noisy passes are untrained, so {consequence}')
  if not flare.get('logit_shift', True):
    raise ValueError(f'{mode} decodes with the logit-shift layout (slot p predicts token p+1); '
                     'this checkpoint was trained with objective.logit_shift=False')
  return None
