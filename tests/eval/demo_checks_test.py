"""launch.demo's AR-Trust exactness check: agreement counts, logit gaps where outputs differ, and
the float32 re-decode for a 16-bit model."""
import numpy as np
import pytest
from flax import nnx

from flare_jax.checkpoint import model_io
from flare_jax.data import tokenizer as tokenizer_lib
from flare_jax.eval import harness
from flare_jax.eval import report
from flare_jax.model import config as config_lib
from flare_jax.model import transformer
from launch import demo

TOK = tokenizer_lib.ByteTokenizer()
ROWS = [{'prompt': 'a = ', 'answer': '1'}, {'prompt': 'def f(', 'answer': '7'},
        {'prompt': '1+2=', 'answer': '3'}]


@pytest.fixture(scope='module')
def bf16_model_dir(tmp_path_factory):
  cfg = config_lib.VARIANTS['tiny'].replace(dtype='bfloat16')
  out = str(tmp_path_factory.mktemp('ckpt') / 'model')
  model_io.save_model(transformer.FlareLM(cfg, rngs=nnx.Rngs(0)), out, cfg=cfg)
  return out


def test_agreement_counts_and_gap_at_the_first_difference():
  model = transformer.FlareLM(config_lib.VARIANTS['tiny'], rngs=nnx.Rngs(0))
  ar = ['1;', 'xy)', '3\n']
  trust = ['1;', 'xz)', '3\n']  # differs after the common prefix 'x'
  got = demo.ar_trust_agreement(model, TOK, ROWS, ar, trust, batch_size=2)
  assert (got['identical'], got['n']) == (2, 3)
  want = harness.top2_gaps(model, TOK, ['def f(x'])
  np.testing.assert_allclose(got['gap_at_difference'], want, rtol=1e-5)
  assert got['median_gap_at_first_token'] >= 0
  assert demo.ar_trust_agreement(model, TOK, ROWS, ar, ar, batch_size=2) == dict(identical=3, n=3)


def _toy_results(model_dir):
  model = model_io.load_model(model_dir)
  modes = {s: harness.mode_config(s, 5) for s in ('ar', 'ar_trust:b=3')}
  res = harness.evaluate(model, TOK, 'numeric', ROWS, modes, keep_outputs=True, batch_size=2)
  res['ar_trust:b=3']['outputs'] = list(res['ar']['outputs'])  # agree everywhere, to start with
  return model, modes, {'toy': ('numeric', ROWS)}, {'toy': {'flare_model': res}}


def test_checks_decode_only_the_differing_rows_again_in_float32(bf16_model_dir, monkeypatch):
  model, modes, examples, results = _toy_results(bf16_model_dir)
  decoded = []
  evaluate = harness.evaluate
  monkeypatch.setattr(harness, 'evaluate',
                      lambda m, tok, kind, rows, *a, **kw: decoded.append(rows) or
                      evaluate(m, tok, kind, rows, *a, **kw))
  assert demo.ar_trust_checks(bf16_model_dir, TOK, examples, modes, results, 2) == {
      'toy: greedy AR-Trust == AR': True}
  assert not decoded  # all rows agree in bfloat16: nothing decoded again

  # A flipped near-tie in row 1: only that row is decoded again, in float32, where both paths agree.
  results['toy']['flare_model']['ar_trust:b=3']['outputs'][1] += 'x'
  checks = demo.ar_trust_checks(bf16_model_dir, TOK, examples, modes, results, 2)
  assert checks == {'toy: greedy AR-Trust == AR (bfloat16; 1 differing row(s) decoded again in '
                    'float32 compute)': True}
  assert decoded == [[ROWS[1]]]

  agreement = demo.ar_trust_agreements(model, TOK, examples, modes, results, 2)
  assert (agreement['toy']['ar_trust:b=3']['identical'], agreement['toy']['ar_trust:b=3']['n']) == (
      2, 3)
  lines = report.agreement_lines({'config': {'model': {'dtype': 'bfloat16'}},
                                  'agreement': agreement})
  assert 'toy, `ar_trust:b=3` at bfloat16 compute: 2/3 outputs identical' in lines


def test_a_float32_model_that_differs_fails_the_check(tmp_path):
  cfg = config_lib.VARIANTS['tiny']
  model_dir = str(tmp_path / 'model')
  model_io.save_model(transformer.FlareLM(cfg, rngs=nnx.Rngs(0)), model_dir, cfg=cfg)
  _, modes, examples, results = _toy_results(model_dir)
  results['toy']['flare_model']['ar_trust:b=3']['outputs'][0] += 'x'
  assert demo.ar_trust_checks(model_dir, TOK, examples, modes, results, 2) == {
      'toy: greedy AR-Trust == AR': False}
