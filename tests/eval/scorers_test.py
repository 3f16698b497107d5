"""Scorers with known answers, including malformed model output."""
import itertools
import json

import pytest

from flare_jax.eval import scorers
from flare_jax.eval import tasks


@pytest.mark.parametrize('output, answer, want', [
    ('The answer is 42.', '42', 1.0),
    ('so 3 + 4 = 7\n#### 7', '7', 1.0),
    ('#### 1,234', '1234', 1.0),
    ('7.0', '7', 1.0),
    ('-12', '-12', 1.0),
    ('first 5 then 6', '5', 0.0),  # the last number counts
    ('no number here', '3', 0.0),
    ('', '3', 0.0),
    ('\ufffd\x00garbage####', '3', 0.0),
    ('42abc', '42', 1.0),
])
def test_numeric(output, answer, want):
  assert scorers.score_numeric(output, answer) == want


def test_numeric_reference_without_a_number_is_an_error():
  with pytest.raises(ValueError, match='no number'):
    scorers.score_numeric('4', 'four')


@pytest.mark.parametrize('output, target, want', [
    ('    return x\nmore', '    return x', 1.0),
    ('    return x   ', '    return x', 1.0),
    ('return x', '    return x', 0.0),  # indentation matters
    ('', 'x = 1', 0.0),
    ('\nx = 1', 'x = 1', 0.0),
])
def test_exact_line(output, target, want):
  assert scorers.score_exact_line(output, target) == want


@pytest.mark.parametrize('output, target, want', [
    ('    return x\nmore', '    return x', 1.0),
    ('    return y', '    return x', 11 / 12),
    ('    return x + 1', '    return x', 12 / 16),  # running on costs too
    ('return x', '    return x', 0.0),
    ('', 'x = 1', 0.0),
    ('\nx = 1', 'x = 1', 0.0),  # only the first line counts
    ('x = 1', '', 0.0),
    ('  ', '', 1.0),
    ('\u00e9t\u00e9 = 2', '\u00e9t\u00e9 = 1', 6 / 7),
])
def test_line_prefix(output, target, want):
  assert scorers.score_line_prefix(output, target) == pytest.approx(want)
  assert (scorers.score_line_prefix(output, target) == 1.0) == bool(
      scorers.score_exact_line(output, target))


def test_best_choice_first_on_ties_and_empty():
  assert scorers.best_choice([-3.0, -1.0, -1.0]) == 1
  with pytest.raises(ValueError):
    scorers.best_choice([])


TESTS = 'assert add(2, 3) == 5\nassert add(-1, 1) == 0'


@pytest.mark.parametrize('output, want', [
    ('def add(a, b):\n    return a + b', 1.0),
    ('Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.', 1.0),
    ('def add(a, b):\n    return a - b', 0.0),  # wrong answer
    ('def add(a, b)\n    return a + b', 0.0),  # syntax error
    ('', 0.0),
    ('import sys; sys.exit(0)', None),  # see below
])
def test_code(output, want):
  if want is None:
    # A program that exits 0 before the appended tests run passes: the scorer sees only the exit
    # status. This documents the limit (HumanEval-style harnesses share it).
    assert scorers.score_code(output, TESTS) == 1.0
    return
  assert scorers.score_code(output, TESTS) == want


def test_code_after_a_humaneval_style_prompt():
  """With the prompt as the program's start, the output alone is the function's body."""
  body = '    return a + b\n'
  assert scorers.score_code(body, TESTS, prompt_code='def add(a, b):\n') == 1.0
  assert scorers.score_code(body, TESTS) == 0.0  # an indented body alone does not run
  assert scorers.score_code('    return a - b', TESTS, prompt_code='def add(a, b):\n') == 0.0


def test_pass_at_k_is_the_chance_that_a_drawn_subset_holds_a_correct_sample():
  """Against enumerating every k-subset of n samples, `correct` of them correct."""
  for n in range(1, 7):
    for correct in range(n + 1):
      flags = [True] * correct + [False] * (n - correct)
      for k in range(1, n + 1):
        subsets = list(itertools.combinations(flags, k))
        want = sum(any(s) for s in subsets) / len(subsets)
        assert scorers.pass_at_k(n, correct, k) == pytest.approx(want, abs=1e-12)
  for bad in ((3, 4, 1), (3, 1, 0), (3, 1, 4), (3, -1, 1)):
    with pytest.raises(ValueError):
      scorers.pass_at_k(*bad)


def test_code_time_limit_and_no_network():
  assert scorers.score_code('while True:\n    pass', '', timeout_s=1.0) == 0.0
  net = 'import socket\ns = socket.create_connection(("127.0.0.1", 9))'
  assert scorers.score_code(net, '') == 0.0
  assert scorers.score_code('import os\nassert "HOME" not in os.environ', '') == 1.0


def test_load_task_kinds_and_malformed_lines(tmp_path):
  good = tmp_path / 'good.jsonl'
  good.write_text('\n'.join(json.dumps(x) for x in [
      {'prompt': 'a', 'choices': ['x', 'y'], 'label': 1},
      {'prompt': 'b', 'choices': ['x', 'y', 'z'], 'label': 0}]) + '\n\n')
  assert tasks.load_task(str(good)) == ('choice', [
      {'prompt': 'a', 'choices': ['x', 'y'], 'label': 1},
      {'prompt': 'b', 'choices': ['x', 'y', 'z'], 'label': 0}])
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('\n'.join([
      json.dumps({'prompt': '1+1=', 'answer': '2'}),
      '{not json',
      json.dumps({'prompt': '2+2=', 'target': '4'}),  # another kind
      json.dumps({'answer': '3'}),  # no prompt
  ]) + '\n')
  with pytest.raises(ValueError) as e:
    tasks.load_task(str(bad))
  msg = str(e.value)
  assert '3 malformed' in msg
  assert 'bad.jsonl:2' in msg and 'bad.jsonl:3' in msg and 'bad.jsonl:4' in msg
  label = tmp_path / 'label.jsonl'
  label.write_text(json.dumps({'prompt': 'a', 'choices': ['x', 'y'], 'label': 2}) + '\n')
  with pytest.raises(ValueError, match='label'):
    tasks.load_task(str(label))


def test_stop_strings_and_humaneval_prompts_in_task_files(tmp_path):
  code = {'prompt': 'def f():\n', 'tests': 'assert f() == 1', 'stop': ['\ndef', '\nif'],
          'prompt_is_code': True}
  good = tmp_path / 'good.jsonl'
  good.write_text(json.dumps(code) + '\n' + json.dumps({**code, 'prompt_is_code': False}) + '\n')
  assert tasks.load_task(str(good)) == ('code', [code, {**code, 'prompt_is_code': False}])
  for row, message in [
      ({**code, 'stop': '\ndef'}, '"stop" must be a list of non-empty strings'),
      ({**code, 'stop': ['']}, '"stop" must be a list of non-empty strings'),
      ({**code, 'prompt_is_code': 'yes'}, '"prompt_is_code" must be true or false'),
      ({'prompt': '1+1=', 'answer': '2', 'prompt_is_code': True},
       '"prompt_is_code" applies to code examples, not numeric'),
      ({'prompt': 'a', 'choices': ['x', 'y'], 'label': 0, 'stop': ['x']},
       "\"stop\" applies to generated kinds ('numeric', 'exact', 'code'), not choice"),
      ({'text': 'abc', 'stop': ['x']},
       "\"stop\" applies to generated kinds ('numeric', 'exact', 'code'), not text")]:
    bad = tmp_path / 'bad.jsonl'
    bad.write_text(json.dumps(row) + '\n')
    with pytest.raises(ValueError) as e:
      tasks.load_task(str(bad))
    assert f'bad.jsonl:1: {message}' in str(e.value)
