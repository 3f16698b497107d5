"""launch.convert_task end to end: a benchmark file becomes a task file launch.eval reads; bad rows
or an existing output leave nothing written."""
import json
import subprocess
import sys

from flare_jax.eval import tasks


def _convert(*args):
  return subprocess.run([sys.executable, '-m', 'launch.convert_task', *args], capture_output=True,
                        text=True, timeout=120)


def test_converts_checks_and_never_overwrites(tmp_path):
  src = tmp_path / 'gsm8k.jsonl'
  src.write_text(''.join(json.dumps({'question': f'{a} + {a}?', 'answer': f'#### {2 * a}'}) + '\n'
                         for a in range(3)))
  out = tmp_path / 'task.jsonl'
  run = _convert('--format=gsm8k', f'--input={src}', f'--output={out}')
  assert run.returncode == 0, run.stderr[-2000:]
  assert f'wrote 3 numeric examples to {out}' in run.stdout
  kind, examples = tasks.load_task(str(out))
  assert kind == 'numeric' and [ex['answer'] for ex in examples] == ['0', '2', '4']
  again = _convert('--format=gsm8k', f'--input={src}', f'--output={out}')
  assert again.returncode != 0 and 'exists: pass --overwrite' in again.stderr
  assert _convert('--format=gsm8k', f'--input={src}', f'--output={out}',
                  '--overwrite').returncode == 0
  bad = tmp_path / 'bad.jsonl'
  bad.write_text(json.dumps({'question': 'q', 'answer': 'no marks'}) + '\n')
  fresh = tmp_path / 'fresh.jsonl'
  run = _convert('--format=gsm8k', f'--input={bad}', f'--output={fresh}')
  assert run.returncode == 1 and 'bad.jsonl:1: "answer" has no "#### <number>" line' in run.stderr
  assert 'Traceback' not in run.stderr
  assert not fresh.exists() and not (tmp_path / 'fresh.jsonl.partial').exists()
