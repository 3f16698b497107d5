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
