"""Example sources (random access, grain-compatible): JSONL, ArrayRecord, the Python standard library's
own source files (the embedded default corpus) and a generated arithmetic task.

An example is a dict with either "text", or "prompt" and "response", or "messages" (chat turns).
"""
import dataclasses
import hashlib
import json
import os
import sysconfig

import numpy as np


def _check_example(ex) -> str | None:
  """Why an example is malformed, or None."""
  if not isinstance(ex, dict):
    return 'not a JSON object'
  if 'text' in ex:
    return None if isinstance(ex['text'], str) and ex['text'] else '"text" must be a non-empty string'
  if 'prompt' in ex or 'response' in ex:
    ok = all(isinstance(ex.get(k), str) for k in ('prompt', 'response')) and ex['response']
    return None if ok else '"prompt"/"response" must be strings with a non-empty response'
  if 'messages' in ex:
    msgs = ex['messages']
    ok = isinstance(msgs, list) and msgs and all(
        isinstance(m, dict) and isinstance(m.get('role'), str) and isinstance(m.get('content'), str)
        for m in msgs) and msgs[-1]['role'] == 'assistant'
    return None if ok else '"messages" must be role/content turns ending with an assistant turn'
  return 'needs "text", "prompt"+"response" or "messages"'


@dataclasses.dataclass
class MalformedReport:
  count: int = 0
  examples: list = dataclasses.field(default_factory=list)  # first few 'file:line: why'

  def add(self, where: str, why: str) -> None:
    self.count += 1
    if len(self.examples) < 10:
      self.examples.append(f'{where}: {why}')

  def summary(self, total: int) -> str:
    if not self.count:
      return f'data: {total} examples, none malformed'
    return (f'data: {total} examples; skipped {self.count} malformed lines, e.g. '
            + '; '.join(self.examples))


class JsonlSource:
  """JSON lines, indexed once by byte offset (O(1) access). Malformed lines are counted with their
  file:line and skipped, or fatal with on_malformed='error'."""

  def __init__(self, paths, on_malformed: str = 'skip'):
    if on_malformed not in ('skip', 'error'):
      raise ValueError(f"on_malformed must be 'skip' or 'error', got {on_malformed!r}")
    self._index: list[tuple[str, int]] = []
    self.malformed = MalformedReport()
    for path in paths:
      with open(path, 'rb') as f:
        offset = 0
        for n, line in enumerate(f, 1):
          if line.strip():
            try:
              why = _check_example(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
              why = f'invalid JSON ({e.msg if hasattr(e, "msg") else e})'
            if why is None:
              self._index.append((path, offset))
            else:
              self.malformed.add(f'{path}:{n}', why)
          offset += len(line)
    if self.malformed.count and on_malformed == 'error':
      raise ValueError(f'{self.malformed.count} malformed lines: ' + '; '.join(self.malformed.examples))
    if not self._index:
      raise ValueError(f'no usable examples in {list(paths)}')

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, i: int) -> dict:
    path, offset = self._index[i]
    with open(path, 'rb') as f:
      f.seek(offset)
      return json.loads(f.readline())

  def report(self) -> str:
    return self.malformed.summary(len(self))


class ArrayRecordSource:
  """ArrayRecord files whose records are UTF-8 JSON examples (see `write_array_record`)."""

  def __init__(self, paths):
    import grain  # pylint: disable=g-import-not-at-top
    self._src = grain.sources.ArrayRecordDataSource(list(paths))

  def __len__(self) -> int:
    return len(self._src)

  def __getitem__(self, i: int) -> dict:
    ex = json.loads(self._src[i])
    why = _check_example(ex)
    if why:
      raise ValueError(f'array_record example {i}: {why}')
    return ex

  def report(self) -> str:
    return f'data: {len(self)} array_record examples'


def write_array_record(examples, path: str) -> None:
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  writer = array_record_module.ArrayRecordWriter(path, 'group_size:1')
  for ex in examples:
    writer.write(json.dumps(ex).encode('utf-8'))
  writer.close()


def _stdlib_files() -> list[str]:
  root = sysconfig.get_paths()['stdlib']
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in ('site-packages', 'test', 'tests',
                                                          'idlelib', 'lib2to3', '__pycache__'))
    out += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith('.py')]
  return out


class StdlibSource:
  """The Python standard library's .py files as {"text"} documents: a real corpus on every machine.

  The split is by a hash of the relative path (about 5% held out), so it is the same everywhere.
  """

  def __init__(self, split: str = 'train', heldout_percent: int = 5):
    if split not in ('train', 'heldout'):
      raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    root = sysconfig.get_paths()['stdlib']
    self._files = []
    for path in _stdlib_files():
      h = int(hashlib.sha1(os.path.relpath(path, root).encode()).hexdigest(), 16) % 100
      if (h < heldout_percent) == (split == 'heldout'):
        self._files.append(path)

  def __len__(self) -> int:
    return len(self._files)

  def __getitem__(self, i: int) -> dict:
    with open(self._files[i], encoding='utf-8', errors='replace') as f:
      return {'text': f.read()}

  def report(self) -> str:
    return f'data: {len(self)} Python standard library files'


class ArithmeticSource:
  """Generated prompt/response pairs 'a+b=' -> 'c' (and a-b, a*b): a task small models learn fast."""

  def __init__(self, n: int = 20000, seed: int = 0):
    rng = np.random.default_rng(seed)
    self._a = rng.integers(0, 100, n)
    self._b = rng.integers(0, 100, n)
    self._op = rng.integers(0, 3, n)

  def __len__(self) -> int:
    return len(self._a)

  def __getitem__(self, i: int) -> dict:
    a, b, op = int(self._a[i]), int(self._b[i]), int(self._op[i])
    sym, val = [('+', a + b), ('-', a - b), ('*', a * b)][op]
    return {'prompt': f'{a}{sym}{b}=', 'response': str(val)}

  def report(self) -> str:
    return f'data: {len(self)} generated arithmetic examples'
