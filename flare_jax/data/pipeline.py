"""The grain input pipeline: source -> this process's shard -> shuffle (per epoch) -> repeat ->
tokenize -> fit long documents -> first-fit pack into rows of seq_len -> batch [-> worker
processes].

Same config and seed -> same batches (worker_count is part of the config: grain's multiprocess
prefetch changes the order of packed rows, deterministically). The iterator's state is a grain
checkpoint (`get_state`/`set_state`, `grain.checkpoint.CheckpointSave/CheckpointRestore` via orbax),
so a resumed run sees exactly the batches it would have seen.

`data_cfg` fields (an ml_collections ConfigDict or any object with these attributes):
  source        'jsonl' | 'array_record' | 'stdlib' | 'arithmetic'
  paths         files for jsonl / array_record: a list of str or a comma-separated str
  seq_len       packed row length T (>= 2)
  batch_size    global rows per step; divided evenly over processes
  seed          shuffle and packing seed, in [0, 2**32)
  num_epochs    passes over the data; None or -1 = forever. A finite pass ends with a batch filled
                up with all-padding rows (segment_ids 0), so no row is lost and shapes stay fixed
  on_malformed  jsonl: 'skip' (count, report with file:line) | 'error' (raise at start-up)
  long_docs     documents longer than seq_len: 'split' | 'truncate' | 'drop' (counted in `report()`)
  worker_count  grain worker processes (0 = in-process)
Optional fields: num_examples (size of the 'arithmetic' source, default 20000), packing_bins (rows
packed at once, default 16), eval_paths (the 'heldout' split of file sources), weights (file
sources, train split: one positive weight per entry of paths, each entry then a source of its own,
sampled in proportion to its weight; needs num_epochs forever). The split argument
picks 'train' / 'heldout' for 'stdlib' and 'arithmetic' (another seed); for files, paths or
eval_paths.
"""
import dataclasses
from typing import Any, Sequence

import grain
import numpy as np

from flare_jax.data import packing
from flare_jax.data import sources

SOURCES = ('jsonl', 'array_record', 'stdlib', 'arithmetic')
_DEFAULT_NUM_EXAMPLES = 20000
_DEFAULT_PACKING_BINS = 16
_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=64)


def make_source(data_cfg: Any, split: str = 'train'):
  """The example source named by `data_cfg.source` (see the module docstring).

  Raises:
    ValueError: an unknown source or split, or the source's own errors (missing files, ...).
  """
  if split not in ('train', 'heldout'):
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
  kind = data_cfg.source
  if kind in ('jsonl', 'array_record'):
    field = 'paths' if split == 'train' else 'eval_paths'
    paths = getattr(data_cfg, field, '')
    if not paths:
      raise ValueError(f'no data paths given for the {split} split of data.source={kind!r} '
                       f'(data.{field} is empty)')
    if kind == 'jsonl':
      return sources.JsonlSource(paths, on_malformed=data_cfg.on_malformed)
    return sources.ArrayRecordSource(paths)
  if kind == 'stdlib':
    return sources.StdlibSource(split)
  if kind == 'arithmetic':
    n = getattr(data_cfg, 'num_examples', None) or _DEFAULT_NUM_EXAMPLES
    seed = data_cfg.seed if split == 'train' else data_cfg.seed + 1_000_003
    return sources.SyntheticArithmeticSource(n, seed=seed)
  raise ValueError(f'unknown data.source {kind!r}; known: {SOURCES}')


def _weights(data_cfg: Any) -> list[float]:
  """data.weights as floats ([] when unset): a list or a comma-separated str."""
  raw = getattr(data_cfg, 'weights', '') or ''
  items = raw.split(',') if isinstance(raw, str) else list(raw)
  try:
    weights = [float(w) for w in items if str(w).strip()]
  except ValueError as e:
    raise ValueError(f'data.weights must be numbers, got {raw!r}') from e
  if any(not (w > 0 and np.isfinite(w)) for w in weights):
    raise ValueError(f'data.weights must be positive and finite, got {raw!r}')
  return weights


class Mixture:
  """Sources sampled in proportion to their weights (`data.weights`): its length and report.

  parts: (source, weight) pairs; names: what the report calls each source (its path).
  """

  def __init__(self, parts: list[tuple[Any, float]], names: Sequence[str] = ()):
    self.parts, self.names = parts, list(names) or [''] * len(parts)

  def __len__(self) -> int:
    return sum(len(source) for source, _ in self.parts)

  def report(self) -> str:
    if len(self.parts) == 1:
      return self.parts[0][0].report()
    total = sum(w for _, w in self.parts)
    each = '; '.join(f'{w / total:.3g} from {name} [{source.report().removeprefix("data: ")}]'
                     for name, (source, w) in zip(self.names, self.parts))
    return f'data: a mixture of {len(self.parts)} sources by weight: {each}'


def make_mixture(data_cfg: Any, split: str = 'train') -> Mixture:
  """The split's sources with their weights: one source of weight 1 (`make_source`), or with
  data.weights on the train split of a file source, one per entry of data.paths.

  Raises:
    ValueError: weights that are not positive numbers, one per path, or a finite num_epochs with
      weights; the sources' own errors.
  """
  weights = _weights(data_cfg)
  if not weights or split != 'train':
    return Mixture([(make_source(data_cfg, split), 1.0)])
  if data_cfg.source not in ('jsonl', 'array_record'):
    raise ValueError(f'data.weights mixes file sources (jsonl, array_record), not '
                     f'data.source={data_cfg.source!r}')
  paths = sources.as_paths(data_cfg.paths)
  if len(paths) != len(weights):
    raise ValueError(f'data.weights has {len(weights)} weights for {len(paths)} data.paths '
                     'entries: give one per path')
  if _num_epochs(data_cfg) is not None:
    raise ValueError('data.weights samples its sources forever: set data.num_epochs=-1')
  one = lambda path: make_source(_PathsOverride(data_cfg, path), split)
  return Mixture([(one(path), w) for path, w in zip(paths, weights)], paths)


@dataclasses.dataclass(frozen=True)
class _PathsOverride:
  """data_cfg with `paths` replaced (the other fields read through)."""
  base: Any
  paths: str

  def __getattr__(self, name):
    return getattr(self.base, name)


def _num_epochs(data_cfg: Any) -> int | None:
  n = data_cfg.num_epochs
  if n is None or n < 0:
    return None
  if n == 0:
    raise ValueError('data.num_epochs must be positive, or None / -1 for forever; got 0')
  return int(n)


@dataclasses.dataclass(frozen=True)
class _Tokenize(grain.transforms.Map):
  tokenizer: Any

  def map(self, example: dict) -> dict[str, np.ndarray]:
    return packing.tokenize_example(example, self.tokenizer)


@dataclasses.dataclass(frozen=True)
class _StackRows:
  """Stacks rows into a batch [B, T]; a short last batch is filled up with all-padding rows."""
  batch_size: int
  seq_len: int
  pad_id: int

  def __call__(self, rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    rows = list(rows) + [packing.empty_row(self.seq_len, self.pad_id)] * (
        self.batch_size - len(rows))
    return {k: np.stack([r[k] for r in rows]) for k in packing.ROW_KEYS}


class _WithReport(grain.IterDataset):
  """Adds `report()` (source summary + long-document counts) to the pipeline's iterator."""

  def __init__(self, parent: grain.IterDataset, source: Any, long_docs: str):
    super().__init__(parent)
    self._source, self._long_docs = source, long_docs

  def __iter__(self) -> grain.DatasetIterator:
    return DataIterator(self._parent.__iter__(), self._source, self._long_docs)


class DataIterator(grain.DatasetIterator):
  """The pipeline's iterator: grain state passes through unchanged; adds `report()`."""

  def __init__(self, parent: grain.DatasetIterator, source: Any, long_docs: str):
    super().__init__(parent)
    self._source, self._long_docs = source, long_docs

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)

  def report(self) -> str:
    """One line for the log: the source (malformed lines) and what happened to long documents."""
    c = packing.live_long_doc_counts(self._parent)
    if c is None:  # the documents are processed in worker processes: read their states
      c = packing.long_doc_counts(self._parent.get_state())
    return (f'{self._source.report()}; this process so far: {c["documents"]} documents '
            f'({c["tokens"]} tokens); longer than seq_len ({self._long_docs}): {c["split"]} split, '
            f'{c["truncated"]} truncated, {c["dropped"]} dropped; {c["untrainable_pieces"]} pieces '
            f'with no trained token left out; {c["tokens_lost"]} tokens lost')


def make_dataset(data_cfg: Any, tokenizer, *, process_index: int = 0, process_count: int = 1,
                 split: str = 'train') -> grain.IterDataset:
  """The grain IterDataset of this process's batches (see `make_iterator`)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  if data_cfg.batch_size <= 0 or data_cfg.batch_size % process_count:
    raise ValueError(f'data.batch_size={data_cfg.batch_size} must be a positive multiple of the '
                     f'process count {process_count}')
  if not 0 <= data_cfg.seed < 2**32:
    raise ValueError(f'data.seed must be in [0, 2**32), got {data_cfg.seed}')
  if data_cfg.long_docs not in packing.LONG_DOC_POLICIES:
    raise ValueError(f'data.long_docs must be one of {packing.LONG_DOC_POLICIES}, got '
                     f'{data_cfg.long_docs!r}')
  batch = data_cfg.batch_size // process_count
  seq_len = int(data_cfg.seq_len)
  num_epochs = _num_epochs(data_cfg)
  mixture = make_mixture(data_cfg, split)
  for source, _ in mixture.parts:
    if len(source) < process_count:
      raise ValueError(f'{len(source)} examples cannot be sharded over {process_count} processes')

  # --- Stage 1: random access: this process's shard of each source (index-based), shuffled anew
  # each epoch; several sources are sampled by weight ---
  shards = [grain.MapDataset.source(source)[process_index::process_count]
            .shuffle(seed=int(data_cfg.seed) + i).repeat(num_epochs)
            for i, (source, _) in enumerate(mixture.parts)]
  ds = shards[0] if len(shards) == 1 else grain.MapDataset.mix(
      shards, [w for _, w in mixture.parts])
  ds = ds.map(_Tokenize(tokenizer)).to_iter_dataset(_READ_OPTIONS)
  # --- Stage 2: documents -> packed rows -> batches ---
  ds = packing.FitLengthIterDataset(ds, seq_len, data_cfg.long_docs)
  bins = getattr(data_cfg, 'packing_bins', None) or _DEFAULT_PACKING_BINS
  ds = packing.pack_documents(ds, seq_len, pad_id=tokenizer.pad_id, num_bins=bins,
                              seed=int(data_cfg.seed))
  ds = ds.batch(batch, drop_remainder=False, batch_fn=_StackRows(batch, seq_len, tokenizer.pad_id))
  if data_cfg.worker_count > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():  # grain's workers read their absl flags
      raise ValueError('data.worker_count > 0 needs parsed absl flags: run under absl.app.run (as '
                       'launch/ does) or call absl.flags.FLAGS.mark_as_parsed() first')
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(data_cfg.worker_count)))
  return _WithReport(ds, mixture, data_cfg.long_docs)


def make_iterator(data_cfg: Any, tokenizer, *, process_index: int = 0, process_count: int = 1,
                  split: str = 'train') -> DataIterator:
  """This process's batch iterator.

  Args:
    data_cfg: the data config (fields in the module docstring).
    tokenizer: a `tokenizer.Tokenizer`.
    process_index, process_count: this process reads examples process_index, process_index +
      process_count, ... of the source.
    split: 'train' | 'heldout' (see the module docstring).

  Returns:
    A grain DatasetIterator of {tokens int32, segment_ids int32, positions int32, response_mask
    bool}, each [batch_size // process_count, seq_len]; `report()` summarizes the data for the log.
    A finite pass ends with StopIteration.

  Raises:
    ValueError: a batch size that does not divide over the processes, bad fields, source errors.
  """
  return iter(make_dataset(data_cfg, tokenizer, process_index=process_index,
                           process_count=process_count, split=split))
