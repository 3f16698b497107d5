"""Noisy views of the two-stream gated delta rule as jax-triton kernels (forward and backward).

The same schedule as `two_stream_pallas` (see its docstring and kernels.md 6.1), written against
Triton directly: one program per (window n, batch x value head x view x V tile) walks window n's
row tiles from the first slot the window owns (forward and backward alike), solving each tile's
blocks against itself and the carried previous tile, and rebuilds every block's seed state from
the clean chunk checkpoint h_n and clean chunk n through the prefix identity, so no per-block
state is ever formed; each slot's output is stored by its seed's window only, straight into the
slot layout. The kernels are in `two_stream_triton_kernels`; this module launches them. The JAX
side (clean pass, slot metadata, the backward's operands and sums) is `two_stream_pallas`'s.

Backward: `jax.vjp` of the pure-JAX chunked schedule (backward='autodiff'), or the kernels
(backward='kernel', `_backward`):
- the forward, differentiated (`noisy_kernel` with STORE_ROWS), stores every window row's W, U,
  V', gam and its row of the tile's (I + A)^-1 as residuals: 2 B x (K + 2 V) + 4 B x (1 + S)
  per window row for 16-bit inputs (4 B x (K + 2 V + 1 + S) for fp32), C + S rows per chunk of
  C slots, head and view (~137 MB per call at B = 1, T = 4096, two views, 16 heads of 128).
  Under a block remat, as every shipped config sets, the outer forward runs without STORE_ROWS
  and the backward reruns it with, so none are kept across layers;
- `noisy_dvn_kernel` takes the intra-block output terms' cotangent of V';
- `noisy_seed_rows_kernel` (the rows' cotangents of e^gam q and W, the clean k's and G's
  gradients) and `noisy_seed_ctx_kernel` (the clean v''s and h_n's) take the seed products'
  backward; each program sums the views, which share the slot metadata and so each row tile's
  seed terms;
- `noisy_bwd_kernel` walks every window backwards, one reverse-mode step of the tile recurrence
  per row tile, carrying cotangents to the previous tile.
The stored rows and the row cotangents passed between the kernels (dV', the seed products' dqe,
dws) are bf16 for 16-bit inputs, fp32 for fp32 (`_row_dtype`); gam and the tile inverses fp32.
At 32-row tiles (block 32), whose registers spill, the kernel backward is slower than autodiff's,
so 'auto' picks it for 16-bit inputs at row tiles up to 16 only
(`two_stream_gdn.resolve_schedule`).

Inputs: the kernels read noisy q, k, v and clean k as given, widening them to fp32 as they load,
and unpadded: slots past T of the last window are masked (the forward, the dV' pass and the
backward kernel) or clamped to slot T - 1 with zero cotangents (the seed kernels). The backward
kernel stores dv, and dq and dk where nothing is summed after it, in the inputs' dtype.

Walks: each window's walk starts at its first own slot and takes only the tiles its own slots
span (`_own_span`). Where no block crosses into any row tile of a window's walk
(`_blocks_cross_tiles`, one check per window: true only around a document end or a block that
does not divide the row tile), every term against the previous tile (A_ip, D_ip and the
cotangents they carry) is zero, and the forward, the dV' pass and the backward kernel walk the
window with a second copy of their loop compiled without them (`CROSS = False`, the lean walks;
row tiles up to LEAN_WALK_MAX_TILE).

`interpret=True` runs the kernels in Triton's interpreter on the host (`_common.triton_interpret`;
the CPU tests).

H100, bf16, B = 1, T = 4096, two views, 16 heads of 128, block 4, the whole two-stream pass's
forward+backward (clean stream included), back to back (2026-12-08): 2.50 ms against 3 x 0.71
ms for the clean pass alone (1.18x); by the profiler, the backward kernel 0.44 ms, the seed rows
kernel 0.42, the forward 0.41, the seed context kernel 0.27, the clean pass's backward state
pass 0.21 and per-chunk backward 0.20, the dV' pass 0.075. How each design step above measured, and what was tried and dropped: docs/benchmarks.md,
"Two-stream GDN schedules" (the history this docstring used to carry is kept there as well).
"""
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta_rule import triton as gdr_triton
from pallas_kernels.gated_delta_rule import two_stream_pallas as tsp
from pallas_kernels.gated_delta_rule import two_stream_triton_kernels as kernels

_F32 = jnp.float32
# The backward kernels' products: bf16 operands for 16-bit inputs, TF32x3 for fp32 inputs.
_BWD_PRODUCTS = {'bfloat16': 'bf16', 'float16': 'bf16', 'float32': 'tf32x3'}
# Row tiles up to this size have the forward store each tile's (I + A)^-1 for the backward kernel
# to load (H200, bf16, T = 4096, block 4: backward kernel 1.33 against 2.21 ms recomputing it);
# 32-row tiles recompute it (storing leaves ptxas 32 registers and 17 KB of spills per thread).
STORED_INVERSE_MAX_TILE = 16


def backward_launch(dtype, max_block: int) -> tuple[int, int, int, int]:
  """(V tile, warps and pipeline stages of `noisy_bwd_kernel`, warps of `noisy_dvn_kernel`).

  ptxas (sm_90a, K = V = 128, bf16, launch.kernel_registers), bytes spilled per thread by (WY
  pass, backward): 16-row tiles at V tile 128 with 4 / 8 warps, 216 / 1,396 (the backward at 4
  warps: 1,692; V tile 64 at 8: 124 / 884); 32-row tiles at V tile 32 with 4 / 4 warps, 2,128 /
  3,048, where 8 warps for the backward (V tiles 32 and 64) left it 32 registers and 11-12 KB of
  spills. Shared memory: at most 80 KiB (bf16), 144 KiB (fp32, whose K = 128 kernels spill 12-56
  KB per thread: correct, not fast). Loading the stored tile inverses (STORED_INVERSE_MAX_TILE)
  cut the 16-row backward's spill to 920. H200, T = 4096, two views, fwd+bwd of the two-stream
  pass, back to back: block 4 at (128, 8, 4) 6.13 ms (5.26 with the stored inverses), at
  (64, 4, 4) 6.93 (an earlier version of the kernels); block 32 at (32, 4, 4) 30.6 ms, at
  (32, 4, 8) 33.7, at (16, 4, 4) 51.5 (walks from nC). Walking only the own tiles (`_own_span`)
  took block 4's spills to 564 (WY pass, from 196) and 1,200 (backward, from 920), and the
  kernel backward's fwd+bwd from 4.96 to 4.75 ms (H100, back to back, 2026-12-06); the lean
  walks (module docstring) to 748 / 1,652 B and 4.07-4.10 ms (H100, 2026-12-07). Two pipeline
  stages for the backward kernel (16-bit inputs): 3.71 ms against 3.87 / 3.85 with one (H100,
  block 4, the slot layout, back to back, 2026-12-07; the kernel 0.571 against 0.734 ms by the
  profiler); ptxas: 532 B spilled, 89 KiB of shared memory (block 4), 32-row tiles unchanged.
  fp32 inputs keep one stage: two spill 26,968 B per thread against 20,032 (block 4)."""
  if jnp.dtype(dtype).itemsize == 2:
    return (128, 8, 2, 4) if tsp.row_tile(max_block) <= 16 else (32, 4, 2, 4)
  return 32, 8, 1, 4


def seed_backward_launch() -> tuple[int, int, int]:
  """(V tile, warps of `noisy_seed_ctx_kernel`; warps of `noisy_seed_rows_kernel`). ptxas
  (sm_90a, K = V = 128, bf16, block 4, launch.kernel_registers): the context kernel at (64, 4)
  spills 24 B per thread, the rows kernel at 8 warps 52 B (at 4 warps: 552). H100, the kernel
  backward's fwd+bwd (block 4, back to back, 2026-12-06): 4.75 / 4.76 ms against 4.81 with the
  context kernel at (128, 8) (84 B spilled). Walking only the window's own tiles (masked rows
  past C + S) took the spills to 88 B (rows) and 216 B (context), measured only together with
  the lean walks (module docstring)."""
  return 64, 4, 8


def forward_launch(dtype, max_block: int) -> tuple[int, int]:
  """(V tile, warps) of the fused forward. H200, T = 4096, H = 16, K = V = 128, bf16 (bf16
  products), V = 2, bench_schedules --schedules=triton --modes=fwd --noisy_block_v/--noisy_warps,
  back to back, 2026-12-02: V tile 128 at 4 warps 0.94 ms, at 8 1.16; 64 at 4 warps 1.26, at 8
  1.68; 32 at 2 warps 1.46, at 4 1.84 (block 4); 128 at 4 / 8 warps 0.94 / 1.15 at block 1,
  0.94 / 1.17 at block 16, 0.63 / 0.77 at block 8 with one view (128 at 4 warps: 255 registers,
  216 B spilled per thread, by launch.kernel_registers; still the fastest). ptxas (sm_90a,
  launch.kernel_registers) rules out 128 for 32-row tiles (32 registers, 16 KB spilled per
  thread) and for fp32 (272 KiB of shared memory)."""
  rows = tsp.row_tile(max_block)
  if jnp.dtype(dtype).itemsize == 2 and rows <= 16:
    return 128, 4
  return 64, tsp.forward_num_warps(rows)


def available() -> bool:
  """Whether the triton package imports here, so that the kernels exist."""
  return kernels.triton is not None


# How the fused forward reads and multiplies 16-bit inputs, as measured on an H200 (bench_schedules,
# clean + noisy forward, T = 4096, H = 16, K = V = 128, bf16, block 4, V = 2, one run, 2026-12-02):
# bf16 products (operands rounded to bf16, fp32 accumulation; the clean context k, v' and h_n
# loaded as bf16) with noisy q, k, v and clean k read as given took 1.72 ms; bf16 products from
# fp32 copies 1.82; TF32 products from fp32 copies 1.89 and 1.94; bf16 at a V tile of 64, 2.41.
# Reading as given also saves the copies (temp 0.189 against 0.314 GiB). The backward's kernels
# read them as given too (the old two-tile backward kernel was faster on fp32 copies, 18.4-18.8 ms
# against 22.6, 2026-12-01; the current ones were not compared). The UT inverse stays TF32x3, as
# are all products for fp32 inputs.


def _forward_products(dtype) -> str:
  """The fused forward's PREC: TF32x3 for fp32 inputs; bf16 (emulated in fp32 under Triton's
  interpreter) for 16-bit ones."""
  if jnp.dtype(dtype) == _F32:
    return 'tf32x3'
  return 'bf16' if _compiled() else 'bf16_emulated'


def _compiled() -> bool:
  """Whether the kernels are built for a GPU, not for Triton's interpreter (TRITON_INTERPRET=1),
  whose bf16 products are wrong (`_common.triton_interpret`)."""
  return type(kernels.noisy_kernel).__name__ != 'InterpretedFunction'


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7, 8, 9))
def _forward(clean, noisy, segment_ids, block_starts, scale, chunk_size, max_block, launch,
             interpret, store_rows=False):
  """Noisy outputs [B, V, T, HV, V] fp32; with store_rows also the window rows the kernel
  backward reads (`_stored_rows`: W, U, V', gam, T), as the forward computes them."""
  b, nv, t, hq, kd = noisy[0].shape
  hv, vd = clean[2].shape[2:]
  block_v, num_warps = launch
  z = tsp._sizes(t, kd, vd, chunk_size, max_block, block_v)  # pylint: disable=protected-access
  wd = z.c + z.s
  # pylint: disable-next=protected-access
  ctx = tsp._clean_pass(clean, segment_ids, z.c, 'triton', interpret)
  noisy_p, meta, ctx, _ = tsp._operands(  # pylint: disable=protected-access
      clean[1], ctx, noisy, segment_ids, block_starts, z, keep_dtype=True, pad_slots=False)
  # Layouts: noisy q, k [B, V, T, H, Kp], v [B, V, T, HV, Vp] (the inputs' dtype, as clean k),
  # g, beta [B, V, T, HV] (fp32), not padded to Tp: the kernel reads slots past T as zeros;
  # slot meta [B, Tp] int32; clean k [B, N C, H, Kp], v' [B, N C, HV, Vp], G [B, N C, HV];
  # h [B, N, HV, Kp, Vp]; out [B, V, T, HV, Vp] (slots: no window layout to pick from).
  prec = _forward_products(noisy[0].dtype)
  none = jax.ShapeDtypeStruct((1,), _F32)
  rows = _stored_rows(b, nv, hv, z, noisy[0].dtype) if store_rows else (none,) * 5
  o, *rows = gdr_triton._jt(interpret).triton_call(  # pylint: disable=protected-access
      *noisy_p, *meta, *ctx, kernel=kernels.noisy_kernel,
      out_shape=[jax.ShapeDtypeStruct((b, nv, t, hv, z.vdp), _F32)] + list(rows),
      grid=(z.n, b * hv * nv * (z.vdp // z.bv)), num_warps=num_warps,
      num_stages=2,
      NV=nv, HQ=hq, HV=hv, N=z.n, T=t, TPAD=z.tpad, K=z.kp, VDP=z.vdp, BV=z.bv, C=z.c, S=z.s,
      N_TILES=wd // z.s, SCALE=scale, PREC=prec, STORE_ROWS=store_rows,
      STORED_T=_stores_inverse(z))
  return (o[..., :vd], tuple(rows)) if store_rows else o[..., :vd]


def _stores_inverse(z) -> bool:
  return z.s <= STORED_INVERSE_MAX_TILE


def _row_dtype(dtype):
  """The stored rows' W, U, V', dV' and seed cotangents' dtype for q/k/v of `dtype`: bf16 for
  16-bit inputs, whose backward kernels take the rows only into bf16 products (but for one
  elementwise term of the seed backward) and the cotangents into gradients stored in bf16, fp32
  otherwise."""
  return jnp.bfloat16 if jnp.dtype(dtype).itemsize == 2 else _F32


def _stored(b, nv, hv, z, *tail, dtype=_F32):
  """The aval of per-window-row values in the stored rows' layout [B, N, HV, V, C + S, *tail]."""
  return jax.ShapeDtypeStruct((b, z.n, hv, nv, z.c + z.s) + tail, dtype)


def _stored_rows(b, nv, hv, z, input_dtype):
  """Avals of the window rows the kernel backward reads (`_stored`): W [K], U, V' [Vp] (in
  `_row_dtype(input_dtype)`), gam and each 16-row tile's (I + A)^-1 row [S] (fp32; a stand-in
  where larger tiles recompute it)."""
  stored = functools.partial(_stored, b, nv, hv, z)
  rows = _row_dtype(input_dtype)
  return (stored(z.kp, dtype=rows), stored(z.vdp, dtype=rows), stored(z.vdp, dtype=rows), stored(),
          stored(z.s) if _stores_inverse(z) else jax.ShapeDtypeStruct((1,), _F32))


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8, 9))
def _backward(clean, noisy, segment_ids, block_starts, do, scale, chunk_size, max_block, launch,
              interpret, *, rows):
  """Gradients of `_forward` for the cotangent do [B, V, T, HV, V]: (d clean, d noisy), given
  the window rows the differentiated forward stored (`rows`, `_stored_rows`).

  Three steps: `noisy_dvn_kernel` takes the cotangent of V' from the intra-block output terms;
  `noisy_seed_rows_kernel` and `noisy_seed_ctx_kernel` take the seed products' backward: the
  rows' cotangents of e^gam q and W, and the clean context's gradients; `noisy_bwd_kernel`
  walks each window's tiles backwards into the noisy inputs' gradients (at the slots each window
  owns, in the slot layout, as dO is read). Plain JAX then
  sums V tiles and GQA heads where there are several and pulls the context gradients (the
  views already summed by the seed kernels) through the clean pass (`backward_sums`)."""
  del launch  # the forward's; the backward's is `backward_launch`
  b, nv, t, hq, _ = noisy[0].shape
  hv = clean[2].shape[2]
  prec = _BWD_PRODUCTS[jnp.dtype(noisy[0].dtype).name]
  block_v, num_warps, num_stages, dvn_warps = backward_launch(noisy[0].dtype, max_block)
  ops = tsp.backward_operands(clean, noisy, segment_ids, block_starts, do, chunk_size, max_block,
                              block_v, 'triton', interpret, front_tile=False, keep_dtype=True,
                              slot_do=True, pad_slots=False)
  z = ops.z
  if prec == 'bf16' and not _compiled():
    prec = 'bf16_emulated'  # built for Triton's interpreter (TRITON_INTERPRET=1)
  nvt, wd = z.vdp // z.bv, z.c + z.s
  slots = lambda *tail, dtype=_F32: jax.ShapeDtypeStruct((b, nv, t, hv) + tail, dtype)
  stored = functools.partial(_stored, b, nv, hv, z)
  rows_dtype = _row_dtype(noisy[0].dtype)  # of dV' and the seed kernels' row cotangents too
  sizes = dict(NV=nv, HQ=hq, HV=hv, N=z.n, T=t, TPAD=z.tpad, K=z.kp, VDP=z.vdp, BV=z.bv, C=z.c,
               S=z.s, N_TILES=wd // z.s, SCALE=scale, PREC=prec, STORED_T=_stores_inverse(z))
  grid = (z.n, b * hv * nv * nvt)
  call = gdr_triton._jt(interpret).triton_call  # pylint: disable=protected-access
  # Every kernel walks only each window's own tiles (`_own_span`).
  w, u, vn, gam, t_rows = rows
  dvn = call(ops.noisy[0], ops.noisy[1], *ops.meta[:2], gam, ops.do,
             kernel=kernels.noisy_dvn_kernel, out_shape=stored(z.vdp, dtype=rows_dtype), grid=grid,
             num_warps=dvn_warps, num_stages=1,
             **{k: v for k, v in sizes.items() if k != 'STORED_T'})
  seed_ops = (ops.noisy[0],) + ops.meta[1:] + ops.ctx + (ops.do, w, gam, dvn)
  ctx_v = lambda *tail: jax.ShapeDtypeStruct((b, z.n * z.c, hv) + tail, _F32)
  seed_sizes = {k: sizes[k] for k in ('NV', 'HQ', 'HV', 'N', 'T', 'TPAD', 'K', 'VDP', 'C', 'S',
                                      'N_TILES', 'SCALE', 'PREC')}
  ctx_block_v, ctx_warps, rows_warps = seed_backward_launch()
  dqe, dws, dkc, dgc = call(
      *seed_ops, kernel=kernels.noisy_seed_rows_kernel,
      out_shape=[stored(z.kp, dtype=rows_dtype), stored(z.kp, dtype=rows_dtype),
                 ctx_v(1, z.kp), ctx_v(1)],
      grid=(z.n, b * hv), num_warps=rows_warps, num_stages=1, **seed_sizes)
  ctx_block_v = min(ctx_block_v, z.vdp)
  dvc, dh = call(
      *seed_ops, kernel=kernels.noisy_seed_ctx_kernel,
      out_shape=[ctx_v(z.vdp), jax.ShapeDtypeStruct((b, z.n, hv, z.kp, z.vdp), _F32)],
      grid=(z.n, b * hv * (z.vdp // ctx_block_v)), num_warps=ctx_warps, num_stages=1,
      BV=ctx_block_v, **seed_sizes)
  # The seed kernels sum the views themselves: a views axis of one for `backward_sums`.
  ctx_grads = tuple(x[:, None] for x in (dkc, dvc, dgc, dh))
  q, k, v, _, beta = ops.noisy
  # dv in v's dtype; dq and dk in theirs where nothing is summed after the kernel (one V tile,
  # a key head per value head): no fp32 copies for XLA to convert.
  qk_dtype = noisy[0].dtype if nvt == 1 and hv == hq else _F32
  outs = call(q, k, v, beta, *ops.meta[:2], w, u, vn, gam, dvn, t_rows, ops.do, dqe, dws,
              kernel=kernels.noisy_bwd_kernel,
              out_shape=[slots(nvt, z.kp, dtype=qk_dtype), slots(nvt, z.kp, dtype=qk_dtype),
                         slots(z.vdp, dtype=noisy[2].dtype), slots(nvt), slots(nvt)],
              grid=grid, num_warps=num_warps, num_stages=num_stages, **sizes)
  return tsp.backward_sums(ops, tuple(outs) + tuple(ctx_grads), clean, noisy)


_noisy = tsp.fused_noisy_op(_forward, _backward, clean_family='triton', stores_rows=True)


def noisy_delta_rule_triton(clean: tuple[jax.Array, ...], noisy: tuple[jax.Array, ...],
                            segment_ids: jax.Array, block_starts: jax.Array, *, scale: float,
                            chunk_size: int = 64, max_block: int = 32,
                            interpret: bool = False, backward: str = 'autodiff') -> jax.Array:
  """Noisy-view outputs of the two-stream gated delta rule: the 'chunked' schedule's forward as one
  jax-triton kernel. Same contract as `two_stream_pallas.noisy_delta_rule_pallas`: backward
  'autodiff' (of the pure-JAX chunked schedule) or 'kernel' (`_backward`: four kernels, then
  plain JAX sums); `interpret=True` runs Triton's interpreter on the host.

  Raises:
    ValueError: as `two_stream_pallas.check_arguments`, or (not interpreting) no GPU.
  """
  tsp.check_arguments(clean, noisy, max_block, backward, interpret)
  if not interpret and jax.default_backend() != 'gpu':
    raise ValueError(f'the triton two-stream kernel needs a GPU (backend is '
                     f'{jax.default_backend()!r})')
  if not available():
    raise ValueError('the triton two-stream kernel needs the triton package')
  return _noisy(tuple(clean), tuple(noisy), segment_ids, block_starts, float(scale),
                int(chunk_size), int(max_block), forward_launch(noisy[0].dtype, max_block),
                bool(interpret), backward)
