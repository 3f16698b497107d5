"""Save and load a model: orbax params + model_config.json (+ tokenizer files), written atomically.

Layout of a model checkpoint directory:
  model_config.json     ModelConfig fields (flare_jax.model.config)
  params/               orbax checkpoint of the parameters (pure dict, param dtype)
  tokenizer.json, ...   tokenizer files carried over from the source, if any
"""
import contextlib
import os
import shutil
import tempfile

import jax
import orbax.checkpoint as ocp
from flax import nnx

from flare_jax.model import config as config_lib
from flare_jax.model import transformer

CONFIG_FILE = 'model_config.json'
PARAMS_DIR = 'params'
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'chat_template.jinja', 'generation_config.json', 'vocab.json', 'merges.txt',
                   'added_tokens.json')


@contextlib.contextmanager
def atomic_output_dir(out_dir: str, overwrite: bool = False):
  """Yields a temporary directory beside `out_dir` that replaces it only if the block succeeds.

  Raises:
    ValueError: `out_dir` exists, is not empty and overwrite is False.
  """
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
    raise ValueError(f'output directory {out_dir} exists and is not empty (pass overwrite)')
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.' + os.path.basename(out_dir) + '.tmp-', dir=parent)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.exists(out_dir):
    shutil.rmtree(out_dir)
  os.rename(tmp, out_dir)


def copy_tokenizer_files(src_dir: str, dst_dir: str) -> list[str]:
  copied = []
  for name in TOKENIZER_FILES:
    src = os.path.join(src_dir, name)
    if os.path.isfile(src):
      shutil.copy2(src, os.path.join(dst_dir, name))
      copied.append(name)
  return copied


def write_params(params: dict, cfg: config_lib.ModelConfig, directory: str) -> None:
  """Writes params (pure dict) and the config into an existing (temporary) directory."""
  cfg.save(os.path.join(directory, CONFIG_FILE))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, PARAMS_DIR), params)
    ckptr.wait_until_finished()


def save_model(model: transformer.FlareLM, out_dir: str, *, tokenizer_dir: str | None = None,
               overwrite: bool = False) -> None:
  """Saves a model's params + config (+ tokenizer files from `tokenizer_dir`) atomically."""
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  with atomic_output_dir(out_dir, overwrite) as tmp:
    write_params(params, model.cfg, tmp)
    if tokenizer_dir:
      copy_tokenizer_files(tokenizer_dir, tmp)


def load_config(ckpt_dir: str) -> config_lib.ModelConfig:
  path = os.path.join(ckpt_dir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise ValueError(f'{ckpt_dir} is not a model checkpoint: no {CONFIG_FILE} '
                     '(convert Hugging Face weights with python -m launch.convert_hf)')
  return config_lib.ModelConfig.load(path)


def _abstract_params(cfg: config_lib.ModelConfig) -> dict:
  model = nnx.eval_shape(lambda: transformer.FlareLM(cfg, rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def load_params(ckpt_dir: str, param_shardings: dict | None = None) -> dict:
  """Restores params (pure dict) straight onto `param_shardings` (a matching pure dict of shardings),
  or onto the default device."""
  cfg = load_config(ckpt_dir)
  abstract = _abstract_params(cfg)
  if param_shardings is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    param_shardings = jax.tree.map(lambda _: sharding, abstract)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, param_shardings)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.join(os.path.abspath(ckpt_dir), PARAMS_DIR), target)


def load_model(ckpt_dir: str, **config_overrides) -> transformer.FlareLM:
  """A FlareLM with the checkpoint's params; `config_overrides` may change numerics (e.g. dtype), not
  shapes."""
  cfg = load_config(ckpt_dir).replace(**config_overrides)
  model = nnx.eval_shape(lambda: transformer.FlareLM(cfg, rngs=nnx.Rngs(0)))
  params = load_params(ckpt_dir)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  return model
