"""The loss: tiled NLL equals untiled NLL; accounting; the gradient matches finite differences."""
import jax
from jax import flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flare_jax.model import config as config_lib
from flare_jax.model import transformer
from flare_jax.objective import losses
from flare_jax.objective import two_stream


@pytest.mark.parametrize('tile', [1, 7, 64], ids=['tile1', 'tile7', 'untiled'])
def test_tiled_weighted_nll_equals_full_logits_nll(rng, make_model, tile):
  model = make_model()
  hidden = jnp.asarray(rng.normal(size=(2, 23, model.cfg.hidden_size)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, model.cfg.vocab_size, (2, 23)), jnp.int32)
  weights = jnp.asarray(rng.uniform(size=(2, 23)) * (rng.uniform(size=(2, 23)) < 0.7), jnp.float32)
  logits = np.asarray(model.logits(hidden), np.float64)
  top = logits.max(-1, keepdims=True)
  logz = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[..., 0]
  picked = np.take_along_axis(logits, np.asarray(labels)[..., None], -1)[..., 0]
  want = np.sum(np.asarray(weights) * (logz - picked))
  got = losses.weighted_nll_sum(model, hidden, labels, weights, tile=tile)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_loss_gradient_matches_finite_differences(make_row, make_model):
  model = make_model()
  batch = make_row(lengths=(10, 9), prompt=(2, 1))
  cfg = two_stream.ObjectiveConfig(block_size=3)
  key = jax.random.key(5)
  loss_fn = lambda m: two_stream.flare_loss(m, batch, key, cfg)[0]
  grads = nnx.jit(nnx.grad(loss_fn))(model)
  graphdef, params = nnx.split(model)
  flat, unravel = flatten_util.ravel_pytree(params)
  gflat, _ = flatten_util.ravel_pytree(nnx.state(grads))
  f = jax.jit(lambda x: loss_fn(nnx.merge(graphdef, unravel(x))))
  assert bool(jnp.all(jnp.isfinite(gflat)))
  for i in range(3):
    d = jax.random.normal(jax.random.key(10 + i), flat.shape)
    d = d / jnp.linalg.norm(d)
    eps = 1e-2
    fd = (f(flat + eps * d) - f(flat - eps * d)) / (2 * eps)
    np.testing.assert_allclose(float(fd), float(gflat @ d), rtol=2e-2, atol=2e-3)


def test_flare_loss_accounting(make_row, make_model):
  """loss = loss_ar + loss_diff; loss_ar is the plain AR loss; each target is hidden in exactly
  one of two complementary views except each block's last target (no slot of its own: hidden in
  both)."""
  model = make_model()
  batch = make_row(lengths=(21, 17), prompt=(4, 2))
  cfg = two_stream.ObjectiveConfig(block_size=4, num_views=2)
  loss, m = nnx.jit(lambda mdl, b: two_stream.flare_loss(mdl, b, jax.random.key(1), cfg))(model,
                                                                                         batch)
  ar, ar_m = nnx.jit(two_stream.ar_loss)(model, batch)
  n_targets = (21 - 4) + (17 - 2)
  n_blocks = -(-(21 - 4) // 4) + -(-(17 - 2) // 4)
  assert float(m['n_targets']) == n_targets == float(ar_m['n_targets'])
  hidden = float(m['hidden_frac_view1'] + m['hidden_frac_view2']) * n_targets
  np.testing.assert_allclose(hidden, n_targets + n_blocks, rtol=1e-6)
  np.testing.assert_allclose(float(loss), float(m['loss_ar'] + m['loss_diff']), rtol=1e-6)
  np.testing.assert_allclose(float(m['loss_ar']), float(ar), rtol=1e-5)
  assert float(m['loss_diff']) > 0


# remat 'none' (~65 s) is slow: 'block' scans the same layers; model_test checks remat itself
@pytest.mark.parametrize('remat', [pytest.param('none', marks=pytest.mark.slow), 'block'])
def test_scanned_layers_give_the_same_loss_and_gradients(make_row, remat):
  """scan_layers: the pattern (GDN, attention) x 2 as a lax.scan over stacked params equals the
  per-layer loop, for the two-stream loss and every parameter's gradient."""
  cfg = config_lib.VARIANTS['tiny'].replace(
      dtype='float32', gdn_chunk_size=16, remat=remat,
      layer_types=(config_lib.LINEAR, config_lib.FULL) * 2)
  batch = make_row(lengths=(12, 9), prompt=(2, 1))
  objective = two_stream.ObjectiveConfig(block_size=3)
  loss_fn = lambda m: two_stream.flare_loss(m, batch, jax.random.key(5), objective)[0]
  (want, want_g), (got, got_g) = (
      nnx.jit(nnx.value_and_grad(loss_fn))(transformer.FlareLM(c, rngs=nnx.Rngs(0)))
      for c in (cfg, cfg.replace(scan_layers=True)))
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  for (path, g), (_, w) in zip(jax.tree_util.tree_leaves_with_path(nnx.state(got_g)),
                               jax.tree_util.tree_leaves_with_path(nnx.state(want_g))):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_layer_period():
  L, F = config_lib.LINEAR, config_lib.FULL
  assert transformer.layer_period((L, L, L, F) * 6) == 4
  assert transformer.layer_period((L, F, L, F)) == 2
  assert transformer.layer_period((L, L)) == 1
  assert transformer.layer_period((L, F)) is None  # one repeat: nothing to scan
  assert transformer.layer_period((L, L, F)) is None
