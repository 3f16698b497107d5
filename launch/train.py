"""Trains FLARE (or plain AR SFT). Logic lives in flare_jax.train.loop; this file only parses flags.

python -m launch.train --config=configs/flare_tiny.py --workdir=/tmp/tiny [--config.optim.lr=1e-3 ...]
Multi-process (one process per GPU or host): add --multihost (calls jax.distributed.initialize()).
"""
import jax
from absl import app
from absl import flags
from ml_collections import config_flags

from flare_jax.train import loop

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output dir (resumes if it has a checkpoint).',
                               required=True)
_MULTIHOST = flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize().')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Too many command-line arguments: {argv[1:]}')
  if _MULTIHOST.value:
    jax.distributed.initialize()
  loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
