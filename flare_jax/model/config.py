"""ModelConfig: the frozen, hashable description of a Qwen3.5-style hybrid model.

Field names follow the Hugging Face `Qwen3_5TextConfig` so `from_hf_config` is a plain mapping.
Model sizes are data (`VARIANTS`), not classes.
"""
import dataclasses
import json
from typing import Any

from pallas_kernels import add_rms_norm
from pallas_kernels.attention import api as attn_api
from pallas_kernels.gated_delta_rule import api as gdr_api

LINEAR = 'linear_attention'  # Gated DeltaNet layer (HF's name)
FULL = 'full_attention'  # gated softmax attention layer
_LAYER_TYPES = (LINEAR, FULL)
_DTYPES = ('float32', 'bfloat16', 'float16')
GDN_CONV_BACKWARDS = ('autodiff', 'manual')  # gated_deltanet.two_stream_conv_silu


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes, numerics and kernel choices of a FlareLM.

  `mask_token_id` is the reserved [MASK] id used by the diffusion stream; None means the last row of
  the embedding table (`vocab_size - 1`), which real Qwen3.5 tokenizers never produce (the table is
  padded).
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  layer_types: tuple[str, ...]
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  linear_num_key_heads: int
  linear_num_value_heads: int
  linear_key_head_dim: int
  linear_value_head_dim: int
  linear_conv_kernel_dim: int = 4
  partial_rotary_factor: float = 0.25
  rope_theta: float = 10_000_000.0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = True
  mask_token_id: int | None = None
  eos_token_id: int | None = None
  dtype: str = 'bfloat16'  # compute dtype of matmuls/activations
  param_dtype: str = 'float32'  # master weights
  gdn_impl: str | None = None  # None | 'xla' | 'pallas' | 'triton' (None: best for the backend)
  # Cached GDN passes of <= 16 tokens (decode, verify, rollback replay, noisy blocks), conv to
  # recurrence (gdr.fused_decode): None | 'xla' | 'pallas' (None: pallas on GPU, xla elsewhere)
  gdn_decode_impl: str | None = None
  attn_impl: str | None = None  # None | 'xla' | 'pallas' (None: pallas on GPU, xla elsewhere)
  # Cached attention calls of few queries (attn_ops.cache_attention): None | 'xla' | 'pallas'
  # (None: the decode kernel on GPU, xla elsewhere)
  attn_decode_impl: str | None = None
  # Cached passes' residual adds, each with the RMSNorm that reads its sum (add_rms_norm):
  # None | 'xla' | 'pallas' (None: xla; 'pallas' measured slower in the decode step)
  norm_impl: str | None = None
  # Backward of the two-stream short conv + SiLU (gated_deltanet.two_stream_conv_silu).
  gdn_conv_backward: str = 'manual'  # GDN_CONV_BACKWARDS
  gdn_chunk_size: int = 64
  attn_q_tile: int = 512  # query tile of the XLA attention path (memory O(tile x keys))
  remat: str = 'none'  # 'none' | 'block' (rematerialise each block in the backward)
  # Uncached passes scan over repeats of the layer pattern (one traced and compiled group body
  # instead of every layer); the params stay per layer and are stacked inside the step.
  scan_layers: bool = False

  def __post_init__(self):
    problems = []
    for t in self.layer_types:
      if t not in _LAYER_TYPES:
        problems.append(f'layer type {t!r} (known: {_LAYER_TYPES})')
    if not self.layer_types:
      problems.append('layer_types is empty')
    if self.num_attention_heads % self.num_key_value_heads:
      problems.append(f'{self.num_attention_heads=} not a multiple of {self.num_key_value_heads=}')
    if self.linear_num_value_heads % self.linear_num_key_heads:
      problems.append(
          f'{self.linear_num_value_heads=} not a multiple of {self.linear_num_key_heads=}')
    if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
      problems.append(f'rotary dim {self.rotary_dim} (head_dim {self.head_dim}, '
                      f'partial_rotary_factor {self.partial_rotary_factor}) must be even '
                      'and <= head_dim')
    if not 0 <= self.resolved_mask_token_id < self.vocab_size:
      problems.append(f'mask_token_id {self.mask_token_id} outside [0, {self.vocab_size})')
    for name in ('dtype', 'param_dtype'):
      if getattr(self, name) not in _DTYPES:
        problems.append(f'{name}={getattr(self, name)!r} (known: {_DTYPES})')
    if self.gdn_conv_backward not in GDN_CONV_BACKWARDS:
      problems.append(f'gdn_conv_backward={self.gdn_conv_backward!r} (known: {GDN_CONV_BACKWARDS})')
    for name, known in (('gdn_impl', gdr_api.IMPLEMENTATIONS),
                        ('gdn_decode_impl', gdr_api.DECODE_IMPLEMENTATIONS),
                        ('attn_impl', attn_api.IMPLEMENTATIONS),
                        ('attn_decode_impl', attn_api.DECODE_IMPLEMENTATIONS),
                        ('norm_impl', add_rms_norm.IMPLEMENTATIONS)):
      if getattr(self, name) not in (None, *known):
        problems.append(f'{name}={getattr(self, name)!r} (known: None, {", ".join(known)})')
    if self.remat not in ('none', 'block'):
      problems.append(f"remat={self.remat!r} (known: 'none', 'block')")
    if problems:
      raise ValueError('invalid ModelConfig: ' + '; '.join(problems))

  @property
  def num_layers(self) -> int:
    return len(self.layer_types)

  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.partial_rotary_factor)

  @property
  def resolved_mask_token_id(self) -> int:
    return self.vocab_size - 1 if self.mask_token_id is None else self.mask_token_id

  @property
  def linear_conv_dim(self) -> int:
    """Channels of the GDN short conv: q|k|v = 2*NK*DK + NV*DV."""
    return (2 * self.linear_num_key_heads * self.linear_key_head_dim
            + self.linear_num_value_heads * self.linear_value_head_dim)

  def replace(self, **changes: Any) -> 'ModelConfig':
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d['layer_types'] = list(self.layer_types)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'ModelConfig':
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f'unknown ModelConfig fields: {unknown}')
    d = dict(d)
    d['layer_types'] = tuple(d['layer_types'])
    return cls(**d)

  def save(self, path: str) -> None:
    with open(path, 'w') as f:
      json.dump(self.to_dict(), f, indent=2, sort_keys=True)

  @classmethod
  def load(cls, path: str) -> 'ModelConfig':
    with open(path) as f:
      return cls.from_dict(json.load(f))


def default_layer_types(num_layers: int, full_attention_interval: int = 4) -> tuple[str, ...]:
  """HF's default pattern: layer i is full attention iff (i + 1) % interval == 0."""
  return tuple(FULL if (i + 1) % full_attention_interval == 0 else LINEAR
               for i in range(num_layers))


_HF_FIELDS = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_attention_heads',
              'num_key_value_heads', 'head_dim', 'linear_num_key_heads', 'linear_num_value_heads',
              'linear_key_head_dim', 'linear_value_head_dim', 'linear_conv_kernel_dim',
              'rms_norm_eps')
HF_TEXT_MODEL_TYPES = ('qwen3_5_text',)
HF_WRAPPER_MODEL_TYPES = ('qwen3_5',)


def from_hf_config(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
  """Builds a ModelConfig from a Qwen3.5 `config.json` dict (text-only or multimodal wrapper).

  Raises:
    ValueError: for an unsupported `model_type`/architecture or a config missing required fields.
  """
  model_type = hf.get('model_type')
  if model_type in HF_WRAPPER_MODEL_TYPES:
    text = dict(hf.get('text_config') or {})
    if not text:
      raise ValueError('qwen3_5 config has no text_config')
    # transformers reads the tie flag from text_config; fall back to the top level (qwen35.md §4).
    text.setdefault('tie_word_embeddings', hf.get('tie_word_embeddings', False))
  elif model_type in HF_TEXT_MODEL_TYPES:
    text = dict(hf)
  else:
    raise ValueError(
        f'unsupported model_type {model_type!r} (architectures {hf.get("architectures")}); '
        f'supported: {HF_TEXT_MODEL_TYPES + HF_WRAPPER_MODEL_TYPES}')
  missing = [k for k in _HF_FIELDS if k not in text]
  if missing:
    raise ValueError(f'config.json text config lacks fields {missing}')
  kwargs = {k: text[k] for k in _HF_FIELDS}
  kwargs['linear_conv_kernel_dim'] = text.get('linear_conv_kernel_dim', 4)
  n = text['num_hidden_layers']
  layer_types = text.get('layer_types') or default_layer_types(
      n, text.get('full_attention_interval', 4))
  if len(layer_types) != n:
    raise ValueError(f'layer_types has {len(layer_types)} entries, num_hidden_layers is {n}')
  kwargs['layer_types'] = tuple(layer_types)
  rope = text.get('rope_parameters') or text.get('rope_scaling') or {}
  rope_type = rope.get('rope_type', rope.get('type', 'default'))
  if rope_type != 'default':
    raise ValueError(f'unsupported rope_type {rope_type!r} (only default RoPE is implemented)')
  kwargs['rope_theta'] = float(rope.get('rope_theta', text.get('rope_theta', 10_000_000.0)))
  kwargs['partial_rotary_factor'] = float(
      rope.get('partial_rotary_factor', text.get('partial_rotary_factor', 0.25)))
  kwargs['tie_word_embeddings'] = bool(text.get('tie_word_embeddings', False))
  eos = text.get('eos_token_id', hf.get('eos_token_id'))
  kwargs['eos_token_id'] = eos[0] if isinstance(eos, list) else eos
  flare = hf.get('flare') or {}
  if 'mask_token_id' in flare:
    kwargs['mask_token_id'] = flare['mask_token_id']
  kwargs.update(overrides)
  return ModelConfig(**kwargs)


def to_hf_text_config(cfg: ModelConfig) -> dict[str, Any]:
  """The `Qwen3_5ForCausalLM` config.json for `cfg`, plus our FLARE fields under "flare"."""
  return {
      'architectures': ['Qwen3_5ForCausalLM'],
      'model_type': 'qwen3_5_text',
      **{k: getattr(cfg, k) for k in _HF_FIELDS},
      'num_hidden_layers': cfg.num_layers,
      'layer_types': list(cfg.layer_types),
      'hidden_act': 'silu',
      'attention_bias': False,
      'attention_dropout': 0.0,
      'tie_word_embeddings': cfg.tie_word_embeddings,
      'max_position_embeddings': 262144,
      'rope_parameters': {
          'rope_type': 'default',
          'rope_theta': cfg.rope_theta,
          'partial_rotary_factor': cfg.partial_rotary_factor,
      },
      'eos_token_id': cfg.eos_token_id,
      'dtype': 'bfloat16',
      'flare': {'mask_token_id': cfg.resolved_mask_token_id},
  }


def _qwen35(hidden, inter, n_layers, heads, kv_heads, lin_k, lin_v, tie) -> ModelConfig:
  return ModelConfig(
      vocab_size=248320, hidden_size=hidden, intermediate_size=inter,
      layer_types=default_layer_types(n_layers), num_attention_heads=heads,
      num_key_value_heads=kv_heads, head_dim=256, linear_num_key_heads=lin_k,
      linear_num_value_heads=lin_v, linear_key_head_dim=128, linear_value_head_dim=128,
      tie_word_embeddings=tie, eos_token_id=248044)


VARIANTS: dict[str, ModelConfig] = {
    # CPU tests and the demo: 2 layers (GDN + attention), D=64, byte-level vocabulary.
    'tiny': ModelConfig(
        vocab_size=272, hidden_size=64, intermediate_size=128,
        layer_types=(LINEAR, FULL), num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
        linear_value_head_dim=16, eos_token_id=256, dtype='float32'),
    # The CPU demo's model (launch.demo): 4 layers (3 GDN + 1 attention), D=128, byte vocabulary.
    'small': ModelConfig(
        vocab_size=272, hidden_size=128, intermediate_size=384,
        layer_types=(LINEAR, LINEAR, LINEAR, FULL), num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32,
        linear_value_head_dim=32, eos_token_id=256, dtype='float32'),
    # The GPU demo's model: 8 layers, D=512, byte vocabulary.
    'medium': ModelConfig(
        vocab_size=272, hidden_size=512, intermediate_size=1536,
        layer_types=(LINEAR, LINEAR, LINEAR, FULL) * 2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, linear_num_key_heads=4, linear_num_value_heads=8,
        linear_key_head_dim=64, linear_value_head_dim=64, eos_token_id=256, dtype='bfloat16'),
    '0.8b': _qwen35(1024, 3584, 24, 8, 2, 16, 16, True),
    '2b': _qwen35(2048, 6144, 24, 8, 2, 16, 16, True),
    '4b': _qwen35(2560, 9216, 32, 16, 4, 16, 32, True),
    '9b': _qwen35(4096, 12288, 32, 16, 4, 16, 32, False),
}
