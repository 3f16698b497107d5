"""Train checkpoints: restore round trip, and a checkpoint of another model is one clear error
naming the leaves that differ."""
import grain
import jax
import numpy as np
import optax
import pytest
from flax import nnx

from flare_jax.train import checkpointing


class _Net(nnx.Module):
  def __init__(self, width: int, depth: int, seed: int = 0):
    rngs = nnx.Rngs(seed)
    self.layers = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(depth)])


def _state(width: int, depth: int, seed: int = 0):
  """A train state as the trainer's: (model, optimizer)."""
  model = _Net(width, depth, seed)
  return nnx.state((model, nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)))


def _data():
  return iter(grain.MapDataset.range(8).to_iter_dataset())


@pytest.fixture
def manager(tmp_path):
  """A manager holding one checkpoint (step 3) of _Net(4, 2, seed 0)."""
  manager = checkpointing.make_manager(str(tmp_path), keep=2, async_save=False)
  checkpointing.save(manager, 3, _state(4, 2), _data())
  manager.wait_until_finished()
  yield manager
  manager.close()


def test_restore_onto_the_same_model_round_trips(manager):
  step, restored, data_restarted = checkpointing.restore_latest(manager, _state(4, 2, seed=1),
                                                                _data())
  assert step == 3 and not data_restarted
  want = jax.tree.leaves(nnx.to_pure_dict(_state(4, 2)))
  got = jax.tree.leaves(nnx.to_pure_dict(restored))
  assert len(got) == len(want) and not np.array_equal(
      jax.tree.leaves(nnx.to_pure_dict(_state(4, 2, seed=1)))[1], want[1])  # seeds differ
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('width, depth, lines', [
    (8, 2, ['model.layers.0.kernel has shape (4, 4) in the checkpoint, (8, 8) here']),
    (4, 3, ['model.layers.2.bias is in this run only',
            'model.layers.2.kernel is in this run only']),
    (4, 1, ['model.layers.1.bias is in the checkpoint only',
            'optimizer.opt_state.0.mu.layers.1.bias is in the checkpoint only']),
], ids=['wider', 'deeper', 'shallower'])
def test_another_model_is_a_state_mismatch_naming_the_leaves(manager, width, depth, lines):
  with pytest.raises(checkpointing.StateMismatchError, match='holds another model') as err:
    checkpointing.restore_latest(manager, _state(width, depth), _data())
  for line in lines:
    assert line in str(err.value)


def _as_written_by_two_processes(manager):
  """Renames step 3's data-stream file as if two processes had written it."""
  data_dir = manager.directory / '3' / 'data_iter'
  (data_dir / 'process_0-of-1.json').rename(data_dir / 'process_0-of-2.json')
  (data_dir / 'process_0-of-2.json').copy(data_dir / 'process_1-of-2.json')


def test_a_data_stream_of_another_process_count_is_refused_or_restarted(manager):
  _as_written_by_two_processes(manager)
  with pytest.raises(checkpointing.DataStateMismatchError,
                     match='holds the data stream of 2 processes, this run has 1'):
    checkpointing.restore_latest(manager, _state(4, 2, seed=1), _data())
  data = _data()
  next(data)
  step, restored, data_restarted = checkpointing.restore_latest(
      manager, _state(4, 2, seed=1), data, restart_data=True)
  assert step == 3 and data_restarted and next(data) == 1  # the stream is left where it was
  for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(restored)),
                  jax.tree.leaves(nnx.to_pure_dict(_state(4, 2)))):
    np.testing.assert_array_equal(a, b)


def test_restart_data_still_resumes_a_stream_of_as_many_processes(manager):
  data = _data()
  next(data)  # the saved stream is at its start: restoring it rewinds this one
  _, _, data_restarted = checkpointing.restore_latest(manager, _state(4, 2), data,
                                                      restart_data=True)
  assert not data_restarted and next(data) == 0
