"""Two JAX processes (CPU, gloo collectives) train like one: `launch.train --multihost`.

Each process reads its own shard of the data. With four documents that each fill one row and a
global batch of four, every step's global batch holds the same rows in both runs (in another order),
so the `ar` losses (means over the batch) must agree up to float reduction order.
"""
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

_DOCS = [
    'alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho',
    'the quick brown fox jumps over the lazy dog while the cat sleeps under the warm table',
    'def f(x):\n    return x * x + 1\n\nprint(f(3))\nfor i in range(10):\n    print(i, f(i))\n',
    '1+1=2 2+2=4 3+3=6 4+4=8 5+5=10 6+6=12 7+7=14 8+8=16 9+9=18 10+10=20 11+11=22',
]
_STEPS = 5


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _docs(tmp_path) -> str:
  path = tmp_path / 'docs.jsonl'
  path.write_text(''.join(json.dumps({'text': d}) + '\n' for d in _DOCS))
  return str(path)


def _train_cmd(docs: str, workdir: str, steps: int = _STEPS) -> list[str]:
  return [sys.executable, '-m', 'launch.train', f'--workdir={workdir}',
          f'--config=configs/flare_tiny.py:objective=ar,steps={steps}',
          '--config.data.source=jsonl', f'--config.data.paths={docs}',
          '--config.data.seq_len=32', '--config.data.batch_size=4',
          '--config.data.long_docs=truncate', '--config.data.packing_bins=1',
          '--config.train.log_every=1', '--config.optim.warmup_steps=0']


def _start_two(cmd: list[str], env) -> list[subprocess.Popen]:
  """`cmd` as processes 0 and 1 of one JAX cluster (output piped, stderr into stdout)."""
  port = _free_port()
  return [subprocess.Popen(cmd + ['--multihost', f'--coordinator_address=localhost:{port}',
                                  '--num_processes=2', f'--process_id={i}'],
                           cwd=_REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True) for i in range(2)]


def _finish(procs, timeout: int, read=('', '')) -> list[str]:
  """Each process's output (after `read`, what was already read of it); fails the test unless
  both exit with 0 within `timeout` s."""
  try:
    outs = [head + p.communicate(timeout=timeout)[0] for p, head in zip(procs, read)]
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail(f'the two processes did not finish in {timeout} s')
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f'process {i} failed:\n{out[-3000:]}'
  return outs


def _losses(workdir: str) -> list[float]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line)['loss'] for line in f]


def test_two_processes_match_one_process(tmp_path, one_cpu_device_env):
  docs = _docs(tmp_path)
  env = one_cpu_device_env
  multi = str(tmp_path / 'multi')
  outs = _finish(_start_two(_train_cmd(docs, multi), env), timeout=400)
  assert 'processes: 2' in outs[0]
  single = str(tmp_path / 'single')
  run = subprocess.run(_train_cmd(docs, single), cwd=_REPO, env=env, capture_output=True,
                       text=True, timeout=400)
  assert run.returncode == 0, run.stderr[-3000:]

  multi_losses, single_losses = _losses(multi), _losses(single)
  assert len(multi_losses) == len(single_losses) == _STEPS
  np.testing.assert_allclose(multi_losses, single_losses, rtol=1e-5)
  assert multi_losses[-1] < multi_losses[0]
  # Both processes wrote their shards of one checkpoint and one exported model.
  assert os.path.isfile(os.path.join(multi, 'model', 'model_config.json'))
  assert not [n for n in os.listdir(multi) if '.tmp-' in n]


def test_sigterm_to_one_process_stops_both_at_one_checkpointed_step(tmp_path, one_cpu_device_env):
  """JAX's preemption service: the process that gets SIGTERM tells the other; both save the same
  step's checkpoint and exit cleanly."""
  workdir = str(tmp_path / 'multi')
  cmd = _train_cmd(_docs(tmp_path), workdir, steps=100000) + [
      '--config.train.log_every=100000', '--config.ckpt.every=100000']
  procs = _start_two(cmd, one_cpu_device_env)
  lines = []
  for line in procs[0].stdout:  # process 0 logs; its first step has run
    lines.append(line)
    if 'compiled and ran' in line:
      procs[1].send_signal(signal.SIGTERM)
      break
  outs = _finish(procs, timeout=300, read=(''.join(lines), ''))
  stopped = [line for line in outs[0].splitlines() if line.startswith('stopped after step')]
  assert stopped, outs[0][-3000:]
  step = int(stopped[0].split()[3])
  assert os.path.isdir(os.path.join(workdir, 'ckpt', str(step)))
