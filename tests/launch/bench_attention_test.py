"""launch.bench_attention --cpu_smoke: the script runs both cases end to end on interpreted
kernels and reports the two-stream row's work against the causal row's."""
import json
import subprocess
import sys


def test_cpu_smoke_reports_both_cases_and_the_two_stream_to_causal_ratios(tmp_path):
  out = tmp_path / 'attention.json'
  run = subprocess.run(
      [sys.executable, '-m', 'launch.bench_attention', '--cpu_smoke', '--impls=pallas',
       '--repeats=1', '--warmup=0', '--block_size=4', f'--out={out}'],
      capture_output=True, text=True, timeout=300, check=True)
  causal, two = json.loads(out.read_text())
  assert (causal['case'], two['case']) == ('causal', 'two_stream')
  t, views, block = 48, 2, 4  # the --cpu_smoke shape
  assert two['N'] == (1 + views) * t
  pairs = two['visible'] * two['N'] ** 2 / (t * (t + 1) / 2)
  assert abs(two['pairs_vs_causal'] - pairs) <= 1e-9 * pairs
  # The clean stream sees the causal row's pairs; a noisy token sees at most the clean tokens
  # before it and its own block.
  assert 1.0 < pairs <= 1 + views + 2 * views * block / (t + 1)
  ratios = ', '.join(f"{mode} {two[f'{mode}_ms'] / causal[f'{mode}_ms']:.2f}x"
                     for mode in ('fwd', 'fwdbwd'))
  assert f'two_stream / causal, pallas: {ratios} (visible pairs {pairs:.2f}x)' in run.stdout
