"""Logical axis names, the rules table that maps them to mesh axes, and sharding helpers.

Parameters and activations use different logical names so that one mesh axis is never used twice in
a spec (style.md C6). Every name used anywhere must appear in `DEFAULT_RULES` (None = replicated).
"""
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import PartitionSpec as P

# --- Parameter axes ---
VOCAB = 'vocab'
EMBED = 'embed'
MLP = 'mlp'
HEADS = 'heads'  # flattened (q heads x head dim) or GDN value-head projections
KV_HEADS = 'kv_heads'
GDN_PROJ = 'gdn_proj'  # GDN fused q|k|v projection / conv channels
GDN_HEADS = 'gdn_heads'  # per-value-head vectors (A_log, dt_bias, a/b projections)
NORM = 'norm'  # norm scales
CONV = 'conv'  # short conv taps

# --- Activation axes ---
ACT_BATCH = 'act_batch'
ACT_SEQ = 'act_seq'
ACT_EMBED = 'act_embed'
ACT_HEADS = 'act_heads'
ACT_MLP = 'act_mlp'
ACT_VOCAB = 'act_vocab'

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (VOCAB, 'tensor'),
    (EMBED, 'fsdp'),
    (MLP, 'tensor'),
    (HEADS, 'tensor'),
    (KV_HEADS, 'tensor'),
    (GDN_PROJ, 'tensor'),
    (GDN_HEADS, None),
    (NORM, None),
    (CONV, None),
    (ACT_BATCH, ('data', 'fsdp')),
    (ACT_SEQ, None),
    (ACT_EMBED, None),
    (ACT_HEADS, 'tensor'),
    (ACT_MLP, 'tensor'),
    (ACT_VOCAB, 'tensor'),
)

MESH_AXES = ('data', 'fsdp', 'tensor')


def logical_to_pspec(names: Sequence[str | None], rules=None) -> P:
  """Maps logical names to a PartitionSpec; raises ValueError for a name with no rule."""
  rules = dict(DEFAULT_RULES if rules is None else rules)
  out = []
  for name in names:
    if name is None:
      out.append(None)
      continue
    if name not in rules:
      raise ValueError(f'logical axis {name!r} has no sharding rule; known: {sorted(rules)}')
    out.append(rules[name])
  return P(*out)


def _active_rules():
  rules = flax.core.spmd.get_logical_axis_rules()
  return tuple(rules) if rules else None


def shard(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Constrains an activation to the sharding its logical names map to.

  A no-op outside a mesh context (`jax.set_mesh`) with logical rules (`nnx.logical_axis_rules`), so
  single-device code and tests need no mesh.
  """
  rules = _active_rules()
  if rules is None or not mesh_is_active():
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_pspec(names, rules))


def make_mesh(shape: dict[str, int], devices=None) -> jax.sharding.Mesh:
  """Builds a Mesh(data, fsdp, tensor); one entry may be -1 (all remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f'at most one mesh axis may be -1, got {shape}')
  known = 1
  for s in sizes:
    if s != -1:
      known *= s
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'mesh {shape} does not divide {len(devices)} devices')
    sizes[sizes.index(-1)] = len(devices) // known
  total = 1
  for s in sizes:
    total *= s
  if total != len(devices):
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} needs {total} devices, '
                     f'have {len(devices)}')
  return jax.make_mesh(
      tuple(sizes), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def per_batch_shard(fn: Callable[..., Any], *args, enabled: bool = True, shared: tuple = ()):
  """fn(*shared, *args), run once per batch shard when `enabled`, a mesh and logical rules are
  active, and the batch divides over the mesh axes ACT_BATCH maps to; else fn(*shared, *args).

  args: pytrees of arrays with a leading batch axis (None leaves allowed); fn's outputs too.
  shared: pytrees every shard gets whole (weights). Pass them here, not closed over: a sharded
  array closed over by the shard_map cannot be indexed inside it.
  Pallas and Triton kernels are custom calls that XLA's partitioner cannot split: under jit with a
  batch-sharded input it would gather the whole batch onto every device and run all of it there.
  `jax.shard_map` hands each device its own rows instead. Other sharded axes (heads over 'tensor')
  are gathered inside, so the kernels see whole heads.
  """
  rules = _active_rules()
  whole = lambda: fn(*shared, *args)
  if not enabled or rules is None or not mesh_is_active():
    return whole()
  axes = logical_to_pspec([ACT_BATCH], rules)[0]
  if axes is None:
    return whole()
  axes = axes if isinstance(axes, tuple) else (axes,)
  mesh = jax.sharding.get_abstract_mesh()
  shards = math.prod(mesh.shape[a] for a in axes)
  batch = jax.tree.leaves(args)[0].shape[0]
  if batch % shards:
    _warn_once(f'per_batch_shard: a batch of {batch} rows does not divide over the {shards} shards '
               f'of mesh axes {axes}: kernels run on the whole batch on every device')
  if shards == 1 or batch % shards:
    return whole()
  spec = P(axes)
  in_specs = jax.tree.map(lambda _: P(), shared) + jax.tree.map(lambda _: spec, args)
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=spec,
                       check_vma=False)(*shared, *args)


REPLICA_AXIS = 'data'  # the one axis of a `replica_mesh`


def replica_mesh(devices: Sequence[jax.Device] | None) -> jax.sharding.Mesh | None:
  """A 1-D mesh (REPLICA_AXIS) over `devices` for data-parallel inference with replicated params;
  None for no devices or one (run unsplit)."""
  if devices is None or len(devices) < 2:
    return None
  return jax.sharding.Mesh(np.asarray(devices), (REPLICA_AXIS,))


def replicate_over(tree, devices: Sequence[jax.Device] | None):
  """(the `replica_mesh` of `devices`, `tree` copied whole onto each of its devices), or
  (None, tree) for no devices or one."""
  mesh = replica_mesh(devices)
  if mesh is None:
    return None, tree
  return mesh, jax.device_put(tree, jax.sharding.NamedSharding(mesh, P()))


def split_rows(fn: Callable[..., Any], mesh: jax.sharding.Mesh, shared, *rows):
  """fn(shared, *rows) run on every device of a `replica_mesh`, each on its slice of the rows.

  rows: arrays with a leading batch axis, padded to a multiple of the device count with copies of
  their last row (dropped from the outputs, which also lead with the batch axis). shared: a pytree
  every device gets whole (params, a key). Inside fn, `jax.lax.axis_index(REPLICA_AXIS)` names the
  device. Nothing is exchanged between devices, so each can run its own loop to its own end.
  """
  n = rows[0].shape[0]
  out = per_device(fn, mesh, shared, *pad_rows(rows, mesh))
  return jax.tree.map(lambda x: x[:n], out)


def pad_rows(rows: Sequence[jax.Array], mesh: jax.sharding.Mesh) -> list[jax.Array]:
  """rows (arrays with one leading batch axis) padded to a multiple of `mesh.size` with copies of
  their last row."""
  n = rows[0].shape[0]
  fill = -n % mesh.size
  if fill:
    _warn_once(f'{n} rows do not divide over {mesh.size} devices: each call computes {fill} '
               f'padding rows too (a batch size that is a multiple of {mesh.size} wastes none)')
  return [jnp.concatenate([x, jnp.repeat(x[-1:], fill, axis=0)]) if fill else x for x in rows]


def per_device(fn: Callable[..., Any], mesh: jax.sharding.Mesh, shared, *rows):
  """fn(shared, *rows) on every device of a `replica_mesh`: each gets `shared` whole and its
  equal slice of every leaf of `rows` (split along the leading axis, which must divide over the
  devices); the outputs' leaves are joined along their leading axis."""
  spec = P(REPLICA_AXIS)
  return jax.shard_map(fn, mesh=mesh, in_specs=(P(),) + (spec,) * len(rows), out_specs=spec,
                       check_vma=False)(shared, *rows)


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
  logging.warning('%s', message)


def mesh_is_active() -> bool:
  mesh = jax.sharding.get_abstract_mesh()
  return mesh is not None and not mesh.empty


def eager_sharding_if_mesh():
  """Context for building modules: params are sharded at creation only inside a mesh context.

  Outside one (single-device use, tests) the logical names stay as metadata only, so a model can be
  built anywhere; `nnx.get_partition_spec(nnx.state(model))` still derives the shardings from them.
  """
  return nnx.use_eager_sharding(mesh_is_active())


def param_init(init, names: Sequence[str | None]):
  """An initializer carrying logical-axis metadata (`nnx.with_partitioning`)."""
  return nnx.with_partitioning(init, tuple(names))
