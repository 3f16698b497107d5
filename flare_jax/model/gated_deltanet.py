"""Gated DeltaNet mixer of Qwen3.5 (the "linear_attention" layers)."""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from flare_jax import sharding as shd
from flare_jax.model import cache as cache_lib
from flare_jax.model import config as config_lib
from flare_jax.model import layers
from flare_jax.model import two_stream_gdn
from pallas_kernels import gated_delta_rule as gdr
from pallas_kernels.gated_delta_rule import front
from pallas_kernels.attention import mask as mask_lib


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
  clean, _ = front.causal_conv(x[:, :t], w, segment_ids)
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


# Step A's projections, in the order `mixer_inputs` returns them.
_IN_PROJECTIONS = ('in_proj_qkv', 'in_proj_z', 'in_proj_b', 'in_proj_a')


class MixerInputs(NamedTuple):
  """Step A's products: pre-conv qkv [B,T,C], z [B,T,NV,DV], b_in and a_in [B,T,NV]; `merged`
  is the merged in-projection's product [B,T,C+NV*DV+2NV] they are column ranges of (decode
  copies, `GatedDeltaNet.merge_in_projections`), else None."""
  qkv: jax.Array
  z: jax.Array
  b_in: jax.Array
  a_in: jax.Array
  merged: jax.Array | None = None


# Up to this many tokens a cached pass runs the fused token loop (`gdr.fused_decode`) instead of
# padding to a whole chunk.
_RECURRENT_MAX_TOKENS = 16


def _chunked_rule(cfg: config_lib.ModelConfig, q, k, v, g, beta, *, initial_state, segment_ids,
                  output_final_state):
  """The chunked rule (training forward, prefill, long cached passes), per batch shard."""
  def run(q, k, v, g, beta, initial_state, segment_ids):
    return gdr.chunk_gated_delta_rule(
        q, k, v, g, beta, scale=cfg.linear_key_head_dim ** -0.5, initial_state=initial_state,
        segment_ids=segment_ids, output_final_state=output_final_state,
        chunk_size=cfg.gdn_chunk_size, implementation=cfg.gdn_impl)

  return shd.per_batch_shard(run, q, k, v, g, beta, initial_state, segment_ids,
                             enabled=layers.kernels_configured(cfg.gdn_impl))


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
    self.in_proj: layers.MergedDense | None = nnx.data(None)  # see `merge_in_projections`

  def merge_in_projections(self) -> None:
    """The four in-projections as one GEMM, `in_proj` (for decode copies; see
    `layers.merge_projections`)."""
    layers.merge_projections(self, 'in_proj', _IN_PROJECTIONS)

  def mixer_inputs(self, x: jax.Array) -> MixerInputs:
    """Step A."""
    b, t, _ = x.shape
    cfg = self.cfg
    merged = None
    if self.in_proj is None:
      qkv, z, b_in, a_in = (getattr(self, name)(x) for name in _IN_PROJECTIONS)
    else:
      merged = self.in_proj.project(x)
      qkv, z, b_in, a_in = self.in_proj.split(merged)
    z = z.reshape(b, t, cfg.linear_num_value_heads, cfg.linear_value_head_dim)
    return MixerInputs(qkv, z, b_in, a_in, merged)

  def split_heads(self, act: jax.Array):
    """Step C (q/k/v part): post-activation [B,T,C] -> l2-normed q, k [B,T,NK,DK] fp32 and
    v [B,T,NV,DV]."""
    cfg = self.cfg
    return front.split_heads(act, cfg.linear_num_key_heads, cfg.linear_key_head_dim,
                             cfg.linear_value_head_dim)

  def gates(self, b_in: jax.Array, a_in: jax.Array):
    """Step C (gates): beta = sigmoid(b); g = -exp(A_log) softplus(a + dt_bias), both fp32."""
    return front.gates(b_in, a_in, self.A_log[...], self.dt_bias[...])

  def output(self, o: jax.Array, z: jax.Array, dtype) -> jax.Array:
    """Step E."""
    b, t = o.shape[:2]
    y = self.norm(o.astype(jnp.float32), z).astype(dtype)
    return self.out_proj(y.reshape(b, t, -1))

  def __call__(self, x: jax.Array, segment_ids: jax.Array, *,
               state: cache_lib.GDNState | None = None, valid: jax.Array | None = None,
               return_replay: bool = False):
    """Runs the mixer over x; with `state`, continues a sequence and returns the next state.

    Args:
      x: [B, T, D] (already input-normed).
      segment_ids: [B, T]; the recurrence and the conv restart where the id changes.
      state: optional GDNState to continue from (decode / chunked prefill). Only the first segment
        of each row continues it. Up to `_RECURRENT_MAX_TOKENS` tokens run `gdr.fused_decode`.
      valid: optional bool [B, T], a per-row prefix of real tokens (right padding). Padding tokens
        are identity steps (their outputs unspecified) and the returned conv window ends at the
        last valid token.
      return_replay: also return a GDNReplay (requires `state`), from which `replay_state`
        recomputes the state after any prefix of the T tokens (speculative decoding rollback).

    Returns:
      (y [B, T, D], next GDNState or None when `state` is None[, GDNReplay]).
    """
    inputs = self.mixer_inputs(x)
    normed, next_state = self._pass(inputs, segment_ids, state, valid)
    y = self.out_proj(normed.reshape(*x.shape[:2], -1))
    if return_replay:
      return y, next_state, cache_lib.GDNReplay(
          qkv=inputs.qkv, b_in=inputs.b_in, a_in=inputs.a_in, segment_ids=segment_ids,
          merged=inputs.merged)
    return y, next_state

  def _pass(self, inputs: MixerInputs, segment_ids, state, valid):
    """Steps B-E up to the out-projection: (y [B, T, HV, V] in the inputs' dtype, next GDNState
    or None); y is the rule's raw outputs when inputs.z is None (a replay, which keeps the state
    alone). A cached pass of up to `_RECURRENT_MAX_TOKENS` tokens is fused, anything else
    chunked."""
    if state is not None and inputs.qkv.shape[1] <= _RECURRENT_MAX_TOKENS:
      return self._fused_pass(inputs, segment_ids, state, valid, True)
    o, next_state = self._chunked_pass(inputs, segment_ids, state, valid)
    if inputs.z is None:
      return o, next_state
    return self.norm(o.astype(jnp.float32), inputs.z).astype(inputs.qkv.dtype), next_state

  def _chunked_pass(self, inputs: MixerInputs, segment_ids, state, valid):
    """Steps B-D by the chunked rule: (o [B, T, HV, V], next GDNState or None)."""
    cfg = self.cfg
    qkv, b_in, a_in = inputs.qkv, inputs.b_in, inputs.a_in
    pre, xpad = front.causal_conv(qkv, self.conv_weight[...], segment_ids,
                                  None if state is None else state.conv)
    q, k, v = self.split_heads(jax.nn.silu(pre))
    g, beta = front.mask_invalid(*self.gates(b_in, a_in), valid)
    dt = qkv.dtype  # the op computes in fp32 internally; bf16 operands halve its memory traffic
    o, final = _chunked_rule(cfg, q.astype(dt), k.astype(dt), v.astype(dt), g, beta,
                             initial_state=None if state is None else state.recurrent,
                             segment_ids=segment_ids, output_final_state=state is not None)
    if state is None:
      return o, None
    window = front.leaving_window(xpad, valid, cfg.linear_conv_kernel_dim)
    return o, cache_lib.GDNState(conv=window.astype(state.conv.dtype), recurrent=final)

  def _fused_pass(self, inputs: MixerInputs, segment_ids, state, valid, with_state: bool):
    """Steps B-E up to the out-projection of a cached pass by `gdr.fused_decode` (one kernel on
    GPU), per batch shard: (y [B, T, HV, V], next GDNState, or None without `with_state`); y as
    `_pass`'s. A merged product is passed whole, its columns read in place."""
    cfg = self.cfg
    z_src, z_col = None, 0
    if inputs.merged is None:
      operands, columns = (inputs.qkv, inputs.b_in, inputs.a_in), dict(b_col=0, a_col=0)
      if inputs.z is not None:
        z_src = inputs.z.reshape(*inputs.z.shape[:2], -1)
    else:
      operands = (inputs.merged,) * 3
      qkv_col, z_col, b_col, a_col = self.in_proj.starts
      assert qkv_col == 0, 'q|k|v must lead the merged product'
      columns = dict(b_col=b_col, a_col=a_col)
      if inputs.z is not None:
        z_src = inputs.merged

    def run(conv_weight, a_log, dt_bias, norm_weight, qkv, b_in, a_in, z_src, segment_ids, valid,
            window, recurrent):
      gate = None if z_src is None else front.OutputGate(z_src, norm_weight, self.norm.eps, z_col)
      return gdr.fused_decode(
          qkv, b_in, a_in, conv_weight, a_log, dt_bias, window=window, initial_state=recurrent,
          num_key_heads=cfg.linear_num_key_heads, scale=cfg.linear_key_head_dim ** -0.5,
          segment_ids=segment_ids, valid=valid, output_final_state=with_state, output_gate=gate,
          implementation=cfg.gdn_decode_impl, **columns)

    y, leaving = shd.per_batch_shard(
        run, *operands, z_src, segment_ids, valid, state.conv, state.recurrent,
        shared=(self.conv_weight[...], self.A_log[...], self.dt_bias[...], self.norm.scale[...]),
        enabled=layers.kernels_configured(cfg.gdn_decode_impl))
    if leaving is None:
      return y, None
    return y, cache_lib.GDNState(conv=leaving[0], recurrent=leaving[1])

  def noisy_block(self, x: jax.Array, segment_ids: jax.Array,
                  state: cache_lib.GDNState) -> jax.Array:
    """y [B, T, D] of a block that continues `state` and leaves it as it was (a noisy block at
    decode): `gdr.fused_decode` without the leaving state (no per-token or leaving state formed;
    XLA runs the rule's block-parallel form, as the training step's chunked noisy stream does).
    One token runs the cached pass itself, so a one-slot block is the AR step bit for bit."""
    if x.shape[1] == 1:
      return self(x, segment_ids, state=state)[0]
    normed, _ = self._fused_pass(self.mixer_inputs(x), segment_ids, state, None, False)
    return self.out_proj(normed.reshape(*x.shape[:2], -1))

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
    qkv, z, b_in, a_in, _ = self.mixer_inputs(x)
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
    """The state after the first n_keep [B] tokens of a pass that started from `state`: the pass's
    inputs rerun the way the pass ran (fused or chunked), with tokens t >= n_keep marked invalid
    (identity steps)."""
    keep = jnp.arange(replay.qkv.shape[1])[None] < n_keep[:, None]
    inputs = MixerInputs(replay.qkv, None, replay.b_in, replay.a_in, replay.merged)
    return self._pass(inputs, replay.segment_ids, state, keep)[1]
