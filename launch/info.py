"""Describes a model checkpoint without loading its weights: shapes, parameter count, how it was
trained, its tokenizer and the commands that use it.

python -m launch.info --ckpt=DIR
"""
import collections
import math
import sys

import jax
import jax.numpy as jnp
from absl import flags

from flare_jax.checkpoint import model_io
from flare_jax.data import tokenizer as tokenizer_lib
from flare_jax.model import config as config_lib
from flare_jax.sampling import training_record
from launch import runtime

_CKPT = flags.DEFINE_string('ckpt', None, 'Model checkpoint directory.', required=True)


def describe(ckpt: str) -> str:
  """The lines `launch.info` prints for a model checkpoint.

  Raises:
    ValueError: `ckpt` is not a model checkpoint (the message says what it looks like).
  """
  cfg = model_io.load_config(ckpt)
  abstract = model_io.abstract_params(cfg)  # shapes only: nothing is read or allocated
  by_dtype = collections.Counter()
  for leaf in jax.tree.leaves(abstract):
    by_dtype[str(leaf.dtype)] += math.prod(leaf.shape)
  total = sum(by_dtype.values())
  size = sum(n * jnp.dtype(d).itemsize for d, n in by_dtype.items())
  n_full = sum(t == config_lib.FULL for t in cfg.layer_types)
  count = f'{total / 1e9:.2f}B' if total >= 1e9 else f'{total / 1e6:.2f}M'
  stored = f'{size / 2**30:.2f} GiB' if size >= 2**30 else f'{size / 2**20:.1f} MiB'
  lines = [
      f'{ckpt}: {count} parameters ({stored} as stored, {", ".join(sorted(by_dtype))})',
      f'  {cfg.num_layers} layers ({cfg.num_layers - n_full} Gated DeltaNet, {n_full} gated '
      f'attention), hidden {cfg.hidden_size}, MLP {cfg.intermediate_size}, vocabulary '
      f'{cfg.vocab_size} ([MASK] id {cfg.resolved_mask_token_id}), compute dtype {cfg.dtype}',
  ]
  record = model_io.load_training(ckpt)
  if record is None:
    lines.append('  training: not recorded (a checkpoint older than the records)')
  elif record.get('objective') == training_record.IMPORTED:
    lines.append(f"  training: converted from {record.get('init_from')}, which records none")
  else:
    flare = record.get('flare')
    how = (f"FLARE block size {flare['block_size']}, {flare['num_views']} view(s), "
           f"logit shift {'on' if flare['logit_shift'] else 'off'}" if flare
           else 'never FLARE-trained: its noisy passes are untrained')
    lines.append(f"  training: last run objective {record.get('objective')!r}, "
                 f"{record.get('steps')} steps; {how}")
  tok = tokenizer_lib.checkpoint_tokenizer(ckpt)
  template = 'yes' if getattr(tok, 'chat_template', None) is not None else 'no'
  lines.append(f'  tokenizer: {type(tok).__name__}, {tok.vocab_size} ids, end ids '
               f'{list(tok.stop_ids)}, chat template: {template}')
  lines += [f'  decode: python -m launch.sample --ckpt={ckpt} --mode=ar_trust --prompt=...',
            f'  evaluate: python -m launch.eval --ckpt={ckpt} --task=TASK.jsonl',
            f'  export: python -m launch.export_hf --ckpt={ckpt} --out=DIR']
  return '\n'.join(lines)


def main(argv):
  del argv
  try:
    print(describe(_CKPT.value))
  except (ValueError, OSError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  runtime.run(main)
