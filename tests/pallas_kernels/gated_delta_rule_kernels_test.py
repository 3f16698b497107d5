"""Gated delta rule kernels (Pallas, jax-triton) against the pure-JAX oracles.

CPU: both families in interpret mode (Pallas's, and Triton's interpreter for the jax-triton
kernels) at small awkward shapes (T = 63, 100, 257; K = 60; GVA; documents starting inside chunks
and at chunk starts), fp32, against the token-loop oracle: outputs, final state and every gradient
(dq, dk, dv, dg, dbeta, d initial state).
GPU: both families at the benchmark shapes in bf16 against an fp32 reference, with fla's
relative-RMS limits; and an fp32 awkward-shape case with document resets (Triton 3.6 miscompiles
some gated backward kernels on Hopper, fla #640: the gradients must be checked on the device).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._common import testing
from pallas_kernels.gated_delta_rule import api
from pallas_kernels.gated_delta_rule import configs
from pallas_kernels.gated_delta_rule import pallas
from pallas_kernels.gated_delta_rule import reference
from pallas_kernels.gated_delta_rule import triton as gdr_triton
from pallas_kernels.gated_delta_rule import xla

GRAD_NAMES = ('dq', 'dk', 'dv', 'dg', 'dbeta', 'dh0')


def _inputs(rng, b, t, h, hv, kd, vd, *, with_state=True, dtype=jnp.float32):
  """q, k unit-norm; g log-sigmoid-like in [-0.7, -0.05]; beta in (0, 1); optional h0 (fp32)."""
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  q = unit(rng.standard_normal((b, t, h, kd)))
  k = unit(rng.standard_normal((b, t, h, kd)))
  v = rng.standard_normal((b, t, hv, vd))
  g = -rng.uniform(0.05, 0.7, (b, t, hv))
  beta = rng.uniform(0.0, 1.0, (b, t, hv))
  h0 = rng.standard_normal((b, hv, kd, vd)) if with_state else None
  cast = lambda x, dt: None if x is None else jnp.asarray(x, dt)
  return (cast(q, dtype), cast(k, dtype), cast(v, dtype), cast(g, jnp.float32),
          cast(beta, jnp.float32), cast(h0, jnp.float32))


def _segments(b, t, cuts):
  seg = np.zeros((b, t), np.int32)
  for c in cuts:
    seg[:, c:] += 1
  return jnp.asarray(seg)


def _vjp(fn, args, seg, seed):
  """(o, final state) and (dq, dk, dv, dg, dbeta, dh0) for random cotangents of both outputs (the
  same values, up to dtype rounding, for every implementation given the same seed)."""
  def run(q, k, v, g, beta, h0):
    return fn(q, k, v, g, beta, initial_state=h0, segment_ids=seg, output_final_state=True)

  outs, vjp = jax.vjp(run, *args)
  keys = jax.random.split(jax.random.key(seed), len(outs))
  cot = tuple(jax.random.normal(key, x.shape, jnp.float32).astype(x.dtype)
              for key, x in zip(keys, outs))
  return outs, vjp(cot)


CASES = [  # (b, t, h, hv, kd, vd, chunk, document cuts, with initial state)
    (1, 63, 1, 1, 16, 16, 64, [], True),
    (2, 100, 2, 4, 60, 24, 64, [37], True),  # K = 60, GVA, a document starting mid-chunk
    (1, 257, 1, 2, 8, 12, 64, [64, 65, 128, 200], False),  # resets at chunk starts, 1-token doc
    (1, 40, 2, 2, 6, 6, 16, [16, 17, 33], True),
    (1, 70, 1, 1, 20, 8, 32, [5, 40], True),
    (1, 130, 1, 1, 16, 100, 64, [70], True),  # V padded to 128: the Triton backward's 2 V tiles
]
IDS = ['t63', 't100_k60_gva_reset', 't257_resets_no_h0', 'chunk16', 'chunk32', 'v100']


INTERPRETED = {
    'pallas': pallas.chunk_gated_delta_rule_pallas,
    # Triton's interpreter needs torch; tests/conftest.py sets TRITON_INTERPRET=1 off GPU.
    'triton': gdr_triton.chunk_gated_delta_rule_triton,
}


@pytest.mark.parametrize('impl', sorted(INTERPRETED))
@pytest.mark.parametrize('b, t, h, hv, kd, vd, chunk, cuts, with_state', CASES, ids=IDS)
def test_interpret_matches_recurrent_oracle(rng, impl, b, t, h, hv, kd, vd, chunk, cuts,
                                            with_state):
  if impl == 'triton':
    pytest.importorskip('triton')
    pytest.importorskip('torch')
  args = _inputs(rng, b, t, h, hv, kd, vd, with_state=with_state)
  seg = _segments(b, t, cuts) if cuts else None
  kern = functools.partial(INTERPRETED[impl], chunk_size=chunk, interpret=True)
  (o, s), grads = _vjp(kern, args, seg, 1)
  (o_ref, s_ref), grads_ref = _vjp(reference.naive_recurrent_gated_delta_rule, args, seg,
                                   1)
  np.testing.assert_allclose(o, o_ref, atol=2e-5, rtol=1e-4, err_msg='o')
  np.testing.assert_allclose(s, s_ref, atol=2e-5, rtol=1e-4, err_msg='final state')
  for name, a, b in zip(GRAD_NAMES, grads, grads_ref):
    if b is None:  # no initial state
      assert a is None, name
      continue
    np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4, err_msg=name)


@pytest.fixture
def ampere_launch(monkeypatch, request):
  """Every Triton-family kernel at the Ampere / Ada defaults, whatever the device: the per-chunk
  backward's two V-tile walks (`BlockSizes.split_bwd_v_pass`) over 16-column V tiles."""
  ampere = configs.BlockSizes.get_default(128, 'NVIDIA A100-SXM4-80GB', 'triton', jnp.bfloat16)
  assert ampere.split_bwd_v_pass and ampere.bv_bwd == 16
  monkeypatch.setattr(configs, 'block_sizes_for', lambda *_, **__: ampere)
  jax.clear_caches()  # launches are read at trace time: no cached trace with other sizes
  request.addfinalizer(jax.clear_caches)


@pytest.mark.parametrize('case', ['t100_k60_gva_reset', 'v100'])
def test_triton_ampere_launch_matches_recurrent_oracle(rng, ampere_launch, case):
  """The Triton family at its Ampere / Ada launch (`ampere_launch`), in Triton's interpreter."""
  del ampere_launch
  pytest.importorskip('triton')
  pytest.importorskip('torch')
  b, t, h, hv, kd, vd, chunk, cuts, with_state = CASES[IDS.index(case)]
  args = _inputs(rng, b, t, h, hv, kd, vd, with_state=with_state)
  seg = _segments(b, t, cuts)
  kern = functools.partial(gdr_triton.chunk_gated_delta_rule_triton, chunk_size=chunk,
                           interpret=True)
  (o, s), grads = _vjp(kern, args, seg, 1)
  (o_ref, s_ref), grads_ref = _vjp(reference.naive_recurrent_gated_delta_rule, args, seg, 1)
  np.testing.assert_allclose(o, o_ref, atol=2e-5, rtol=1e-4, err_msg='o')
  np.testing.assert_allclose(s, s_ref, atol=2e-5, rtol=1e-4, err_msg='final state')
  for name, a, b_ in zip(GRAD_NAMES, grads, grads_ref):
    np.testing.assert_allclose(a, b_, atol=5e-5, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize('impl', sorted(INTERPRETED))
@pytest.mark.parametrize('b, t, h, hv, kd, vd, chunk, cuts', [
    (2, 100, 2, 4, 60, 24, 64, [37]),  # K = 60, GVA, a document starting mid-chunk
    (1, 257, 1, 2, 8, 12, 64, [64, 65, 128, 200]),  # resets at chunk starts, a 1-token document
    (1, 40, 2, 2, 6, 6, 16, [16, 17, 33])], ids=['t100_k60_gva_reset', 't257_resets', 'chunk16'])
def test_chunk_checkpoints_match_xla(rng, impl, b, t, h, hv, kd, vd, chunk, cuts):
  """The two-stream forwards' clean pass (api.chunk_checkpoints with a kernel family): chunk
  states entering each chunk and corrected values equal XLA's, in the interpreters."""
  if impl == 'triton':
    pytest.importorskip('triton')
    pytest.importorskip('torch')
  _, k, v, g, beta, _ = _inputs(rng, b, t, h, hv, kd, vd, with_state=False)
  seg = _segments(b, t, cuts)
  h_ref, v_ref, _ = xla.chunk_gated_delta_rule_fwd_h(k, k, v, g, beta, segment_ids=seg,
                                                     chunk_size=chunk)
  assert api.kernels_take(impl, k, v, chunk, interpret=True)
  run = functools.partial(api.chunk_checkpoints, segment_ids=seg, chunk_size=chunk, family=impl,
                          interpret=True)
  traced = str(jax.make_jaxpr(run)(k, v, g, beta))
  assert ('pallas_call' if impl == 'pallas' else 'callback') in traced, 'kernels not used'
  h_got, v_got = jax.jit(run)(k, v, g, beta)
  assert h_got.shape == h_ref.shape == (b, -(-t // chunk), hv, kd, vd)
  assert v_got.shape == v_ref.shape and h_got.dtype == v_got.dtype == jnp.float32
  np.testing.assert_allclose(h_got, h_ref, atol=2e-5, rtol=1e-4, err_msg='h')
  np.testing.assert_allclose(v_got, v_ref, atol=2e-5, rtol=1e-4, err_msg='v_new')
  # Gradients for random cotangents of both checkpoints (triton: the backward kernels with the
  # checkpoints' cotangents entering the backward state pass).
  xla_fn = lambda *x: xla.chunk_gated_delta_rule_fwd_h(x[0], *x, segment_ids=seg,
                                                       chunk_size=chunk)[:2]
  cots = (jax.random.normal(jax.random.key(3), h_ref.shape),
          jax.random.normal(jax.random.key(4), v_ref.shape))
  pullback = lambda fn: jax.jit(lambda *x: jax.vjp(fn, *x)[1](cots))
  grads = pullback(run)(k, v, g, beta)
  grads_ref = pullback(xla_fn)(k, v, g, beta)
  for name, a, b_ in zip(('dk', 'dv', 'dg', 'dbeta'), grads, grads_ref):
    np.testing.assert_allclose(a, b_, atol=1e-4, rtol=1e-4, err_msg=name)


def test_triton_output_and_checkpoints_equal_the_separate_passes(rng):
  """api.chunk_output_and_checkpoints (one Triton pass for the two-stream clean stream's output
  and its checkpoints) against the XLA output and checkpoints, values and gradients for random
  cotangents of all three, in Triton's interpreter; resets, GVA, K and V padded."""
  pytest.importorskip('triton')
  pytest.importorskip('torch')
  b, t, h, hv, kd, vd, chunk = 2, 100, 1, 2, 20, 24, 32
  q, k, v, g, beta, _ = _inputs(rng, b, t, h, hv, kd, vd, with_state=False)
  seg = _segments(b, t, [37, 64])
  scale = kd ** -0.5
  run = lambda *x: api.chunk_output_and_checkpoints(*x, scale=scale, segment_ids=seg,
                                                    chunk_size=chunk, interpret=True)

  def separate(*x):
    o, _ = xla.chunk_gated_delta_rule_xla(*x, scale=scale, segment_ids=seg, chunk_size=chunk)
    return (o,) + xla.chunk_gated_delta_rule_fwd_h(*x[1:2], *x[1:], segment_ids=seg,
                                                   chunk_size=chunk)[:2]

  args = (q, k, v, g, beta)
  got, want = jax.jit(run)(*args), separate(*args)
  for name, a, w in zip(('o', 'h', 'v_new'), got, want):
    assert a.shape == w.shape, name
    np.testing.assert_allclose(a, w, atol=2e-5, rtol=1e-4, err_msg=name)
  assert got[0].dtype == v.dtype and got[1].dtype == got[2].dtype == jnp.float32
  cots = tuple(jax.random.normal(jax.random.key(i), w.shape) for i, w in enumerate(want))
  pullback = lambda fn: jax.jit(lambda *x: jax.vjp(fn, *x)[1](cots))
  for name, a, w in zip(GRAD_NAMES, pullback(run)(*args), pullback(separate)(*args)):
    np.testing.assert_allclose(a, w, atol=1e-4, rtol=1e-4, err_msg=name)
  with pytest.raises(ValueError, match='do not take'):
    api.chunk_output_and_checkpoints(*args, scale=scale, chunk_size=8, interpret=True)


def test_chunk_checkpoints_fall_back_where_kernels_cannot_take_the_inputs(rng):
  """A chunk size the kernels do not take, and 16-bit inputs in Triton's interpreter, run XLA."""
  _, k, v, g, beta, _ = _inputs(rng, 1, 40, 1, 1, 8, 8, with_state=False)
  assert not api.kernels_take('pallas', k, v, 8, interpret=True)
  assert not api.kernels_take('triton', k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), 64,
                              interpret=True)
  assert api.kernels_take('pallas', k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), 64,
                          interpret=True)
  h_ref, v_ref, _ = xla.chunk_gated_delta_rule_fwd_h(k, k, v, g, beta, chunk_size=8)
  h_got, v_got = api.chunk_checkpoints(k, v, g, beta, chunk_size=8, family='pallas',
                                       interpret=True)
  np.testing.assert_array_equal(h_got, h_ref)
  np.testing.assert_array_equal(v_got, v_ref)


def test_pallas_interpret_bf16_within_fla_limits(rng):
  """bf16 inputs (16-bit dots, bf16 intermediates) against the fp32 oracle."""
  args32 = _inputs(rng, 1, 128, 1, 2, 32, 32)
  args16 = tuple(x.astype(jnp.bfloat16) if i < 3 else x for i, x in enumerate(args32))
  seg = _segments(1, 128, [50])
  kern = functools.partial(pallas.chunk_gated_delta_rule_pallas, interpret=True)
  (o, s), grads = _vjp(kern, args16, seg, 2)
  (o_ref, s_ref), grads_ref = _vjp(reference.naive_recurrent_gated_delta_rule, args32, seg,
                                   2)
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  testing.assert_close('o', o, o_ref, 5e-3)
  testing.assert_close('final state', s, s_ref, 5e-3)
  limits = (8e-3, 8e-3, 8e-3, 2e-2, 2e-2, 8e-3)
  for name, a, b, lim in zip(GRAD_NAMES, grads, grads_ref, limits):
    testing.assert_close(name, a, b, lim)


def test_segment_masks_for_documents_starting_anywhere():
  seg = jnp.asarray([[7, 7, 7, 3, 3, 3, 3, 9]], jnp.int32)  # starts at 3 and 7; chunk 4, T 8 -> 12
  num, carry, writes = configs.segment_masks(seg, 12, 4)
  np.testing.assert_array_equal(num, [[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2]])
  # chunk 0 carries segment 0 (t < 3); chunk 1 (t 4..7) carries segment 1 until t = 7 starts
  # segment 2; chunk 2 (padding) continues segment 2.
  np.testing.assert_array_equal(carry, [[1, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1]])
  np.testing.assert_array_equal(writes, [[0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 1, 1]])


def test_bad_arguments_raise_value_errors():
  x = jnp.zeros((1, 8, 1, 8))
  gb = jnp.zeros((1, 8, 1))
  with pytest.raises(ValueError, match='chunk_size=48'):
    pallas.chunk_gated_delta_rule_pallas(x, x, x, gb, gb, chunk_size=48, interpret=True)
  big = jnp.zeros((1, 8, 1, 512))
  with pytest.raises(ValueError, match='K=512'):
    pallas.chunk_gated_delta_rule_pallas(big, big, x, gb, gb, interpret=True)
  with pytest.raises(ValueError, match='dtype'):
    pallas.chunk_gated_delta_rule_pallas(x.astype(jnp.int32), x.astype(jnp.int32),
                                         x.astype(jnp.int32), gb, gb, interpret=True)
  if jax.default_backend() != 'gpu':
    with pytest.raises(ValueError, match='GPU'):
      gdr_triton.chunk_gated_delta_rule_triton(x, x, x, gb, gb)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------
IMPLS = {
    'pallas': pallas.chunk_gated_delta_rule_pallas,
    'triton': gdr_triton.chunk_gated_delta_rule_triton,
}
LIMITS = {'o': 5e-3, 'final state': 5e-3, 'dq': 8e-3, 'dk': 8e-3, 'dv': 8e-3, 'dg': 2e-2,
          'dbeta': 2e-2, 'dh0': 8e-3}


def _fp32_reference(args, seg, seed):
  """The chunked XLA form at HIGHEST matmul precision (the token loop's autodiff would need the
  state of every step: 64 GB at B4 T16384)."""
  with jax.default_matmul_precision('highest'):
    f = jax.jit(lambda *a: _vjp(xla.chunk_gated_delta_rule_xla, a, seg, seed))
    return f(*args)


@pytest.mark.gpu
@pytest.mark.parametrize('impl', sorted(IMPLS))
@pytest.mark.parametrize('b, t', [(1, 4096), (8, 4096), (4, 16384)], ids=['b1t4k', 'b8t4k',
                                                                          'b4t16k'])
def test_gpu_bf16_benchmark_shapes_within_fla_limits(impl, b, t):
  rng = np.random.default_rng(0)
  args32 = _inputs(rng, b, t, 16, 16, 128, 128)
  args16 = tuple(x.astype(jnp.bfloat16) if i < 3 else x for i, x in enumerate(args32))
  got = jax.jit(lambda *a: _vjp(IMPLS[impl], a, None, 3))(*args16)
  want = _fp32_reference(args32, None, 3)
  names = ('o', 'final state') + GRAD_NAMES
  for name, a, w in zip(names, jax.tree.leaves(got), jax.tree.leaves(want)):
    testing.assert_close(f'{impl} {name}', a, w, LIMITS[name])


@pytest.mark.gpu
@pytest.mark.parametrize('impl', sorted(IMPLS))
def test_gpu_fp32_awkward_shapes_with_resets(impl):
  rng = np.random.default_rng(0)
  args = _inputs(rng, 2, 1000, 2, 4, 60, 100)
  seg = _segments(2, 1000, [1, 64, 300, 301, 777])
  got = jax.jit(lambda *a: _vjp(IMPLS[impl], a, seg, 4))(*args)
  want = _fp32_reference(args, seg, 4)
  names = ('o', 'final state') + GRAD_NAMES
  for name, a, w in zip(names, jax.tree.leaves(got), jax.tree.leaves(want)):
    testing.assert_close(f'{impl} {name}', a, w, 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_gpu_triton_ampere_launch_matches_the_reference(ampere_launch, dtype):
  """The Triton family at its Ampere / Ada launch (`ampere_launch`), compiled for this GPU: bf16
  at T = 4096, K = V = 128 within fla's limits; fp32 at awkward shapes with resets within 1e-4."""
  del ampere_launch
  rng = np.random.default_rng(0)
  bf16 = dtype == 'bfloat16'
  args32 = _inputs(rng, *((1, 4096, 16, 16, 128, 128) if bf16 else (2, 1000, 2, 4, 60, 100)))
  args = tuple(x.astype(jnp.bfloat16) if bf16 and i < 3 else x for i, x in enumerate(args32))
  seg = None if bf16 else _segments(2, 1000, [1, 64, 300, 301, 777])
  got = jax.jit(lambda *a: _vjp(IMPLS['triton'], a, seg, 5))(*args)
  want = _fp32_reference(args32, seg, 5)
  names = ('o', 'final state') + GRAD_NAMES
  for name, a, w in zip(names, jax.tree.leaves(got), jax.tree.leaves(want)):
    testing.assert_close(f'triton {name}', a, w, LIMITS[name] if bf16 else 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_gpu_output_and_checkpoints_match_xla(dtype):
  """The shared clean pass (api.chunk_output_and_checkpoints) compiled: output, checkpoints and
  gradients for random cotangents of all three against fp32 XLA; bf16 at T=4096, K=128 within
  fla's limits, fp32 at awkward shapes with resets within 1e-4."""
  rng = np.random.default_rng(0)
  bf16 = dtype == 'bfloat16'
  b, t, h, hv, kd, vd = (1, 4096, 16, 16, 128, 128) if bf16 else (2, 1000, 2, 4, 60, 100)
  q, k, v, g, beta, _ = _inputs(rng, b, t, h, hv, kd, vd, with_state=False)
  seg = None if bf16 else _segments(b, t, [1, 64, 300, 301, 777])
  scale = kd ** -0.5

  def separate(*x):
    o, _ = xla.chunk_gated_delta_rule_xla(*x, scale=scale, segment_ids=seg)
    return (o,) + xla.chunk_gated_delta_rule_fwd_h(x[1], *x[1:], segment_ids=seg)[:2]

  args32 = (q, k, v, g, beta)
  args = tuple(x.astype(jnp.bfloat16) if bf16 and i < 3 else x for i, x in enumerate(args32))
  shared = lambda *x: api.chunk_output_and_checkpoints(*x, scale=scale, segment_ids=seg)
  with jax.default_matmul_precision('highest'):
    want_out = jax.jit(separate)(*args32)
  got_out = jax.jit(shared)(*args)
  cots = tuple(jax.random.normal(jax.random.key(i), w.shape) for i, w in enumerate(want_out))
  # Each output's cotangent in that output's dtype (the shared pass's o is bf16 for bf16 inputs).
  pullback = lambda fn, outs: jax.jit(lambda *x: jax.vjp(fn, *x)[1](
      tuple(c.astype(o.dtype) for c, o in zip(cots, outs))))
  got = pullback(shared, got_out)(*args)
  with jax.default_matmul_precision('highest'):
    want = pullback(separate, want_out)(*args32)
  out_limit = LIMITS['o'] if bf16 else 1e-4
  for name, a, w in zip(('o', 'h', 'v_new'), got_out, want_out):
    testing.assert_close(f'shared {name}', a, w, out_limit)
  for name, a, w in zip(GRAD_NAMES, got, want):
    testing.assert_close(f'shared {name}', a, w, LIMITS[name] if bf16 else 1e-4)


@pytest.mark.gpu
def test_gpu_state_pass_low_copies_equal_xla_converts():
  """The Triton state pass's 16-bit copies of the fp32 checkpoints (what the output and backward
  kernels read) equal XLA's converts of them bit for bit (round to nearest even both ways): the
  state pass writes them in place of a convert pass over h and v_new."""
  rng = np.random.default_rng(1)
  _, k, v, g, beta, _ = _inputs(rng, 1, 256, 2, 4, 128, 128, with_state=False)
  k, v = k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
  # pylint: disable-next=protected-access
  run = jax.jit(lambda *x: gdr_triton._clean_pass_forward(x[0], *x, (), 64, False)[4:8])
  h, vn, h_lo, vn_lo = run(k, v, g, beta)
  assert h.dtype == vn.dtype == jnp.float32 and h_lo.dtype == vn_lo.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(h_lo, np.float32),
                                np.asarray(h.astype(jnp.bfloat16), np.float32))
  np.testing.assert_array_equal(np.asarray(vn_lo, np.float32),
                                np.asarray(vn.astype(jnp.bfloat16), np.float32))
