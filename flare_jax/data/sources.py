"""Random-access example sources (grain `RandomAccessDataSource`-like: len + getitem -> dict).

An example is a dict of one of three kinds (extra keys are ignored):
  {"text": str}                                 a plain document; every token is trained;
  {"prompt": str, "response": str}              only the response is trained;
  {"messages": [{"role": str, "content": str}, ...]}  chat turns ending with an assistant
      turn, rendered by the tokenizer's chat template; only the last assistant turn is trained.
Sources: JSONL and ArrayRecord files, the Python standard library's own .py files (the embedded
default corpus, no downloads) and a generated arithmetic task for CI.
"""
import dataclasses
import hashlib
import json
import os
import sys
import sysconfig
import time
from typing import Callable, Iterable, Sequence

import numpy as np

_MAX_REPORTED = 10  # malformed lines listed in errors and reports


def validate_example(example) -> str | None:
  """Why `example` is not a usable example (a short reason), or None when it is."""
  if not isinstance(example, dict):
    return f'expected a JSON object, got {type(example).__name__}'
  kinds = [k for k in ('text', 'prompt', 'response', 'messages') if k in example]
  if kinds == ['text']:
    text = example['text']
    return None if isinstance(text, str) and text else '"text" must be a non-empty string'
  if kinds == ['prompt', 'response']:
    if not isinstance(example['prompt'], str) or not isinstance(example['response'], str):
      return '"prompt" and "response" must be strings'
    return None if example['response'] else '"response" must be non-empty'
  if kinds == ['messages']:
    msgs = example['messages']
    if not isinstance(msgs, list) or not msgs:
      return '"messages" must be a non-empty list'
    for i, m in enumerate(msgs):
      if not (isinstance(m, dict) and isinstance(m.get('role'), str)
              and isinstance(m.get('content'), str)):
        return f'messages[{i}] must be {{"role": str, "content": str}}'
    if msgs[-1]['role'] != 'assistant' or not msgs[-1]['content']:
      return 'the last message must be a non-empty assistant turn'
    return None
  if not kinds:
    return 'needs "text", "prompt"+"response" or "messages"'
  return f'ambiguous or incomplete fields {kinds}: use "text", "prompt"+"response" or "messages"'


@dataclasses.dataclass
class MalformedLines:
  """Malformed lines seen while indexing: the count and the first few 'file:line: reason'."""
  count: int = 0
  first: list[str] = dataclasses.field(default_factory=list)

  def add(self, where: str, why: str) -> None:
    self.count += 1
    if len(self.first) < _MAX_REPORTED:
      self.first.append(f'{where}: {why}')

  def describe(self) -> str:
    more = f' (and {self.count - len(self.first)} more)' if self.count > len(self.first) else ''
    return f'{self.count} malformed lines: ' + '; '.join(self.first) + more


def as_paths(paths: str | Sequence[str]) -> list[str]:
  """data.paths as a list of existing files (a comma-separated str or a list); raises ValueError
  for none or missing files."""
  if isinstance(paths, str):
    paths = paths.split(',')
  out = [p.strip() for p in paths if p and p.strip()]
  if not out:
    raise ValueError('no data paths given')
  missing = [p for p in out if not os.path.isfile(p)]
  if missing:
    raise ValueError(f'data files not found: {missing}')
  return out


def _stderr(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


class JsonlSource:
  """JSON-lines files, indexed once by byte offset so that `__getitem__` is O(1) (one pread).

  Every line is parsed and validated while indexing. Malformed lines (bad JSON or UTF-8, wrong or
  missing fields, non-string values, empty text) are recorded with their file:line; with
  on_malformed='skip' they are left out and `report()` summarizes them, with 'error' construction
  raises. Blank lines are ignored.
  """

  # Files at least this large report their indexing (a few hundred MB/s: a minute per ~20 GB).
  PROGRESS_BYTES = 1 << 30

  def __init__(self, paths: str | Sequence[str], on_malformed: str = 'skip',
               log: Callable[[str], None] = _stderr):
    """Args: paths: files (a list or a comma-separated string); on_malformed: 'skip' | 'error';
    log: where files of PROGRESS_BYTES or more report their indexing, every PROGRESS_BYTES.

    Raises:
      ValueError: a missing file, an unknown on_malformed, malformed lines with 'error', or no
        usable example at all.
    """
    if on_malformed not in ('skip', 'error'):
      raise ValueError(f"on_malformed must be 'skip' or 'error', got {on_malformed!r}")
    self._paths = as_paths(paths)
    self.malformed = MalformedLines()
    file_ids, offsets, lengths = [], [], []
    for file_id, path in enumerate(self._paths):
      size, started = os.path.getsize(path), time.perf_counter()
      report_at = self.PROGRESS_BYTES if size >= self.PROGRESS_BYTES else None
      with open(path, 'rb') as f:
        offset = 0
        for line_no, line in enumerate(f, 1):
          if report_at is not None and offset >= report_at:
            log(f'indexing {path}: {offset / 2**30:.1f} of {size / 2**30:.1f} GiB, '
                f'{time.perf_counter() - started:.0f} s')
            report_at += self.PROGRESS_BYTES
          if line.strip():
            try:
              why = validate_example(json.loads(line.decode('utf-8')))
            except UnicodeDecodeError as e:
              why = f'invalid UTF-8 ({e.reason})'
            except json.JSONDecodeError as e:
              why = f'invalid JSON ({e.msg})'
            if why is None:
              file_ids.append(file_id)
              offsets.append(offset)
              lengths.append(len(line))
            else:
              self.malformed.add(f'{path}:{line_no}', why)
          offset += len(line)
      if report_at is not None:
        log(f'indexed {path}: {size / 2**30:.1f} GiB in {time.perf_counter() - started:.0f} s')
    if self.malformed.count and on_malformed == 'error':
      raise ValueError(f'{self.malformed.describe()} (on_malformed=error)')
    if not offsets:
      raise ValueError(f'no usable examples in {self._paths}'
                       + (f'; {self.malformed.describe()}' if self.malformed.count else ''))
    self._file_ids = np.asarray(file_ids, np.int32)
    self._offsets = np.asarray(offsets, np.int64)
    self._lengths = np.asarray(lengths, np.int64)
    self._fds: dict[int, int] = {}  # opened lazily per process; pread is thread-safe

  def __len__(self) -> int:
    return len(self._offsets)

  def __getitem__(self, index: int) -> dict:
    file_id = int(self._file_ids[index])
    fd = self._fds.get(file_id)
    if fd is None:  # grain reads from several threads: keep the first fd opened, close the others
      opened = os.open(self._paths[file_id], os.O_RDONLY)
      fd = self._fds.setdefault(file_id, opened)
      if fd != opened:
        os.close(opened)
    line = os.pread(fd, int(self._lengths[index]), int(self._offsets[index]))
    return json.loads(line.decode('utf-8'))

  def report(self) -> str:
    if not self.malformed.count:
      return f'data: {len(self)} JSONL examples, no malformed lines'
    return f'data: {len(self)} JSONL examples; skipped {self.malformed.describe()}'

  def __getstate__(self):  # file descriptors do not travel to grain worker processes
    state = dict(self.__dict__)
    state['_fds'] = {}
    return state

  def __del__(self):
    for fd in getattr(self, '_fds', {}).values():
      try:
        os.close(fd)
      except OSError:
        pass


class ArrayRecordSource:
  """ArrayRecord files whose records are UTF-8 JSON examples (write them with `write_array_record`).

  Records are validated when read; a malformed one raises ValueError naming its index.
  """

  def __init__(self, paths: str | Sequence[str]):
    import grain  # pylint: disable=g-import-not-at-top
    self._paths = as_paths(paths)
    self._src = grain.sources.ArrayRecordDataSource(self._paths)

  def __len__(self) -> int:
    return len(self._src)

  def __getitem__(self, index: int) -> dict:
    record = self._src[index]
    try:
      example = json.loads(record.decode('utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f'array_record {self._paths} record {index}: not UTF-8 JSON ({e})') from e
    why = validate_example(example)
    if why:
      raise ValueError(f'array_record {self._paths} record {index}: {why}')
    return example

  def report(self) -> str:
    return f'data: {len(self)} ArrayRecord examples in {len(self._paths)} file(s)'


def write_array_record(examples: Iterable[dict], path: str) -> int:
  """Writes examples as UTF-8 JSON records to an ArrayRecord file (e.g. to convert JSONL).

  Returns:
    The number of records written.

  Raises:
    ValueError: an invalid example (nothing is left behind at `path`).
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  writer = array_record_module.ArrayRecordWriter(path, 'group_size:1')
  n = 0
  try:
    for n, example in enumerate(examples, 1):
      why = validate_example(example)
      if why:
        raise ValueError(f'example {n - 1}: {why}')
      writer.write(json.dumps(example, ensure_ascii=False).encode('utf-8'))
  except BaseException:
    writer.close()
    os.remove(path)
    raise
  writer.close()
  return n


_STDLIB_SKIP_DIRS = frozenset(
    {'site-packages', 'dist-packages', 'test', 'tests', 'idle_test', '__pycache__'})


def stdlib_files() -> list[str]:
  """The standard library's .py files (sorted relative paths), without site-packages and tests."""
  root = sysconfig.get_paths()['stdlib']
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS)
    rel = os.path.relpath(dirpath, root)
    out += [os.path.normpath(os.path.join(rel, f)) for f in filenames if f.endswith('.py')]
  return sorted(p.replace(os.sep, '/') for p in out)


def stdlib_split(relpath: str, heldout_percent: int = 5) -> str:
  """'heldout' for about `heldout_percent`% of files (a hash of the relative path), else 'train'."""
  bucket = int.from_bytes(hashlib.sha256(relpath.encode('utf-8')).digest()[:8], 'little') % 100
  return 'heldout' if bucket < heldout_percent else 'train'


class StdlibSource:
  """The Python standard library's own .py files as {"text"} documents: a real corpus on every
  machine. The split is by a hash of each file's relative path, so it is the same everywhere (the
  file set depends on the Python version). Empty files are left out."""

  def __init__(self, split: str = 'train', heldout_percent: int = 5):
    if split not in ('train', 'heldout'):
      raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    self._root = sysconfig.get_paths()['stdlib']
    self.files = [p for p in stdlib_files() if stdlib_split(p, heldout_percent) == split
                  and os.path.getsize(os.path.join(self._root, p)) > 0]
    if not self.files:
      raise ValueError(f'no standard library files found under {self._root}')

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict:
    with open(os.path.join(self._root, self.files[index]), encoding='utf-8',
              errors='replace') as f:
      return {'text': f.read()}

  def report(self) -> str:
    return f'data: {len(self)} Python standard library files under {self._root}'


class SyntheticArithmeticSource:
  """Generated {"prompt": "12+7=", "response": "19"} examples (+, - and *, operands
  0..max_operand-1)."""

  def __init__(self, n: int = 20000, seed: int = 0, max_operand: int = 100):
    if n <= 0:
      raise ValueError(f'n must be positive, got {n}')
    if max_operand < 1:
      raise ValueError(f'max_operand must be >= 1, got {max_operand}')
    rng = np.random.default_rng(seed)
    self._a, self._b = rng.integers(0, max_operand, n), rng.integers(0, max_operand, n)
    self._op = rng.integers(0, 3, n)

  def __len__(self) -> int:
    return len(self._a)

  def __getitem__(self, index: int) -> dict:
    a, b = int(self._a[index]), int(self._b[index])
    sym, value = (('+', a + b), ('-', a - b), ('*', a * b))[int(self._op[index])]
    return {'prompt': f'{a}{sym}{b}=', 'response': str(value)}

  def report(self) -> str:
    return f'data: {len(self)} generated arithmetic examples'
