"""Random gated delta rule problems and jitted calls, shared by bench_kernels and tune_gdn_kernels.

Inputs: q, k l2-normalised, v normal, g = logsigmoid(U(0,1)) (fp32), beta = sigmoid(U(0,1));
H = HV.
"""
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta_rule import api


def random_inputs(b: int, t: int, h: int, dk: int, dv: int, dtype: str, seed: int = 0):
  """((q, k, v, g, beta), do): one problem and a random output cotangent, on the device."""
  dtype = jnp.dtype(dtype)
  ks = jax.random.split(jax.random.key(seed), 6)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  q = unit(jax.random.normal(ks[0], (b, t, h, dk))).astype(dtype)
  k = unit(jax.random.normal(ks[1], (b, t, h, dk))).astype(dtype)
  v = jax.random.normal(ks[2], (b, t, h, dv)).astype(dtype)
  g = jax.nn.log_sigmoid(jax.random.uniform(ks[3], (b, t, h)))
  beta = jax.nn.sigmoid(jax.random.uniform(ks[4], (b, t, h)))
  do = jax.random.normal(ks[5], (b, t, h, dv)).astype(dtype)
  return jax.block_until_ready(((q, k, v, g, beta), do))


def jitted_calls(impl: str):
  """(fwd(q, k, v, g, beta) -> o, fwdbwd(q, k, v, g, beta, do) -> (o, input gradients)), fresh
  jits. fwdbwd returns o so the forward's output kernel stays live, as in training (and as in
  fla's forward + backward); without it XLA drops that kernel."""
  fn = functools.partial(api.chunk_gated_delta_rule, implementation=impl)
  fwd = jax.jit(lambda *a: fn(*a)[0])

  @jax.jit
  def fwdbwd(q, k, v, g, beta, do):
    o, vjp = jax.vjp(lambda *a: fn(*a)[0], q, k, v, g, beta)
    return o, vjp(do)

  return fwd, fwdbwd
