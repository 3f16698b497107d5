"""Logit parity against transformers itself: tiny random Qwen3.5 models saved, converted and compared."""
import json

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from flare_jax.checkpoint import hf_export  # noqa: E402
from flare_jax.checkpoint import hf_import  # noqa: E402
from flare_jax.checkpoint import model_io  # noqa: E402

pytestmark = pytest.mark.torch

LIN, FULL = 'linear_attention', 'full_attention'


def _text_config(layer_types, *, tie, heads=4, kv_heads=2, head_dim=16, nk=2, nv=4, dk=16, dv=24,
                 hidden=64):
  return dict(vocab_size=256, hidden_size=hidden, intermediate_size=96,
              num_hidden_layers=len(layer_types), layer_types=list(layer_types),
              num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
              linear_num_key_heads=nk, linear_num_value_heads=nv, linear_key_head_dim=dk,
              linear_value_head_dim=dv, linear_conv_kernel_dim=4, tie_word_embeddings=tie,
              rope_parameters=dict(rope_type='default', rope_theta=1e7, partial_rotary_factor=0.25,
                                   mrope_section=[1, 1, 0], mrope_interleaved=True),
              rms_norm_eps=1e-6)


def _randomize(model, seed):
  # HF inits norms at 0/1 and A_log deterministically; perturb everything so every weight matters.
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=g))


def _save_text_model(path, text_cfg, seed=0):
  torch.manual_seed(seed)
  model = transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(**text_cfg)).float().eval()
  _randomize(model, seed)
  model.save_pretrained(str(path))
  return model


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def _our_logits(ckpt, tokens, **kw):
  model = model_io.load_model(str(ckpt), dtype='float32')
  with jax.default_matmul_precision('highest'):
    logits, _ = nnx.jit(lambda m, t, **k: m(t, **k))(model, jax.numpy.asarray(tokens), **kw)
  return np.asarray(logits)


CONFIGS = [
    ((LIN, FULL), dict(tie=True), 63),
    ((LIN, LIN, LIN, FULL), dict(tie=False), 63),
    ((FULL, LIN), dict(tie=False, heads=2, kv_heads=1, head_dim=32, nk=1, nv=1, dk=32, dv=32), 257),
    ((LIN, FULL, LIN), dict(tie=True, heads=8, kv_heads=8, nk=4, nv=8, dk=8, dv=8, hidden=48), 100),
]
IDS = ['LF_tied_t63', 'LLLF_untied_t63', 'FL_mha_t257', 'LFL_gqa8_t100']


@pytest.mark.parametrize('layer_types, kw, t', CONFIGS, ids=IDS)
def test_text_model_logits_match_transformers(tmp_path, layer_types, kw, t):
  hf_model = _save_text_model(tmp_path / 'hf', _text_config(layer_types, **kw))
  hf_import.convert_hf_checkpoint(str(tmp_path / 'hf'), str(tmp_path / 'ours'), log=lambda _: None)
  tokens = np.random.default_rng(1).integers(0, 256, (2, t))
  ref = _hf_logits(hf_model, tokens)
  ours = _our_logits(tmp_path / 'ours', tokens)
  diff = float(np.max(np.abs(ours - ref)))
  print(f'{layer_types} T={t}: max |dlogit| = {diff:.2e} (logit scale {np.abs(ref).max():.1f})')
  assert diff <= 1e-4


def test_multimodal_wrapper_text_logits_match_transformers(tmp_path):
  text = _text_config((LIN, LIN, LIN, FULL), tie=False)
  vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64,
                patch_size=2, temporal_patch_size=1, spatial_merge_size=1, num_position_embeddings=16)
  cfg = transformers.Qwen3_5Config(text_config=text, vision_config=vision)
  torch.manual_seed(0)
  model = transformers.Qwen3_5ForConditionalGeneration(cfg).float().eval()
  _randomize(model, 0)
  model.save_pretrained(str(tmp_path / 'hf'))
  logs = []
  hf_import.convert_hf_checkpoint(str(tmp_path / 'hf'), str(tmp_path / 'ours'), log=logs.append)
  assert any(line.startswith('skipped') and 'model.visual' in line for line in logs)
  tokens = np.random.default_rng(2).integers(0, 200, (2, 63))
  with torch.no_grad():
    ref = model(input_ids=torch.as_tensor(tokens)).logits.float().numpy()
  diff = float(np.max(np.abs(_our_logits(tmp_path / 'ours', tokens) - ref)))
  print(f'multimodal wrapper: max |dlogit| = {diff:.2e}')
  assert diff <= 1e-4


def test_packed_row_matches_each_document_in_transformers(tmp_path):
  hf_model = _save_text_model(tmp_path / 'hf', _text_config((LIN, LIN, FULL), tie=True), seed=3)
  hf_import.convert_hf_checkpoint(str(tmp_path / 'hf'), str(tmp_path / 'ours'), log=lambda _: None)
  rng = np.random.default_rng(4)
  lengths = [30, 70, 9]
  docs = [rng.integers(0, 256, (1, n)) for n in lengths]
  tokens = np.concatenate(docs, 1)
  seg = np.concatenate([np.full((1, n), i + 1) for i, n in enumerate(lengths)], 1).astype(np.int32)
  pos = np.concatenate([np.arange(n)[None] for n in lengths], 1).astype(np.int32)
  ours = _our_logits(tmp_path / 'ours', tokens, segment_ids=jax.numpy.asarray(seg),
                     positions=jax.numpy.asarray(pos))
  start = 0
  for doc, n in zip(docs, lengths):
    ref = _hf_logits(hf_model, doc)
    assert float(np.max(np.abs(ours[:, start:start + n] - ref))) <= 1e-4
    start += n


def test_export_round_trip_loads_in_transformers_with_equal_logits(tmp_path):
  hf_model = _save_text_model(tmp_path / 'hf', _text_config((LIN, FULL), tie=False), seed=5)
  hf_import.convert_hf_checkpoint(str(tmp_path / 'hf'), str(tmp_path / 'ours'), log=lambda _: None)
  hf_export.export_hf(str(tmp_path / 'ours'), str(tmp_path / 'back'), dtype='float32',
                      log=lambda _: None)
  assert json.loads((tmp_path / 'back' / 'config.json').read_text())['flare']['mask_token_id'] == 255
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'back'),
                                                           dtype=torch.float32).eval()
  tokens = np.random.default_rng(6).integers(0, 256, (2, 40))
  np.testing.assert_allclose(_hf_logits(back, tokens), _hf_logits(hf_model, tokens), atol=1e-5)
