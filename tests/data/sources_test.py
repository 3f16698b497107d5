"""Example sources: JSONL indexing and malformed lines, ArrayRecord, stdlib corpus, arithmetic."""
import json
import os
import pickle
import sysconfig

import pytest

from flare_jax.data import sources

GOOD = [{'text': 'plain document ✓'}, {'prompt': 'Q: 1+1?', 'response': 'A: 2'},
        {'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'}]},
        {'prompt': '', 'response': 'empty prompt is fine', 'id': 7}]

# (line, reason fragment) for malformed lines.
BAD = [('{not json', 'invalid JSON'), (json.dumps({'text': ''}), '"text" must be a non-empty'),
       (json.dumps({'text': 3}), '"text" must be a non-empty'),
       (json.dumps({'prompt': 'q', 'response': 5}), 'must be strings'),
       (json.dumps({'prompt': 'q'}), 'ambiguous or incomplete'),
       (json.dumps({'text': 'a', 'prompt': 'b', 'response': 'c'}), 'ambiguous'),
       (json.dumps({'messages': [{'role': 'user', 'content': 'x'}]}), 'last message'),
       (json.dumps({'messages': [{'role': 'user'}]}), 'messages[0]'),
       (json.dumps([1, 2]), 'expected a JSON object'), (json.dumps({'other': 1}), 'needs "text"')]


def _write_lines(path, lines):
  path.write_bytes(b''.join((ln if isinstance(ln, bytes) else ln.encode('utf-8')) + b'\n'
                            for ln in lines))
  return str(path)


def test_validate_example_accepts_the_three_kinds_and_names_problems():
  for ex in GOOD:
    assert sources.validate_example(ex) is None, ex
  for line, why in BAD[1:]:
    assert why in sources.validate_example(json.loads(line)), line


def test_jsonl_skips_malformed_lines_with_line_numbers(tmp_path):
  # Interleave: good lines at 1, 3, 5, 7; malformed at 2, 4, 6, 8, ...; a blank line and bad UTF-8.
  lines = []
  for i, (bad, _) in enumerate(BAD):
    lines += [json.dumps(GOOD[i % len(GOOD)], ensure_ascii=False), bad]
  lines += ['   ', b'\xff\xfe{"text": "x"}']
  path = _write_lines(tmp_path / 'd.jsonl', lines)
  src = sources.JsonlSource(path)
  assert len(src) == len(BAD)
  assert [src[i] for i in range(len(src))] == [GOOD[i % len(GOOD)] for i in range(len(BAD))]
  assert src.malformed.count == len(BAD) + 1
  report = src.report()
  assert f'skipped {len(BAD) + 1} malformed lines' in report and '(and 1 more)' in report
  listed = src.malformed.first  # the first 10, as 'file:line: reason'
  assert len(listed) == 10
  for k, (_, why) in enumerate(BAD):
    assert listed[k].startswith(f'{path}:{2 * k + 2}: ') and why in listed[k], listed[k]
    assert listed[k] in report
  assert 'invalid UTF-8' not in report  # the 11th is only counted
  with pytest.raises(ValueError, match=r'11 malformed lines: .*d.jsonl:2: invalid JSON'):
    sources.JsonlSource(path, on_malformed='error')


def test_jsonl_several_files_comma_separated_and_picklable(tmp_path):
  a = _write_lines(tmp_path / 'a.jsonl', [json.dumps(GOOD[0]), json.dumps(GOOD[1])])
  b = _write_lines(tmp_path / 'b.jsonl', [json.dumps(GOOD[2])])
  src = sources.JsonlSource(f'{a},{b}')
  assert [src[i] for i in (2, 0, 1)] == [GOOD[2], GOOD[0], GOOD[1]]
  assert 'no malformed lines' in src.report()
  clone = pickle.loads(pickle.dumps(src))  # open file descriptors are not carried over
  assert [clone[i] for i in range(3)] == GOOD[:3]


def test_jsonl_errors(tmp_path):
  with pytest.raises(ValueError, match='data files not found'):
    sources.JsonlSource([str(tmp_path / 'missing.jsonl')])
  with pytest.raises(ValueError, match='no data paths'):
    sources.JsonlSource('')
  path = _write_lines(tmp_path / 'bad.jsonl', ['{', '{}'])
  with pytest.raises(ValueError, match='no usable examples.*2 malformed'):
    sources.JsonlSource(path)
  with pytest.raises(ValueError, match='on_malformed'):
    sources.JsonlSource(path, on_malformed='ignore')


def test_array_record_round_trip_and_validation(tmp_path):
  path = str(tmp_path / 'd.array_record')
  assert sources.write_array_record(GOOD, path) == len(GOOD)
  src = sources.ArrayRecordSource([path])
  assert len(src) == len(GOOD) and [src[i] for i in range(len(src))] == GOOD
  bad_path = str(tmp_path / 'bad.array_record')
  with pytest.raises(ValueError, match='example 1: "text" must be a non-empty'):
    sources.write_array_record([GOOD[0], {'text': ''}], bad_path)
  assert not os.path.exists(bad_path)


def test_stdlib_source_finds_files_and_splits_disjointly():
  train, held = sources.StdlibSource('train'), sources.StdlibSource('heldout')
  root = sysconfig.get_paths()['stdlib']
  assert len(train) > 300 and len(held) > 5
  assert not set(train.files) & set(held.files)
  nonempty = [p for p in sources.stdlib_files() if os.path.getsize(os.path.join(root, p))]
  assert sorted(train.files + held.files) == nonempty
  assert 0.02 < len(held) / len(nonempty) < 0.1
  assert 'os.py' in train.files + held.files and 'json/decoder.py' in train.files + held.files
  for p in train.files + held.files:
    parts = p.split('/')
    assert not {'site-packages', 'test', 'tests'} & set(parts) and p.endswith('.py'), p
  with open(os.path.join(root, train.files[0]), encoding='utf-8') as f:
    assert train[0] == {'text': f.read()}
  with pytest.raises(ValueError, match='split'):
    sources.StdlibSource('validation')


def test_arithmetic_source_is_correct_and_seeded():
  src = sources.SyntheticArithmeticSource(200, seed=3)
  examples = [src[i] for i in range(len(src))]
  for ex in examples:
    assert sources.validate_example(ex) is None and ex['prompt'].endswith('=')
    assert eval(ex['prompt'][:-1]) == int(ex['response'])  # pylint: disable=eval-used
  assert {op for ex in examples for op in '+-*' if op in ex['prompt']} == {'+', '-', '*'}
  assert examples == [sources.SyntheticArithmeticSource(200, seed=3)[i] for i in range(200)]
  assert examples != [sources.SyntheticArithmeticSource(200, seed=4)[i] for i in range(200)]


def test_jsonl_reports_indexing_progress_of_large_files_only(tmp_path, monkeypatch):
  monkeypatch.setattr(sources.JsonlSource, 'PROGRESS_BYTES', 1000)
  line = json.dumps({'text': 'x' * 90}) + '\n'  # 103 bytes
  (tmp_path / 'big.jsonl').write_text(line * 30)  # 3090 bytes: lines start past 1000 and 2000
  (tmp_path / 'small.jsonl').write_text(line * 9)  # 927 bytes: below the threshold
  messages = []
  src = sources.JsonlSource([str(tmp_path / 'big.jsonl'), str(tmp_path / 'small.jsonl')],
                            log=messages.append)
  assert len(src) == 39
  big = tmp_path / 'big.jsonl'
  assert len(messages) == 3 and all(m.startswith(f'indexing {big}: ') for m in messages[:2])
  assert messages[2].startswith(f'indexed {big}: ')
