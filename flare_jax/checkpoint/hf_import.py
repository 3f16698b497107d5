"""Hugging Face Qwen3.5 safetensors -> FlareLM checkpoint, one tensor at a time.

Accepts the text-only layout (`Qwen3_5ForCausalLM`, keys `model.*`) and the multimodal wrapper
(`Qwen3_5ForConditionalGeneration`, keys `model.language_model.*`; vision and MTP tensors are skipped and
reported). Every parameter must be filled exactly once; every problem (missing, unexpected, mis-shaped
tensors) is reported in one error before anything is written.
"""
import collections
import json
import os
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open

from flare_jax.checkpoint import hf_mapping
from flare_jax.checkpoint import model_io
from flare_jax.model import config as config_lib
from flare_jax.model import transformer

SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'


def tensor_files(hf_dir: str) -> dict[str, str]:
  """Maps every tensor name to its safetensors file (single file or sharded with an index)."""
  index = os.path.join(hf_dir, INDEX_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)['weight_map']
    return {name: os.path.join(hf_dir, fname) for name, fname in weight_map.items()}
  single = os.path.join(hf_dir, SINGLE_FILE)
  if not os.path.isfile(single):
    raise ValueError(f'{hf_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}')
  with safe_open(single, framework='np') as f:
    return {name: single for name in f.keys()}


def read_hf_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, 'config.json')
  if not os.path.isfile(path):
    raise ValueError(f'{hf_dir} has no config.json')
  with open(path) as f:
    return json.load(f)


def _tokenizer_ids(hf_dir: str) -> set[int]:
  """Ids the checkpoint's tokenizer can produce (vocab + added tokens), if tokenizer.json exists."""
  path = os.path.join(hf_dir, 'tokenizer.json')
  if not os.path.isfile(path):
    return set()
  with open(path) as f:
    tok = json.load(f)
  ids = set()
  vocab = (tok.get('model') or {}).get('vocab')
  if isinstance(vocab, dict):
    ids.update(int(i) for i in vocab.values())
  elif isinstance(vocab, list):
    ids.update(range(len(vocab)))
  ids.update(int(t['id']) for t in tok.get('added_tokens', []))
  return ids


def _shapes(files: dict[str, str]) -> dict[str, tuple[int, ...]]:
  by_file = collections.defaultdict(list)
  for name, path in files.items():
    by_file[path].append(name)
  shapes = {}
  for path, names in by_file.items():
    with safe_open(path, framework='np') as f:
      for name in names:
        shapes[name] = tuple(f.get_slice(name).get_shape())
  return shapes


def plan_import(hf_dir: str, **config_overrides):
  """Validates a checkpoint against the model it describes, reading shapes only.

  Returns:
    (ModelConfig, list of hf_mapping.Entry, tensor files, skipped-group counts).

  Raises:
    ValueError: unsupported architecture, or every missing / unexpected / mis-shaped tensor by name.
  """
  hf = read_hf_config(hf_dir)
  files = tensor_files(hf_dir)
  wrapper = any(n.startswith(hf_mapping.WRAPPER_PREFIX) for n in files)
  prefix = hf_mapping.WRAPPER_PREFIX if wrapper else hf_mapping.TEXT_PREFIX
  cfg = config_lib.from_hf_config(hf)
  if not cfg.tie_word_embeddings and 'lm_head.weight' not in files:
    cfg = cfg.replace(tie_word_embeddings=True)  # what transformers does for a head-less checkpoint
  cfg = cfg.replace(**config_overrides)
  entries = hf_mapping.entries(cfg, prefix)
  expected = {e.hf_name: e for e in entries}
  skipped = collections.Counter()
  unexpected = []
  for name in files:
    group = next((p for p in hf_mapping.SKIPPED_PREFIXES if name.startswith(p)), None)
    if group:
      skipped[group.rstrip('.')] += 1
    elif name not in expected and not (cfg.tie_word_embeddings and name == 'lm_head.weight'):
      unexpected.append(name)
  missing = [n for n in expected if n not in files]
  shapes = _shapes({n: files[n] for n in expected if n in files})
  abstract = nnx.to_pure_dict(nnx.state(
      nnx.eval_shape(lambda: transformer.FlareLM(cfg, rngs=nnx.Rngs(0))), nnx.Param))
  misshaped = []
  for name, shape in shapes.items():
    e = expected[name]
    want = e.transform.hf_shape(hf_mapping.get_path(abstract, e.path).shape)
    if shape != want:
      misshaped.append(f'{name}: {shape}, expected {want}')
  problems = []
  if missing:
    problems.append(f'missing tensors ({len(missing)}): {", ".join(missing)}')
  if unexpected:
    problems.append(f'unexpected tensors ({len(unexpected)}): {", ".join(unexpected)}')
  if misshaped:
    problems.append(f'mis-shaped tensors ({len(misshaped)}): {"; ".join(misshaped)}')
  if problems:
    raise ValueError(f'cannot import {hf_dir}: ' + ' | '.join(problems))
  return cfg, entries, files, skipped


def convert_hf_checkpoint(hf_dir: str, out_dir: str, *, mask_token_id: int | None = None,
                          overwrite: bool = False, log: Callable[[str], None] = print,
                          **config_overrides) -> config_lib.ModelConfig:
  """Converts a Hugging Face Qwen3.5 checkpoint into a FlareLM checkpoint at `out_dir`.

  Peak host memory is the output params plus one tensor. Nothing is written unless everything checks.

  Raises:
    ValueError: see `plan_import`; a mask_token_id the tokenizer can produce; an existing out_dir.
  """
  if mask_token_id is not None:
    config_overrides['mask_token_id'] = mask_token_id
  cfg, entries, files, skipped = plan_import(hf_dir, **config_overrides)
  mask = cfg.resolved_mask_token_id
  if mask in _tokenizer_ids(hf_dir):
    raise ValueError(f'mask_token_id {mask} is a token the checkpoint tokenizer produces; pick a '
                     f'reserved id (e.g. one past the tokenizer vocabulary) with --mask_token_id')
  log(f'{hf_dir}: {len(entries)} tensors -> {cfg.num_layers} layers '
      f'({sum(t == config_lib.FULL for t in cfg.layer_types)} attention), hidden {cfg.hidden_size}, '
      f'vocab {cfg.vocab_size}, {"tied" if cfg.tie_word_embeddings else "untied"} head, '
      f'[MASK]={mask}')
  if skipped:
    log('skipped (not part of the text model): ' +
        ', '.join(f'{g}.* ({n} tensors)' for g, n in sorted(skipped.items())))
  abstract = nnx.to_pure_dict(nnx.state(
      nnx.eval_shape(lambda: transformer.FlareLM(cfg, rngs=nnx.Rngs(0))), nnx.Param))
  params = jax.tree.map(lambda _: None, abstract)
  by_file = collections.defaultdict(list)
  for e in entries:
    by_file[files[e.hf_name]].append(e)
  for n, (path, group) in enumerate(sorted(by_file.items()), 1):
    log(f'  [{n}/{len(by_file)}] {os.path.basename(path)}: {len(group)} tensors')
    with safe_open(path, framework='np') as f:
      for e in group:
        target = hf_mapping.get_path(abstract, e.path)
        value = e.transform.to_ours(f.get_tensor(e.hf_name)).astype(target.dtype)
        hf_mapping.set_path(params, e.path, np.ascontiguousarray(value))
  with model_io.atomic_output_dir(out_dir, overwrite) as tmp:
    model_io.write_params(params, cfg, tmp)
    copied = model_io.copy_tokenizer_files(hf_dir, tmp)
  log(f'wrote {out_dir} (params + {model_io.CONFIG_FILE}'
      + (f' + {", ".join(copied)})' if copied else ')'))
  return cfg
