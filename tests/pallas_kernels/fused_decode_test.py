"""The fused GDN decode kernel (`decode_pallas`: conv, activations, gates and the rule of a cached
pass in one kernel) against its pure-JAX contract `front.fused_decode_xla`.

CPU: interpret mode at small awkward shapes (grouped value heads, Kc = 3 and 4, a document start
inside the call, ragged valid prefixes, outputs only), fp32 and bf16. GPU: Qwen3.5-2B's GDN at
batch 8 in bf16. Both: T single-token calls chained through the leaving (window, state) equal one
T-token call bit for bit, and a call with its tail marked invalid leaves the state of the call over
the prefix alone (the rollback replay), bit for bit.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._common import testing
from pallas_kernels.gated_delta_rule import api
from pallas_kernels.gated_delta_rule import decode_pallas
from pallas_kernels.gated_delta_rule import front

_ON_GPU = jax.default_backend() == 'gpu'


def _inputs(rng, b, t, nk, hv, kd, vd, kc, dtype):
  """(x, b_in, a_in, conv_weight, a_log, dt_bias, window, state): a layer's cached-pass inputs."""
  c = 2 * nk * kd + hv * vd
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
  return (normal(b, t, c), normal(b, t, hv), normal(b, t, hv),
          jnp.asarray(0.5 * rng.standard_normal((kc, c)), dtype),
          jnp.asarray(np.log(rng.uniform(0.1, 4.0, hv)), jnp.float32),
          jnp.asarray(rng.uniform(0.5, 1.5, hv), dtype), normal(b, kc - 1, c),
          jnp.asarray(rng.standard_normal((b, hv, kd, vd)), jnp.float32))


def _call(fn, args, nk, **kw):
  x, b_in, a_in, w, a_log, dt_bias, window, state = args
  return fn(x, b_in, a_in, w, a_log, dt_bias, window=window, initial_state=state,
            num_key_heads=nk, **kw)


def _kernel(args, nk, **kw):
  return _call(decode_pallas.fused_decode_pallas, args, nk, interpret=not _ON_GPU, **kw)


def _assert_matches_reference(args, nk, tol_o, tol_s, valid=None, block_v=None, **kw):
  tiles = {} if block_v is None else dict(block_v=block_v)
  o, leaving = _kernel(args, nk, valid=valid, **tiles, **kw)
  o_ref, leaving_ref = _call(front.fused_decode_xla, args, nk, valid=valid, **kw)
  assert o.shape == o_ref.shape and o.dtype == o_ref.dtype
  if valid is not None:  # outputs at padding tokens are unspecified
    o, o_ref = (jnp.where(valid[..., None, None], a, 0) for a in (o, o_ref))
  err_o = testing.rms_ratio(o.astype(jnp.float32), o_ref.astype(jnp.float32))
  assert err_o <= tol_o, err_o
  if leaving_ref is None:
    assert leaving is None
    return err_o, None
  np.testing.assert_array_equal(np.asarray(leaving[0], np.float32),
                                np.asarray(leaving_ref[0], np.float32))  # window: copied inputs
  assert leaving[0].dtype == leaving_ref[0].dtype and leaving[1].dtype == jnp.float32
  err_s = testing.rms_ratio(leaving[1], leaving_ref[1])
  assert err_s <= tol_s, err_s
  return err_o, err_s


_CPU_CASES = [  # (b, t, nk, hv, kd, vd, kc, block_v)
    (2, 1, 1, 2, 16, 32, 4, 16),
    (2, 5, 2, 4, 16, 32, 4, 32),
    (1, 3, 1, 1, 32, 16, 3, 16),
]


@pytest.mark.parametrize('b, t, nk, hv, kd, vd, kc, block_v', _CPU_CASES)
@pytest.mark.parametrize('dtype, extras', [
    (jnp.float32, 'plain'), (jnp.bfloat16, 'plain'), (jnp.float32, 'segments+valid'),
    (jnp.bfloat16, 'outputs only')])  # 12 interpreted cases: kept few for CI's 2 cores
def test_matches_the_xla_chain(rng, b, t, nk, hv, kd, vd, kc, block_v, dtype, extras):
  if _ON_GPU:
    pytest.skip('CPU interpret-mode case (the GPU cases are below)')
  args = _inputs(rng, b, t, nk, hv, kd, vd, kc, dtype)
  kw = dict(block_v=block_v, output_final_state=extras != 'outputs only')
  if extras == 'segments+valid':  # a document starts halfway; row 0 whole, the others ragged
    kw['segment_ids'] = jnp.asarray(np.repeat([[0] * (t // 2) + [1] * (t - t // 2)], b, 0))
    lengths = np.maximum(t - np.arange(b), 1)
    kw['valid'] = jnp.asarray(np.arange(t)[None] < lengths[:, None])
  # bf16: the outputs' rounding, and q/k/v rounded after fp32 fronts that differ in the last bit
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  _assert_matches_reference(args, nk, tol, tol, **kw)


def _assert_single_tokens_equal_one_call(args, nk, output_gate=None, **kw):
  x, b_in, a_in, w, a_log, dt_bias, window, state = args
  o_all, (win_all, s_all) = _kernel(args, nk, output_gate=output_gate, **kw)
  outs = []
  for i in range(x.shape[1]):
    one = lambda a: a[:, i:i + 1]  # pylint: disable=cell-var-from-loop
    gate = None if output_gate is None else output_gate._replace(z_src=one(output_gate.z_src))
    o, (window, state) = _kernel((one(x), one(b_in), one(a_in), w, a_log, dt_bias, window, state),
                                 nk, output_gate=gate, **kw)
    outs.append(o)
  np.testing.assert_array_equal(np.asarray(jnp.concatenate(outs, 1), np.float32),
                                np.asarray(o_all, np.float32))
  np.testing.assert_array_equal(np.asarray(window, np.float32), np.asarray(win_all, np.float32))
  np.testing.assert_array_equal(np.asarray(state), np.asarray(s_all))


def _assert_invalid_tail_replays_the_prefix(args, nk, n_keep, **kw):
  """Marking tokens >= n_keep[b] invalid leaves what a call over each row's prefix leaves."""
  x, b_in, a_in, w, a_log, dt_bias, window, state = args
  t = x.shape[1]
  keep = jnp.arange(t)[None] < jnp.asarray(n_keep)[:, None]
  _, (win_r, s_r) = _kernel(args, nk, valid=keep, **kw)
  for row, n in enumerate(n_keep):
    cut = lambda a: a[row:row + 1, :n]  # pylint: disable=cell-var-from-loop
    one = lambda a: a[row:row + 1]  # pylint: disable=cell-var-from-loop
    _, (win_p, s_p) = _kernel((cut(x), cut(b_in), cut(a_in), w, a_log, dt_bias, one(window),
                               one(state)), nk, **kw)
    np.testing.assert_array_equal(np.asarray(win_r[row:row + 1], np.float32),
                                  np.asarray(win_p, np.float32))
    np.testing.assert_array_equal(np.asarray(s_r[row:row + 1]), np.asarray(s_p))


def test_single_token_calls_equal_one_call_bit_for_bit(rng):
  if _ON_GPU:
    pytest.skip('CPU interpret-mode case')
  _assert_single_tokens_equal_one_call(_inputs(rng, 2, 5, 1, 2, 16, 32, 4, jnp.bfloat16), 1,
                                       block_v=16)


def test_an_invalid_tail_replays_the_prefix_bit_for_bit(rng):
  if _ON_GPU:
    pytest.skip('CPU interpret-mode case')
  _assert_invalid_tail_replays_the_prefix(_inputs(rng, 3, 5, 1, 2, 16, 32, 4, jnp.bfloat16), 1,
                                          [1, 3, 5], block_v=16)


def test_dispatch_runs_xla_off_gpu_and_checks_shapes(rng):
  args = _inputs(rng, 2, 3, 1, 2, 16, 16, 4, jnp.float32)
  o_x, (win_x, s_x) = _call(api.fused_decode, args, 1, implementation='xla')
  o_p, (win_p, s_p) = _call(api.fused_decode, args, 1, implementation='pallas')
  if not _ON_GPU:  # the kernel needs a GPU: 'pallas' falls back to xla, the same numbers
    for a, b in ((o_p, o_x), (win_p, win_x), (s_p, s_x)):
      np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match='unknown recurrent'):
    _call(api.fused_decode, args, 1, implementation='triton')
  with pytest.raises(ValueError, match=r'x has 64 columns, fewer than C = 2 NK K \+ HV V = 96'):
    _call(api.fused_decode, args, 2)
  with pytest.raises(ValueError, match=r'b_in \(2, 3, 2\) must be .* columns \[1, 1 \+ HV=2\)'):
    _call(api.fused_decode, args, 1, b_col=1)
  bad = args[:6] + (args[6][:, :1],) + args[7:]
  with pytest.raises(ValueError, match=r'window \(2, 1, 64\) must be \(2, 3, 64\)'):
    _call(api.fused_decode, bad, 1)


def _packed(args, extra_cols: int, between=None):
  """args with x, b_in and a_in as column ranges of one buffer [B, T, C + extra + 2 HV] (as a
  merged in-projection's product: q|k|v, other columns, b, a), and those columns. The other
  columns are `between` ([B, T, extra]) or a filler that nothing reads."""
  x, b_in, a_in = args[:3]
  if between is None:
    between = jnp.full(x.shape[:2] + (extra_cols,), 7.0, x.dtype)
  merged = jnp.concatenate([x, between, b_in, a_in], axis=-1)
  b_col = x.shape[-1] + extra_cols
  return (merged,) * 3 + args[3:], dict(b_col=b_col, a_col=b_col + b_in.shape[-1])


@pytest.mark.parametrize('with_state', [True, False])
def test_inputs_read_in_place_from_one_buffer_equal_separate_inputs(rng, with_state):
  """Bit for bit, in the kernel (interpret mode on CPU) and on the xla path."""
  args = _inputs(rng, 2, 3, 1, 2, 16, 32, 4, jnp.bfloat16)
  packed, columns = _packed(args, extra_cols=40)  # not a whole number of K or V tiles
  kw = dict(output_final_state=with_state, valid=jnp.asarray([[1, 1, 1], [1, 1, 0]], bool))
  runs = [(_kernel, dict(block_v=16)),
          (lambda a, nk, **k: _call(api.fused_decode, a, nk, implementation='xla', **k), {})]
  for fn, tiles in runs:
    want = fn(args, 1, **kw, **tiles)
    got = fn(packed, 1, **kw, **columns, **tiles)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def _gate_inputs(rng, b, t, hv, vd, dtype):
  """(z [B, T, HV V], norm weight [V]) for `front.OutputGate`."""
  return (jnp.asarray(rng.standard_normal((b, t, hv * vd)), dtype),
          jnp.asarray(rng.uniform(0.5, 1.5, vd), dtype))


@pytest.mark.parametrize('block_v, z_at', [(32, 'own buffer'), (32, 'merged'),
                                           (32, 'merged, off a head'), (16, 'merged')])
def test_output_gate_matches_the_xla_chain(rng, block_v, z_at):
  """The gated norm runs in the kernel where its programs hold whole value heads (block_v = V)
  and z's columns start at a head, else in XLA after it: the xla chain's gated outputs either way,
  with z in a buffer of its own or a column range of the merged product."""
  if _ON_GPU:
    pytest.skip('CPU interpret-mode case')
  b, t, nk, hv, kd, vd, kc = 2, 3, 1, 2, 16, 32, 4
  args = _inputs(rng, b, t, nk, hv, kd, vd, kc, jnp.bfloat16)
  z, weight = _gate_inputs(rng, b, t, hv, vd, jnp.bfloat16)
  kw = dict(valid=jnp.asarray([[1, 1, 1], [1, 1, 0]], bool))
  want, (win_want, s_want) = _call(front.fused_decode_xla, args, nk,
                                   output_gate=front.OutputGate(z, weight, 1e-6), **kw)
  columns, gate = {}, front.OutputGate(z, weight, 1e-6)
  if z_at != 'own buffer':
    pad = 8 if 'off' in z_at else 0
    between = jnp.concatenate([jnp.full((b, t, pad), 7.0, z.dtype), z], axis=-1)
    z_col = args[0].shape[-1] + pad
    args, columns = _packed(args, pad + z.shape[-1], between)
    gate = front.OutputGate(args[0], weight, 1e-6, z_col)
  got, (win, s) = _kernel(args, nk, block_v=block_v, output_gate=gate, **columns, **kw)
  valid = kw['valid'][..., None, None]
  err = testing.rms_ratio(jnp.where(valid, got, 0).astype(jnp.float32),
                          jnp.where(valid, want, 0).astype(jnp.float32))
  assert err <= 1e-2, err
  np.testing.assert_array_equal(np.asarray(win, np.float32), np.asarray(win_want, np.float32))
  assert testing.rms_ratio(s, s_want) <= 1e-2


def test_whole_value_heads_for_calls_with_state():
  """Calls with the state hold whole heads where they fit; the window goes in place only when
  no two programs share a key head's q|k channels."""
  assert decode_pallas.default_block_v(16, 128, 128, with_state=True) == 128
  assert decode_pallas.default_block_v(16, 128, 128, with_state=False) == decode_pallas.BLOCK_V
  assert decode_pallas.default_block_v(16, 128, 256, with_state=True) == decode_pallas.BLOCK_V
  # 2 x 16 q|k channels are not whole 64-column tiles
  assert decode_pallas.default_block_v(1, 16, 64, with_state=True) == decode_pallas.BLOCK_V
  assert decode_pallas.window_in_place(16, 16, 128, block_v=128)
  assert not decode_pallas.window_in_place(16, 32, 128, block_v=128)  # grouped value heads
  assert not decode_pallas.window_in_place(16, 16, 128, block_v=32)  # a head over 4 programs


def test_head_sizes_the_kernel_does_not_take_are_named():
  assert 'K=60' in decode_pallas.kernel_takes(1, 60, 32)
  assert 'are not whole V tiles' in decode_pallas.kernel_takes(1, 16, 64, block_v=64)
  assert decode_pallas.kernel_takes(16, 128, 128) is None


_GPU_ARGS = (8, 16, 16, 128, 128, 4)  # Qwen3.5-2B's GDN at batch 8: nk, hv, K, V, Kc


@pytest.mark.gpu
@pytest.mark.parametrize('t, mode', [(1, 'state'), (5, 'state'), (5, 'valid'), (4, 'outputs')])
def test_gpu_decode_shapes_match_the_xla_chain(rng, t, mode):
  b, nk, hv, kd, vd, kc = _GPU_ARGS
  args = _inputs(rng, b, t, nk, hv, kd, vd, kc, jnp.bfloat16)
  kw = dict(output_final_state=mode != 'outputs')
  if mode == 'valid':
    kw['valid'] = jnp.asarray(np.arange(t)[None] < (1 + np.arange(b) % t)[:, None])
    kw['segment_ids'] = jnp.asarray(np.repeat([[0] * (t - 1) + [1]], b, 0))
  with jax.default_matmul_precision('highest'):
    err_o, err_s = _assert_matches_reference(args, nk, 2e-2, 2e-2, **kw)
  print(f'\nfused decode T={t} {mode}: relative RMS o {err_o:.2e}, state {err_s}')


@pytest.mark.gpu
@pytest.mark.parametrize('t', [1, 4])
def test_gpu_inputs_read_in_place_from_one_buffer_equal_separate_inputs(rng, t):
  """Qwen3.5-2B's merged in-projection layout: q|k|v, z (HV V columns), b, a."""
  b, nk, hv, kd, vd, kc = _GPU_ARGS
  args = _inputs(rng, b, t, nk, hv, kd, vd, kc, jnp.bfloat16)
  packed, columns = _packed(args, extra_cols=hv * vd)
  want, got = _kernel(args, nk), _kernel(packed, nk, **columns)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.gpu
@pytest.mark.parametrize('t', [1, 4])
def test_gpu_output_gate_in_the_kernel_matches_the_xla_chain(rng, t):
  """Qwen3.5-2B's merged layout (q|k|v, z, b, a): whole value heads, the gated norm applied in
  the kernel from z's columns read in place, the window written in place."""
  b, nk, hv, kd, vd, kc = _GPU_ARGS
  args = _inputs(rng, b, t, nk, hv, kd, vd, kc, jnp.bfloat16)
  z, weight = _gate_inputs(rng, b, t, hv, vd, jnp.bfloat16)
  with jax.default_matmul_precision('highest'):
    want, (win_want, s_want) = _call(front.fused_decode_xla, args, nk,
                                     output_gate=front.OutputGate(z, weight, 1e-6))
  packed, columns = _packed(args, z.shape[-1], z)
  gate = front.OutputGate(packed[0], weight, 1e-6, args[0].shape[-1])
  got, (win, s) = _kernel(packed, nk, output_gate=gate, **columns)
  err_o = testing.rms_ratio(got.astype(jnp.float32), want.astype(jnp.float32))
  err_s = testing.rms_ratio(s, s_want)
  print(f'\nfused decode + output gate T={t}: relative RMS y {err_o:.2e}, state {err_s:.2e}')
  assert err_o <= 2e-2 and err_s <= 2e-2
  np.testing.assert_array_equal(np.asarray(win, np.float32), np.asarray(win_want, np.float32))


@pytest.mark.gpu
@pytest.mark.parametrize('gated', [False, True])
def test_gpu_single_token_calls_equal_one_call_bit_for_bit(rng, gated):
  b, nk, hv, kd, vd, kc = _GPU_ARGS
  args = _inputs(rng, b, 4, nk, hv, kd, vd, kc, jnp.bfloat16)
  gate = front.OutputGate(*_gate_inputs(rng, b, 4, hv, vd, jnp.bfloat16), 1e-6) if gated else None
  _assert_single_tokens_equal_one_call(args, nk, output_gate=gate)


@pytest.mark.gpu
def test_gpu_invalid_tail_replays_the_prefix_bit_for_bit(rng):
  b, nk, hv, kd, vd, kc = _GPU_ARGS
  _assert_invalid_tail_replays_the_prefix(_inputs(rng, b, 5, nk, hv, kd, vd, kc, jnp.bfloat16),
                                          nk, [1, 2, 3, 4, 5, 5, 1, 3])
