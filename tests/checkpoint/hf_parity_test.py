"""fp32 logit parity with transformers: tiny random Qwen3.5 models saved, converted, compared."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from flare_jax.checkpoint import hf_export  # noqa: E402
from flare_jax.checkpoint import hf_import  # noqa: E402
from flare_jax.checkpoint import model_io  # noqa: E402
from flare_jax.checkpoint import testing  # noqa: E402

pytestmark = pytest.mark.torch

LIN, FULL = testing.LINEAR, testing.FULL
QUIET = dict(log=lambda _: None)
TOL = 1e-4  # fp32 both sides; measured ~1e-6 at logit scale ~3-6
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_forward = nnx.jit(lambda m, t, **kw: m(t, **kw)[0])


def _our_logits(ckpt, tokens, **kw):
  model = model_io.load_model(str(ckpt), dtype='float32', param_dtype='float32')
  with jax.default_matmul_precision('highest'):
    return np.asarray(_forward(model, jax.numpy.asarray(tokens), **kw))


def _convert(tmp_path):
  hf_import.convert_hf_checkpoint(str(tmp_path / 'hf'), str(tmp_path / 'ours'), **QUIET)
  return tmp_path / 'ours'


CONFIGS = [
    ((LIN, FULL), dict(tie=True), 63, 'float32'),
    ((LIN, FULL), dict(tie=False), 63, 'bfloat16'),
    ((LIN, LIN, LIN, FULL), dict(tie=False), 63, 'float32'),
    ((FULL, LIN), dict(tie=False, heads=2, kv_heads=1, head_dim=32, nk=1, nv=1, dk=32, dv=32),
     257, 'float32'),
    ((FULL, LIN, LIN), dict(tie=True, heads=8, kv_heads=8, nk=4, nv=8, dk=8, dv=8, hidden=48),
     63, 'float32'),
]
IDS = ['LF_tied_t63', 'LF_untied_bf16file_t63', 'LLLF_untied_t63', 'FL_mha_nk1_t257',
       'FLL_mha8_nv8_t63']


@pytest.mark.parametrize('layer_types, kw, t, file_dtype', CONFIGS, ids=IDS)
def test_text_model_logits_match_transformers(tmp_path, layer_types, kw, t, file_dtype):
  model = testing.transformers_model(testing.transformers_text_config(layer_types, **kw))
  if file_dtype == 'bfloat16':  # the real checkpoints' storage dtype: same weights on both sides
    model.to(torch.bfloat16).save_pretrained(str(tmp_path / 'hf'))
    model.float()
  else:
    model.save_pretrained(str(tmp_path / 'hf'))
  tokens = np.random.default_rng(1).integers(0, 256, (2, t))
  ref = testing.transformers_logits(model, tokens)
  ours = _our_logits(_convert(tmp_path), tokens)
  diff = float(np.max(np.abs(ours - ref)))
  print(f'{layer_types} T={t}: max |dlogit| = {diff:.2e} (logit scale {np.abs(ref).max():.1f})')
  assert diff <= TOL


# Qwen3_5Config's top-level tie flag stays False: with text_config tied the wrapper still saves an
# independent lm_head.weight, which transformers (and our importer) then load untied.
@pytest.mark.parametrize('text_tie', [False, True], ids=['untied', 'text_config_tied'])
def test_multimodal_wrapper_text_logits_match_transformers(tmp_path, text_tie):
  text = testing.transformers_text_config((LIN, LIN, LIN, FULL), tie=text_tie)
  model = testing.transformers_model(text, multimodal=True, save_to=str(tmp_path / 'hf'))
  logs = []
  hf_import.convert_hf_checkpoint(str(tmp_path / 'hf'), str(tmp_path / 'ours'), log=logs.append)
  assert any(line.startswith('skipped') and 'model.visual' in line for line in logs)
  tokens = np.random.default_rng(2).integers(0, 200, (2, 63))
  ref = testing.transformers_logits(model, tokens)
  diff = float(np.max(np.abs(_our_logits(tmp_path / 'ours', tokens) - ref)))
  print(f'multimodal wrapper: max |dlogit| = {diff:.2e}')
  assert diff <= TOL


def test_packed_row_matches_each_document_in_transformers(tmp_path):
  text = testing.transformers_text_config((LIN, LIN, FULL), tie=True)
  model = testing.transformers_model(text, seed=3, save_to=str(tmp_path / 'hf'))
  rng = np.random.default_rng(4)
  lengths = [30, 70, 9]
  docs = [rng.integers(0, 256, (1, n)) for n in lengths]
  tokens = np.concatenate(docs, 1)
  seg = np.concatenate([np.full((1, n), i + 1) for i, n in enumerate(lengths)], 1).astype(np.int32)
  pos = np.concatenate([np.arange(n)[None] for n in lengths], 1).astype(np.int32)
  ours = _our_logits(_convert(tmp_path), tokens, segment_ids=jax.numpy.asarray(seg),
                     positions=jax.numpy.asarray(pos))
  start = 0
  for doc, n in zip(docs, lengths):
    ref = testing.transformers_logits(model, doc)
    assert float(np.max(np.abs(ours[:, start:start + n] - ref))) <= TOL
    start += n


def test_export_round_trip_loads_in_transformers_with_equal_logits(tmp_path):
  text = testing.transformers_text_config((LIN, FULL), tie=False)
  model = testing.transformers_model(text, seed=5, save_to=str(tmp_path / 'hf'))
  hf_export.export_hf(str(_convert(tmp_path)), str(tmp_path / 'back'), dtype='float32', **QUIET)
  hf_config = json.loads((tmp_path / 'back' / 'config.json').read_text())
  assert hf_config['flare']['mask_token_id'] == 255
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'back'),
                                                           dtype=torch.float32).eval()
  assert type(back).__name__ == 'Qwen3_5ForCausalLM'
  tokens = np.random.default_rng(6).integers(0, 256, (2, 40))
  np.testing.assert_array_equal(testing.transformers_logits(back, tokens),
                                testing.transformers_logits(model, tokens))


def test_convert_cli_verify_passes_and_fails_on_tolerance(tmp_path):
  text = testing.transformers_text_config((LIN, FULL), tie=True)
  testing.transformers_model(text, multimodal=True, seed=7, save_to=str(tmp_path / 'hf'))
  (tmp_path / 'hf' / 'tokenizer.json').write_text(json.dumps({'model': {'vocab': {'a': 0}}}))
  base = [sys.executable, '-m', 'launch.convert_hf', f'--hf_dir={tmp_path / "hf"}',
          f'--out={tmp_path / "ours"}', '--verify', '--verify_length=16']
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  ok = subprocess.run(base, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert ok.returncode == 0, ok.stderr[-3000:]
  line = next(x for x in ok.stdout.splitlines() if x.startswith('verify:'))
  assert float(line.split('= ')[1].split()[0]) <= TOL, line
  assert (tmp_path / 'ours' / 'tokenizer.json').exists()
  bad = subprocess.run(base + ['--overwrite', '--tolerance=0'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and 'logits differ by' in bad.stderr, bad.stderr[-3000:]
