"""Gated softmax attention of Qwen3.5 (q/k RMSNorm, partial RoPE, sigmoid output gate, GQA)."""
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from flare_jax import sharding as shd
from flare_jax.model import cache as cache_lib
from flare_jax.model import config as config_lib
from flare_jax.model import layers
from pallas_kernels import attention as attn_ops
from pallas_kernels.attention import decode_front
from pallas_kernels.attention import decode_pallas
from pallas_kernels.attention import rope as rope_lib

# Step A/B's projections, in the order `project` reads them.
_IN_PROJECTIONS = ('q_proj', 'k_proj', 'v_proj')


class Attention(nnx.Module):
  """Gated GQA attention.

  Step A  qg = x Wq, viewed [B, T, Hq, 2, D]: per head [query | gate] (HF's interleaved layout).
  Step B  q = RMSNorm(q), k = RMSNorm(x Wk), v = x Wv; partial rotate-half RoPE on the first
          `rotary_dim` dims of q and k.
  Step C  o = softmax(q k^T / sqrt(D) + visibility mask) v, with query head h using kv head
          h // (Hq/Hkv).
  Step D  y = (o * sigmoid(gate)) Wo.
  """

  def __init__(self, cfg: config_lib.ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, hq, hkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.q_proj = layers.Dense(d, 2 * hq * hd, (shd.EMBED, shd.HEADS), **kw)
    self.k_proj = layers.Dense(d, hkv * hd, (shd.EMBED, shd.KV_HEADS), **kw)
    self.v_proj = layers.Dense(d, hkv * hd, (shd.EMBED, shd.KV_HEADS), **kw)
    self.o_proj = layers.Dense(hq * hd, d, (shd.HEADS, shd.EMBED), **kw)
    self.q_norm = layers.RMSNorm(hd, eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
    self.k_norm = layers.RMSNorm(hd, eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
    self.qkv_proj: layers.MergedDense | None = nnx.data(None)  # see `merge_in_projections`

  def merge_in_projections(self) -> None:
    """q, k and v projections as one GEMM, `qkv_proj` (for decode copies; see
    `layers.merge_projections`)."""
    layers.merge_projections(self, 'qkv_proj', _IN_PROJECTIONS)

  def project(self, x: jax.Array, positions: jax.Array):
    """Returns q [B,T,Hq,D], k, v [B,T,Hkv,D] (normed and rotated) and gate [B,T,Hq*D]."""
    cfg = self.cfg
    b, t, _ = x.shape
    hkv, hd = cfg.num_key_value_heads, cfg.head_dim
    if self.qkv_proj is None:
      qg, k, v = (getattr(self, name)(x) for name in _IN_PROJECTIONS)
    else:
      qg, k, v = self.qkv_proj(x)
    q, gate = self._query_and_gate(qg)
    q = self.q_norm(q)
    k = self.k_norm(k.reshape(b, t, hkv, hd))
    v = v.reshape(b, t, hkv, hd)
    rope = dict(rotary_dim=cfg.rotary_dim, theta=cfg.rope_theta)
    q = rope_lib.apply_partial_rope(q, positions, **rope)
    k = rope_lib.apply_partial_rope(k, positions, **rope)
    return q, k, v, gate

  def _query_and_gate(self, qg: jax.Array):
    """q [B, T, Hq, D] and gate [B, T, Hq * D] from q_proj's product [B, T, >= 2 Hq D] (its
    leading columns): per head [query | gate], HF's interleaved layout."""
    b, t = qg.shape[:2]
    hq, hd = self.cfg.num_attention_heads, self.cfg.head_dim
    qg = qg[..., :2 * hq * hd].reshape(b, t, hq, 2, hd)
    return qg[:, :, :, 0], qg[:, :, :, 1].reshape(b, t, hq * hd)

  def output(self, o: jax.Array, gate: jax.Array) -> jax.Array:
    b, t = o.shape[:2]
    o = o.reshape(b, t, -1)
    o = (o.astype(jnp.float32) * jax.nn.sigmoid(gate.astype(jnp.float32))).astype(o.dtype)
    return self.o_proj(o)

  def __call__(self, x: jax.Array, meta: attn_ops.TokenMeta, *,
               cache: cache_lib.KVCache | None = None):
    """Attention over the sequence itself, or (with `cache`) over the cache after writing x's keys.

    Args:
      x: [B, T, D].
      meta: per-token metadata [B, T]. With a cache, row b's tokens are consecutive positions
        written to slots meta.positions[b, 0] ... + T - 1, all of one document; they are clean
        (views 0), one noisy block (views 1) whose cache the caller drops, or clean tokens followed
        by one noisy block (Diffusion-Trust's advance fused with its next pass).
      cache: optional KVCache [B, S, Hkv, D].

    Returns:
      (y [B, T, D], updated cache or None).
    """
    if cache is not None and self.qkv_proj is not None and attn_ops.front_kernels_take(
        x.shape[1], self.cfg.num_attention_heads, cache.k, cache.v, self.cfg.rotary_dim,
        self.qkv_proj.dtype, self.cfg.attn_decode_impl):
      return self.cached_call_by_kernels(x, meta, cache)
    q, k, v, gate = self.project(x, meta.positions)
    q = shd.shard(q, (shd.ACT_BATCH, shd.ACT_SEQ, shd.ACT_HEADS, None))
    attend = functools.partial(attn_ops.attention, implementation=self.cfg.attn_impl,
                               q_tile=self.cfg.attn_q_tile)
    kernels = layers.kernels_configured(self.cfg.attn_impl)
    if cache is None:
      o = shd.per_batch_shard(attend, q, k, v, meta, meta, enabled=kernels)
      return self.output(o, gate), None
    start = meta.positions[:, 0]
    new_cache = cache_lib.KVCache(cache_lib.write_rows(cache.k, k, start),
                                  cache_lib.write_rows(cache.v, v, start))
    attend_cache = functools.partial(
        attn_ops.cache_attention, implementation=self.cfg.attn_impl,
        decode_implementation=self.cfg.attn_decode_impl, q_tile=self.cfg.attn_q_tile)
    kernels = kernels or layers.kernels_configured(self.cfg.attn_decode_impl)
    o = shd.per_batch_shard(attend_cache, q, new_cache.k, new_cache.v, meta,
                            cache_key_meta(meta, cache.k.shape[1]), enabled=kernels)
    return self.output(o, gate), new_cache

  def cached_call_by_kernels(self, x: jax.Array, meta: attn_ops.TokenMeta,
                             cache: cache_lib.KVCache, interpret: bool | None = None):
    """__call__ over a cache as three launches after the merged projection (decode copies, see
    `merge_in_projections`): the decode front kernel (q/k norms, RoPE, the query rows, this call's
    keys and values written into the cache), the decode kernel and XLA's fusion of its splits
    with the output gate. __call__ takes it where `attn_ops.front_kernels_take`; interpret (None:
    off GPU) runs both kernels in the Pallas interpreter."""
    cfg = self.cfg
    hq = cfg.num_attention_heads
    product = self.qkv_proj.project(x)
    _, gate = self._query_and_gate(product)
    cos, sin = rope_lib.rope_tables(meta.positions, rotary_dim=cfg.rotary_dim,
                                    theta=cfg.rope_theta, dtype=product.dtype)
    _, k_col, v_col = self.qkv_proj.starts

    def front(q_norm, k_norm, product, cos, sin, start, k_cache, v_cache):
      return decode_front.decode_front_pallas(
          product, cos, sin, start, q_norm, k_norm, k_cache, v_cache, num_heads=hq, k_col=k_col,
          v_col=v_col, eps=cfg.rms_norm_eps, interpret=interpret)

    def attend(rows, k_cache, v_cache, q_meta, k_meta):
      return decode_pallas.attention_decode_rows(rows, k_cache, v_cache, q_meta, k_meta,
                                                 num_heads=hq, interpret=interpret)

    rows, k_cache, v_cache = shd.per_batch_shard(
        front, product, cos, sin, meta.positions[:, 0], cache.k, cache.v,
        shared=(self.q_norm.scale[...], self.k_norm.scale[...]))
    o = shd.per_batch_shard(attend, rows, k_cache, v_cache, meta,
                            cache_key_meta(meta, cache.k.shape[1]))
    return self.output(o, gate), cache_lib.KVCache(k_cache, v_cache)


def cache_key_meta(meta: attn_ops.TokenMeta, s: int) -> attn_ops.TokenMeta:
  """Metadata of the S cache slots after row b's T new tokens were written at meta.positions[b, 0].

  Slot j holds position j. The new slots take the new tokens' view/block (so a noisy block over the
  cache is bidirectional inside itself); every other slot is clean. Stale slots past the new tokens
  are invisible because their positions exceed every query's horizon.
  """
  b, t = meta.positions.shape
  slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  rel = slots - meta.positions[:, :1]
  is_new = (rel >= 0) & (rel < t)
  take = lambda x: jnp.take_along_axis(x, jnp.clip(rel, 0, t - 1), axis=1)
  views = jnp.where(is_new, take(meta.views), 0)
  block_starts = jnp.where(is_new, take(meta.block_starts), slots)
  return attn_ops.TokenMeta(jnp.zeros_like(slots), slots, views, block_starts)
