"""Model config resolution and the sharded train state (model + optimizer)
built without a host copy."""
import dataclasses
from typing import Any

import jax
import ml_collections as mlc
from flax import nnx

from flare_jax.checkpoint import model_io
from flare_jax.model import config as config_lib
from flare_jax.model import transformer


@dataclasses.dataclass
class TrainState:
  """The jitted step's state: `graphdef` (static) and `state` (params + optimizer, a pytree)."""

  graphdef: Any
  state: Any
  shardings: Any


def resolve_model_config(c: mlc.ConfigDict) -> config_lib.ModelConfig:
  """The ModelConfig a run trains: the init checkpoint's or the named variant,
  plus config overrides."""
  if c.init_from:
    try:
      cfg = model_io.load_config(c.init_from)
    except ValueError as e:
      raise ValueError(f'init_from: {e}') from e
  else:
    if c.model.variant not in config_lib.VARIANTS:
      raise ValueError(f'unknown model.variant {c.model.variant!r}; '
                       f'known: {sorted(config_lib.VARIANTS)}')
    cfg = config_lib.VARIANTS[c.model.variant]
  impl = lambda name: None if name == 'auto' else name
  overrides = dict(dtype=c.model.dtype, param_dtype=c.model.param_dtype, remat=c.model.remat,
                   scan_layers=c.model.scan_layers,
                   gdn_chunk_size=c.model.gdn_chunk_size, attn_q_tile=c.model.attn_q_tile,
                   gdn_impl=impl(c.kernels.gdn), attn_impl=impl(c.kernels.attn),
                   gdn_conv_backward=c.kernels.gdn_conv_backward)
  if c.model.mask_token_id >= 0:
    overrides['mask_token_id'] = c.model.mask_token_id
  return cfg.replace(**overrides)


def create_train_state(model_cfg: config_lib.ModelConfig, tx, mesh, rules, seed: int,
                       load_params=None) -> TrainState:
  """Builds model + optimizer directly in their shardings (jitted init with out_shardings).

  Args:
    load_params: optional callable(param_shardings as a pure dict) -> pure-dict params placed on
      those shardings (e.g. restored from a converted checkpoint); they replace the random init.
  """

  def _create():
    model = transformer.FlareLM(model_cfg, rngs=nnx.Rngs(seed))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    return model, opt

  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    abstract = nnx.eval_shape(_create)
    graphdef, abstract_state = nnx.split(abstract)
    pspecs = nnx.get_partition_spec(abstract_state)
    shardings = jax.tree.map(lambda p: jax.sharding.NamedSharding(mesh, p), pspecs,
                             is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))

    # The key is an argument, not a constant: with a constant seed XLA tries to constant-fold the
    # random init of every weight at compile time (minutes for a 248k-row embedding).
    def _init(key, params):
      model = transformer.FlareLM(model_cfg, rngs=nnx.Rngs(key))
      if params is not None:
        loaded = nnx.state(model, nnx.Param)
        nnx.replace_by_pure_dict(loaded, params)
        nnx.update(model, loaded)
      return nnx.state((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))

    init_params = None
    if load_params is not None:
      init_params = load_params(nnx.to_pure_dict(shardings[0]))  # shardings of (model, optimizer)
    state = jax.jit(_init, out_shardings=shardings)(jax.random.key(seed), init_params)
  return TrainState(graphdef=graphdef, state=state, shardings=shardings)
