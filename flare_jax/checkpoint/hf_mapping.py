"""The one map between Hugging Face Qwen3.5 tensor names and FlareLM parameter paths.

Each entry names an HF tensor, our parameter path (in `nnx.to_pure_dict` form) and the transform
between the two layouts; import and export both read this table.
"""
import dataclasses

import numpy as np

from flare_jax.model import config as config_lib

TEXT_PREFIX = 'model.'
WRAPPER_PREFIX = 'model.language_model.'
SKIPPED_PREFIXES = ('model.visual.', 'mtp.')  # vision tower and multi-token-prediction head


@dataclasses.dataclass(frozen=True)
class Transform:
  """HF array <-> our array."""

  name: str

  def to_ours(self, x: np.ndarray) -> np.ndarray:
    if self.name == 'transpose':  # [out, in] -> [in, out]
      return x.T
    if self.name == 'conv':  # depthwise conv1d [C, 1, Kc] -> taps [Kc, C]
      return x[:, 0, :].T
    return x

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    if self.name == 'transpose':
      return x.T
    if self.name == 'conv':
      return x.T[:, None, :]
    return x

  def hf_shape(self, ours: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(self.to_hf(np.empty(ours, np.uint8)).shape)


NONE, TRANSPOSE, CONV = Transform('none'), Transform('transpose'), Transform('conv')


@dataclasses.dataclass(frozen=True)
class Entry:
  hf_name: str
  path: tuple  # keys into the pure-dict param tree
  transform: Transform
  keep_fp32: bool = False  # stored fp32 in the real checkpoints (A_log, the GDN output norm)


_GDN = (('in_proj_qkv', TRANSPOSE), ('in_proj_z', TRANSPOSE), ('in_proj_b', TRANSPOSE),
        ('in_proj_a', TRANSPOSE), ('out_proj', TRANSPOSE))
_ATTN = (('q_proj', TRANSPOSE), ('k_proj', TRANSPOSE), ('v_proj', TRANSPOSE), ('o_proj', TRANSPOSE))


def entries(cfg: config_lib.ModelConfig, prefix: str = TEXT_PREFIX) -> list[Entry]:
  """Every parameter of a FlareLM with config `cfg`, in HF naming under `prefix`."""
  out = [Entry(f'{prefix}embed_tokens.weight', ('embed_tokens', 'embedding'), NONE),
         Entry(f'{prefix}norm.weight', ('norm', 'scale'), NONE)]
  if not cfg.tie_word_embeddings:
    out.append(Entry('lm_head.weight', ('lm_head', 'kernel'), TRANSPOSE))
  for i, layer_type in enumerate(cfg.layer_types):
    hf = f'{prefix}layers.{i}.'
    ours = ('layers', i)
    out += [Entry(f'{hf}input_layernorm.weight', ours + ('input_layernorm', 'scale'), NONE),
            Entry(f'{hf}post_attention_layernorm.weight',
                  ours + ('post_attention_layernorm', 'scale'), NONE)]
    out += [Entry(f'{hf}mlp.{n}.weight', ours + ('mlp', n, 'kernel'), TRANSPOSE)
            for n in ('gate_proj', 'up_proj', 'down_proj')]
    if layer_type == config_lib.FULL:
      a = ours + ('self_attn',)
      out += [Entry(f'{hf}self_attn.{n}.weight', a + (n, 'kernel'), t) for n, t in _ATTN]
      out += [Entry(f'{hf}self_attn.{n}.weight', a + (n, 'scale'), NONE)
              for n in ('q_norm', 'k_norm')]
    else:
      g = ours + ('linear_attn',)
      out += [Entry(f'{hf}linear_attn.{n}.weight', g + (n, 'kernel'), t) for n, t in _GDN]
      out += [Entry(f'{hf}linear_attn.conv1d.weight', g + ('conv_weight',), CONV),
              Entry(f'{hf}linear_attn.A_log', g + ('A_log',), NONE, keep_fp32=True),
              Entry(f'{hf}linear_attn.dt_bias', g + ('dt_bias',), NONE),
              Entry(f'{hf}linear_attn.norm.weight', g + ('norm', 'scale'), NONE, keep_fp32=True)]
  return out


def get_path(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def set_path(tree, path, value):
  for key in path[:-1]:
    tree = tree[key]
  tree[path[-1]] = value
