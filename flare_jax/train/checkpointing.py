"""Training checkpoints: one orbax CheckpointManager with items 'state' and 'data_iter'.

'state' holds params, optimizer state, the step and the base RNG key (as pure arrays); 'data_iter'
is the grain iterator, so a resumed run consumes exactly the data an uninterrupted run would.
"""
import os

import grain
import jax
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


def restore_latest(manager: ocp.CheckpointManager, state, data_iter):
  """Restores the newest checkpoint onto `state`'s shardings (no host copy) and into `data_iter`.

  Returns:
    (step, state) or (None, state) when the workdir has no checkpoint.
  """
  step = manager.latest_step()
  if step is None:
    return None, state
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      nnx.to_pure_dict(state))
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target),
      data_iter=grain.checkpoint.CheckpointRestore(data_iter)))
  nnx.replace_by_pure_dict(state, restored['state'])
  return step, state
