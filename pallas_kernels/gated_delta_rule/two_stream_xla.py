"""Noisy views of the two-stream gated delta rule, chunk-parallel: no token scan, no seed states.

Same contract as `two_stream_gdn.noisy_delta_rule` (the 'chunked' schedule). The clean pass keeps
only its chunk checkpoints h_c (state entering chunk c) and corrected values v'. Each noisy block
is one step of the chunked delta rule from its seed S0 = S(p), the clean state after
p = block_start - 1:

    Γ    in-block inclusive cumulative noisy log-decay;
    D_jl = e^{Γ_j - Γ_l}  (same block, l <= j)
    A    = strict_lower(β_j k_j.k_l D_jl);  T = (I + A)^-1 (block-diagonal: blocks <= max_block)
    W    = T diag(β e^Γ) K;  U = T diag(β) V;  V' = U - W S0
    O    = scale [diag(e^Γ) Q S0 + (Q K^T ⊙ D) V']

S0 enters only through row products x S(p) (x a row of W or of diag(e^Γ) Q), and by the prefix
identity (kernels.md §6), with G the clean in-chunk cumulative log-decay and c(p) = p // C,

    x S(p) = [no document starts in c(p) up to p] e^{G_p} (x h_{c(p)})
             + sum_{i in c(p), doc_start(p) <= i <= p} e^{G_p - G_i} (x.k_i) v'_i,

a matmul with one chunk checkpoint plus a masked local "attention" over that chunk's clean tokens.
Blocks are grouped by the clean chunk of their seed: window c holds the noisy slots [cC, (c+1)C +
max_block), which contain every block seeded in chunk c (and block_start 0), so a window reads only
h_c and clean chunk c. Each slot takes its output from the window of its block's group (its own
chunk's window or the one before). Everything is batched over (chunk, view, head); gradients come
from autodiff.
"""
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._common import backend
from pallas_kernels.gated_delta_rule import api as gdr_api
from pallas_kernels.gated_delta_rule import reference
from pallas_kernels.gated_delta_rule import xla as gdr_xla

# The triangular solve is where fp32 errors compound (as in the clean chunked pass): keep it exact
# on GPU (no TF32). Other products use the default precision, like the other schedules.
_EXACT = jax.lax.Precision.HIGHEST
# On GPU, products whose contraction is at most this long run as exact fp32 multiply-and-sum
# (`_mm`), not as batched GEMMs: the row tiles of small blocks make many tiny products (4 x 4
# solves, [4, 8] x [8, V] at block 4), which XLA:GPU ran as slow MAGMA / cuBLAS gemv kernels,
# forward and backward (H200, T = 4096, block 4, V = 2: fwd+bwd of the chunked schedule 10.28 ->
# 9.43 ms, of both:triton 7.04 -> 6.15). XLA:CPU does not fuse them (it materialises the products):
# there the forward+backward took 3.3x as long (T = 1024, 4 heads, K = 32), so CPU keeps matmuls.
# (The [2S, K] x [K, 2S] Gram tiles stay matmuls: as multiply-and-sum over K, their gradient made
# XLA:CPU, jaxlib 0.10.2, segfault while compiling at blocks 1 and 2.)
_SMALL = 16


def _short_products_as_sums() -> bool:
  """Whether `_mm` sums short contractions elementwise (the GPU's choice; tests force it)."""
  return jax.default_backend() == 'gpu'


def _mm(a: jax.Array, b: jax.Array, precision=None) -> jax.Array:
  """a [..., M, K] @ b [..., K, N] (leading axes broadcast), fp32 out. On GPU, short contractions
  (`_SMALL`) are an exact fp32 multiply-and-sum over K, fused by XLA into one reduction (in both
  passes); others a matmul at `precision`."""
  m, k = a.shape[-2:]
  n = b.shape[-1]
  if k > _SMALL or not _short_products_as_sums():
    return jnp.matmul(a, b, precision=precision)
  if k == 1:
    return a * b
  if m == 1:  # block 1: [..., 1, 2] @ [..., 2, V] as a multiply-and-sum made XLA:CPU (jaxlib
    return jnp.matmul(a, b, precision=precision)  # 0.10.2) segfault at run time
  if n == 1:  # (the general form's gradient made XLA:CPU segfault while compiling at block 2)
    return jnp.sum(a * jnp.swapaxes(b, -1, -2), axis=-1, keepdims=True)
  return jnp.sum(a[..., :, :, None] * b[..., None, :, :], axis=-2)


def _band(x: jax.Array, axis: int, fill=0) -> jax.Array:
  """Tiles [..., NT, S, ...] (tile axis `axis`, rows next) -> [..., NT, 2S, ...]: each tile's rows
  preceded by the previous tile's (`fill` before the first)."""
  widths = [(0, 0)] * x.ndim
  widths[axis] = (1, 0)
  prev = jax.lax.slice_in_dim(jnp.pad(x, widths, constant_values=fill), 0, x.shape[axis], axis=axis)
  return jnp.concatenate([prev, x], axis=axis + 1)


def _banded_solve(a: jax.Array, rhs: jax.Array) -> jax.Array:
  """(I + A)^-1 rhs for A strictly lower and block-diagonal in blocks of at most S rows.

  Rows are cut into tiles of S (a power of two); blocks need not align with them, but a block spans
  at most two consecutive tiles, so A is tile-lower-bidiagonal and so is (I + A)^-1: diagonal tiles
  X_ii = (I + A_ii)^-1, sub-diagonal X_{i+1,i} = -X_{i+1,i+1} A_{i+1,i} X_ii (the terms two tiles
  down vanish: no block spans three tiles).

  Args:
    a: [..., NT, S, 2S]: row tile i against column tiles i-1 and i (A_{i,i-1} | A_ii).
    rhs: [..., NT, S, R].

  Returns:
    [..., NT, S, R].
  """
  s = a.shape[-2]
  mm = lambda x, y: _mm(x, y, _EXACT)
  x_diag = gdr_xla.unit_lower_inverse(a[..., s:], mm)  # ... NT S S
  sol = mm(x_diag, rhs)
  if a.shape[-3] > 1:
    a_sub = a[..., 1:, :, :s]  # A_{i+1,i}
    x_sub = -mm(mm(x_diag[..., 1:, :, :], a_sub), x_diag[..., :-1, :, :])
    below = mm(x_sub, rhs[..., :-1, :, :])
    sol = sol + jnp.concatenate([jnp.zeros_like(below[..., :1, :, :]), below], axis=-3)
  return sol


def windows(x: jax.Array, axis: int, n: int, c: int, ahead: int, width: int) -> jax.Array:
  """Slots along `axis` -> overlapping windows: [..., N, width, ...] (N inserted at `axis`).

  Window i covers slots [i c, (i + 1) c + ahead) (ahead <= c; zero after the end), then zero rows
  up to `width`. Slices and concatenations only (their transposes are pads, not scatters).
  """
  t = x.shape[axis]
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, (n + 1) * c - t)
  x = jnp.pad(x, widths)
  x = x.reshape(x.shape[:axis] + (n + 1, c) + x.shape[axis + 1:])  # ... N+1 C ...
  parts = [jax.lax.slice_in_dim(x, 0, n, axis=axis)]
  if ahead:
    nxt = jax.lax.slice_in_dim(x, 1, n + 1, axis=axis)
    parts.append(jax.lax.slice_in_dim(nxt, 0, ahead, axis=axis + 1))
  if width > c + ahead:
    tail = list(parts[0].shape)
    tail[axis + 1] = width - c - ahead
    parts.append(jnp.zeros(tail, x.dtype))
  return jnp.concatenate(parts, axis=axis + 1)


def _window_outputs(xs: dict[str, jax.Array], *, c: int, ahead: int, tile: int, scale: float,
                    precision: jax.lax.Precision | None) -> jax.Array:
  """Noisy outputs of a group of windows (leading axes N B HV V: einsum batch and free axes).

  xs: q, k [N, B, HV, V, W, K]; v [N, B, HV, V, W, Vd]; g, beta [N, B, HV, V, W];
    bs, seed, lo [N, B, W] (block start, seed position, first clean position of the seed's local
    sum); local_ok, carry [N, B, W] (the seed is in this window's chunk and non-zero / also reads
    h_c); k_ctx [N, B, HV, C, K], v_ctx [N, B, HV, C, Vd], g_ctx [N, B, HV, C] (clean chunk c);
    h [N, B, HV, K, Vd]; chunk [N].

  Returns:
    o [N, B, HV, V, C + ahead, Vd]; rows of blocks seeded in another chunk are not meaningful.
  """
  q, k, v, g, beta = xs['q'], xs['k'], xs['v'], xs['g'], xs['beta']
  wd = q.shape[-2]
  mm = lambda a, b: _mm(a, b, precision)
  # --- Stage 1: the noisy blocks' WY representation. A is block-diagonal with blocks of at most
  # `tile` rows: work on row tiles against their own and the previous tile (banded, O(W tile)). ---
  nt = wd // tile
  tiled = lambda x: x.reshape(x.shape[:4] + (nt, tile) + x.shape[5:])  # N B HV V NT S ...
  bs_r = tiled(xs['bs'][:, :, None, None])  # N B 1 1 NT S
  bs_c = _band(bs_r, 4, fill=-1)  # N B 1 1 NT 2S (no block starts at -1)
  a_idx = jnp.arange(tile)[:, None]
  b_idx = jnp.arange(2 * tile)[None, :] - tile  # column offset from the row tile's start
  same = bs_r[..., :, None] == bs_c[..., None, :]  # N B 1 1 NT S 2S
  causal = same & (b_idx <= a_idx)
  strict = same & (b_idx < a_idx)
  # In-block inclusive cumulative log-decay: a masked sum of at most max_block terms (exact, unlike
  # differences of a window-long cumsum).
  g_c = _band(tiled(g), 4)
  gam = _mm(causal.astype(g.dtype), g_c[..., None], _EXACT)[..., 0]  # .. NT S
  gam_c = _band(gam, 4)
  # Mask the exponent, not the result: e^{positive} above the diagonal would overflow (inf * 0).
  decay = jnp.exp(jnp.where(causal, gam[..., :, None] - gam_c[..., None, :], -jnp.inf))
  q_r, k_r = tiled(q), tiled(k)  # N B HV V NT S K
  k_c = _band(k_r, 4)
  qk_kk = mm(jnp.concatenate([q_r, k_r], axis=-2), jnp.swapaxes(k_c, -1, -2))  # .. NT 2S 2S
  qk, kk = qk_kk[..., :tile, :], qk_kk[..., tile:, :]
  beta_r = tiled(beta)
  a = jnp.where(strict, beta_r[..., :, None] * kk * decay, 0.0)
  eg = jnp.exp(gam)
  rhs = jnp.concatenate([k_r * (beta_r * eg)[..., None], tiled(v) * beta_r[..., None]], axis=-1)
  sol = _banded_solve(a, rhs)
  sol = sol.reshape(sol.shape[:4] + (wd,) + sol.shape[-1:])
  kd = k.shape[-1]
  w, u = sol[..., :kd], sol[..., kd:]
  eg = eg.reshape(eg.shape[:4] + (wd,))

  # --- Stage 2: x S(seed) for the rows x of W and of diag(e^Γ) Q, from h_c and the clean tokens
  # of chunk c (prefix identity). ---
  x = jnp.concatenate([w, q * eg[..., None]], axis=-2)  # N B HV V 2W K
  ctx = jnp.concatenate([jnp.swapaxes(xs['k_ctx'], -1, -2), xs['h']], axis=-1)  # N B HV K (C+Vd)
  y = jnp.einsum('nbhvrk,nbhkc->nbhvrc', x, ctx, precision=precision)  # N B HV V 2W (C + Vd)
  score, y_h = y[..., :c], y[..., c:]
  ipos = (xs['chunk'] * c)[:, None, None, None] + jnp.arange(c)  # N 1 1 C
  seed = xs['seed'][..., None]
  local = xs['local_ok'][..., None] & (ipos >= xs['lo'][..., None]) & (ipos <= seed)  # N B W C
  # G at the seed, picked by a masked sum (exact; a reduction, not a gather, in both passes).
  gp = jnp.sum(jnp.where((ipos == seed)[:, :, None], xs['g_ctx'][..., None, :], 0.0),
               axis=-1)  # N B HV W
  e = jnp.exp(jnp.where(local[:, :, None], gp[..., None] - xs['g_ctx'][..., None, :], -jnp.inf))
  # The same mask for both halves of x (concatenated: broadcasting it over a reshaped (2, W) axis
  # made XLA:CPU (jaxlib 0.10.2) segfault in the gradient with one view).
  score = score * jnp.concatenate([e, e], axis=-2)[:, :, :, None]
  coef = jnp.where(xs['carry'][:, :, None], jnp.exp(gp), 0.0)  # N B HV W
  coef = jnp.concatenate([coef, coef], axis=-1)[:, :, :, None, :, None]  # N B HV 1 2W 1
  cross = jnp.einsum('nbhvrc,nbhcd->nbhvrd', score, xs['v_ctx'], precision=precision) + coef * y_h
  cross_w, cross_q = cross[..., :wd, :], cross[..., wd:, :]

  # --- Stage 3: corrected values and outputs. ---
  v_corr = _band(tiled(u - cross_w), 4)  # N B HV V NT 2S Vd
  intra = mm(qk * decay, v_corr)  # N B HV V NT S Vd
  o = scale * (cross_q + intra.reshape(cross_q.shape))
  return o[..., :c + ahead, :]


def given_checkpoints(clean: tuple[jax.Array, ...], c: int):
  """The clean pass's checkpoints carried by `clean`, or None.

  clean: (q, k, v, g, beta), or (q, k, v, g, beta, h, v_new) with the checkpoints of
    `api.chunk_checkpoints` at chunk length c (h [B, N, HV, K, V], v_new [B, T, HV, V]), computed
    by the caller (e.g. beside the clean stream's output, `api.chunk_output_and_checkpoints`);
    their gradients then leave through h and v_new.

  Raises:
    ValueError: another tuple length, or checkpoints of other shapes (another chunk length).
  """
  if len(clean) == 5:
    return None
  if len(clean) != 7:
    raise ValueError(f'clean must be (q, k, v, g, beta) or (q, k, v, g, beta, h, v_new); got '
                     f'{len(clean)} arrays')
  h, v_new = clean[5:]
  b, t, hv, vd = clean[2].shape
  want = (b, -(-t // c), hv, clean[1].shape[3], vd)
  if h.shape != want or v_new.shape != clean[2].shape:
    raise ValueError(f'checkpoints h {h.shape}, v_new {v_new.shape} are not the chunk-{c} '
                     f'checkpoints of this clean stream ({want}, {clean[2].shape})')
  return h, v_new


def noisy_delta_rule_chunked(clean: tuple[jax.Array, ...], noisy: tuple[jax.Array, ...],
                             segment_ids: jax.Array, block_starts: jax.Array, *, scale: float,
                             chunk_size: int = 64, max_block: int = 32,
                             chunks_per_step: int | None = None,
                             precision: jax.lax.Precision | None = None,
                             clean_family: str | None = None, interpret: bool = False) -> jax.Array:
  """Noisy-view outputs of the gated delta rule under the two-stream state schedule, chunk-parallel.

  Computes exactly what `two_stream_gdn.noisy_delta_rule` computes (see there), without a token
  scan or per-slot states.

  Args:
    clean: (q, k, v, g, beta) of the clean stream: q, k [B, T, H, K] l2-normed, v [B, T, HV, V],
      g (log space), beta [B, T, HV]; optionally followed by the clean pass's checkpoints at
      chunk length max(chunk_size, max_block) (`given_checkpoints`).
    noisy: the same for the views, each with a leading view axis after B: q [B, V, T, H, K], ...
    segment_ids, block_starts: [B, T]. Every block (slots sharing a block start) must be contiguous,
      inside one document and at most `max_block` slots long (not checked: longer blocks give wrong
      outputs).
    scale: output scale (q is not pre-scaled).
    chunk_size: chunk length C of the clean pass and of the noisy windows. Raised to max_block when
      smaller (the result does not depend on C).
    max_block: upper bound on block length in slots (the objective's block size).
    chunks_per_step: None computes every chunk's window at once; an int n processes n chunks at a
      time under `lax.map` + `jax.checkpoint` (lower peak memory for long rows).
    precision: of the noisy pass's products (None: the default, TF32 on recent GPUs, as the other
      schedules use); the triangular solve and the mask sums are always exact fp32,
      and so are the products of the small tiles (`_SMALL`).
    clean_family, interpret: the clean pass's checkpoints from XLA (None) or a kernel family's
      forward and backward kernels (`api.chunk_checkpoints`; the fused schedules' backward).

  Returns:
    o [B, V, T, HV, V] fp32.

  Raises:
    ValueError: max_block or chunks_per_step below 1.
  """
  if max_block < 1:
    raise ValueError(f'max_block must be >= 1, got {max_block}')
  if chunks_per_step is not None and chunks_per_step < 1:
    raise ValueError(f'chunks_per_step must be None or >= 1, got {chunks_per_step}')
  c = max(chunk_size, max_block)  # a window's blocks must reach at most one chunk ahead
  ahead = max_block  # window rows after the chunk: blocks seeded in it end before there
  tile = backend.next_pow2(max_block)  # a block spans at most two tiles
  width = -(-(c + ahead) // tile) * tile
  f32 = lambda a: a.astype(jnp.float32)
  kc, vc, gc, bc = clean[1:5]
  b, t = segment_ids.shape
  hv = vc.shape[2]

  # --- Stage 1: clean chunk checkpoints and each chunk's clean tokens. ---
  h, v_new = given_checkpoints(clean, c) or gdr_api.chunk_checkpoints(
      kc, vc, gc, bc, segment_ids=segment_ids, chunk_size=c, family=clean_family,
      interpret=interpret)
  n = h.shape[1]
  g_cum = gdr_xla.chunk_cumsum(f32(gc), c)  # B T HV
  context = lambda x: windows(x, 1, n, c, 0, c)  # [B, T, ...] -> [B, N, C, ...]
  xs = dict(k_ctx=jnp.transpose(context(reference.expand_heads(f32(kc), hv)), (1, 0, 3, 2, 4)),
            v_ctx=jnp.transpose(context(v_new), (1, 0, 3, 2, 4)),  # N B HV C ...
            g_ctx=jnp.transpose(context(g_cum), (1, 0, 3, 2)),
            h=jnp.moveaxis(h, 1, 0), chunk=jnp.arange(n))

  # --- Stage 2: per-slot seeds, laid out by window row. ---
  pos = jnp.arange(t)
  seed = jnp.maximum(block_starts - 1, 0)
  take = lambda x, i: jnp.take_along_axis(x, i, axis=1)
  valid = (block_starts >= 1) & (take(segment_ids, seed) == segment_ids)
  starts = reference.segment_starts(segment_ids, b, t)
  doc_start = take(jax.lax.cummax(jnp.where(starts, pos, 0), axis=1), seed)  # of the seed's doc
  group = seed // c  # the window that computes the slot's block: its seed's chunk
  lo = jnp.maximum(group * c, doc_start)  # first clean token of the seed's local sum
  carry = valid & (doc_start < group * c)  # the seed's document runs through its chunk start
  slot = np.arange(n)[:, None] * c + np.arange(width)  # N W
  in_row = jnp.asarray(slot < t)

  def rows(x, fill):  # [B, T] -> [N, B, W]
    return jnp.moveaxis(jnp.where(in_row, windows(x, 1, n, c, ahead, width), fill), 1, 0)

  here = rows(group, -1) == jnp.arange(n)[:, None, None]
  xs.update(bs=rows(block_starts, jnp.asarray(slot)),  # padding rows: blocks of their own
            seed=rows(seed, 0), lo=rows(lo, 0), local_ok=rows(valid, False) & here,
            carry=rows(carry, False) & here)

  # --- Stage 3: the noisy views, windowed: B V T HV ... -> N B HV V W ... ---
  qn, kn, vn, gn, bn = (f32(a) for a in noisy)
  qn = jnp.repeat(qn, hv // qn.shape[3], axis=3)
  kn = jnp.repeat(kn, hv // kn.shape[3], axis=3)
  for name, x in zip(('q', 'k', 'v', 'g', 'beta'), (qn, kn, vn, gn, bn)):
    xs[name] = jnp.transpose(windows(x, 2, n, c, ahead, width), (2, 0, 4, 1, 3, 5)[:x.ndim + 1])

  # --- Stage 4: all windows at once, or groups of chunks under lax.map. ---
  fn = lambda a: _window_outputs(a, c=c, ahead=ahead, tile=tile, scale=scale, precision=precision)
  if chunks_per_step is None or chunks_per_step >= n:
    o = fn(xs)
  else:
    m = chunks_per_step
    steps = -(-n // m)
    split = lambda a: jnp.pad(a, ((0, steps * m - n),) + ((0, 0),) * (a.ndim - 1)).reshape(
        (steps, m) + a.shape[1:])
    o = jax.lax.map(jax.checkpoint(fn), jax.tree.map(split, xs))
    o = o.reshape((steps * m,) + o.shape[2:])[:n]

  # --- Stage 5: each slot from its group's window: its own chunk's (rows [0, C)) or the previous
  # chunk's (rows [C, C + max_block)). ---
  o_own = o[..., :c, :]  # N B HV V C Vd
  o_prev = jnp.pad(o[:-1, ..., c:, :], ((1, 0),) + ((0, 0),) * 3 + ((0, c - ahead), (0, 0)))
  group_p = jnp.pad(group, ((0, 0), (0, n * c - t)), constant_values=n)  # padding: own window
  own = group_p.reshape(b, n, c) == jnp.arange(n)[:, None]  # B N C
  o = jnp.where(jnp.moveaxis(own, 1, 0)[:, :, None, None, :, None], o_own, o_prev)
  o = jnp.transpose(o, (1, 3, 0, 4, 2, 5))  # B V N C HV Vd
  return o.reshape(o.shape[:2] + (n * c,) + o.shape[4:])[:, :, :t]
