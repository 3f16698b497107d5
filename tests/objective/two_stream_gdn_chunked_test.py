"""The chunk-parallel GDN noisy-block schedule equals the token-scan schedules ('simple', 'lean') in
outputs and gradients, for real and random block layouts, packed documents and awkward shapes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flare_jax.model import two_stream_gdn
from pallas_kernels.gated_delta_rule import two_stream_xla as chunked
from flare_jax.objective import layout as layout_lib

K, DV = 8, 8
SCALE = K ** -0.5
NAMES = [f'{s} {x}' for s in ('clean', 'noisy') for x in ('q', 'k', 'v', 'g', 'beta')]


def _inputs(rng, b, t, views, h, hv, kd=K, vd=DV):
  """(clean, noisy) fp32 streams: l2-normed q, k; g in [-0.5, -0.01]; beta in [0.2, 0.9]."""
  def qk(*shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)

  def stream(*lead):
    return (qk(*lead, t, h, kd), qk(*lead, t, h, kd), rng.normal(size=(*lead, t, hv, vd)),
            -rng.uniform(0.01, 0.5, (*lead, t, hv)), rng.uniform(0.2, 0.9, (*lead, t, hv)))

  to = lambda xs: tuple(jnp.asarray(x, jnp.float32) for x in xs)
  return to(stream(b)), to(stream(b, views))


def _random_layout(rng, b, t, max_block):
  """Packed documents of random lengths (1..45 tokens, resets anywhere), each cut into contiguous
  blocks of random length 1..max_block (a block never crosses a document)."""
  seg = np.zeros((b, t), np.int32)
  starts = np.zeros((b, t), np.int32)
  for r in range(b):
    p, doc = 0, 0
    while p < t:
      end = min(t, p + int(rng.integers(1, 46)))
      doc += 1
      seg[r, p:end] = doc
      s = p
      while s < end:
        e = min(end, s + int(rng.integers(1, max_block + 1)))
        starts[r, s:e] = s
        s = e
      p = end
  return seg, starts


def _real_layout(t, block, shift):
  """Two rows of prompt + response documents through `layout.block_layout`."""
  docs = [[(0, 23, 4), (23, 61, 0), (61, t, 2)], [(0, 37, 9), (37, 48, 1), (48, t - 5, 3)]]
  seg = np.zeros((2, t), np.int32)
  resp = np.zeros((2, t), bool)
  for r, row in enumerate(docs):
    for i, (lo, hi, prompt) in enumerate(row):
      seg[r, lo:hi] = i + 1
      resp[r, lo + prompt:hi] = True
  lay = layout_lib.block_layout(jnp.zeros((2, t), jnp.int32), jnp.asarray(seg), jnp.asarray(resp),
                                block_size=block, logit_shift=shift)
  return seg, np.asarray(lay.block_start)


def _block_lengths_ok(starts, max_block):
  pos = np.arange(starts.shape[1])
  assert np.all(starts <= pos) and np.all(pos - starts < max_block)


# XLA:CPU at backend optimisation level 0 compiles these graphs ~2.5x faster; the tests are
# compile-bound.
_FAST = {'xla_backend_optimization_level': 0}
_CHUNKED = jax.jit(chunked.noisy_delta_rule_chunked, compiler_options=_FAST,
                   static_argnames=('scale', 'chunk_size', 'max_block', 'chunks_per_step'))
_SCAN = jax.jit(two_stream_gdn.noisy_delta_rule, compiler_options=_FAST,
                static_argnames=('scale', 'schedule', 'chunk_size', 'max_block'))


def _run(schedule, clean, noisy, seg, starts, **kw):
  """Jitted once per (schedule, shapes, static arguments): tests reuse the compilations."""
  if schedule == 'chunked':
    return _CHUNKED(clean, noisy, jnp.asarray(seg), jnp.asarray(starts), scale=SCALE, **kw)
  return _SCAN(clean, noisy, jnp.asarray(seg), jnp.asarray(starts), scale=SCALE,
               schedule=schedule, **kw)


def _grads(schedule, clean, noisy, seg, starts, cot, **kw):
  seg, starts = jnp.asarray(seg), jnp.asarray(starts)
  if schedule == 'chunked':
    f = lambda c, n: chunked.noisy_delta_rule_chunked(c, n, seg, starts, scale=SCALE, **kw)
  else:
    f = lambda c, n: two_stream_gdn.noisy_delta_rule(c, n, seg, starts, scale=SCALE,
                                                      schedule=schedule, **kw)
  grad = jax.grad(lambda c, n: jnp.sum(cot * f(c, n)), argnums=(0, 1))
  return jax.tree.leaves(jax.jit(grad, compiler_options=_FAST)(clean, noisy))


@pytest.mark.parametrize(
    't, chunk, max_block, views, h, hv',
    [(100, 16, 16, 2, 1, 2), (130, 32, 32, 1, 2, 4), (130, 64, 7, 2, 1, 2), (100, 16, 1, 2, 1, 1)],
    ids=['t100c16mb16', 't130c32mb32v1gva', 't130c64mb7', 't100c16mb1'])
def test_chunked_equals_simple_on_random_layouts(rng, t, chunk, max_block, views, h, hv):
  seg, starts = _random_layout(rng, 2, t, max_block)
  _block_lengths_ok(starts, max_block)
  clean, noisy = _inputs(rng, 2, t, views, h, hv)
  want = _run('simple', clean, noisy, seg, starts)
  got = _run('chunked', clean, noisy, seg, starts, chunk_size=chunk, max_block=max_block)
  assert got.shape == want.shape == (2, views, t, hv, DV)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_chunked_equals_simple_under_strong_decay_and_full_writes(rng):
  """g down to -20 and beta = 1: e^G underflows inside chunks and blocks; nothing may blow up."""
  t, mb = 100, 16
  seg, starts = _random_layout(rng, 2, t, mb)
  clean, noisy = _inputs(rng, 2, t, 2, 1, 2)
  strong = lambda xs: xs[:3] + (xs[3] * 40, jnp.ones_like(xs[4]))
  clean, noisy = strong(clean), strong(noisy)
  want = _run('simple', clean, noisy, seg, starts)
  got = _run('chunked', clean, noisy, seg, starts, chunk_size=16, max_block=mb)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('block, shift, chunk', [(1, True, 16), (4, True, 16), (5, False, 16),
                                                 (16, True, 16), (32, True, 32)],
                         ids=['b1', 'b4', 'b5_noshift', 'b16', 'b32'])
def test_chunked_equals_simple_and_lean_on_real_layouts(rng, block, shift, chunk):
  t = 100
  seg, starts = _real_layout(t, block, shift)
  _block_lengths_ok(starts, block)
  clean, noisy = _inputs(rng, 2, t, 2, 1, 2)
  want = _run('simple', clean, noisy, seg, starts)
  # max_block is an upper bound: one compilation serves every block size up to the chunk.
  got = _run('chunked', clean, noisy, seg, starts, chunk_size=chunk, max_block=chunk)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  if block == 4:
    lean = _run('lean', clean, noisy, seg, starts, chunk_size=chunk, max_block=chunk)
    np.testing.assert_allclose(got, lean, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('layout', ['random', 'real'])
def test_chunked_gradients_equal_simple(rng, layout):
  t = 100
  if layout == 'random':
    seg, starts = _random_layout(rng, 2, t, 12)
    kw = dict(chunk_size=16, max_block=12, chunks_per_step=3)  # windows grouped under lax.map
    clean, noisy = _inputs(rng, 2, t, 2, 1, 2)
  else:
    seg, starts = _real_layout(t, 6, True)
    kw = dict(chunk_size=32, max_block=6)
    clean, noisy = _inputs(rng, 2, t, 1, 2, 4)
  cot = jnp.asarray(rng.normal(size=(2, noisy[0].shape[1], t, clean[2].shape[2], DV)), jnp.float32)
  want = _grads('simple', clean, noisy, seg, starts, cot)
  got = _grads('chunked', clean, noisy, seg, starts, cot, **kw)
  for name, a, c in zip(NAMES, want, got):
    # Noisy outputs depend on every input but the clean queries.
    assert (float(jnp.max(jnp.abs(a))) > 0) == (name != 'clean q'), name
    assert np.all(np.isfinite(c)), name
    np.testing.assert_allclose(c, a, atol=2e-5, rtol=2e-5, err_msg=name)



# blocks 1 and 2 (~40 s together on CI's 2 cores) are slow: block 3 takes the same short paths
@pytest.mark.parametrize('max_block, chunk', [
    pytest.param(1, 16, marks=pytest.mark.slow), pytest.param(2, 16, marks=pytest.mark.slow),
    (3, 16), (4, 64), (16, 32)])
def test_short_products_as_sums_equal_matmuls(rng, monkeypatch, max_block, chunk):
  """The GPU's form of the short products (exact fp32 multiply-and-sum, `_mm`) gives the CPU's
  matmul form's outputs and gradients, at row tiles of 1, 2, 4 and 16 (the block-1 and block-2
  shapes are where XLA:CPU crashed on other forms)."""
  t = 90
  seg, starts = _random_layout(rng, 2, t, max_block)
  clean, noisy = _inputs(rng, 2, t, 2, 1, 2, kd=20, vd=12)
  cot = jnp.asarray(rng.normal(size=(2, 2, t, 2, 12)), jnp.float32)
  kw = dict(chunk_size=chunk, max_block=max_block)
  results = {}
  for sums in (False, True):
    monkeypatch.setattr(chunked, '_short_products_as_sums', lambda sums=sums: sums)
    # New functions each time: jax.jit must trace again under the patched choice.
    out = jax.jit(lambda c, n: chunked.noisy_delta_rule_chunked(
        c, n, jnp.asarray(seg), jnp.asarray(starts), scale=SCALE, **kw))(clean, noisy)
    results[sums] = [out] + _grads('chunked', clean, noisy, seg, starts, cot, **kw)
  for name, a, b in zip(['output'] + NAMES, results[True], results[False]):
    assert np.all(np.isfinite(a)), name
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5, err_msg=name)

def test_chunked_result_does_not_depend_on_chunk_size_or_grouping(rng):
  t, mb = 100, 16
  seg, starts = _random_layout(rng, 2, t, mb)
  clean, noisy = _inputs(rng, 2, t, 2, 1, 2)
  outs = [_run('chunked', clean, noisy, seg, starts, chunk_size=c, max_block=mb) for c in (16, 64)]
  # chunk_size < max_block is raised to max_block; chunks_per_step groups windows under lax.map.
  outs.append(_run('chunked', clean, noisy, seg, starts, chunk_size=8, max_block=mb,
                   chunks_per_step=3))
  for o in outs[1:]:
    np.testing.assert_allclose(o, outs[0], atol=1e-5, rtol=1e-5)


def test_noisy_block_perturbation_stays_in_its_block(rng):
  t, mb = 100, 16
  seg, starts = _random_layout(rng, 2, t, mb)
  clean, noisy = _inputs(rng, 2, t, 2, 1, 2)
  j = 57
  bump = lambda x: x.at[0, 1, j].add(0.3)  # row 0, view 1, slot j: v and beta
  moved = (noisy[0], noisy[1], bump(noisy[2]), noisy[3], bump(noisy[4]))
  d = np.abs(np.asarray(_run('chunked', clean, moved, seg, starts, chunk_size=16, max_block=mb)
                        - _run('chunked', clean, noisy, seg, starts, chunk_size=16, max_block=mb)))
  changed = d.max(axis=(3, 4))  # B V T
  own = (starts[0] == starts[0, j]) & (np.arange(t) >= j)
  assert np.all(changed[0, 1][own] > 0)
  assert np.all(changed[0, 1][~own] == 0) and np.all(changed[0, 0] == 0) and np.all(changed[1] == 0)


@pytest.mark.parametrize('nt, tile', [(5, 8), (3, 32), (1, 16)])
def test_banded_solve_equals_a_dense_solve(rng, nt, tile):
  w = nt * tile
  lengths = []
  while sum(lengths) < w:  # blocks of 1..tile rows, not aligned with the tiles
    lengths.append(int(rng.integers(1, tile + 1)))
  block = np.repeat(np.arange(len(lengths)), lengths)[:w]
  mask = (block[:, None] == block[None, :]) & np.tri(w, k=-1, dtype=bool)
  a = np.where(mask, rng.normal(size=(3, w, w)) * 0.5, 0.0)
  rhs = rng.normal(size=(3, w, 5))
  want = np.linalg.solve(np.eye(w) + a, rhs)
  # Band form: row tile i against column tiles i-1 and i.
  padded = np.pad(a, ((0, 0), (0, 0), (tile, 0)))  # column j + tile
  band = np.stack([padded[:, i * tile:(i + 1) * tile, i * tile:(i + 2) * tile] for i in range(nt)],
                  axis=1)
  got = jax.jit(chunked._banded_solve, compiler_options=_FAST)(
      jnp.asarray(band, jnp.float32), jnp.asarray(rhs.reshape(3, nt, tile, 5), jnp.float32))
  np.testing.assert_allclose(np.asarray(got).reshape(3, w, 5), want, atol=1e-5, rtol=1e-5)


def test_rejects_bad_arguments(rng):
  seg, starts = _random_layout(rng, 1, 20, 4)
  clean, noisy = _inputs(rng, 1, 20, 1, 1, 1)
  with pytest.raises(ValueError, match='max_block'):
    chunked.noisy_delta_rule_chunked(clean, noisy, seg, starts, scale=SCALE, max_block=0)
  with pytest.raises(ValueError, match='chunks_per_step'):
    chunked.noisy_delta_rule_chunked(clean, noisy, seg, starts, scale=SCALE, chunks_per_step=0)
