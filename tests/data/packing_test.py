"""Tokenizing examples into documents, long-document policies, and first-fit packing invariants."""
import grain
import numpy as np
import pytest

from flare_jax.data import packing
from flare_jax.data import tokenizer as tokenizer_lib

TOK = tokenizer_lib.ByteTokenizer()
PAD = TOK.pad_id


class _BosByteTokenizer(tokenizer_lib.ByteTokenizer):
  """The byte tokenizer with '<|endoftext|>' (256) also as bos, like Llama-style vocabularies."""
  bos_id = property(lambda self: 256)


def _doc(tokens, mask):
  return {'tokens': np.asarray(tokens, np.int32), 'response_mask': np.asarray(mask, bool)}


def test_tokenize_text_prompt_response_and_chat():
  d = packing.tokenize_example({'text': 'hé'}, TOK)
  np.testing.assert_array_equal(d['tokens'], [104, 0xc3, 0xa9, 256])
  assert d['tokens'].dtype == np.int32 and d['response_mask'].dtype == bool
  assert d['response_mask'].all()
  d = packing.tokenize_example({'prompt': '1+2=', 'response': '3'}, TOK)
  np.testing.assert_array_equal(d['tokens'], [ord(c) for c in '1+2=3'] + [256])
  np.testing.assert_array_equal(d['response_mask'], [0, 0, 0, 0, 1, 1])
  msgs = [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'ok'}]
  d = packing.tokenize_example({'messages': msgs}, TOK)
  prompt = '<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n'
  n_prompt = len(TOK.encode(prompt))
  np.testing.assert_array_equal(d['tokens'], TOK.encode(prompt + 'ok<|im_end|>') + [256])
  np.testing.assert_array_equal(d['response_mask'], [0] * n_prompt + [1, 1, 1, 1])


def test_tokenize_prepends_bos_once():
  tok = _BosByteTokenizer()
  d = packing.tokenize_example({'prompt': 'a', 'response': 'b'}, tok)
  np.testing.assert_array_equal(d['tokens'], [256, 97, 98, 256])
  np.testing.assert_array_equal(d['response_mask'], [0, 0, 1, 1])
  d = packing.tokenize_example({'prompt': '<|endoftext|>a', 'response': 'b'}, tok)  # template bos
  np.testing.assert_array_equal(d['tokens'], [256, 97, 98, 256])
  d = packing.tokenize_example({'text': 'b'}, tok)
  np.testing.assert_array_equal(d['response_mask'], [0, 1, 1])


def test_tokenize_does_not_repeat_an_eos_that_ends_the_chat_turn():
  class ImEndEos(tokenizer_lib.ByteTokenizer):  # like Qwen chat checkpoints: eos = <|im_end|>
    eos_id = property(lambda self: 259)

  msgs = [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'ok'}]
  d = packing.tokenize_example({'messages': msgs}, ImEndEos())
  assert d['tokens'][-3:].tolist() == [ord('o'), ord('k'), 259]
  d = packing.tokenize_example({'text': 'ok'}, ImEndEos())
  assert d['tokens'].tolist() == [ord('o'), ord('k'), 259]


def test_long_document_policies_and_counts():
  doc = _doc(np.arange(70), [0] * 5 + [1] * 65)
  pieces, c = packing.fit_length(doc, 32, 'split')
  assert [len(p['tokens']) for p in pieces] == [32, 32, 6]
  np.testing.assert_array_equal(np.concatenate([p['tokens'] for p in pieces]), np.arange(70))
  np.testing.assert_array_equal(np.concatenate([p['response_mask'] for p in pieces]),
                                doc['response_mask'])
  assert (c['documents'], c['tokens'], c['split'], c['tokens_lost']) == (1, 70, 1, 0)
  pieces, c = packing.fit_length(doc, 32, 'truncate')
  assert len(pieces) == 1 and (pieces[0]['tokens'] == np.arange(32)).all()
  assert (c['truncated'], c['tokens_lost']) == (1, 38)
  pieces, c = packing.fit_length(doc, 32, 'drop')
  assert pieces == [] and (c['dropped'], c['tokens_lost']) == (1, 70)
  pieces, c = packing.fit_length(doc, 70, 'drop')  # fits: unchanged
  assert pieces == [doc] and c['dropped'] == c['tokens_lost'] == 0
  # A prompt longer than the row: truncation leaves nothing to train, so the piece is left out.
  long_prompt = _doc(np.arange(40), [0] * 38 + [1] * 2)
  pieces, c = packing.fit_length(long_prompt, 32, 'truncate')
  assert pieces == [] and (c['truncated'], c['untrainable_pieces'], c['tokens_lost']) == (1, 1, 40)
  pieces, c = packing.fit_length(long_prompt, 32, 'split')  # the second piece keeps the response
  assert [len(p['tokens']) for p in pieces] == [8] and c['untrainable_pieces'] == 1
  with pytest.raises(ValueError, match='long_docs'):
    packing.fit_length(doc, 32, 'wrap')


def _random_docs(rng, n, max_len):
  """Documents whose tokens encode (doc index, offset), so each is recognizable in a row."""
  docs = []
  for i in range(n):
    length = int(rng.integers(2, max_len + 1))
    n_prompt = int(rng.integers(0, length - 1))
    docs.append(_doc(1000 * i + np.arange(length), [0] * n_prompt + [1] * (length - n_prompt)))
  return docs


def _pack(docs, seq_len, num_bins=4, seed=0):
  ds = grain.MapDataset.source(docs).to_iter_dataset()
  return list(packing.pack_documents(ds, seq_len, pad_id=PAD, num_bins=num_bins, seed=seed))


def _documents_of(rows):
  """The (tokens, response_mask) documents in rows, checking every row invariant on the way."""
  found = []
  for row in rows:
    tok, seg, pos, resp = (row[k] for k in packing.ROW_KEYS)
    assert (tok.dtype, seg.dtype, pos.dtype, resp.dtype) == (np.int32, np.int32, np.int32, bool)
    n_docs = seg.max()
    real = seg > 0
    # Documents are contiguous runs numbered 1..n in order, followed by padding only.
    n_real = int(real.sum())
    assert real[:n_real].all() and not real[n_real:].any()
    np.testing.assert_array_equal(np.unique(seg[real]), np.arange(1, n_docs + 1))
    assert (np.diff(seg[real]) >= 0).all()
    # Padding: pad id, segment 0, position 0, not trained.
    assert (tok[~real] == PAD).all() and (pos[~real] == 0).all() and not resp[~real].any()
    for d in range(1, n_docs + 1):
      idx = np.nonzero(seg == d)[0]
      np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
      found.append((tuple(tok[idx].tolist()), tuple(resp[idx].tolist())))
  return found


@pytest.mark.parametrize('num_bins', [1, 3, 8], ids=['bins1', 'bins3', 'bins8'])
def test_packing_keeps_every_document_once_with_consistent_metadata(rng, num_bins):
  docs = _random_docs(rng, 60, 20)
  rows = _pack(docs, 24, num_bins=num_bins)
  assert all(r['tokens'].shape == (24,) for r in rows)
  found = _documents_of(rows)
  expected = [(tuple(d['tokens'].tolist()), tuple(d['response_mask'].tolist())) for d in docs]
  assert sorted(found) == sorted(expected)
  fill = sum(len(t) for t, _ in found) / (24 * len(rows))
  assert fill > (0.5 if num_bins == 1 else 0.7), fill


def test_packing_is_deterministic_and_seeded(rng):
  docs = _random_docs(rng, 40, 12)
  a, b, c = _pack(docs, 16, seed=0), _pack(docs, 16, seed=0), _pack(docs, 16, seed=1)
  for k in packing.ROW_KEYS:
    np.testing.assert_array_equal(np.stack([r[k] for r in a]), np.stack([r[k] for r in b]))
  assert sorted(_documents_of(a)) == sorted(_documents_of(c))
  assert not np.array_equal(np.stack([r['tokens'] for r in a]), np.stack([r['tokens'] for r in c]))


def test_fit_length_iterator_counts_and_resumes_inside_a_split_document():
  docs = [_doc(np.arange(n) + 100 * i, [1] * n) for i, n in enumerate([5, 23, 9, 40, 3])]
  ds = packing.FitLengthIterDataset(grain.MapDataset.source(docs).to_iter_dataset(), 8, 'split')
  it = iter(ds)
  pieces = [next(it) for _ in range(3)]  # 5 | 8 8 (7) | ...: stop inside doc 1
  assert [len(p['tokens']) for p in pieces] == [5, 8, 8]
  state = it.get_state()
  assert state['piece'] == 2 and packing.long_doc_counts(state)['documents'] == 1
  rest = [p['tokens'] for p in it]
  # doc 1's last piece, doc 2 without its 1-token tail (nothing to train), doc 3, doc 4.
  assert [len(t) for t in rest] == [7, 8, 8, 8, 8, 8, 8, 3]
  counts = packing.long_doc_counts(it.get_state())
  assert counts == dict(documents=5, tokens=80, split=3, truncated=0, dropped=0,
                        untrainable_pieces=1, tokens_lost=1)  # the 1-token tail of doc 2
  assert packing.live_long_doc_counts(it) == counts
  resumed = iter(ds)
  resumed.set_state(state)
  assert packing.long_doc_counts(resumed.get_state()) == packing.long_doc_counts(state)
  for t in rest:
    np.testing.assert_array_equal(next(resumed)['tokens'], t)
  assert next(resumed, None) is None and packing.long_doc_counts(resumed.get_state()) == counts
  # Counts nested anywhere in a state (e.g. one per worker process) are summed.
  assert packing.long_doc_counts({'w': [state, {'x': state}]})['documents'] == 2
