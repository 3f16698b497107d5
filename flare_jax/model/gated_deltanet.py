"""Gated DeltaNet mixer of Qwen3.5 (the "linear_attention" layers)."""
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from flare_jax import sharding as shd
from flare_jax.model import cache as cache_lib
from flare_jax.model import config as config_lib
from flare_jax.model import layers
from flare_jax.model import two_stream_gdn
from pallas_kernels import gated_delta_rule as gdr
from pallas_kernels.attention import mask as mask_lib


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """x * rsqrt(sum(x^2) + eps) over the last axis, fp32 (HF's l2norm; eps inside the sqrt)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def causal_conv(x: jax.Array, w: jax.Array, segment_ids: jax.Array,
                window: jax.Array | None = None):
  """Depthwise causal conv that never reads across a document boundary.

  out[t, c] = sum_j w[j, c] * x[t - (Kc-1) + j, c], taking only inputs of t's segment; positions
  before the sequence come from `window` (the previous Kc-1 inputs) and count as t's segment iff no
  document starts between the sequence start and t.

  Args:
    x: [B, T, C] pre-conv inputs.
    w: [Kc, C] taps; w[Kc-1] multiplies the current token (HF conv1d.weight[c, 0, j] = w[j, c]).
    segment_ids: [B, T].
    window: [B, Kc-1, C] or None (zeros).

  Returns:
    (out [B, T, C] in fp32, padded inputs [B, Kc-1+T, C]).
  """
  b, t, c = x.shape
  kc = w.shape[0]
  if window is None:
    window = jnp.zeros((b, kc - 1, c), x.dtype)
  xpad = jnp.concatenate([window.astype(x.dtype), x], axis=1)
  seg_pad = jnp.concatenate([jnp.repeat(segment_ids[:, :1], kc - 1, axis=1), segment_ids], axis=1)
  out = jnp.zeros((b, t, c), jnp.float32)
  for j in range(kc):
    same = (seg_pad[:, j:j + t] == segment_ids)[..., None]
    tap = jnp.where(same, xpad[:, j:j + t].astype(jnp.float32), 0.0)
    out = out + tap * w[j].astype(jnp.float32)
  return out, xpad


def two_stream_conv(x: jax.Array, w: jax.Array, segment_ids: jax.Array, block_starts: jax.Array,
                    num_views: int) -> jax.Array:
  """The short conv of a two-stream row: `causal_conv` over the clean stream, and each noisy view
  with its window reaching into the clean stream (`two_stream_gdn.noisy_conv`).

  Args:
    x: [B, (1+V)T, C] pre-conv inputs (clean stream, then the views); w: [Kc, C].
    segment_ids, block_starts: [B, T] (block starts as slot indices).

  Returns:
    [B, (1+V)T, C] fp32 conv outputs (before the activation).
  """
  b, n, c = x.shape
  t = n // (1 + num_views)
  clean, _ = causal_conv(x[:, :t], w, segment_ids)
  noisy = two_stream_gdn.noisy_conv(x[:, :t], x[:, t:].reshape(b, num_views, t, c), w,
                                    segment_ids, block_starts)
  return jnp.concatenate([clean, noisy.reshape(b, num_views * t, c)], axis=1)


def two_stream_conv_silu(x: jax.Array, w: jax.Array, segment_ids: jax.Array,
                         block_starts: jax.Array, num_views: int,
                         backward: str) -> jax.Array:
  """silu(two_stream_conv(...)), fp32. (Rounding it to a bf16 model's dtype here, as HF's conv1d +
  SiLU do, tripled the bf16 model's worst gradient error against the fp32 model on XLA:CPU, at
  A_log and dt_bias: 6.0e-2 against 2.1e-2, T = 256, K = 32; the fp32 output stays.)

  backward: 'manual' (`_conv_silu_bwd`, ModelConfig's default): the conv is recomputed from x, each
  stream's input gradient is one sum of shifted taps accumulated in fp32 and rounded once, the
  taps' gradient one reduction per tap; or 'autodiff' (its oracle in the tests), which rounds
  each tap's contribution to x's dtype before summing them, and whose [B, (1+V)T, C] gradient
  (padded halves added in one fusion) ran at ~0.6 TB/s on an H200, 3.2 ms per GDN layer of the
  0.8B flare step. On an H200 (bf16, B = 1, T = 4096, V = 2, 16 heads of 128, 2026-12-02) the
  manual forward+backward took 1.39 ms against 1.67 with the same temp memory, and the 0.8B
  flare step 1,160 ms against 1,207 (peak 37.3 GiB against 36.6).

  Args:
    x: [B, (1+V)T, C] pre-conv inputs; w: [Kc, C]; segment_ids, block_starts: [B, T].

  Returns:
    [B, (1+V)T, C] fp32.
  """
  if backward not in config_lib.GDN_CONV_BACKWARDS:
    raise ValueError(f'backward must be one of {config_lib.GDN_CONV_BACKWARDS}, got {backward!r}')
  fn = _conv_silu_manual_vjp if backward == 'manual' else _conv_silu
  return fn(x, w, segment_ids, block_starts, num_views)


def _conv_silu(x, w, segment_ids, block_starts, num_views):
  return jax.nn.silu(two_stream_conv(x, w, segment_ids, block_starts, num_views))


_conv_silu_manual_vjp = jax.custom_vjp(_conv_silu, nondiff_argnums=(4,))


def _conv_silu_fwd(x, w, segment_ids, block_starts, num_views):
  return _conv_silu(x, w, segment_ids, block_starts, num_views), (x, w, segment_ids, block_starts)


def _conv_silu_bwd(num_views, res, dy):
  x, w, segment_ids, block_starts = res
  f32 = jnp.float32
  b, n, c = x.shape
  t = n // (1 + num_views)
  kc = w.shape[0]
  pre = two_stream_conv(x, w, segment_ids, block_starts, num_views)
  sig = jax.nn.sigmoid(pre)
  d_pre = dy * sig * (1.0 + pre * (1.0 - sig))  # silu'(pre)
  d_clean, d_noisy = d_pre[:, :t], d_pre[:, t:].reshape(b, num_views, t, c)
  x_clean, x_noisy = x[:, :t].astype(f32), x[:, t:].reshape(b, num_views, t, c).astype(f32)

  def read_cotangents(ok, from_noisy, d_c, d_n):
    """Cotangents of what a tap read at each slot: the clean input (for the clean stream and for
    the views outside their blocks) [B, T, C], and each view's own input [B, V, T, C]."""
    to_clean = jnp.where(ok[..., None], d_c + jnp.sum(
        jnp.where(from_noisy[:, None, :, None], 0.0, d_n), axis=1), 0.0)
    return to_clean, jnp.where((ok & from_noisy)[:, None, :, None], d_n, 0.0)

  dx_clean, dx_noisy, dw = 0.0, 0.0, [None] * kc
  shifted = two_stream_gdn.shifted
  for back, (ok, from_noisy) in enumerate(two_stream_gdn.conv_taps(segment_ids, block_starts, kc)):
    to_clean, to_noisy = read_cotangents(ok, from_noisy, d_clean, d_noisy)
    dw[kc - 1 - back] = (jnp.sum(to_clean * shifted(x_clean, back, 1), axis=(0, 1))
                         + jnp.sum(to_noisy * shifted(x_noisy, back, 2), axis=(0, 1, 2)))
    # Input slot s was read by slot s + back: the same cotangents, built from inputs shifted back
    # (not the products above shifted), so that XLA need not keep those products for both uses.
    to_clean, to_noisy = read_cotangents(
        shifted(ok, -back, 1), shifted(from_noisy, -back, 1), shifted(d_clean, -back, 1),
        shifted(d_noisy, -back, 2))
    tap = w[kc - 1 - back].astype(f32)
    dx_clean = dx_clean + to_clean * tap
    dx_noisy = dx_noisy + to_noisy * tap
  dx = jnp.concatenate([dx_clean, dx_noisy.reshape(b, num_views * t, c)], axis=1)
  return dx.astype(x.dtype), jnp.stack(dw).astype(w.dtype), None, None


_conv_silu_manual_vjp.defvjp(_conv_silu_fwd, _conv_silu_bwd)


def last_window(xpad: jax.Array, n_valid: jax.Array, kc: int) -> jax.Array:
  """The Kc-1 inputs ending at each row's last valid token:
  xpad[b, n_valid[b] : n_valid[b]+Kc-1]."""
  return jax.vmap(lambda xp, n: jax.lax.dynamic_slice_in_dim(xp, n, kc - 1, axis=0))(xpad, n_valid)


# Up to this many tokens a cached pass runs the token recurrence instead of
# padding to a whole chunk.
_RECURRENT_MAX_TOKENS = 16


def _delta_rule(cfg: config_lib.ModelConfig, q, k, v, g, beta, *, initial_state, segment_ids,
                output_final_state):
  scale = cfg.linear_key_head_dim ** -0.5
  if initial_state is not None and q.shape[1] <= _RECURRENT_MAX_TOKENS:
    impl = cfg.gdn_decode_impl
    op = functools.partial(gdr.recurrent_gated_delta_rule, implementation=impl)
  else:
    impl = cfg.gdn_impl
    op = functools.partial(gdr.chunk_gated_delta_rule, chunk_size=cfg.gdn_chunk_size,
                           implementation=impl)

  def run(q, k, v, g, beta, initial_state, segment_ids):
    return op(q, k, v, g, beta, scale=scale, initial_state=initial_state,
              segment_ids=segment_ids, output_final_state=output_final_state)

  return shd.per_batch_shard(run, q, k, v, g, beta, initial_state, segment_ids,
                             enabled=layers.kernels_configured(impl))


class GatedDeltaNet(nnx.Module):
  """Gated DeltaNet with grouped value heads (NV = r * NK).

  Step A  qkv = x W_qkv ([q: NK*DK | k: NK*DK | v: NV*DV]), z = x W_z, b = x W_b, a = x W_a.
  Step B  qkv = silu(causal depthwise conv(qkv)) (kernel Kc, no bias, no reads across documents).
  Step C  beta = sigmoid(b); g = -exp(A_log) * softplus(a + dt_bias) (log decay, fp32);
          q, k = l2norm(q), l2norm(k); value head h uses key head h // r.
  Step D  per value head, S <- exp(g) S; S <- S + beta k (v - S^T k)^T; o = S^T q / sqrt(DK)
          (chunked gated delta rule, fp32 state, reset at document starts).
  Step E  y = (w * rmsnorm(o) * silu(z)) per value head, then out = y W_out.
  """

  def __init__(self, cfg: config_lib.ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.hidden_size
    nv, dv = cfg.linear_num_value_heads, cfg.linear_value_head_dim
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.in_proj_qkv = layers.Dense(d, cfg.linear_conv_dim, (shd.EMBED, shd.GDN_PROJ), **kw)
    self.in_proj_z = layers.Dense(d, nv * dv, (shd.EMBED, shd.HEADS), **kw)
    self.in_proj_b = layers.Dense(d, nv, (shd.EMBED, shd.GDN_HEADS), **kw)
    self.in_proj_a = layers.Dense(d, nv, (shd.EMBED, shd.GDN_HEADS), **kw)
    self.out_proj = layers.Dense(nv * dv, d, (shd.HEADS, shd.EMBED), **kw)
    pdt = layers.dtype_of(cfg.param_dtype)
    conv_init = shd.param_init(nnx.initializers.normal(0.2), (shd.CONV, shd.GDN_PROJ))
    self.conv_weight = nnx.Param(
        conv_init(rngs.params(), (cfg.linear_conv_kernel_dim, cfg.linear_conv_dim), pdt))
    # HF init: A ~ U(0, 16) -> A_log = log(A); dt_bias = ones. Kept fp32
    # (checkpoints store A_log fp32).
    a_init = shd.param_init(
        lambda key, shape, dtype: jnp.log(jax.random.uniform(key, shape, dtype, 1e-2, 16.0)),
        (shd.GDN_HEADS,))
    self.A_log = nnx.Param(a_init(rngs.params(), (nv,), jnp.float32))
    self.dt_bias = nnx.Param(
        shd.param_init(nnx.initializers.ones, (shd.GDN_HEADS,))(rngs.params(), (nv,), pdt))
    self.norm = layers.GatedRMSNorm(dv, eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype)

  def mixer_inputs(self, x: jax.Array):
    """Step A: pre-conv qkv [B,T,C], z [B,T,NV,DV], b and a [B,T,NV]."""
    b, t, _ = x.shape
    cfg = self.cfg
    z = self.in_proj_z(x).reshape(b, t, cfg.linear_num_value_heads, cfg.linear_value_head_dim)
    return self.in_proj_qkv(x), z, self.in_proj_b(x), self.in_proj_a(x)

  def split_heads(self, qkv_conv: jax.Array):
    """Step C (q/k/v part): post-conv [B,T,C] -> l2-normed q, k [B,T,NK,DK] fp32 and
    v [B,T,NV,DV]."""
    cfg = self.cfg
    b, t, _ = qkv_conv.shape
    kd = cfg.linear_num_key_heads * cfg.linear_key_head_dim
    q = qkv_conv[..., :kd].reshape(b, t, cfg.linear_num_key_heads, cfg.linear_key_head_dim)
    k = qkv_conv[..., kd:2 * kd].reshape(b, t, cfg.linear_num_key_heads, cfg.linear_key_head_dim)
    v = qkv_conv[..., 2 * kd:].reshape(b, t, cfg.linear_num_value_heads, cfg.linear_value_head_dim)
    return l2_normalize(q), l2_normalize(k), v

  def gates(self, b_in: jax.Array, a_in: jax.Array):
    """Step C (gates): beta = sigmoid(b); g = -exp(A_log) softplus(a + dt_bias), both fp32."""
    beta = jax.nn.sigmoid(b_in.astype(jnp.float32))
    a = a_in.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32)
    g = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(a)
    return g, beta

  def output(self, o: jax.Array, z: jax.Array, dtype) -> jax.Array:
    """Step E."""
    b, t = o.shape[:2]
    y = self.norm(o.astype(jnp.float32), z).astype(dtype)
    return self.out_proj(y.reshape(b, t, -1))

  def _heads(self, x: jax.Array, segment_ids: jax.Array, conv_state: jax.Array | None):
    """Steps A-C: (q, k, v, g, beta, z, padded pre-conv qkv) of x [B, T, D]."""
    qkv, z, b_in, a_in = self.mixer_inputs(x)
    qkv, xpad = causal_conv(qkv, self.conv_weight[...], segment_ids, conv_state)
    q, k, v = self.split_heads(jax.nn.silu(qkv))
    g, beta = self.gates(b_in, a_in)
    return q, k, v, g, beta, z, xpad

  def __call__(self, x: jax.Array, segment_ids: jax.Array, *,
               state: cache_lib.GDNState | None = None, valid: jax.Array | None = None,
               return_replay: bool = False):
    """Runs the mixer over x; with `state`, continues a sequence and returns the next state.

    Args:
      x: [B, T, D] (already input-normed).
      segment_ids: [B, T]; the recurrence and the conv restart where the id changes.
      state: optional GDNState to continue from (decode / chunked prefill). Only the first segment
        of each row continues it.
      valid: optional bool [B, T], a per-row prefix of real tokens (right padding). Padding tokens
        are identity steps and the returned conv window ends at the last valid token.

      return_replay: also return a GDNReplay (requires `state`), from which `replay_state`
        recomputes the state after any prefix of the T tokens (speculative decoding rollback).

    Returns:
      (y [B, T, D], next GDNState or None when `state` is None[, GDNReplay]).
    """
    cfg = self.cfg
    q, k, v, g, beta, z, xpad = self._heads(x, segment_ids, None if state is None else state.conv)
    if valid is not None:
      g = jnp.where(valid[..., None], g, 0.0)
      beta = jnp.where(valid[..., None], beta, 0.0)
    dt = x.dtype  # the op computes in fp32 internally; bf16 operands halve its memory traffic
    o, final = _delta_rule(cfg, q.astype(dt), k.astype(dt), v.astype(dt), g, beta,
                           initial_state=None if state is None else state.recurrent,
                           segment_ids=segment_ids, output_final_state=state is not None)
    y = self.output(o, z, x.dtype)
    if state is None:
      return y, None
    if valid is None:  # every row ends at T: a static slice, not a per-row gather (decode steps)
      window = xpad[:, x.shape[1]:]
    else:
      window = last_window(xpad, jnp.sum(valid, axis=1, dtype=jnp.int32),
                           cfg.linear_conv_kernel_dim)
    window = window.astype(state.conv.dtype)
    next_state = cache_lib.GDNState(conv=window, recurrent=final)
    if return_replay:
      return y, next_state, cache_lib.GDNReplay(q=q.astype(dt), k=k.astype(dt), v=v.astype(dt),
                                                g=g, beta=beta, xpad=xpad)
    return y, next_state

  def noisy_block(self, x: jax.Array, segment_ids: jax.Array,
                  state: cache_lib.GDNState) -> jax.Array:
    """y [B, T, D] of a block that continues `state` and leaves it as it was (a noisy block at
    decode). More than one token runs `block_gated_delta_rule` (the state read once, no per-token
    or leaving state): in XLA the block-parallel form, as the training step's chunked noisy stream
    does, with the decode kernel (`cfg.gdn_decode_impl`) its token loop. One token runs the decode
    recurrence, so a one-slot block is the AR step bit for bit."""
    if x.shape[1] == 1:
      return self(x, segment_ids, state=state)[0]
    q, k, v, g, beta, z, _ = self._heads(x, segment_ids, state.conv)
    dt = x.dtype
    o = gdr.block_gated_delta_rule(q.astype(dt), k.astype(dt), v.astype(dt), g, beta,
                                   initial_state=state.recurrent, segment_ids=segment_ids,
                                   scale=self.cfg.linear_key_head_dim ** -0.5,
                                   implementation=self.cfg.gdn_decode_impl)
    return self.output(o, z, dt)

  def two_stream(self, x: jax.Array, meta: mask_lib.TokenMeta, num_views: int,
                 schedule: str = 'auto', max_block: int = 32) -> jax.Array:
    """The mixer over a two-stream row: clean stream [0, T) then `num_views` noisy views of T slots.

    The views share one block layout (their masks differ). See `two_stream_gdn` for the schedules;
    max_block bounds the block length in slots (the objective's block size).

    Args:
      x: [B, (1+V)T, D]; meta: [B, (1+V)T] metadata (noisy block_starts are positions).

    Returns:
      [B, (1+V)T, D].
    """
    cfg = self.cfg
    b, n, _ = x.shape
    t = n // (1 + num_views)
    qkv, z, b_in, a_in = self.mixer_inputs(x)
    seg = meta.segment_ids[:, :t]
    pos = meta.positions[:, t:2 * t]
    # Noisy block starts as slot indices of the row (positions restart at each document).
    starts = jnp.arange(t)[None] - (pos - meta.block_starts[:, t:2 * t])
    qkv = two_stream_conv_silu(qkv, self.conv_weight[...], seg, starts, num_views,
                               backward=cfg.gdn_conv_backward)
    # Both streams reach the kernels in the model's dtype (the fused kernels pick their launch
    # and product precision by it).
    q, k, v = (a.astype(x.dtype) for a in self.split_heads(qkv))
    g, beta = self.gates(b_in, a_in)
    clean = (q[:, :t], k[:, :t], v[:, :t], g[:, :t], beta[:, :t])
    views = lambda a: a[:, t:].reshape(b, num_views, t, *a.shape[2:])
    run = functools.partial(
        two_stream_gdn.two_stream_delta_rule, scale=cfg.linear_key_head_dim ** -0.5,
        schedule=schedule, chunk_size=cfg.gdn_chunk_size, max_block=max_block,
        clean_implementation=cfg.gdn_impl)
    kernels = (layers.kernels_configured(cfg.gdn_impl)
               or two_stream_gdn.resolve_schedule(schedule) in two_stream_gdn.KERNEL_SCHEDULES)
    o_clean, o_noisy = shd.per_batch_shard(
        run, clean, tuple(views(a) for a in (q, k, v, g, beta)), seg, starts, enabled=kernels)
    o = jnp.concatenate([o_clean.astype(jnp.float32),
                         o_noisy.reshape(b, num_views * t, *o_noisy.shape[3:])], axis=1)
    return self.output(o, z, x.dtype)

  def replay_state(self, state: cache_lib.GDNState, replay: cache_lib.GDNReplay,
                   n_keep: jax.Array) -> cache_lib.GDNState:
    """The state after the first n_keep [B] tokens of a pass that started from `state`.

    Steps t >= n_keep become identities (g = 0, beta = 0), so only the recurrence is recomputed.
    """
    cfg = self.cfg
    keep = jnp.arange(replay.g.shape[1])[None] < n_keep[:, None]
    _, final = _delta_rule(cfg, replay.q, replay.k, replay.v,
                           jnp.where(keep[..., None], replay.g, 0.0),
                           jnp.where(keep[..., None], replay.beta, 0.0),
                           initial_state=state.recurrent, segment_ids=None, output_final_state=True)
    window = last_window(replay.xpad, n_keep, cfg.linear_conv_kernel_dim).astype(state.conv.dtype)
    return cache_lib.GDNState(conv=window, recurrent=final)
