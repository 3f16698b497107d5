"""Pre-norm decoder block: mixer (GDN or attention) + SwiGLU MLP, each with a residual."""
import jax
import jax.numpy as jnp
from flax import nnx

from flare_jax import sharding as shd
from flare_jax.model import attention
from flare_jax.model import cache as cache_lib
from flare_jax.model import config as config_lib
from flare_jax.model import gated_deltanet
from flare_jax.model import layers
from pallas_kernels.attention import mask as mask_lib


class Block(nnx.Module):
  """h = h + mixer(norm(h)); h = h + mlp(norm(h)).
  The mixer is GDN ('linear_attention') or attention."""

  def __init__(self, cfg: config_lib.ModelConfig, layer_type: str, *, rngs: nnx.Rngs):
    self.layer_type = layer_type
    self.input_layernorm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps,
                                          param_dtype=cfg.param_dtype)
    self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps,
                                                   param_dtype=cfg.param_dtype)
    if layer_type == config_lib.FULL:
      self.self_attn = attention.Attention(cfg, rngs=rngs)
    else:
      self.linear_attn = gated_deltanet.GatedDeltaNet(cfg, rngs=rngs)
    self.mlp = layers.MLP(cfg.hidden_size, cfg.intermediate_size, dtype=cfg.dtype,
                          param_dtype=cfg.param_dtype, rngs=rngs)

  def __call__(self, h: jax.Array, meta: mask_lib.TokenMeta, *,
               cache: cache_lib.LayerCache | None = None, valid: jax.Array | None = None,
               return_replay: bool = False, num_views: int = 0, gdn_schedule: str = 'auto',
               max_block: int = 32, noisy_tail: int = 0):
    """Returns (h [B, T, D], updated layer cache or None, GDNReplay or None).

    With num_views > 0 the row is a two-stream row (clean stream then the noisy views, no cache).
    With noisy_tail = n > 0 (cached calls): the last n tokens are one noisy block seeded where each
    row's valid prefix of the first T - n tokens ends; the cache advances over that prefix only.
    """
    h, mlp_out, cache, replay = self.residual_parts(
        h, None, meta, cache=cache, valid=valid, return_replay=return_replay,
        num_views=num_views, gdn_schedule=gdn_schedule, max_block=max_block,
        noisy_tail=noisy_tail)
    return shd.shard(h + mlp_out, (shd.ACT_BATCH, shd.ACT_SEQ, shd.ACT_EMBED)), cache, replay

  def residual_parts(self, h: jax.Array, pending: jax.Array | None, meta: mask_lib.TokenMeta, *,
                     norm_impl: str | None = 'xla', cache: cache_lib.LayerCache | None = None,
                     valid: jax.Array | None = None, return_replay: bool = False,
                     num_views: int = 0, gdn_schedule: str = 'auto', max_block: int = 32,
                     noisy_tail: int = 0):
    """The block on h + pending with its MLP output left unadded: (h + pending + mixer output,
    MLP output, cache, replay), each [B, T, D] but the last two (see __call__).

    Each residual add runs with the norm that reads its sum (`RMSNorm.after_add`, one kernel under
    `norm_impl`), so a stack of blocks passing the MLP output on as the next one's `pending` adds
    every residual inside a norm (cached passes, `FlareLM.hidden_states`). pending None: h as is.
    """
    h, x = self.input_layernorm.after_add(h, pending, norm_impl)
    replay = None
    if noisy_tail:
      x, cache = self._mixer_with_noisy_tail(x, meta, cache, valid, noisy_tail)
    elif self.layer_type == config_lib.FULL:
      x, cache = self.self_attn(x, meta, cache=cache)
    elif num_views:
      x = self.linear_attn.two_stream(x, meta, num_views, gdn_schedule, max_block)
    elif return_replay:
      x, cache, replay = self.linear_attn(x, meta.segment_ids, state=cache, valid=valid,
                                          return_replay=True)
    else:
      x, cache = self.linear_attn(x, meta.segment_ids, state=cache, valid=valid)
    h, x = self.post_attention_layernorm.after_add(h, x, norm_impl)
    mlp_out = self.mlp(x)  # all tokens at once, noisy tail included
    act = (shd.ACT_BATCH, shd.ACT_SEQ, shd.ACT_EMBED)
    return shd.shard(h, act), shd.shard(mlp_out, act), cache, replay

  def _mixer_with_noisy_tail(self, x, meta, cache, valid, n: int):
    """The mixer over [clean prefix (valid per row), noisy block of n]: the clean part advances the
    cache; the block then runs over that cache as a separate continuation (its cache dropped), so it
    starts exactly at each row's valid end whatever the padding in between. With no clean prefix
    (n = T) the cache comes back as it was."""
    if cache is None:
      raise ValueError('noisy_tail needs a cache')
    ys = []
    if x.shape[1] > n:
      head = lambda a: a[:, :-n]
      meta_c = jax.tree.map(head, meta)
      valid_c = None if valid is None else head(valid)
      if self.layer_type == config_lib.FULL:
        y_c, cache = self.self_attn(head(x), meta_c, cache=cache)
      else:
        y_c, cache = self.linear_attn(head(x), meta_c.segment_ids, state=cache, valid=valid_c)
      ys.append(y_c)
    tail = lambda a: a[:, -n:]
    meta_n = jax.tree.map(tail, meta)
    if self.layer_type == config_lib.FULL:
      y_n, _ = self.self_attn(tail(x), meta_n, cache=cache)
    else:
      y_n = self.linear_attn.noisy_block(tail(x), meta_n.segment_ids, cache)
    ys.append(y_n)
    return jnp.concatenate(ys, axis=1) if len(ys) > 1 else y_n, cache
