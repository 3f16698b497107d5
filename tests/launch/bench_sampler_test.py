"""launch.bench_sampler on the tiny model (CPU): every mode's row, the AR decode step as the
marginal cost of a pass beside the call's fixed cost, and the printed table."""
import json
import math
import subprocess
import sys

import pytest


def test_rows_of_every_mode_and_the_marginal_ar_step(tmp_path):
  out = tmp_path / 'sampler.json'
  run = subprocess.run(
      [sys.executable, '-m', 'launch.bench_sampler', '--variant=tiny', '--batch=2',
       '--prompt_len=8', '--new_tokens=16', '--step_base_tokens=4', '--k=2', '--repeats=1',
       '--bandwidth_buffer_mib=16',
       '--modes=ar,ar_trust,diffusion_trust', f'--out={out}'],
      capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-2000:]
  rows = json.loads(out.read_text())
  assert [r['mode'] for r in rows] == ['ar', 'ar_trust', 'diffusion_trust k=2']
  ar, _, diffusion = rows
  assert ar['passes_per_token'] == 1.0 and diffusion['passes_per_token'] == 0.5
  if math.isnan(ar['step_ms']):  # CPU timings of a tiny model can fail to resolve a step
    assert math.isnan(ar['fixed_ms']) and 'too noisy to give a step' in run.stdout
  else:
    assert 0 < ar['step_ms'] and math.isfinite(ar['fixed_ms'])
    # The call's fixed cost (prefill, transfers) is what separates the two AR figures.
    assert ar['step_ms'] + ar['fixed_ms'] / 16 == pytest.approx(ar['ms_per_pass'], rel=1e-6)
  ratio = lambda floor: pytest.approx(ar['step_ms'] / ar[floor], rel=1e-6, nan_ok=True)
  assert ar['step_vs_floor'] == ratio('bandwidth_floor_ms')
  assert ar['step_vs_read_floor'] == ratio('read_floor_ms')
  assert 'read-only' in run.stdout and f"({ar['step_vs_read_floor']:.2f})" in run.stdout
  assert '| ar | 2 |' in run.stdout and 'AR step ms (fixed ms)' in run.stdout
