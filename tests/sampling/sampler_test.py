"""Sampler: greedy AR-Trust == AR, Diffusion-Trust (B=1, threshold 1) == AR,
exact speculative sampling."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flare_jax.model import cache as cache_lib
from flare_jax.model import config as config_lib
from flare_jax.model import transformer
from flare_jax.sampling import policies
from flare_jax.sampling import sampler as sampler_lib

L, F = config_lib.LINEAR, config_lib.FULL


@pytest.fixture(scope='module')
def tiny():
  cfg = config_lib.VARIANTS['tiny'].replace(dtype='float32', layer_types=(L, F, L))
  return transformer.FlareLM(cfg, rngs=nnx.Rngs(3))


def _ragged_prompts(rng, lengths, width, vocab=256):
  prompts = rng.integers(0, vocab, (len(lengths), width)).astype(np.int32)
  return prompts, np.asarray(lengths, np.int32)


def _naive_greedy(model, prompt, n):
  """Greedy decoding by full forwards over the growing sequence (no caches), padded to one shape."""
  width = len(prompt) + n
  fwd = nnx.jit(lambda m, t: m(t)[0])
  seq = list(prompt)
  for _ in range(n):
    padded = jnp.asarray([seq + [0] * (width - len(seq))], jnp.int32)  # causal: padding is unseen
    seq.append(int(jnp.argmax(fwd(model, padded)[0, len(seq) - 1])))
  return seq[len(prompt):]


def test_greedy_ar_matches_full_forward_decoding(tiny, rng):
  prompts, lengths = _ragged_prompts(rng, [5, 9, 1], 9)
  res = sampler_lib.Sampler(tiny).generate(prompts, lengths,
                                           sampler_lib.SamplerConfig(mode='ar', max_new_tokens=6))
  for b, n in enumerate(lengths):
    assert list(np.asarray(res.tokens[b])) == _naive_greedy(tiny, prompts[b, :n], 6)
  assert list(np.asarray(res.num_tokens)) == [6, 6, 6]


@pytest.mark.parametrize('block', [1, 2, 4, 8])
def test_greedy_ar_trust_equals_greedy_ar(tiny, rng, block):
  prompts, lengths = _ragged_prompts(rng, [3, 11, 7, 1], 11)
  sampler = sampler_lib.Sampler(tiny)
  ar = sampler.generate(prompts, lengths, sampler_lib.SamplerConfig(mode='ar', max_new_tokens=13))
  spec = sampler.generate(prompts, lengths, sampler_lib.SamplerConfig(
      mode='ar_trust', block_size=block, max_new_tokens=13))
  np.testing.assert_array_equal(spec.tokens, ar.tokens)
  assert np.all(np.asarray(spec.n_accepted) <= np.asarray(spec.n_drafted))
  # The prefill, then a draft and a verify pass per step, except the first step's draft, which
  # the prefill carried.
  steps = np.asarray(spec.n_drafted) // block
  np.testing.assert_array_equal(spec.n_forward, 1 + 2 * steps - 1)


def test_diffusion_trust_one_token_blocks_at_full_threshold_equal_greedy_ar(tiny, rng):
  prompts, lengths = _ragged_prompts(rng, [4, 8], 8)
  sampler = sampler_lib.Sampler(tiny)
  ar = sampler.generate(prompts, lengths, sampler_lib.SamplerConfig(mode='ar', max_new_tokens=7))
  dt = sampler.generate(prompts, lengths, sampler_lib.SamplerConfig(
      mode='diffusion_trust', block_size=1, threshold=1.0, max_new_tokens=7))
  np.testing.assert_array_equal(dt.tokens, ar.tokens)


def test_diffusion_trust_fixed_schedule_uses_fewer_passes_per_token_with_larger_k(tiny, rng):
  """Also the other commit rules at their extremes: a vanishing factor or entropy bound commits
  one slot per pass (the factor rule the most confident, as k=1), an unbounded entropy bound the
  whole block at once (as k=4)."""
  prompts, lengths = _ragged_prompts(rng, [4, 6], 6)
  sampler = sampler_lib.Sampler(tiny)
  runs = {}
  for name, rule in [('k=1', dict(commit='fixed', tokens_per_pass=1)),
                     ('k=4', dict(commit='fixed', tokens_per_pass=4)),
                     ('factor=1e-9', dict(commit='factor', factor=1e-9)),
                     ('entropy=0', dict(commit='entropy', entropy_bound=0.0)),
                     ('entropy=1e9', dict(commit='entropy', entropy_bound=1e9))]:
    res = jax.device_get(sampler.generate(prompts, lengths, sampler_lib.SamplerConfig(
        mode='diffusion_trust', block_size=4, max_new_tokens=8, **rule)))
    assert list(res.num_tokens) == [8, 8], name
    runs[name] = res
  # The prefill, then per block of 4: 4 / k denoising passes, the first of them fused with the
  # prefill (first block) or with the previous block's commit pass; then its own commit pass.
  for name, k in [('k=1', 1), ('factor=1e-9', 1), ('entropy=0', 1), ('k=4', 4),
                  ('entropy=1e9', 4)]:
    np.testing.assert_array_equal(runs[name].n_forward, 1 + 2 * (4 // k - 1) + 2, err_msg=name)
  np.testing.assert_array_equal(runs['factor=1e-9'].tokens, runs['k=1'].tokens)
  np.testing.assert_array_equal(runs['entropy=1e9'].tokens, runs['k=4'].tokens)


def _unfused_diffusion_trust(model, prompt, cfg):
  """Greedy Diffusion-Trust on one row with separate passes: noisy passes over the cache until the
  block is committed (up to its first EOS), then its own clean pass advancing the cache (not fused
  with the next block's first pass). Returns (generated tokens, passes after the prefill)."""
  bsz, mask_id = cfg.block_size, model.cfg.resolved_mask_token_id
  cache = cache_lib.init_cache(model.cfg, 1, sampler_lib.buffer_len(len(prompt), cfg))
  at = lambda p: jnp.asarray([p], jnp.int32)
  fwd = nnx.jit(lambda m, t, meta, c: m(t, meta=meta, cache=c))
  _, cache = fwd(model, jnp.asarray([prompt[:-1]], jnp.int32),
                 sampler_lib._clean_meta(at(0), len(prompt) - 1), cache)
  seq, passes = list(prompt), 0
  while len(seq) - len(prompt) < cfg.max_new_tokens and not set(seq[len(prompt):]) & set(
      cfg.eos_ids):
    start = at(len(seq) - 1)
    targets, masked = jnp.zeros((1, bsz), jnp.int32), jnp.ones((1, bsz), bool)
    while bool(jnp.any(sampler_lib._needed(targets, masked, cfg.eos_ids))):
      block = jnp.concatenate([at(seq[-1:]), jnp.where(masked, mask_id, targets)[:, :-1]], axis=1)
      logits, _ = fwd(model, block, sampler_lib._noisy_meta(start, bsz), cache)
      targets, masked, _ = sampler_lib._denoise_update(logits, targets, masked, None, cfg)
      passes += 1
    block = jnp.concatenate([at(seq[-1:]), targets[:, :-1]], axis=1)
    _, cache = fwd(model, block, sampler_lib._clean_meta(start, bsz), cache)
    passes += 1
    new = [int(t) for t in targets[0]]
    ends = [i for i, t in enumerate(new) if t in cfg.eos_ids]
    seq += new[:ends[0] + 1] if ends else new
  return seq[len(prompt):len(prompt) + cfg.max_new_tokens], passes


@pytest.mark.parametrize('commit', ['threshold', 'fixed'])
@pytest.mark.parametrize('with_eos', [False, True], ids=['no_eos', 'eos'])
def test_fused_diffusion_trust_equals_separate_passes(tiny, rng, commit, with_eos):
  """The advance over a finished block shares its pass with the next block's first noisy pass, and
  the prefill with the first block's: same tokens, one pass fewer per block. With an EOS, slots
  after a committed EOS are not denoised."""
  prompts, lengths = _ragged_prompts(rng, [5, 3], 5)
  cfg = sampler_lib.SamplerConfig(mode='diffusion_trust', block_size=4, commit=commit,
                                  threshold=0.02, tokens_per_pass=2, max_new_tokens=10)
  sampler = sampler_lib.Sampler(tiny)
  if with_eos:  # a token the free run emits in its second block
    eos = int(sampler.generate(prompts, lengths, cfg).tokens[0, 5])
    cfg = dataclasses.replace(cfg, eos_ids=(eos,))
  res = sampler.generate(prompts, lengths, cfg)
  for row in range(2):
    want, passes = _unfused_diffusion_trust(tiny, list(prompts[row, :lengths[row]]), cfg)
    n = int(res.num_tokens[row])
    assert list(np.asarray(res.tokens[row, :n])) == want, row
    blocks = -(-n // cfg.block_size) if not with_eos or n == 10 else None
    if blocks:  # no EOS cut: every block saves its first pass (the first block's is in the prefill)
      assert int(res.n_forward[row]) - 1 == passes - blocks, row


def test_eos_stops_a_row_and_pads_the_rest_leaving_the_others_alone(tiny, rng):
  prompts, lengths = _ragged_prompts(rng, [5, 5], 5)
  sampler = sampler_lib.Sampler(tiny)
  free = sampler.generate(prompts, lengths, sampler_lib.SamplerConfig(mode='ar', max_new_tokens=6))
  eos = int(free.tokens[0, 2])
  for mode in ('ar', 'ar_trust'):
    res = sampler.generate(prompts, lengths, sampler_lib.SamplerConfig(
        mode=mode, max_new_tokens=6, eos_ids=(eos,)), pad_id=-1)
    row = list(np.asarray(res.tokens[0]))
    first = row.index(eos)
    assert row[:first + 1] == list(np.asarray(free.tokens[0, :first + 1]))
    assert row[first + 1:] == [-1] * (5 - first) and int(res.num_tokens[0]) == first + 1
    # The other row is untouched by row 0 finishing (its cache keeps being written, never read).
    other, free_other = list(np.asarray(res.tokens[1])), list(np.asarray(free.tokens[1]))
    n = int(res.num_tokens[1])
    assert other[:n] == free_other[:n] and (n == 6 or free_other[n - 1] == eos)


@pytest.mark.parametrize('mode', ['ar', 'ar_trust', 'diffusion_trust'])
def test_streaming_yields_exactly_the_batch_output(tiny, rng, mode):
  prompt = list(rng.integers(0, 256, 6))
  cfg = sampler_lib.SamplerConfig(mode=mode, max_new_tokens=9, commit='fixed', tokens_per_pass=2)
  sampler = sampler_lib.Sampler(tiny)
  stream, pieces = sampler.stream(prompt, cfg), []
  while True:
    try:
      pieces.append(next(stream))
    except StopIteration as finished:  # the generator returns the row's totals
      stats = finished.value
      break
  batch = sampler.generate(np.asarray([prompt]), np.asarray([6]), cfg)
  assert sum(pieces, []) == list(np.asarray(batch.tokens[0]))
  assert all(pieces)
  assert stats == sampler_lib.StreamStats(
      tokens=int(batch.num_tokens[0]), forward_passes=int(batch.n_forward[0]),
      drafted=int(batch.n_drafted[0]), accepted=int(batch.n_accepted[0]))


def test_a_stream_sent_true_ends_there(tiny, rng):
  """`send(True)` after the first piece (a stop string seen) returns the totals at once: the
  tokens emitted so far, fewer forward passes than decoding on."""
  prompt = list(rng.integers(0, 256, 6))
  cfg = sampler_lib.SamplerConfig(mode='ar', max_new_tokens=8)
  sampler = sampler_lib.Sampler(tiny)
  stream = sampler.stream(prompt, cfg)
  first = next(stream)
  with pytest.raises(StopIteration) as finished:
    stream.send(True)
  full = sampler.generate(np.asarray([prompt]), np.asarray([6]), cfg)
  assert finished.value.value.tokens == len(first) < int(full.num_tokens[0])
  assert finished.value.value.forward_passes < int(full.n_forward[0])


def test_completion_ids_leave_out_the_end_id():
  assert sampler_lib.completion_ids(np.array([5, 7, 2]), (2, 3)) == ([5, 7], True)
  assert sampler_lib.completion_ids(np.array([5, 2, 7]), (2,)) == ([5, 2, 7], False)
  assert sampler_lib.completion_ids(np.array([], np.int32), (2,)) == ([], False)


def test_bad_inputs_raise_clear_errors(tiny):
  sampler = sampler_lib.Sampler(tiny)
  cfg = sampler_lib.SamplerConfig()
  with pytest.raises(ValueError, match='non-empty'):
    sampler.generate(np.zeros((0, 4), np.int32), np.zeros((0,), np.int32), cfg)
  with pytest.raises(ValueError, match='prompt lengths'):
    sampler.generate(np.zeros((1, 4), np.int32), np.array([0]), cfg)
  with pytest.raises(ValueError, match='prompt ids'):
    sampler.generate(np.full((1, 4), 999, np.int32), np.array([4]), cfg)
  for bad, message in [(dict(mode='beam'), 'unknown mode'), (dict(top_k=-1), 'top_k'),
                       (dict(top_p=0.0), 'top_p'), (dict(top_p=1.5), 'top_p'),
                       (dict(threshold=1.2), 'threshold'), (dict(cache_len=-1), 'cache_len'),
                       (dict(block_size=0), 'block_size'), (dict(temperature=-1.0), 'temperature'),
                       (dict(commit='top'), 'commit must be one of'),
                       (dict(commit='factor', factor=0.0), 'factor must be > 0'),
                       (dict(commit='entropy', entropy_bound=-0.1), 'entropy_bound must be >= 0')]:
    with pytest.raises(ValueError, match=message):
      sampler_lib.SamplerConfig(**bad)
  with pytest.raises(ValueError, match='exceed cache_len 16'):
    sampler.generate(np.zeros((1, 10), np.int32), np.array([10]),
                     sampler_lib.SamplerConfig(max_new_tokens=8, cache_len=16))
  with pytest.raises(ValueError, match='rng'):
    sampler.generate(np.zeros((1, 4), np.int32), np.array([4]),
                     sampler_lib.SamplerConfig(temperature=1.0))
  with pytest.raises(ValueError, match='check_every'):
    sampler.generate(np.zeros((1, 4), np.int32), np.array([4]), cfg,
                     should_stop=lambda r, ids: False, check_every=0)


def test_speculative_accept_is_exact_in_distribution():
  """Monte Carlo over the acceptance rule alone: the emitted first token follows p_0 exactly."""
  vocab, n = 5, 200_000
  key = jax.random.key(0)
  kq, kp, kd, ka = jax.random.split(key, 4)
  q = jax.nn.softmax(jax.random.normal(kq, (1, 1, vocab)) * 2)
  p = jax.nn.softmax(jax.random.normal(kp, (1, 2, vocab)) * 2)
  drafts = jax.random.categorical(kd, jnp.log(q[0, 0]), shape=(n, 1)).astype(jnp.int32)
  n_acc, nxt = policies.speculative_accept(ka, drafts, jnp.broadcast_to(q, (n, 1, vocab)),
                                           jnp.broadcast_to(p, (n, 2, vocab)))
  first = np.where(np.asarray(n_acc) >= 1, np.asarray(drafts[:, 0]), np.asarray(nxt))
  freq = np.bincount(first, minlength=vocab) / n
  np.testing.assert_allclose(freq, np.asarray(p[0, 0]), atol=5e-3)


def test_sampled_ar_trust_matches_the_ar_distribution():
  """Chi-square over (t1, t2) pairs sampled by AR-Trust
  against the model's exact AR probabilities."""
  cfg = config_lib.VARIANTS['tiny'].replace(dtype='float32', vocab_size=6, layer_types=(L, F))
  model = transformer.FlareLM(cfg, rngs=nnx.Rngs(7))
  prompt = np.array([[1, 3, 2]], np.int32)

  fwd = nnx.jit(lambda m, t: m(t)[0])

  def probs(seq):
    x = np.asarray(fwd(model, jnp.asarray([seq], jnp.int32))[0, -1], np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()

  p1 = probs(list(prompt[0]))
  expected = np.array([[p1[a] * probs(list(prompt[0]) + [a])[b] for b in range(cfg.vocab_size)]
                       for a in range(cfg.vocab_size)])
  n = 6000
  res = sampler_lib.Sampler(model).generate(
      np.repeat(prompt, n, 0), np.full((n,), 3, np.int32),
      sampler_lib.SamplerConfig(mode='ar_trust', block_size=2, temperature=1.0, max_new_tokens=2),
      rng=jax.random.key(11))
  pairs = np.asarray(res.tokens[:, :2])
  counts = np.zeros_like(expected)
  np.add.at(counts, (pairs[:, 0], pairs[:, 1]), 1)
  # Pool cells with small expectation, then Pearson chi-square.
  exp_counts = expected.ravel() * n
  obs = counts.ravel()
  big = exp_counts >= 5
  exp_cells = np.append(exp_counts[big], exp_counts[~big].sum())
  obs_cells = np.append(obs[big], obs[~big].sum())
  stat = float(np.sum((obs_cells - exp_cells) ** 2 / np.maximum(exp_cells, 1e-9)))
  dof = len(exp_cells) - 1
  p_value = float(jax.scipy.special.gammaincc(dof / 2, stat / 2))
  print(f'AR-Trust vs AR chi-square: stat={stat:.2f} dof={dof} p={p_value:.3f}')
  assert p_value > 1e-3, (stat, dof, p_value)


def test_slots_after_a_committed_eos_are_not_needed():
  targets = jnp.asarray([[5, 9, 7, 1], [9, 0, 0, 0], [5, 9, 7, 1]], jnp.int32)
  masked = jnp.asarray([[True, False, True, True], [True, True, True, True],
                        [True, True, False, True]])
  got = sampler_lib._needed(targets, masked, (9,))
  np.testing.assert_array_equal(got, [[True, False, False, False],  # after the EOS at slot 1
                                      [True, True, True, True],  # the 9 is still masked
                                      [True, True, False, True]])  # no committed EOS
  np.testing.assert_array_equal(sampler_lib._needed(targets, masked, ()), masked)


@pytest.mark.parametrize('mode', ['ar', 'ar_trust', 'diffusion_trust'])
def test_data_parallel_decoding_gives_each_row_its_one_device_tokens(tiny, rng, mode):
  """5 ragged rows over 2 devices (padded to 6) and over 3; EOS ends some rows early."""
  prompts, lengths = _ragged_prompts(rng, [3, 7, 1, 5, 6], 8)
  cfg = sampler_lib.SamplerConfig(mode=mode, max_new_tokens=7, block_size=3, commit='fixed',
                                  tokens_per_pass=2)
  one = sampler_lib.Sampler(tiny).generate(prompts, lengths, cfg)
  cfg = dataclasses.replace(cfg, eos_ids=(int(one.tokens[1, 2]),))  # row 1 stops at its 3rd token
  one = sampler_lib.Sampler(tiny).generate(prompts, lengths, cfg)
  for n in (2, 3):
    split = sampler_lib.Sampler(tiny, devices=jax.devices()[:n]).generate(prompts, lengths, cfg)
    for field in ('tokens', 'num_tokens', 'n_forward', 'n_drafted', 'n_accepted'):
      np.testing.assert_array_equal(getattr(split, field), getattr(one, field), err_msg=field)
  assert int(one.num_tokens[1]) <= 3


def test_data_parallel_sampling_draws_each_devices_rows_with_its_own_key(tiny):
  """The same prompt on every row at temperature 1: rows at the same place on different devices
  must not repeat each other's samples."""
  prompts, lengths = np.full((4, 4), 7, np.int32), np.full((4,), 4, np.int32)
  cfg = sampler_lib.SamplerConfig(mode='ar', max_new_tokens=12, temperature=1.0)
  out = sampler_lib.Sampler(tiny, devices=jax.devices()[:2]).generate(
      prompts, lengths, cfg, jax.random.key(0))
  tokens = np.asarray(out.tokens)
  assert tokens.shape == (4, 12)
  assert not np.array_equal(tokens[0], tokens[2]) and not np.array_equal(tokens[1], tokens[3])


_FIELDS = ('tokens', 'num_tokens', 'n_forward', 'n_drafted', 'n_accepted')


@pytest.mark.parametrize('mode, devices, temperature', [
    ('ar_trust', 2, 1.0), ('diffusion_trust', 1, 0.0)])
def test_should_stop_ends_rows_between_segments_and_leaves_the_others_alone(
    tiny, rng, mode, devices, temperature):
  """`generate(should_stop=...)` runs the loop in segments of check_every iterations. A test
  that never stops gives exactly the one-pass result; a row it stops keeps a prefix of its
  one-pass tokens (the ids the test saw last), and the rows it never stops their whole result."""
  prompts, lengths = _ragged_prompts(rng, [3, 7, 1, 5, 6], 8)  # 5 rows: padded on 2 devices
  cfg = sampler_lib.SamplerConfig(mode=mode, max_new_tokens=11, block_size=3,
                                  temperature=temperature)
  sampler = sampler_lib.Sampler(tiny, devices=jax.devices()[:devices] if devices > 1 else None)
  key = jax.random.key(1)
  one = jax.device_get(sampler.generate(prompts, lengths, cfg, key))
  never = sampler.generate(prompts, lengths, cfg, key, should_stop=lambda r, ids: False,
                           check_every=2)
  for field in _FIELDS:
    np.testing.assert_array_equal(getattr(never, field), getattr(one, field), err_msg=field)

  stop_at = [2, None, 4, 1, None]  # row r stops once it has stop_at[r] tokens
  seen = {}
  def should_stop(r, ids):
    np.testing.assert_array_equal(ids, one.tokens[r, :len(ids)])  # what decoding made so far
    seen[r] = len(ids)
    return stop_at[r] is not None and len(ids) >= stop_at[r]
  part = jax.device_get(sampler.generate(prompts, lengths, cfg, key, should_stop=should_stop,
                                         check_every=2))
  for r, k in enumerate(stop_at):
    n = int(part.num_tokens[r])
    if k is None:
      for field in _FIELDS:
        np.testing.assert_array_equal(getattr(part, field)[r], getattr(one, field)[r])
      continue
    assert n == seen[r] and k <= n < int(one.num_tokens[r]), (r, n)
    np.testing.assert_array_equal(part.tokens[r, :n], one.tokens[r, :n])
    assert np.all(part.tokens[r, n:] == 0) and part.n_forward[r] < one.n_forward[r]


def test_a_batch_ends_once_should_stop_has_ended_every_row(tiny, rng):
  """AR, one token per iteration: the rows are tested after 3, 6, 9 tokens."""
  prompts, lengths = _ragged_prompts(rng, [3, 7, 1], 8)
  cfg = sampler_lib.SamplerConfig(mode='ar', max_new_tokens=20)
  tested = []
  def should_stop(r, ids):
    tested.append(len(ids))
    return len(ids) >= 2 + 3 * r
  res = sampler_lib.Sampler(tiny).generate(prompts, lengths, cfg, should_stop=should_stop,
                                           check_every=3)
  assert list(np.asarray(res.num_tokens)) == [3, 6, 9]
  assert max(tested) == 9  # no segment ran after the last row stopped


@pytest.mark.parametrize('rule, picks', [
    (dict(commit='threshold', threshold=0.58), [0]), (dict(commit='threshold', threshold=0.5),
                                                       [0, 1]),
    (dict(commit='fixed', tokens_per_pass=1), [0]), (dict(commit='factor', factor=1.3), [0]),
    (dict(commit='factor', factor=1.4), [0, 1]), (dict(commit='entropy', entropy_bound=0.5),
                                                   [1]),
    (dict(commit='entropy', entropy_bound=0.7), [0, 1])])
def test_each_commit_rule_reaches_the_denoising_pass(rule, picks):
  """Slot 0 is the more confident (0.6 against 0.55), slot 1 the more certain (entropy 0.69
  against 0.95): the entropy rule takes slot 1 first, the others slot 0; the factor rule takes
  slot 1 too once 3 (1 - 0.55) = 1.35 < factor."""
  probs = jnp.array([[[0.6, 0.2, 0.2, 0.0], [0.55, 0.45, 0.0, 0.0]]])
  logits = jnp.log(jnp.maximum(probs, 1e-30))
  cfg = sampler_lib.SamplerConfig(mode='diffusion_trust', block_size=2, **rule)
  targets, masked, active = sampler_lib._denoise_update(  # pylint: disable=protected-access
      logits, jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), bool), jax.random.key(0), cfg)
  assert np.asarray(masked).tolist() == [[0 not in picks, 1 not in picks]] and bool(active[0])
  assert np.all(np.asarray(targets)[0, picks] == 0)  # the argmax tokens
