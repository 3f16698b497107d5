"""Builders of small Hugging Face-layout Qwen3.5 checkpoints for tests and demos.

`write_hf_checkpoint` needs only numpy/safetensors (layouts, shards, extra tensors). The
`transformers_*` builders make real `transformers` models and import torch when called.
"""
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from flare_jax.checkpoint import hf_export
from flare_jax.checkpoint import hf_mapping
from flare_jax.model import config as config_lib
from flare_jax.model import transformer

LINEAR, FULL = config_lib.LINEAR, config_lib.FULL


def random_params(cfg: config_lib.ModelConfig, seed: int = 0) -> dict:
  """A freshly initialised FlareLM's params as a pure dict of numpy arrays."""
  model = transformer.FlareLM(cfg, rngs=nnx.Rngs(seed))
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def write_hf_checkpoint(directory: str, cfg: config_lib.ModelConfig, params: dict | None = None, *,
                        dtype: str = 'float32', wrapper: bool = False, num_shards: int = 1,
                        extra_tensors: Mapping[str, np.ndarray] | None = None,
                        drop: Sequence[str] = (), seed: int = 0) -> dict:
  """Writes an HF-layout checkpoint of `params` (random if None) into `directory`; returns params.

  Args:
    directory: created if absent.
    cfg: the model config.
    params: pure-dict params of a FlareLM with `cfg`.
    dtype: tensor dtype (A_log and the GDN norm stay fp32).
    wrapper: multimodal layout (`Qwen3_5ForConditionalGeneration`: keys `model.language_model.*`,
      config under "text_config").
    num_shards: >1 writes `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`.
    extra_tensors: added as is (e.g. `model.visual.*`, `mtp.*`, or stray names).
    drop: HF names (after the prefix change) left out.
    seed: init seed when `params` is None.
  """
  os.makedirs(directory, exist_ok=True)
  params = random_params(cfg, seed) if params is None else params
  tensors = hf_export.hf_tensors(params, cfg, dtype)
  if wrapper:
    tensors = {(hf_mapping.WRAPPER_PREFIX + k[len(hf_mapping.TEXT_PREFIX):]
                if k.startswith(hf_mapping.TEXT_PREFIX) else k): v for k, v in tensors.items()}
  tensors.update(extra_tensors or {})
  for name in drop:
    del tensors[name]
  names = sorted(tensors)
  if num_shards == 1:
    save_file(tensors, os.path.join(directory, 'model.safetensors'), metadata={'format': 'pt'})
  else:
    weight_map = {}
    for k in range(num_shards):
      fname = f'model-{k + 1:05d}-of-{num_shards:05d}.safetensors'
      shard = {n: tensors[n] for n in names[k::num_shards]}
      save_file(shard, os.path.join(directory, fname), metadata={'format': 'pt'})
      weight_map.update({n: fname for n in shard})
    with open(os.path.join(directory, 'model.safetensors.index.json'), 'w') as f:
      json.dump({'metadata': {}, 'weight_map': weight_map}, f, indent=2)
  hf_config = config_lib.to_hf_text_config(cfg)
  hf_config['dtype'] = dtype
  if wrapper:
    text = dict(hf_config, model_type='qwen3_5_text')
    del text['architectures'], text['flare']
    hf_config = {'architectures': ['Qwen3_5ForConditionalGeneration'], 'model_type': 'qwen3_5',
                 'text_config': text, 'tie_word_embeddings': cfg.tie_word_embeddings,
                 'flare': hf_config['flare']}
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(hf_config, f, indent=2)
  return params


def transformers_text_config(layer_types: Sequence[str], *, tie: bool, vocab: int = 256,
                             hidden: int = 64, intermediate: int = 96, heads: int = 4,
                             kv_heads: int = 2, head_dim: int = 16, nk: int = 2, nv: int = 4,
                             dk: int = 16, dv: int = 24) -> dict[str, Any]:
  """Keyword arguments of a tiny `transformers.Qwen3_5TextConfig`."""
  return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
              num_hidden_layers=len(layer_types), layer_types=list(layer_types),
              num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
              linear_num_key_heads=nk, linear_num_value_heads=nv, linear_key_head_dim=dk,
              linear_value_head_dim=dv, linear_conv_kernel_dim=4, tie_word_embeddings=tie,
              rope_parameters=dict(rope_type='default', rope_theta=1e7, partial_rotary_factor=0.25,
                                   mrope_section=[1, 1, 0], mrope_interleaved=True),
              rms_norm_eps=1e-6)


TINY_VISION_CONFIG = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2,
                          out_hidden_size=64, patch_size=2, temporal_patch_size=1,
                          spatial_merge_size=1, num_position_embeddings=16)


def _perturb(model, seed: int) -> None:
  """HF inits norms at 0/1 and A_log deterministically: perturb every weight so each one matters."""
  import torch  # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=g))


def transformers_model(text_config: Mapping[str, Any], *, multimodal: bool = False,
                       seed: int = 0, save_to: str | None = None):
  """A random fp32 `Qwen3_5ForCausalLM` (or `Qwen3_5ForConditionalGeneration` with a tiny vision
  tower), in eval mode, optionally `save_pretrained` to `save_to`. Imports torch/transformers."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  if multimodal:
    hf_cfg = transformers.Qwen3_5Config(text_config=dict(text_config),
                                        vision_config=TINY_VISION_CONFIG)
    model = transformers.Qwen3_5ForConditionalGeneration(hf_cfg)
  else:
    model = transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(**text_config))
  model = model.float().eval()
  _perturb(model, seed)
  if save_to is not None:
    model.save_pretrained(save_to)
  return model


def transformers_logits(model, tokens: np.ndarray) -> np.ndarray:
  """fp32 logits [B, T, V] of a transformers model on int tokens [B, T]."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    return model(input_ids=ids).logits.float().numpy()
