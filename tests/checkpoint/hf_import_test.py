"""HF import/export without torch: synthetic safetensors checkpoints, layouts and error reporting."""
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from flare_jax.checkpoint import hf_export
from flare_jax.checkpoint import hf_import
from flare_jax.checkpoint import model_io
from flare_jax.model import config as config_lib
from flare_jax.model import transformer

L, F = config_lib.LINEAR, config_lib.FULL


def _cfg(**kw):
  return config_lib.VARIANTS['tiny'].replace(**{'dtype': 'float32', 'layer_types': (L, F), **kw})


def _params(cfg, seed=0):
  model = transformer.FlareLM(cfg, rngs=nnx.Rngs(seed))
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _write_hf(tmp_path, cfg, name='hf', dtype='float32'):
  d = tmp_path / name
  d.mkdir()
  params = _params(cfg)
  hf_export.write_hf_dir(params, cfg, str(d), dtype)
  return d, params


def _tensors(d):
  with safe_open(str(d / 'model.safetensors'), framework='np') as f:
    return {k: f.get_tensor(k) for k in f.keys()}


def _assert_same_params(a, b):
  la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize('tie', [True, False], ids=['tied', 'untied'])
def test_import_fills_every_leaf_exactly(tmp_path, tie):
  cfg = _cfg(tie_word_embeddings=tie)
  hf_dir, params = _write_hf(tmp_path, cfg)
  out = tmp_path / 'out'
  got_cfg = hf_import.convert_hf_checkpoint(str(hf_dir), str(out), log=lambda _: None)
  assert got_cfg.tie_word_embeddings == tie
  _assert_same_params(model_io.load_params(str(out)), params)


def test_sharded_index_and_wrapper_prefix_with_skipped_groups(tmp_path):
  cfg = _cfg(tie_word_embeddings=False)
  hf_dir, params = _write_hf(tmp_path, cfg)
  tensors = _tensors(hf_dir)
  os.remove(hf_dir / 'model.safetensors')
  renamed = {k.replace('model.', 'model.language_model.', 1) if k.startswith('model.') else k: v
             for k, v in tensors.items()}
  renamed['model.visual.patch_embed.proj.weight'] = np.zeros((4, 4), np.float32)
  renamed['mtp.fc.weight'] = np.zeros((4, 8), np.float32)
  names = sorted(renamed)
  shards = {'model-00001-of-00002.safetensors': names[::2],
            'model-00002-of-00002.safetensors': names[1::2]}
  for fname, keys in shards.items():
    save_file({k: renamed[k] for k in keys}, str(hf_dir / fname))
  with open(hf_dir / 'model.safetensors.index.json', 'w') as f:
    json.dump({'weight_map': {k: fn for fn, ks in shards.items() for k in ks}}, f)
  text = json.loads((hf_dir / 'config.json').read_text())
  (hf_dir / 'config.json').write_text(json.dumps(
      {'model_type': 'qwen3_5', 'architectures': ['Qwen3_5ForConditionalGeneration'],
       'text_config': text}))
  logs = []
  hf_import.convert_hf_checkpoint(str(hf_dir), str(tmp_path / 'out'), log=logs.append)
  _assert_same_params(model_io.load_params(str(tmp_path / 'out')), params)
  skipped = [line for line in logs if line.startswith('skipped')]
  assert len(skipped) == 1 and 'model.visual.* (1 tensors)' in skipped[0] and 'mtp.*' in skipped[0]


def test_every_problem_is_reported_at_once_and_nothing_is_written(tmp_path):
  cfg = _cfg()
  hf_dir, _ = _write_hf(tmp_path, cfg)
  tensors = _tensors(hf_dir)
  del tensors['model.layers.0.linear_attn.A_log']
  tensors['model.layers.1.self_attn.q_proj.weight'] = np.zeros((3, 3), np.float32)
  tensors['model.layers.7.mlp.up_proj.weight'] = np.zeros((2, 2), np.float32)
  save_file(tensors, str(hf_dir / 'model.safetensors'))
  out = tmp_path / 'out'
  with pytest.raises(ValueError) as e:
    hf_import.convert_hf_checkpoint(str(hf_dir), str(out), log=lambda _: None)
  msg = str(e.value)
  assert 'missing tensors (1): model.layers.0.linear_attn.A_log' in msg
  assert 'unexpected tensors (1): model.layers.7.mlp.up_proj.weight' in msg
  assert 'model.layers.1.self_attn.q_proj.weight: (3, 3), expected (128, 64)' in msg
  assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ['hf']


def test_unsupported_architecture_is_named(tmp_path):
  hf_dir, _ = _write_hf(tmp_path, _cfg())
  (hf_dir / 'config.json').write_text(json.dumps({'model_type': 'llama', 'architectures': ['X']}))
  with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
    hf_import.convert_hf_checkpoint(str(hf_dir), str(tmp_path / 'out'), log=lambda _: None)


def test_mask_id_must_not_be_a_tokenizer_id_and_existing_output_is_kept(tmp_path):
  hf_dir, _ = _write_hf(tmp_path, _cfg())
  (hf_dir / 'tokenizer.json').write_text(json.dumps(
      {'model': {'vocab': {'a': 0, 'b': 1}}, 'added_tokens': [{'id': 5, 'content': '<s>'}]}))
  with pytest.raises(ValueError, match='mask_token_id 5'):
    hf_import.convert_hf_checkpoint(str(hf_dir), str(tmp_path / 'o'), mask_token_id=5,
                                    log=lambda _: None)
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'keep.txt').write_text('x')
  with pytest.raises(ValueError, match='exists and is not empty'):
    hf_import.convert_hf_checkpoint(str(hf_dir), str(out), log=lambda _: None)
  assert (out / 'keep.txt').read_text() == 'x'
  cfg = hf_import.convert_hf_checkpoint(str(hf_dir), str(out), overwrite=True, log=lambda _: None)
  assert cfg.resolved_mask_token_id == cfg.vocab_size - 1
  assert (out / 'tokenizer.json').exists() and not (out / 'keep.txt').exists()


def test_export_then_import_round_trip_in_bf16_keeps_fp32_tensors(tmp_path):
  cfg = _cfg()
  params = _params(cfg)
  model = transformer.FlareLM(cfg, rngs=nnx.Rngs(0))
  model_io.save_model(model, str(tmp_path / 'ckpt'))
  hf_export.export_hf(str(tmp_path / 'ckpt'), str(tmp_path / 'hf'), log=lambda _: None)
  tensors = _tensors(tmp_path / 'hf')
  assert str(tensors['model.layers.0.linear_attn.A_log'].dtype) == 'float32'
  assert str(tensors['model.layers.0.mlp.up_proj.weight'].dtype) == 'bfloat16'
  hf_import.convert_hf_checkpoint(str(tmp_path / 'hf'), str(tmp_path / 'back'), log=lambda _: None)
  back = model_io.load_params(str(tmp_path / 'back'))
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_allclose(np.asarray(x), y, rtol=1e-2, atol=1e-2)  # bf16 rounding
