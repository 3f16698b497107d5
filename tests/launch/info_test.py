"""launch.info: a checkpoint described from its files alone."""
import math
import subprocess
import sys

import jax

from flare_jax.checkpoint import model_io
from launch import info


def test_describes_size_training_and_tokenizer(recorded_ckpt):
  ckpt, _ = recorded_ckpt(block_size=2)
  text = info.describe(ckpt)
  stored = sum(math.prod(x.shape) for x in jax.tree.leaves(model_io.load_params(ckpt)))
  assert text.startswith(f'{ckpt}: {stored / 1e6:.2f}M parameters')
  assert "last run objective 'flare', 10 steps; FLARE block size 2, 2 view(s), logit shift on" in (
      text)
  assert 'tokenizer: ByteTokenizer, 260 ids, end ids [256], chat template: no' in text


def test_a_directory_that_is_no_checkpoint_says_what_it_is(tmp_path):
  (tmp_path / 'ckpt').mkdir()  # a training workdir whose run has not finished
  run = subprocess.run([sys.executable, '-m', 'launch.info', f'--ckpt={tmp_path}'],
                       capture_output=True, text=True, timeout=120)
  assert run.returncode == 1 and 'a training workdir whose run has not finished' in run.stderr
  assert 'Traceback' not in run.stderr
