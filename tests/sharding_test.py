"""sharding.split_rows / replica_mesh: data-parallel inference over a 1-D mesh of replicas."""
import logging

import jax
import jax.numpy as jnp
import numpy as np

from flare_jax import sharding as shd


def test_replica_mesh_only_for_several_devices():
  assert shd.replica_mesh(None) is None
  assert shd.replica_mesh(jax.devices()[:1]) is None
  mesh = shd.replica_mesh(jax.devices()[:3])
  assert mesh.axis_names == (shd.REPLICA_AXIS,) and mesh.size == 3


def test_split_rows_gives_each_device_its_slice_and_drops_the_padding(caplog):
  """7 rows over 3 devices: padded to 9 (3 each) with copies of the last row; every row comes back
  once, in order, computed by the device that held it."""
  caplog.set_level(logging.WARNING)
  mesh = shd.replica_mesh(jax.devices()[:3])
  rows = jnp.arange(7 * 2, dtype=jnp.float32).reshape(7, 2)
  ids = jnp.arange(7)
  seen = []

  def fn(shared, x, i):
    seen.append(x.shape[0])
    device = jax.lax.axis_index(shd.REPLICA_AXIS)
    return {'y': x * shared['scale'], 'i': i, 'device': jnp.full(i.shape, device)}

  out = jax.jit(lambda s, x, i: shd.split_rows(fn, mesh, s, x, i))({'scale': 2.0}, rows, ids)
  assert seen == [3]
  assert '7 rows do not divide over 3 devices: each call computes 2 padding rows' in caplog.text
  np.testing.assert_array_equal(out['y'], np.asarray(rows) * 2)
  np.testing.assert_array_equal(out['i'], np.arange(7))
  np.testing.assert_array_equal(out['device'], [0, 0, 0, 1, 1, 1, 2])
