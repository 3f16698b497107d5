"""launch.bench_schedules' case parsing and its per-case ratio table (fake results, no timing)."""
import pytest
from absl import app

from launch import schedule_cases


def test_parse_cases():
  assert schedule_cases.parse_cases(['4096:1:1', '16384:16:2']) == [(4096, 1, 1), (16384, 16, 2)]
  assert schedule_cases.parse_cases([]) == []
  for bad in ('4096:4', '4096:0:2', 'a:4:2', '4096:4:2:1'):
    with pytest.raises(app.UsageError, match='T:block_size:views'):
      schedule_cases.parse_cases([bad])


def test_check_schedules():
  model = ('auto', 'chunked', 'triton')
  schedule_cases.check_schedules(['chunked', 'both:triton', 'both:auto', 'clean', 'conv',
                                  'conv_autodiff'], model)
  for bad in ('nope', 'both:nope', 'both:clean', 'triton_kernel'):
    with pytest.raises(app.UsageError, match=f"unknown \\['{bad}'\\]"):
      schedule_cases.check_schedules(['chunked', bad], model)


def test_parse_launch():
  assert schedule_cases.parse_launch('') is None
  assert schedule_cases.parse_launch('128,8,4') == (128, 8, 4)
  for bad in ('128,8', '96,8,4', '8,4,4', '128,8,32', '128,x,4', '128,0,4'):
    with pytest.raises(app.UsageError, match='V tile,warps,dV pass warps'):
      schedule_cases.parse_launch(bad)
  assert schedule_cases.parse_launch('64,4,8', '--seed_bwd_launch') == (64, 4, 8)
  with pytest.raises(app.UsageError, match='context V tile,context warps,rows warps'):
    schedule_cases.parse_launch('64,4', '--seed_bwd_launch')
  # The clean state passes' launches end in pipeline stages (1 to 4), not warps.
  for flag in ('--clean_state_launch', '--clean_dh_launch'):
    assert schedule_cases.parse_launch('64,4,3', flag) == (64, 4, 3)
    for bad in ('64,4,5', '64,4,0', '64,3,2', '8,4,2'):
      with pytest.raises(app.UsageError, match='V tile,warps,stages'):
        schedule_cases.parse_launch(bad, flag)


def test_table_ratios_stay_within_each_case():
  case = lambda t, v, **ms: [dict(T=t, block=4, V=v, schedule=name, fwd_ms=x, fwdbwd_ms=2 * x,
                                  fwd_temp_gib=x / 8, fwdbwd_temp_gib=x / 2)
                             for name, x in ms.items()]
  results = (case(64, 1, chunked=4.0, pallas=2.0, clean=1.0)
             + case(128, 2, chunked=10.0, pallas=5.0, clean=2.0)
             + [dict(T=128, block=4, V=2, schedule='simple', error='timeout after 9 s')])
  rows = schedule_cases.table(results, 'chunked').split('\n')[2:]
  cells = [[c.strip() for c in row.strip('|').split('|')] for row in rows]
  # T=64: pallas / chunked = 0.5; (clean + pallas) / ((1 + V) clean) = 3 / 2.
  assert cells[1][:4] == ['64', '4', '1', 'pallas']
  assert cells[1][8:] == ['0.5x', '0.5x', '1.50', '1.50', '0.5x', '0.5x']
  # T=128, V=2: its own chunked and clean: 0.5x and (2 + 5) / (3 * 2).
  assert cells[4][8:] == ['0.5x', '0.5x', '1.17', '1.17', '0.5x', '0.5x']
  assert cells[5][10:] == ['-', '-', '0.2x', '0.2x']  # the clean row itself
  assert 'failed: timeout after 9 s' in rows[6]


def test_whole_pass_rows_are_not_added_to_the_clean_pass():
  """A both:<schedule> row (clean and noisy outputs in one call) over (1 + V) clean passes."""
  results = [dict(T=64, block=4, V=2, schedule=name, fwd_ms=x, fwdbwd_ms=x)
             for name, x in ((schedule_cases.WHOLE_PASS + 'triton', 4.5), ('clean', 1.0),
                             (schedule_cases.CONV, 0.3))]
  rows = schedule_cases.table(results, 'clean').split('\n')[2:]
  cells = [[c.strip() for c in row.strip('|').split('|')] for row in rows]
  assert cells[0][10:12] == ['1.50', '1.50']
  assert cells[2][3:6] == ['conv', '0.30', '0.30'] and cells[2][10:12] == ['-', '-']  # not a pass


def test_each_xla_flag_set_is_its_own_case():
  """Rows timed under another XLA flag set divide by that set's baseline, and say which set."""
  results = [dict(T=64, block=4, V=1, schedule=name, fwd_ms=x, fwdbwd_ms=x, **extra)
             for extra in ({}, dict(xla='--xla_f=1'))
             for name, x in (('chunked', 4.0 if not extra else 8.0), ('triton', 2.0))]
  rows = schedule_cases.table(results, 'chunked').split('\n')[2:]
  cells = [[c.strip() for c in row.strip('|').split('|')] for row in rows]
  assert [c[3] for c in cells] == ['chunked', 'triton', 'chunked [--xla_f=1]', 'triton [--xla_f=1]']
  assert cells[1][8] == '0.5x' and cells[3][8] == '0.25x'
