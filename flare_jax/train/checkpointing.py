"""Training checkpoints: one orbax CheckpointManager with items 'state' and 'data_iter'.

'state' holds params, optimizer state, the step and the base RNG key (as pure arrays); 'data_iter'
is the grain iterator, so a resumed run consumes exactly the data an uninterrupted run would.
"""
import os
import re
from typing import Any, NamedTuple

import grain
import jax
from etils import epath
import orbax.checkpoint as ocp
from flax import nnx


def make_manager(workdir: str, keep: int, async_save: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, 'ckpt')), item_names=('state', 'data_iter'),
      options=options)


def save(manager: ocp.CheckpointManager, step: int, state, data_iter) -> None:
  """Saves the train state (an nnx.State of (model, optimizer)) and the data iterator at `step`."""
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(nnx.to_pure_dict(state)),
      data_iter=grain.checkpoint.CheckpointSave(data_iter)))


class StateMismatchError(ValueError):
  """The newest checkpoint holds a train state of another structure or shape than this run's."""


class DataStateMismatchError(StateMismatchError):
  """The newest checkpoint's data-stream state was written by another number of processes."""


def _data_writers(data_iter_dir: str) -> int | None:
  """How many processes wrote a step's 'data_iter' item (grain: one process_I-of-N.json each), or
  None when it cannot tell."""
  counts = {int(m.group(1)) for name in (os.listdir(data_iter_dir)
                                         if os.path.isdir(data_iter_dir) else ())
            if (m := re.fullmatch(r'process_\d+-of-(\d+)\.json', name))}
  return counts.pop() if len(counts) == 1 else None


def _leaves(tree) -> dict[str, tuple]:
  """{'model.layers.0.mlp...': (shape, dtype)} of a pure-dict train state or its metadata (the
  state's items 0 and 1 named model and optimizer)."""
  names = {'0': 'model', '1': 'optimizer'}
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path]
    keys[0] = names.get(keys[0], keys[0])
    out['.'.join(keys)] = (tuple(leaf.shape), str(leaf.dtype))
  return out


def state_mismatch(saved_state_dir: str, target, limit: int = 6) -> list[str]:
  """What differs between the train state saved in `saved_state_dir` (a step's 'state' item) and
  `target` (a pure dict of arrays or ShapeDtypeStructs): leaves only one side has and leaves of
  another shape, the model's first; at most `limit` lines and a count of the rest."""
  saved = _leaves(ocp.PyTreeCheckpointHandler().metadata(epath.Path(saved_state_dir)))
  wanted = _leaves(target)
  lines = []
  for key in sorted(saved.keys() | wanted.keys(), key=lambda k: (not k.startswith('model'), k)):
    if key not in wanted:
      lines.append(f'{key} is in the checkpoint only')
    elif key not in saved:
      lines.append(f'{key} is in this run only')
    elif saved[key][0] != wanted[key][0]:
      lines.append(f'{key} has shape {saved[key][0]} in the checkpoint, {wanted[key][0]} here')
  return lines[:limit] + ([f'... and {len(lines) - limit} more'] if len(lines) > limit else [])


class Restored(NamedTuple):
  step: int | None  # None: the workdir has no checkpoint
  state: Any
  data_restarted: bool  # data_iter was left at its start (restart_data, another process count)


def restore_latest(manager: ocp.CheckpointManager, state, data_iter,
                   restart_data: bool = False) -> Restored:
  """Restores the newest checkpoint onto `state`'s shardings (no host copy) and into `data_iter`.

  A checkpoint's data stream is one position per process, so a run on another number of processes
  cannot resume it: with `restart_data` that run restores the rest and leaves `data_iter` at its
  start; otherwise it is an error.

  Raises:
    DataStateMismatchError: the checkpoint's data stream was written by another number of
      processes than this run's, without `restart_data`; nothing was restored.
    StateMismatchError: the checkpoint's train state has another structure or shapes (another
      model or optimizer); nothing was restored.
  """
  step = manager.latest_step()
  if step is None:
    return Restored(None, state, False)
  where = os.path.join(manager.directory, str(step))
  writers = _data_writers(os.path.join(where, 'data_iter'))
  restart = writers not in (None, jax.process_count())
  if restart and not restart_data:
    raise DataStateMismatchError(
        f'the checkpoint {where} holds the data stream of {writers} processes, this run has '
        f'{jax.process_count()}: each process resumes its own shard of the data, so resume with '
        f'{writers} processes, or set train.restart_data=True to restore the model and optimizer '
        'and start the data stream from its beginning')
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      nnx.to_pure_dict(state))
  items = dict(state=ocp.args.StandardRestore(target))
  if not restart:
    items['data_iter'] = grain.checkpoint.CheckpointRestore(data_iter)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except ValueError:
    mismatch = state_mismatch(os.path.join(where, 'state'), target)
    if not mismatch:
      raise
    raise StateMismatchError(
        f'the checkpoint {where} holds another model or optimizer than this run builds:\n  '
        + '\n  '.join(mismatch)) from None
  nnx.replace_by_pure_dict(state, restored['state'])
  return Restored(step, state, restart)
