"""sharding.per_batch_shard: kernels (custom calls XLA cannot partition) get each device's own rows
under a mesh, and the model's kernel calls go through it."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flare_jax import sharding as shd
from flare_jax.model import cache as cache_lib
from flare_jax.model import config as config_lib
from flare_jax.model import transformer
from flare_jax.objective import two_stream


def _rows_seen(cpu_mesh, batch, enabled=True, mesh=True):
  """(the batch size fn sees, fn's outputs) of a jitted per_batch_shard call on [batch, 3] rows."""
  seen = []

  def fn(x, pair):
    seen.append(x.shape[0])
    return x * 2.0, (pair[0] + 1.0, None)

  x = jnp.arange(batch * 3, dtype=jnp.float32).reshape(batch, 3)
  call = jax.jit(lambda x: shd.per_batch_shard(fn, x, (x, None), enabled=enabled))
  if not mesh:
    return seen, call(x)
  with jax.set_mesh(cpu_mesh), nnx.logical_axis_rules(shd.DEFAULT_RULES):
    out = call(x)
  return seen, out


def test_each_device_gets_its_own_rows(cpu_mesh):
  seen, (doubled, (plus_one, none)) = _rows_seen(cpu_mesh, 8)
  assert seen == [2]  # 8 rows over data x fsdp = 2 x 2
  np.testing.assert_array_equal(doubled, 2.0 * np.arange(24).reshape(8, 3))
  np.testing.assert_array_equal(plus_one, np.arange(24).reshape(8, 3) + 1.0)
  assert none is None


def test_runs_fn_whole_when_off_meshless_or_indivisible(cpu_mesh, caplog):
  assert _rows_seen(cpu_mesh, 8, enabled=False)[0] == [8]
  assert _rows_seen(cpu_mesh, 8, mesh=False)[0] == [8]
  assert not caplog.records
  assert _rows_seen(cpu_mesh, 6)[0] == [6]  # 6 rows do not divide over 4 shards: said in the log
  assert 'a batch of 6 rows does not divide over the 4 shards' in caplog.text


def test_model_kernel_calls_run_per_batch_shard_and_match_one_device(cpu_mesh, rng):
  """With kernels configured (off GPU the GDN one falls back to XLA and attention runs
  interpreted), the sharded forward traces a shard_map per kernel call and equals one device's."""
  cfg = config_lib.VARIANTS['tiny'].replace(dtype='float32', gdn_impl='pallas',
                                            attn_impl='pallas')
  tokens = jnp.asarray(rng.integers(0, 256, (4, 16)), jnp.int32)
  with jax.set_mesh(cpu_mesh), nnx.logical_axis_rules(shd.DEFAULT_RULES):
    model = transformer.FlareLM(cfg, rngs=nnx.Rngs(0))
    forward = lambda m, t: m(t)[0]
    jaxpr = str(jax.make_jaxpr(lambda t: forward(model, t))(tokens))
    sharded = nnx.jit(forward)(model, tokens)
  assert jaxpr.count('shard_map') == cfg.num_layers  # one GDN, one attention layer
  single = transformer.FlareLM(cfg, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(sharded, nnx.jit(forward)(single, tokens), atol=1e-5, rtol=1e-5)


def test_flare_loss_with_a_kernel_schedule_on_a_mesh_matches_one_device(cpu_mesh):
  """The two-stream GDN pass with the fused Pallas schedule (interpreted off GPU), forward and
  backward, per batch shard under the mesh: the loss and every gradient equal one device's."""
  rng = np.random.default_rng(0)
  t = 32
  rows = lambda x, dt: jnp.asarray(np.tile(x, (4, 1)), dt)
  batch = dict(tokens=jnp.asarray(rng.integers(0, 256, (4, t)), jnp.int32),
               segment_ids=rows(np.repeat([0, 1], [12, 20]), jnp.int32),
               positions=rows(np.concatenate([np.arange(12), np.arange(20)]), jnp.int32),
               response_mask=rows(np.arange(t) % 12 >= 3, jnp.bool_))
  cfg = config_lib.VARIANTS['tiny'].replace(dtype='float32')
  obj = two_stream.ObjectiveConfig(block_size=4, num_views=2, gdn_schedule='pallas')
  loss_fn = lambda m: two_stream.flare_loss(m, batch, jax.random.key(1), obj)[0]
  with jax.set_mesh(cpu_mesh), nnx.logical_axis_rules(shd.DEFAULT_RULES):
    model = transformer.FlareLM(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    jaxpr = str(jax.make_jaxpr(lambda s: loss_fn(nnx.merge(graphdef, s)))(state))
    loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
  assert 'shard_map' in jaxpr
  single = transformer.FlareLM(cfg, rngs=nnx.Rngs(0))
  loss1, grads1 = nnx.jit(nnx.value_and_grad(loss_fn))(single)
  np.testing.assert_allclose(loss, loss1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(nnx.state(grads, nnx.Param)),
                  jax.tree.leaves(nnx.state(grads1, nnx.Param))):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_cached_passes_run_per_batch_shard_and_match_one_device(cpu_mesh, rng):
  """Cached passes (a prefill, then fused 1- and 3-token passes) with the decode kernel configured
  (off GPU it falls back to XLA) and the residual norm kernel (interpret mode off GPU) run per
  batch shard, the layer's params closed over inside the shard_map, and equal one device's logits
  and caches."""
  cfg = config_lib.VARIANTS['tiny'].replace(dtype='float32', gdn_decode_impl='pallas',
                                            norm_impl='pallas')
  tokens = jnp.asarray(rng.integers(0, 256, (4, 24)), jnp.int32)

  def decode(model):
    cache = cache_lib.init_cache(cfg, batch=4, max_len=32)
    step = nnx.jit(lambda m, tok, pos, c: m(tok, positions=pos, cache=c))
    pieces, t = [], 0
    for n in (20, 1, 3):
      pos = jnp.broadcast_to(jnp.arange(t, t + n, dtype=jnp.int32), (4, n))
      logits, cache = step(model, tokens[:, t:t + n], pos, cache)
      pieces.append(logits)
      t += n
    return jnp.concatenate(pieces, 1), cache

  with jax.set_mesh(cpu_mesh), nnx.logical_axis_rules(shd.DEFAULT_RULES):
    model = transformer.FlareLM(cfg, rngs=nnx.Rngs(0))
    one = jnp.zeros((4, 1), jnp.int32)
    jaxpr = str(jax.make_jaxpr(lambda c: model(one, positions=one, cache=c)[0])(
        cache_lib.init_cache(cfg, batch=4, max_len=32)))
    sharded = decode(model)
  assert 'shard_map' in jaxpr  # the GDN layer's fused pass
  single = decode(transformer.FlareLM(cfg, rngs=nnx.Rngs(0)))
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
