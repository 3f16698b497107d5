"""Trainer (through the CLI): kill-and-resume, loss falls, FLARE conversion of an AR model,
export."""
import functools
import json
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import flare_tiny
from flare_jax.checkpoint import hf_export
from flare_jax.checkpoint import hf_import
from flare_jax.checkpoint import model_io
from flare_jax.train import loop
from flare_jax.train import step as step_lib


def _jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _train(env, workdir, *overrides):
  """Runs the training CLI in a fresh process with `env` (`one_cpu_device_env`)."""
  cmd = [sys.executable, '-m', 'launch.train', '--config=configs/flare_tiny.py',
         f'--workdir={workdir}', '--config.data.seq_len=32', '--config.ckpt.async_save=False',
         *overrides]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  assert out.returncode == 0, out.stderr[-3000:]
  # Progress goes to stdout; libraries' INFO lines (orbax's, per checkpoint) stay off the terminal.
  assert not re.search(r'^I\d{4} ', out.stderr, re.MULTILINE), out.stderr[-3000:]
  return out.stdout


def test_kill_and_resume_on_more_devices_matches_an_uninterrupted_run(tmp_path,
                                                                     one_cpu_device_env):
  common = ('--config.train.num_steps=8', '--config.ckpt.every=3', '--config.objective.name=ar',
            '--config.train.log_every=1', '--config.train.eval_every=4',
            '--config.train.eval_batches=2', '--config.train.profile_steps=2:3')
  train = functools.partial(_train, one_cpu_device_env)
  # JAX caches only compiles of a second or more by default, which the tiny model's step may
  # take or not (the test's compile flags make it fast): cache every compile of this run.
  log = _train(dict(one_cpu_device_env, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0'),
               tmp_path / 'full', *common)
  assert 'profile of steps 2:3 written to' in log
  traces = list((tmp_path / 'full' / 'profile').glob('plugins/profile/*/*.xplane.pb'))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
  train(tmp_path / 'resumed', *common, '--config.train.stop_after=4')  # saves at 3 and at 4
  # The rest on 4 devices (data 2 x fsdp 2), as a job restarted on more GPUs: the state is
  # resharded on restore and the data stream continues where it stopped.
  four_devices = dict(one_cpu_device_env, XLA_FLAGS=(
      one_cpu_device_env['XLA_FLAGS'] + ' --xla_force_host_platform_device_count=4').strip())
  log = _train(four_devices, tmp_path / 'resumed', *common, '--config.mesh.fsdp=2')
  assert 'devices: 4 x cpu' in log and "mesh: {'data': 2, 'fsdp': 2, 'tensor': 1}" in log
  assert 'resumed from' in log and 'at step 4' in log
  assert 'starts at or before the resumed step 4: not profiling' in log
  full = {r['step']: r['loss'] for r in _jsonl(tmp_path / 'full' / 'metrics.jsonl')}
  resumed = {r['step']: r['loss'] for r in _jsonl(tmp_path / 'resumed' / 'metrics.jsonl')}
  assert sorted(resumed) == list(range(1, 9))
  for step in range(1, 9):
    assert resumed[step] == pytest.approx(full[step], rel=1e-5), step
  assert full[8] < 0.9 * full[1]  # 8 steps of the tiny model: the loss is already falling
  # Held-out loss at steps 4 and 8 only: the same batches and noise each time, so a resumed run
  # reports the uninterrupted run's figures; it falls too.
  evals = {name: {r['step']: r['eval_loss'] for r in _jsonl(tmp_path / name / 'metrics.jsonl')
                  if 'eval_loss' in r} for name in ('full', 'resumed')}
  assert sorted(evals['full']) == sorted(evals['resumed']) == [4, 8]
  for step in (4, 8):
    assert evals['resumed'][step] == pytest.approx(evals['full'][step], rel=1e-5), step
  assert evals['full'][8] < evals['full'][4]
  assert any(n.startswith('jit_step') for n in os.listdir(tmp_path / 'full' / 'xla_cache'))


def test_flare_conversion_of_an_ar_model_lowers_loss_diff_and_keeps_loss_ar(tmp_path,
                                                                             one_cpu_device_env):
  train = functools.partial(_train, one_cpu_device_env)
  train(tmp_path / 'ar', '--config.train.num_steps=60', '--config.objective.name=ar',
         '--config.train.log_every=20', '--config.optim.warmup_steps=5')
  hf_export.export_hf(str(tmp_path / 'ar' / 'model'), str(tmp_path / 'hf'), dtype='float32',
                      log=lambda _: None)
  hf_import.convert_hf_checkpoint(str(tmp_path / 'hf'), str(tmp_path / 'converted'),
                                  log=lambda _: None)
  train(tmp_path / 'flare', '--config.train.num_steps=40', '--config.objective.name=flare',
         '--config.train.log_every=5', '--config.optim.lr=1e-3', '--config.optim.warmup_steps=5',
         f'--config.init_from={tmp_path / "converted"}', '--config.data.tokenizer=byte')
  rows = _jsonl(tmp_path / 'flare' / 'metrics.jsonl')
  first, last = rows[0], rows[-1]
  assert last["loss_diff"] < 0.9 * first["loss_diff"], (first, last)
  assert last['loss_ar'] < 1.1 * first['loss_ar'], (first, last)
  # Each model says how it was trained; the record travels through the Hugging Face round trip.
  ar_record = model_io.load_training(str(tmp_path / 'ar' / 'model'))
  assert ar_record == {'objective': 'ar', 'steps': 60, 'init_from': None, 'flare': None}
  assert model_io.load_training(str(tmp_path / 'hf')) == ar_record
  assert model_io.load_training(str(tmp_path / 'converted')) == ar_record
  flare_record = model_io.load_training(str(tmp_path / 'flare' / 'model'))
  assert flare_record == {
      'objective': 'flare', 'steps': 40, 'init_from': str(tmp_path / 'converted'),
      'flare': {'block_size': 4, 'num_views': 2, 'logit_shift': True, 'noise': 'uniform'}}


def test_misspelt_override_fails_loudly():
  c = flare_tiny.get_config()
  c.lock()
  with pytest.raises(AttributeError):
    c.optim.learning_rate = 1.0
  with pytest.raises(ValueError, match='unknown config argument'):
    flare_tiny.get_config('stepz=3')


@pytest.mark.parametrize('override, message', [
    (dict(data=dict(source='jsonl', paths='/nonexistent/train.jsonl')), 'data files not found'),
    (dict(data=dict(tokenizer='')), 'data.tokenizer is empty'),
    (dict(train=dict(eval_every=5), data=dict(source='jsonl', paths='{tmp}/train.jsonl')),
     r'no data paths given for the heldout split .*data.eval_paths is empty'),
    (dict(train=dict(eval_every=5, eval_batches=0)), 'train.eval_batches must be >= 1'),
    (dict(data=dict(chat_template_kwargs='{{"enable_thinking": false}}')),  # str.format braces
     'this tokenizer has no chat template'),
    (dict(optim=dict(schedule='cosin')), r"optim.schedule must be one of .*got 'cosin'"),
    (dict(train=dict(profile_steps='5')), "train.profile_steps must be 'FIRST:LAST'"),
    (dict(train=dict(latency_hiding='of')), r"train.latency_hiding must be one of .*got 'of'"),
])
def test_a_run_that_cannot_start_writes_nothing(tmp_path, override, message):
  (tmp_path / 'train.jsonl').write_text(''.join(json.dumps({'text': f'doc {i}'}) + '\n'
                                               for i in range(20)))
  c = flare_tiny.get_config()
  for group, fields in override.items():
    c[group].update({k: v.format(tmp=tmp_path) if isinstance(v, str) else v
                     for k, v in fields.items()})
  workdir = tmp_path / 'run'
  with pytest.raises(loop.ConfigError, match=message):
    loop.train_and_evaluate(c, str(workdir))
  assert not workdir.exists()


def test_resuming_another_model_names_what_differs_and_writes_nothing(tmp_path, capsys):
  """A workdir whose checkpoint holds another model: the leaves that differ and the config keys
  that explain it, before any step; the workdir's config.json stays the checkpoints' config."""
  c = flare_tiny.get_config('objective=ar,steps=1')
  c.data.seq_len = 32
  c.ckpt.async_save = False
  c.train.latency_hiding = 'off'  # a GPU option: XLA takes it on CPU too (and ignores it)
  workdir = tmp_path / 'run'
  loop.train_and_evaluate(c, str(workdir))
  assert "train step XLA options: {'xla_gpu_enable_latency_hiding_scheduler': False}" in (
      capsys.readouterr().out)
  saved_config = (workdir / 'config.json').read_text()
  c.model.variant = 'small'
  with pytest.raises(loop.ConfigError) as err:
    loop.train_and_evaluate(c, str(workdir))
  message = str(err.value)
  assert 'holds another model or optimizer than this run builds' in message
  assert 'model.embed_tokens.embedding has shape (272, 64) in the checkpoint, (272, 128)' in message
  assert 'model.variant: "tiny" -> "small"' in message
  assert (workdir / 'config.json').read_text() == saved_config


def test_the_cli_reports_bad_input_in_one_line(tmp_path, one_cpu_device_env):
  cmd = [sys.executable, '-m', 'launch.train', '--config=configs/flare_tiny.py',
         f'--workdir={tmp_path / "run"}', '--config.data.source=jsonl',
         f'--config.data.paths={tmp_path / "missing.jsonl"}']
  out = subprocess.run(cmd, env=one_cpu_device_env, capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  assert out.returncode == 1
  assert 'error: data files not found' in out.stderr and 'Traceback' not in out.stderr
  assert not (tmp_path / 'run').exists()


def test_sigterm_saves_a_checkpoint_and_stops_then_the_run_resumes(tmp_path, one_cpu_device_env):
  workdir = tmp_path / 'run'
  args = ('--config.train.num_steps=100000', '--config.ckpt.every=100000',
          '--config.objective.name=ar', '--config.train.log_every=1000')
  cmd = [sys.executable, '-m', 'launch.train', '--config=configs/flare_tiny.py',
         f'--workdir={workdir}', '--config.data.seq_len=32', '--config.ckpt.async_save=False',
         *args]
  repo = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
  proc = subprocess.Popen(cmd, env=one_cpu_device_env, cwd=repo, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines = []
  for line in proc.stdout:  # the first step has compiled and run: the loop is going
    lines.append(line)
    if 'compiled and ran' in line:
      proc.send_signal(signal.SIGTERM)
      break
  lines += proc.stdout.readlines()
  assert proc.wait(timeout=300) == 0, ''.join(lines)[-3000:]
  stopped = [line for line in lines if line.startswith('stopped after step')]
  assert stopped, ''.join(lines)[-3000:]
  step = int(stopped[0].split()[3])
  assert 1 <= step < 100000
  assert not (workdir / 'model').exists()  # an unfinished run exports no model
  log = _train(one_cpu_device_env, workdir, *args, '--config.train.stop_after=2')
  assert f'resumed from {workdir}/ckpt at step {step}' in log
  # The resumed run's config differs in one key: logged, the earlier file kept.
  assert f'config changed since the run that wrote step {step}' in log
  assert 'train.stop_after: -1 -> 2' in log
  earlier = json.loads((workdir / f'config.step{step}.json').read_text())
  assert earlier['train']['stop_after'] == -1
  assert json.loads((workdir / 'config.json').read_text())['train']['stop_after'] == 2


def test_config_changes_name_every_differing_key():
  old = json.dumps({'optim': {'lr': 1e-3, 'b1': 0.9}, 'data': {'seq_len': 64}, 'gone': 1})
  new = json.dumps({'optim': {'lr': 3e-4, 'b1': 0.9}, 'data': {'seq_len': 64}, 'added': 'x'})
  changes = loop._config_changes(old, new)  # pylint: disable=protected-access
  assert changes == ['added: "(missing)" -> "x"', 'gone: 1 -> "(missing)"',
                     'optim.lr: 0.001 -> 0.0003']
  assert loop._config_changes(old, old) == []  # pylint: disable=protected-access
  many = json.dumps({f'k{i:02d}': i for i in range(25)})
  # pylint: disable-next=protected-access
  assert loop._config_changes('{}', many, limit=20)[-1] == '... and 5 more'


def test_a_held_out_file_shorter_than_eval_batches_repeats(tmp_path):
  docs = lambda n: ''.join(json.dumps({'text': f'{i}+{i}={2 * i}'}) + '\n' for i in range(n))
  (tmp_path / 'train.jsonl').write_text(docs(40))
  (tmp_path / 'heldout.jsonl').write_text(docs(1))  # one row: one batch in one epoch
  c = flare_tiny.get_config()
  c.data.update(source='jsonl', paths=str(tmp_path / 'train.jsonl'), num_epochs=1,
                eval_paths=str(tmp_path / 'heldout.jsonl'), seq_len=32)
  c.train.update(eval_every=2, eval_batches=3)
  heldout = loop._checked_setup(c)[-1]  # pylint: disable=protected-access
  assert len(heldout) == 3  # every process gets eval_batches batches: collectives stay matched
  for batch in heldout[1:]:
    np.testing.assert_array_equal(batch['tokens'], heldout[0]['tokens'])


@pytest.mark.parametrize('seconds, text', [(0.4, '0s'), (42, '42s'), (896, '14m56s'),
                                           (3720, '1h02m'), (90061, '25h01m')])
def test_durations_read_at_a_glance(seconds, text):
  assert loop._duration(seconds) == text  # pylint: disable=protected-access


def test_the_latency_hiding_scheduler_is_off_for_a_scanned_step_on_one_gpu(monkeypatch):
  one, two = (jax.make_mesh((n,), ('data',), devices=jax.devices()[:n]) for n in (1, 2))
  off, on = ({'xla_gpu_enable_latency_hiding_scheduler': v} for v in (False, True))
  options = functools.partial(step_lib.compiler_options, xla_flags='')
  assert options('auto', True, one) is None  # not on a GPU
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert options('auto', True, one) == off
  assert options('auto', False, one) is None and options('auto', True, two) is None
  assert step_lib.compiler_options(  # XLA_FLAGS that name it decide
      'auto', True, one, xla_flags='--xla_gpu_enable_latency_hiding_scheduler=true') is None
  assert options('on', True, one) == on and options('off', False, two) == off
