"""Token-by-token gated delta rule in one Pallas kernel (decoding: a few tokens per call).

The recurrence of `xla.recurrent_gated_delta_rule_xla`, per step t of a value head:

    a = e^g (0 at a segment start);  d = beta (v - a S^T k);  o = a S^T q + (k.q) d;
    S <- a S + k d^T.

One program per (batch row, value head, V tile) keeps its [K, bv] slice of the fp32 state in
registers for all T steps: the state is read once and written once per call, and the products are
exact fp32 multiply-and-sums (no TF32). XLA's version runs four kernels per step (q/k stacking,
the S^T [k, q] GEMM, the output and the state update), reading the state twice.

The rule alone, behind `api.recurrent_gated_delta_rule` / `block_gated_delta_rule`; the model's
cached passes run `decode_pallas`, which adds the conv, activations and gates around
`delta_step` in the same kernel. Each step loads the next token's inputs before it stores its own
outputs (the compiler cannot hoist a load above a store that may alias it).

H200, Qwen3.5-2B's GDN at batch 8 (HV = 16, K = V = 128, bf16 inputs), `launch.bench_decode`
(2026-12-03, one run): 7.9 µs a 1-token call with the state against XLA's 12.0; 12.1 µs a
4-token call against 64.1 (14.9 before loading ahead, in an earlier run); 4 tokens outputs-only
16.8 µs at 4 warps, 10.8 at 2, against XLA's block form 18.8.

Every step runs the same code whatever T is (a `fori_loop` over the tokens), so T single-token
calls equal one T-token call bit for bit.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import backend
from pallas_kernels.gated_delta_rule import reference

_F32 = jnp.float32
BLOCK_V = 32  # V columns per program: a [128, 32] fp32 state tile is 32 registers a thread
NUM_WARPS = 4


def kernel_takes(k: jax.Array, v: jax.Array) -> str | None:
  """None if the kernel takes these shapes, else why not (K and V must be powers of two >= 16)."""
  kd, vd = k.shape[-1], v.shape[-1]
  for name, n in (('K', kd), ('V', vd)):
    if n < 16 or n != backend.next_pow2(n):
      return f'{name}={n} is not a power of two >= 16'
  return None


def delta_step(s, qt, kt, vt, at, bt):
  """One token of the rule on a [K, bv] fp32 state tile: (o [bv], next state). qt [K] is already
  scaled; kt [K], vt [bv] fp32; at the decay e^g (0 at a segment start), bt beta."""
  sk = at * jnp.sum(s * kt[:, None], axis=0)
  sq = at * jnp.sum(s * qt[:, None], axis=0)
  d = bt * (vt - sk)
  return sq + jnp.sum(kt * qt) * d, at * s + kt[:, None] * d[None, :]


def _kernel(q_ref, k_ref, v_ref, a_ref, b_ref, s0_ref, o_ref, *s_ref, steps, scale):
  """Blocks: q, k [Tp, K]; v, o [Tp, bv]; a, beta [Tp]; s0 and the optional s [K, bv] fp32."""

  def load(t):
    return q_ref[t, :], k_ref[t, :], v_ref[t, :], a_ref[t], b_ref[t]

  def step(t, carry):
    (q, k, v, a, b), s = carry
    ahead = load(jnp.minimum(t + 1, steps - 1))  # see `decode_pallas`: loads run one token ahead
    o, s = delta_step(s, q.astype(_F32) * scale, k.astype(_F32), v.astype(_F32), a, b)
    o_ref[t, :] = o.astype(o_ref.dtype)
    return ahead, s

  _, s = jax.lax.fori_loop(0, steps, step, (load(0), s0_ref[...].astype(_F32)))
  if s_ref:
    s_ref[0][...] = s


@functools.partial(jax.jit,
                   static_argnames=('scale', 'with_state', 'block_v', 'num_warps', 'interpret'))
def _recurrent(q, k, v, decay, beta, s0, *, scale, with_state, block_v, num_warps, interpret):
  """(o [B, T, HV, V], the leaving state written over s0's buffer if with_state, else None)."""
  b, t, h, kd = q.shape
  hv, vd = v.shape[2:]
  grp = hv // h
  bv = min(block_v, vd)
  tp = backend.next_pow2(t)  # the Triton lowering takes power-of-two blocks
  if tp != t:  # padded steps are never run
    pad = lambda x: jnp.pad(x, ((0, 0), (0, tp - t)) + ((0, 0),) * (x.ndim - 2))
    q, k, v, decay, beta = map(pad, (q, k, v, decay, beta))
  qk_spec = pl.BlockSpec((None, tp, None, kd), lambda i, j, n: (i, 0, j // grp, 0))
  val_spec = pl.BlockSpec((None, tp, None, bv), lambda i, j, n: (i, 0, j, n))
  vec_spec = pl.BlockSpec((None, tp, None), lambda i, j, n: (i, 0, j))
  state_spec = pl.BlockSpec((None, None, kd, bv), lambda i, j, n: (i, j, 0, n))
  params = None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
  out_shape = [jax.ShapeDtypeStruct((b, tp, hv, vd), v.dtype)]
  out_specs = [val_spec]
  if with_state:
    out_shape.append(jax.ShapeDtypeStruct((b, hv, kd, vd), _F32))
    out_specs.append(state_spec)
  o, *s = pl.pallas_call(
      functools.partial(_kernel, steps=t, scale=scale),
      out_shape=out_shape, grid=(b, hv, vd // bv),
      in_specs=[qk_spec, qk_spec, val_spec, vec_spec, vec_spec, state_spec],
      out_specs=out_specs, input_output_aliases={5: 1} if with_state else {},
      compiler_params=params, interpret=interpret, name='gdr_recurrent')(
          q, k, v, decay, beta, s0)
  return o[:, :t], (s[0] if with_state else None)


def recurrent_gated_delta_rule_pallas(q, k, v, g, beta, *, scale=None, initial_state=None,
                                      segment_ids=None, output_final_state=False,
                                      block_v=BLOCK_V, num_warps=NUM_WARPS, interpret=False):
  """Same contract as `xla.recurrent_gated_delta_rule_xla` (shapes as
  `reference.naive_recurrent_gated_delta_rule`); not differentiable (decoding only). Without
  output_final_state nothing but the outputs is written (a noisy block at decode).

  Raises:
    ValueError: K or V the kernel does not take (`kernel_takes`).
  """
  why = kernel_takes(k, v)
  if why:
    raise ValueError(f'recurrent gated delta rule kernel: {why}')
  b, t, _, kd = q.shape
  hv, vd = v.shape[2:]
  starts = reference.segment_starts(segment_ids, b, t)[..., None]
  decay = jnp.where(starts, 0.0, jnp.exp(g.astype(_F32)))
  s0 = (jnp.zeros((b, hv, kd, vd), _F32) if initial_state is None
        else initial_state.astype(_F32))
  return _recurrent(q, k, v, decay, beta.astype(_F32), s0,
                    scale=float(kd ** -0.5 if scale is None else scale),
                    with_state=output_final_state, block_v=block_v, num_warps=num_warps,
                    interpret=interpret)
