"""Helpers shared by config files."""
import ml_collections as mlc

from configs import base


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


def hf_conversion(variant: str, arg: str | None) -> mlc.ConfigDict:
  """The FLARE conversion preset of a converted Qwen3.5 checkpoint of shapes VARIANTS[variant]
  (`configs/flare_{2b,4b,9b}.py`): bf16, block remat, T=4096, 32 rows, fsdp over every device.

  arg: 'objective=flare|ar,fsdp=N,tensor=N' (fsdp -1: all the devices tensor leaves).
  """
  arg = parse_arg(arg, objective='flare', fsdp=-1, tensor=1)
  c = base.get_config()
  c.model.variant = variant
  c.model.dtype = 'bfloat16'
  c.model.remat = 'block'
  c.objective.name = arg.objective
  c.data.tokenizer = ''  # the init checkpoint's tokenizer.json
  c.data.seq_len = 4096
  c.data.batch_size = 32
  c.optim.lr = 1e-5
  c.optim.warmup_steps = 50
  c.train.num_steps = 5000
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, arg.fsdp, arg.tensor
  return c
