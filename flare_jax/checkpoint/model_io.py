"""Save and load a model: orbax params + model_config.json (+ tokenizer files), written atomically.

Layout of a model checkpoint directory:
  model_config.json     ModelConfig fields (flare_jax.model.config)
  params/               orbax checkpoint of the parameters (pure dict, param dtype)
  tokenizer.json, ...   tokenizer files carried over from the source, if any
  flare_training.json   how the trainer trained it (objective, FLARE settings), if it did
"""
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from flax import nnx

from flare_jax.model import config as config_lib
from flare_jax.model import transformer

CONFIG_FILE = 'model_config.json'
# How the model was last trained (written by the trainer; `load_training`): the objective, and the
# FLARE settings its noisy passes learned, which decoding defaults to and checks against.
# The same file travels into and back from Hugging Face exports (transformers ignores it).
TRAINING_FILE = 'flare_training.json'
PARAMS_DIR = 'params'
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'chat_template.jinja', 'generation_config.json', 'vocab.json', 'merges.txt',
                   'added_tokens.json')


def _is_primary() -> bool:
  return jax.process_index() == 0


def _sync(name: str) -> None:
  """Barrier across processes (a no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def check_output_dir(out_dir: str, overwrite: bool) -> None:
  """Raises ValueError if `out_dir` exists, is not empty and overwrite is False."""
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
    raise ValueError(f'output directory {out_dir} exists and is not empty (overwrite=True, '
                     '--overwrite on the command line, replaces it)')


@contextlib.contextmanager
def atomic_output_dir(out_dir: str, overwrite: bool = False):
  """Yields a temporary directory beside `out_dir` that replaces it only if the block succeeds.

  With several processes (a shared filesystem), every process yields the same directory; process 0
  creates it and renames it once all processes are done, so collective writers (orbax) agree on
  paths.

  Raises:
    ValueError: `out_dir` exists, is not empty and overwrite is False.
  """
  check_output_dir(out_dir, overwrite)
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  prefix = '.' + os.path.basename(out_dir) + '.tmp-'
  if jax.process_count() > 1:
    tmp = os.path.join(parent, prefix + 'multiprocess')
    if _is_primary():
      shutil.rmtree(tmp, ignore_errors=True)
      os.makedirs(tmp)
    _sync(f'atomic_output_dir:create:{out_dir}')
  else:
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
  try:
    yield tmp
  except BaseException:
    if _is_primary():
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  _sync(f'atomic_output_dir:written:{out_dir}')
  if _is_primary():
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
  _sync(f'atomic_output_dir:renamed:{out_dir}')


def _copy_present(names: Iterable[str], src_dir: str, dst_dir: str) -> list[str]:
  """Copies those of `names` present in `src_dir` into `dst_dir`; returns their names."""
  copied = []
  for name in names:
    src = os.path.join(src_dir, name)
    if os.path.isfile(src):
      shutil.copy2(src, os.path.join(dst_dir, name))
      copied.append(name)
  return copied


def copy_tokenizer_files(src_dir: str, dst_dir: str) -> list[str]:
  """Copies the tokenizer / generation files present in `src_dir`; returns their names."""
  return _copy_present(TOKENIZER_FILES, src_dir, dst_dir)


def write_params(params: dict, cfg: config_lib.ModelConfig, directory: str) -> None:
  """Writes params (pure dict) and the config into an existing (temporary) directory.

  Collective with several processes: all of them call it (orbax writes each process's shards).
  """
  if _is_primary():
    cfg.save(os.path.join(directory, CONFIG_FILE))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, PARAMS_DIR), params)
    ckptr.wait_until_finished()


def params_of(model_or_params: Any) -> dict:
  """The parameters of a FlareLM, an `nnx.State` or a pure dict, as a pure dict."""
  if isinstance(model_or_params, nnx.Module):
    return nnx.to_pure_dict(nnx.state(model_or_params, nnx.Param))
  if isinstance(model_or_params, nnx.State):
    return nnx.to_pure_dict(model_or_params)
  if isinstance(model_or_params, Mapping):
    return dict(model_or_params)
  raise TypeError(f'expected a FlareLM, nnx.State or dict of params, got {type(model_or_params)}')


def save_model(model_or_params: Any, out_dir: str, *, cfg: config_lib.ModelConfig | None = None,
               tokenizer_dir: str | None = None, extra_files: Iterable[str] = (),
               training: Mapping[str, Any] | None = None, overwrite: bool = False) -> None:
  """Saves params + config (+ tokenizer files from `tokenizer_dir`, + `extra_files`, + the
  `training` record as TRAINING_FILE) atomically.

  Args:
    model_or_params: a FlareLM, or its param `nnx.State` / pure dict (then `cfg` is required).
    out_dir: the checkpoint directory; replaced only when everything was written.
    cfg: the model config (defaults to `model.cfg`).
    tokenizer_dir: a directory whose tokenizer files (TOKENIZER_FILES) are copied.
    extra_files: further files copied into `out_dir` under their base names.
    training: how the model was trained (JSON-serialisable; see `load_training`).
    overwrite: replace an existing non-empty `out_dir`.

  Raises:
    ValueError: no config, a missing extra file, or an existing non-empty `out_dir`.
  """
  cfg = cfg if cfg is not None else getattr(model_or_params, 'cfg', None)
  if cfg is None:
    raise ValueError('save_model needs cfg= when given params rather than a FlareLM')
  extra_files = list(extra_files)
  missing = [f for f in extra_files if not os.path.isfile(f)]
  if missing:
    raise ValueError(f'extra files not found: {missing}')
  params = params_of(model_or_params)
  with atomic_output_dir(out_dir, overwrite) as tmp:
    write_params(params, cfg, tmp)
    if _is_primary():
      if tokenizer_dir:
        copy_tokenizer_files(tokenizer_dir, tmp)
      for f in extra_files:
        shutil.copy2(f, os.path.join(tmp, os.path.basename(f)))
      if training is not None:
        write_training_record(tmp, training)


def write_training_record(directory: str, record: Mapping[str, Any]) -> None:
  """Writes `record` (JSON-serialisable; see `load_training`) as directory's TRAINING_FILE."""
  with open(os.path.join(directory, TRAINING_FILE), 'w') as f:
    json.dump(dict(record), f, indent=1)


def copy_training_record(src_dir: str, dst_dir: str) -> list[str]:
  """Copies src_dir's TRAINING_FILE, if any, into dst_dir; returns the names copied."""
  return _copy_present((TRAINING_FILE,), src_dir, dst_dir)


def load_training(ckpt_dir: str) -> dict | None:
  """The checkpoint's training record, or None when it has none (a converted Hugging Face
  checkpoint, or one saved before records were kept)."""
  path = os.path.join(ckpt_dir, TRAINING_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def load_config(ckpt_dir: str) -> config_lib.ModelConfig:
  """The ModelConfig stored in a model checkpoint directory."""
  if not os.path.isdir(ckpt_dir):
    raise ValueError(f'{ckpt_dir}: no such directory')
  path = os.path.join(ckpt_dir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise ValueError(f'{ckpt_dir} is not a model checkpoint: no {CONFIG_FILE} '
                     f'({_what_it_is(ckpt_dir)})')
  return config_lib.ModelConfig.load(path)


def _what_it_is(path: str) -> str:
  """A hint for a directory that is not a model checkpoint: a training workdir (finished or not)
  or a Hugging Face checkpoint, else how checkpoints are made."""
  if os.path.isfile(os.path.join(path, 'model', CONFIG_FILE)):
    return f'a training workdir: its model is {os.path.join(path, "model")}'
  if os.path.isdir(os.path.join(path, 'ckpt')):
    return ('a training workdir whose run has not finished: the model is exported to '
            f'{os.path.join(path, "model")} at the end')
  if os.path.isfile(os.path.join(path, 'config.json')) and any(
      f.endswith('.safetensors') for f in os.listdir(path)):
    return (f'a Hugging Face checkpoint? convert it first: python -m launch.convert_hf '
            f'--hf_dir={path} --out=DIR')
  return 'convert Hugging Face weights with python -m launch.convert_hf, or train one'


def abstract_params(cfg: config_lib.ModelConfig) -> dict:
  """ShapeDtypeStructs of a FlareLM's params (pure dict), without allocating them."""
  model = nnx.eval_shape(lambda: transformer.FlareLM(cfg, rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _check_same_shapes(saved: dict, wanted: dict) -> None:
  diffs = []
  for (path, a), (_, b) in zip(jax.tree.leaves_with_path(saved), jax.tree.leaves_with_path(wanted)):
    if a.shape != b.shape:
      diffs.append(f'{jax.tree_util.keystr(path)}: stored {a.shape}, requested {b.shape}')
  if jax.tree.structure(saved) != jax.tree.structure(wanted):
    diffs.append('different parameter trees')
  if diffs:
    raise ValueError('config overrides change parameter shapes: ' + '; '.join(diffs))


def load_params(ckpt_dir: str, param_shardings: Any = None, *,
                cfg: config_lib.ModelConfig | None = None) -> dict:
  """Restores params (pure dict) straight onto their shardings, never via a full host copy.

  Args:
    ckpt_dir: a model checkpoint directory.
    param_shardings: a pure dict of `jax.sharding.Sharding` matching the params, one Sharding for
      every leaf, or None (the default device).
    cfg: the config to restore for (default: the stored one); it may change dtypes (arrays are cast
      to its `param_dtype`) but not shapes.

  Raises:
    ValueError: not a checkpoint, or `cfg` changes parameter shapes.
  """
  stored = load_config(ckpt_dir)
  abstract = abstract_params(stored if cfg is None else cfg)
  if cfg is not None:
    _check_same_shapes(abstract_params(stored), abstract)
  if param_shardings is None:
    param_shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  if isinstance(param_shardings, jax.sharding.Sharding):
    param_shardings = jax.tree.map(lambda _, s=param_shardings: s, abstract)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, param_shardings)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.join(os.path.abspath(ckpt_dir), PARAMS_DIR), target)


def load_model(ckpt_dir: str, *, overrides: Mapping[str, Any] | None = None,
               shardings: Any = None, **config_overrides) -> transformer.FlareLM:
  """A FlareLM with the checkpoint's params, built on the abstract model (no random init).

  Args:
    ckpt_dir: a model checkpoint directory.
    overrides: ModelConfig fields to change (numerics such as dtype / param_dtype / kernel choices;
      not shapes). Keyword arguments are merged into it (`load_model(d, dtype='float32')`).
    shardings: as `load_params`' `param_shardings`.
  """
  overrides = {**(overrides or {}), **config_overrides}
  cfg = load_config(ckpt_dir).replace(**overrides)
  model = nnx.eval_shape(lambda: transformer.FlareLM(cfg, rngs=nnx.Rngs(0)))
  params = load_params(ckpt_dir, shardings, cfg=cfg)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  return model

