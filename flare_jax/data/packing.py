"""Examples -> token documents (tokens + response mask, eos appended) -> packed rows of length T.

A packed row (numpy; batched to [B, T] by the pipeline):
  tokens        int32 [T]  document tokens back to back; padding is the tokenizer's pad id;
  segment_ids   int32 [T]  0 = padding, documents numbered 1, 2, ... within the row;
  positions     int32 [T]  0, 1, ... restarting at each document start; padding 0;
  response_mask bool  [T]  True on trained (response) tokens; prompt tokens and padding False.
Nothing is shifted: the objective derives targets (position p predicts token p + 1 in a document).
Documents are packed first-fit (grain `FirstFitPackIterDataset`); documents longer than T are split,
truncated or dropped (`long_docs`) by `FitLengthIterDataset`, which counts what it did in its
checkpointable iterator state.
"""
import dataclasses
from typing import Any

import grain
from grain import experimental as grain_exp
import numpy as np

LONG_DOC_POLICIES = ('split', 'truncate', 'drop')
ROW_KEYS = ('tokens', 'segment_ids', 'positions', 'response_mask')
COUNTS_KEY = 'long_doc_counts'  # FitLength iterator state entry; found again by `long_doc_counts`
_COUNT_NAMES = ('documents', 'tokens', 'split', 'truncated', 'dropped', 'untrainable_pieces',
                'tokens_lost')


def tokenize_example(example: dict, tokenizer) -> dict[str, np.ndarray]:
  """Tokenizes one example into a document.

  Args:
    example: {"text"} | {"prompt", "response"} | {"messages"} (see `sources`).
    tokenizer: a `tokenizer.Tokenizer`; chats go through its `render_chat`.

  Returns:
    {'tokens': int32 [n], 'response_mask': bool [n]}: [bos] + prompt + response + [eos], where bos
    (only if the tokenizer has one and the prompt does not already start with it) and the prompt are
    False and the response and eos are True. eos is not repeated when the response already ends
    with it (chat templates whose end-of-turn token is eos). A {"text"} document is all response.
  """
  if 'text' in example:
    prompt, response = '', example['text']
  elif 'messages' in example:
    prompt, response = tokenizer.render_chat(example['messages'])
  else:
    prompt, response = example['prompt'], example['response']
  p = tokenizer.encode(prompt) if prompt else []
  if tokenizer.bos_id is not None and p[:1] != [tokenizer.bos_id]:
    p = [tokenizer.bos_id] + p
  r = tokenizer.encode(response)
  if r[-1:] != [tokenizer.eos_id]:  # a chat template may already end the turn with eos
    r.append(tokenizer.eos_id)
  return {'tokens': np.asarray(p + r, np.int32),
          'response_mask': np.concatenate([np.zeros(len(p), bool), np.ones(len(r), bool)])}


def _empty_counts() -> dict[str, int]:
  return dict.fromkeys(_COUNT_NAMES, 0)


def fit_length(doc: dict[str, np.ndarray], seq_len: int,
               policy: str) -> tuple[list[dict[str, np.ndarray]], dict[str, int]]:
  """Makes a document fit in a row of `seq_len` tokens.

  Documents of at most seq_len tokens pass unchanged. Longer ones are, by `policy`, 'split' into
  consecutive pieces of seq_len (the last one shorter; each piece is its own document in a row,
  positions restarting at 0), 'truncate'd to their first seq_len tokens, or 'drop'ped. A piece with
  nothing to train (no response token after its first position) is left out.

  Args:
    doc: {'tokens': [n], 'response_mask': [n]}.
    seq_len: the row length T.
    policy: one of LONG_DOC_POLICIES.

  Returns:
    (pieces, counts): the pieces, and how many documents / tokens came in and were split,
    truncated, dropped, left out as untrainable and lost (see `long_doc_counts`).
  """
  if policy not in LONG_DOC_POLICIES:
    raise ValueError(f'long_docs must be one of {LONG_DOC_POLICIES}, got {policy!r}')
  n = len(doc['tokens'])
  counts = _empty_counts()
  counts['documents'], counts['tokens'] = 1, n
  if n <= seq_len:
    pieces = [doc]
  elif policy == 'drop':
    pieces = []
    counts['dropped'] = 1
  elif policy == 'truncate':
    pieces = [{k: v[:seq_len] for k, v in doc.items()}]
    counts['truncated'] = 1
  else:
    pieces = [{k: v[i:i + seq_len] for k, v in doc.items()} for i in range(0, n, seq_len)]
    counts['split'] = 1
  trainable = [p for p in pieces if p['response_mask'][1:].any()]
  counts['untrainable_pieces'] = len(pieces) - len(trainable)
  counts['tokens_lost'] = n - sum(len(p['tokens']) for p in trainable)
  return trainable, counts


class FitLengthIterDataset(grain.IterDataset):
  """Applies `fit_length` to every document; the running counts are part of the iterator state, so
  they survive checkpoints and are visible through grain's multiprocess prefetch."""

  def __init__(self, parent: grain.IterDataset, seq_len: int, policy: str):
    super().__init__(parent)
    if seq_len < 2:
      raise ValueError(f'seq_len must be at least 2, got {seq_len}')
    if policy not in LONG_DOC_POLICIES:
      raise ValueError(f'long_docs must be one of {LONG_DOC_POLICIES}, got {policy!r}')
    self._seq_len, self._policy = seq_len, policy

  def __iter__(self) -> grain.DatasetIterator:
    return _FitLengthIterator(self._parent.__iter__(), self._seq_len, self._policy)

  def __str__(self) -> str:
    return f'FitLengthIterDataset(seq_len={self._seq_len}, policy={self._policy})'


class _FitLengthIterator(grain.DatasetIterator):
  """State: {'parent': the parent's state before the current document, 'piece': pieces of it
  already emitted (0 = none pending), COUNTS_KEY: counts before it}."""

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, policy: str):
    super().__init__(parent)
    self._seq_len, self._policy = seq_len, policy
    self._counts = _empty_counts()
    self._pieces: list[dict[str, np.ndarray]] = []
    self._next_piece = 0
    self._doc_state: Any = None  # parent state before the current document
    self._counts_before_doc = dict(self._counts)

  def _load_next_doc(self) -> None:
    self._doc_state = self._parent.get_state()
    self._counts_before_doc = dict(self._counts)
    doc = next(self._parent)
    self._pieces, counts = fit_length(doc, self._seq_len, self._policy)
    self._next_piece = 0
    for k, v in counts.items():
      self._counts[k] += v

  def __next__(self) -> dict[str, np.ndarray]:
    while self._next_piece >= len(self._pieces):
      self._load_next_doc()
    piece = self._pieces[self._next_piece]
    self._next_piece += 1
    return piece

  def get_state(self) -> dict[str, Any]:
    if 0 < self._next_piece < len(self._pieces):  # inside a split document
      return {'parent': self._doc_state, 'piece': self._next_piece,
              COUNTS_KEY: dict(self._counts_before_doc)}
    return {'parent': self._parent.get_state(), 'piece': 0, COUNTS_KEY: dict(self._counts)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state['parent'])
    self._counts = {k: int(state[COUNTS_KEY].get(k, 0)) for k in _COUNT_NAMES}
    self._pieces, self._next_piece = [], 0
    if state['piece']:
      self._load_next_doc()
      self._next_piece = state['piece']


def long_doc_counts(iterator_state: Any) -> dict[str, int]:
  """Sums the `FitLengthIterDataset` counts found anywhere in a (nested) grain iterator state.

  Returns:
    {'documents', 'tokens': documents and their tokens seen; 'split', 'truncated', 'dropped':
    documents longer than T and what was done; 'untrainable_pieces': pieces left out for having no
    trained token; 'tokens_lost': tokens not packed}. The packer's state lags by at most one packing
    group, so these do too.
  """
  total = _empty_counts()
  stack = [iterator_state]
  while stack:
    node = stack.pop()
    if isinstance(node, dict):
      found = node.get(COUNTS_KEY)
      if isinstance(found, dict):
        for k in _COUNT_NAMES:
          total[k] += int(found.get(k, 0))
      stack.extend(v for k, v in node.items() if k != COUNTS_KEY)
    elif isinstance(node, (list, tuple)):
      stack.extend(node)
  return total


def live_long_doc_counts(iterator: grain.DatasetIterator) -> dict[str, int] | None:
  """The current counts of the in-process `FitLengthIterDataset` iterators under `iterator` (ahead
  of the emitted rows by what is buffered), or None when there are none (multiprocess prefetch)."""
  found, stack = [], [iterator]
  while stack:
    it = stack.pop()
    if isinstance(it, _FitLengthIterator):
      found.append(it._counts)  # pylint: disable=protected-access
    stack.extend(getattr(it, '_parents', ()))
  if not found:
    return None
  return {k: sum(c[k] for c in found) for k in _COUNT_NAMES}


@dataclasses.dataclass(frozen=True)
class _ToRow(grain.transforms.Map):
  """Renames grain's packing outputs to the row contract."""

  def map(self, packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {'tokens': packed['tokens'].astype(np.int32),
            'segment_ids': packed['tokens_segment_ids'].astype(np.int32),
            'positions': packed['tokens_positions'].astype(np.int32),
            'response_mask': packed['response_mask'].astype(bool)}


def pack_documents(docs: grain.IterDataset, seq_len: int, *, pad_id: int, num_bins: int,
                   seed: int) -> grain.IterDataset:
  """First-fit packs documents of at most seq_len tokens into rows (see the module docstring).

  Args:
    docs: an IterDataset of {'tokens': [n], 'response_mask': [n]} with n <= seq_len.
    seq_len: the row length T.
    pad_id: the token id written into padding.
    num_bins: rows filled at once; a document goes into the first row with room, and all rows are
      emitted when one does not fit anywhere (more bins: less padding, more mixing of neighbours).
    seed: seed of the order in which a group's rows are emitted.

  Returns:
    An IterDataset of rows {tokens, segment_ids, positions, response_mask}, each [T].
  """
  packed = grain_exp.FirstFitPackIterDataset(
      docs, length_struct={'tokens': seq_len, 'response_mask': seq_len},
      padding_struct={'tokens': pad_id, 'response_mask': False}, num_packing_bins=num_bins,
      seed=seed, shuffle_bins=True)
  return packed.map(_ToRow())


def empty_row(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """An all-padding row (segment_ids 0): fills the last batch of a finite pass."""
  return {'tokens': np.full(seq_len, pad_id, np.int32), 'segment_ids': np.zeros(seq_len, np.int32),
          'positions': np.zeros(seq_len, np.int32), 'response_mask': np.zeros(seq_len, bool)}
