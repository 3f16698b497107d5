"""FlareLM: embeddings -> decoder blocks (layer pattern from the config) -> final norm -> logits."""
import jax
import jax.numpy as jnp
from flax import nnx

from flare_jax import sharding as shd
from flare_jax.model import block as block_lib
from flare_jax.model import cache as cache_lib
from flare_jax.model import config as config_lib
from flare_jax.model import layers
from pallas_kernels.attention import mask as mask_lib


def default_meta(tokens: jax.Array, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> mask_lib.TokenMeta:
  """Clean metadata for a [B, T] batch: one segment and arange positions unless given."""
  b, t = tokens.shape
  if segment_ids is None:
    segment_ids = jnp.zeros((b, t), jnp.int32)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return mask_lib.clean_meta(segment_ids, positions)


def layer_period(layer_types: tuple[str, ...]) -> int | None:
  """The shortest p with layer_types == layer_types[:p] * (N / p) and at least two repeats."""
  n = len(layer_types)
  for p in range(1, n // 2 + 1):
    if n % p == 0 and tuple(layer_types) == tuple(layer_types[:p]) * (n // p):
      return p
  return None


class FlareLM(nnx.Module):
  """The Qwen3.5 text backbone with a (tied or untied) LM head.

  Parameter names mirror Hugging Face (`embed_tokens`, `layers[i].linear_attn.in_proj_qkv`, ...),
  with Dense kernels stored [in, out].
  """

  def __init__(self, cfg: config_lib.ModelConfig, *, rngs: nnx.Rngs):
    with shd.eager_sharding_if_mesh():
      self._build(cfg, rngs)

  def _build(self, cfg: config_lib.ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_tokens = layers.Embedder(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
                                        param_dtype=cfg.param_dtype, rngs=rngs)
    self.layers = nnx.List([block_lib.Block(cfg, t, rngs=rngs) for t in cfg.layer_types])
    self.norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = layers.Dense(cfg.hidden_size, cfg.vocab_size, (shd.EMBED, shd.VOCAB),
                                  dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

  def hidden_states(self, tokens: jax.Array, meta: mask_lib.TokenMeta, *,
                    cache: tuple[cache_lib.LayerCache, ...] | None = None,
                    valid: jax.Array | None = None, return_gdn_replay: bool = False,
                    num_views: int = 0, gdn_schedule: str = 'auto', max_block: int = 32,
                    noisy_tail: int = 0):
    """Final-normed hidden states [B, T, D], the updated cache (None without a cache) and, with
    `return_gdn_replay`, a per-layer tuple of GDNReplay (None for attention layers).

    num_views > 0: `tokens` is a two-stream row [B, (1+V)T] (clean stream, then V noisy views
    sharing the clean positions), see flare_jax.objective.layout; gdn_schedule picks one of
    two_stream_gdn.ALL_SCHEDULES ('auto': the fused Triton forward on GPU) and max_block bounds
    the noisy block length in slots (the objective's block size).
    noisy_tail = n > 0 (with a cache): the last n tokens are one noisy block seeded at the end of
    each row's valid prefix (Diffusion-Trust's first block primed in the prefill); the cache
    advances over the valid prefix only. n = T: the whole call is one noisy block over the cache,
    which comes back unchanged (GDN layers run `GatedDeltaNet.noisy_block`, no state formed).
    """
    if noisy_tail and (cache is None or return_gdn_replay):
      raise ValueError('noisy_tail needs a cache and no GDN replay')
    h = self.embed_tokens.encode(tokens)
    h = shd.shard(h, (shd.ACT_BATCH, shd.ACT_SEQ, shd.ACT_EMBED))
    stream = dict(num_views=num_views, gdn_schedule=gdn_schedule, max_block=max_block)
    period = layer_period(self.cfg.layer_types)
    if cache is None and not return_gdn_replay and self.cfg.scan_layers and period:
      return self.norm(self._scan_blocks(h, meta, valid, period, stream)), None
    if cache is None:
      h, replays = self._uncached_blocks(h, meta, valid, return_gdn_replay, stream)
      out = (self.norm(h), None)
    else:
      # Cached passes (inference): each block hands its MLP output on unadded, and every residual
      # add runs inside the norm after it (one kernel per add under norm_impl='pallas').
      new_cache, replays, pending = [], [], None
      for blk, layer_cache in zip(self.layers, cache):
        h, pending, layer_cache, replay = blk.residual_parts(
            h, pending, meta, norm_impl=self.cfg.norm_impl, cache=layer_cache, valid=valid,
            return_replay=return_gdn_replay, noisy_tail=noisy_tail, **stream)
        new_cache.append(layer_cache)
        replays.append(replay)
      out = (self.norm.after_add(h, pending, self.cfg.norm_impl)[1], tuple(new_cache))
    return (*out, tuple(replays)) if return_gdn_replay else out

  def _uncached_blocks(self, h, meta, valid, return_gdn_replay: bool, stream: dict):
    """h after every block of an uncached pass, and each block's GDNReplay (None where none)."""
    replays = []
    for blk in self.layers:
      if self.cfg.remat == 'block':
        h, _, _ = nnx.remat(lambda m, h_: m(h_, meta, valid=valid, **stream))(blk, h)
        replay = None
      else:
        h, _, replay = blk(h, meta, valid=valid, return_replay=return_gdn_replay, **stream)
      replays.append(replay)
    return h, tuple(replays)

  def _scan_blocks(self, h, meta, valid, period: int, stream: dict) -> jax.Array:
    """The blocks as a lax.scan over the N / period repeats of the layer pattern: block j of every
    repeat shares one graph, their params are stacked along a new leading axis."""
    groups = len(self.layers) // period
    graphdefs, stacked = [], []
    for j in range(period):
      splits = [nnx.split(self.layers[g * period + j]) for g in range(groups)]
      graphdefs.append(splits[0][0])
      stacked.append(jax.tree.map(lambda *xs: jnp.stack(xs), *[s for _, s in splits]))

    def apply(graphdef, state, h_):
      return nnx.merge(graphdef, state)(h_, meta, valid=valid, **stream)[0]

    if self.cfg.remat == 'block':
      apply = jax.checkpoint(apply, static_argnums=(0,))

    def group(h_, states):
      for graphdef, state in zip(graphdefs, states):
        h_ = apply(graphdef, state, h_)
      return h_, None

    return jax.lax.scan(group, h, tuple(stacked))[0]

  def merge_in_projections(self) -> None:
    """Every mixer's input projections as one GEMM per layer, in place (decode copies: the
    parameter tree changes; `layers.merge_projections`)."""
    for blk in self.layers:
      (blk.self_attn if blk.layer_type == config_lib.FULL else blk.linear_attn
       ).merge_in_projections()

  def logits(self, h: jax.Array) -> jax.Array:
    """LM head: [B, T, D] -> fp32 logits [B, T, vocab]."""
    if self.cfg.tie_word_embeddings:
      out = self.embed_tokens.decode(h)
    else:
      out = self.lm_head(h)
    return shd.shard(out.astype(jnp.float32), (shd.ACT_BATCH, shd.ACT_SEQ, shd.ACT_VOCAB))

  def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, meta: mask_lib.TokenMeta | None = None,
               cache: tuple[cache_lib.LayerCache, ...] | None = None,
               valid: jax.Array | None = None, return_gdn_aux: bool = False):
    """Causal forward.

    Args:
      tokens: [B, T] int.
      segment_ids: [B, T] document ids of a packed row (default: one document).
      positions: [B, T] positions (default arange; restart at 0 per document in packed rows).
      meta: full per-token metadata instead of segment_ids/positions.
      cache: per-layer caches; tokens then continue each row at slot positions[b, 0].
      valid: bool [B, T] prefix of real tokens (with a cache; right-padded prompts).
      return_gdn_aux: (with a cache) also return per-layer GDNReplay records for `rollback`.

    Returns:
      (logits [B, T, vocab] fp32, updated cache or None[, replay records]).
    """
    if meta is None:
      meta = default_meta(tokens, segment_ids, positions)
    if return_gdn_aux:
      h, cache, replays = self.hidden_states(tokens, meta, cache=cache, valid=valid,
                                             return_gdn_replay=True)
      return self.logits(h), cache, replays
    h, cache = self.hidden_states(tokens, meta, cache=cache, valid=valid)
    return self.logits(h), cache

  def rollback(self, before: tuple[cache_lib.LayerCache, ...],
               after: tuple[cache_lib.LayerCache, ...], replays: tuple,
               n_keep: jax.Array) -> tuple[cache_lib.LayerCache, ...]:
    """The cache after only the first n_keep [B] tokens of a cached pass (from `before` to `after`).

    KV caches keep `after` (slots past the kept tokens are stale and masked by position); GDN states
    are recomputed from `before` over the kept tokens.
    """
    out = []
    for blk, b, a, r in zip(self.layers, before, after, replays):
      out.append(a if r is None else blk.linear_attn.replay_state(b, r, n_keep))
    return tuple(out)
