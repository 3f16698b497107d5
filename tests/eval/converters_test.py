"""Benchmark rows as task examples: a reference solution passes its converted tests, a wrong one
fails, and the stop strings cut what a model writes after the solution."""
import gzip
import json

import pytest

from flare_jax.eval import converters
from flare_jax.eval import harness
from flare_jax.eval import tasks
from flare_jax.sampling import stop_strings

HUMANEVAL = {
    'task_id': 'HumanEval/0', 'entry_point': 'add',
    'prompt': 'def add(a, b):\n    """The sum of a and b."""\n',
    'canonical_solution': '    return a + b\n',
    'test': ('def check(candidate):\n    assert candidate(2, 3) == 5\n'
             '    assert candidate(-1, 1) == 0\n')}
MBPP = {'task_id': 7, 'text': 'Write a function to add two numbers.',
        'code': 'def add(a, b):\n    return a + b', 'test_setup_code': '',
        'test_list': ['assert add(2, 3) == 5', 'assert add(0, 0) == 0']}
GSM8K = {'question': 'Tom has 1,200 apples and buys 34 more. How many apples?',
         'answer': 'He has 1200 + 34 = <<1200+34=1234>>1234 apples.\n#### 1,234'}


def _score(kind, example, output):
  """The score launch.eval gives `output`: cut at the example's stop strings, then scored."""
  kept, _ = stop_strings.cut(output, example.get('stop', ()))
  return harness.score_outputs(kind, [example], [kept])[0]


def test_humaneval_completions_run_after_the_prompt():
  ex = converters.humaneval(HUMANEVAL)
  assert ex['id'] == 'HumanEval/0' and ex['prompt_is_code']
  solution = HUMANEVAL['canonical_solution']
  assert _score('code', ex, solution) == 1.0
  assert _score('code', ex, solution + '\n\ndef unrelated(:\n') == 1.0  # cut at "\ndef"
  assert _score('code', ex, '    return a - b\n') == 0.0


def test_mbpp_functions_run_with_every_test():
  ex = converters.mbpp(MBPP)
  assert MBPP['text'] in ex['prompt'] and MBPP['test_list'][0] in ex['prompt']
  assert _score('code', ex, MBPP['code'] + '\nassert add(1, 1) == 3\n') == 1.0  # cut at "\nassert"
  assert _score('code', ex, 'def add(a, b):\n    return a + b + (a == 0)') == 0.0  # 2nd test


def test_gsm8k_answers_are_the_number_after_the_marks():
  ex = converters.gsm8k(GSM8K)
  assert ex['answer'] == '1234' and ex['prompt'].endswith('\nAnswer:')
  assert _score('numeric', ex, ' 1200 + 34 = 1234.\n\nQuestion: what is 5?\nAnswer: 5') == 1.0
  assert _score('numeric', ex, ' 1,234 apples') == 1.0
  assert _score('numeric', ex, ' 1200 + 34 = 1243') == 0.0
  with pytest.raises(ValueError, match='no "#### <number>" line'):
    converters.gsm8k({**GSM8K, 'answer': '1234'})


def test_files_convert_whole_or_list_their_bad_rows(tmp_path):
  src = tmp_path / 'HumanEval.jsonl.gz'
  with gzip.open(src, 'wt', encoding='utf-8') as f:
    f.write(json.dumps(HUMANEVAL) + '\n\n' + json.dumps({**HUMANEVAL, 'task_id': 'HumanEval/1'})
            + '\n')
  examples = converters.convert_file(str(src), 'humaneval')
  assert [ex['id'] for ex in examples] == ['HumanEval/0', 'HumanEval/1']
  out = tmp_path / 'task.jsonl'
  tasks.write_task(str(out), examples)
  assert tasks.load_task(str(out)) == ('code', examples)
  bad = tmp_path / 'bad.jsonl'
  bad.write_text(json.dumps(HUMANEVAL) + '\n{oops\n' + json.dumps({'prompt': 'x'}) + '\n'
                 + json.dumps({**MBPP, 'test_list': []}) + '\n')
  with pytest.raises(ValueError) as e:
    converters.convert_file(str(bad), 'humaneval')
  assert '3 row(s) are not humaneval rows' in str(e.value)
  assert 'bad.jsonl:2: invalid JSON' in str(e.value) and 'bad.jsonl:3: no "task_id" string' in (
      str(e.value))
  with pytest.raises(ValueError, match='no "test_list" list of strings'):
    converters.mbpp({**MBPP, 'test_list': []})
  with pytest.raises(ValueError, match="unknown format 'arc'"):
    converters.convert_file(str(src), 'arc')
