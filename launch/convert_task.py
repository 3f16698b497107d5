"""Converts a public benchmark's JSONL file into a task file for launch.eval.

python -m launch.convert_task --format=humaneval --input=HumanEval.jsonl.gz --output=humaneval.jsonl
python -m launch.convert_task --format=gsm8k --input=gsm8k_test.jsonl --output=gsm8k.jsonl

Formats (flare_jax/eval/converters.py): humaneval (code completing the prompt, with the Codex stop
strings), mbpp (code), gsm8k (numeric). Every row is checked before anything is written; the output
is written through OUTPUT.partial, read back as a task file, then renamed, and an existing OUTPUT
is kept unless --overwrite.
"""
import os
import sys

from absl import app
from absl import flags

from flare_jax.eval import converters
from flare_jax.eval import tasks
from launch import runtime

_FORMAT = flags.DEFINE_enum('format', None, list(converters.FORMATS), 'The benchmark file format.',
                            required=True)
_INPUT = flags.DEFINE_string('input', None, 'The benchmark JSONL file (.gz read as gzip).',
                             required=True)
_OUTPUT = flags.DEFINE_string('output', None, 'The task file to write.', required=True)
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing --output.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Too many command-line arguments: {argv[1:]}')
  if not os.path.isfile(_INPUT.value):
    raise app.UsageError(f'--input={_INPUT.value}: no such file')
  if os.path.exists(_OUTPUT.value) and not _OVERWRITE.value:
    raise app.UsageError(f'--output={_OUTPUT.value} exists: pass --overwrite to replace it')
  if not os.path.isdir(os.path.dirname(os.path.abspath(_OUTPUT.value))):
    raise app.UsageError(f'--output={_OUTPUT.value}: its directory does not exist')
  try:
    examples = converters.convert_file(_INPUT.value, _FORMAT.value)
  except (ValueError, OSError, EOFError) as e:  # EOFError: a truncated .gz
    sys.exit(f'error: {e}')
  partial = _OUTPUT.value + '.partial'
  tasks.write_task(partial, examples)
  try:
    kind, _ = tasks.load_task(partial)  # as launch.eval will read it
  except ValueError as e:
    os.remove(partial)
    sys.exit(f'error: the converted rows are not a valid task file: {e}')
  os.replace(partial, _OUTPUT.value)
  print(f'wrote {len(examples)} {kind} examples to {_OUTPUT.value}')


if __name__ == '__main__':
  runtime.run(main)
