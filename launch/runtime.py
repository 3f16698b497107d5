"""Process-wide JAX settings shared by the entry points."""
import os

import jax
from absl import app
from absl import flags
from absl import logging


def enable_compilation_cache(setting: str, workdir: str) -> None:
  """JAX's persistent compilation cache: '' (off) | 'workdir' (workdir/xla_cache) | a directory.

  Process-wide; call before the first compile. A restarted run then reuses its executables.
  """
  if setting:
    jax.config.update('jax_compilation_cache_dir',
                      os.path.join(workdir, 'xla_cache') if setting == 'workdir' else setting)


def run(main) -> None:
  """`app.run(main)` showing warnings and errors only, unless `--verbosity` / `-v` is given.

  Our entry points print their own progress; at absl's default (INFO) the terminal would also get
  every library's INFO lines (orbax logs ~20 per checkpoint) and a second copy of each progress
  line. `--verbosity=0` brings them back.
  """
  def quiet_main(argv):
    if not flags.FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)
    return main(argv)
  app.run(quiet_main)
