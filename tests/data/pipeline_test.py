"""The grain pipeline: batches, determinism, exact resume (also via orbax), shards, epochs."""
import collections
import json

from absl import flags
import grain
import ml_collections as mlc
import numpy as np
import orbax.checkpoint as ocp
import pytest

from flare_jax.data import packing
from flare_jax.data import pipeline
from flare_jax.data import tokenizer as tokenizer_lib

TOK = tokenizer_lib.ByteTokenizer()


def _cfg(**overrides) -> mlc.ConfigDict:
  cfg = dict(source='arithmetic', paths='', seq_len=32, batch_size=4, seed=0, num_epochs=None,
             on_malformed='skip', long_docs='split', worker_count=0, num_examples=500)
  cfg.update(overrides)
  return mlc.ConfigDict(cfg)


def _jsonl(tmp_path, n=37, malformed=()):
  """n documents 'doc <i> ...' of 10 to 30 tokens, + malformed lines inserted at given lines."""
  lines = [json.dumps({'text': f'doc {i} ' + 'x' * (i % 23)}) if i % 3 else
           json.dumps({'prompt': f'doc {i} q', 'response': 'a' * (1 + i % 5)}) for i in range(n)]
  for pos, bad in malformed:
    lines.insert(pos, bad)
  path = tmp_path / 'd.jsonl'
  path.write_text('\n'.join(lines) + '\n')
  return str(path)


def _documents(batches):
  """Every document in the batches as (tokens, response_mask) tuples, in row-major order."""
  docs = []
  for b in batches:
    for r in range(b['tokens'].shape[0]):
      seg = b['segment_ids'][r]
      for d in range(1, seg.max() + 1):
        idx = seg == d
        docs.append((tuple(b['tokens'][r][idx].tolist()),
                     tuple(b['response_mask'][r][idx].tolist())))
  return docs


def _expected_documents(path):
  with open(path, encoding='utf-8') as f:
    return [(tuple(d['tokens'].tolist()), tuple(d['response_mask'].tolist()))
            for d in (packing.tokenize_example(json.loads(line), TOK) for line in f)]


def test_batches_hold_valid_packed_arithmetic_rows():
  batch = next(pipeline.make_iterator(_cfg(), TOK))
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      'tokens': ((4, 32), np.int32), 'segment_ids': ((4, 32), np.int32),
      'positions': ((4, 32), np.int32), 'response_mask': ((4, 32), bool)}
  n_docs = 0
  for r in range(4):
    tok, seg, pos, resp = (batch[k][r] for k in packing.ROW_KEYS)
    assert (tok[seg == 0] == TOK.pad_id).all() and not resp[seg == 0].any()
    for d in range(1, seg.max() + 1):
      idx = np.nonzero(seg == d)[0]
      np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
      assert tok[idx][-1] == TOK.eos_id and resp[idx][-1]
      prompt, response = TOK.decode(tok[idx][~resp[idx]]), TOK.decode(tok[idx][resp[idx]][:-1])
      assert prompt.endswith('=')
      assert eval(prompt[:-1]) == int(response)  # pylint: disable=eval-used
      n_docs += 1
  assert n_docs >= 8  # ~11-token documents, several per 32-token row


def test_same_config_same_batches_and_the_seed_matters():
  a, b = pipeline.make_iterator(_cfg(), TOK), pipeline.make_iterator(_cfg(), TOK)
  c = pipeline.make_iterator(_cfg(seed=1), TOK)
  first_a, first_c = None, None
  for step in range(5):
    xa, xb, xc = next(a), next(b), next(c)
    for k in packing.ROW_KEYS:
      np.testing.assert_array_equal(xa[k], xb[k])
    if step == 0:
      first_a, first_c = xa['tokens'], xc['tokens']
  assert not np.array_equal(first_a, first_c)


def test_iterator_state_resumes_exactly():
  cfg = _cfg(seq_len=64, long_docs='split', source='stdlib')
  it = pipeline.make_iterator(cfg, TOK)
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  resumed = pipeline.make_iterator(cfg, TOK)
  resumed.set_state(json.loads(json.dumps(state)))  # survives a JSON round trip
  for e in expected:
    got = next(resumed)
    for k in packing.ROW_KEYS:
      np.testing.assert_array_equal(got[k], e[k])


def test_resume_through_orbax_with_grain_checkpoint_args(tmp_path):
  cfg = _cfg()
  it = pipeline.make_iterator(cfg, TOK)
  for _ in range(3):
    next(it)
  with ocp.CheckpointManager(str(tmp_path / 'ckpt'), item_names=('data_iter',)) as manager:
    manager.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
  expected = [next(it)['tokens'] for _ in range(3)]
  fresh = pipeline.make_iterator(cfg, TOK)
  with ocp.CheckpointManager(str(tmp_path / 'ckpt'), item_names=('data_iter',)) as manager:
    manager.restore(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
  for e in expected:
    np.testing.assert_array_equal(next(fresh)['tokens'], e)


def test_finite_epochs_cover_every_document_and_pad_the_last_batch(tmp_path):
  path = _jsonl(tmp_path)  # all documents fit in 32 tokens
  it = pipeline.make_iterator(_cfg(source='jsonl', paths=path, num_epochs=2), TOK)
  batches = list(it)
  assert all(b['tokens'].shape == (4, 32) for b in batches)
  expected = collections.Counter(_expected_documents(path))
  assert collections.Counter(_documents(batches)) == {d: 2 * n for d, n in expected.items()}
  empty_rows = [(i, r) for i, b in enumerate(batches) for r in range(4)
                if not b['segment_ids'][r].any()]
  assert all(i == len(batches) - 1 for i, _ in empty_rows)  # only the last batch is filled up
  assert next(it, None) is None


def test_each_epoch_is_reshuffled(tmp_path):
  path = _jsonl(tmp_path)
  # One packing bin keeps the document order, so the rows show the shuffled order.
  cfg = _cfg(source='jsonl', paths=path, num_epochs=2, packing_bins=1)
  docs = _documents(pipeline.make_iterator(cfg, TOK))
  expected = _expected_documents(path)
  first, second = docs[:len(expected)], docs[len(expected):]
  assert sorted(first) == sorted(second) == sorted(expected)
  assert first != second and first != expected


def test_two_processes_read_disjoint_shards_that_cover_the_data(tmp_path):
  path = _jsonl(tmp_path, n=41)
  cfg = _cfg(source='jsonl', paths=path, num_epochs=1, seq_len=48, batch_size=4)
  shards = [collections.Counter(_documents(pipeline.make_iterator(
      cfg, TOK, process_index=p, process_count=2))) for p in range(2)]
  assert not set(shards[0]) & set(shards[1])
  assert shards[0] + shards[1] == collections.Counter(_expected_documents(path))
  assert abs(sum(shards[0].values()) - sum(shards[1].values())) <= 1
  with pytest.raises(ValueError, match='multiple of the process count 3'):
    pipeline.make_iterator(cfg, TOK, process_index=0, process_count=3)


def test_reports_malformed_lines_and_long_documents(tmp_path):
  path = _jsonl(tmp_path, malformed=[(2, '{bad'), (5, json.dumps({'text': ''}))])
  it = pipeline.make_iterator(_cfg(source='jsonl', paths=path, long_docs='truncate', seq_len=16),
                               TOK)
  for _ in range(10):
    next(it)
  report = it.report()
  assert 'skipped 2 malformed lines' in report
  assert 'd.jsonl:3: invalid JSON' in report and 'd.jsonl:6: "text" must be' in report
  assert ' truncated' in report and ', 0 truncated' not in report
  with pytest.raises(ValueError, match='2 malformed lines'):
    pipeline.make_iterator(_cfg(source='jsonl', paths=path, on_malformed='error'), TOK)


@pytest.mark.parametrize('overrides, message', [
    (dict(batch_size=0), 'positive multiple'), (dict(long_docs='wrap'), 'long_docs'),
    (dict(num_epochs=0), 'num_epochs must be positive'), (dict(source='hf'), 'unknown data.source'),
    (dict(seed=-1), 'seed'), (dict(source='jsonl', paths=''), 'no data paths')],
    ids=['batch', 'long_docs', 'epochs', 'source', 'seed', 'paths'])
def test_config_errors(overrides, message):
  with pytest.raises(ValueError, match=message):
    pipeline.make_iterator(_cfg(**overrides), TOK)


def test_worker_processes_are_deterministic_and_resume():
  if not flags.FLAGS.is_parsed():  # grain workers read absl flags; launch/ parses them for real
    flags.FLAGS.mark_as_parsed()
  cfg = _cfg(worker_count=2)
  runs = []
  for _ in range(2):
    it = pipeline.make_iterator(cfg, TOK)
    runs.append([next(it)['tokens'] for _ in range(4)])
    state = it.get_state()
    runs[-1] += [next(it)['tokens'] for _ in range(2)]
    assert 'documents' in it.report()
    it.close()
  for a, b in zip(*runs):
    np.testing.assert_array_equal(a, b)
  resumed = pipeline.make_iterator(cfg, TOK)
  resumed.set_state(state)
  for e in runs[0][4:]:
    np.testing.assert_array_equal(next(resumed)['tokens'], e)
  resumed.close()


def test_file_sources_hold_out_eval_paths(tmp_path):
  train_dir, heldout_dir = tmp_path / 'train', tmp_path / 'heldout'
  train_dir.mkdir()
  heldout_dir.mkdir()
  train, heldout = _jsonl(train_dir, n=5), _jsonl(heldout_dir, n=7)
  cfg = _cfg(source='jsonl', paths=train, eval_paths=heldout, num_epochs=1)
  assert len(pipeline.make_source(cfg, 'train')) == 5
  assert len(pipeline.make_source(cfg, 'heldout')) == 7
  with pytest.raises(ValueError, match='no data paths given for the heldout split'):
    pipeline.make_source(_cfg(source='jsonl', paths=train), 'heldout')


def _lettered(tmp_path, letter, n):
  """A JSONL file of n documents '<letter> <i>' (so each batch's documents name their file)."""
  path = tmp_path / f'{letter}.jsonl'
  path.write_text(''.join(json.dumps({'text': f'{letter} {i}'}) + '\n' for i in range(n)))
  return str(path)


def _first_letters(batches):
  return collections.Counter(chr(tokens[0]) for tokens, _ in _documents(batches))


def test_weights_sample_each_file_in_proportion(tmp_path):
  """data.weights 3,1: three in four documents from the first file (a small file repeats), the
  same batches again from the same config and after a resume, and the report names both."""
  paths = f"{_lettered(tmp_path, 'a', 50)},{_lettered(tmp_path, 'b', 7)}"
  cfg = _cfg(source='jsonl', paths=paths, weights='3,1', batch_size=8)
  it = pipeline.make_iterator(cfg, TOK)
  batches = [next(it) for _ in range(30)]
  letters = _first_letters(batches)
  share = letters['a'] / (letters['a'] + letters['b'])
  assert set(letters) == {'a', 'b'} and abs(share - 0.75) < 0.05, letters
  assert 'a mixture of 2 sources by weight: 0.75 from ' in it.report() and 'b.jsonl' in it.report()
  again = pipeline.make_iterator(cfg, TOK)
  for want in batches[:5]:
    np.testing.assert_array_equal(next(again)['tokens'], want['tokens'])
  state = again.get_state()
  resumed = pipeline.make_iterator(cfg, TOK)
  resumed.set_state(state)
  for want in batches[5:10]:
    np.testing.assert_array_equal(next(resumed)['tokens'], want['tokens'])


def test_one_weighted_path_gives_the_unweighted_batches(tmp_path):
  path = _lettered(tmp_path, 'a', 20)
  plain = pipeline.make_iterator(_cfg(source='jsonl', paths=path), TOK)
  weighted = pipeline.make_iterator(_cfg(source='jsonl', paths=path, weights='2.5'), TOK)
  for _ in range(4):
    np.testing.assert_array_equal(next(plain)['tokens'], next(weighted)['tokens'])


@pytest.mark.parametrize('overrides, message', [
    (dict(weights='1'), 'has 1 weights for 2 data.paths entries'),
    (dict(weights='1,0'), 'must be positive and finite'),
    (dict(weights='1,x'), 'must be numbers'),
    (dict(weights='1,1', num_epochs=2), 'set data.num_epochs=-1'),
    (dict(weights='1,1', source='arithmetic'), 'mixes file sources'),
])
def test_bad_weights_are_config_errors(tmp_path, overrides, message):
  paths = f"{_lettered(tmp_path, 'a', 5)},{_lettered(tmp_path, 'b', 5)}"
  with pytest.raises(ValueError, match=message):
    pipeline.make_iterator(_cfg(**{'source': 'jsonl', 'paths': paths, **overrides}), TOK)
