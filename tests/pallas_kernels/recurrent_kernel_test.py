"""The decode recurrence kernel (`recurrent_pallas`) against the token-loop oracle.

CPU: interpret mode at small awkward shapes (T = 1, 3, 16; grouped value heads; a document start
inside the call; no initial state), fp32 and bf16 inputs. GPU: the decode shapes of Qwen3.5-2B
(8 rows, 16 heads, K = V = 128, bf16 inputs). Both: T single-token calls equal one T-token call
bit for bit (the AR step, the verify pass and the rollback replay all run this kernel); without the
leaving state (noisy blocks) the outputs are the same; the dispatch picks it by `implementation`.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._common import testing
from pallas_kernels.gated_delta_rule import api
from pallas_kernels.gated_delta_rule import recurrent_pallas
from pallas_kernels.gated_delta_rule import reference

_ON_GPU = jax.default_backend() == 'gpu'


def _inputs(rng, b, t, h, hv, kd, vd, dtype):
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  q = jnp.asarray(unit(rng.standard_normal((b, t, h, kd))), dtype)
  k = jnp.asarray(unit(rng.standard_normal((b, t, h, kd))), dtype)
  v = jnp.asarray(rng.standard_normal((b, t, hv, vd)), dtype)
  g = jnp.asarray(-rng.uniform(0.05, 0.7, (b, t, hv)), jnp.float32)
  beta = jnp.asarray(rng.uniform(0.0, 1.0, (b, t, hv)), jnp.float32)
  h0 = jnp.asarray(rng.standard_normal((b, hv, kd, vd)), jnp.float32)
  return q, k, v, g, beta, h0


def _kernel(*args, output_final_state=True, **kw):
  return recurrent_pallas.recurrent_gated_delta_rule_pallas(
      *args, output_final_state=output_final_state, interpret=not _ON_GPU, **kw)


_CPU_SHAPES = [  # (b, t, h, hv, kd, vd, block_v)
    (2, 1, 1, 2, 16, 32, 16),
    (2, 3, 2, 4, 32, 64, 32),
    (1, 16, 1, 1, 16, 16, 32),
]


@pytest.mark.parametrize('b, t, h, hv, kd, vd, block_v', _CPU_SHAPES)
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('with_state, with_segments', [(True, True), (False, False)])
def test_matches_the_token_loop_oracle(rng, b, t, h, hv, kd, vd, block_v, dtype, with_state,
                                       with_segments):
  if _ON_GPU:
    pytest.skip('CPU interpret-mode case (the GPU cases are below)')
  q, k, v, g, beta, h0 = _inputs(rng, b, t, h, hv, kd, vd, dtype)
  h0 = h0 if with_state else None
  seg = None
  if with_segments:  # a document starts halfway (t // 2 = 0: at the first token, not a reset)
    seg = jnp.asarray(np.repeat([[0] * (t // 2) + [1] * (t - t // 2)], b, 0))
  o, s = _kernel(q, k, v, g, beta, initial_state=h0, segment_ids=seg, block_v=block_v)
  o_ref, s_ref = reference.naive_recurrent_gated_delta_rule(
      q, k, v, g, beta, initial_state=h0, segment_ids=seg, output_final_state=True)
  assert o.shape == o_ref.shape and o.dtype == v.dtype and s.dtype == jnp.float32
  tol = 1e-5 if dtype == jnp.float32 else 1e-2  # bf16: the output's rounding
  testing.assert_close('o', o.astype(jnp.float32), o_ref.astype(jnp.float32), tol)
  testing.assert_close('final state', s, s_ref, 1e-5)


def _assert_single_steps_equal_one_call(q, k, v, g, beta, h0, **kw):
  o_all, s_all = _kernel(q, k, v, g, beta, initial_state=h0, **kw)
  s, outs = h0, []
  for i in range(q.shape[1]):
    one = lambda x: x[:, i:i + 1]  # pylint: disable=cell-var-from-loop
    o, s = _kernel(one(q), one(k), one(v), one(g), one(beta), initial_state=s, **kw)
    outs.append(o)
  np.testing.assert_array_equal(np.asarray(jnp.concatenate(outs, 1), np.float32),
                                np.asarray(o_all, np.float32))
  np.testing.assert_array_equal(np.asarray(s), np.asarray(s_all))


def test_single_token_calls_equal_one_call_bit_for_bit(rng):
  if _ON_GPU:
    pytest.skip('CPU interpret-mode case')
  _assert_single_steps_equal_one_call(*_inputs(rng, 2, 5, 1, 2, 16, 32, jnp.bfloat16),
                                      block_v=16)


def _assert_outputs_alone_equal_outputs_with_state(q, k, v, g, beta, h0, **kw):
  """Without output_final_state (a noisy block) the kernel writes the same outputs and no state."""
  o, s = _kernel(q, k, v, g, beta, initial_state=h0, output_final_state=False, **kw)
  assert s is None
  np.testing.assert_array_equal(np.asarray(o, np.float32),
                                np.asarray(_kernel(q, k, v, g, beta, initial_state=h0, **kw)[0],
                                           np.float32))


def test_outputs_alone_equal_outputs_with_state(rng):
  if _ON_GPU:
    pytest.skip('CPU interpret-mode case')
  _assert_outputs_alone_equal_outputs_with_state(*_inputs(rng, 2, 4, 1, 2, 16, 32, jnp.float32),
                                                 block_v=16)


def test_dispatch_runs_xla_off_gpu_and_rejects_unknown_names(rng):
  args = _inputs(rng, 1, 2, 1, 1, 16, 16, jnp.float32)
  kw = dict(initial_state=args[-1], output_final_state=True)
  o_x, s_x = api.recurrent_gated_delta_rule(*args[:-1], implementation='xla', **kw)
  o_p, s_p = api.recurrent_gated_delta_rule(*args[:-1], implementation='pallas', **kw)
  if not _ON_GPU:  # the kernel needs a GPU: 'pallas' falls back to xla, the same numbers
    np.testing.assert_array_equal(o_p, o_x)
    np.testing.assert_array_equal(s_p, s_x)
  with pytest.raises(ValueError, match='unknown recurrent'):
    api.recurrent_gated_delta_rule(*args[:-1], implementation='triton', **kw)
  # A noisy block: the kernel's token loop or XLA's block-parallel form, the same outputs.
  o_b = {impl: api.block_gated_delta_rule(*args[:-1], initial_state=args[-1], implementation=impl)
         for impl in ('xla', 'pallas')}
  testing.assert_close('block outputs', o_b['pallas'], o_b['xla'], 1e-5)
  testing.assert_close('block outputs', o_b['xla'], o_x, 1e-5)


def test_shapes_the_kernel_does_not_take_are_named():
  k = jnp.zeros((1, 1, 1, 60))
  assert 'K=60' in recurrent_pallas.kernel_takes(k, jnp.zeros((1, 1, 1, 32)))
  assert recurrent_pallas.kernel_takes(jnp.zeros((1, 1, 1, 128)), jnp.zeros((1, 1, 1, 128))) is None
  with pytest.raises(ValueError, match='K=60'):
    recurrent_pallas.recurrent_gated_delta_rule_pallas(k, k, jnp.zeros((1, 1, 1, 32)),
                                                       jnp.zeros((1, 1, 1)), jnp.zeros((1, 1, 1)))


@pytest.mark.gpu
@pytest.mark.parametrize('t', [1, 4, 5])
def test_gpu_decode_shapes_match_the_oracle(rng, t):
  """Qwen3.5-2B's GDN at batch 8, bf16 inputs, against the fp32 oracle at HIGHEST precision."""
  q, k, v, g, beta, h0 = _inputs(rng, 8, t, 16, 16, 128, 128, jnp.bfloat16)
  seg = jnp.asarray(np.repeat([[0] * (t - 1) + [1]], 8, 0))  # a document starts at the last token
  o, s = _kernel(q, k, v, g, beta, initial_state=h0, segment_ids=seg)
  with jax.default_matmul_precision('highest'):
    o_ref, s_ref = reference.naive_recurrent_gated_delta_rule(
        *(x.astype(jnp.float32) for x in (q, k, v)), g, beta, initial_state=h0,
        segment_ids=seg, output_final_state=True)
  err_o = testing.rms_ratio(o.astype(jnp.float32), o_ref)
  err_s = testing.rms_ratio(s, s_ref)
  print(f'\nrecurrent kernel T={t}: relative RMS o {err_o:.2e}, state {err_s:.2e}')
  assert err_o < 5e-3 and err_s < 1e-5


@pytest.mark.gpu
def test_gpu_single_token_calls_equal_one_call_bit_for_bit(rng):
  _assert_single_steps_equal_one_call(*_inputs(rng, 8, 4, 16, 16, 128, 128, jnp.bfloat16))


@pytest.mark.gpu
def test_gpu_outputs_alone_equal_outputs_with_state(rng):
  _assert_outputs_alone_equal_outputs_with_state(*_inputs(rng, 8, 4, 16, 16, 128, 128,
                                                          jnp.bfloat16))
