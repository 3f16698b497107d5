"""Exports a flare-jax checkpoint in the Hugging Face Qwen3.5 layout (loads in transformers as is).

python -m launch.export_hf --ckpt=/ckpt/flare_2b --out=/export/flare_2b [--dtype=bfloat16]
--ckpt is a model checkpoint directory (model_config.json + params/), as convert_hf writes.
"""
import sys

from absl import app
from absl import flags

from flare_jax.checkpoint import hf_export
from launch import runtime

_CKPT = flags.DEFINE_string('ckpt', None, 'Model checkpoint directory.', required=True)
_OUT = flags.DEFINE_string('out', None, 'Output Hugging Face directory.', required=True)
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32', 'float16'], 'Tensor dtype.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing non-empty --out.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Too many command-line arguments: {argv[1:]}')
  try:
    hf_export.export_hf(_CKPT.value, _OUT.value, dtype=_DTYPE.value, overwrite=_OVERWRITE.value)
  except ValueError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  runtime.run(main)
