"""Token policies: temperature / top-k / top-p warping and the Diffusion-Trust commit rules."""
import jax
import jax.numpy as jnp
import numpy as np

from flare_jax.sampling import policies


def test_top_k_and_top_p_keep_the_right_tokens():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  probs = lambda **kw: np.asarray(policies.probs_of(logits, 1.0, **kw))[0]
  np.testing.assert_allclose(probs(top_k=2), [0.625, 0.375, 0, 0], atol=1e-6)
  # top_p=0.8: 0.5 + 0.3 reaches 0.8, so the third token (mass before it 0.8) is dropped.
  np.testing.assert_allclose(probs(top_p=0.8), [0.625, 0.375, 0, 0], atol=1e-6)
  np.testing.assert_allclose(probs(top_p=0.81), [0.5, 0.3, 0.15, 0] / np.float32(0.95), atol=1e-6)
  np.testing.assert_allclose(probs(), [0.5, 0.3, 0.15, 0.05], atol=1e-6)
  assert np.asarray(policies.probs_of(logits, 0.0))[0].tolist() == [1, 0, 0, 0]


def test_sampling_with_temperature_follows_the_warped_distribution():
  logits = jnp.log(jnp.array([0.6, 0.3, 0.1]))
  draws = policies.sample(jax.random.key(0), jnp.broadcast_to(logits, (100_000, 3)), 0.5)
  freq = np.bincount(np.asarray(draws), minlength=3) / 100_000
  expected = np.array([0.36, 0.09, 0.01]) / 0.46
  np.testing.assert_allclose(freq, expected, atol=5e-3)


def test_commit_rules():
  conf = jnp.array([[0.95, 0.2, 0.91, 0.5], [0.1, 0.3, 0.2, 0.05]])
  masked = jnp.array([[True, True, True, False], [True, True, True, True]])
  got = np.asarray(policies.threshold_commit(conf, masked, 0.9))
  assert got.tolist() == [[True, False, True, False], [False, True, False, False]]
  got = np.asarray(policies.top_k_commit(conf, masked, 2))
  assert got.tolist() == [[True, False, True, False], [False, True, True, False]]
  # factor 1: 0.91 is second, 3 (1 - 0.91) = 0.27 < 1; 0.2 third, 4 (1 - 0.2) = 3.2 is not
  got = np.asarray(policies.factor_commit(conf, masked, 1.0))
  assert got.tolist() == [[True, False, True, False], [False, True, False, False]]
  assert np.asarray(policies.factor_commit(conf, masked, 0.1)).tolist() == [
      [True, False, False, False], [False, True, False, False]]
  ent = jnp.array([[0.1, 2.0, 0.3, 0.0], [1.0, 0.5, 0.2, 0.4]])
  # row 1 by rising entropy: 0.2, 0.4, 0.5, 1.0; entropy before each: 0, 0.2, 0.6, 1.1
  got = np.asarray(policies.entropy_commit(ent, masked, 0.6))
  assert got.tolist() == [[True, True, True, False], [False, True, True, True]]
  assert np.asarray(policies.entropy_commit(ent, masked, 0.0)).tolist() == [
      [True, False, False, False], [False, False, True, False]]


def _random_rows(rng, n=200, width=8):
  masked = rng.random((n, width)) < 0.7
  masked[np.arange(n), rng.integers(0, width, n)] = True  # every row has a masked slot
  return rng.random((n, width)).astype(np.float32), masked


def test_factor_rule_commits_the_largest_prefix_the_definition_allows(rng):
  conf, masked = _random_rows(rng)
  for factor in (0.05, 0.5, 1.0, 3.0):
    got = np.asarray(policies.factor_commit(jnp.asarray(conf), jnp.asarray(masked), factor))
    for c, m, g in zip(conf, masked, got):
      ranked = np.sort(c[m])[::-1]  # c_1 >= c_2 >= ...
      ok = [(i + 1) * (1 - ci) < factor for i, ci in enumerate(ranked, 1)]
      n = max(1, next((i for i, o in enumerate(ok) if not o), len(ok)))  # the prefix, >= 1
      assert g.sum() == n and not (g & ~m).any()
      assert c[g].min() >= (ranked[n] if n < len(ranked) else -1)  # the n most confident


def test_entropy_rule_commits_while_the_entropy_before_stays_within_the_bound(rng):
  ent, masked = _random_rows(rng)
  ent = ent * 2
  previous = np.zeros_like(masked)
  for bound in (0.0, 0.3, 1.0, 4.0, np.inf):
    got = np.asarray(policies.entropy_commit(jnp.asarray(ent), jnp.asarray(masked), bound))
    assert not (got & ~masked).any() and got.any(axis=1).all()
    assert not (previous & ~got).any()  # a larger bound commits a superset
    for h, m, g in zip(ent, masked, got):
      assert h[g].max() <= h[m & ~g].min(initial=np.inf)  # the most certain slots
      assert h[g].sum() - h[g].max() <= bound + 1e-6  # the entropy before the last one
      if (m & ~g).any():  # and the next one would exceed it
        assert h[g].sum() > bound - 1e-6
    previous = got
  assert (previous == masked).all()  # unbounded: every masked slot


def test_entropy_of_distributions():
  probs = jnp.array([[0.25] * 4, [1.0, 0, 0, 0], [0.5, 0.5, 0, 0]])
  np.testing.assert_allclose(policies.entropy(probs), [np.log(4), 0, np.log(2)], rtol=1e-6)


def test_greedy_accept_is_speculative_sampling_with_one_hot_distributions():
  rng = np.random.default_rng(0)
  vocab, k = 5, 4
  drafts = jnp.asarray(rng.integers(0, 3, (64, k)), jnp.int32)  # few values: many matches
  targets = jnp.asarray(rng.integers(0, 3, (64, k + 1)), jnp.int32)
  want = policies.speculative_accept(jax.random.key(0), drafts, jax.nn.one_hot(drafts, vocab),
                                     jax.nn.one_hot(targets, vocab))
  got = policies.greedy_accept(drafts, targets)
  assert len(set(np.asarray(got[0]).tolist())) > 2  # several acceptance lengths exercised
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
