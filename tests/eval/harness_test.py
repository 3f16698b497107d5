"""The evaluation harness on a random tiny model: batching does not change results, and speed stats
add up."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from flare_jax.data import tokenizer as tokenizer_lib
from flare_jax.eval import harness
from flare_jax.eval import scorers
from flare_jax.model import config as config_lib
from flare_jax.model import transformer
from flare_jax.objective import two_stream


@pytest.fixture(scope='module')
def model():
  return transformer.FlareLM(config_lib.VARIANTS['tiny'], rngs=nnx.Rngs(0))


TOK = tokenizer_lib.ByteTokenizer()


@nnx.jit
def _logits(model, ids):
  """The model's logits over one unpadded row (the references below): [1, T, V]."""
  return model(ids)[0]


def _direct_loglik(model, prompt: str, choice: str) -> float:
  ids = TOK.encode(prompt + choice)
  logits = _logits(model, np.asarray([ids], np.int32))
  logp = jax.nn.log_softmax(np.asarray(logits[0], np.float64), -1)
  start = len(TOK.encode(prompt))
  return float(sum(logp[t - 1, ids[t]] for t in range(start, len(ids))))


def test_choice_logliks_match_unbatched_forward(model):
  examples = [{'prompt': 'x = 1 +', 'choices': [' 1', ' 22', 'abc'], 'label': 0},
              {'prompt': 'def f(', 'choices': ['a):', 'self'], 'label': 1}]
  got = harness.choice_logliks(model, TOK, examples, batch_size=4)  # 5 rows: a padded last batch
  want = [[_direct_loglik(model, ex['prompt'], c) for c in ex['choices']] for ex in examples]
  np.testing.assert_allclose(np.concatenate(got), np.concatenate(want), rtol=1e-4, atol=1e-4)


def test_perplexity_matches_direct_computation(model):
  text = 'import os\nprint(os.getcwd())\n'
  got = harness.perplexity(model, TOK, [text], seq_len=16, batch_size=2)
  ids = TOK.encode(text)
  rows = [ids[i:i + 16] for i in range(0, len(ids) - 1, 16)]
  nll, n = 0.0, 0
  for r in rows:  # each row alone, unpadded: one forward scores all its next tokens
    nll -= _direct_loglik(model, TOK.decode(r[:1]), TOK.decode(r[1:]))
    n += len(r) - 1
  assert got['tokens'] == n
  np.testing.assert_allclose(got['nll'], nll / n, rtol=1e-4)


def test_generation_is_independent_of_batching_and_counts_add_up(model):
  prompts = ['a', 'hello world', 'def main():\n', '1+2=', 'xyz']
  cfg = harness.mode_config('ar', 6)
  one, s1 = harness.generate_texts(model, TOK, prompts, cfg, batch_size=2)
  all_, s2 = harness.generate_texts(model, TOK, prompts, cfg, batch_size=8)
  assert one == all_ and len(one) == len(prompts)
  assert s1.tokens == s2.tokens == sum(len(TOK.encode(o)) for o in one) <= 6 * len(prompts)
  assert s1.summary()['passes_per_token'] == pytest.approx(1.0)
  trust, s3 = harness.generate_texts(model, TOK, prompts, harness.mode_config('ar_trust:b=3', 6),
                                     batch_size=8)
  assert trust == one  # greedy AR-Trust == greedy AR
  assert 0 <= s3.summary()['acceptance_rate'] <= 1


def test_mode_config_parsing():
  cfg = harness.mode_config('diffusion_trust:b=8,k=4', 32)
  assert (cfg.mode, cfg.block_size, cfg.commit, cfg.tokens_per_pass) == (
      'diffusion_trust', 8, 'fixed', 4)
  assert harness.mode_config('diffusion_trust:threshold=0.7', 8).threshold == 0.7
  cfg = harness.mode_config('diffusion_trust:factor=2', 8)
  assert (cfg.commit, cfg.factor) == ('factor', 2.0)
  cfg = harness.mode_config('diffusion_trust:b=4,entropy=0.25', 8)
  assert (cfg.commit, cfg.entropy_bound, cfg.block_size) == ('entropy', 0.25, 4)
  with pytest.raises(ValueError, match='one commit rule per mode, got k and entropy'):
    harness.mode_config('diffusion_trust:k=2,entropy=1', 8)
  with pytest.raises(ValueError, match='ar_trust has none'):
    harness.mode_config('ar_trust:k=2', 8)
  with pytest.raises(ValueError, match='factor must be > 0'):
    harness.mode_config('diffusion_trust:factor=0', 8)
  with pytest.raises(ValueError, match='unknown mode field'):
    harness.mode_config('ar:temp=1', 8)
  cfg = harness.mode_config('diffusion_trust:k=2,t=0.8,top_p=0.9,top_k=50', 8)
  assert (cfg.temperature, cfg.top_p, cfg.top_k, cfg.tokens_per_pass) == (0.8, 0.9, 50, 2)
  assert harness.mode_config('ar', 8).temperature == 0  # greedy unless told
  with pytest.raises(ValueError, match='top_p'):
    harness.mode_config('ar:top_p=0', 8)
  with pytest.raises(ValueError, match='unknown mode'):
    harness.mode_config('beam', 8)
  with pytest.raises(ValueError, match='no tokens'):
    harness.encode_prompts(TOK, ['ok', ''], 64)


def test_top2_gaps_match_direct_forward(model):
  texts = ['a', 'hello world', 'def main():\n', '1+2=', 'xyz']  # 5 rows: a padded last batch
  got = harness.top2_gaps(model, TOK, texts, batch_size=2)
  for text, gap in zip(texts, got):
    logits = _logits(model, np.asarray([TOK.encode(text)], np.int32))
    top = np.sort(np.asarray(logits[0, -1], np.float64))[::-1]
    np.testing.assert_allclose(gap, top[0] - top[1], rtol=1e-4, atol=1e-5)
  assert (got >= 0).all()
  with pytest.raises(ValueError, match='non-empty'):
    harness.top2_gaps(model, TOK, ['a', ''])


def test_scoring_split_over_devices_equals_one_device(model):
  """3 devices (on CPU; one GPU is all a GPU run may have) and batches of 4 rows: every batch is
  padded to 6 rows (two per device), whose copies must be dropped; each row's scores equal the
  one-device scores."""
  devices = jax.devices()[:3]
  examples = [{'prompt': 'x = 1 +', 'choices': [' 1', ' 22', 'abc'], 'label': 0},
              {'prompt': 'def f(', 'choices': ['a):', 'self'], 'label': 1}]
  one = harness.choice_logliks(model, TOK, examples, batch_size=4)
  split = harness.choice_logliks(model, TOK, examples, batch_size=4, devices=devices)
  np.testing.assert_allclose(np.concatenate(split), np.concatenate(one), rtol=1e-5, atol=1e-5)
  text = 'import os\nprint(os.getcwd())\n'
  one = harness.perplexity(model, TOK, [text], seq_len=8, batch_size=4)
  split = harness.perplexity(model, TOK, [text], seq_len=8, batch_size=4, devices=devices)
  assert split['tokens'] == one['tokens']
  np.testing.assert_allclose(split['nll'], one['nll'], rtol=1e-5)
  texts = ['a', 'hello world', 'def main():\n', '1+2=', 'xyz']
  np.testing.assert_allclose(harness.top2_gaps(model, TOK, texts, batch_size=4, devices=devices),
                             harness.top2_gaps(model, TOK, texts, batch_size=4),
                             rtol=1e-5, atol=1e-5)
  scorer = harness.Scorer(model, devices)
  assert len(scorer.params['embed_tokens']['embedding'].sharding.device_set) == len(devices)


def test_exact_tasks_also_report_the_graded_line_prefix(model):
  """Targets built from the model's own greedy outputs: the first is matched exactly, the second
  only up to its last character, so accuracy is 1/2 and the line prefix (1 + (n-1)/n) / 2."""
  prompts = ['x = ', 'def f(']
  cfg = harness.mode_config('ar', 4)
  outputs, _ = harness.generate_texts(model, TOK, prompts, cfg, batch_size=2)
  lines = [o.split('\n', 1)[0].rstrip() for o in outputs]
  if not lines[1]:
    pytest.skip('the random model ends its second line at once')
  examples = [{'prompt': prompts[0], 'target': lines[0]},
              {'prompt': prompts[1], 'target': lines[1][:-1] + chr(ord(lines[1][-1]) ^ 1)}]
  res = harness.evaluate(model, TOK, 'exact', examples, {'ar': cfg}, batch_size=2)['ar']
  n = len(lines[1])
  assert res['accuracy'] == 0.5
  assert res['line_prefix'] == pytest.approx((1 + (n - 1) / n) / 2)


def test_outputs_are_cut_at_their_examples_stop_strings_before_scoring(model):
  """Each kept output is the free output cut before its example's first stop string (taken from
  the free outputs, so it occurs); examples without one are left whole; a HumanEval-style code
  example runs its prompt followed by the output."""
  cfg = dataclasses.replace(harness.mode_config('ar', 6), temperature=1.0)  # greedy repeats
  examples = [{'prompt': p, 'answer': '7'} for p in ('x = ', 'def f(', '1+2=')]
  free = harness.evaluate(model, TOK, 'numeric', examples, {'ar': cfg}, batch_size=4,
                          keep_outputs=True)['ar']['outputs']
  stop = free[0][len(free[0]) // 2]
  stopped = [{**examples[0], 'stop': [stop]}, {**examples[1], 'stop': [stop, 'never']},
             examples[2]]
  cut = harness.evaluate(model, TOK, 'numeric', stopped, {'ar': cfg}, batch_size=4,
                         keep_outputs=True)['ar']['outputs']
  assert cut == [free[0].split(stop)[0], free[1].split(stop)[0], free[2]]
  assert len(cut[0]) < len(free[0])
  humaneval = {'prompt': 'def add(a, b):\n', 'tests': 'assert add(2, 3) == 5',
               'prompt_is_code': True}
  assert harness.score_outputs('code', [humaneval, {**humaneval, 'prompt_is_code': False}],
                               ['    return a + b'] * 2) == [1.0, 0.0]


def test_code_outputs_run_concurrently_and_score_in_order():
  ex = {'prompt': 'def add(a, b):\n', 'tests': 'assert add(2, 3) == 5', 'prompt_is_code': True}
  outputs = ['    return a + b', '    return a - b', '    return b + a', '    import time\n'
             '    time.sleep(0.5)\n    return a + b', 'syntax error(', '    return 5']
  seen = []
  scores = harness.score_outputs('code', [ex] * 6, outputs,
                                 on_progress=lambda done, total: seen.append((done, total)))
  assert scores == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
  assert seen == [(i, 6) for i in range(1, 7)]


def test_samples_report_pass_at_k_over_independent_draws(model):
  """3 sampled decodes per example: the targets are the first lines of each example's first draw
  in a first run, so the same seed scores each draw as the scorer does alone; accuracy is the mean
  over draws, pass@k the mean of scorers.pass_at_k over examples (a per-example count taken across
  examples instead would differ: the correct draws sit in one column). Another seed draws other
  outputs."""
  cfg = harness.mode_config('ar:t=1', 4)
  examples = [{'prompt': p, 'target': 'unset'} for p in ('x = ', 'def f(', '1+2=')]
  run = lambda rows, seed=0: harness.evaluate(model, TOK, 'exact', rows, {'ar': cfg},
                                              batch_size=4, keep_outputs=True, samples=3,
                                              seed=seed)['ar']
  drawn = run(examples)['outputs']
  assert len(drawn) == 9 and len(set(drawn)) > 3  # the draws differ
  targets = [{**ex, 'target': scorers.first_line(drawn[3 * i])}
             for i, ex in enumerate(examples)]
  res = run(targets)
  assert res['outputs'] == drawn
  scores = np.reshape([scorers.score_exact_line(o, ex['target'])
                       for o, ex in zip(drawn, [t for t in targets for _ in range(3)])], (3, 3))
  assert scores.max(1).tolist() == [1, 1, 1]  # each example's chosen draw
  assert res['accuracy'] == pytest.approx(scores.mean())
  assert res['samples'] == 3 and set(res) >= {'pass@1', 'pass@3'} and 'pass@5' not in res
  for k in (1, 3):
    assert res[f'pass@{k}'] == pytest.approx(np.mean(
        [scorers.pass_at_k(3, int(c), k) for c in scores.sum(1)]))
  assert res['pass@1'] == pytest.approx(res['accuracy']) and res['pass@3'] == 1.0
  assert run(examples, seed=1)['outputs'] != drawn
  assert harness.pass_at_ks(3) == [1, 3] and harness.pass_at_ks(20) == [1, 5, 10, 20]
  with pytest.raises(ValueError, match='samples must be >= 1'):
    harness.evaluate(model, TOK, 'exact', examples, {'ar': cfg}, samples=0)


def test_choice_tasks_score_summed_and_per_byte_log_likelihoods(model):
  """Labels set to each example's best choice per byte: accuracy_norm is 1, and plain accuracy
  counts the examples where the summed log-likelihood picks the same choice (long choices sum
  more negative terms: with this seed's model the two differ on one example of the five)."""
  examples = [{'prompt': p, 'choices': ['a', 'abcdefghijkl', ' x = 1', '\n'], 'label': 0}
              for p in ('x', 'def f(', 'import os\n', '1+2=', 'hello')]
  logliks = harness.choice_logliks(model, TOK, examples, batch_size=8)
  lengths = np.asarray([len(c.encode()) for c in examples[0]['choices']], np.float64)
  per_byte = [int(np.argmax(np.asarray(ll) / lengths)) for ll in logliks]
  summed = [int(np.argmax(ll)) for ll in logliks]
  examples = [dict(ex, label=best) for ex, best in zip(examples, per_byte)]
  res = harness.evaluate(model, TOK, 'choice', examples, batch_size=8)['loglik']
  assert res['accuracy_norm'] == 1.0 and res['n'] == 5
  assert res['accuracy'] == pytest.approx(np.mean(np.asarray(summed) == np.asarray(per_byte)))
  assert res['accuracy'] < 1.0  # the two rules disagree somewhere, so the test tells them apart


@pytest.mark.parametrize('lengths,batch_size,seq_len,devices,want', [
    ([5, 3], 16, 1024, 1, (2, 64)),  # a few short texts: 2 rows of 64, not 16 of 1024
    ([1024, 7], 16, 1024, 1, (2, 1024)),
    ([70] * 40, 16, 1024, 1, (16, 128)),
    ([3] * 2, 16, 100, 3, (3, 64)),  # all the rows, a multiple of the devices
    ([3] * 5, 4, 100, 3, (4, 64)),  # never more than batch_size
    ([90], 2, 100, 1, (1, 100)),  # never wider than seq_len
])
def test_text_batches_are_no_larger_than_their_rows_need(lengths, batch_size, seq_len, devices,
                                                         want):
  shape = harness._text_batch_shape  # pylint: disable=protected-access
  assert shape([[1] * n for n in lengths], batch_size, seq_len, devices) == want


def test_perplexity_does_not_depend_on_the_row_length_limit_above_the_texts(model):
  texts = ['import os\n', 'x = 1\n']
  short = harness.perplexity(model, TOK, texts, seq_len=64, batch_size=16)
  long = harness.perplexity(model, TOK, texts, seq_len=4096, batch_size=16)
  np.testing.assert_allclose(long['nll'], short['nll'], rtol=1e-6)
  assert long['tokens'] == short['tokens'] == len('import os\n') + len('x = 1\n') - 2


def test_flare_loss_on_texts_clean_stream_is_the_perplexity_and_noise_follows_the_seed(model):
  """The clean stream of the two-stream pass is the AR path: loss_ar equals `perplexity`'s nll
  over the same targets, on one device and on three (batches of 4 rows padded with empty rows to
  6); loss_diff is reproducible from its seed and changes with it."""
  texts = ['import os\nprint(os.getcwd())\n', 'def f(x):\n  return x + 1\n', 'a = [1, 2, 3]\n']
  objective = two_stream.ObjectiveConfig(block_size=4, num_views=2)
  ppl = harness.perplexity(model, TOK, texts, seq_len=16, batch_size=4)
  one = harness.flare_loss_on_texts(model, TOK, texts, objective, seq_len=16, batch_size=4)
  assert one['n_targets'] == ppl['tokens']
  np.testing.assert_allclose(one['loss_ar'], ppl['nll'], rtol=1e-5)
  assert np.isfinite(one['loss_diff']) and one['loss_diff'] > 0
  again = harness.flare_loss_on_texts(model, TOK, texts, objective, seq_len=16, batch_size=4)
  assert again == one
  other = harness.flare_loss_on_texts(model, TOK, texts, objective, seq_len=16, batch_size=4,
                                      seed=1)
  assert other['loss_diff'] != one['loss_diff'] and other['loss_ar'] == one['loss_ar']
  split = harness.flare_loss_on_texts(model, TOK, texts, objective, seq_len=16, batch_size=4,
                                      devices=jax.devices()[:3])
  assert split['n_targets'] == ppl['tokens']
  np.testing.assert_allclose(split['loss_ar'], ppl['nll'], rtol=1e-5)
  assert np.isfinite(split['loss_diff'])
