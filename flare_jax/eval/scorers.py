"""Scorers: each maps (model output text, the task's reference) to a 0/1 score. Pure functions.

numeric   GSM8K style: the last number in the output ("#### 42", "= 42", "42.0", "1,234") equals
          the reference number.
exact     next-line completion: the first output line equals the reference line (trailing
          spaces off).
code      the output is a Python program; it passes when `program + tests` exits 0 in a fresh
          interpreter (isolated mode, time limit, sockets disabled, temporary working directory).
choice    multiple choice scores by log-likelihood in harness.py; `best_choice` picks the answer.
"""
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence

_NUMBER = re.compile(r'-?\d[\d,]*(?:\.\d+)?|-?\.\d+')


def extract_number(text: str) -> float | None:
  """The answer number of a model output: after the last '####' if present, else the last number.
  Thousands separators are dropped; None when there is no number."""
  if '####' in text:
    text = text.rsplit('####', 1)[1]
  found = _NUMBER.findall(text)
  if not found:
    return None
  try:
    return float(found[-1].replace(',', ''))
  except ValueError:
    return None


def score_numeric(output: str, answer: str | float, *, tol: float = 1e-6) -> float:
  """1.0 when the output's answer number equals `answer` (within tol), else 0.0."""
  want = extract_number(str(answer))
  if want is None:
    raise ValueError(f'reference answer {answer!r} holds no number')
  got = extract_number(output)
  return float(got is not None and math.isclose(got, want, rel_tol=0.0, abs_tol=tol))


def first_line(text: str) -> str:
  return text.split('\n', 1)[0].rstrip()


def score_exact_line(output: str, target: str) -> float:
  """1.0 when the output's first line equals the target line (trailing whitespace ignored)."""
  return float(first_line(output) == target.rstrip())


def score_line_prefix(output: str, target: str) -> float:
  """A graded next-line score: the common prefix of the output's first line and the target line
  (trailing whitespace ignored), over the longer of the two; 1.0 exactly when `score_exact_line`
  is."""
  got, want = first_line(output), target.rstrip()
  if not (got or want):
    return 1.0
  return len(os.path.commonprefix([got, want])) / max(len(got), len(want))


def pass_at_k(n: int, correct: int, k: int) -> float:
  """The chance that at least one of k samples drawn without replacement from n, of which
  `correct` are correct, is correct: 1 - C(n - correct, k) / C(n, k) (Chen et al. 2021's unbiased
  pass@k estimator)."""
  if not 0 <= correct <= n or not 1 <= k <= n:
    raise ValueError(f'need 0 <= correct <= n and 1 <= k <= n, got n={n} correct={correct} k={k}')
  return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def best_choice(logliks: Sequence[float]) -> int:
  """Index of the highest log-likelihood (the first on ties)."""
  if not logliks:
    raise ValueError('no choices')
  return max(range(len(logliks)), key=lambda i: (logliks[i], -i))


# Run before the program: no sockets (no network), no subprocess spawning via os.system.
_SANDBOX_PRELUDE = '''\
import socket as _s
def _no_network(*a, **k):
    raise OSError("network access is disabled in evaluation")
_s.socket = _no_network
_s.create_connection = _no_network
del _s
'''


def extract_program(output: str) -> str:
  """The program in a model output: the first ```python fenced block if any, else the whole text."""
  m = re.search(r'```(?:python|py)?\n(.*?)(?:```|$)', output, re.S)
  return m.group(1) if m else output


def score_code(output: str, tests: str, *, timeout_s: float = 10.0,
               prompt_code: str | None = None) -> float:
  """1.0 when the output's program followed by `tests` exits 0 within `timeout_s`, else 0.0.
  The program is `extract_program(output)`, or with `prompt_code` (a HumanEval-style prompt: the
  program's start) `prompt_code + output`.

  Runs `python -I` (no user site, no PYTHON* env) in a temporary directory with an empty
  environment and sockets disabled; a syntax error, exception, failed assert or timeout scores 0.
  """
  program = extract_program(output) if prompt_code is None else prompt_code + output
  source = _SANDBOX_PRELUDE + program + '\n\n' + tests + '\n'
  with tempfile.TemporaryDirectory(prefix='flare_eval_') as tmp:
    path = os.path.join(tmp, 'candidate.py')
    with open(path, 'w', encoding='utf-8') as f:
      f.write(source)
    try:
      proc = subprocess.run([sys.executable, '-I', path], cwd=tmp, env={'PATH': os.defpath},
                            stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s,
                            check=False)
    except subprocess.TimeoutExpired:
      return 0.0
  return float(proc.returncode == 0)
