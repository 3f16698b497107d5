"""launch.bench_train on CPU: --steps=0 compiles each objective and reports XLA's memory estimate
without running a step."""
import subprocess
import sys


def test_compile_only_reports_memory_and_no_step_time(one_cpu_device_env):
  run = subprocess.run(
      [sys.executable, '-m', 'launch.bench_train', '--config=configs/flare_tiny.py',
       '--objectives=ar,flare', '--steps=0', '--config.data.seq_len=32',
       '--config.data.batch_size=2'],
      capture_output=True, text=True, timeout=600, env=one_cpu_device_env)
  assert run.returncode == 0, run.stderr[-3000:]
  rows = {line.split('|')[1].strip(): line for line in run.stdout.splitlines()
          if line.startswith('| ar ') or line.startswith('| flare ')}
  assert set(rows) == {'ar', 'flare'}, run.stdout[-2000:]
  header = next(line for line in run.stdout.splitlines() if line.startswith('| objective'))
  cols = [c.strip() for c in header.split('|')[1:-1]]
  for name, line in rows.items():
    cells = dict(zip(cols, (c.strip() for c in line.split('|')[1:-1])))
    assert cells['step_ms'] == 'nan' and float(cells['compile_s']) > 0, line
    assert float(cells['temp_gib']) > 0 and float(cells['step_mem_gib']) > 0, line
  assert 'warm-up step' not in run.stdout
