"""launch.bench_attention_decode --cpu_smoke: every (tokens, implementation) row, the kernel's
outputs agreeing with XLA's, and a bad implementation name refused before any work."""
import json
import subprocess
import sys


def _bench(*args):
  return subprocess.run([sys.executable, '-m', 'launch.bench_attention_decode', '--cpu_smoke',
                         *args], capture_output=True, text=True, timeout=300)


def test_cpu_smoke_rows_and_the_outputs_check(tmp_path):
  out = tmp_path / 'attention_decode.json'
  run = _bench('--calls=2', '--repeats=1', '--tokens=1,3', '--impls=pallas:3:2,xla,pallas',
               f'--out={out}')
  assert run.returncode == 0, run.stderr[-2000:]
  rows = json.loads(out.read_text())
  assert [(r['tokens'], r['impl']) for r in rows] == [
      (t, i) for t in (1, 3) for i in ('xla', 'pallas:3:2', 'pallas')]
  for r in rows:
    assert r['us_per_call'] > 0 and r['max_diff_vs_xla'] < 1e-2
    assert r['vs_xla'] == 1.0 if r['impl'] == 'xla' else r['vs_xla'] > 0
  assert '| 2 | 64 | 3 | pallas:3:2 |' in run.stdout


def test_a_bad_implementation_is_a_usage_error():
  run = _bench('--impls=pallas:4')
  assert run.returncode != 0 and 'pallas:SPLITS:WARPS' in run.stderr
