"""Attention of a few queries over a KV cache in one Pallas kernel (decode steps, draft and verify
blocks).

The flash kernels (`pallas.py`) tile queries by 64 and read K/V once per query head, which a decode
step's one query per head cannot amortise, so XLA has run these calls: per attention layer a
scores GEMM, a mask, two reductions, a cast and a PV GEMM, each a launch of a few microseconds.
Here the programs of one (batch row, kv head) take every query of the kv head's group - T tokens
x G = H / Hkv heads, rows r = t G + g of one [R, D] tile (R padded to 16) - and share its walk
over the key tiles (flash-decoding): program c of `num_splits` runs an online softmax (base 2, as
the flash forward) over its own run of tiles and writes the unnormalised partial result, which
`_combine` weighs by each split's row max; enough splits that the grid fills the GPU
(`splits_for`). Visibility is `mask.visible` of the metadata on every tile, and the walk stops
after the tile holding the row's furthest query position: no query sees a key past it (clean keys
end at their horizon, noisy ones are the call's own block), so the cache's unused tail costs only
programs that exit at once.

The sampler's decode copies reach this kernel through `decode_front` (`attention_decode_rows`:
queries already in the kernel's row layout, normed and rotated, this call's keys in the cache).

Forward only (decoding). Each query row's result depends on its own row and the tiles walked: a
tile, or a whole split, with no visible key leaves it unchanged (the split weighs exactly 0), so
a query gets the same bits whatever else the call holds, as long as R pads to the same size and
the cache (hence the split) is the same.

H200, 2026-12-04 (GPU tests pass at 2B's shapes: bf16 against fp32 XLA within relative RMS 1e-2,
one-token calls equal to a 4-token call bit for bit; the GPU sampler tests pass with it).
`launch.bench_sampler --attn_decode_impl=xla,pallas`, 2B-shaped random model, bf16, one run each,
ms per pass against XLA's: 128-token prompts, 128 new tokens: AR 1.81 / 1.84 (batch 1), 1.71 /
1.78 (batch 8); AR-Trust 1.73 / 1.76, 2.15 / 2.27; Diffusion-Trust k=4 2.23 / 2.41, 3.23 / 3.27.
2048-token prompts: AR 1.96 / 1.98, 2.49 / 2.50; AR-Trust 1.88 / 2.04, 3.03 / 3.26. Before the
split (one program per row and kv head: 16 programs at batch 8) the AR step had measured 1.94
against XLA's 1.90. The call alone (`launch.bench_attention_decode`, 16 chained calls, caches that
fit the 50 MB L2, so noisy) favours more splits at B=8, S=2176, T=1 (one tile per program 38 us,
the default 17 splits 43, XLA 35) and fewer at S=8192 (17 splits 73 us, 128 splits 97, XLA 73).
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import backend
from pallas_kernels.attention import mask as mask_lib
from pallas_kernels.attention import pallas as flash

_N_FIELDS = len(mask_lib.TokenMeta._fields)

_MIN_ROWS = 16  # tensor-core products take >= 16 rows
MAX_ROWS = 64  # T x G above this: the flash kernels' query tiles pay off
BLOCK_K = 64
NUM_WARPS = 4
TARGET_PROGRAMS = 264  # two per SM of an H100 / H200: the key walk splits until the grid has these


def query_rows(q_shape, k_shape) -> int:
  """T x G: the query rows of one program, for q [B, T, H, D] over k [B, S, Hkv, D]."""
  return q_shape[1] * (q_shape[2] // k_shape[2])


def kernel_takes(q, k, v, block_k: int = BLOCK_K) -> str | None:
  """None if the kernel takes q [B, T, H, D] over a cache k, v [B, S, Hkv, D] (arrays or
  ShapeDtypeStructs), else why not."""
  d, s = q.shape[3], k.shape[1]
  if query_rows(q.shape, k.shape) > MAX_ROWS:
    return f'T x G = {query_rows(q.shape, k.shape)} query rows > {MAX_ROWS}'
  if d < 16 or not backend.is_pow2(d):
    return f'head dim D={d} is not a power of two >= 16'
  if s % block_k:
    return f'cache length S={s} is not a multiple of the key tile {block_k}'
  return flash.unsupported_reason(q, k, v)  # D <= 256 and the dtypes


def splits_for(b: int, hkv: int, n_tiles: int, target_programs: int = TARGET_PROGRAMS) -> int:
  """Programs per (batch row, kv head) sharing its key walk: enough for ~`target_programs` in all,
  at most one per key tile."""
  return max(1, min(n_tiles, -(-target_programs // (b * hkv))))


def _kernel(n_ref, q_ref, k_ref, v_ref, qm_ref, km_ref, acc_ref, m_ref, l_ref, *, scale, bk,
            per_split):
  """Program (row i, kv head j, split s) walks key tiles [s, s + 1) * per_split, cut at the row's
  last tile n[i]. Blocks: q [R, D]; k, v [S, D]; metadata [4, R] and [4, S] (TokenMeta fields
  stacked); out: the split's unnormalised acc [R, D], base-2 row max m [R] and denominator l [R]."""
  q = q_ref[...]
  fields = range(_N_FIELDS)
  q_meta = mask_lib.TokenMeta(*(qm_ref[f, :] for f in fields))

  def step(j, carry):
    keys = pl.ds(j * bk, bk)
    vis = mask_lib.visible(q_meta, mask_lib.TokenMeta(*(km_ref[f, keys] for f in fields)))
    return flash.online_softmax_step(q, k_ref[keys, :], v_ref[keys, :], vis, carry, scale)

  first = pl.program_id(2) * per_split
  last = jnp.minimum(first + per_split, n_ref[pl.program_id(0)])
  acc, m, l = jax.lax.fori_loop(first, jnp.maximum(first, last), step,
                                flash.softmax_init(*q.shape))
  acc_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = l


def _combine(acc, m, l):
  """Softmax over the splits' partial results: acc [..., n, R, D], m, l [..., n, R] -> [..., R, D]
  fp32. A split that saw no key (m at its initial value, l = 0) weighs exactly 0 unless none saw
  one; then the result is 0."""
  w = jnp.exp2(m - jnp.max(m, axis=-2, keepdims=True))
  den = jnp.sum(w * l, axis=-2)
  return jnp.sum(w[..., None] * acc, axis=-3) / jnp.where(den > 0.0, den, 1.0)[..., None]


def padded_rows(t: int, grp: int) -> int:
  """Query rows of one program: T x G padded to a power of two >= 16 (tensor-core products)."""
  return max(_MIN_ROWS, backend.next_pow2(t * grp))


def query_rows_layout(q: jax.Array, num_kv_heads: int) -> jax.Array:
  """q [B, T, H, D] -> the kernel's query rows [B, Hkv, Rp, D]: row r = t G + g of kv head j is
  query head j G + g at token t (G = H / Hkv); the rows from T x G to `padded_rows` are zeros."""
  b, t, h, d = q.shape
  grp = h // num_kv_heads
  rows = q.reshape(b, t, num_kv_heads, grp, d).transpose(0, 2, 1, 3, 4)
  rows = rows.reshape(b, num_kv_heads, t * grp, d)
  return jnp.pad(rows, ((0, 0), (0, 0), (0, padded_rows(t, grp) - t * grp), (0, 0)))


@functools.partial(jax.jit, static_argnames=('grp', 'scale', 'block_k', 'num_splits',
                                             'num_warps', 'interpret'))
def _call(q_rows, k, v, q_meta, k_meta, *, grp, scale, block_k, num_splits, num_warps,
          interpret):
  b, hkv, rp, d = q_rows.shape
  t = q_meta.positions.shape[1]
  s = k.shape[1]
  r = t * grp
  tiles = s // block_k
  splits = min(num_splits, tiles) if num_splits else splits_for(b, hkv, tiles)
  per_split = -(-tiles // splits)
  # Padding rows take segment -1: they see no key (and come out as zeros), whatever they hold.
  fills = (-1, 0, 0, 0)
  qm = jnp.stack([jnp.pad(jnp.repeat(x.astype(jnp.int32), grp, axis=1), ((0, 0), (0, rp - r)),
                          constant_values=fill) for x, fill in zip(q_meta, fills)], axis=1)
  km = jnp.stack([x.astype(jnp.int32) for x in k_meta], axis=1)
  n_tiles = jnp.minimum(jnp.max(q_meta.positions, axis=1) // block_k + 1, tiles)
  kv_spec = pl.BlockSpec((None, s, None, d), lambda i, j, c: (i, 0, j, 0))
  row_spec = pl.BlockSpec((None, None, rp, d), lambda i, j, c: (i, j, 0, 0))
  part_spec = lambda *shape: pl.BlockSpec((None, None, None, *shape),
                                          lambda i, j, c: (i, j, c) + (0,) * len(shape))
  part_shape = lambda *shape: jax.ShapeDtypeStruct((b, hkv, splits, *shape), jnp.float32)
  params = None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
  acc, m, l = pl.pallas_call(
      functools.partial(_kernel, scale=scale, bk=block_k, per_split=per_split),
      out_shape=(part_shape(rp, d), part_shape(rp), part_shape(rp)), grid=(b, hkv, splits),
      in_specs=[pl.BlockSpec((b,), lambda i, j, c: (0,)), row_spec, kv_spec, kv_spec,
                pl.BlockSpec((None, _N_FIELDS, rp), lambda i, j, c: (i, 0, 0)),
                pl.BlockSpec((None, _N_FIELDS, s), lambda i, j, c: (i, 0, 0))],
      out_specs=(part_spec(rp, d), part_spec(rp), part_spec(rp)), compiler_params=params,
      interpret=interpret, name='attention_decode')(n_tiles.astype(jnp.int32), q_rows, k, v,
                                                    qm, km)
  o = _combine(acc, m, l)[:, :, :r].astype(q_rows.dtype)
  return o.reshape(b, hkv, t, grp, d).transpose(0, 2, 1, 3, 4).reshape(b, t, hkv * grp, d)


def attention_decode_pallas(q: jax.Array, k: jax.Array, v: jax.Array,
                            q_meta: mask_lib.TokenMeta, k_meta: mask_lib.TokenMeta, *,
                            scale: float | None = None, block_k: int = BLOCK_K,
                            num_splits: int | None = None, num_warps: int = NUM_WARPS,
                            interpret: bool | None = None):
  """`api.attention`'s contract for a few queries over a cache, in one kernel (not
  differentiable).

  Args:
    q: [B, T, H, D]; k, v: [B, S, Hkv, D] (the cache, this call's keys written); one dtype.
    q_meta: fields [B, T]; k_meta: fields [B, S]. Every key a query sees must lie at or before
      the row's furthest query position (true of a cache: slot j holds position j).
    num_splits: programs sharing each (row, kv head)'s key walk, at most one per key tile (None:
      `splits_for`).
    interpret: run the Pallas interpreter (default: when the backend is not a GPU).

  Returns:
    [B, T, H, D] in q.dtype; a query that sees no key gets zeros.

  Raises:
    ValueError: inputs the kernel does not take (`kernel_takes`).
  """
  return attention_decode_rows(
      query_rows_layout(q, k.shape[2]), k, v, q_meta, k_meta, num_heads=q.shape[2], scale=scale,
      block_k=block_k, num_splits=num_splits, num_warps=num_warps, interpret=interpret)


def attention_decode_rows(q_rows: jax.Array, k: jax.Array, v: jax.Array,
                          q_meta: mask_lib.TokenMeta, k_meta: mask_lib.TokenMeta, *,
                          num_heads: int, scale: float | None = None, block_k: int = BLOCK_K,
                          num_splits: int | None = None, num_warps: int = NUM_WARPS,
                          interpret: bool | None = None):
  """`attention_decode_pallas` from queries already in the kernel's row layout
  (`query_rows_layout`, or the decode front kernel's), checked as there: q_rows [B, Hkv, Rp, D]
  for `num_heads` query heads; the padding rows may hold anything (they see no key).

  Returns:
    [B, T, H, D] in q_rows.dtype, T from q_meta.
  """
  b, t = q_meta.positions.shape
  grp = num_heads // k.shape[2]
  rows = jax.ShapeDtypeStruct((b, t, num_heads, q_rows.shape[-1]), q_rows.dtype)
  why = kernel_takes(rows, k, v, block_k)
  if why is None and q_rows.shape[2] != padded_rows(t, grp):
    why = f'{q_rows.shape[2]} query rows, not padded_rows(T={t}, G={grp})'
  if why is None and num_splits is not None and num_splits < 1:
    why = f'num_splits={num_splits} < 1'
  if why:
    raise ValueError(f'decode attention kernel: {why}')
  if interpret is None:
    interpret = backend.default_backend() != 'gpu'
  scale = float(q_rows.shape[-1] ** -0.5 if scale is None else scale)
  return _call(q_rows, k, v, q_meta, k_meta, grp=grp, scale=scale, block_k=block_k,
               num_splits=num_splits, num_warps=num_warps, interpret=interpret)
