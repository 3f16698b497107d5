"""launch.eval end to end on a tiny saved checkpoint (`ckpt`, conftest): one result per mode in the
JSON file, and usage errors for a missing task file or an unknown mode."""
import json
import subprocess
import sys

import pytest

from flare_jax.checkpoint import model_io
from flare_jax.data import tokenizer as tokenizer_lib
from flare_jax.eval import harness


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
  assert saved['devices'] == '8 x cpu' and saved['batch_size'] == 16  # conftest's 8 CPU devices


def test_chat_sends_prompts_through_the_template(ckpt, task, tmp_path):
  out = tmp_path / 'results.json'
  run = _eval(f'--ckpt={ckpt}', f'--task={task}', '--modes=ar', '--max_new_tokens=2', '--chat',
              f'--out={out}')
  assert run.returncode == 0, run.stderr[-2000:]
  assert 'numeric examples through the chat template' in run.stdout
  assert json.loads(out.read_text())['chat'] is True


def test_samples_report_pass_at_k_and_warn_for_greedy_modes(ckpt, task, tmp_path):
  out = tmp_path / 'results.json'
  run = _eval(f'--ckpt={ckpt}', f'--task={task}', '--modes=ar;ar:t=1,top_k=20',
              '--max_new_tokens=2', '--samples=2', '--seed=3', f'--out={out}', '--save_outputs')
  assert run.returncode == 0, run.stderr[-2000:]
  assert "warning: --samples=2 with greedy modes ['ar']" in run.stderr
  saved = json.loads(out.read_text())
  assert (saved['samples'], saved['seed']) == (2, 3)
  assert saved['sampler_configs']['ar:t=1,top_k=20']['temperature'] == 1.0
  for r in saved['results'].values():
    assert r['samples'] == 2 and r['pass@1'] == pytest.approx(r['accuracy'])
    assert r['pass@1'] <= r['pass@2'] <= 1 and r['tokens'] <= 3 * 2 * 2
    assert 'outputs' not in r and 'scores' not in r  # in the outputs file instead
  assert '| mode | accuracy | pass@1 | pass@2 |' in run.stdout
  # --save_outputs: every (mode, example, sample) once, its prompt, output and score
  lines = [json.loads(x) for x in (tmp_path / 'results.outputs.jsonl').read_text().splitlines()]
  assert [(x['mode'], x['example'], x['sample']) for x in lines] == [
      (m, e, s) for m in ('ar', 'ar:t=1,top_k=20') for e in range(3) for s in range(2)]
  assert [x['prompt'] for x in lines[:6]] == ['1+1=', '1+1=', '2+2=', '2+2=', '3+3=', '3+3=']
  for mode, r in saved['results'].items():
    scores = [x['score'] for x in lines if x['mode'] == mode]
    assert sum(scores) / len(scores) == pytest.approx(r['accuracy'])
  greedy = [x['output'] for x in lines if x['mode'] == 'ar']
  assert greedy[0::2] == greedy[1::2]  # a greedy mode's samples are one decode
  assert f"wrote {tmp_path / 'results.outputs.jsonl'}" in run.stdout


@pytest.mark.parametrize('args, message', [(['--task=/nonexistent.jsonl'], 'no such file'),
                                           (['--modes=beam'], "unknown mode 'beam'"),
                                           (['--samples=0'], '--samples must be >= 1'),
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


def test_text_tasks_report_the_perplexity_of_the_model(ckpt, tmp_path):
  """A text task scores AR perplexity over rows of --seq_len tokens, as harness.perplexity does on
  the loaded checkpoint; no decoding mode runs (an untrained model's noisy-mode warning is not
  printed) and --chat is refused."""
  texts = ['import os\nprint(os.getcwd())\n', 'def f(x):\n  return x + 1\n']
  task = tmp_path / 'held_out.jsonl'
  task.write_text(''.join(json.dumps({'text': t}) + '\n' for t in texts))
  out = tmp_path / 'results.json'
  run = _eval(f'--ckpt={ckpt}', f'--task={task}', '--seq_len=16', '--batch_size=3',
              f'--out={out}')
  assert run.returncode == 0, run.stderr[-2000:]
  assert 'modes: perplexity' in run.stdout and 'warning' not in run.stderr
  saved = json.loads(out.read_text())
  assert saved['kind'] == 'text' and saved['sampler_configs'] == {}
  model = model_io.load_model(ckpt)
  want = harness.perplexity(model, tokenizer_lib.checkpoint_tokenizer(ckpt), texts, seq_len=16)
  got = saved['results']['perplexity']
  assert got['tokens'] == want['tokens'] and got['n'] == 2
  assert got['nll'] == pytest.approx(want['nll'], rel=1e-5)
  assert f"{want['perplexity']:.3f}" in run.stdout
  # FLARE's loss at the default objective (this checkpoint records none): its AR term is the
  # perplexity's nll; --noflare_loss leaves it out.
  loss = saved['results']['flare_loss']
  assert loss['objective']['block_size'] == 4 and loss['n_targets'] == want['tokens']
  assert loss['loss_ar'] == pytest.approx(want['nll'], rel=1e-5)
  assert f"{loss['loss_diff']:.4f}" in run.stdout
  run = _eval(f'--ckpt={ckpt}', f'--task={task}', '--seq_len=16', '--noflare_loss',
              f'--out={out}')
  assert run.returncode == 0 and 'flare_loss' not in json.loads(out.read_text())['results']
  run = _eval(f'--ckpt={ckpt}', f'--task={task}', '--chat')
  assert run.returncode == 1 and 'does not apply to text tasks' in run.stderr
  task.write_text('{"text": "a"}\n{"text": ""}\n')
  run = _eval(f'--ckpt={ckpt}', f'--task={task}')
  assert run.returncode == 1 and f'{task}:2: "text" must be a non-empty string' in run.stderr


def test_several_tasks_load_the_model_once_and_are_all_checked_first(ckpt, task, tmp_path):
  """--task=a,b: each task's results beside it, as when evaluated alone; a malformed file among
  them stops the run before anything is evaluated or written; --out is refused."""
  text = tmp_path / 'held_out.jsonl'
  text.write_text(json.dumps({'text': 'import os\n'}) + '\n')
  run = _eval(f'--ckpt={ckpt}', f'--task={task},{text}', '--modes=ar', '--max_new_tokens=2')
  assert run.returncode == 0, run.stderr[-2000:]
  both = [json.loads((tmp_path / name).read_text())
          for name in ('arith.results.json', 'held_out.results.json')]
  assert [b['kind'] for b in both] == ['numeric', 'text']
  assert set(both[0]['results']) == {'ar'} and 'perplexity' in both[1]['results']
  alone = tmp_path / 'alone.json'
  run = _eval(f'--ckpt={ckpt}', f'--task={text}', f'--out={alone}')
  assert json.loads(alone.read_text())['results'] == both[1]['results']
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"prompt": "x"}\n')
  run = _eval(f'--ckpt={ckpt}', f'--task={task},{bad}', '--modes=ar', '--max_new_tokens=2')
  assert run.returncode == 1 and f'{bad}:1:' in run.stderr
  assert not (tmp_path / 'arith.results.2.json').exists()
  run = _eval(f'--ckpt={ckpt}', f'--task={task},{text}', f'--out={alone}')
  assert run.returncode != 0 and 'with several tasks leave it out' in run.stderr


def test_choice_tasks_print_both_accuracies(ckpt, tmp_path):
  task = tmp_path / 'choice.jsonl'
  task.write_text(''.join(json.dumps({'prompt': p, 'choices': ['a', 'bcd'], 'label': 1}) + '\n'
                          for p in ('x', 'y', 'z')))
  out = tmp_path / 'results.json'
  run = _eval(f'--ckpt={ckpt}', f'--task={task}', f'--out={out}')
  assert run.returncode == 0, run.stderr[-2000:]
  r = json.loads(out.read_text())['results']['loglik']
  assert set(r) == {'accuracy', 'accuracy_norm', 'n'} and r['n'] == 3
  assert f"| {r['accuracy']:.3f} | {r['accuracy_norm']:.3f} | 3 |" in run.stdout
  assert 'modes: loglik' in run.stdout and 'warning' not in run.stderr
