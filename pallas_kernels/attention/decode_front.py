"""The front of a cached attention call in one Pallas kernel: from the merged q|gate|k|v
projection product, the q and k RMS norms and partial RoPE, q laid out as the decode kernel's
query rows (`decode_pallas.query_rows_layout`), and k and v written into the KV cache in place.

XLA runs this front as six launches per attention layer at decode (the q slice, two norm fusions
with their RoPE, the query rows' padding and two cache scatters); here it is one, after the
product's own split-K reduction. Programs (batch row, kv head, part) each take one head of the
kv head's group for all T tokens: query heads g < G = H / Hkv, then the key, then the value:

  q   rows [T, D] of each head of the group, read from the product's q columns (head h's q
      occupies columns [2 h D, 2 h D + D), its gate the next D: Qwen3.5's interleaved layout);
      zero-centred RMSNorm in fp32 rounded to the product's dtype (as `add_rms_norm.rms_norm`),
      then rotate-half RoPE on the first rotary_dim features (`rope.rope_tables`' cos/sin), stored
      at rows t G + g of the [Rp, D] query tile. The padding rows repeat token T - 1's query (the
      decode kernel's metadata hides them).
  k   the same norm and RoPE, stored at cache slots start .. start + T - 1 (start clamped to
      [0, S - T], as `cache.write_rows`' dynamic_update_slice).
  v   copied to the same slots.

Each program works on column runs of a head that are powers of two (Triton's tensor sizes): the
two rotated halves, then the rest (e.g. 32, 32, 64, 128 at Qwen3.5's D = 256, rotary_dim = 64).

H100, 2B-shaped, bf16, batch 8 (2026-12-06, `launch.bench_sampler --modes=ar --profile`): the six
XLA launches took 0.055 ms per AR step over the 6 attention layers; this kernel takes 3.2 us a
call (6.6 with one program per batch row and kv head looping over its heads), 0.028 ms a step with
the product's reduction; 298 launches a step against 321. AR step 1.91-1.93 ms against main's
1.91-2.02 in the same session (docs/benchmarks.md).
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import backend
from pallas_kernels.attention import decode_pallas

_F32 = jnp.float32
NUM_WARPS = 4


def column_runs(head_dim: int, half: int) -> list[tuple[int, int]]:
  """(first column, width) runs covering [0, head_dim), each width a power of two dividing its
  first column: the rotated halves [0, half) and [half, 2 half) first (when half > 0)."""
  runs = [(0, half), (half, half)] if half else []
  col = 2 * half
  while col < head_dim:
    width = 1
    while col % (2 * width) == 0 and col + 2 * width <= head_dim:
      width *= 2
    runs.append((col, width))
    col += width
  return runs


def front_takes(tokens: int, num_heads: int, num_kv_heads: int, head_dim: int,
                rotary_dim: int) -> str | None:
  """None if the kernel takes a call of `tokens` tokens with these head sizes, else why not."""
  grp = num_heads // num_kv_heads if num_kv_heads else 0
  pow2 = backend.is_pow2
  if not pow2(tokens):
    return f'T={tokens} tokens is not a power of two'
  if not grp or num_heads % num_kv_heads or not pow2(grp):
    return f'{num_heads} / {num_kv_heads} heads: the group is not a power of two'
  if tokens * grp > decode_pallas.MAX_ROWS:
    return f'T x G = {tokens * grp} query rows > {decode_pallas.MAX_ROWS}'
  if head_dim < 16 or not pow2(head_dim):
    return f'head dim D={head_dim} is not a power of two >= 16'
  if rotary_dim <= 0 or rotary_dim > head_dim or not pow2(rotary_dim // 2) or rotary_dim % 2:
    return f'rotary dim {rotary_dim}: half of it must be a power of two, within D'
  return None


def _kernel(start_ref, qg_ref, k_ref, v_ref, cos_ref, sin_ref, qw_ref, kw_ref, kc_in, vc_in,
            q_out, kc_out, vc_out, *, tokens, eps):
  """Program (row, kv head, part): part g < G is query head g of the group, part G the key, part
  G + 1 the value (one head each, so that every program is one load-compute-store round trip).
  Blocks: start [B]; qg [T, 2 G D] (the group's q|gate columns); k, v [T, D]; cos, sin
  [T, half]; q, k norm weights [D]; caches [S, D] (aliased in and out). Out: q rows
  [Rp / G, G, D]."""
  del kc_in, vc_in  # the outputs alias them
  tp, grp, d = q_out.shape
  part = pl.program_id(2)
  half = cos_ref.shape[-1]
  dtype = qg_ref.dtype
  runs = column_runs(d, half)
  cache_len = kc_out.shape[0]
  slots = pl.ds(jnp.clip(start_ref[pl.program_id(0)], 0, cache_len - tokens), tokens)
  k_rows = pl.ds(0, tokens)

  def norm_rope(load, w_ref, rows):
    """Zero-centred RMSNorm (rounded to the input dtype) then RoPE of the runs `load` reads."""
    x = [load(c, n).astype(_F32) for c, n in runs]
    r = jax.lax.rsqrt(sum(jnp.sum(p * p, axis=1) for p in x) / d + eps)[:, None]
    y = [(p * r * (1.0 + w_ref[pl.ds(c, n)].astype(_F32))).astype(dtype).astype(_F32)
         for p, (c, n) in zip(x, runs)]
    cos, sin = cos_ref[rows, :].astype(_F32), sin_ref[rows, :].astype(_F32)
    y[0], y[1] = y[0] * cos - y[1] * sin, y[1] * cos + y[0] * sin
    return y

  @pl.when(part < grp)
  def _():
    q_rows = jnp.minimum(jnp.arange(tp, dtype=jnp.int32), tokens - 1)  # padding: token T - 1
    y = norm_rope(lambda c, n: qg_ref[q_rows, pl.ds(2 * part * d + c, n)], qw_ref, q_rows)
    for (c, n), piece in zip(runs, y):
      q_out[:, part, pl.ds(c, n)] = piece.astype(q_out.dtype)

  @pl.when(part == grp)
  def _():
    y = norm_rope(lambda c, n: k_ref[k_rows, pl.ds(c, n)], kw_ref, k_rows)
    for (c, n), piece in zip(runs, y):
      kc_out[slots, pl.ds(c, n)] = piece.astype(kc_out.dtype)

  @pl.when(part == grp + 1)
  def _():
    for c, n in column_runs(d, 0):
      vc_out[slots, pl.ds(c, n)] = v_ref[k_rows, pl.ds(c, n)].astype(vc_out.dtype)


@functools.partial(jax.jit, static_argnames=('num_heads', 'k_col', 'v_col', 'eps', 'interpret'))
def _front(product, cos, sin, start, q_norm, k_norm, k_cache, v_cache, *, num_heads, k_col,
           v_col, eps, interpret):
  b, t, _ = product.shape
  s, hkv, d = k_cache.shape[1:]
  grp = num_heads // hkv
  rp = decode_pallas.padded_rows(t, grp)
  half = cos.shape[-1]
  row = lambda width, col_block: pl.BlockSpec((None, t, width),
                                              lambda i, j, p: (i, 0, col_block(j)))
  cache_spec = pl.BlockSpec((None, s, None, d), lambda i, j, p: (i, 0, j, 0))
  table_spec = pl.BlockSpec((None, t, half), lambda i, j, p: (i, 0, 0))
  weight_spec = pl.BlockSpec((d,), lambda i, j, p: (0,))
  in_specs = [pl.BlockSpec((b,), lambda i, j, p: (0,)), row(2 * grp * d, lambda j: j),
              row(d, lambda j: k_col // d + j), row(d, lambda j: v_col // d + j),
              table_spec, table_spec, weight_spec, weight_spec, cache_spec, cache_spec]
  out_shape = (jax.ShapeDtypeStruct((b, hkv, rp // grp, grp, d), product.dtype),
               jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
               jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype))
  out_specs = (pl.BlockSpec((None, None, rp // grp, grp, d), lambda i, j, p: (i, j, 0, 0, 0)),
               cache_spec, cache_spec)
  params = None if interpret else plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1)
  q_rows, k_cache, v_cache = pl.pallas_call(
      functools.partial(_kernel, tokens=t, eps=eps), out_shape=out_shape, grid=(b, hkv, grp + 2),
      in_specs=in_specs, out_specs=out_specs, input_output_aliases={8: 1, 9: 2},
      compiler_params=params, interpret=interpret, name='attention_decode_front')(
          start.astype(jnp.int32), product, product, product, cos, sin, q_norm, k_norm, k_cache,
          v_cache)
  return q_rows.reshape(b, hkv, rp, d), k_cache, v_cache


def decode_front_pallas(product: jax.Array, cos: jax.Array, sin: jax.Array, start: jax.Array,
                        q_norm: jax.Array, k_norm: jax.Array, k_cache: jax.Array,
                        v_cache: jax.Array, *, num_heads: int, k_col: int, v_col: int,
                        eps: float, interpret: bool | None = None):
  """Query rows for `decode_pallas.attention_decode_rows` and the caches with this call's keys
  and values written (not differentiable: decoding only).

  Args:
    product: [B, T, N] the merged projection: q|gate of `num_heads` heads interleaved per head
      from column 0, k at column k_col and v at v_col (Hkv heads of D each; both multiples of D).
    cos, sin: [B, T, rotary_dim / 2] (`rope.rope_tables` of the tokens' positions).
    start: [B] int, the cache slot of each row's first token.
    q_norm, k_norm: [D] zero-centred RMSNorm weights (y = x_hat * (1 + w)); eps their epsilon.
    k_cache, v_cache: [B, S, Hkv, D], updated in place when XLA can (else copied first).
    interpret: run the Pallas interpreter (default: when the backend is not a GPU).

  Returns:
    (q_rows [B, Hkv, Rp, D] in product.dtype, k_cache, v_cache).

  Raises:
    ValueError: shapes the kernel does not take (`front_takes`) or inconsistent columns.
  """
  t, d, hkv = product.shape[1], k_cache.shape[3], k_cache.shape[2]
  why = front_takes(t, num_heads, hkv, d, 2 * cos.shape[-1])
  if why is None and (k_col != 2 * num_heads * d or v_col != k_col + hkv * d
                      or product.shape[2] < v_col + hkv * d):
    why = (f'columns k_col={k_col}, v_col={v_col} of a {product.shape[2]}-wide product do not '
           f'follow {num_heads} interleaved q|gate heads and {hkv} kv heads of {d}')
  if why:
    raise ValueError(f'decode front kernel: {why}')
  if interpret is None:
    interpret = backend.default_backend() != 'gpu'
  return _front(product, cos, sin, start, q_norm, k_norm, k_cache, v_cache, num_heads=num_heads,
                k_col=k_col, v_col=v_col, eps=float(eps), interpret=interpret)
