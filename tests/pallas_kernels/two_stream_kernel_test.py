"""The Pallas two-stream GDN noisy kernels against the pure-JAX schedules ('chunked', 'simple').

CPU, interpret mode, fp32, small awkward shapes: T off the chunk grid, block sizes 1..32, one and
two views, GQA (HV = 2H), K = V in {16, 20, 60} (padded in the kernel), packed documents starting
mid-chunk, prompts without blocks, a V tile smaller than V; the backward kernel's gradients of
every clean and noisy input against `jax.vjp` of the chunked schedule; the Triton lowering of both
kernels for CUDA (no GPU needed). The jax-triton fused forward in Triton's interpreter, at the same
cases.
"""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flare_jax.model import two_stream_gdn
from pallas_kernels._common import testing
from pallas_kernels.gated_delta_rule import two_stream_xla as chunked
from pallas_kernels.gated_delta_rule import two_stream_pallas
from tests.objective import two_stream_gdn_chunked_test as helpers

NAMES = [f'{s} {x}' for s in ('clean', 'noisy') for x in ('q', 'k', 'v', 'g', 'beta')]
_FAST = {'xla_backend_optimization_level': 0}  # the tests are compile-bound
_STATIC = ('scale', 'chunk_size', 'max_block')
_KERNEL = jax.jit(two_stream_pallas.noisy_delta_rule_pallas, compiler_options=_FAST,
                  static_argnames=_STATIC + ('interpret',))
_CHUNKED = jax.jit(chunked.noisy_delta_rule_chunked, compiler_options=_FAST,
                   static_argnames=_STATIC)


_inputs = helpers._inputs  # (rng, b, t, views, h, hv, kd, vd) -> fp32 (clean, noisy)


def _layout(rng, kind, t, block):
  if kind == 'random':  # packed documents of 1..45 tokens, random blocks of 1..block slots
    seg, starts = helpers._random_layout(rng, 2, t, block)
  else:  # prompt + response documents through layout.block_layout ('real_noshift': no shift)
    seg, starts = helpers._real_layout(t, block, kind == 'real')
  helpers._block_lengths_ok(starts, block)
  return jnp.asarray(seg), jnp.asarray(starts)


def _close(got, want, rtol=1e-4):
  """Max error relative to the largest reference output."""
  err = float(jnp.max(jnp.abs(got - want)))
  assert np.all(np.isfinite(got))
  assert err <= rtol * float(jnp.max(jnp.abs(want))), err


CASES = {  # t, max_block, chunk, layout, views, h, hv, kd (= vd)
    't37_b1_v1_k16': (37, 1, 16, 'random', 1, 1, 2, 16),
    't37_b3_v2_k20': (37, 3, 64, 'random', 2, 1, 2, 20),
    't100_b4_real_v2_k16': (100, 4, 64, 'real', 2, 1, 2, 16),
    't100_b8_v1_k20': (100, 8, 16, 'random', 1, 1, 2, 20),
    't100_b3_real_noshift_v2_k20': (100, 3, 32, 'real_noshift', 2, 1, 2, 20),
    # Row tiles of 32: the tile solve merges two 16-row substitutions.
    't100_b20_v1_k16': (100, 20, 64, 'random', 1, 1, 2, 16),
}


@pytest.mark.parametrize('case', list(CASES))
def test_kernel_equals_chunked_schedule(rng, case):
  t, block, chunk, kind, views, h, hv, kd = CASES[case]
  seg, starts = _layout(rng, kind, t, block)
  clean, noisy = _inputs(rng, 2, t, views, h, hv, kd, kd)
  scale = kd ** -0.5
  got = _KERNEL(clean, noisy, seg, starts, scale=scale, chunk_size=chunk, max_block=block,
                interpret=True)
  want = _CHUNKED(clean, noisy, seg, starts, scale=scale, chunk_size=chunk, max_block=block)
  assert got.shape == want.shape == (2, views, t, hv, kd) and got.dtype == jnp.float32
  _close(got, want)


def test_kernel_equals_simple_schedule_under_strong_decay(rng):
  """Against the token-scan oracle; g down to -20 and beta = 1 (e^G underflows in blocks)."""
  t, block, kd = 100, 4, 16
  seg, starts = _layout(rng, 'real', t, block)
  clean, noisy = _inputs(rng, 2, t, 2, 1, 2, kd, kd)
  strong = lambda xs: xs[:3] + (xs[3] * 40, jnp.ones_like(xs[4]))
  for c, n in ((clean, noisy), (strong(clean), strong(noisy))):
    got = _KERNEL(c, n, seg, starts, scale=kd ** -0.5, max_block=block, interpret=True)
    want = jax.jit(two_stream_gdn.noisy_delta_rule, compiler_options=_FAST,
                   static_argnames=('scale', 'schedule'))(c, n, seg, starts, scale=kd ** -0.5,
                                                          schedule='simple')
    _close(got, want)


def _vjp(fn, clean, noisy, cot, output=False):
  """(fn(clean, noisy) if `output` else None, its gradients for the cotangent `cot`: clean then
  noisy inputs, in NAMES order). Without `output`, XLA drops the unused forward kernel."""
  def run(c, n):
    o, pull = jax.vjp(fn, c, n)
    return (o if output else None), jax.tree.leaves(pull(cot))
  return jax.jit(run, compiler_options=_FAST)(clean, noisy)


def _check_grads(got, want, limit=1e-5):
  for name, g, w in zip(NAMES, got, want):
    # Noisy outputs depend on every input but the clean queries.
    assert (float(jnp.max(jnp.abs(w))) > 0) == (name != 'clean q'), name
    if name == 'clean q':
      assert not np.any(g), name
    else:
      testing.assert_close(name, g, w, limit)


def test_v_tiles(rng):
  """V = 40 (padded to 64) in tiles of 16: four programs per (window, row, head, view)."""
  t, block = 100, 4
  seg, starts = _layout(rng, 'random', t, block)
  clean, noisy = _inputs(rng, 2, t, 2, 1, 2, 16, 40)
  kernel = lambda c, n: two_stream_pallas._noisy(c, n, seg, starts, 0.25, 16, block, (16, 4),
                                                 True, 'kernel')
  want = lambda c, n: chunked.noisy_delta_rule_chunked(c, n, seg, starts, scale=0.25,
                                                       chunk_size=16, max_block=block)
  cot = jnp.asarray(rng.normal(size=(2, 2, t, 2, 40)), jnp.float32)
  (o, got), (o_want, grads) = (_vjp(f, clean, noisy, cot, output=True) for f in (kernel, want))
  _close(o, o_want)
  _check_grads(got, grads)


# The jax-triton fused kernel, in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
# off GPU); its backward is the chunked schedule's autodiff.
TRITON_CASES = dict(CASES, t100_b4_v2_k20_v100=(100, 4, 16, 'random', 2, 1, 2, 20))
_TRITON_VD = {'t100_b4_v2_k20_v100': 100}  # V padded to 128: two V tiles of 64


@pytest.mark.parametrize('case', list(TRITON_CASES))
def test_triton_kernel_equals_chunked_schedule(rng, case):
  pytest.importorskip('torch')
  two_stream_triton = pytest.importorskip('pallas_kernels.gated_delta_rule.two_stream_triton')
  if jax.default_backend() == 'gpu':
    pytest.skip('the interpreter path is for CPU runs (GPU: test_gpu_kernel_matches_...)')
  t, block, chunk, kind, views, h, hv, kd = TRITON_CASES[case]
  vd = _TRITON_VD.get(case, kd)
  seg, starts = _layout(rng, kind, t, block)
  clean, noisy = _inputs(rng, 2, t, views, h, hv, kd, vd)
  kw = dict(scale=kd ** -0.5, chunk_size=chunk, max_block=block)
  got = two_stream_triton.noisy_delta_rule_triton(clean, noisy, seg, starts, interpret=True, **kw)
  want = _CHUNKED(clean, noisy, seg, starts, **kw)
  assert got.shape == want.shape == (2, views, t, hv, vd) and got.dtype == jnp.float32
  _close(got, want)


def test_triton_forward_bf16_inputs_round_within_fla_limits(rng):
  """The Triton forward reads bf16 q, k, v (and clean k) as given and rounds its product operands
  to bf16 (the interpreter emulates that in fp32): against the chunked schedule in fp32 on the same
  bf16 values its RMS ratio stays within fla's output limit (5e-3) and is not the near-exact result
  of fp32 products (so the rounding happens), at blocks within one row tile and across two."""
  pytest.importorskip('torch')
  two_stream_triton = pytest.importorskip('pallas_kernels.gated_delta_rule.two_stream_triton')
  if jax.default_backend() == 'gpu':
    pytest.skip('the interpreter path is for CPU runs')
  t, chunk, views, h, hv, kd = 64, 16, 2, 1, 2, 32
  clean, noisy = _inputs(rng, 1, t, views, h, hv, kd, kd)
  bf16 = lambda xs: tuple(x.astype(jnp.bfloat16) if i < 3 else x for i, x in enumerate(xs))
  widened = lambda xs: tuple(x.astype(jnp.float32) for x in xs)
  for block in (4, 20):
    seg, starts = _layout(rng, 'real', t, block)
    kw = dict(scale=kd ** -0.5, chunk_size=chunk, max_block=block)
    got = two_stream_triton.noisy_delta_rule_triton(bf16(clean), bf16(noisy), seg[:1], starts[:1],
                                                    interpret=True, **kw)
    want = _CHUNKED(widened(bf16(clean)), widened(bf16(noisy)), seg[:1], starts[:1], **kw)
    error = testing.rms_ratio(got, want)
    print(f'block {block}: RMS ratio {error:.2e}')
    assert 1e-4 < error <= 5e-3, (block, error)


TRITON_GRAD_CASES = {  # t, max_block, chunk, views, h, hv, kd, vd, layout
    't37_b3_v2': (37, 3, 16, 2, 1, 2, 16, 16, 'random'),
    't100_b8_k20_v1': (100, 8, 16, 1, 1, 2, 20, 20, 'random'),
    't60_b16_vd40': (60, 16, 32, 2, 1, 2, 16, 40, 'random'),  # V padded to 64: two V tiles
    't50_b1_v1': (50, 1, 16, 1, 1, 1, 16, 16, 'random'),  # one-slot blocks
    # 32-row tiles (chunk raised to 32); one head (see test_bf16_backward_kernel_within_fla_limits)
    't70_b20_v2': (70, 20, 16, 2, 1, 1, 16, 16, 'random'),
    # Prompt + response documents: windows whose blocks all lie inside row tiles (the kernels'
    # walks without banded terms) beside windows where a document's end shifts them.
    't100_b4_real_v2': (100, 4, 16, 2, 1, 2, 16, 16, 'real'),
}


@pytest.mark.parametrize('case, backward', [
    (case, backward) for case in TRITON_GRAD_CASES for backward in ('autodiff', 'kernel')])
def test_triton_kernel_gradients_equal_the_chunked_schedules(rng, case, backward):
  pytest.importorskip('torch')
  two_stream_triton = pytest.importorskip('pallas_kernels.gated_delta_rule.two_stream_triton')
  if jax.default_backend() == 'gpu':
    pytest.skip('the interpreter path is for CPU runs')
  t, block, chunk, views, h, hv, kd, vd, kind = TRITON_GRAD_CASES[case]
  seg, starts = _layout(rng, kind, t, block)
  clean, noisy = _inputs(rng, 2, t, views, h, hv, kd, vd)
  kw = dict(scale=kd ** -0.5, chunk_size=chunk, max_block=block)
  kernel = lambda c, n: two_stream_triton.noisy_delta_rule_triton(
      c, n, seg, starts, interpret=True, backward=backward, **kw)
  want = lambda c, n: chunked.noisy_delta_rule_chunked(c, n, seg, starts, **kw)
  cot = jnp.asarray(rng.normal(size=(2, views, t, hv, vd)), jnp.float32)
  (o, got), (o_want, grads) = (_vjp(f, clean, noisy, cot, output=True) for f in (kernel, want))
  _close(o, o_want)
  _check_grads(got, grads)


def test_triton_seed_context_kernel_v_tiles(rng, monkeypatch):
  """The seed context kernel in V tiles of 16 (V = 40, padded to 64: four programs per window and
  head; its default tile of 64 covers every V of the CPU tests at once): the gradients still
  equal the chunked schedule's."""
  pytest.importorskip('torch')
  two_stream_triton = pytest.importorskip('pallas_kernels.gated_delta_rule.two_stream_triton')
  if jax.default_backend() == 'gpu':
    pytest.skip('the interpreter path is for CPU runs')
  _, _, rows_warps = two_stream_triton.seed_backward_launch()
  monkeypatch.setattr(two_stream_triton, 'seed_backward_launch', lambda: (16, 4, rows_warps))
  jax.clear_caches()  # `_backward` reads the launch while tracing
  t, block, chunk, views, hv, kd, vd = 37, 3, 16, 2, 2, 16, 40
  seg, starts = _layout(rng, 'random', t, block)
  clean, noisy = _inputs(rng, 2, t, views, 1, hv, kd, vd)
  kw = dict(scale=kd ** -0.5, chunk_size=chunk, max_block=block)
  kernel = lambda c, n: two_stream_triton.noisy_delta_rule_triton(
      c, n, seg, starts, interpret=True, backward='kernel', **kw)
  want = lambda c, n: chunked.noisy_delta_rule_chunked(c, n, seg, starts, **kw)
  cot = jnp.asarray(rng.normal(size=(2, views, t, hv, vd)), jnp.float32)
  _check_grads(_vjp(kernel, clean, noisy, cot)[1], _vjp(want, clean, noisy, cot)[1])
  jax.clear_caches()


# triton + autodiff (~55 s on CI's 2 cores) is slow: the same forward as triton + kernel
@pytest.mark.parametrize('family, backward', [
    pytest.param('triton', 'autodiff', marks=pytest.mark.slow), ('triton', 'kernel'),
    ('pallas', 'kernel')])
def test_given_checkpoints_equal_the_ops_own_clean_pass(rng, family, backward):
  """The fused ops with the clean pass's checkpoints carried in `clean` (the model's shared clean
  pass: the Triton schedules) give the outputs and, through the checkpoints, the gradients of the
  op that forms them; and they are read (zeroed checkpoints change the outputs)."""
  if family == 'triton':
    pytest.importorskip('torch')
  if jax.default_backend() == 'gpu':
    pytest.skip('the interpreter path is for CPU runs')
  from pallas_kernels.gated_delta_rule import api  # pylint: disable=g-import-not-at-top
  module = pytest.importorskip(f'pallas_kernels.gated_delta_rule.two_stream_{family}')
  op = getattr(module, f'noisy_delta_rule_{family}')
  t, block, chunk = 40, 4, 16
  seg, starts = _layout(rng, 'random', t, block)
  clean, noisy = _inputs(rng, 2, t, 2, 1, 2, 16, 20)
  kw = dict(scale=0.25, chunk_size=chunk, max_block=block, interpret=True, backward=backward)
  own = lambda c, n: op(c, n, seg, starts, **kw)

  def given(c, n):
    h, v_new = api.chunk_checkpoints(*c[1:], segment_ids=seg, chunk_size=chunk)
    return op(c + (h, v_new), n, seg, starts, **kw)

  cot = jnp.asarray(rng.normal(size=(2, 2, t, 2, 20)), jnp.float32)
  (o, got), (o_want, want) = (_vjp(f, clean, noisy, cot, output=True) for f in (given, own))
  _close(o, o_want)
  _check_grads(got, want)
  zeroed = op(clean + tuple(jnp.zeros_like(x) for x in api.chunk_checkpoints(
      *clean[1:], segment_ids=seg, chunk_size=chunk)), noisy, seg, starts, **kw)
  assert float(jnp.max(jnp.abs(zeroed - o_want))) > 0.1 * float(jnp.max(jnp.abs(o_want)))
  with pytest.raises(ValueError, match='chunk-16 checkpoints'):
    h, v_new = api.chunk_checkpoints(*clean[1:], segment_ids=seg, chunk_size=32)
    op(clean + (h, v_new), noisy, seg, starts, **kw)


def test_triton_op_rejects_an_unknown_backward():
  two_stream_triton = pytest.importorskip('pallas_kernels.gated_delta_rule.two_stream_triton')
  rng = np.random.default_rng(0)
  clean, noisy = _inputs(rng, 1, 40, 1, 1, 1, 16, 16)
  ids = jnp.zeros((1, 40), jnp.int32)
  with pytest.raises(ValueError, match='unknown backward'):
    two_stream_triton.noisy_delta_rule_triton(clean, noisy, ids, ids, scale=0.25,
                                              interpret=True, backward='fast')


def test_noisy_block_perturbation_stays_in_its_block(rng):
  t, block, kd = 100, 8, 16
  seg, starts = _layout(rng, 'random', t, block)
  clean, noisy = _inputs(rng, 2, t, 2, 1, 2, kd, kd)
  j = 57
  bump = lambda x: x.at[0, 1, j].add(0.3)  # row 0, view 1, slot j: v and beta
  moved = (noisy[0], noisy[1], bump(noisy[2]), noisy[3], bump(noisy[4]))
  run = lambda n: np.asarray(_KERNEL(clean, n, seg, starts, scale=0.25, chunk_size=16,
                                     max_block=block, interpret=True))
  changed = np.abs(run(moved) - run(noisy)).max(axis=(3, 4))  # B V T
  starts = np.asarray(starts)
  own = (starts[0] == starts[0, j]) & (np.arange(t) >= j)
  assert np.all(changed[0, 1][own] > 0)
  assert np.all(changed[0, 1][~own] == 0) and np.all(changed[0, 0] == 0) and np.all(changed[1] == 0)


GRAD_CASES = {  # t, max_block, chunk, layout, views, h, hv, kd (= vd)
    't63_b1_v1_k60': (63, 1, 16, 'random', 1, 1, 2, 60),
    't100_b2_v2_k20_gqa2to4': (100, 2, 32, 'random', 2, 2, 4, 20),
    't37_b3_v2_k20': (37, 3, 16, 'random', 2, 1, 2, 20),
    't100_b4_real_v2_k16': (100, 4, 64, 'real', 2, 1, 2, 16),
    't100_b3_real_noshift_v1_k20': (100, 3, 32, 'real_noshift', 1, 1, 2, 20),
    't63_b8_v2_k60_mha': (63, 8, 16, 'random', 2, 2, 2, 60),
    # Row tiles of 32: the backward solves 64-row systems (two tiles).
    't100_b32_real_v1_k16': (100, 32, 32, 'real', 1, 1, 2, 16),
}


@pytest.mark.parametrize('case', list(GRAD_CASES))
def test_backward_kernel_equals_chunked_schedule_gradients(rng, case):
  """Every gradient (clean and noisy q, k, v, g, beta) against jax.vjp of the chunked schedule."""
  t, block, chunk, kind, views, h, hv, kd = GRAD_CASES[case]
  seg, starts = _layout(rng, kind, t, block)
  clean, noisy = _inputs(rng, 2, t, views, h, hv, kd, kd)
  cot = jnp.asarray(rng.normal(size=(2, views, t, hv, kd)), jnp.float32)
  kw = dict(scale=kd ** -0.5, chunk_size=chunk, max_block=block)
  kernel = lambda backward: lambda c, n: two_stream_pallas.noisy_delta_rule_pallas(
      c, n, seg, starts, **kw, interpret=True, backward=backward)
  got = _vjp(kernel('kernel'), clean, noisy, cot)[1]
  if case == 't37_b3_v2_k20':  # the same reference through the custom_vjp's 'autodiff' backward
    want = _vjp(kernel('autodiff'), clean, noisy, cot)[1]
  else:
    want = _vjp(lambda c, n: chunked.noisy_delta_rule_chunked(c, n, seg, starts, **kw),
                clean, noisy, cot)[1]
  _check_grads(got, want)


@pytest.mark.parametrize('dtype, kd, block', [(jnp.bfloat16, 128, 4), (jnp.float32, 60, 32)],
                         ids=['bf16_k128_b4', 'fp32_k60_b32'])
def test_kernel_lowers_to_triton_for_cuda(dtype, kd, block):
  """Without a GPU: the forward and backward kernels lower through Pallas' Triton backend
  (power-of-two tensors, dot shapes and dtypes, no slices). Triton's own compile (registers, shared
  memory) is left to a GPU run."""
  from jax import export  # pylint: disable=g-import-not-at-top
  b, views, t, h, hv = 1, 2, 200, 2, 4
  sds = jax.ShapeDtypeStruct

  def stream(*lead):
    return (sds((*lead, t, h, kd), dtype), sds((*lead, t, h, kd), dtype),
            sds((*lead, t, hv, kd), dtype), sds((*lead, t, hv), jnp.float32),
            sds((*lead, t, hv), jnp.float32))

  fn = lambda c, n, s, bs: two_stream_pallas.noisy_delta_rule_pallas(
      c, n, s, bs, scale=kd ** -0.5, max_block=block, interpret=False)
  exported = export.export(
      jax.jit(fn), platforms=['cuda'],
      disabled_checks=[export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')])(
          stream(b), stream(b, views), sds((b, t), jnp.int32), sds((b, t), jnp.int32))
  module = exported.mlir_module()
  # The clean pass's chunked kernels (intra, state pass), then the noisy kernel.
  assert module.count('stablehlo.custom_call @__gpu$xla.gpu.triton') == 3
  for name in ('gdr_intra', 'gdr_state_pass', 'two_stream_noisy_fwd'):
    assert f'name = "{name}"' in module, name
  kernel_bwd = lambda c, n, s, bs: two_stream_pallas.noisy_delta_rule_pallas(
      c, n, s, bs, scale=kd ** -0.5, max_block=block, interpret=False, backward='kernel')
  loss = lambda c, n, s, bs: jnp.sum(kernel_bwd(c, n, s, bs))
  exported = export.export(
      jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), platforms=['cuda'],
      disabled_checks=[export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')])(
          stream(b), stream(b, views), sds((b, t), jnp.int32), sds((b, t), jnp.int32))
  module = exported.mlir_module()
  assert module.count('stablehlo.custom_call @__gpu$xla.gpu.triton') == 4  # 3 forward, 1 backward
  assert 'name = "two_stream_noisy_bwd"' in module


def test_rejects_bad_arguments(rng):
  seg, starts = _layout(rng, 'random', 20, 4)
  clean, noisy = _inputs(rng, 2, 20, 1, 1, 2, 16, 16)
  with pytest.raises(ValueError, match='max_block'):
    two_stream_pallas.noisy_delta_rule_pallas(clean, noisy, seg, starts, scale=0.25, max_block=0)
  bad = (noisy[0][:, :, :, :1].repeat(3, axis=3),) + noisy[1:]  # H = 3 does not divide HV = 2
  with pytest.raises(ValueError, match='multiple'):
    two_stream_pallas.noisy_delta_rule_pallas(clean, bad, seg, starts, scale=0.25)
  with pytest.raises(ValueError, match='backward'):
    two_stream_pallas.noisy_delta_rule_pallas(clean, noisy, seg, starts, scale=0.25,
                                              backward='xla')


def test_fp32_kernel_backward_past_head_size_64_is_refused_before_compiling(rng):
  """Compiled, its kernels would ask for more shared memory than a GPU has (an error only at
  launch); the interpreters have no such limit, and 64 is allowed."""
  seg, starts = _layout(rng, 'random', 20, 4)
  # pylint: disable-next=g-import-not-at-top
  from pallas_kernels.gated_delta_rule import two_stream_triton  # imports without triton too
  ops = (two_stream_pallas.noisy_delta_rule_pallas, two_stream_triton.noisy_delta_rule_triton)
  for kd, vd in ((128, 16), (16, 72)):
    clean, noisy = _inputs(rng, 1, 20, 1, 1, 1, kd, vd)
    for fn in ops:
      with pytest.raises(ValueError, match='fp32 inputs takes head sizes up to 64'):
        fn(clean, noisy, seg[:1], starts[:1], scale=0.25, backward='kernel', interpret=False)
  clean, noisy = _inputs(rng, 1, 20, 1, 1, 1, 64, 64)
  two_stream_pallas.check_arguments(clean, noisy, 4, 'kernel', interpret=False)
  half = lambda xs: tuple(x.astype(jnp.bfloat16) if i < 3 else x for i, x in enumerate(xs))
  clean, noisy = _inputs(rng, 1, 20, 1, 1, 1, 128, 128)
  two_stream_pallas.check_arguments(half(clean), half(noisy), 4, 'kernel', interpret=False)
  two_stream_pallas.check_arguments(clean, noisy, 4, 'kernel', interpret=True)
  two_stream_pallas.check_arguments(clean, noisy, 4, 'autodiff', interpret=False)


# ---------------------------------------------------------------------------------------------
# GPU (Triton): the benchmark shape in bf16 and an awkward fp32 shape with packed documents.
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize('t, block, kind, dtype, kd, limit', [
    (4096, 4, 'real', jnp.bfloat16, 128, 5e-3),  # fla's output limit (RMS ratio)
    (1000, 32, 'random', jnp.float32, 60, 1e-4),  # as the other fp32 kernels (H200: 1.03e-5)
], ids=['t4k_bf16_k128_block4', 't1000_fp32_k60_block32'])
@pytest.mark.parametrize('impl', ['pallas', 'triton'])
def test_gpu_kernel_matches_chunked_schedule(rng, impl, t, block, kind, dtype, kd, limit):
  """Two rows; H = HV = 16 at K = 128 (the benchmark shape), else GQA 2 -> 4 heads."""
  if impl == 'triton':
    # pylint: disable-next=g-import-not-at-top
    from pallas_kernels.gated_delta_rule import two_stream_triton
    fn = two_stream_triton.noisy_delta_rule_triton
  else:
    fn = two_stream_pallas.noisy_delta_rule_pallas
  seg, starts = _layout(rng, kind, t, block)
  h, hv = (16, 16) if kd == 128 else (2, 4)
  clean, noisy = _inputs(rng, 2, t, 2, h, hv, kd, kd)
  cast = lambda xs: tuple(x.astype(dtype) if i < 3 else x for i, x in enumerate(xs))
  kw = dict(scale=kd ** -0.5, max_block=block)
  got = jax.jit(lambda c, n: fn(c, n, seg, starts, **kw))(cast(clean), cast(noisy))
  with jax.default_matmul_precision('highest'):
    want = jax.jit(lambda c, n: chunked.noisy_delta_rule_chunked(c, n, seg, starts, **kw))(
        clean, noisy)
  print(f'two-stream noisy kernel ({impl}) 2x{t} block {block} {jnp.dtype(dtype).name}: RMS ratio '
        f'{testing.rms_ratio(got, want):.2e} (limit {limit:.0e})')
  testing.assert_close('o', got, want, limit)


def _check_backward_kernel(impl, t, heads, kd, block=4, dtype=jnp.bfloat16, interpret=None):
  """Kernel gradients (two rows, two views) against the fp32 chunked schedule's: bf16 inputs at
  fla's RMS limits (dq, dk, dv 8e-3; dg, dbeta 2e-2), fp32 inputs at 1e-4 (as the forward's)."""
  rng = np.random.default_rng(0)
  seg, starts = _layout(rng, 'real', t, block)
  clean, noisy = _inputs(rng, 2, t, 2, heads, heads, kd, kd)
  cot = jnp.asarray(rng.normal(size=(2, 2, t, heads, kd)), jnp.float32)
  cast = lambda xs: tuple(x.astype(dtype) if i < 3 else x for i, x in enumerate(xs))
  kw = dict(scale=kd ** -0.5, max_block=block)
  loss = lambda fn, **extra: lambda c, n: jnp.sum(cot * fn(c, n, seg, starts, **kw, **extra))
  if impl == 'triton':
    # pylint: disable-next=g-import-not-at-top
    from pallas_kernels.gated_delta_rule import two_stream_triton
    fn = two_stream_triton.noisy_delta_rule_triton
  else:
    fn = two_stream_pallas.noisy_delta_rule_pallas
  kernel = loss(fn, backward='kernel', interpret=interpret)
  # fp32: XLA's parts of the op (the Pallas family's clean pass and its pullback) at fp32 too, not
  # at JAX's default TF32 on a GPU (Pallas's dclean g: 8.9e-5 against 7.0e-7; H100, K = 64).
  fp32 = jnp.dtype(dtype) == jnp.float32
  with jax.default_matmul_precision('highest') if fp32 else contextlib.nullcontext():
    got = jax.jit(jax.grad(kernel, argnums=(0, 1)))(cast(clean), cast(noisy))
  with jax.default_matmul_precision('highest'):
    want = jax.jit(jax.grad(loss(chunked.noisy_delta_rule_chunked), argnums=(0, 1)))(clean, noisy)
  if fp32:
    limits = dict.fromkeys(('q', 'k', 'v', 'g', 'beta'), 1e-4)
  else:
    limits = dict(q=8e-3, k=8e-3, v=8e-3, g=2e-2, beta=2e-2)
  for name, g, w in zip(NAMES, jax.tree.leaves(got), jax.tree.leaves(want)):
    if name == 'clean q':  # no gradient: noisy outputs do not read clean queries
      continue
    limit = limits[name.split()[1]]
    print(f'two-stream noisy backward kernel ({impl}) 2x{t} H={heads} K={kd} block {block} '
          f'{jnp.dtype(dtype).name} d{name}: RMS ratio {testing.rms_ratio(g, w):.2e} '
          f'(limit {limit:.0e})')
    testing.assert_close(name, g.astype(jnp.float32), w, limit)


# One head at block 32: the reference's jitted gradient with two heads and blocks over 16 aborts
# XLA:CPU (jaxlib 0.10.2, "ynn_emitter.cc: Check failed: b_rank < YNN_MAX_TENSOR_RANK").
@pytest.mark.parametrize('impl, block, heads', [('pallas', 4, 2), ('triton', 4, 1),
                                                ('triton', 32, 1)])
def test_bf16_backward_kernel_within_fla_limits(impl, block, heads):
  """The backward kernels' bf16 products, in the interpreters (Triton's: 32-row tiles too)."""
  if impl == 'triton':
    pytest.importorskip('pallas_kernels.gated_delta_rule.two_stream_triton')
    if jax.default_backend() == 'gpu':
      pytest.skip('the interpreter path is for CPU runs')
  _check_backward_kernel(impl, 128, heads, 64, block, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize('impl, block', [('pallas', 4), ('triton', 4), ('triton', 32)])
def test_gpu_backward_kernel_matches_chunked_schedule(impl, block):
  """The benchmark shape: T = 4096, H = HV = 16, K = 128. H200 (2026-12-01): the Pallas kernel with
  TF32 products asked for 280 KiB of shared memory at a V tile of 32 (232 KiB there). Both take
  bf16 products (ptxas offline: Pallas 118 KiB at V tile 64; the Triton kernels at most 80 KiB,
  `two_stream_triton.backward_launch`)."""
  _check_backward_kernel(impl, 4096, 16, 128, block)


@pytest.mark.gpu
@pytest.mark.parametrize('impl', ['pallas', 'triton'])
def test_gpu_fp32_backward_kernel_at_the_largest_head_size(impl):
  """fp32 inputs at K = V = FP32_KERNEL_BACKWARD_MAX_HEAD (Triton: TF32x3 products): the kernels
  must fit the GPU's shared memory, not only compile, and keep fp32 accuracy."""
  kd = two_stream_pallas.FP32_KERNEL_BACKWARD_MAX_HEAD
  _check_backward_kernel(impl, 512, 4, kd, 4, dtype=jnp.float32)
