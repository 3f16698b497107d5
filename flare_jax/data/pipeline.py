"""The grain input pipeline: source -> shard by process -> shuffle -> repeat -> tokenize -> fit length
-> first-fit pack into rows of seq_len -> batch. Deterministic for a given config and seed, and its
iterator state is checkpointable (grain.checkpoint) so a resumed run sees exactly the same batches.

data_cfg fields: source ('jsonl'|'array_record'|'stdlib'|'arithmetic'), paths (comma-separated),
seq_len, batch_size (global rows), seed, num_epochs (-1 = forever), on_malformed ('skip'|'error'),
long_docs ('split'|'truncate'|'drop'), worker_count (0 = in-process), num_examples (arithmetic).
Rows: tokens, segment_ids (0 = padding, documents 1..n), positions (restart per document),
response_mask.
"""
import dataclasses
import json

import grain
import numpy as np
from grain import experimental as grain_exp

from flare_jax.data import packing
from flare_jax.data import sources

_PACK_BINS = 8  # rows packed at once (more bins: less padding, more cross-epoch mixing)


def make_source(data_cfg, split: str = 'train'):
  paths = [p for p in str(data_cfg.paths).split(',') if p]
  kind = data_cfg.source
  if kind == 'jsonl':
    return sources.JsonlSource(paths, data_cfg.on_malformed)
  if kind == 'array_record':
    return sources.ArrayRecordSource(paths)
  if kind == 'stdlib':
    return sources.StdlibSource(split)
  if kind == 'arithmetic':
    return sources.ArithmeticSource(data_cfg.num_examples, seed=data_cfg.seed + (split != 'train'))
  raise ValueError(f"unknown data.source {kind!r}; known: 'jsonl', 'array_record', 'stdlib', "
                   "'arithmetic'")


@dataclasses.dataclass(frozen=True)
class _Tokenize(grain.transforms.Map):
  tokenizer: object

  def map(self, example):
    return packing.tokenize(example, self.tokenizer)


@dataclasses.dataclass(frozen=True)
class _FitLength(grain_exp.FlatMapTransform):
  seq_len: int
  policy: str
  max_fan_out: int = 1 << 16

  def flat_map(self, element):
    return packing.fit_length(element, self.seq_len, self.policy)


def _to_row(packed: dict) -> dict:
  return {'tokens': packed['tokens'], 'segment_ids': packed['tokens_segment_ids'].astype(np.int32),
          'positions': packed['tokens_positions'].astype(np.int32),
          'response_mask': packed['response_mask'].astype(bool)}


def make_dataset(data_cfg, tokenizer, *, process_index: int = 0, process_count: int = 1,
                 split: str = 'train'):
  """The grain IterDataset of per-process batches [batch_size // process_count, seq_len]."""
  if data_cfg.batch_size % process_count:
    raise ValueError(f'data.batch_size={data_cfg.batch_size} does not divide over '
                     f'{process_count} processes')
  source = make_source(data_cfg, split)
  ds = grain.MapDataset.source(source)[process_index::process_count]
  ds = ds.shuffle(seed=data_cfg.seed)
  ds = ds.repeat(None if data_cfg.num_epochs < 0 else data_cfg.num_epochs)
  ds = ds.map(_Tokenize(tokenizer)).to_iter_dataset()
  ds = grain_exp.FlatMapIterDataset(ds, _FitLength(data_cfg.seq_len, data_cfg.long_docs))
  t = data_cfg.seq_len
  ds = grain_exp.FirstFitPackIterDataset(
      ds, length_struct={'tokens': t, 'response_mask': t}, num_packing_bins=_PACK_BINS,
      seed=data_cfg.seed, shuffle_bins=True)
  ds = ds.map(_to_row).batch(data_cfg.batch_size // process_count, drop_remainder=True)
  if data_cfg.worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.worker_count))
  return ds, source


class _Iterator:
  """A grain iterator that also reports what the source skipped."""

  def __init__(self, ds, source):
    self._it = iter(ds)
    self._source = source

  def __iter__(self):
    return self

  def __next__(self):
    return next(self._it)

  # grain.checkpoint's handler stores a non-DatasetIterator's state as bytes.
  def get_state(self) -> bytes:
    return json.dumps(self._it.get_state()).encode()

  def set_state(self, state: bytes) -> None:
    self._it.set_state(json.loads(state))

  def start_prefetch(self) -> None:
    start = getattr(self._it, 'start_prefetch', None)
    if callable(start):
      start()

  def report(self) -> str:
    return self._source.report()


def make_iterator(data_cfg, tokenizer, *, process_index: int = 0, process_count: int = 1,
                  split: str = 'train'):
  ds, source = make_dataset(data_cfg, tokenizer, process_index=process_index,
                            process_count=process_count, split=split)
  return _Iterator(ds, source)
