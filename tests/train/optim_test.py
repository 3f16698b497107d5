"""Learning-rate schedules and the optimizer config's checks."""
import numpy as np
import optax
import pytest

from configs import base
from flare_jax.train import optim


def _optim(**fields):
  c = base.get_config().optim
  c.update(fields)
  return c


def _rates(cfg, num_steps):
  schedule = optim.learning_rate_schedule(cfg, num_steps)
  return np.array([float(schedule(step)) for step in range(num_steps + 1)])


@pytest.mark.parametrize('warmup, num_steps', [(100, 1000), (0, 50), (5, 6), (30, 7)])
def test_cosine_is_optax_warmup_cosine_decay(warmup, num_steps):
  """The default schedule is the one runs written before `optim.schedule` existed follow."""
  cfg = _optim(warmup_steps=warmup)
  expected = optax.warmup_cosine_decay_schedule(
      0.0, cfg.lr, warmup, max(num_steps, warmup + 1), cfg.lr * cfg.min_lr_ratio)
  np.testing.assert_array_equal(
      _rates(cfg, num_steps), [float(expected(s)) for s in range(num_steps + 1)])


@pytest.mark.parametrize('schedule', optim.SCHEDULES)
def test_every_schedule_warms_up_then_never_rises(schedule):
  cfg = _optim(schedule=schedule, warmup_steps=10, lr=2e-3, min_lr_ratio=0.05)
  rates = _rates(cfg, 100)
  np.testing.assert_allclose(rates[:11], np.linspace(0, 2e-3, 11), rtol=1e-6, atol=1e-12)
  assert np.all(np.diff(rates[10:]) <= 1e-12)
  floor = 2e-3 if schedule == 'constant' else 1e-4
  assert rates[100] == pytest.approx(floor, rel=1e-5)


def test_wsd_holds_the_peak_then_decays_linearly_over_its_share():
  cfg = _optim(schedule='wsd', warmup_steps=10, lr=1e-3, min_lr_ratio=0.0, decay_fraction=0.25)
  rates = _rates(cfg, 200)
  np.testing.assert_allclose(rates[10:151], 1e-3, rtol=1e-6)  # decay starts at step 150
  np.testing.assert_allclose(rates[150:], np.linspace(1e-3, 0.0, 51), rtol=1e-5, atol=1e-10)


def test_linear_decays_in_a_straight_line_after_warmup():
  cfg = _optim(schedule='linear', warmup_steps=4, lr=1.0, min_lr_ratio=0.2)
  np.testing.assert_allclose(_rates(cfg, 20)[4:], np.linspace(1.0, 0.2, 17), rtol=1e-6)


@pytest.mark.parametrize('fields, message', [
    (dict(schedule='step'), 'optim.schedule must be one of'),
    (dict(lr=0.0), 'optim.lr must be > 0'),
    (dict(warmup_steps=-1), 'optim.warmup_steps must be >= 0'),
    (dict(min_lr_ratio=1.5), r'optim.min_lr_ratio must be in \[0, 1\]'),
    (dict(decay_fraction=0.0), r'optim.decay_fraction must be in \(0, 1\]'),
    (dict(b2=1.0), r'optim.b1 and optim.b2 must be in \[0, 1\)'),
    (dict(eps=0.0), 'optim.eps must be > 0'),
    (dict(weight_decay=-0.1), 'optim.weight_decay must be >= 0'),
    (dict(grad_accum=0), 'optim.grad_accum must be >= 1'),
])
def test_out_of_range_fields_are_named(fields, message):
  with pytest.raises(ValueError, match=message):
    optim.make_optimizer(_optim(**fields), 100)


def test_zero_steps_are_refused():
  with pytest.raises(ValueError, match='train.num_steps must be >= 1'):
    optim.make_optimizer(_optim(), 0)


def test_a_warmup_the_run_cannot_finish_is_reported():
  assert optim.schedule_warning(_optim(warmup_steps=10), 100) is None
  assert 'never reaches optim.lr' in optim.schedule_warning(_optim(warmup_steps=100), 100)
  wsd = _optim(schedule='wsd', warmup_steps=90, decay_fraction=0.2)
  assert 'runs into the wsd decay, which starts at step 80' in optim.schedule_warning(wsd, 100)
