"""launch.eval end to end on a tiny saved checkpoint (`ckpt`, conftest): one result per mode in the
JSON file, and usage errors for a missing task file or an unknown mode."""
import json
import subprocess
import sys

import pytest


def _eval(*args):
  return subprocess.run([sys.executable, '-m', 'launch.eval', *args], capture_output=True,
                        text=True, timeout=300)


@pytest.fixture
def task(tmp_path):
  path = tmp_path / 'arith.jsonl'
  path.write_text(''.join(json.dumps({'prompt': f'{a}+{a}=', 'answer': str(2 * a)}) + '\n'
                          for a in (1, 2, 3)))
  return path


def test_writes_one_result_per_mode(recorded_ckpt, task, tmp_path):
  ckpt, record = recorded_ckpt(block_size=2)  # trained with blocks of 2
  out = tmp_path / 'results.json'
  run = _eval(f'--ckpt={ckpt}', f'--task={task}', '--modes=ar;ar_trust;diffusion_trust:b=3,k=1',
              '--max_new_tokens=3', f'--out={out}')
  assert run.returncode == 0, run.stderr[-2000:]
  saved = json.loads(out.read_text())
  assert saved['task'] == str(task)
  assert set(saved['results']) == {'ar', 'ar_trust', 'diffusion_trust:b=3,k=1'}
  assert all(0 <= r['accuracy'] <= 1 for r in saved['results'].values())
  assert f'wrote {out}' in run.stdout
  # A mode without b= decodes with the trained block size; the JSON says how each mode ran.
  configs = saved['sampler_configs']
  assert configs['ar_trust']['block_size'] == 2 and configs['diffusion_trust:b=3,k=1'][
      'block_size'] == 3
  assert saved['training'] == record


def test_chat_sends_prompts_through_the_template(ckpt, task, tmp_path):
  out = tmp_path / 'results.json'
  run = _eval(f'--ckpt={ckpt}', f'--task={task}', '--modes=ar', '--max_new_tokens=2', '--chat',
              f'--out={out}')
  assert run.returncode == 0, run.stderr[-2000:]
  assert 'numeric examples through the chat template' in run.stdout
  assert json.loads(out.read_text())['chat'] is True


@pytest.mark.parametrize('args, message', [(['--task=/nonexistent.jsonl'], 'no such file'),
                                           (['--modes=beam'], "unknown mode 'beam'"),
                                           (['--chat_template_kwargs={"messages": 1}'],
                                            'may not set')])
def test_bad_flags_are_usage_errors(ckpt, task, args, message):
  run = _eval(f'--ckpt={ckpt}', f'--task={task}', *args)
  assert run.returncode != 0 and message in run.stderr and 'Traceback' not in run.stderr


def test_a_malformed_task_file_is_one_error_report(ckpt, tmp_path):
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "x"}\n')
  run = _eval(f'--ckpt={ckpt}', f'--task={bad}')
  assert run.returncode == 1 and 'Traceback' not in run.stderr
  assert f'{bad}:2: not a numeric example' in run.stderr and run.stderr.count('error:') == 1
  assert '--max_new_tokens' not in run.stderr  # no usage text


def test_default_results_files_never_overwrite_each_other(ckpt, task):
  """Without --out, a second evaluation of the task writes TASK.results.2.json beside the first."""
  for _ in range(2):
    run = _eval(f'--ckpt={ckpt}', f'--task={task}', '--modes=ar', '--max_new_tokens=2')
    assert run.returncode == 0, run.stderr[-2000:]
  first, second = (task.parent / f'arith.results{n}.json' for n in ('', '.2'))
  assert f'wrote {second}' in run.stdout
  assert json.loads(first.read_text())['task'] == json.loads(second.read_text())['task']
