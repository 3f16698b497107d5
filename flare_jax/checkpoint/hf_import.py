"""Hugging Face Qwen3.5 safetensors -> FlareLM checkpoint, one tensor at a time.

Accepts the text-only layout (`Qwen3_5ForCausalLM`, keys `model.*`) and the multimodal wrapper
(`Qwen3_5ForConditionalGeneration`, keys `model.language_model.*`; vision and MTP tensors are
skipped and reported). Every parameter must be filled exactly once; every problem (missing,
unexpected, mis-shaped tensors) is reported in one error before anything is written.
"""
import collections
import json
import os
from collections.abc import Callable

import jax
import numpy as np
from safetensors import safe_open

from flare_jax.checkpoint import hf_mapping
from flare_jax.checkpoint import model_io
from flare_jax.model import config as config_lib
from flare_jax.sampling import training_record

SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'


def tensor_files(hf_dir: str) -> dict[str, str]:
  """Maps every tensor name to its safetensors file (single file or sharded with an index)."""
  index = os.path.join(hf_dir, INDEX_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)['weight_map']
    absent = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(hf_dir, f))})
    if absent:
      raise ValueError(f'{INDEX_FILE} in {hf_dir} names shards that are absent: {absent}')
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


def _check_mapping_covers(entries: list[hf_mapping.Entry], abstract: dict) -> None:
  """The name map must address every parameter leaf exactly once (hf_mapping vs the model)."""
  paths = [e.path for e in entries]
  leaves = {tuple(getattr(k, 'key', getattr(k, 'idx', None)) for k in p)
            for p, _ in jax.tree.leaves_with_path(abstract)}
  dup = sorted({p for p in paths if paths.count(p) > 1}, key=str)
  unmapped = sorted(leaves - set(paths), key=str)
  unknown = sorted(set(paths) - leaves, key=str)
  if dup or unmapped or unknown:
    raise ValueError(f'hf_mapping does not match FlareLM: duplicated {dup}, unmapped {unmapped}, '
                     f'unknown {unknown}')


def _same_tensor(files: dict[str, str], a: str, b: str) -> bool:
  with safe_open(files[a], framework='np') as fa, safe_open(files[b], framework='np') as fb:
    x, y = fa.get_tensor(a), fb.get_tensor(b)
    return x.shape == y.shape and bool(np.array_equal(x, y))


def plan_import(hf_dir: str, **config_overrides):
  """Validates a checkpoint against the model it describes, reading shapes (and, for a tied config
  that stores lm_head.weight too, that tensor and the embedding).

  The head is tied as transformers ties it: per the (text) config's `tie_word_embeddings`, but tied
  when `lm_head.weight` is absent and untied when it is present and differs from the embedding.

  Returns:
    (ModelConfig, list of hf_mapping.Entry, tensor files, skipped-group counts, notes to log).

  Raises:
    ValueError: unsupported architecture, or every missing / unexpected / mis-shaped tensor by name.
  """
  hf = read_hf_config(hf_dir)
  files = tensor_files(hf_dir)
  wrapper = any(n.startswith(hf_mapping.WRAPPER_PREFIX) for n in files)
  prefix = hf_mapping.WRAPPER_PREFIX if wrapper else hf_mapping.TEXT_PREFIX
  cfg = config_lib.from_hf_config(hf)
  notes = []
  embed = f'{prefix}embed_tokens.weight'
  if not cfg.tie_word_embeddings and 'lm_head.weight' not in files:
    cfg = cfg.replace(tie_word_embeddings=True)
    notes.append('config says untied but there is no lm_head.weight: tying the head to the '
                 'embedding (as transformers does)')
  elif (cfg.tie_word_embeddings and 'lm_head.weight' in files and embed in files
        and not _same_tensor(files, 'lm_head.weight', embed)):
    cfg = cfg.replace(tie_word_embeddings=False)
    notes.append('config says tied but lm_head.weight differs from the embedding: importing an '
                 'untied head (as transformers does)')
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
  abstract = model_io.abstract_params(cfg)
  _check_mapping_covers(entries, abstract)
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
  return cfg, entries, files, skipped, notes


def convert_hf_checkpoint(hf_dir: str, out_dir: str, *, mask_token_id: int | None = None,
                          overwrite: bool = False, log: Callable[[str], None] = print,
                          **config_overrides) -> config_lib.ModelConfig:
  """Converts a Hugging Face Qwen3.5 checkpoint into a FlareLM checkpoint at `out_dir`.

  Peak host memory is the output params plus one tensor. Nothing is written unless all checks pass.

  Args:
    hf_dir: config.json + model.safetensors (or shards + model.safetensors.index.json) + tokenizer.
    out_dir: the model checkpoint directory written (see model_io), atomically.
    mask_token_id: the reserved [MASK] id (default: the config's, else vocab_size - 1).
    overwrite: replace an existing non-empty `out_dir`.
    log: progress sink (a line per shard).
    **config_overrides: ModelConfig fields to set, e.g. dtype='float32', param_dtype='bfloat16'.

  Raises:
    ValueError: see `plan_import`; a mask_token_id the tokenizer can produce; an existing out_dir.
  """
  model_io.check_output_dir(out_dir, overwrite)  # before any conversion work
  if mask_token_id is not None:
    config_overrides['mask_token_id'] = mask_token_id
  cfg, entries, files, skipped, notes = plan_import(hf_dir, **config_overrides)
  mask = cfg.resolved_mask_token_id
  if mask in _tokenizer_ids(hf_dir):
    raise ValueError(f'mask_token_id {mask} is a token the checkpoint tokenizer produces; pick a '
                     f'reserved id (e.g. one past the tokenizer vocabulary) with --mask_token_id')
  n_full = sum(t == config_lib.FULL for t in cfg.layer_types)
  log(f'{hf_dir}: {len(entries)} tensors -> {cfg.num_layers} layers '
      f'({n_full} attention), hidden {cfg.hidden_size}, '
      f'vocab {cfg.vocab_size}, {"tied" if cfg.tie_word_embeddings else "untied"} head, '
      f'[MASK]={mask}')
  for note in notes:
    log(note)
  if skipped:
    log('skipped (not part of the text model): ' +
        ', '.join(f'{g}.* ({n} tensors)' for g, n in sorted(skipped.items())))
  abstract = model_io.abstract_params(cfg)
  params = jax.tree.map(lambda _: None, abstract)
  by_file = collections.defaultdict(list)
  for e in entries:
    by_file[files[e.hf_name]].append(e)
  for n, (path, group) in enumerate(sorted(by_file.items()), 1):
    log(f'  [{n}/{len(by_file)}] {os.path.basename(path)}: {len(group)} tensors')
    with safe_open(path, framework='np') as f:
      for e in group:
        target = hf_mapping.get_path(abstract, e.path)
        value = e.transform.to_ours(f.get_tensor(e.hf_name)).astype(target.dtype, copy=False)
        hf_mapping.set_path(params, e.path, np.ascontiguousarray(value))
  with model_io.atomic_output_dir(out_dir, overwrite) as tmp:
    model_io.write_params(params, cfg, tmp)
    copied = model_io.copy_tokenizer_files(hf_dir, tmp) + model_io.copy_training_record(hf_dir, tmp)
    if model_io.TRAINING_FILE not in copied:
      model_io.write_training_record(tmp, training_record.imported_record(hf_dir))
      copied.append(model_io.TRAINING_FILE)
  extra = f' + {", ".join(copied)}' if copied else ''
  log(f'wrote {out_dir} (params + {model_io.CONFIG_FILE}{extra})')
  return cfg
