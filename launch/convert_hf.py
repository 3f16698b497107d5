"""Converts a Hugging Face Qwen3.5 checkpoint into a flare-jax checkpoint (orbax params + config).

python -m launch.convert_hf --hf_dir=/path/Qwen3.5-2B --out=/ckpt/q35_2b [--verify]
    [--mask_token_id=N] [--overwrite] [--param_dtype=float32] [--dtype=bfloat16]
--verify runs the original model in transformers (fp32) and ours (fp32, highest matmul precision) on
the same seeded random tokens and exits non-zero if the max |logit difference| exceeds --tolerance.
Logic lives in flare_jax.checkpoint.
"""
import sys

from absl import app
from absl import flags

from flare_jax.checkpoint import hf_import
from launch import runtime

_DTYPES = ['float32', 'bfloat16', 'float16']
_HF_DIR = flags.DEFINE_string('hf_dir', None, 'Hugging Face checkpoint directory.', required=True)
_OUT = flags.DEFINE_string('out', None, 'Output checkpoint directory.', required=True)
_MASK = flags.DEFINE_integer('mask_token_id', None, '[MASK] id (default: last embedding row).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing non-empty --out.')
_PARAM_DTYPE = flags.DEFINE_enum('param_dtype', None, _DTYPES, 'Stored param dtype (default fp32).')
_DTYPE = flags.DEFINE_enum('dtype', None, _DTYPES, 'Compute dtype recorded in the config.')
_VERIFY = flags.DEFINE_bool('verify', False, 'Compare logits with transformers (needs torch).')
_TOL = flags.DEFINE_float('tolerance', 1e-3, 'Max |logit difference| allowed by --verify (fp32).')
_VERIFY_BATCH = flags.DEFINE_integer('verify_batch', 2, 'Rows for --verify.')
_VERIFY_LEN = flags.DEFINE_integer('verify_length', 64, 'Tokens per row for --verify.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Too many command-line arguments: {argv[1:]}')
  overrides = {k: f.value for k, f in (('param_dtype', _PARAM_DTYPE), ('dtype', _DTYPE))
               if f.value is not None}
  try:
    cfg = hf_import.convert_hf_checkpoint(_HF_DIR.value, _OUT.value, mask_token_id=_MASK.value,
                                          overwrite=_OVERWRITE.value, **overrides)
  except ValueError as e:
    sys.exit(f'error: {e}')
  if not _VERIFY.value:
    return
  try:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    import transformers  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    sys.exit('--verify needs torch and transformers (pip install -r requirements-test.txt); '
             f'the converted checkpoint in {_OUT.value} was written but not verified')
  from flare_jax.checkpoint import verify  # pylint: disable=g-import-not-at-top
  tokens = verify.random_tokens(min(cfg.vocab_size, 32000), _VERIFY_BATCH.value, _VERIFY_LEN.value)
  diff = verify.max_logit_diff(_HF_DIR.value, _OUT.value, tokens)
  print(f'verify: max |logit(transformers) - logit(flare-jax)| = {diff:.3e} over tokens '
        f'{tokens.shape} (tolerance {_TOL.value:g})')
  if not diff <= _TOL.value:
    sys.exit(f'error: logits differ by {diff:.3e} > {_TOL.value:g}')


if __name__ == '__main__':
  runtime.run(main)
