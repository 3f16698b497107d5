"""FlareLM checkpoint -> HF `Qwen3_5ForCausalLM` layout (safetensors, config.json, tokenizer)."""
import json
import os
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from flare_jax.checkpoint import hf_mapping
from flare_jax.checkpoint import model_io
from flare_jax.model import config as config_lib

_DTYPES = {'bfloat16': ml_dtypes.bfloat16, 'float32': np.float32, 'float16': np.float16}


def hf_tensors(params: dict, cfg: config_lib.ModelConfig, dtype: str = 'bfloat16') -> dict:
  """Our params (pure dict) as HF-named numpy arrays (A_log and the GDN norm stay fp32)."""
  if dtype not in _DTYPES:
    raise ValueError(f'unknown export dtype {dtype!r}; known: {sorted(_DTYPES)}')
  out = {}
  for e in hf_mapping.entries(cfg):
    value = np.asarray(hf_mapping.get_path(params, e.path), np.float32)
    out[e.hf_name] = np.ascontiguousarray(
        e.transform.to_hf(value).astype(np.float32 if e.keep_fp32 else _DTYPES[dtype]))
  return out


def write_hf_dir(params: dict, cfg: config_lib.ModelConfig, directory: str,
                 dtype: str = 'bfloat16') -> None:
  """Writes model.safetensors + config.json into an existing directory."""
  save_file(hf_tensors(params, cfg, dtype), os.path.join(directory, 'model.safetensors'),
            metadata={'format': 'pt'})
  hf_config = config_lib.to_hf_text_config(cfg)
  hf_config['dtype'] = dtype
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(hf_config, f, indent=2)


def export_hf(source: Any, out_dir: str, *, dtype: str = 'bfloat16', overwrite: bool = False,
              tokenizer_dir: str | None = None, log: Callable[[str], None] = print) -> None:
  """Exports a model as a Hugging Face Qwen3.5 text model (`Qwen3_5ForCausalLM`), atomically.

  Args:
    source: a model checkpoint directory (see model_io), a FlareLM, or a `(params, cfg)` pair
      (params: pure dict or `nnx.State`).
    out_dir: output directory: model.safetensors, config.json, tokenizer files and the source
      checkpoint's training record (model_io.TRAINING_FILE, which the importer carries back).
    dtype: tensor dtype ('bfloat16', 'float32', 'float16'); A_log and the GDN norm stay fp32.
    overwrite: replace an existing non-empty `out_dir`.
    tokenizer_dir: where tokenizer files come from (default: the checkpoint directory, if any).
    log: progress sink.

  Raises:
    ValueError: unknown dtype, not a checkpoint, or an existing non-empty `out_dir`.
  """
  if dtype not in _DTYPES:
    raise ValueError(f'unknown export dtype {dtype!r}; known: {sorted(_DTYPES)}')
  record_dir = None
  if isinstance(source, (str, os.PathLike)):
    source = os.fspath(source)
    cfg, params = model_io.load_config(source), model_io.load_params(source)
    tokenizer_dir, record_dir = tokenizer_dir or source, source
  elif isinstance(source, tuple):
    params, cfg = model_io.params_of(source[0]), source[1]
  else:
    params, cfg = model_io.params_of(source), source.cfg
  with model_io.atomic_output_dir(out_dir, overwrite) as tmp:
    write_hf_dir(params, cfg, tmp, dtype)
    copied = model_io.copy_tokenizer_files(tokenizer_dir, tmp) if tokenizer_dir else []
    copied += model_io.copy_training_record(record_dir, tmp) if record_dir else []
  log(f'wrote {out_dir}: model.safetensors ({dtype}), config.json'
      + (f', {", ".join(copied)}' if copied else ''))
