"""HF export without torch: tensor names, dtypes, layouts, config.json, sources, CLI, atomicity."""
import json
import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from flare_jax.checkpoint import hf_export
from flare_jax.checkpoint import hf_import
from flare_jax.checkpoint import hf_mapping
from flare_jax.checkpoint import model_io
from flare_jax.model import config as config_lib
from flare_jax.model import transformer

L, F = config_lib.LINEAR, config_lib.FULL
QUIET = dict(log=lambda _: None)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cfg(**kw):
  return config_lib.VARIANTS['tiny'].replace(**{'dtype': 'float32', 'layer_types': (L, F), **kw})


def _tensors(d):
  with safe_open(os.path.join(d, 'model.safetensors'), framework='np') as f:
    return {k: f.get_tensor(k) for k in f.keys()}


def _save(tmp_path, cfg, seed=0):
  model = transformer.FlareLM(cfg, rngs=nnx.Rngs(seed))
  (tmp_path / 'tok').mkdir()
  (tmp_path / 'tok' / 'tokenizer_config.json').write_text('{}')
  model_io.save_model(model, str(tmp_path / 'ckpt'), tokenizer_dir=str(tmp_path / 'tok'))
  return model, jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_bf16_export_layout_dtypes_and_config(tmp_path):
  cfg = _cfg(tie_word_embeddings=False, mask_token_id=200)
  _, params = _save(tmp_path, cfg)
  hf_export.export_hf(str(tmp_path / 'ckpt'), str(tmp_path / 'hf'), **QUIET)
  t = _tensors(str(tmp_path / 'hf'))
  assert set(t) == {e.hf_name for e in hf_mapping.entries(cfg)}
  assert all(k.startswith('model.') for k in t if k != 'lm_head.weight')
  for name in ('model.layers.0.linear_attn.A_log', 'model.layers.0.linear_attn.norm.weight'):
    assert t[name].dtype == np.float32, name
  assert t['model.layers.0.mlp.up_proj.weight'].dtype == ml_dtypes.bfloat16
  # HF layouts, checked against our arrays independently of hf_mapping's transforms.
  gdn = params['layers'][0]['linear_attn']
  np.testing.assert_array_equal(t['model.layers.0.linear_attn.A_log'], gdn['A_log'])
  np.testing.assert_array_equal(
      t['model.layers.0.linear_attn.conv1d.weight'].astype(np.float32),
      np.transpose(gdn['conv_weight'][:, :, None], (1, 2, 0)).astype(ml_dtypes.bfloat16))
  np.testing.assert_array_equal(
      t['model.layers.1.self_attn.o_proj.weight'],
      params['layers'][1]['self_attn']['o_proj']['kernel'].T.astype(ml_dtypes.bfloat16))
  np.testing.assert_array_equal(t['lm_head.weight'],
                                params['lm_head']['kernel'].T.astype(ml_dtypes.bfloat16))
  hf = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  assert hf['architectures'] == ['Qwen3_5ForCausalLM'] and hf['model_type'] == 'qwen3_5_text'
  assert hf['dtype'] == 'bfloat16' and hf['flare'] == {'mask_token_id': 200}
  assert hf['tie_word_embeddings'] is False and hf['layer_types'] == [L, F]
  assert sorted(os.listdir(tmp_path / 'hf')) == ['config.json', 'model.safetensors',
                                                 'tokenizer_config.json']


def test_fp32_round_trip_is_exact_and_bf16_round_trip_rounds_once(tmp_path):
  cfg = _cfg(layer_types=(F, L, L))
  _, params = _save(tmp_path, cfg)
  for dtype in ('float32', 'bfloat16'):
    hf_export.export_hf(str(tmp_path / 'ckpt'), str(tmp_path / f'hf_{dtype}'), dtype=dtype,
                        **QUIET)
    got_cfg = hf_import.convert_hf_checkpoint(str(tmp_path / f'hf_{dtype}'),
                                              str(tmp_path / f'back_{dtype}'), **QUIET)
    assert got_cfg == cfg.replace(dtype='bfloat16', mask_token_id=cfg.vocab_size - 1)
    back = model_io.load_params(str(tmp_path / f'back_{dtype}'))
    for e in hf_mapping.entries(cfg):
      want = hf_mapping.get_path(params, e.path)
      if dtype == 'bfloat16' and not e.keep_fp32:
        want = want.astype(ml_dtypes.bfloat16).astype(np.float32)
      np.testing.assert_array_equal(np.asarray(hf_mapping.get_path(back, e.path)), want,
                                    err_msg=f'{dtype} {e.hf_name}')


def test_model_and_params_sources_export_the_same_tensors(tmp_path):
  cfg = _cfg()
  model, params = _save(tmp_path, cfg)
  hf_export.export_hf(str(tmp_path / 'ckpt'), str(tmp_path / 'a'), dtype='float32', **QUIET)
  hf_export.export_hf(model, str(tmp_path / 'b'), dtype='float32', **QUIET)
  hf_export.export_hf((nnx.state(model, nnx.Param), cfg), str(tmp_path / 'c'), dtype='float32',
                      **QUIET)
  a = _tensors(str(tmp_path / 'a'))
  for d in ('b', 'c'):
    b = _tensors(str(tmp_path / d))
    assert set(a) == set(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert not (tmp_path / 'b' / 'tokenizer_config.json').exists()  # no tokenizer_dir given


def test_export_refuses_bad_dtype_and_existing_output(tmp_path):
  _save(tmp_path, _cfg())
  with pytest.raises(ValueError, match="unknown export dtype 'int8'"):
    hf_export.export_hf(str(tmp_path / 'ckpt'), str(tmp_path / 'hf'), dtype='int8', **QUIET)
  (tmp_path / 'hf').mkdir()
  (tmp_path / 'hf' / 'keep').write_text('x')
  with pytest.raises(ValueError, match='exists and is not empty'):
    hf_export.export_hf(str(tmp_path / 'ckpt'), str(tmp_path / 'hf'), **QUIET)
  with pytest.raises(ValueError, match='not a model checkpoint'):
    hf_export.export_hf(str(tmp_path / 'tok'), str(tmp_path / 'hf2'), **QUIET)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt', 'hf', 'tok']
  assert os.listdir(tmp_path / 'hf') == ['keep']


def test_export_cli_writes_a_loadable_directory(tmp_path):
  cfg = _cfg()
  _, params = _save(tmp_path, cfg)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  run = subprocess.run(
      [sys.executable, '-m', 'launch.export_hf', f'--ckpt={tmp_path / "ckpt"}',
       f'--out={tmp_path / "hf"}', '--dtype=float32'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  t = _tensors(str(tmp_path / 'hf'))
  np.testing.assert_array_equal(t['model.embed_tokens.weight'], params['embed_tokens']['embedding'])
  again = subprocess.run(run.args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert again.returncode != 0 and 'exists and is not empty' in again.stderr
