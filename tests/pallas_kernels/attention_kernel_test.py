"""Pallas flash attention against the XLA reference, and the conservativeness of its tile table.

CPU: the kernels in interpret mode, fp32, at small awkward shapes with small tiles (so that many
tiles are skipped): outputs and dq, dk, dv through `jax.vjp` with random cotangents, for plain
causal, packed documents, two-stream rows (V = 1, 2; block sizes 1..4, from
`flare_jax.objective.layout`), GQA, T and D off the tile sizes, the model's KV-cache metadata
(S != T), random metadata and rows that see nothing; the Triton lowering for CUDA (no GPU needed).
GPU: bf16 at the model's shapes (two-stream T = 4096, V = 2, block 4; Hq 16 / Hkv 4 / D 256) against
the fp32 XLA path at HIGHEST precision, with relative-RMS limits; fp32 at awkward shapes.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flare_jax.model import attention as model_attention
from flare_jax.objective import layout as layout_lib
from pallas_kernels._common import testing
from pallas_kernels.attention import api
from pallas_kernels.attention import mask as mask_lib
from pallas_kernels.attention import pallas
from pallas_kernels.attention import xla

# Small tiles, different per kernel, so that each kernel walks its own visit lists.
SMALL = pallas.BlockSizes(block_q=16, block_k=16, num_warps=4, block_q_dq=16, block_k_dq=32,
                          num_warps_dq=4, block_q_dkv=32, block_k_dkv=16, num_warps_dkv=4)


# ---------------------------------------------------------------------------------------------
# Metadata builders.
# ---------------------------------------------------------------------------------------------
def _meta(*fields) -> mask_lib.TokenMeta:
  return mask_lib.TokenMeta(*(jnp.asarray(np.asarray(x), jnp.int32) for x in fields))


def _doc_positions(seg: np.ndarray) -> np.ndarray:
  """Positions restarting at every segment change, [B, T]."""
  pos = np.zeros_like(seg)
  for b in range(seg.shape[0]):
    for t in range(1, seg.shape[1]):
      pos[b, t] = 0 if seg[b, t] != seg[b, t - 1] else pos[b, t - 1] + 1
  return pos


def _segments(b, t, cuts):
  seg = np.ones((b, t), np.int32)
  for c in cuts:
    seg[:, c:] += 1
  return seg


def _clean(b, t, cuts=()):
  seg = _segments(b, t, cuts)
  return mask_lib.clean_meta(jnp.asarray(seg), jnp.asarray(_doc_positions(seg)))


def _two_stream(b, t, views, block_size, cuts=(), prompt=3, logit_shift=True):
  """Metadata [B, (1 + views) T] of a two-stream row built by the objective's layout code: packed
  documents (starting at `cuts`) whose first `prompt` tokens are prompt, the rest response."""
  seg = _segments(b, t, cuts)
  pos = _doc_positions(seg)
  response = jnp.asarray(pos >= prompt)
  tokens = jnp.zeros((b, t), jnp.int32)
  seg, pos = jnp.asarray(seg), jnp.asarray(pos)
  lay = layout_lib.block_layout(tokens, seg, response, block_size=block_size,
                                logit_shift=logit_shift)
  masked = jnp.zeros((b, views, t), bool)
  return layout_lib.two_stream_input(tokens, seg, pos, lay, masked, mask_id=1,
                                     logit_shift=logit_shift).meta


def _cache(b, t, s, starts, noisy):
  """(q_meta [B, T], k_meta [B, S]) as the model builds them over a KV cache of S slots: row b's T
  new tokens at positions starts[b]..; clean, or one noisy block (view 1) starting at starts[b]."""
  pos = np.asarray(starts)[:, None] + np.arange(t)[None]
  start = np.broadcast_to(np.asarray(starts)[:, None], (b, t)) if noisy else pos
  q_meta = _meta(np.zeros((b, t)), pos, np.full((b, t), int(noisy)), start)
  return q_meta, model_attention.cache_key_meta(q_meta, s)


def _random_meta(rng, b, n, *, sorted_segments=False):
  """Arbitrary metadata: few segments, views 0..2, positions 0..23, block starts <= positions."""
  seg = rng.integers(0, 3, (b, n))
  if sorted_segments:
    seg = np.sort(seg, axis=1)
  pos = rng.integers(0, 24, (b, n))
  views = rng.integers(1, 3, (b, n)) * (rng.random((b, n)) < 0.5)
  starts = np.where(views > 0, pos - rng.integers(0, 4, (b, n)), pos)
  return _meta(seg, pos, views, starts)


def _random_runs_meta(rng, b, n):
  """Row-like random metadata: runs of 3..20 tokens, each clean or a noisy view 1..3 with random
  block size, of one of 3 segments, at increasing positions from a random offset. Tiles then have
  narrow ranges, so every rule of the tile table decides some tiles."""
  fields = np.zeros((4, b, n), np.int64)
  for row in range(b):
    t = 0
    while t < n:
      size = min(int(rng.integers(3, 21)), n - t)
      pos = int(rng.integers(0, 30)) + np.arange(size)
      view = int(rng.integers(0, 4))
      block = int(rng.integers(1, 6))
      start = pos - pos % block if view else pos
      fields[0, row, t:t + size] = rng.integers(0, 3)
      fields[1:, row, t:t + size] = np.stack([pos, np.full(size, view), start])
      t += size
  return _meta(*fields)


def _with_dead_rows(meta: mask_lib.TokenMeta, rows) -> mask_lib.TokenMeta:
  """Moves the query tokens `rows` of every batch row to a segment no key has (they see nothing)."""
  seg = np.array(meta.segment_ids)
  seg[:, list(rows)] = 99
  return meta._replace(segment_ids=jnp.asarray(seg))


# ---------------------------------------------------------------------------------------------
# Comparison against the XLA path.
# ---------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=('impl', 'block_sizes'))
def _vjp(q, k, v, q_meta, k_meta, do, *, impl, block_sizes=SMALL):
  """o and (dq, dk, dv) for the cotangent `do`."""
  scale = q.shape[-1] ** -0.5
  if impl == 'pallas':
    fn = lambda q, k, v: pallas.attention_pallas(q, k, v, q_meta, k_meta, scale=scale,
                                                 block_sizes=block_sizes, interpret=True)
  else:
    fn = lambda q, k, v: xla.attention_xla(q, k, v, q_meta, k_meta, scale=scale, q_tile=16)
  o, vjp = jax.vjp(fn, q, k, v)
  return o, vjp(do.astype(o.dtype))


def _inputs(rng, b, t, s, h, hkv, d, dtype=jnp.float32):
  """q [B,T,H,D], k, v [B,S,Hkv,D] and a cotangent do, fp32 normal (cast to dtype)."""
  x = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)
  return x(b, t, h, d), x(b, s, hkv, d), x(b, s, hkv, d), x(b, t, h, d)


def _assert_matches_xla(q, k, v, do, q_meta, k_meta, label, block_sizes=SMALL):
  o, grads = _vjp(q, k, v, q_meta, k_meta, do, impl='pallas', block_sizes=block_sizes)
  o_ref, grads_ref = _vjp(q, k, v, q_meta, k_meta, do, impl='xla')
  np.testing.assert_allclose(o, o_ref, atol=2e-5, rtol=1e-4, err_msg=f'{label}: o')
  for name, a, b in zip(('dq', 'dk', 'dv'), grads, grads_ref):
    np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4, err_msg=f'{label}: {name}')


def _dead_queries(q_meta, k_meta) -> np.ndarray:
  return ~np.asarray(mask_lib.visible(q_meta, k_meta)).any(-1)


@pytest.mark.parametrize('heavy_first', [True, False], ids=['heavy_first', 'tile_order'])
def test_causal_and_packed_gqa_ragged(rng, heavy_first):
  """T = 37 (off every tile size), D = 8 (padded to 16), 4 query heads on 2 kv heads; programs
  launched heaviest first (the default) or in tile order."""
  block_sizes = dataclasses.replace(SMALL, heavy_first=heavy_first)
  q, k, v, do = _inputs(rng, 2, 37, 37, 4, 2, 8)
  for label, meta in [('causal', _clean(2, 37)), ('packed', _clean(2, 37, cuts=(5, 6, 20))),
                      ('dead rows', _with_dead_rows(_clean(2, 37, cuts=(11,)), (0, 12, 36)))]:
    _assert_matches_xla(q, k, v, do, meta, meta, label, block_sizes=block_sizes)


def _step_rows(q, k, v, vis, tau, scale=0.5):
  """(o [bq, D], lse [bq]) of `pallas.online_softmax_step` over the key tiles k, v [n, bk, D] with
  visibility vis [n, bq, bk]."""
  carry = pallas.softmax_init(*q.shape)
  for j in range(k.shape[0]):
    carry = pallas.online_softmax_step(q, k[j], v[j], vis[j], carry, scale, tau)
  acc, m, l = carry
  return acc / l[:, None], m + jnp.log2(l)


def test_lazy_rescale_step_equals_the_running_max_and_keeps_rows_independent(rng):
  """online_softmax_step with a rescale threshold: on keys whose scores climb tile by tile (so the
  reference max moves on some tiles and stays on others), o and lse equal the running-max step's;
  and a row's results are bit for bit the same whatever the other rows of its tile do."""
  n, bq, bk, d = 6, 8, 16, 16
  q = jnp.asarray(rng.standard_normal((bq, d)), jnp.float32)
  growth = jnp.asarray(1.0 + 0.6 * np.arange(n), jnp.float32)[:, None, None]
  k = jnp.asarray(rng.standard_normal((n, bk, d)), jnp.float32) * growth
  v = jnp.asarray(rng.standard_normal((n, bk, d)), jnp.float32)
  vis = jnp.asarray(rng.random((n, bq, bk)) < 0.8)
  want_o, want_lse = _step_rows(q, k, v, vis, None)
  for tau in (1.0, 8.0):
    o, lse = _step_rows(q, k, v, vis, tau)
    np.testing.assert_allclose(o, want_o, rtol=1e-5, atol=1e-6, err_msg=f'tau={tau}')
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5, err_msg=f'tau={tau}')
  # Independence: row 0's scores rise by less than tau = 8 (base 2) on tile 1, so its max stays;
  # row 1's rise by as little (q_a) or far more (q_b: its max moves, so acc is rescaled there).
  # Row 0 must come out the same bit for bit.
  k = np.zeros((3, 2, 4), np.float32)
  k[:, :, 0] = k[:, :, 1] = [[0.0, 0.1], [1.0, 0.2], [0.5, 0.3]]
  k = jnp.asarray(k)
  v = jnp.asarray(rng.standard_normal((3, 2, 4)), jnp.float32)
  vis = jnp.ones((3, 2, 2), bool)
  q_a = jnp.asarray([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
  q_b = q_a.at[1].multiply(10.0)
  a, b = _step_rows(q_a, k, v, vis, 8.0, scale=1.0), _step_rows(q_b, k, v, vis, 8.0, scale=1.0)
  np.testing.assert_array_equal(a[0][0], b[0][0])
  np.testing.assert_array_equal(a[1][0], b[1][0])


@pytest.mark.parametrize('tau', [0, 1, 8])
def test_lazy_rescale_kernel_matches_xla(rng, tau):
  """BlockSizes.lazy_rescale off (0) and on, on keys whose scores grow along the row (so rows'
  maxima move on later tiles, past tau = 1 often and tau = 8 sometimes), causal with packed
  documents and dead rows, and a two-stream row."""
  lazy = SMALL.with_fields(f'lazy_rescale={tau}')
  q, k, v, do = _inputs(rng, 2, 45, 45, 4, 2, 16)
  k = k * jnp.linspace(1.0, 6.0, 45)[None, :, None, None]
  for label, meta in [('packed', _clean(2, 45, cuts=(7, 30))),
                      ('dead rows', _with_dead_rows(_clean(2, 45, cuts=(11,)), (0, 12, 44)))]:
    _assert_matches_xla(q, k, v, do, meta, meta, label, block_sizes=lazy)
  meta = _two_stream(2, 15, 2, 4, cuts=(6,))
  _assert_matches_xla(q, k, v, do, meta, meta, 'two-stream', block_sizes=lazy)


def test_launch_order_runs_each_rows_longest_programs_first():
  """On two rows (packed documents, and causal) the order is a permutation of the (row, tile) ids
  taking the rows in order and, within each, tiles whose visit counts never rise, ties in id order;
  without heavy_first it is the identity."""
  seg = np.where(np.arange(64) < 40, 1, 2)[None].repeat(2, 0)
  seg[1] = 1
  meta = mask_lib.clean_meta(jnp.asarray(seg), jnp.asarray(_doc_positions(seg)))
  visit = pallas._visit_lists(meta, meta, 16, 16)  # pylint: disable=protected-access
  counts = np.asarray(visit[..., 1]).reshape(-1)
  order = np.asarray(pallas._launch_order(visit, True))  # pylint: disable=protected-access
  assert sorted(order) == list(range(8))
  rows = order // visit.shape[1]
  assert np.all(np.diff(rows) >= 0), order
  for row in (0, 1):
    in_row = order[rows == row]
    ties = [(counts[a], a) for a in in_row]
    assert ties == sorted(ties, key=lambda x: (-x[0], x[1])), ties
  # Row 0 visits 2, 3, 4, 2 tiles (the tables are conservative), row 1 (causal) 1, 2, 3, 4.
  assert list(order) == [2, 1, 0, 3, 7, 6, 5, 4]
  in_tile_order = pallas._launch_order(visit, False)  # pylint: disable=protected-access
  np.testing.assert_array_equal(in_tile_order, np.arange(8))


@pytest.mark.parametrize('fields', ['dkdv_per_q_head+block_k_dkv=16', 'dkdv_per_q_head',
                                    'split_dkdv', 'split_dkdv+dkdv_per_q_head+block_k_dkv=16'])
def test_dkdv_variants_match_xla(rng, fields):
  """BlockSizes.dkdv_per_q_head (one dk/dv program per query head, whose fp32 partials are summed
  over each GQA group) and split_dkdv (dk and dv from two kernels) equal the XLA path: causal
  (GQA 4 -> 2), dead rows, two-stream (4 -> 1), and cache metadata with stale slots."""
  variant = SMALL.with_fields(fields)
  q, k, v, do = _inputs(rng, 2, 37, 37, 4, 2, 8)
  for label, meta in [('causal', _clean(2, 37)),
                      ('dead rows', _with_dead_rows(_clean(2, 37, cuts=(11,)), (0, 12, 36)))]:
    _assert_matches_xla(q, k, v, do, meta, meta, label, block_sizes=variant)
  meta = _two_stream(2, 13, 2, 3, cuts=(6,))
  q, k, v, do = _inputs(rng, 2, 39, 39, 4, 1, 12)
  _assert_matches_xla(q, k, v, do, meta, meta, 'two-stream', block_sizes=variant)
  q, k, v, do = _inputs(rng, 2, 5, 40, 4, 2, 16)
  q_meta, k_meta = _cache(2, 5, 40, starts=(0, 23), noisy=True)
  _assert_matches_xla(q, k, v, do, q_meta, k_meta, 'cache', block_sizes=variant)



def test_block_sizes_with_fields_parses_the_bench_syntax():
  """'FIELD[=N]+...' as bench_attention rows, kernel_registers and the GPU tests write it."""
  base = pallas.BlockSizes.get_default(256, jnp.bfloat16)
  assert not base.dkdv_per_q_head and base.with_fields('') == base
  per_head = base.with_fields('dkdv_per_q_head+block_k_dkv=16+num_stages=3')
  assert per_head == dataclasses.replace(base, dkdv_per_q_head=True, block_k_dkv=16, num_stages=3)
  assert per_head.with_fields('dkdv_per_q_head=0').dkdv_per_q_head is False
  with pytest.raises(ValueError, match="no field 'block_kv'"):
    base.with_fields('block_kv=32')
  with pytest.raises(ValueError, match='must be an integer'):
    base.with_fields('block_k_dkv=x')

@pytest.mark.parametrize('views, t, d', [(1, 21, 16), (2, 13, 12)], ids=['v1', 'v2'])
def test_two_stream_rows(rng, views, t, d):
  """Two-stream rows from the layout code, block sizes 1..4, packed documents, with and without
  logit shift. (1 + V) T = 42 or 39 tokens, GQA 4 -> 1."""
  n = (1 + views) * t
  q, k, v, do = _inputs(rng, 2, n, n, 4, 1, d)
  for block in (1, 2, 3, 4):
    for cuts, shift in (((), True), ((8,), True), ((6,), False)):
      meta = _two_stream(2, t, views, block, cuts=cuts, logit_shift=shift)
      _assert_matches_xla(q, k, v, do, meta, meta, f'block {block} cuts {cuts} shift {shift}')


def test_kv_cache_metadata(rng):
  """The model's cache case: T = 5 new tokens over S = 40 slots (stale slots past the new tokens),
  clean and noisy, at different offsets per row; one row also has dead queries."""
  q, k, v, do = _inputs(rng, 2, 5, 40, 4, 2, 16)
  for noisy in (False, True):
    q_meta, k_meta = _cache(2, 5, 40, starts=(0, 23), noisy=noisy)
    _assert_matches_xla(q, k, v, do, q_meta, k_meta, f'noisy={noisy}')
  q_meta, k_meta = _cache(2, 5, 40, starts=(35, 9), noisy=True)
  q_meta = _with_dead_rows(q_meta, (1, 3))
  assert _dead_queries(q_meta, k_meta).sum() == 4
  _assert_matches_xla(q, k, v, do, q_meta, k_meta, 'dead rows')


def test_random_metadata_and_silent_rows_give_zeros(rng):
  """Arbitrary metadata (noisy keys anywhere, dead rows): the kernels are exact for any metadata;
  queries that see nothing output zeros and pass no gradient."""
  q, k, v, do = _inputs(rng, 2, 50, 45, 2, 2, 16)
  for sorted_segments in (False, True):
    q_meta = _random_meta(rng, 2, 50, sorted_segments=sorted_segments)
    k_meta = _random_meta(rng, 2, 45, sorted_segments=sorted_segments)
    _assert_matches_xla(q, k, v, do, q_meta, k_meta, f'sorted={sorted_segments}')
  dead = _dead_queries(q_meta, k_meta)
  assert dead.any() and not dead.all()
  o, (dq, _, _) = _vjp(q, k, v, q_meta, k_meta, do, impl='pallas')
  np.testing.assert_array_equal(np.asarray(o)[dead], 0.0)
  np.testing.assert_array_equal(np.asarray(dq)[dead], 0.0)
  # Keys no query sees get no gradient either.
  unseen = ~np.asarray(mask_lib.visible(q_meta, k_meta)).any(-2)
  _, (_, dk, dv) = _vjp(q, k, v, q_meta, k_meta, do, impl='pallas')
  np.testing.assert_array_equal(np.asarray(dk)[unseen], 0.0)
  np.testing.assert_array_equal(np.asarray(dv)[unseen], 0.0)


def test_bf16_interpret_within_rms_limits(rng):
  """bf16 operands (bf16 P and dS into the MMAs, fp32 accumulation) against the fp32 XLA path."""
  q, k, v, do = _inputs(rng, 1, 39, 39, 2, 1, 32)
  meta = _two_stream(1, 13, 2, 4)
  args16 = [x.astype(jnp.bfloat16) for x in (q, k, v, do)]
  o, grads = _vjp(*args16[:3], meta, meta, args16[3], impl='pallas')
  o_ref, grads_ref = _vjp(q, k, v, meta, meta, do, impl='xla')
  assert o.dtype == jnp.bfloat16
  testing.assert_close('o', o, o_ref, 1e-2)
  for name, a, b in zip(('dq', 'dk', 'dv'), grads, grads_ref):
    testing.assert_close(name, a, b, 2e-2)


@pytest.mark.parametrize('dtype, d, h, hkv, options',
                         [(jnp.bfloat16, 256, 16, 4, {}), (jnp.float32, 60, 8, 2, {}),
                          (jnp.bfloat16, 256, 16, 4, dict(dkdv_per_q_head=True)),
                          (jnp.bfloat16, 256, 16, 4, dict(lazy_rescale=0)),
                          (jnp.bfloat16, 256, 16, 4, dict(split_dkdv=True, block_k_dkv=128,
                                                          block_q_dkv=32, num_warps_dkv=8))],
                         ids=['bf16_d256_gqa4', 'fp32_d60', 'bf16_d256_gqa4_per_head_dkdv',
                              'bf16_d256_gqa4_running_max', 'bf16_d256_gqa4_split_dkdv'])
def test_kernels_lower_to_triton_for_cuda(dtype, d, h, hkv, options):
  """Without a GPU: the forward, dq and dk/dv kernels (two loops each: full tiles, then the rest)
  lower through Pallas' Triton backend with the default block sizes (power-of-two loads, dot
  operand dtypes, scalar loads of the visit lists). Triton's own compile (shared memory, registers)
  is left to the GPU tests."""
  from jax import export  # pylint: disable=g-import-not-at-top
  t, s = 200, 130  # q and k lengths off the tiles; export never runs the kernels
  q_meta, k_meta = _clean(1, t), _clean(1, s)
  bs = dataclasses.replace(pallas.BlockSizes.get_default(max(16, 1 << (d - 1).bit_length()),
                                                         dtype), **options)

  def fwd_bwd(q, k, v, do):
    fn = lambda q, k, v: pallas.attention_pallas(q, k, v, q_meta, k_meta, block_sizes=bs,
                                                 interpret=False)
    o, vjp = jax.vjp(fn, q, k, v)
    return o, vjp(do)

  spec = lambda n, heads: jax.ShapeDtypeStruct((1, n, heads, d), dtype)
  exported = export.export(
      jax.jit(fwd_bwd), platforms=['cuda'],
      disabled_checks=[export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')])(
          spec(t, h), spec(s, hkv), spec(s, hkv), spec(t, h))
  module = exported.mlir_module()
  kernels = ['flash_attention_fwd', 'flash_attention_dq'] + (
      ['flash_attention_dk', 'flash_attention_dv'] if bs.split_dkdv else ['flash_attention_dkdv'])
  assert module.count('stablehlo.custom_call @__gpu$xla.gpu.triton') == len(kernels)
  for name in kernels:
    assert f'name = "{name}"' in module, name


# ---------------------------------------------------------------------------------------------
# Tile table.
# ---------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=('bq', 'bk'))
def _table_vs_pairs(q_meta, k_meta, *, bq, bk):
  """(table, full table, tile holds a visible pair, every pair of the tile is visible, padding is
  visible), with the metadata padded as the kernel pads it."""
  t, s = q_meta.positions.shape[1], k_meta.positions.shape[1]
  tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
  fields = lambda m, n, query: mask_lib.TokenMeta(
      *jnp.moveaxis(pallas._pad_meta(m, n, query=query), 1, 0))  # pylint: disable=protected-access
  qm, km = fields(q_meta, tp, True), fields(k_meta, sp, False)
  vis = mask_lib.visible(qm, km)
  b = vis.shape[0]
  tiles = vis.reshape(b, tp // bq, bq, sp // bk, bk)
  padding_visible = vis[:, t:].any() | vis[:, :, s:].any()
  return (pallas.tile_visibility(qm, km, bq, bk), pallas.tile_full_visibility(qm, km, bq, bk),
          tiles.any(axis=(2, 4)), tiles.all(axis=(2, 4)), padding_visible)


def _assert_conservative(q_meta, k_meta, bq, bk, label):
  """Every visible pair lies in a marked tile; every pair of a tile marked full is visible; padded
  tokens take no part. Returns (table, full table)."""
  table, full, tile_has_visible, tile_all_visible, padding_visible = map(
      np.asarray, _table_vs_pairs(q_meta, k_meta, bq=bq, bk=bk))
  missed = tile_has_visible & ~table
  assert not missed.any(), f'{label}: visible tiles marked invisible at {np.argwhere(missed)[:5]}'
  wrong = full & ~tile_all_visible
  assert not wrong.any(), (
      f'{label}: tiles with invisible pairs marked full at {np.argwhere(wrong)[:5]}')
  assert not padding_visible, f'{label}: padding is visible'
  return table, full


@pytest.mark.parametrize('bq, bk', [(16, 16), (16, 32), (32, 16)])
def test_tile_table_is_conservative_on_random_metadata(bq, bk):
  rng = np.random.default_rng(bq * 7 + bk)
  for trial in range(40):
    sorted_segments = bool(trial % 2)
    if trial % 4 < 2:
      q_meta = _random_meta(rng, 2, 83, sorted_segments=sorted_segments)
      k_meta = _random_meta(rng, 2, 61, sorted_segments=sorted_segments)
    else:
      q_meta, k_meta = _random_runs_meta(rng, 2, 83), _random_runs_meta(rng, 2, 61)
    _assert_conservative(q_meta, k_meta, bq, bk, f'trial {trial}')


def test_tile_table_is_conservative_and_sparse_on_two_stream_rows():
  for block in (1, 2, 3, 4):
    meta = _two_stream(1, 128, 2, block, cuts=(50,), prompt=5)
    table, full = _assert_conservative(meta, meta, 16, 16, f'block {block}')
    # Clean tiles see the causal lower half, noisy tiles the clean prefix and their own diagonal:
    # well under half of the 24 x 24 tiles are visited, some of them without a mask.
    assert table.mean() < 0.45, table.mean()
    assert full.any()
  q_meta, k_meta = _cache(2, 5, 40, starts=(0, 23), noisy=True)
  _assert_conservative(q_meta, k_meta, 16, 16, 'cache')


def test_full_tiles_of_a_causal_row_are_those_below_the_diagonal():
  """Plain causal attention over T = 100 (off the tiles): the full table is exactly the q tiles'
  strictly earlier k tiles, but for the last q tile (it holds padded queries), and the visit lists
  put them first, unmasked."""
  meta = _clean(1, 100)
  table, full = _assert_conservative(meta, meta, 16, 32, 'causal')
  q_tile, k_tile = np.arange(7)[:, None], np.arange(4)[None, :]
  np.testing.assert_array_equal(full[0], (32 * (k_tile + 1) <= 16 * q_tile) & (q_tile < 6))
  np.testing.assert_array_equal(table[0], 32 * k_tile <= 16 * q_tile + 15)
  fields = lambda n, query: pallas._fields(pallas._pad_meta(meta, n, query=query))  # pylint: disable=protected-access
  visit = np.asarray(pallas._visit_lists(fields(112, True), fields(128, False), 16, 32))  # pylint: disable=protected-access
  for i, row in enumerate(visit[0]):
    n_full, n_all = row[0], row[1]
    assert list(row[2:2 + n_all]) == sorted(np.flatnonzero(full[0, i])) + sorted(
        np.flatnonzero(table[0, i] & ~full[0, i])), (i, row)
    assert n_full == full[0, i].sum() and n_all == table[0, i].sum()


# ---------------------------------------------------------------------------------------------
# Dispatch.
# ---------------------------------------------------------------------------------------------
def test_api_dispatch(rng, caplog):
  q, k, v, _ = _inputs(rng, 1, 20, 20, 2, 1, 16)
  meta = _clean(1, 20, cuts=(7,))
  want = api.attention(q, k, v, meta, meta)  # default: xla
  got = api.attention(q, k, v, meta, meta, implementation='pallas')
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
  big = jnp.zeros((1, 4, 1, 320), jnp.float32)  # D > 256: logged fallback to xla
  meta4 = _clean(1, 4)
  with caplog.at_level('WARNING'):
    out = api.attention(big, big, big, meta4, meta4, implementation='pallas')
  assert out.shape == big.shape
  assert 'D=320' in caplog.text and 'using xla' in caplog.text
  with pytest.raises(ValueError, match='unknown attention implementation'):
    api.attention(q, k, v, meta, meta, implementation='triton')
  with pytest.raises(ValueError, match='D=320'):
    pallas.attention_pallas(big, big, big, meta4, meta4)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------
GPU_LIMITS = {'o': 5e-3, 'dq': 1e-2, 'dk': 1e-2, 'dv': 1e-2}


@functools.partial(jax.jit, static_argnames=('impl',))
def _gpu_vjp(q, k, v, q_meta, k_meta, do, *, impl):
  """impl: 'xla', 'pallas' (api dispatch) or 'pallas+FIELD[=N]...' (default tiles with those
  BlockSizes fields, `BlockSizes.with_fields`)."""
  fn = functools.partial(api.attention, q_meta=q_meta, k_meta=k_meta, implementation=impl)
  if impl.startswith('pallas+'):
    bs = pallas.BlockSizes.get_default(q.shape[-1], q.dtype).with_fields(impl.partition('+')[2])
    fn = functools.partial(pallas.attention_pallas, q_meta=q_meta, k_meta=k_meta, block_sizes=bs)
  o, vjp = jax.vjp(fn, q, k, v)
  return o, vjp(do.astype(o.dtype))


def _gpu_compare(q, k, v, do, q_meta, k_meta, impl='pallas'):
  """bf16 pallas and bf16 xla against fp32 xla at HIGHEST precision. Each tensor must meet its
  limit or be no worse than 1.25x the bf16 XLA path's error."""
  with jax.default_matmul_precision('highest'):
    want = _gpu_vjp(q, k, v, q_meta, k_meta, do, impl='xla')
  args16 = [x.astype(jnp.bfloat16) for x in (q, k, v, do)]
  got = _gpu_vjp(*args16[:3], q_meta, k_meta, args16[3], impl=impl)
  base = _gpu_vjp(*args16[:3], q_meta, k_meta, args16[3], impl='xla')
  names = ('o', 'dq', 'dk', 'dv')
  for name, a, b, w in zip(names, jax.tree.leaves(got), jax.tree.leaves(base),
                           jax.tree.leaves(want)):
    err, err_xla = testing.rms_ratio(a, w), testing.rms_ratio(b, w)
    print(f'{name}: pallas {err:.2e}, xla bf16 {err_xla:.2e}')
    assert np.isfinite(err) and err <= max(GPU_LIMITS[name], 1.25 * err_xla), (name, err, err_xla)


@pytest.mark.gpu
@pytest.mark.parametrize('b, impl', [(1, 'pallas'), (2, 'pallas'), (1, 'pallas+dkdv_per_q_head'),
                                     (2, 'pallas+lazy_rescale=0')])
def test_gpu_two_stream_model_shape(b, impl):
  """T = 4096, V = 2, block 4 (12288 tokens), Hq 16 / Hkv 4 / D 256, two documents per row."""
  rng = np.random.default_rng(0)
  t = 4096
  meta = _two_stream(b, t, 2, 4, cuts=(1500,), prompt=64)
  q, k, v, do = _inputs(rng, b, 3 * t, 3 * t, 16, 4, 256)
  _gpu_compare(q, k, v, do, meta, meta, impl)


@pytest.mark.gpu
@pytest.mark.parametrize('impl', ['pallas', 'pallas+dkdv_per_q_head', 'pallas+lazy_rescale=0',
                                  'pallas+split_dkdv+block_k_dkv=128+block_q_dkv=32'
                                  '+num_warps_dkv=8',
                                  # the sm_86 / sm_89 defaults (BlockSizes.get_default)
                                  'pallas+block_q=64+block_k=32+block_q_dq=32+block_k_dq=32'
                                  '+block_q_dkv=32'])
def test_gpu_causal_model_shape(impl):
  rng = np.random.default_rng(1)
  meta = _clean(2, 4096, cuts=(1000,))
  q, k, v, do = _inputs(rng, 2, 4096, 4096, 16, 4, 256)
  _gpu_compare(q, k, v, do, meta, meta, impl)


def _fp32_case(name):
  """(q_meta, k_meta, D): a two-stream row (T = 999) or cache metadata (T = 7, S = 700)."""
  if name == 'two_stream':
    meta = _two_stream(2, 333, 2, 3, cuts=(100,))
    return meta, meta, 60
  q_meta, k_meta = _cache(2, 7, 700, starts=(0, 650), noisy=True)
  return _with_dead_rows(q_meta, (2,)), k_meta, 100


@pytest.mark.gpu
@pytest.mark.parametrize('case', ['two_stream', 'cache'])
def test_gpu_fp32_awkward_shapes(case):
  """fp32 (IEEE dots) at T, S, D off the tiles, GQA 8 -> 2, cache metadata and dead rows."""
  rng = np.random.default_rng(2)
  q_meta, k_meta, d = _fp32_case(case)
  t, s = q_meta.positions.shape[1], k_meta.positions.shape[1]
  q, k, v, do = _inputs(rng, 2, t, s, 8, 2, d)
  with jax.default_matmul_precision('highest'):
    want = _gpu_vjp(q, k, v, q_meta, k_meta, do, impl='xla')
  got = _gpu_vjp(q, k, v, q_meta, k_meta, do, impl='pallas')
  for name, a, w in zip(('o', 'dq', 'dk', 'dv'), jax.tree.leaves(got), jax.tree.leaves(want)):
    testing.assert_close(f'{case} {name}', a, w, 1e-4)
