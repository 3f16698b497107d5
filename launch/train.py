"""Trains FLARE (or plain AR SFT). Logic lives in flare_jax.train.loop; this file only parses flags.

python -m launch.train --config=configs/flare_tiny.py --workdir=/tmp/tiny [--config.optim.lr=1e-3]
Multi-process (one process per GPU or host): add --multihost; jax.distributed.initialize() finds the
cluster (SLURM, Open MPI, Kubernetes, ...) or takes --coordinator_address, --num_processes and
--process_id. Every process gets the same flags and --workdir (a shared filesystem).
"""
import sys

import jax
from absl import app
from absl import flags
from ml_collections import config_flags

from flare_jax.train import loop
from launch import runtime

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output dir (resumes if it has a checkpoint).',
                               required=True)
_MULTIHOST = flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize().')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 (multihost; default: auto-detect).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes (multihost).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process (multihost).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Too many command-line arguments: {argv[1:]}')
  if _MULTIHOST.value:
    # Only the CPU backend reads this (cross-process CPU collectives); GPUs use NCCL.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  c, workdir = _CONFIG.value, _WORKDIR.value
  runtime.enable_compilation_cache(c.train.compilation_cache, workdir)
  try:
    loop.train_and_evaluate(c, workdir)
  except loop.ConfigError as e:  # bad input: its message, not a traceback
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  runtime.run(main)
