"""The profiled step window: its spec and when the trace starts and stops."""
import pytest

from flare_jax.train import profiling


@pytest.mark.parametrize('spec, expected', [('', None), ('3:3', (3, 3)), ('2:50', (2, 50))])
def test_window_specs(spec, expected):
  assert profiling.parse_profile_steps(spec, num_steps=10) == expected


@pytest.mark.parametrize('spec, message', [
    ('5', "must be 'FIRST:LAST'"), ('a:b', "must be 'FIRST:LAST'"),
    ('1:2:3', "must be 'FIRST:LAST'"),
    ('0:2', '1 <= FIRST <= LAST'), ('4:3', '1 <= FIRST <= LAST'),
    ('11:12', r'starts at step 11, after the run ends \(train.num_steps=10\)'),
])
def test_bad_window_specs_are_refused(spec, message):
  with pytest.raises(ValueError, match=message):
    profiling.parse_profile_steps(spec, num_steps=10)


def test_the_trace_brackets_the_window_and_an_early_stop_closes_it(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(profiling.jax.profiler, 'start_trace', lambda d: calls.append(('start', d)))
  monkeypatch.setattr(profiling.jax.profiler, 'stop_trace', lambda: calls.append(('stop',)))
  logs = []
  with profiling.StepProfiler((2, 4), str(tmp_path / 'p'), logs.append) as profiler:
    for done in (1, 2, 3):  # the run stops after step 3
      profiler.before_step(done)
      calls.append(('step', done))
      profiler.after_step(done, None)
  assert calls == [('step', 1), ('start', str(tmp_path / 'p')), ('step', 2), ('step', 3), ('stop',)]
  assert logs == [f'profile of steps 2:3 written to {tmp_path / "p"} '
                  f'(tensorboard --logdir={tmp_path / "p"}, or its *.trace.json.gz in Perfetto)']


def test_a_resumed_run_past_the_window_start_does_not_profile(tmp_path, monkeypatch):
  monkeypatch.setattr(profiling.jax.profiler, 'start_trace', lambda d: pytest.fail('traced'))
  logs = []
  profiler = profiling.StepProfiler((2, 4), str(tmp_path), logs.append)
  profiler.skip_before(2)
  for done in (3, 4):
    profiler.before_step(done)
    profiler.after_step(done, None)
  assert 'not profiling' in logs[0]
