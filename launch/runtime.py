"""Process-wide JAX settings shared by the entry points."""
import os
import re
import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags


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
  app.run(quiet_main, flags_parser=parse_flags)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (`app.parse_flags_with_usage`), with two more usage errors.

  ml_collections reports an override of a config field that does not exist
  (`--config.optim.lrr=1`) as a KeyError or AttributeError traceback from inside absl's parser,
  and a config file that does not load only when the config is first read, as a traceback from
  the entry point. Both are reported here as absl reports a bad flag: one line naming the
  argument (with ml_collections' "did you mean" where it has one), and exit status 1.
  """
  try:
    argv = app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    if not _raised_by_config_dict(e):
      raise
    while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(...))
      e = e.args[0]
    missing, _, hint = (str(e.args[0]) if e.args else '').partition('\n')
    field = missing.strip('\'"')
    culprits = [a for a in argv[1:] if re.search(rf'\.{re.escape(field)}(?=[.=]|$)', a)]
    _usage_error(f'{culprits[0] + ": " if culprits else ""}no config field {field!r}'
                 f'{f" ({hint})" if hint else ""}')
  for name in flags.FLAGS:
    flag = flags.FLAGS[name]
    if config_flags.config_flags.is_config_flag(flag):
      try:
        getattr(flag.value, 'keys', None)  # a config that failed to load raises on any read
      except OSError as e:  # the file did not load: its last line says why
        cause = str(e.__cause__ or e).strip().splitlines()[-1].strip()
        _usage_error(f'--{name}={config_flags.get_config_filename(flag)}: {cause}')
  return argv


def _usage_error(message: str) -> None:
  """Exits as `app.parse_flags_with_usage` does on a bad flag."""
  sys.stderr.write(f'FATAL Flags parsing error: {message}\n'
                   'Pass --helpshort or --helpfull to see help on flags.\n')
  sys.exit(1)


def _raised_by_config_dict(error: BaseException) -> bool:
  """Whether the innermost frame of `error`'s traceback is in ml_collections' ConfigDict."""
  tb = error.__traceback__
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return tb is not None and 'ml_collections' in tb.tb_frame.f_code.co_filename
