"""ModelConfig: HF config mapping, defaults and validation."""
import pytest

from flare_jax.model import config as config_lib


def _hf_text(**kw):
  d = dict(model_type='qwen3_5_text', vocab_size=256, hidden_size=64, intermediate_size=128,
           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
           linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
           linear_value_head_dim=24, linear_conv_kernel_dim=4, rms_norm_eps=1e-6,
           rope_parameters=dict(rope_type='default', rope_theta=1e7, partial_rotary_factor=0.25),
           tie_word_embeddings=False)
  d.update(kw)
  return d


def test_default_layer_pattern_is_three_gdn_then_attention():
  assert config_lib.default_layer_types(8) == (('linear_attention',) * 3 + ('full_attention',)) * 2


def test_from_hf_text_config_uses_default_pattern_and_rope_fields():
  cfg = config_lib.from_hf_config(_hf_text())
  assert cfg.layer_types == config_lib.default_layer_types(4)
  assert cfg.rotary_dim == 8 and cfg.rope_theta == 1e7
  assert not cfg.tie_word_embeddings
  assert cfg.resolved_mask_token_id == 255


def test_from_hf_wrapper_reads_text_config_and_tie_fallback():
  text = _hf_text()
  del text['tie_word_embeddings']
  cfg = config_lib.from_hf_config(
      dict(model_type='qwen3_5', text_config=text, tie_word_embeddings=True))
  assert cfg.tie_word_embeddings
  text['tie_word_embeddings'] = False  # the text config wins over the top level, as in transformers
  cfg = config_lib.from_hf_config(
      dict(model_type='qwen3_5', text_config=text, tie_word_embeddings=True))
  assert not cfg.tie_word_embeddings


def test_explicit_layer_types_are_used():
  types = ['full_attention', 'linear_attention', 'linear_attention']
  cfg = config_lib.from_hf_config(_hf_text(num_hidden_layers=3, layer_types=types))
  assert cfg.layer_types == tuple(types)


def test_round_trip_through_hf_config():
  cfg = config_lib.from_hf_config(_hf_text(), mask_token_id=7)
  again = config_lib.from_hf_config(config_lib.to_hf_text_config(cfg))
  assert again.replace(dtype=cfg.dtype) == cfg


def test_save_load(tmp_path):
  cfg = config_lib.VARIANTS['tiny']
  cfg.save(str(tmp_path / 'c.json'))
  assert config_lib.ModelConfig.load(str(tmp_path / 'c.json')) == cfg


@pytest.mark.parametrize('bad, match', [
    (dict(model_type='llama'), 'unsupported model_type'),
    (dict(layer_types=['linear_attention']), 'layer_types has 1 entries'),
    (dict(rope_parameters=dict(rope_type='yarn')), 'rope_type'),
], ids=['model_type', 'layer_count', 'rope'])
def test_bad_hf_configs_raise(bad, match):
  with pytest.raises(ValueError, match=match):
    config_lib.from_hf_config(_hf_text(**bad))


def test_invalid_model_config_names_the_problem():
  with pytest.raises(ValueError, match='mask_token_id'):
    config_lib.VARIANTS['tiny'].replace(mask_token_id=10_000)
  with pytest.raises(ValueError, match='layer type'):
    config_lib.VARIANTS['tiny'].replace(layer_types=('mamba',))
  with pytest.raises(ValueError, match="gdn_decode_impl='triton' \\(known: None, xla, pallas\\)"):
    config_lib.VARIANTS['tiny'].replace(gdn_decode_impl='triton')
  with pytest.raises(ValueError, match="attn_impl='cudnn'"):
    config_lib.VARIANTS['tiny'].replace(attn_impl='cudnn')
  with pytest.raises(ValueError, match="attn_decode_impl='triton' \\(known: None, xla, pallas\\)"):
    config_lib.VARIANTS['tiny'].replace(attn_decode_impl='triton')
  with pytest.raises(ValueError, match="norm_impl='triton' \\(known: None, xla, pallas\\)"):
    config_lib.VARIANTS['tiny'].replace(norm_impl='triton')
