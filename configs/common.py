"""Helpers shared by config files."""
import ml_collections as mlc


def parse_arg(arg: str | None, **defaults) -> mlc.ConfigDict:
  """Parses 'a=1,b=x,flag' config-file arguments into a ConfigDict typed after `defaults`.

  A bare name sets a bool default to True. Unknown names raise ValueError.
  """
  out = mlc.ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(','):
    if not item:
      continue
    key, _, value = item.partition('=')
    if key not in defaults:
      raise ValueError(f'unknown config argument {key!r}; known: {sorted(defaults)}')
    default = defaults[key]
    if isinstance(default, bool):
      out[key] = value.lower() in ('', '1', 'true', 'yes')
    elif isinstance(default, int):
      out[key] = int(value)
    elif isinstance(default, float):
      out[key] = float(value)
    else:
      out[key] = value
  return out
