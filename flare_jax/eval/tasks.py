"""Task files: JSONL, one example per line; the keys name the kind (all lines of a file agree).

  numeric  {"prompt": "...", "answer": "42"}              generate, score the final number
  exact    {"prompt": "...", "target": "next line"}       generate, score the first line
  code     {"prompt": "...", "tests": "assert f(1) == 2"} generate, run program + tests
  choice   {"prompt": "...", "choices": ["a", "b"], "label": 1}   log-likelihood of each choice
  text     {"text": "..."}                                  AR perplexity over all the texts

Generated kinds may add "stop": ["\\n\\n", ...]: the output is cut before the first of these
strings, then scored (and kept so). A code example with "prompt_is_code": true is HumanEval style:
its program is the prompt followed by the output (else the output alone, or its first ```python
block). `launch.convert_task` writes HumanEval, MBPP and GSM8K files in this format.
"""
import json

from flare_jax.sampling import stop_strings

KINDS = {'numeric': 'answer', 'exact': 'target', 'code': 'tests', 'choice': 'choices',
         'text': 'text'}
GENERATED = ('numeric', 'exact', 'code')  # kinds scored from generated text


def _kind_of(example: dict) -> str | None:
  found = [kind for kind, key in KINDS.items() if key in example]
  return found[0] if len(found) == 1 else None


def _problem(example, kind: str) -> str | None:
  if not isinstance(example, dict):
    return 'not a JSON object'
  return _kind_problem(example, kind) or _options_problem(example, kind)


def _kind_problem(example: dict, kind: str) -> str | None:
  if kind == 'text' and _kind_of(example) == kind:
    text = example['text']
    return None if isinstance(text, str) and text else '"text" must be a non-empty string'
  if not isinstance(example.get('prompt'), str):
    return 'no "prompt" string'
  if _kind_of(example) != kind:
    return f'not a {kind} example (needs exactly one of {sorted(KINDS.values())})'
  if kind == 'choice':
    choices, label = example['choices'], example.get('label')
    if not (isinstance(choices, list) and len(choices) >= 2
            and all(isinstance(c, str) and c for c in choices)):
      return '"choices" must be a list of at least two non-empty strings'
    if not isinstance(label, int) or not 0 <= label < len(choices):
      return f'"label" must be an index into the {len(choices)} choices'
  elif not isinstance(example[KINDS[kind]], (str, int, float)):
    return f'"{KINDS[kind]}" must be a string'
  return None


def _options_problem(example: dict, kind: str) -> str | None:
  """The optional keys: "stop" (generated kinds), "prompt_is_code" (code)."""
  if 'stop' in example:
    if kind not in GENERATED:
      return f'"stop" applies to generated kinds {GENERATED}, not {kind}'
    try:
      stop_strings.from_json(example['stop'])
    except ValueError as e:
      return str(e)
  if 'prompt_is_code' in example:
    if kind != 'code':
      return f'"prompt_is_code" applies to code examples, not {kind}'
    if not isinstance(example['prompt_is_code'], bool):
      return '"prompt_is_code" must be true or false'
  return None


def load_task(path: str, limit: int = 0) -> tuple[str, list[dict]]:
  """Reads a task file. Returns (kind, examples). Raises ValueError naming every bad line
  (up to 10)."""
  examples, bad, kind = [], [], None
  with open(path, encoding='utf-8') as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        example = json.loads(line)
      except json.JSONDecodeError as e:
        bad.append(f'{path}:{lineno}: invalid JSON ({e.msg})')
        continue
      if kind is None and isinstance(example, dict):
        kind = _kind_of(example)
      problem = _problem(example, kind) if kind else 'cannot tell the task kind from its keys'
      if problem:
        bad.append(f'{path}:{lineno}: {problem}')
      else:
        examples.append(example)
      if limit and len(examples) >= limit:
        break
  if bad:
    raise ValueError(f'{len(bad)} malformed task line(s):\n  ' + '\n  '.join(bad[:10]))
  if not examples:
    raise ValueError(f'{path} holds no examples')
  return kind, examples


def write_task(path: str, examples: list[dict]) -> None:
  with open(path, 'w', encoding='utf-8') as f:
    for ex in examples:
      f.write(json.dumps(ex) + '\n')
