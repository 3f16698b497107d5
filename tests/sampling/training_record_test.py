"""A checkpoint's training record: what it keeps through AR runs, and what decoding makes of it."""
import pytest

from flare_jax.objective import two_stream
from flare_jax.sampling import training_record

FLARE = dict(name='flare', block_size=8, num_views=2, logit_shift=True, noise='uniform')
AR = dict(FLARE, name='ar')


def test_a_flare_run_records_its_settings():
  record = training_record.make_record(FLARE, 100, '/ckpt/ar', init_record=None)
  assert record == {'objective': 'flare', 'steps': 100, 'init_from': '/ckpt/ar', 'flare': {
      'block_size': 8, 'num_views': 2, 'logit_shift': True, 'noise': 'uniform'}}
  assert training_record.default_block_size(record) == 8


def test_an_ar_run_keeps_the_flare_settings_of_its_init_and_has_none_of_its_own():
  flare = training_record.make_record(FLARE, 100, '', init_record=None)
  after = training_record.make_record(AR, 50, '/ckpt/flare', init_record=flare)
  assert after['objective'] == 'ar' and after['flare'] == flare['flare']
  scratch = training_record.make_record(AR, 50, '', init_record=None)
  assert scratch['flare'] is None and scratch['init_from'] is None
  assert training_record.trained_block_size(scratch) is None
  assert training_record.default_block_size(scratch) == training_record.DEFAULT_BLOCK_SIZE


def test_noisy_modes_are_checked_against_the_record():
  flare = training_record.make_record(FLARE, 1, '', None)
  ar_only = training_record.make_record(AR, 1, '', None)
  no_shift = training_record.make_record(dict(FLARE, logit_shift=False), 1, '', None)
  for mode in ('ar', 'ar_trust', 'diffusion_trust'):
    assert training_record.check_mode(mode, None) is None  # no record: nothing to say
    assert training_record.check_mode(mode, flare) is None
  assert training_record.check_mode('ar', ar_only) is None
  assert 'never trained with the FLARE objective' in training_record.check_mode(
      'diffusion_trust', ar_only)
  assert training_record.check_mode('ar', no_shift) is None
  imported = training_record.imported_record('/hf/qwen')
  assert 'converted from /hf/qwen, which records no FLARE training' in training_record.check_mode(
      'ar_trust', imported)
  assert training_record.default_block_size(imported) == training_record.DEFAULT_BLOCK_SIZE
  with pytest.raises(ValueError, match='objective.logit_shift=False'):
    training_record.check_mode('ar_trust', no_shift)


def test_the_trained_objective_is_the_recorded_one_else_the_default():
  noise = 'position_dependent'
  record = training_record.make_record(dict(FLARE, num_views=1, noise=noise), 100, '', None)
  got = training_record.trained_objective(record)
  assert (got.block_size, got.num_views, got.logit_shift, got.noise) == (8, 1, True, noise)
  default = two_stream.ObjectiveConfig()
  assert training_record.trained_objective(None) == default
  assert training_record.trained_objective(training_record.imported_record('/hf')) == default
