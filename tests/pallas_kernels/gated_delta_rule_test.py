"""Gated delta rule: the oracles against a NumPy loop,
and the chunked XLA form against the oracles."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util as jtu

from pallas_kernels import gated_delta_rule as gdr
from pallas_kernels.gated_delta_rule import api
from pallas_kernels.gated_delta_rule import reference
from pallas_kernels.gated_delta_rule import xla


def _inputs(rng, b, t, h, hv, kd, vd, with_state=True):
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  q = unit(rng.standard_normal((b, t, h, kd)))
  k = unit(rng.standard_normal((b, t, h, kd)))
  v = rng.standard_normal((b, t, hv, vd))
  g = -rng.uniform(0.0, 0.6, (b, t, hv))
  beta = rng.uniform(0.0, 1.0, (b, t, hv))
  h0 = rng.standard_normal((b, hv, kd, vd)) if with_state else None
  f = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
  return tuple(map(f, (q, k, v, g, beta, h0)))


def _numpy_loop(q, k, v, g, beta, h0, seg, scale):
  """float64 token loop written independently of the library."""
  q, k, v, g, beta = (np.asarray(x, np.float64) for x in (q, k, v, g, beta))
  b, t, h, kd = q.shape
  hv, vd = v.shape[2:]
  o = np.zeros((b, t, hv, vd))
  final = np.zeros((b, hv, kd, vd))
  for i in range(b):
    for j in range(hv):
      s = np.zeros((kd, vd)) if h0 is None else np.asarray(h0, np.float64)[i, j].copy()
      kh = j // (hv // h)
      for n in range(t):
        if n > 0 and seg is not None and seg[i, n] != seg[i, n - 1]:
          s = np.zeros((kd, vd))
        s = np.exp(g[i, n, j]) * s
        d = beta[i, n, j] * (v[i, n, j] - s.T @ k[i, n, kh])
        s = s + np.outer(k[i, n, kh], d)
        o[i, n, j] = scale * s.T @ q[i, n, kh]
      final[i, j] = s
  return o, final


def _segments(b, t, cuts):
  seg = np.zeros((b, t), np.int32)
  for c in cuts:
    seg[:, c:] += 1
  return jnp.asarray(seg)


@pytest.mark.parametrize('fn', [reference.naive_recurrent_gated_delta_rule,
                                xla.recurrent_gated_delta_rule_xla], ids=['oracle', 'decode_loop'])
def test_recurrent_forms_match_numpy_loop(rng, fn):
  """The token-loop oracle and the decode loop (state read twice per step) against the float64
  loop: GQA, resets."""
  q, k, v, g, beta, h0 = _inputs(rng, 2, 13, 2, 4, 5, 3)
  seg = _segments(2, 13, [4, 5])
  o, s = fn(q, k, v, g, beta, scale=0.7, initial_state=h0, segment_ids=seg,
            output_final_state=True)
  ref_o, ref_s = _numpy_loop(q, k, v, g, beta, h0, np.asarray(seg), 0.7)
  np.testing.assert_allclose(o, ref_o, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(s, ref_s, atol=1e-5, rtol=1e-5)


CASES = [  # (t, h, hv, kd, vd, chunk, document cuts)
    (63, 1, 1, 16, 16, 64, []),
    (100, 2, 4, 60, 24, 64, [37]),
    (257, 1, 2, 8, 12, 64, [64, 65, 128, 200]),  # reset at a chunk start, one-token document
    (40, 2, 2, 6, 6, 16, [16, 17, 33]),
]
IDS = ['t63', 't100_gva_k60', 't257_resets', 'chunk16']


@pytest.mark.parametrize('t, h, hv, kd, vd, chunk, cuts', CASES, ids=IDS)
@pytest.mark.parametrize('with_state', [True, False], ids=['h0', 'no_h0'])
def test_chunked_matches_recurrent_outputs_state_and_gradients(rng, t, h, hv, kd, vd, chunk, cuts,
                                                               with_state):
  q, k, v, g, beta, h0 = _inputs(rng, 2, t, h, hv, kd, vd, with_state)
  seg = _segments(2, t, cuts)
  kw = dict(segment_ids=seg, output_final_state=True)

  def run(fn, q, k, v, g, beta, h0):
    return fn(q, k, v, g, beta, initial_state=h0, **kw)

  chunked = functools.partial(xla.chunk_gated_delta_rule_xla, chunk_size=chunk)
  args = (q, k, v, g, beta, h0)
  # Jitted: one compile each (a case took 21 s op by op on 2 cores, 4 s jitted).
  (o_ref, s_ref), vjp_ref = jax.vjp(
      jax.jit(functools.partial(run, reference.naive_recurrent_gated_delta_rule)), *args)
  (o, s), vjp = jax.vjp(jax.jit(functools.partial(run, chunked)), *args)
  np.testing.assert_allclose(o, o_ref, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(s, s_ref, atol=2e-5, rtol=1e-4)
  cot = (jnp.asarray(rng.standard_normal(o.shape), jnp.float32),
         jnp.asarray(rng.standard_normal(s.shape), jnp.float32))
  names = ('dq', 'dk', 'dv', 'dg', 'dbeta', 'dh0')
  for name, a, b in zip(names, vjp(cot), vjp_ref(cot)):
    if b is None:
      continue
    np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4, err_msg=name)


def test_naive_chunk_oracle_matches_recurrent(rng):
  q, k, v, g, beta, h0 = _inputs(rng, 1, 70, 1, 2, 8, 4)
  o1, s1 = reference.naive_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0,
                                                  output_final_state=True, chunk_size=32)
  o2, s2 = reference.naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0,
                                                      output_final_state=True)
  np.testing.assert_allclose(o1, o2, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(s1, s2, atol=2e-5, rtol=1e-4)


def test_packed_documents_equal_separate_runs_and_initial_state_seeds_only_the_first(rng):
  q, k, v, g, beta, h0 = _inputs(rng, 1, 90, 1, 1, 8, 8)
  cut = 41
  seg = _segments(1, 90, [cut])
  run = jax.jit(gdr.chunk_gated_delta_rule)  # one compile, not an op-by-op run
  packed, _ = run(q, k, v, g, beta, initial_state=h0, segment_ids=seg)
  first, _ = run(*(x[:, :cut] for x in (q, k, v, g, beta)), initial_state=h0)
  second, _ = run(*(x[:, cut:] for x in (q, k, v, g, beta)))
  np.testing.assert_allclose(packed[:, :cut], first, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(packed[:, cut:], second, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_decode_recurrence_split_into_single_tokens_is_bit_identical(rng, dtype):
  """T one-token calls chained through the state == one T-token call, bit for bit (jitted, as
  the sampler runs them): a verify pass reproduces AR's steps exactly."""
  q, k, v, g, beta, h0 = _inputs(rng, 2, 5, 2, 4, 8, 8)
  q, k, v = (x.astype(dtype) for x in (q, k, v))
  run = jax.jit(functools.partial(xla.recurrent_gated_delta_rule_xla, output_final_state=True))
  o_all, s_all = run(q, k, v, g, beta, initial_state=h0)
  s, outs = h0, []
  for i in range(5):
    o, s = run(*(x[:, i:i + 1] for x in (q, k, v, g, beta)), initial_state=s)
    outs.append(o)
  np.testing.assert_array_equal(np.asarray(jnp.concatenate(outs, 1), np.float32),
                                np.asarray(o_all, np.float32))
  np.testing.assert_array_equal(np.asarray(s), np.asarray(s_all))


@pytest.mark.parametrize('t, cuts', [(1, []), (4, []), (7, [3]), (16, [0, 5, 6])])
def test_block_form_matches_numpy_loop(rng, t, cuts):
  """The noisy decode block's form: outputs only, from an initial state, with GVA and resets."""
  q, k, v, g, beta, h0 = _inputs(rng, 2, t, 2, 4, 8, 6)
  seg = _segments(2, t, cuts) if cuts else None
  o = jax.jit(gdr.block_gated_delta_rule)(q, k, v, g, beta, initial_state=h0, segment_ids=seg)
  want, _ = _numpy_loop(q, k, v, g, beta, h0, None if seg is None else np.asarray(seg), 8 ** -0.5)
  assert o.shape == v.shape
  np.testing.assert_allclose(o, want, atol=2e-5, rtol=2e-5)


def test_identity_steps_leave_the_state_unchanged(rng):
  q, k, v, g, beta, h0 = _inputs(rng, 1, 10, 1, 1, 4, 4)
  zero = jnp.zeros_like(g)
  for fn in (gdr.chunk_gated_delta_rule, gdr.recurrent_gated_delta_rule):
    _, s = jax.jit(fn, static_argnames='output_final_state')(
        q, k, v, zero, zero, initial_state=h0, output_final_state=True)
    np.testing.assert_allclose(s, h0, atol=1e-6)


def test_fwd_h_exposes_chunk_checkpoints(rng):
  q, k, v, g, beta, h0 = _inputs(rng, 1, 80, 1, 1, 4, 4)
  fwd_h = jax.jit(xla.chunk_gated_delta_rule_fwd_h, static_argnames='chunk_size')
  h, v_new, final = fwd_h(q, k, v, g, beta, initial_state=h0, chunk_size=32)
  assert h.shape == (1, 3, 1, 4, 4) and v_new.shape == (1, 80, 1, 4)
  np.testing.assert_allclose(h[:, 0], h0, atol=1e-6)
  # The state entering chunk 1 is the recurrent state after the first 32 tokens.
  _, s32 = reference.naive_recurrent_gated_delta_rule(*(x[:, :32] for x in (q, k, v, g, beta)),
                                                      initial_state=h0, output_final_state=True)
  np.testing.assert_allclose(h[:, 1], s32, atol=2e-5, rtol=1e-4)
  _, s = reference.naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0,
                                                    output_final_state=True)
  np.testing.assert_allclose(final, s, atol=2e-5, rtol=1e-4)


def test_reference_gradients_pass_numerical_check(rng):
  q, k, v, g, beta, h0 = _inputs(rng, 1, 5, 1, 1, 3, 2)
  fn = lambda q, k, v, g, beta, h0: reference.naive_recurrent_gated_delta_rule(
      q, k, v, g, beta, initial_state=h0, output_final_state=True)
  # The oracle computes in fp32, so central differences need a coarse step and tolerance.
  jtu.check_grads(fn, (q, k, v, g, beta, h0), order=1, modes=['rev'], eps=1e-2, atol=2e-2,
                  rtol=2e-2)


def test_bad_arguments_raise():
  x = jnp.zeros((1, 4, 2, 8))
  v = jnp.zeros((1, 4, 3, 8))
  gv = jnp.zeros((1, 4, 3))
  with pytest.raises(ValueError, match='HV=3 is not a multiple of H=2'):
    gdr.chunk_gated_delta_rule(x, x, v, gv, gv)
  with pytest.raises(ValueError, match='unknown gated delta rule implementation'):
    gdr.chunk_gated_delta_rule(x, x, jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 4, 2)),
                               jnp.zeros((1, 4, 2)), implementation='cuda')
  with pytest.raises(ValueError, match='initial_state'):
    gdr.chunk_gated_delta_rule(x, x, jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 4, 2)),
                               jnp.zeros((1, 4, 2)), initial_state=jnp.zeros((1, 2, 8, 7)))


def test_kernel_choice_falls_back_to_xla_off_gpu(rng):
  """On CPU a requested kernel family runs the XLA path (logged), with identical results."""
  b, t, h, kd, vd = 1, 40, 2, 16, 16
  q, k = (jnp.asarray(rng.standard_normal((b, t, h, kd)), jnp.float32) for _ in range(2))
  q, k = (q / jnp.linalg.norm(q, axis=-1, keepdims=True),
          k / jnp.linalg.norm(k, axis=-1, keepdims=True))
  v = jnp.asarray(rng.standard_normal((b, t, h, vd)), jnp.float32)
  g = -jnp.asarray(rng.uniform(0.01, 0.5, (b, t, h)), jnp.float32)
  beta = jnp.asarray(rng.uniform(0.1, 0.9, (b, t, h)), jnp.float32)
  want, _ = api.chunk_gated_delta_rule(q, k, v, g, beta, implementation='xla')
  for impl in ('pallas', 'triton', None):
    got, _ = api.chunk_gated_delta_rule(q, k, v, g, beta, implementation=impl)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  with pytest.raises(ValueError, match='unknown gated delta rule implementation'):
    api.chunk_gated_delta_rule(q, k, v, g, beta, implementation='cuda')
