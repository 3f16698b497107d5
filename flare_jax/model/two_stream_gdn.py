"""Gated DeltaNet over a two-stream row: the clean stream plus V noisy views (pure JAX, gradients).

A noisy slot j of a block starting at slot bs = block_starts[j] is processed by the recurrence
seeded with the CLEAN state after token bs - 1 (zero if that token is in another document or
bs = 0), causally over the block's own slots; the state is dropped after the block. Its short conv
reads pre-conv inputs at positions < bs from the clean stream (same document only) and positions
>= bs from its own view.

Three schedules compute the same thing:
  * simple: run the clean recurrence token by token keeping the state after every token, gather the
    seeds. Memory O(T) states per layer (every block boundary at B = 1).
  * lean: keep only the chunk checkpoints of the chunked clean pass (state entering each chunk,
    O(T/C)) and, chunk by chunk of the noisy view under `jax.checkpoint`, rebuild the few seeds that
    chunk needs from its checkpoint with the prefix identity
        S_after(p) = e^{G_p} h_c + sum_{i <= p in chunk c, same document} e^{G_p - G_i} k_i v'_i^T
    (G the in-chunk cumulative log-decay, v' the corrected values).
  * chunked (default; `pallas_kernels.gated_delta_rule.two_stream_xla`): the same checkpoints,
    but every noisy block is one step of the chunked delta rule whose seed enters only through
    row products, all blocks at once: no token scan, no seed states. The algorithm of the fused
    kernel (`two_stream_pallas`).
"""
import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta_rule import api as gdr_api
from pallas_kernels.gated_delta_rule import two_stream_pallas
from pallas_kernels.gated_delta_rule import two_stream_triton
from pallas_kernels.gated_delta_rule import two_stream_xla
from pallas_kernels.gated_delta_rule import reference
from pallas_kernels.gated_delta_rule import xla as gdr_xla

SCHEDULES = ('simple', 'lean', 'chunked')  # pure JAX
# The 'chunked' schedule's forward as one fused kernel, Pallas or jax-triton; backward: the chunked
# schedule's autodiff, or with '_kernel_bwd' the family's backward kernel. Off GPU they run in
# their interpreters (Triton's needs TRITON_INTERPRET=1 before the kernels are imported).
KERNEL_SCHEDULES = ('pallas', 'pallas_kernel_bwd', 'triton', 'triton_kernel_bwd')
# 'auto': the fastest forward+backward for the backend (`resolve_schedule`).
ALL_SCHEDULES = ('auto',) + SCHEDULES + KERNEL_SCHEDULES


def _interpret() -> bool:
  """Whether the kernel schedules run in their interpreters (off GPU)."""
  return jax.default_backend() != 'gpu'


def resolve_schedule(schedule: str, dtype=None, max_block: int = 32) -> str:
  """'auto' -> on GPU the fused Triton forward: with the backward kernels ('triton_kernel_bwd')
  for 16-bit inputs (dtype, the noisy q's) at row tiles up to 16 slots (max_block <= 16), else
  with the chunked schedule's autodiff ('triton'); off GPU 'chunked'. Other names pass through.

  H100, bf16, T = 4096, H = 16, K = V = 128, block 4, V = 2, clean and noisy outputs together,
  back to back (bench_schedules, 2026-12-06): both:triton_kernel_bwd 4.75 ms and 0.93 GiB of temp
  memory against both:triton's 5.77-5.78 ms and 1.45 GiB; the GPU flare-step test passes with
  either. At block 32 the backward kernels' 32-row tiles spill (H200, 2026-12-03: 30.6 against
  9.13 ms), and for fp32 inputs their K = 128 kernels spill 12-56 KB per thread
  (`two_stream_triton.backward_launch`): autodiff's backward there. Earlier (H200): both:triton
  against both:chunked 7.33-7.60 ms against 11.28-11.41 (forward+backward), the same temp
  memory."""
  if schedule != 'auto':
    return schedule
  if jax.default_backend() != 'gpu' or not two_stream_triton.available():
    return 'chunked'
  fast_tiles = two_stream_pallas.row_tile(max_block) <= two_stream_triton.STORED_INVERSE_MAX_TILE
  kernel_bwd = dtype is not None and jnp.dtype(dtype).itemsize == 2 and fast_tiles
  return 'triton_kernel_bwd' if kernel_bwd else 'triton'


def _gather_time(x, idx):
  """x [B, T, ...] at per-row indices idx [B, S] -> [B, S, ...]."""
  return jax.vmap(lambda a, i: a[i])(x, idx)


def shifted(x, by: int, axis: int):
  """x shifted `by` slots later along `axis` (earlier if by < 0), zeros shifted in:
  y[i] = x[i - by] where that index exists. A static pad + slice (its transpose is another)."""
  if by == 0:
    return x
  n = x.shape[axis]
  pad = [(0, 0)] * x.ndim
  pad[axis] = (by, 0) if by > 0 else (0, -by)
  start = 0 if by > 0 else -by
  return jax.lax.slice_in_dim(jnp.pad(x, pad), start, start + n, axis=axis)


def conv_taps(segment_ids, block_starts, kernel_size: int):
  """The short conv's read rule of a two-stream row, per tap: a list over back = 0 .. Kc-1 (tap
  w[Kc-1-back] multiplies the input `back` slots earlier) of (ok, from_noisy), bool [B, T]:
  ok[i] = slot i - back is in the row and in slot i's document (else the tap reads zero);
  from_noisy[i] = it is in slot i's noisy block, so a view reads its own slot (else the clean
  stream's). The clean stream reads its own slots wherever ok."""
  t = segment_ids.shape[1]
  pos = jnp.arange(t)[None]
  return [((pos >= back) & (shifted(segment_ids, back, 1) == segment_ids),
           pos - back >= block_starts) for back in range(kernel_size)]


def noisy_conv(x_clean, x_noisy, w, segment_ids, block_starts):
  """Causal depthwise conv of the noisy views with windows reaching into the clean stream.

  Slot i's tap `back` reads slot i - back: from its view if that slot is in i's block (at or after
  block_starts[i]), else from the clean stream; zero before the row or the document. Every tap is a
  static shift, so neither direction gathers or scatters.

  Args:
    x_clean: [B, T, C] clean pre-conv inputs; x_noisy: [B, V, T, C]; w: [Kc, C].
    segment_ids, block_starts: [B, T] (shared by the views: slot j has position j).

  Returns:
    [B, V, T, C] fp32 conv outputs (before the activation).
  """
  b, v, t, c = x_noisy.shape
  kc = w.shape[0]
  out = jnp.zeros((b, v, t, c), jnp.float32)
  for back, (ok, from_noisy) in enumerate(conv_taps(segment_ids, block_starts, kc)):
    val = jnp.where(from_noisy[:, None, :, None], shifted(x_noisy, back, 2),
                    shifted(x_clean, back, 1)[:, None]).astype(jnp.float32)
    out = out + jnp.where(ok[:, None, :, None], val, 0.0) * w[kc - 1 - back].astype(jnp.float32)
  return out


def _seeded_scan(q, k, v, g, beta, seeds, is_first, scale):
  """Token recurrence that restarts from seeds[j] at every block-first slot j.

  q, k: [B, S, HV, K] (expanded, fp32); v: [B, S, HV, V]; g, beta: [B, S, HV];
  seeds: [B, S, HV, K, V] (only read where is_first); is_first: [B, S]. Returns o [B, S, HV, V].
  """
  b, s, hv, kd = k.shape
  vd = v.shape[-1]

  def step(state, x):
    q_t, k_t, v_t, g_t, b_t, seed, first = x
    state = jnp.where(first[:, None, None, None], seed, state)
    state = state * jnp.exp(g_t)[..., None, None]
    d = b_t[..., None] * (v_t - jnp.einsum('bhkv,bhk->bhv', state, k_t))
    state = state + jnp.einsum('bhk,bhv->bhkv', k_t, d)
    return state, jnp.einsum('bhkv,bhk->bhv', state, q_t) * scale

  xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, g, beta, seeds, is_first))
  _, o = jax.lax.scan(step, jnp.zeros((b, hv, kd, vd), jnp.float32), xs)
  return jnp.moveaxis(o, 0, 1)


def _clean_states_after_every_token(k, v, g, beta, segment_ids):
  """Simple schedule's clean pass: fp32 state after each token [B, T, HV, K, V]."""
  b, t, hv, kd = k.shape
  vd = v.shape[-1]
  starts = reference.segment_starts(segment_ids, b, t)

  def step(s, x):
    k_t, v_t, g_t, b_t, start = x
    s = jnp.where(start[:, None, None, None], 0.0, s) * jnp.exp(g_t)[..., None, None]
    d = b_t[..., None] * (v_t - jnp.einsum('bhkv,bhk->bhv', s, k_t))
    s = s + jnp.einsum('bhk,bhv->bhkv', k_t, d)
    return s, s

  xs = tuple(jnp.moveaxis(a, 1, 0) for a in (k, v, g, beta, starts))
  _, states = jax.lax.scan(step, jnp.zeros((b, hv, kd, vd), jnp.float32), xs)
  return jnp.moveaxis(states, 0, 1)


def _seed_positions(segment_ids, block_starts):
  """Per slot: the clean position whose state seeds its block, and whether that seed is non-zero."""
  prev = block_starts - 1
  valid = (prev >= 0) & (_gather_time(segment_ids, jnp.maximum(prev, 0)) == segment_ids)
  return jnp.maximum(prev, 0), valid


def shares_clean_pass(schedule: str, clean, chunk_size: int, max_block: int,
                      clean_implementation: str | None = None) -> bool:
  """Whether `two_stream_delta_rule` computes the clean stream's output and the noisy blocks'
  seeds (chunk checkpoints) in one pass: the Triton schedules with the clean stream on Triton
  (clean_implementation None or 'triton'), where the Triton kernels take it (`api.kernels_take`)
  at a chunk length the fused kernels keep."""
  schedule = resolve_schedule(schedule)
  _, k, v = clean[:3]
  return (schedule in ('triton', 'triton_kernel_bwd') and clean_implementation in (None, 'triton')
          and gdr_api.kernels_take('triton', k, v, chunk_size, _interpret())
          and two_stream_pallas.chunk_length(chunk_size, max_block) == chunk_size)


def two_stream_delta_rule(clean, noisy, segment_ids, block_starts, *, scale, schedule='auto',
                          chunk_size=64, max_block=32, clean_implementation=None):
  """(clean output [B, T, HV, V] in v's dtype, noisy outputs [B, V, T, HV, V] fp32) of the gated
  delta rule over a two-stream row (arguments as `noisy_delta_rule`).

  Where `shares_clean_pass`, one Triton pass gives the clean output and the checkpoints the noisy
  op reads, and one backward takes both cotangents; else the clean stream runs on
  `clean_implementation` (`api.chunk_gated_delta_rule`) and the noisy op forms its own.
  """
  if shares_clean_pass(schedule, clean, chunk_size, max_block, clean_implementation):
    o_clean, h, v_new = gdr_api.chunk_output_and_checkpoints(
        *clean, scale=scale, segment_ids=segment_ids, chunk_size=chunk_size,
        interpret=_interpret())
    clean = tuple(clean) + (h, v_new)
  else:
    o_clean, _ = gdr_api.chunk_gated_delta_rule(
        *clean, scale=scale, segment_ids=segment_ids, chunk_size=chunk_size,
        implementation=clean_implementation)
  o_noisy = noisy_delta_rule(clean, noisy, segment_ids, block_starts, scale=scale,
                             schedule=schedule, chunk_size=chunk_size, max_block=max_block)
  return o_clean, o_noisy


def noisy_delta_rule(clean, noisy, segment_ids, block_starts, *, scale, schedule='auto',
                     chunk_size=64, max_block=32):
  """Noisy-view outputs of the gated delta rule under the two-stream state schedule.

  Args:
    clean: (q, k, v, g, beta) of the clean stream: q, k [B, T, H, K] l2-normed, v [B, T, HV, V],
      g (log space), beta [B, T, HV].
    noisy: the same for the views, each with a leading view axis after B: q [B, V, T, H, K], ...
    segment_ids, block_starts: [B, T].
    schedule: 'auto' | 'simple' | 'lean' | 'chunked' | one of KERNEL_SCHEDULES (ALL_SCHEDULES).
    chunk_size: of the chunked schedules (the result does not depend on it). `clean` may carry the
      clean pass's checkpoints at their chunk length (two_stream_xla.given_checkpoints).
    max_block: upper bound on block length in slots (the objective's block size); lean and chunked
      size their windows by it. Longer blocks give wrong outputs (not checked).

  Returns:
    o [B, V, T, HV, V] fp32.
  """
  if schedule not in ALL_SCHEDULES:
    raise ValueError(f'unknown GDN schedule {schedule!r}; known: {ALL_SCHEDULES}')
  schedule = resolve_schedule(schedule, noisy[0].dtype, max_block)
  if schedule in KERNEL_SCHEDULES:
    kernel = (two_stream_pallas.noisy_delta_rule_pallas if schedule.startswith('pallas')
              else two_stream_triton.noisy_delta_rule_triton)
    return kernel(clean, noisy, segment_ids, block_starts, scale=scale, chunk_size=chunk_size,
                  max_block=max_block, interpret=_interpret(),
                  backward='kernel' if schedule.endswith('_kernel_bwd') else 'autodiff')
  if schedule == 'chunked':
    return two_stream_xla.noisy_delta_rule_chunked(
        clean, noisy, segment_ids, block_starts, scale=scale, chunk_size=chunk_size,
        max_block=max_block)
  f32 = lambda a: a.astype(jnp.float32)
  qc, kc, vc, gc, bc = clean[:5]  # the token scans form their own states
  hv = vc.shape[2]
  kc_e = reference.expand_heads(f32(kc), hv)
  qn, kn, vn, gn, bn = (f32(a) for a in noisy)
  nv = qn.shape[1]
  qn = jnp.repeat(qn, hv // qn.shape[3], axis=3)
  kn = jnp.repeat(kn, hv // kn.shape[3], axis=3)
  b, t = segment_ids.shape
  seed_pos, seed_valid = _seed_positions(segment_ids, block_starts)
  is_first = jnp.arange(t)[None] == block_starts  # B T
  merge = lambda a: a.reshape(b * nv, *a.shape[2:])  # fold views into the batch
  per_view = lambda a: jnp.broadcast_to(a[:, None], (b, nv) + a.shape[1:])

  if schedule == 'simple':
    states = _clean_states_after_every_token(kc_e, f32(vc), f32(gc), f32(bc), segment_ids)
    seeds = _gather_time(states, seed_pos) * seed_valid[..., None, None, None]
    o = _seeded_scan(merge(qn), merge(kn), merge(vn), merge(gn), merge(bn),
                     merge(per_view(seeds)), merge(per_view(is_first)), scale)
    return o.reshape(b, nv, t, *o.shape[2:])

  # --- lean: chunk checkpoints only; rebuild each noisy chunk's seeds inside a remat'd map. ---
  c = chunk_size
  h, v_new, _ = gdr_xla.chunk_gated_delta_rule_fwd_h(qc, kc, vc, gc, bc, scale=scale,
                                                     segment_ids=segment_ids, chunk_size=c)
  n = h.shape[1]
  back = max_block  # slots a chunk's blocks can start before it
  width = c + back
  pad_t = n * c + back
  padt = lambda a, mode='constant': jnp.pad(
      a, ((0, 0), (back, pad_t - back - a.shape[1])) + ((0, 0),) * (a.ndim - 2), mode=mode)
  # Clean per-token quantities for the prefix identity, padded so every window slices in range.
  g_cum = gdr_xla.chunk_cumsum(f32(gc), c)  # B T HV: in-chunk inclusive cumulative log-decay
  seg_starts = reference.segment_starts(segment_ids, b, t)
  args = dict(k=padt(kc_e), v_new=padt(v_new), g_cum=padt(g_cum), seg=padt(segment_ids, 'edge'),
              seg_starts=padt(seg_starts))
  noisy_p = [padt(jnp.moveaxis(a, 1, 2)) for a in (qn, kn, vn, gn, bn)]  # B T' V ...
  is_first_p = padt(is_first)
  seed_pos_p = padt(seed_pos)
  seed_valid_p = padt(seed_valid)

  def chunk_out(ci):
    lo = ci * c  # window [lo - back, lo + c) in original slots == [lo, lo + width) padded
    win = lambda a: jax.lax.dynamic_slice_in_dim(a, lo, width, axis=1)
    sp = win(seed_pos_p)  # B W original seed positions
    seeds = _rebuild_states(sp, h, c, args) * win(seed_valid_p)[..., None, None, None]
    q_w, k_w, v_w, g_w, b_w = (jnp.moveaxis(win(a), 2, 1) for a in noisy_p)  # B V W ...
    o = _seeded_scan(merge(q_w), merge(k_w), merge(v_w), merge(g_w), merge(b_w),
                     merge(per_view(seeds)), merge(per_view(win(is_first_p))), scale)
    return o.reshape(b, nv, width, *o.shape[2:])[:, :, back:]

  outs = jax.lax.map(jax.checkpoint(chunk_out), jnp.arange(n))  # N B V C HV V
  outs = jnp.moveaxis(outs, 0, 2).reshape(b, nv, n * c, hv, -1)
  return outs[:, :, :t]


def _rebuild_states(pos, h, c, clean):
  """Clean state after each position pos [B, W] from chunk checkpoints (prefix identity).

  S_after(p) = [p's document continues from the chunk start] e^{G_p} h_{c(p)}
               + sum_{i in chunk c(p), i <= p, same document} e^{G_p - G_i} k_i v'_i^T.
  `clean` arrays are padded by `back` slots at the front (index = position + back).
  """
  offset = clean['seg'].shape[1] - (h.shape[1] * c)  # = back (front padding)
  chunk = pos // c
  start = chunk * c
  idx = start[..., None] + jnp.arange(c)  # B W C: positions of p's chunk
  take = lambda a: jax.vmap(lambda x, i: x[i])(a, idx + offset)  # B W C ...
  k_ch, v_ch, g_ch = take(clean['k']), take(clean['v_new']), take(clean['g_cum'])
  seg_ch, starts_ch = take(clean['seg']), take(clean['seg_starts'])
  seg_p = jax.vmap(lambda x, i: x[i])(clean['seg'], pos + offset)  # B W
  g_p = jax.vmap(lambda x, i: x[i])(clean['g_cum'], pos + offset)  # B W HV
  rel = jnp.arange(c)[None, None]  # 1 1 C
  upto = rel <= (pos - start)[..., None]
  contrib = upto & (seg_ch == seg_p[..., None])  # B W C
  # Mask the exponent, not the result: exp of a masked (positive) difference would overflow and
  # poison the gradient with inf * 0.
  decay = jnp.exp(jnp.where(contrib[..., None], g_p[:, :, None] - g_ch, -jnp.inf))  # B W C HV
  inner = jnp.einsum('bwch,bwchk,bwchv->bwhkv', decay, k_ch, v_ch)
  # The checkpoint reaches p only if no document starts in the chunk up to and including p.
  reset_before = jnp.any(starts_ch & upto, axis=-1)  # B W
  h_c = jax.vmap(lambda x, i: x[i])(h, chunk)  # B W HV K V
  carry = jnp.where(reset_before, 0.0, 1.0)[..., None, None, None]
  return carry * jnp.exp(g_p)[..., None, None] * h_c + inner
