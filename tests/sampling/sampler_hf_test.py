"""Greedy AR-Trust == greedy AR on a checkpoint converted from a transformers Qwen3.5 model."""
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from flare_jax.checkpoint import hf_import  # noqa: E402
from flare_jax.checkpoint import model_io  # noqa: E402
from flare_jax.sampling import sampler as sampler_lib  # noqa: E402

pytestmark = pytest.mark.torch


def test_ar_trust_equals_ar_on_a_converted_hf_model(tmp_path):
  cfg = transformers.Qwen3_5TextConfig(
      vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
      linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
      tie_word_embeddings=False,
      rope_parameters=dict(rope_type='default', rope_theta=1e7, partial_rotary_factor=0.25))
  torch.manual_seed(0)
  model = transformers.Qwen3_5ForCausalLM(cfg).float()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(str(tmp_path / 'hf'))
  hf_import.convert_hf_checkpoint(str(tmp_path / 'hf'), str(tmp_path / 'ours'), log=lambda _: None)
  ours = model_io.load_model(str(tmp_path / 'ours'), dtype='float32')
  sampler = sampler_lib.Sampler(ours)
  rng = np.random.default_rng(0)
  prompts = rng.integers(0, 255, (3, 9)).astype(np.int32)
  lengths = np.array([9, 4, 6], np.int32)
  ar = sampler.generate(prompts, lengths, sampler_lib.SamplerConfig(mode='ar', max_new_tokens=10))
  # The AR path is the transformers model's own greedy decoding.
  with torch.no_grad():
    ref = model.generate(torch.as_tensor(prompts[1:2, :4]), max_new_tokens=10, do_sample=False,
                         min_new_tokens=10, pad_token_id=0)
  assert list(np.asarray(ar.tokens[1])) == ref[0, 4:].tolist()
  for block in (1, 2, 4, 8):
    spec = sampler.generate(prompts, lengths, sampler_lib.SamplerConfig(
        mode='ar_trust', block_size=block, max_new_tokens=10))
    np.testing.assert_array_equal(spec.tokens, ar.tokens)
