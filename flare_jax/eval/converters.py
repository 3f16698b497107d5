"""Public benchmarks' JSONL rows as task-file examples (flare_jax/eval/tasks.py).

  humaneval  {"task_id", "prompt", "test", "entry_point"}   -> code, completing the prompt
  mbpp       {"task_id", "text", "test_list", "test_setup_code"} -> code, a whole function
  gsm8k      {"question", "answer": "... #### 72"}            -> numeric

Each converter takes one row and returns one example (with the row's id where it has one), or
raises ValueError naming what the row lacks. Prompts are zero-shot; the stop strings are the
customary ones for each benchmark (HumanEval's from the Codex paper).
"""
import gzip
import json
from collections.abc import Callable

HUMANEVAL_STOPS = ['\nclass', '\ndef', '\n#', '\nif', '\nprint']
MBPP_STOPS = ['\nclass', '\nassert', '\n"""', '\nprint', '\nif', '\n```']
GSM8K_STOPS = ['\n\nQuestion:', '\nQuestion:']


def _fields(row, *names: str, lists: tuple[str, ...] = ()) -> None:
  """Raises ValueError unless `row` is an object with string `names` and list-of-string `lists`."""
  if not isinstance(row, dict):
    raise ValueError('not a JSON object')
  for name in names:
    if not isinstance(row.get(name), str):
      raise ValueError(f'no "{name}" string')
  for name in lists:
    value = row.get(name)
    if not (isinstance(value, list) and value and all(isinstance(x, str) for x in value)):
      raise ValueError(f'no "{name}" list of strings')


def humaneval(row: dict) -> dict:
  """The prompt (signature and docstring) is the program's start; the tests define check(f),
  called on the entry point."""
  _fields(row, 'task_id', 'prompt', 'test', 'entry_point')
  return {'id': row['task_id'], 'prompt': row['prompt'],
          'tests': f"{row['test']}\n\ncheck({row['entry_point']})\n",
          'stop': HUMANEVAL_STOPS, 'prompt_is_code': True}


def mbpp(row: dict) -> dict:
  """The task and its first test as a docstring (as bigcode's harness prompts it); the output is
  the whole function, run with every test."""
  _fields(row, 'text', lists=('test_list',))
  setup = row.get('test_setup_code') or ''
  if not isinstance(setup, str):
    raise ValueError('"test_setup_code" must be a string')
  example = {'prompt': f'"""\n{row["text"]}\n{row["test_list"][0]}\n"""\n',
             'tests': '\n'.join([setup, *row['test_list']]).strip() + '\n', 'stop': MBPP_STOPS}
  return {'id': row['task_id'], **example} if 'task_id' in row else example


def gsm8k(row: dict) -> dict:
  """The reference answer is the number after the solution's '####'."""
  _fields(row, 'question', 'answer')
  if '####' not in row['answer']:
    raise ValueError('"answer" has no "#### <number>" line')
  answer = row['answer'].rsplit('####', 1)[1].strip().replace(',', '')
  return {'prompt': f"Question: {row['question']}\nAnswer:", 'answer': answer,
          'stop': GSM8K_STOPS}


FORMATS: dict[str, Callable[[dict], dict]] = {'humaneval': humaneval, 'mbpp': mbpp,
                                              'gsm8k': gsm8k}


def convert_file(path: str, fmt: str) -> list[dict]:
  """Every row of a benchmark's JSONL file (gzipped when it ends in .gz) as an example of format
  `fmt` (a FORMATS key).

  Raises:
    ValueError: an unknown format, an empty file, or bad rows (each as file:line: reason, up to
      10 listed).
  """
  if fmt not in FORMATS:
    raise ValueError(f'unknown format {fmt!r} (known: {", ".join(FORMATS)})')
  examples, bad = [], []
  with (gzip.open if path.endswith('.gz') else open)(path, 'rt', encoding='utf-8') as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        examples.append(FORMATS[fmt](json.loads(line)))
      except json.JSONDecodeError as e:
        bad.append(f'{path}:{lineno}: invalid JSON ({e.msg})')
      except ValueError as e:
        bad.append(f'{path}:{lineno}: {e}')
  if bad:
    raise ValueError(f'{len(bad)} row(s) are not {fmt} rows:\n  ' + '\n  '.join(bad[:10]))
  if not examples:
    raise ValueError(f'{path} holds no rows')
  return examples
