"""Building blocks: Dense, Embedder, the two RMSNorm conventions and the SwiGLU MLP (partial RoPE:
`pallas_kernels.attention.rope`)."""
from collections.abc import Sequence
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flare_jax import sharding as shd
from pallas_kernels import add_rms_norm
from pallas_kernels.gated_delta_rule import front as gdr_front

_INIT_STD = 0.02


def dtype_of(name: str) -> jnp.dtype:
  return jnp.dtype(name)


def kernels_configured(implementation: str | None) -> bool:
  """Whether an implementation choice runs custom-call kernels: a kernel family, or None on GPU
  (every kernel dispatch's default there). Such calls go through `sharding.per_batch_shard`."""
  return implementation != 'xla' and (implementation is not None
                                      or jax.default_backend() == 'gpu')


class Dense(nnx.Module):
  """y = x @ kernel, kernel [in, out] (HF weights are [out, in]: the importer transposes).
  No bias."""

  def __init__(self, d_in: int, d_out: int, names: Sequence[str | None], *, dtype: str,
               param_dtype: str, rngs: nnx.Rngs, std: float = _INIT_STD):
    init = shd.param_init(nnx.initializers.normal(std), names)
    self.kernel = nnx.Param(init(rngs.params(), (d_in, d_out), dtype_of(param_dtype)))
    self.dtype = dtype_of(dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))


class Embedder(nnx.Module):
  """Token embedding [vocab, D]; `decode` is the tied LM head (logits = h @ E^T)."""

  def __init__(self, vocab: int, d: int, *, dtype: str, param_dtype: str, rngs: nnx.Rngs):
    init = shd.param_init(nnx.initializers.normal(_INIT_STD), (shd.VOCAB, shd.EMBED))
    self.embedding = nnx.Param(init(rngs.params(), (vocab, d), dtype_of(param_dtype)))
    self.dtype = dtype_of(dtype)

  def encode(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

  def decode(self, h: jax.Array) -> jax.Array:
    return jnp.dot(h.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


class MergedDense(nnx.Module):
  """Dense layers that read one input, run as one GEMM: kernel [in, sum of their outs], their
  kernels side by side. Built by `merge_projections` for decode copies; __call__ returns each
  part's output, in order."""

  def __init__(self, parts: Sequence[Dense]):
    if len({p.dtype for p in parts}) != 1 or len({p.kernel.shape[0] for p in parts}) != 1:
      raise ValueError('merged Dense layers must share their input size and compute dtype')
    self.kernel = nnx.Param(jnp.concatenate([p.kernel[...] for p in parts], axis=1))
    self.splits = tuple(int(i) for i in np.cumsum([p.kernel.shape[1] for p in parts])[:-1])
    self.dtype = parts[0].dtype

  def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
    return self.split(self.project(x))

  def project(self, x: jax.Array) -> jax.Array:
    """The merged product [..., sum of the parts' outs]; part i is columns [starts[i], ...)."""
    return jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))

  def split(self, y: jax.Array) -> tuple[jax.Array, ...]:
    return tuple(jnp.split(y, self.splits, axis=-1))

  @property
  def starts(self) -> tuple[int, ...]:
    """Each part's first column in the merged product."""
    return (0,) + self.splits


def merge_projections(owner: nnx.Module, merged_name: str, names: Sequence[str]) -> None:
  """Replaces, in place, the Dense layers `owner.<names>` (which read one input) by one
  MergedDense `owner.<merged_name>`.

  One GEMM per pass instead of several: at decode a small projection is a launch or three (XLA
  merges small GEMMs by concatenating their weights inside the decode loop, then splits the
  product and reduces its split-K partials), each a few microseconds at batch 8. Changes the
  parameter tree, so it is meant for a decode copy (as `cast_matmul_weights`): checkpoints and
  training keep the separate layers, whose sharding rules name each part's own axes.
  """
  setattr(owner, merged_name, nnx.data(MergedDense([getattr(owner, n) for n in names])))
  for n in names:
    delattr(owner, n)


def cast_matmul_weights(model: nnx.Module) -> None:
  """Casts, in place, every Dense kernel and Embedder table inside `model` to its compute dtype.

  Each use of them casts to that dtype first, so no output changes; a decode loop then reads them
  at that width (half the bytes of fp32 params) and converts nothing per step. Meant for a copy
  merged inside jit: the arrays it was merged from are untouched.
  """
  for _, module in nnx.iter_modules(model):
    if isinstance(module, (Dense, MergedDense)):
      module.kernel.set_value(module.kernel.get_value().astype(module.dtype))
    elif isinstance(module, Embedder):
      module.embedding.set_value(module.embedding.get_value().astype(module.dtype))


class RMSNorm(nnx.Module):
  """Zero-centred RMSNorm of Qwen3.5: y = x_hat * (1 + w), w initialised to 0, computed in fp32."""

  def __init__(self, d: int, *, eps: float, param_dtype: str):
    init = shd.param_init(nnx.initializers.zeros, (shd.NORM,))
    self.scale = nnx.Param(init(jax.random.key(0), (d,), dtype_of(param_dtype)))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    return add_rms_norm.rms_norm(x, self.scale[...], self.eps)

  def after_add(self, h: jax.Array, delta: jax.Array | None,
                implementation: str | None = 'xla') -> tuple[jax.Array, jax.Array]:
    """(s, self(s)) for the residual sum s = h + delta (s = h when delta is None).

    implementation: `add_rms_norm`'s: 'pallas' runs the add and the norm as one kernel, None or
    'xla' XLA's ops (the same arithmetic). The kernel has no gradient rule: cached passes only.
    """
    if delta is None:
      return h, self(h)
    add_norm = functools.partial(add_rms_norm.add_rms_norm, eps=self.eps,
                                 implementation=implementation)
    return shd.per_batch_shard(lambda scale, h_, d_: add_norm(h_, d_, scale), h, delta,
                               shared=(self.scale[...],),
                               enabled=implementation == 'pallas')


class GatedRMSNorm(nnx.Module):
  """GDN output norm: y = w * x_hat * silu(z) with a plain weight w (init 1),
  per value head, fp32."""

  def __init__(self, d: int, *, eps: float, param_dtype: str):
    init = shd.param_init(nnx.initializers.ones, (shd.NORM,))
    self.scale = nnx.Param(init(jax.random.key(0), (d,), dtype_of(param_dtype)))
    self.eps = eps

  def __call__(self, x: jax.Array, z: jax.Array) -> jax.Array:
    return gdr_front.gated_norm(x, z, self.scale[...], self.eps).astype(x.dtype)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, d: int, f: int, *, dtype: str, param_dtype: str, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = Dense(d, f, (shd.EMBED, shd.MLP), **kw)
    self.up_proj = Dense(d, f, (shd.EMBED, shd.MLP), **kw)
    self.down_proj = Dense(f, d, (shd.MLP, shd.EMBED), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
    h = shd.shard(h, (shd.ACT_BATCH, shd.ACT_SEQ, shd.ACT_MLP))
    return self.down_proj(h)
