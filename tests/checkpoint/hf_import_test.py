"""HF import without torch: synthetic safetensors checkpoints, layouts, shards, error reports."""
import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest

from flare_jax.checkpoint import hf_import
from flare_jax.checkpoint import hf_mapping
from flare_jax.checkpoint import model_io
from flare_jax.checkpoint import testing
from flare_jax.model import config as config_lib

L, F = config_lib.LINEAR, config_lib.FULL
QUIET = dict(log=lambda _: None)


def _cfg(**kw):
  return config_lib.VARIANTS['tiny'].replace(**{'dtype': 'float32', 'layer_types': (L, F), **kw})


def _assert_same_params(got, want):
  lg, lw = jax.tree.leaves_with_path(got), jax.tree.leaves_with_path(want)
  assert [p for p, _ in lg] == [p for p, _ in lw]
  for (path, x), (_, y) in zip(lg, lw):
    assert np.asarray(x).dtype == y.dtype, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(x), y, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize('tie, layers', [(True, (L, F)), (False, (F, L, L))],
                         ids=['tied_LF', 'untied_FLL'])
def test_import_fills_every_leaf_with_its_source(tmp_path, tie, layers):
  cfg = _cfg(tie_word_embeddings=tie, layer_types=layers)
  params = testing.write_hf_checkpoint(str(tmp_path / 'hf'), cfg, seed=3)
  got_cfg = hf_import.convert_hf_checkpoint(str(tmp_path / 'hf'), str(tmp_path / 'out'), **QUIET)
  # The compute dtype is ours to choose (default bf16); the mask id is carried via config.json.
  assert got_cfg == cfg.replace(dtype='bfloat16', mask_token_id=cfg.vocab_size - 1)
  assert model_io.load_config(str(tmp_path / 'out')) == got_cfg
  _assert_same_params(model_io.load_params(str(tmp_path / 'out')), params)
  # A source with no training record: the converted checkpoint says it was imported.
  assert model_io.load_training(str(tmp_path / 'out')) == {
      'objective': 'imported', 'steps': 0, 'init_from': str(tmp_path / 'hf'), 'flare': None}


def test_bf16_source_is_read_exactly_and_fp32_tensors_stay_exact(tmp_path):
  cfg = _cfg()
  params = testing.write_hf_checkpoint(str(tmp_path / 'hf'), cfg, dtype='bfloat16')
  hf_import.convert_hf_checkpoint(str(tmp_path / 'hf'), str(tmp_path / 'out'), **QUIET)
  got = model_io.load_params(str(tmp_path / 'out'))
  for e in hf_mapping.entries(cfg):
    want = hf_mapping.get_path(params, e.path)
    if not e.keep_fp32:  # A_log and the GDN norm are written (and read back) in fp32
      want = want.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(hf_mapping.get_path(got, e.path)), want,
                                  err_msg=e.hf_name)


def test_sharded_wrapper_layout_skips_vision_and_mtp_in_one_line(tmp_path):
  cfg = _cfg(tie_word_embeddings=False)
  extra = {'model.visual.patch_embed.proj.weight': np.zeros((4, 4), np.float32),
           'model.visual.blocks.0.attn.qkv.weight': np.zeros((4, 4), np.float32),
           'mtp.fc.weight': np.zeros((4, 8), np.float32)}
  params = testing.write_hf_checkpoint(str(tmp_path / 'hf'), cfg, wrapper=True, num_shards=3,
                                       extra_tensors=extra)
  assert not (tmp_path / 'hf' / 'model.safetensors').exists()
  logs = []
  hf_import.convert_hf_checkpoint(str(tmp_path / 'hf'), str(tmp_path / 'out'), log=logs.append)
  _assert_same_params(model_io.load_params(str(tmp_path / 'out')), params)
  skipped = [line for line in logs if line.startswith('skipped')]
  assert skipped == ['skipped (not part of the text model): model.visual.* (2 tensors), '
                     'mtp.* (1 tensors)']
  assert sum('.safetensors:' in line for line in logs) == 3  # a line per shard


def test_every_problem_is_reported_at_once_and_nothing_is_written(tmp_path):
  cfg = _cfg()
  testing.write_hf_checkpoint(
      str(tmp_path / 'hf'), cfg, drop=['model.layers.0.linear_attn.A_log', 'model.norm.weight'],
      extra_tensors={'model.layers.1.self_attn.q_proj.weight': np.zeros((3, 3), np.float32),
                     'model.layers.0.linear_attn.conv1d.weight': np.zeros((128, 4, 1), np.float32),
                     'model.layers.7.mlp.up_proj.weight': np.zeros((2, 2), np.float32)})
  out = tmp_path / 'out'
  with pytest.raises(ValueError) as e:
    hf_import.convert_hf_checkpoint(str(tmp_path / 'hf'), str(out), **QUIET)
  msg = str(e.value)
  assert 'missing tensors (2): model.norm.weight, model.layers.0.linear_attn.A_log' in msg
  assert 'unexpected tensors (1): model.layers.7.mlp.up_proj.weight' in msg
  # q_proj is [2 * heads * head_dim (query + gate), hidden]; conv1d is [C, 1, Kc].
  assert 'model.layers.1.self_attn.q_proj.weight: (3, 3), expected (128, 64)' in msg
  assert 'model.layers.0.linear_attn.conv1d.weight: (128, 4, 1), expected (128, 1, 4)' in msg
  assert sorted(p.name for p in tmp_path.iterdir()) == ['hf']


def test_absent_shard_and_absent_weights_are_errors(tmp_path):
  testing.write_hf_checkpoint(str(tmp_path / 'hf'), _cfg(), num_shards=2)
  os.remove(tmp_path / 'hf' / 'model-00002-of-00002.safetensors')
  with pytest.raises(ValueError, match='absent.*model-00002-of-00002'):
    hf_import.convert_hf_checkpoint(str(tmp_path / 'hf'), str(tmp_path / 'out'), **QUIET)
  os.remove(tmp_path / 'hf' / 'model.safetensors.index.json')
  with pytest.raises(ValueError, match='neither model.safetensors'):
    hf_import.convert_hf_checkpoint(str(tmp_path / 'hf'), str(tmp_path / 'out'), **QUIET)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['hf']


def test_unsupported_architecture_is_named(tmp_path):
  testing.write_hf_checkpoint(str(tmp_path / 'hf'), _cfg())
  (tmp_path / 'hf' / 'config.json').write_text(json.dumps(
      {'model_type': 'llama', 'architectures': ['LlamaForCausalLM']}))
  with pytest.raises(ValueError, match=r"unsupported model_type 'llama'.*LlamaForCausalLM"):
    hf_import.convert_hf_checkpoint(str(tmp_path / 'hf'), str(tmp_path / 'out'), **QUIET)


def test_head_is_tied_as_transformers_ties_it(tmp_path):
  # Untied config without lm_head.weight: tied.
  cfg = _cfg(tie_word_embeddings=False)
  params = testing.write_hf_checkpoint(str(tmp_path / 'a'), cfg, drop=['lm_head.weight'])
  logs = []
  got = hf_import.convert_hf_checkpoint(str(tmp_path / 'a'), str(tmp_path / 'a_out'),
                                        log=logs.append)
  assert got.tie_word_embeddings and any('no lm_head.weight' in line for line in logs)
  del params['lm_head']
  _assert_same_params(model_io.load_params(str(tmp_path / 'a_out')), params)
  # Tied config that also stores lm_head.weight: tied if it equals the embedding, else untied.
  cfg = _cfg(tie_word_embeddings=True)
  for name, same in (('b', True), ('c', False)):
    emb = testing.random_params(cfg)['embed_tokens']['embedding']
    head = emb if same else emb[::-1].copy()
    params = testing.write_hf_checkpoint(str(tmp_path / name), cfg,
                                         extra_tensors={'lm_head.weight': head})
    got = hf_import.convert_hf_checkpoint(str(tmp_path / name), str(tmp_path / f'{name}_out'),
                                          **QUIET)
    assert got.tie_word_embeddings == same
    if not same:
      params['lm_head'] = {'kernel': head.T}
    _assert_same_params(model_io.load_params(str(tmp_path / f'{name}_out')), params)


def test_config_overrides_set_param_dtype(tmp_path):
  cfg = _cfg()
  params = testing.write_hf_checkpoint(str(tmp_path / 'hf'), cfg)
  got = hf_import.convert_hf_checkpoint(str(tmp_path / 'hf'), str(tmp_path / 'out'),
                                        param_dtype='bfloat16', dtype='bfloat16', **QUIET)
  assert (got.param_dtype, got.dtype) == ('bfloat16', 'bfloat16')
  loaded = model_io.load_params(str(tmp_path / 'out'))
  x = loaded['layers'][1]['mlp']['up_proj']['kernel']
  assert x.dtype == np.dtype(ml_dtypes.bfloat16)
  want = params['layers'][1]['mlp']['up_proj']['kernel'].astype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(np.asarray(x), want)


def test_mask_id_must_not_be_a_tokenizer_id_and_existing_output_is_kept(tmp_path):
  testing.write_hf_checkpoint(str(tmp_path / 'hf'), _cfg())
  (tmp_path / 'hf' / 'tokenizer.json').write_text(json.dumps(
      {'model': {'vocab': {'a': 0, 'b': 1}}, 'added_tokens': [{'id': 5, 'content': '<s>'}]}))
  (tmp_path / 'hf' / 'chat_template.jinja').write_text('{{ x }}')
  for bad in (1, 5):
    with pytest.raises(ValueError, match=f'mask_token_id {bad} is a token'):
      hf_import.convert_hf_checkpoint(str(tmp_path / 'hf'), str(tmp_path / 'o'),
                                      mask_token_id=bad, **QUIET)
  with pytest.raises(ValueError, match=r'mask_token_id 272 outside \[0, 272\)'):
    hf_import.convert_hf_checkpoint(str(tmp_path / 'hf'), str(tmp_path / 'o'),
                                    mask_token_id=272, **QUIET)
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'keep.txt').write_text('x')
  with pytest.raises(ValueError, match='exists and is not empty'):
    hf_import.convert_hf_checkpoint(str(tmp_path / 'hf'), str(out), **QUIET)
  assert (out / 'keep.txt').read_text() == 'x'
  cfg = hf_import.convert_hf_checkpoint(str(tmp_path / 'hf'), str(out), overwrite=True,
                                        mask_token_id=7, **QUIET)
  assert cfg.resolved_mask_token_id == 7 == model_io.load_config(str(out)).mask_token_id
  assert sorted(p.name for p in out.iterdir()) == [
      'chat_template.jinja', 'flare_training.json', 'model_config.json', 'params',
      'tokenizer.json']
  assert sorted(p.name for p in tmp_path.iterdir()) == ['hf', 'out']  # no temp dirs left
