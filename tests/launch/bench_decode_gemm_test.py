"""launch.bench_decode_gemm --cpu_smoke: a row per (shape, layout), both layouts computing the same
chained products, and a bad layout refused before any work."""
import json
import subprocess
import sys


def _bench(*args):
  return subprocess.run([sys.executable, '-m', 'launch.bench_decode_gemm', '--cpu_smoke', *args],
                        capture_output=True, text=True, timeout=300)


def test_cpu_smoke_rows_and_the_layouts_agree(tmp_path):
  out = tmp_path / 'gemm.json'
  run = _bench(f'--out={out}')
  assert run.returncode == 0, run.stderr[-2000:]
  rows = json.loads(out.read_text())
  assert [(r['k'], r['n'], r['layout']) for r in rows] == [
      (k, n, layout) for k, n in ((64, 96), (96, 64)) for layout in ('kn', 'nk')]
  for r in rows:
    assert r['us_per_gemm'] > 0 and r['weight_gb_per_s'] > 0 and r['max_diff'] < 1e-2
  assert '| 96 x 64 | nk |' in run.stdout


def test_a_bad_layout_is_a_usage_error():
  run = _bench('--layouts=kn,mk')
  assert run.returncode != 0 and "'mk' is not kn or nk" in run.stderr
