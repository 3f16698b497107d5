"""Block layout, noise and loss weights: complementary views, one AR term and unit diffusion weight
per target."""
import jax
import numpy as np
import pytest

from flare_jax.objective import corruption
from flare_jax.objective import layout as layout_lib
from flare_jax.objective import two_stream

MASK = 271


@pytest.mark.parametrize('noise', ['uniform', 'position_dependent'])
@pytest.mark.parametrize('shift', [True, False], ids=['shift', 'noshift'])
def test_complementary_views_and_token_equal_counts(make_row, noise, shift):
  batch = make_row(lengths=(30, 41), prompt=(6, 2))
  lay = layout_lib.block_layout(batch['tokens'], batch['segment_ids'], batch['response_mask'],
                                block_size=5, logit_shift=shift)
  res = corruption.corrupt(jax.random.key(3), lay, num_views=2, schedule=noise)
  m = np.asarray(res.masked[0])
  maskable = np.asarray(lay.maskable[0])
  np.testing.assert_array_equal(m[0] | m[1], maskable)
  assert not (m[0] & m[1]).any()
  cfg = two_stream.ObjectiveConfig(block_size=5, num_views=2, logit_shift=shift, noise=noise)
  inp = two_stream.build_input(batch, jax.random.key(3), cfg, MASK)
  # Every target: exactly one AR term and diffusion weight summing to exactly one.
  t = batch['tokens'].shape[1]
  tgt = np.asarray(lay.is_target[0])
  label_pos = np.arange(t) + (1 if shift else 0)
  per_target = np.zeros(t + 1)
  np.add.at(per_target, label_pos, np.asarray(inp.noisy_weights[0]).sum(0))
  np.testing.assert_allclose(per_target[:t][tgt], 1.0, atol=1e-6)
  assert per_target[:t][~tgt].sum() == 0
  ar = np.zeros(t + 1)
  np.add.at(ar, np.arange(t) + 1, np.asarray(inp.clean_weights[0]))
  np.testing.assert_array_equal(ar[:t] > 0, tgt)
  assert int(inp.n_targets) == tgt.sum()


def test_all_masked_and_block_layout_details(make_row):
  batch = make_row(lengths=(12,), prompt=(3,))
  lay = layout_lib.block_layout(batch['tokens'], batch['segment_ids'], batch['response_mask'],
                                block_size=4)
  # targets 3..11 -> blocks {3-6}, {7-10}, {11}; slots 2..5, 6..9, 10.
  np.testing.assert_array_equal(np.asarray(lay.block_start[0]),
                                [0, 1, 2, 2, 2, 2, 6, 6, 6, 6, 10, 11])
  np.testing.assert_array_equal(np.nonzero(np.asarray(lay.maskable[0]))[0], [3, 4, 5, 7, 8, 9])
  res = corruption.corrupt(jax.random.key(0), lay, num_views=1, schedule='all_masked')
  np.testing.assert_array_equal(res.masked[0, 0], lay.maskable[0])


@pytest.mark.parametrize('noise', ['uniform', 'position_dependent'])
def test_mask_rate_by_slot_rank(make_row, noise):
  """'uniform' masks every maskable slot of a block at the same rate; 'position_dependent' masks
  later slots more (probability 2t(i+1)/(n+1), clipped at 1)."""
  batch = make_row(lengths=(12,), prompt=(1,))  # targets 2..11: one block of 10, 9 maskable slots
  lay = layout_lib.block_layout(batch['tokens'], batch['segment_ids'], batch['response_mask'],
                                block_size=10)
  keys = jax.random.split(jax.random.key(0), 4000)
  masked = jax.vmap(lambda k: corruption.corrupt(k, lay, num_views=1, schedule=noise).masked)(keys)
  rate = np.asarray(masked[:, 0, 0]).mean(0)[np.asarray(lay.maskable[0])]  # per maskable slot
  assert rate.shape == (9,)
  # Reference rates: E_t[min(1, c t)] with t ~ U(0, 1]: c/2 for c <= 1, 1 - 1/(2c) otherwise.
  c = 2 * np.arange(1, 10) / 10 if noise == 'position_dependent' else np.ones(9)
  want = np.where(c <= 1, c / 2, 1 - 1 / (2 * c))
  np.testing.assert_allclose(rate, want, atol=0.04)  # ~5 standard errors at 4000 draws
