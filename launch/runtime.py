"""Process-wide JAX settings shared by the entry points."""
import os

import jax


def enable_compilation_cache(setting: str, workdir: str) -> None:
  """JAX's persistent compilation cache: '' (off) | 'workdir' (workdir/xla_cache) | a directory.

  Process-wide; call before the first compile. A restarted run then reuses its executables.
  """
  if setting:
    jax.config.update('jax_compilation_cache_dir',
                      os.path.join(workdir, 'xla_cache') if setting == 'workdir' else setting)
