"""Decode caches: KV cache for softmax layers, conv window + recurrent state for GDN layers.

Slot j of a KV cache holds the key/value of position j, so a key's position is its slot index and
stale slots past a row's length are masked by causality alone.
"""
import flax
import jax
import jax.numpy as jnp

from flare_jax.model import config as config_lib
from pallas_kernels.attention import decode_pallas as attn_decode


@flax.struct.dataclass
class KVCache:
  """k, v: [B, S, Hkv, D] in the compute dtype."""

  k: jax.Array
  v: jax.Array


@flax.struct.dataclass
class GDNState:
  """conv: [B, Kc-1, C] last pre-conv q|k|v inputs; recurrent: [B, HV, K, V] fp32."""

  conv: jax.Array
  recurrent: jax.Array


@flax.struct.dataclass
class GDNReplay:
  """The inputs of a cached GDN pass, enough to recompute its state after any prefix of its T
  tokens from the state it started at (`GatedDeltaNet.replay_state`).

  qkv: [B, T, C] pre-conv q|k|v inputs; b_in, a_in: [B, T, NV] pre-gate inputs; segment_ids: [B, T];
  merged: the merged in-projection's product they are column ranges of (decode copies), or None.
  """

  qkv: jax.Array
  b_in: jax.Array
  a_in: jax.Array
  segment_ids: jax.Array
  merged: jax.Array | None = None


LayerCache = KVCache | GDNState


# KV caches hold a whole number of the decode attention kernel's key tiles (it walks whole tiles).
KV_SLOT_MULTIPLE = attn_decode.BLOCK_K


def init_cache(cfg: config_lib.ModelConfig, batch: int, max_len: int) -> tuple[LayerCache, ...]:
  """An empty cache: zeros everywhere (a zero GDN state is the state before any token). KV caches
  get max_len slots rounded up to KV_SLOT_MULTIPLE; slots past the written ones are never visible
  (slot j holds position j, past every query's horizon)."""
  dtype = jnp.dtype(cfg.dtype)
  slots = -(-max_len // KV_SLOT_MULTIPLE) * KV_SLOT_MULTIPLE
  layers = []
  for layer_type in cfg.layer_types:
    if layer_type == config_lib.FULL:
      shape = (batch, slots, cfg.num_key_value_heads, cfg.head_dim)
      layers.append(KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)))
    else:
      layers.append(GDNState(
          conv=jnp.zeros((batch, cfg.linear_conv_kernel_dim - 1, cfg.linear_conv_dim), dtype),
          recurrent=jnp.zeros((batch, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                               cfg.linear_value_head_dim), jnp.float32)))
  return tuple(layers)


def write_rows(buf: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
  """Writes new [B, T, ...] into buf [B, S, ...] at per-row offsets start [B]."""
  return jax.vmap(lambda b, n, s: jax.lax.dynamic_update_slice_in_dim(b, n, s, axis=0))(
      buf, new.astype(buf.dtype), start)
