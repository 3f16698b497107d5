"""launch.bench_util: kernel-time aggregation, its table, and the environment handed to children."""
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import pytest

from launch import bench_util


def test_top_kernels_ranks_by_total_time_per_call():
  ms = 1e6  # ns
  events = [('gemm', 2 * ms), ('add', 1 * ms), ('gemm', 4 * ms), ('copy', 0.5 * ms),
            ('add', 1 * ms)]
  got = bench_util.top_kernels(events, calls=2, top=2)
  assert got == [['gemm', 3.0, 1.0], ['add', 1.0, 1.0]]
  assert bench_util.top_kernels([], calls=1, top=5) == []


def test_time_ratios_cover_the_modes_both_rows_timed():
  row = {'fwd_ms': 0.5, 'fwdbwd_ms': 2.6}
  base = {'fwd_ms': 0.4, 'fwdbwd_ms': 2.0}
  assert bench_util.time_ratios(row, base, ['fwd', 'fwdbwd']) == 'fwd 1.25x, fwdbwd 1.30x'
  assert bench_util.time_ratios(row, {'fwdbwd_ms': 2.0}, ['fwd', 'fwdbwd']) == 'fwdbwd 1.30x'
  assert bench_util.time_ratios(row, base, ['fwd']) == 'fwd 1.25x'


def test_device_timeline_splits_calls_at_the_widest_gaps_and_merges_overlaps():
  us = 1000  # ns
  call = lambda t0, gap: [(t0, t0 + 10 * us), (t0 + 5 * us, t0 + 12 * us),  # two streams overlap
                          (t0 + (12 + gap) * us, t0 + (20 + gap) * us)]
  # Three calls 1 ms apart (the host's waits), with idle gaps of 2, 3 and 7 us inside them.
  intervals = call(0, 2) + call(1000 * us, 3) + call(2000 * us, 7)
  got = bench_util.device_timeline(intervals[::-1], calls=3)  # order does not matter
  assert got == dict(span_ms=0.023, busy_ms=0.020, idle_ms=0.003, widest_gap_ms=0.003,
                     launches=3)
  one = bench_util.device_timeline(call(0, 2), calls=1)
  assert one == dict(span_ms=0.022, busy_ms=0.020, idle_ms=0.002, widest_gap_ms=0.002, launches=3)
  assert bench_util.device_timeline([], calls=2) == {}
  line = bench_util.timeline_line(one, wall_ms=0.05)
  assert line == ('GPU per call: span 0.022 ms, busy 0.020, idle 0.002 (widest gap 0.002), '
                  '3 launches; wall 0.050 ms')



def test_median_ms_times_back_to_back_calls_and_syncs_the_last(monkeypatch):
  """With back_to_back=n: n calls per timing, one sync (of the last result), time divided by n."""
  clock = iter(range(0, 1000, 1))  # perf_counter advances 1 s per reading
  monkeypatch.setattr(bench_util.time, 'perf_counter', lambda: next(clock))
  calls, synced = [], []
  fn = lambda: calls.append(len(calls)) or len(calls)
  got = bench_util.median_ms(fn, synced.append, warmup=2, repeats=3, back_to_back=4)
  assert len(calls) == 2 + 3 * 4
  assert synced == [1, 2, 6, 10, 14]  # each warm-up call, then the last of each timing
  assert got == 1e3 / 4  # two readings 1 s apart per timing, over 4 calls
  assert bench_util.median_ms(fn, synced.append, warmup=0, repeats=1) == 1e3
  assert 'each call synced' in bench_util.timing_note(5, 2, 1)
  assert 'per call of 10 issued back to back' in bench_util.timing_note(5, 2, 10)

def test_kernel_table_rows():
  rows = bench_util.kernel_table([['intra_kernel', 0.5371, 1.0], ['fusion', 0.01, 24.0]])
  assert rows.split('\n')[2:] == ['| `intra_kernel` | 0.537 | 1 |', '| `fusion` | 0.010 | 24 |']


@pytest.mark.parametrize('value, kept', [('', False), ('  ', False), ('/tmp/tc', True)])
def test_child_env_drops_only_an_empty_triton_cache_dir(monkeypatch, value, kept):
  monkeypatch.setenv('TRITON_CACHE_DIR', value)
  monkeypatch.setenv('SOME_OTHER', 'x')
  env = bench_util.child_env()
  assert env['SOME_OTHER'] == 'x'
  assert ('TRITON_CACHE_DIR' in env) == kept
  if kept:
    assert env['TRITON_CACHE_DIR'] == value


def test_record_keeps_every_finished_case_on_disk(tmp_path, capsys):
  path = str(tmp_path / 'out.json')
  results = []
  bench_util.record(results, dict(case=1, ms=2.5), path)
  with open(path) as f:
    assert json.load(f) == [dict(case=1, ms=2.5)]  # on disk before the next case runs
  bench_util.record(results, dict(case=2, error='timeout after 9 s'), path)
  with open(path) as f:
    assert json.load(f) == results == [dict(case=1, ms=2.5),
                                       dict(case=2, error='timeout after 9 s')]
  lines = capsys.readouterr().out.splitlines()
  assert [json.loads(line)['case'] for line in lines] == [1, 2]
  assert not os.path.exists(path + '.tmp')


@pytest.mark.gpu
def test_gpu_kernel_profile_sees_each_launch():
  x = jnp.ones((4096, 4096), jnp.float32)
  f = jax.jit(jnp.sin)
  f(x).block_until_ready()
  kernels, timeline = bench_util.jax_kernel_profile(lambda: f(x), calls=3)
  assert len(kernels) == 1, kernels
  name, ms, launches = kernels[0]
  assert 'sin' in name and launches == 1 and ms > 0
  assert timeline['launches'] == 1 and timeline['idle_ms'] == 0
  assert timeline['span_ms'] == pytest.approx(ms, rel=0.5)


def test_xla_flag_sets_go_after_the_inherited_ones():
  env = {'PATH': '/bin', 'XLA_FLAGS': '--xla_a=1'}
  got = bench_util.with_xla_flags(env, ' --xla_a=2 --xla_b=true ')
  assert got == {'PATH': '/bin', 'XLA_FLAGS': '--xla_a=1 --xla_a=2 --xla_b=true'}  # last one wins
  assert env == {'PATH': '/bin', 'XLA_FLAGS': '--xla_a=1'}  # the caller's dict is left alone
  assert bench_util.with_xla_flags(env, 'default') == env
  assert 'XLA_FLAGS' not in bench_util.with_xla_flags({'PATH': '/bin'}, 'default')
  assert bench_util.with_xla_flags({}, '--xla_b=1') == {'XLA_FLAGS': '--xla_b=1'}


_FAKE_BENCH = """
import os, sys
from launch import bench_util
if os.environ.get('XLA_FLAGS', '').endswith('--crash'):
  sys.exit('no such flag')
rows = [dict(case=1, argv=sys.argv[1:], xla_flags=os.environ.get('XLA_FLAGS', ''))]
bench_util.print_result({'rows': rows})
"""


def test_xla_variants_each_run_a_child_with_its_flags(tmp_path, monkeypatch, capsys):
  """Each flag set reruns the module with --child and its flags after the inherited XLA_FLAGS; the
  runner's own flags (and `drop`) stay behind; a child that fails is one error row."""
  (tmp_path / 'fake_bench.py').write_text(_FAKE_BENCH)
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join([str(tmp_path), root]))
  monkeypatch.setenv('XLA_FLAGS', '--xla_inherited=1')
  monkeypatch.setattr(sys, 'argv', ['fake_bench', '--batch=8', '--xla_variants=a;b', '--hf',
                                    '--out=x.json', '--variant_timeout=60'])
  variants = bench_util.xla_variants(' default ; --xla_b=2 ;; --crash ')
  assert variants == ['default', '--xla_b=2', '--crash']
  rows = bench_util.run_xla_variants('fake_bench', variants, 60, '', drop=('--hf',))
  capsys.readouterr()
  assert [r.get('xla_flags') for r in rows[:2]] == ['--xla_inherited=1',
                                                    '--xla_inherited=1 --xla_b=2']
  assert rows[0]['argv'] == rows[1]['argv'] == ['--child', '--batch=8']
  assert [r['xla'] for r in rows] == variants
  assert 'no such flag' in rows[2]['error']


def test_marginal_step_is_the_slope_through_two_calls_or_nan_when_unresolved():
  # 10 passes in 50 ms and 2 passes in 18 ms: 4 ms a pass on top of a 10 ms fixed cost
  got = bench_util.marginal_step(0.050, 10.0, 0.018, 2.0)
  assert got['step_ms'] == pytest.approx(4.0) and got['fixed_ms'] == pytest.approx(10.0)
  for slower_base in (0.050, 0.051):  # the longer call no slower: no step to report
    got = bench_util.marginal_step(0.050, 10.0, slower_base, 2.0)
    assert math.isnan(got['step_ms']) and math.isnan(got['fixed_ms'])
