"""launch.bench_decode --cpu_smoke: every (tokens, mode, implementation) row, the kernel's outputs
agreeing with XLA's, and a bad implementation name refused before any work."""
import json
import subprocess
import sys


def _bench(*args):
  return subprocess.run([sys.executable, '-m', 'launch.bench_decode', '--cpu_smoke', *args],
                        capture_output=True, text=True, timeout=300)


def test_cpu_smoke_rows_and_the_outputs_check(tmp_path):
  out = tmp_path / 'decode.json'
  run = _bench('--calls=2', '--repeats=1', '--tokens=1,3', '--impls=pallas:16:2,xla',
               f'--out={out}')
  assert run.returncode == 0, run.stderr[-2000:]
  rows = json.loads(out.read_text())
  assert [(r['tokens'], r['mode'], r['impl']) for r in rows] == [
      (t, m, i) for t in (1, 3) for m in ('state', 'outputs') for i in ('xla', 'pallas:16:2')]
  for r in rows:
    assert r['us_per_call'] > 0 and r['max_diff_vs_xla'] < 1e-2
    assert r['vs_xla'] == 1.0 if r['impl'] == 'xla' else r['vs_xla'] > 0
  assert '| 3 | outputs | pallas:16:2 |' in run.stdout


def test_cpu_smoke_fused_pass_rows(tmp_path):
  """--op=fused: the whole cached pass (conv to rule), the kernel against XLA's chain."""
  out = tmp_path / 'fused.json'
  run = _bench('--op=fused', '--calls=2', '--repeats=1', '--tokens=2', '--impls=xla,pallas:16:2',
               f'--out={out}')
  assert run.returncode == 0, run.stderr[-2000:]
  rows = json.loads(out.read_text())
  assert [(r['op'], r['mode'], r['impl']) for r in rows] == [
      ('fused', m, i) for m in ('state', 'outputs') for i in ('xla', 'pallas:16:2')]
  assert all(r['max_diff_vs_xla'] < 1e-2 for r in rows)


def test_a_bad_implementation_is_a_usage_error():
  run = _bench('--impls=pallas:64')
  assert run.returncode != 0 and 'is not xla, pallas or pallas:BLOCK_V:WARPS' in run.stderr
  assert 'Traceback' not in run.stderr
