"""Flash attention under metadata visibility in Pallas: Triton lowering on GPU, `interpret` on CPU.

FlashAttention-2 with per-token metadata masks (`mask.visible`, evaluated on every visited tile) and
block sparsity from a conservative tile table:

  forward   one program per (head, q tile of a row): the q tile [bq, D] walks the k tiles it may
            see, online softmax in fp32 -> o [B, T, H, D] and the log-sum-exp lse [B, H, T] (saved
            for the backward). Every kernel works in base 2: scores times scale * log2 e, lse in
            log2 units, so that each exponential is one exp2 (Triton lowers jnp.exp to
            libdevice's longer expf; H200, causal T = 4096, 16 / 4 heads, D = 256, bf16, one run:
            forward kernel 0.334 against 0.353 ms, dq 0.510 against 0.537, dk/dv 1.005 against
            0.993).
  dq        the same programs and walk: dq = scale * sum_k dS k with P = exp(S - lse) and
            dS = P * (dO V^T - delta), delta = rowsum(O * dO) (computed in XLA).
  dk, dv    one program per (kv head, k tile of a row): the k tile walks, for each of the H/Hkv
            query heads of its group, the q tiles that may see it: dv += P^T dO, dk += scale *
            dS^T q, on keys-first tiles S^T = k q^T [bk, bq] so that no product takes a
            transposed operand (or one program per (query head, k tile) with
            `BlockSizes.dkdv_per_q_head`, the group summed in XLA; or dk and dv from two
            kernels with `BlockSizes.split_dkdv`, faster for causal rows at batch >= 4 only).

Tried and dropped (H200, T = 4096, D = 256, bf16): dq by atomic adds into fp32 in the dk/dv kernel
in place of the dq kernel (2.3x slower forward+backward: 26.1 against 11.3 ms, two-stream shape).
A dk/dv kernel on queries-first tiles accumulating dk^T, dv^T [D, bk]: at 32 keys per tile Triton
compiles the keys-first products to mma.sync (wgmma needs 64 rows) and these all to wgmma, yet
the kernel measured slower, causal: 1.12 against 0.975 ms at 4 warps, 1.91 at 8, 1.88 with 16
keys per tile (one run; two-stream 3.57 against 3.01). The grouped dk/dv kernel walking its query
heads and visit list as two flat (head, tile) loops, so that its software pipeline fills twice
rather than twice per head: 1.062 against 0.997 ms (causal, one run). Two more, on branches
`exp/dkdv-two-pass` and `exp/dkdv-split-d` (H200, 2026-12-03, each against this kernel's 0.98 ms
in the same run): walking the visit list twice, dv then dk, so that 64-key tiles fit (every
product wgmma): 1.47 ms at 64 x 64 and 8 warps, 2.19 at 64 keys x 32 queries; dk and dv
accumulated as two column halves: 1.80 ms at 32 x 64, 1.42 at 32 x 32. Reordering the casts of P^T
and dS^T cut this kernel's ptxas spill from 152 to 8 bytes and its time not at all (0.982 ms):
spills are not what bounds it. delta = rowsum(o * dO) computed by the dq kernel for its rows
(a second output) in place of XLA's reduction (0.019 ms): fwd+bwd 1.97 / 1.96 ms against 1.98 /
1.96 causal, two-stream 6.02 / 6.03 against 6.00 / 6.01 (H200, 2026-12-04, runs alternating with
this code), with 0.03 / 0.10 GiB more temp memory: not kept. A dk/dv program of 64 keys worked
as two 32-key sub-tiles, each with its own products and accumulators, sharing every q / dO tile
(half the q / dO traffic at mma.sync-sized products; branch `exp/dkdv-key-splits`): 1.32 ms at 8
warps against this kernel's 1.00, 2.17 with 32 query rows, 5.63 with 128 keys as four sub-tiles
(H200, causal, `--profile`, one run, 2026-12-04). In the same run, every kernel's neighbouring
tiles were slower too: dk/dv 64 keys x 32 queries at 8 warps 1.42 ms; dq 64 x 64 at 8 warps 0.83
against 0.51, 64 x 32 at 4 warps 0.65; forward 128 x 32 at 3 stages 0.45 against 0.33.
FA3-style warp specialization (a producer warpgroup loading tiles, consumer warpgroups computing,
registers moved between them with setmaxnreg) is out of reach from JAX with Triton 3.6 (checked
on CPU, compiling for sm_90, 2026-12-05): its Hopper pass (`tl.range(..., warp_specialize=True)`)
partitions an attention forward loop only when the tiles come through TMA tensor descriptors
made on device (`tl.make_tensor_descriptor`, 4 warps: setmaxnreg in the PTX, twice the wgmma),
and leaves plain pointer loads unpartitioned (8 warps) or fails (4 warps). Device descriptors
live in Triton's global scratch memory, for which jaxlib's launcher of jax-triton kernels passes
a null pointer; Pallas exposes neither the descriptors nor the loop attribute.

Launch order: grids are (heads, row tiles), and a program takes its (row, tile) from a launch
order computed in XLA (`_launch_order`): by default row by row, each row's tiles with the longest
visit lists first, so that the GPU's last wave holds short programs (H200, B = 1, T = 4096, 16 / 4
heads, D = 256, bf16, one run: causal forward 0.390 against 0.457 ms in tile order,
forward+backward 2.52 against 2.63; two-stream 1.21 / 7.71 against 1.26 / 7.71). Sorted across
rows instead, at B = 4 the programs running at once spread over every row, whose k / v no longer
fit in L2 together: on an H100 (2026-12-05, causal, B = 4) forward+backward took 7.72 ms against
7.39 in tile order (one run); row by row it takes 7.41 against 7.40 (a later run). Launching
head by head instead (every (row, tile) of a head, then the next, so that the dk/dv programs
running at once stream one head's q / dO rather than all 16 heads' 64 MiB; branch
`exp/head-major-launch`) measured slower: causal 7.95 against 7.40 ms, two-stream 24.99 against
24.43 (H100, B = 4, one run, 2026-12-05).

Block sparsity: `tile_visibility` summarises the metadata of every tile (segment range, latest
clean position a query may see, range of noisy views and block starts) and marks a (q tile, k tile)
pair as "may be visible" unless the summaries prove that no pair inside is. It is conservative (it
may mark a tile whose pairs are all invisible, never the opposite), so skipping unmarked tiles is
exact. `tile_full_visibility` marks, as conservatively the other way, the tiles whose every pair is
visible (one segment, clean keys all within every query's horizon: most tiles of a causal row).
The tables are compacted into per-tile visit lists [full count, count, full tile ids ascending,
then the other marked ids ascending]; each program loops over its list only, so skipped tiles cost
nothing, not even a branch, and runs the full tiles first without evaluating the mask, in a loop of
their own (on an H200 at T = 4096, D = 256, bf16: two-stream forward 1.49 against 2.13 ms with every
tile masked, forward+backward 10.16 against 11.26; causal 0.80 / 3.77 against 0.86 / 3.99).

Rows that see nothing: their softmax denominator is 0; they output zeros and get zero gradients (as
`xla.attention_xla`). Padding: D to a power of two >= 16 (Triton's `tl.dot` and load sizes), T and
S to block multiples with metadata that nothing sees and that sees nothing (see `_pad_meta`).
Positions must lie in (-2**30, 2**30).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import backend
from pallas_kernels.attention import mask as mask_lib

MAX_HEAD_DIM = 256
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)

_F32 = jnp.float32
_NEG = -1e30  # masked score and initial row max: finite, so a fully masked tile gives no inf - inf
_DEAD_LSE = 1e30  # lse of a row that sees nothing: exp2(s - lse) == 0 for every score
_LOG2E = float(np.log2(np.e))
_I32_MAX = np.iinfo(np.int32).max
_I32_MIN = np.iinfo(np.int32).min
_PAD_POS = 2**30  # padded keys sit at +_PAD_POS (past every horizon), padded queries at -_PAD_POS
_N_FIELDS = len(mask_lib.TokenMeta._fields)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles and launch parameters of the three kernels (each tile size a power of two >= 16).

  Attributes:
    block_q, block_k, num_warps: forward (q tile stays in registers, k/v tiles stream).
    block_q_dq, block_k_dq, num_warps_dq: dq kernel (q, dO tiles stay; k/v stream).
    block_q_dkv, block_k_dkv, num_warps_dkv: dk/dv kernel (k, v tiles stay; q, dO stream).
    num_stages, num_stages_dq, num_stages_dkv: software pipelining depth of each kernel's
      streamed tiles (shared memory ~ stages x tiles). dk/dv at bf16 D = 256 (H200, causal,
      one run): 1.005 ms at 2 stages, 1.033 at 3, 1.545 at 1.
    dkdv_per_q_head: one dk/dv program per (k tile, query head) instead of per (k tile, kv head),
      writing fp32 per-head partials that XLA sums over each GQA group: H / Hkv times the programs
      (causal k tiles carry unequal work, and B * Hkv * S / block_k_dkv is 256 at B = 1, T = 4096,
      Hkv = 4) for 2 * B * S * H * D fp32 of temporary memory. It was the default at bf16
      D = 256 until the dk/dv kernel took keys-first tiles with 4 warps (2026-12-03): since,
      the grouped kernel is as fast and needs no temporary memory (H200, B = 1, T = 4096, 16 / 4
      heads, forward+backward, one run: causal 1.99 against 2.04 ms, two-stream 6.07 against
      6.21).
    split_dkdv: dv and dk from two kernels (`_dkdv_kernel`'s outputs), each with one fp32 [bk, D]
      accumulator, so that larger key tiles fit the registers at D = 256; the work grows from
      four products per (k tile, q tile) to five (S^T is computed in both). Off by default: H100,
      bf16, T = 4096, 16 / 4 heads, D = 256, causal fwd+bwd (2026-12-05, one run; two for 4
      rows at 128 x 32): at 4 rows 7.14 / 7.17 ms with 128-key x 32-query tiles at 8 warps
      against 7.38 / 7.37 (cuDNN 5.37: 1.33x against 1.37x), 7.88 at 64 x 64, 4 warps, 9.07 at
      the default 32 x 64, 4 warps, 9.17 at 64 x 64, 8 warps; at 1 row (128 programs a kernel at
      128-key tiles, fewer than the SMs) 2.59 against 1.95 ms; on the two-stream row at 4 rows
      24.64 against 24.44. 128 x 64 at 8 warps does not fit shared memory. 2026-12-06 (H100,
      4 rows, one run): 7.18 ms, with 128 x 32 dq tiles at 8 warps 7.14, at 3 stages 7.27,
      against the default's 7.36 and cuDNN's 5.24 (1.36x at best).
    heavy_first: launch each row's programs in descending order of the tiles they visit, rows
      in order (`_launch_order`), so that the longest ones start first and the last wave is short;
      off, programs run in tile order.
    lazy_rescale: 0, or the forward's `online_softmax_step` rescale_threshold tau (base-2
      units): a row's reference max moves only by more than tau, so that the [bq, D] accumulator
      is rescaled only on the few tiles where some row's max moved, not on every tile; scores
      then reach exp2(tau) (256 at tau = 8) before the fp32 sum, far from overflow. H200, bf16,
      4 rows, T = 4096, 16 / 4 heads, D = 256, one run (2026-12-05): forward causal 1.31 / 1.30
      ms at tau 8 / 4 against 1.34 with the running max, two-stream row 4.25 / 4.25 against 4.44
      (forward+backward 7.44 / 24.29 against 7.48 / 24.38; cuDNN's causal 0.95 / 5.27).
  """

  block_q: int = 64
  block_k: int = 64
  num_warps: int = 8
  block_q_dq: int = 64
  block_k_dq: int = 32
  num_warps_dq: int = 8
  block_q_dkv: int = 64
  block_k_dkv: int = 32
  num_warps_dkv: int = 8
  num_stages: int = 2
  num_stages_dq: int = 2
  num_stages_dkv: int = 2
  dkdv_per_q_head: bool = False
  split_dkdv: bool = False
  heavy_first: bool = True
  lazy_rescale: int = 8

  @classmethod
  def get_default(cls, head_dim: int, dtype, device_kind: str = '') -> 'BlockSizes':
    """Defaults by bytes per (padded) row of q/k/v, sized for H100/H200 shared memory (227 KiB).

    Forward shared memory ~ (bq + 2 * stages * bk) * row bytes: at D=256 bf16 (512 B rows),
    128/64/2 stages is 192 KiB. The fp32 accumulators ([bq, D] forward and dq; two [bk, D] in dk/dv)
    live in registers, hence 8 warps from D=128 on, but for the backward at D = 256: 4 warps on
    64 x 64 dq tiles and 32-key x 64-query dk/dv tiles (H200, causal T = 4096, 16 / 4 heads, bf16,
    one run: dk/dv kernel 0.99 ms against 1.42 with 64 x 32 at 8 warps; 1.15 at 64 x 64, 8
    warps; 1.23 / 1.29 with 128 / 32 query rows at 4 warps; 1.85 at 16 x 128; dq 0.54 against
    0.55 at 128 x 32, 8 warps).

    Before Hopper (`backend.gpu_generation`; not timed, no such GPU lent: by ptxas, bf16 D = 256,
    launch.kernel_registers --family=attention --arch=80 / 86): Triton's mma.sync code keeps
    both operands of every product in registers, and at 128 query rows ptxas caps the forward at
    128 registers and spills 6 KB per thread (0 B at 64 rows, 105 KiB of shared memory). An A100
    (163 KiB of shared memory) takes the Hopper backward (137 / 102 KiB; 448 / 304 B spilled);
    sm_86 / sm_89 cards have 99 KiB, in which the forward at 64 x 32 tiles (68 KiB, nothing
    spilled), dq at 32 x 32 (66 KiB, nothing spilled) and dk/dv at 32 x 32 (67 KiB, 32 B) fit.

    Args:
      head_dim: padded head size (power of two >= 16).
      dtype: dtype of q, k, v.
      device_kind: `jax.devices()[0].device_kind`.
    """
    row_bytes = head_dim * jnp.dtype(dtype).itemsize
    warps = 4 if head_dim <= 64 else 8
    if row_bytes <= 256:  # bf16 D <= 128, fp32 D <= 64
      return cls(128, 64, warps, 64, 64, warps, 64, 64, warps)
    if row_bytes <= 512:  # bf16 D = 256, fp32 D = 128: best of sweeps on an H200 (causal, T=4096)
      generation = backend.gpu_generation(device_kind)
      if generation == 'sm86':
        return cls(64, 32, 8, 32, 32, 4, 32, 32, 4)
      return cls(64 if generation == 'sm80' else 128, 64, 8, 64, 64, 4, 64, 32, 4)
    return cls(32, 32, 8, 32, 32, 8, 32, 32, 8)  # fp32 D = 256

  def tiles(self) -> tuple[int, ...]:
    return (self.block_q, self.block_k, self.block_q_dq, self.block_k_dq, self.block_q_dkv,
            self.block_k_dkv)

  def with_fields(self, spec: str) -> 'BlockSizes':
    """These sizes with fields set by 'FIELD[=N]+...' (the benches' and tests' syntax): a bare
    FIELD turns a flag on, FIELD=N sets a number or, for a flag, N != 0; '' changes nothing.

    Raises:
      ValueError: a name that is not a field, or N not an integer.
    """
    fields = {f.name for f in dataclasses.fields(self)}
    changes = {}
    for part in filter(None, spec.split('+')):
      name, eq, value = part.partition('=')
      if name not in fields:
        raise ValueError(f'BlockSizes has no field {name!r} (fields: {", ".join(sorted(fields))})')
      if eq and not value.lstrip('-').isdigit():
        raise ValueError(f'{part!r}: the value must be an integer')
      number = int(value) if eq else 1
      changes[name] = bool(number) if isinstance(getattr(self, name), bool) else number
    return dataclasses.replace(self, **changes)


def unsupported_reason(q: jax.Array, k: jax.Array, v: jax.Array) -> str | None:
  """Why the kernels cannot take these inputs (the api then falls back to xla), or None."""
  d = q.shape[-1]
  if d > MAX_HEAD_DIM:
    return f'head dim D={d} > {MAX_HEAD_DIM}'
  if not q.dtype == k.dtype == v.dtype:
    return f'q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})'
  if q.dtype not in DTYPES:
    return f'dtype {q.dtype} (kernels take float32, bfloat16, float16)'
  return None


# ---------------------------------------------------------------------------------------------
# Tile visibility (outside the kernels): conservative table and visit lists.
# ---------------------------------------------------------------------------------------------
def _tile_summary(meta: mask_lib.TokenMeta, block: int) -> dict[str, jax.Array]:
  """Per-tile bounds of the metadata, each [B, L / block] int32 (L a multiple of `block`).

  seg_lo/hi: segment range; horizon_lo/hi: earliest and latest clean position the tile's tokens
  may see as queries (its own position if clean, block start - 1 if noisy); clean_lo/hi: range of
  the clean tokens' positions; view_lo/hi, start_lo/hi: ranges of view and block start over the
  noisy tokens. Empty sets give (lo, hi) = (INT32_MAX, INT32_MIN), which overlap nothing.
  """
  b, length = meta.positions.shape
  seg, pos, view, start = (x.reshape(b, length // block, block) for x in meta)
  noisy = view != 0
  lo = lambda x, keep: jnp.min(jnp.where(keep, x, _I32_MAX), axis=-1)
  hi = lambda x, keep: jnp.max(jnp.where(keep, x, _I32_MIN), axis=-1)
  every = jnp.ones_like(noisy)
  horizon = jnp.where(noisy, start - 1, pos)
  return dict(seg_lo=lo(seg, every), seg_hi=hi(seg, every),
              horizon_lo=lo(horizon, every), horizon_hi=hi(horizon, every),
              clean_lo=lo(pos, ~noisy), clean_hi=hi(pos, ~noisy),
              view_lo=lo(view, noisy), view_hi=hi(view, noisy),
              start_lo=lo(start, noisy), start_hi=hi(start, noisy))


def _tile_pairs(q_meta, k_meta, block_q, block_k):
  """`_tile_summary` of the q tiles as [B, n, 1] and of the k tiles as [B, 1, m]."""
  q = {n: x[:, :, None] for n, x in _tile_summary(q_meta, block_q).items()}
  k = {n: x[:, None, :] for n, x in _tile_summary(k_meta, block_k).items()}
  return q, k


def tile_visibility(q_meta: mask_lib.TokenMeta, k_meta: mask_lib.TokenMeta, block_q: int,
                    block_k: int) -> jax.Array:
  """Conservative "may be visible" table of (q tile, k tile) pairs.

  Mirrors `mask.visible` on tile bounds: a pair is marked unless the segment ranges are disjoint, or
  both (a) no clean key of the k tile is at or before the latest horizon of the q tile and (b) the
  noisy view ranges or the noisy block-start ranges of the two tiles are disjoint. Hence every
  visible (query, key) pair lies in a marked tile.

  Args:
    q_meta: fields [B, T], T a multiple of block_q.
    k_meta: fields [B, S], S a multiple of block_k.

  Returns:
    bool [B, T / block_q, S / block_k].
  """
  q, k = _tile_pairs(q_meta, k_meta, block_q, block_k)
  overlap = lambda a, b: (q[a] <= k[b]) & (k[a] <= q[b])
  sees_clean = k['clean_lo'] <= q['horizon_hi']
  sees_noisy = overlap('view_lo', 'view_hi') & overlap('start_lo', 'start_hi')
  return overlap('seg_lo', 'seg_hi') & (sees_clean | sees_noisy)


def tile_full_visibility(q_meta: mask_lib.TokenMeta, k_meta: mask_lib.TokenMeta, block_q: int,
                         block_k: int) -> jax.Array:
  """Conservative "every pair is visible" table of (q tile, k tile) pairs: one segment over both
  tiles, no noisy key, and every clean key at or before every query's horizon (`mask.visible`'s
  clean-key rule, whatever the query's view). Padded tokens never pass (their positions lie past
  every horizon, or their horizon before every key). Same arguments and result as
  `tile_visibility`; a marked tile is marked there too."""
  q, k = _tile_pairs(q_meta, k_meta, block_q, block_k)
  one_segment = ((q['seg_lo'] == q['seg_hi']) & (k['seg_lo'] == k['seg_hi'])
                 & (q['seg_lo'] == k['seg_lo']))
  clean_keys = k['view_lo'] == _I32_MAX  # no noisy token in the k tile
  return one_segment & clean_keys & (k['clean_hi'] <= q['horizon_lo'])


def visited_tile_fraction(q_meta: mask_lib.TokenMeta, k_meta: mask_lib.TokenMeta, block_q: int,
                          block_k: int) -> jax.Array:
  """Fraction of (q tile, k tile) pairs the forward kernel visits (metadata padded as it pads)."""
  tp = backend.cdiv(q_meta.positions.shape[1], block_q) * block_q
  sp = backend.cdiv(k_meta.positions.shape[1], block_k) * block_k
  table = tile_visibility(_fields(_pad_meta(q_meta, tp, query=True)),
                          _fields(_pad_meta(k_meta, sp, query=False)), block_q, block_k)
  return jnp.mean(table)


def _visit_lists(q_meta: mask_lib.TokenMeta, k_meta: mask_lib.TokenMeta, block_q: int,
                 block_k: int, *, by_key: bool = False) -> jax.Array:
  """int32 [B, n, m + 2] per q tile (or with by_key [B, m, n + 2] per k tile): the count of fully
  visible tiles, the count of marked tiles, then the fully visible tile ids ascending and the other
  marked ids ascending (entries past the count are unused)."""
  may = tile_visibility(q_meta, k_meta, block_q, block_k)
  full = tile_full_visibility(q_meta, k_meta, block_q, block_k)  # a subset of may
  if by_key:
    may, full = may.swapaxes(1, 2), full.swapaxes(1, 2)
  rank = jnp.where(full, 0, jnp.where(may, 1, 2))  # full tiles, then the rest, then unvisited
  order = jnp.argsort(rank, axis=-1, stable=True).astype(jnp.int32)
  counts = [jnp.sum(x, axis=-1, dtype=jnp.int32)[..., None] for x in (full, may)]
  return jnp.concatenate(counts + [order], axis=-1)


def _launch_order(visit: jax.Array, heavy_first: bool) -> jax.Array:
  """int32 [B * n]: the flat (row, tile) ids `row * n + tile` in the order the programs take them,
  for visit lists [B, n, m + 2]. Rows go in order; with heavy_first, each row's tiles by descending
  count of visited tiles (stable): list scheduling runs the longest jobs first and the GPU's last
  wave holds only short ones (a causal row's tiles carry 1 to n units of work). Sorting within
  rows, not across them, keeps the programs running at once on few rows, whose k / v stay in L2
  (one causal row's k and v at T = 4096, 4 kv heads, D = 256, bf16 are 16 MiB; an H100's L2 is
  50 MB). Otherwise in id order."""
  rows, tiles = visit.shape[:2]
  if not heavy_first:
    return jnp.arange(rows * tiles, dtype=jnp.int32)
  within_row = jnp.argsort(-visit[..., 1], axis=-1, stable=True).astype(jnp.int32)
  return (within_row + tiles * jnp.arange(rows, dtype=jnp.int32)[:, None]).reshape(-1)


def _program_tile(order_ref, tiles: int):
  """(row, tile) of this program: the `pl.program_id(1)`-th entry of the launch order."""
  flat = order_ref[pl.program_id(1)]
  return flat // tiles, flat % tiles


def _visit(entry, body, carry):
  """Runs body(masked)(i, carry) over a visit list read through entry(j) (its j-th int): the full
  tiles unmasked, then the rest masked; body reads tile ids as entry(i + 2)."""
  carry = jax.lax.fori_loop(0, entry(0), body(False), carry)
  return jax.lax.fori_loop(entry(0), entry(1), body(True), carry)


# ---------------------------------------------------------------------------------------------
# In-kernel helpers.
# ---------------------------------------------------------------------------------------------
def _dot(a, b, *, tb=False):
  """a @ b (or a @ b^T with tb) with fp32 accumulation; IEEE fp32 for fp32 operands (so interpret
  mode and GPU agree with the reference to ~1e-6), tensor-core MMA for 16-bit ones."""
  prec = jax.lax.Precision.HIGHEST if a.dtype == _F32 else jax.lax.Precision.DEFAULT
  dims = (((1,), (1 if tb else 0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, precision=prec, preferred_element_type=_F32)


def _load_meta(ref, b, rows) -> mask_lib.TokenMeta:
  """TokenMeta of row b of a [B, 4, L] metadata ref (fields stacked in TokenMeta order) at
  `rows`."""
  return mask_lib.TokenMeta(*(ref[b, f, rows] for f in range(_N_FIELDS)))


def _probs(q, k, lse, scale2, vis):
  """P = exp2(scale2 q k^T - lse) on the visible pairs `vis` [bq, bk] (None: all), 0 elsewhere:
  [bq, bk] fp32 (scale2 = scale * log2 e, lse in base 2 as the forward writes it)."""
  p = jnp.exp2(_dot(q, k, tb=True) * scale2 - lse[:, None])
  return p if vis is None else jnp.where(vis, p, 0.0)


def online_softmax_step(q, k, v, vis, carry, scale, rescale_threshold=None):
  """One key tile of the online softmax in base 2 (scores times scale * log2 e): carry (acc [bq, D],
  reference max m [bq], denominator l [bq], all fp32) updated with the tile's k, v [bk, D] on the
  visible pairs `vis` [bq, bk] (None: all); acc and l sum exp2(score - m). A tile with no visible
  pair leaves the carry as it was, bit for bit.

  rescale_threshold None: m is the running row max, and acc is rescaled on every tile. A number
  tau > 0 (base-2 units): a row's m moves only to a tile max above m + tau (so every term stays
  <= 2**tau), and acc is rescaled only on tiles where some row's m moved (one uniform branch).
  Rows whose m stayed are multiplied by exactly 1 when it runs, so a row's result does not depend
  on the other rows of its tile."""
  acc, m, l = carry
  s = _dot(q, k, tb=True) * (scale * _LOG2E)
  if vis is not None:
    s = jnp.where(vis, s, _NEG)
  m_tile = jnp.max(s, axis=1)
  if rescale_threshold is None:
    m_new = jnp.maximum(m, m_tile)
  else:
    m_new = jnp.where(m_tile > m + rescale_threshold, m_tile, m)
  alpha = jnp.exp2(m - m_new)
  p = jnp.exp2(s - m_new[:, None])
  if vis is not None:
    p = jnp.where(vis, p, 0.0)
  l = alpha * l + jnp.sum(p, axis=1)
  if rescale_threshold is None:
    acc = alpha[:, None] * acc
  else:
    moved = jnp.max(m_new - m) > 0.0
    acc = jax.lax.cond(moved, lambda a: alpha[:, None] * a, lambda a: a, acc)
  acc = acc + _dot(p.astype(v.dtype), v)
  return acc, m_new, l


def softmax_init(rows: int, d: int):
  """The online softmax's carry before any key: (acc, m, l) for `rows` queries of head dim d."""
  return jnp.zeros((rows, d), _F32), jnp.full((rows,), _NEG, _F32), jnp.zeros((rows,), _F32)


# ---------------------------------------------------------------------------------------------
# Kernels. Refs arrive as (inputs..., outputs...).
# ---------------------------------------------------------------------------------------------
def _fwd_kernel(order_ref, visit_ref, q_ref, k_ref, v_ref, qm_ref, km_ref, o_ref, lse_ref, *,
                scale, bq, bk, rescale_threshold):
  """One (head, q tile of a row) in launch order: online softmax over the k tiles in its visit
  list, in base 2 (scores times scale * log2 e, so that each exponential is one exp2). Refs hold
  every row (and the program's head or kv head): q, o [B, Tp, D]; k, v [B, Sp, D]; metadata
  [B, 4, L]; visit lists [B, n, m + 2]; lse [B, Tp] = log2 of the softmax denominator of the
  base-2 scores."""
  b, i = _program_tile(order_ref, visit_ref.shape[1])
  entry = lambda j: visit_ref[b, i, j]
  q_rows = pl.ds(i * bq, bq)
  q = q_ref[b, q_rows, :]
  q_meta = _load_meta(qm_ref, b, q_rows)
  d = q.shape[1]

  def body(masked):
    def step(n, carry):
      rows = pl.ds(entry(n + 2) * bk, bk)
      vis = mask_lib.visible(q_meta, _load_meta(km_ref, b, rows)) if masked else None
      return online_softmax_step(q, k_ref[b, rows, :], v_ref[b, rows, :], vis, carry, scale,
                                 rescale_threshold)
    return step

  acc, m, l = _visit(entry, body, softmax_init(bq, d))
  seen = l > 0.0
  o_ref[b, q_rows, :] = (acc / jnp.where(seen, l, 1.0)[:, None]).astype(o_ref.dtype)
  lse_ref[b, q_rows] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)) * _LOG2E, _DEAD_LSE)


def _dq_kernel(order_ref, visit_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qm_ref,
               km_ref, dq_ref, *, scale, bq, bk):
  """One (head, q tile of a row) in launch order: dq = scale * sum over visited k tiles of dS k.
  Layouts as `_fwd_kernel`; do, dq like q, delta like lse."""
  b, i = _program_tile(order_ref, visit_ref.shape[1])
  entry = lambda j: visit_ref[b, i, j]
  q_rows = pl.ds(i * bq, bq)
  q, do = q_ref[b, q_rows, :], do_ref[b, q_rows, :]
  lse, delta = lse_ref[b, q_rows], delta_ref[b, q_rows]
  q_meta = _load_meta(qm_ref, b, q_rows)

  def body(masked):
    def step(n, dq):
      rows = pl.ds(entry(n + 2) * bk, bk)
      k, v = k_ref[b, rows, :], v_ref[b, rows, :]
      vis = mask_lib.visible(q_meta, _load_meta(km_ref, b, rows)) if masked else None
      p = _probs(q, k, lse, scale * _LOG2E, vis)
      ds = p * (_dot(do, v, tb=True) - delta[:, None])
      return dq + _dot(ds.astype(k.dtype), k)
    return step

  dq = _visit(entry, body, jnp.zeros(q.shape, _F32))
  dq_ref[b, q_rows, :] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_kernel(order_ref, visit_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qm_ref,
                 km_ref, *out_refs, scale, bq, bk, groups, outputs):
  """One (kv head or, with groups = 1, query head; k tile of a row) in launch order: sums over its
  `groups` query heads and, for each, over the q tiles in the k tile's visit list. q_ref, do_ref:
  [B, Tp, groups, D]; lse_ref, delta_ref: [B, groups, Tp]; k, v [B, Sp, D]; visit lists
  [B, m, n + 2]; out_refs [B, Sp, D] for `outputs`, 'dk' and / or 'dv' in that order."""
  b, j = _program_tile(order_ref, visit_ref.shape[1])
  entry = lambda n: visit_ref[b, j, n]
  k_rows = pl.ds(j * bk, bk)
  k, v = k_ref[b, k_rows, :], v_ref[b, k_rows, :]
  k_meta = _load_meta(km_ref, b, k_rows)

  def head(g, carry):
    def body(masked):
      def step(n, carry):  # keys-first tiles [bk, bq]: no transposed operand in any product
        grads = dict(zip(outputs, carry))
        rows = pl.ds(entry(n + 2) * bq, bq)
        q, do = q_ref[b, rows, g, :], do_ref[b, rows, g, :]
        p_t = jnp.exp2(_dot(k, q, tb=True) * (scale * _LOG2E) - lse_ref[b, g, rows][None, :])
        if masked:
          p_t = jnp.where(mask_lib.visible_transposed(_load_meta(qm_ref, b, rows), k_meta), p_t,
                          0.0)
        if 'dv' in grads:
          grads['dv'] = grads['dv'] + _dot(p_t.astype(do.dtype), do)
        if 'dk' in grads:
          ds_t = p_t * (_dot(v, do, tb=True) - delta_ref[b, g, rows][None, :])
          grads['dk'] = grads['dk'] + _dot(ds_t.astype(q.dtype), q)
        return tuple(grads[name] for name in outputs)
      return step

    return _visit(entry, body, carry)

  zeros = jnp.zeros(k.shape, _F32)
  grads = jax.lax.fori_loop(0, groups, head, (zeros,) * len(outputs))
  for name, grad, ref in zip(outputs, grads, out_refs):
    ref[b, k_rows, :] = (grad * scale if name == 'dk' else grad).astype(ref.dtype)


# ---------------------------------------------------------------------------------------------
# pallas_call wrappers. q, o, do: [B, Tp, H, Dp]; k, v: [B, Sp, Hkv, Dp]; metadata [B, 4, L].
# ---------------------------------------------------------------------------------------------
def _params(interpret, num_warps, num_stages):
  if interpret:
    return None
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _fields(meta_stack: jax.Array) -> mask_lib.TokenMeta:
  return mask_lib.TokenMeta(*(meta_stack[:, f] for f in range(_N_FIELDS)))


def _whole(x):
  """BlockSpec of the whole array x (every program reads all of it)."""
  return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _head_spec(x, head_map):
  """BlockSpec of x [B, L, heads, D] at one head, head_map(program's head axis) (squeezed)."""
  b, length, _, d = x.shape
  return pl.BlockSpec((b, length, None, d), lambda h_, r: (0, 0, head_map(h_), 0))


def _row_spec(b, length):
  """BlockSpec of a [B, H, L] fp32 row array (lse, delta) at the program's head (squeezed)."""
  return pl.BlockSpec((b, None, length), lambda h_, r: (0, h_, 0))


def _forward_call(q, k, v, qm, km, *, scale, bs: BlockSizes, interpret):
  b, tp, h, d = q.shape
  hkv = k.shape[2]
  bq, bk, grp = bs.block_q, bs.block_k, h // hkv
  visit = _visit_lists(_fields(qm), _fields(km), bq, bk)
  order = _launch_order(visit, bs.heavy_first)
  own_head, kv_head = _head_spec(q, lambda h_: h_), _head_spec(k, lambda h_: h_ // grp)
  in_specs = [_whole(order), _whole(visit), own_head, kv_head, kv_head, _whole(qm), _whole(km)]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, tp), _F32)]
  kernel = functools.partial(_fwd_kernel, scale=scale, bq=bq, bk=bk,
                             rescale_threshold=bs.lazy_rescale or None)
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=(h, order.shape[0]), in_specs=in_specs,
      out_specs=[own_head, _row_spec(b, tp)],
      compiler_params=_params(interpret, bs.num_warps, bs.num_stages), interpret=interpret,
      name='flash_attention_fwd')(order, visit, q, k, v, qm, km)


def _dq_call(q, k, v, do, lse, delta, qm, km, *, scale, bs: BlockSizes, interpret):
  b, tp, h, d = q.shape
  hkv = k.shape[2]
  bq, bk, grp = bs.block_q_dq, bs.block_k_dq, h // hkv
  visit = _visit_lists(_fields(qm), _fields(km), bq, bk)
  order = _launch_order(visit, bs.heavy_first)
  own_head, kv_head = _head_spec(q, lambda h_: h_), _head_spec(k, lambda h_: h_ // grp)
  row = _row_spec(b, tp)
  in_specs = [_whole(order), _whole(visit), own_head, kv_head, kv_head, own_head, row, row,
              _whole(qm), _whole(km)]
  kernel = functools.partial(_dq_kernel, scale=scale, bq=bq, bk=bk)
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), grid=(h, order.shape[0]),
      in_specs=in_specs, out_specs=own_head,
      compiler_params=_params(interpret, bs.num_warps_dq, bs.num_stages_dq), interpret=interpret,
      name='flash_attention_dq')(order, visit, q, k, v, do, lse, delta, qm, km)


def _dkdv_call(q, k, v, do, lse, delta, qm, km, *, scale, bs: BlockSizes, interpret,
               outputs=('dk', 'dv')):
  """The gradients named in `outputs` ('dk' and / or 'dv', in that order): one program per (kv
  head, k tile of a row) over the kv head's `grp` query heads, or with bs.dkdv_per_q_head per
  (query head, k tile of a row), its fp32 partials summed here."""
  b, tp, h, d = q.shape
  sp, hkv = k.shape[1], k.shape[2]
  bq, bk, grp = bs.block_q_dkv, bs.block_k_dkv, h // hkv
  per = 1 if bs.dkdv_per_q_head else grp  # query heads per program
  # Transposed tables: for each k tile, the q tiles that may see it.
  visit = _visit_lists(_fields(qm), _fields(km), bq, bk, by_key=True)
  order = _launch_order(visit, bs.heavy_first)
  q_heads = pl.BlockSpec((b, tp, per, d), lambda g_, r: (0, 0, g_, 0))
  kv_in = _head_spec(k, lambda g_: g_ * per // grp)
  rows = pl.BlockSpec((b, per, tp), lambda g_, r: (0, g_, 0))  # per heads from g_ * per
  in_specs = [_whole(order), _whole(visit), q_heads, kv_in, kv_in, q_heads, rows, rows,
              _whole(qm), _whole(km)]
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype) if per == grp else
               jax.ShapeDtypeStruct((b, sp, h, d), _F32)] * len(outputs)
  kv_out = _head_spec(out_shape[0], lambda g_: g_)
  kernel = functools.partial(_dkdv_kernel, scale=scale, bq=bq, bk=bk, groups=per, outputs=outputs)
  grads = pl.pallas_call(
      kernel, out_shape=out_shape, grid=(h // per, order.shape[0]), in_specs=in_specs,
      out_specs=[kv_out] * len(outputs),
      compiler_params=_params(interpret, bs.num_warps_dkv, bs.num_stages_dkv), interpret=interpret,
      name='flash_attention_' + ''.join(outputs))(order, visit, q, k, v, do, lse, delta, qm, km)
  if per == grp:
    return tuple(grads)
  return tuple(jnp.sum(x.reshape(b, sp, hkv, grp, d), axis=3).astype(k.dtype) for x in grads)


# ---------------------------------------------------------------------------------------------
# custom_vjp over padded inputs.
# ---------------------------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, qm, km, scale, bs, interpret):
  return _flash_fwd(q, k, v, qm, km, scale, bs, interpret)[0]


def _flash_fwd(q, k, v, qm, km, scale, bs, interpret):
  o, lse = _forward_call(q, k, v, qm, km, scale=scale, bs=bs, interpret=interpret)
  return o, (q, k, v, qm, km, o, lse)


def _flash_bwd(scale, bs, interpret, res, do):
  q, k, v, qm, km, o, lse = res
  do = do.astype(q.dtype)
  delta = jnp.einsum('bthd,bthd->bht', o.astype(_F32), do.astype(_F32))
  kw = dict(scale=scale, bs=bs, interpret=interpret)
  dq = _dq_call(q, k, v, do, lse, delta, qm, km, **kw)
  if bs.split_dkdv:
    (dk,), (dv,) = (_dkdv_call(q, k, v, do, lse, delta, qm, km, **kw, outputs=(name,))
                    for name in ('dk', 'dv'))
  else:
    dk, dv = _dkdv_call(q, k, v, do, lse, delta, qm, km, **kw)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_meta(meta: mask_lib.TokenMeta, length: int, *, query: bool) -> jax.Array:
  """Stacks metadata [B, L] into [B, 4, length] int32, padding the tail so that padded tokens take
  no part: padded queries are clean at position -2**30 (their horizon precedes every real key) and
  padded keys clean at position 2**30 (past every real horizon), whatever the segment ids."""
  pos = -_PAD_POS if query else _PAD_POS
  fill = dict(segment_ids=-1, positions=pos, views=0, block_starts=pos)
  fields = []
  for name, x in zip(mask_lib.TokenMeta._fields, meta):
    x = jnp.asarray(x, jnp.int32)
    fields.append(jnp.pad(x, ((0, 0), (0, length - x.shape[1])), constant_values=fill[name]))
  return jnp.stack(fields, axis=1)


def _pad_to(x, shape):
  pads = [(0, s - n) for s, n in zip(shape, x.shape)]
  return x if all(p == (0, 0) for p in pads) else jnp.pad(x, pads)


def attention_pallas(q: jax.Array, k: jax.Array, v: jax.Array, q_meta: mask_lib.TokenMeta,
                     k_meta: mask_lib.TokenMeta, *, scale: float | None = None,
                     block_sizes: BlockSizes | None = None,
                     interpret: bool | None = None) -> jax.Array:
  """Flash attention of q over k, v with visibility `mask.visible(q_meta, k_meta)`.

  Args:
    q: [B, T, H, D]; k, v: [B, S, Hkv, D], H a multiple of Hkv (query head h uses kv head
      h // (H / Hkv)); one dtype among float32, bfloat16, float16; D <= 256.
    q_meta: fields [B, T] int32; k_meta: fields [B, S] int32 (positions in (-2**30, 2**30)).
    scale: score scale (default D ** -0.5).
    block_sizes: tiles and launch parameters (default `BlockSizes.get_default`).
    interpret: run the Pallas interpreter (default: when the backend is not a GPU).

  Returns:
    [B, T, H, D] in q.dtype; a query that sees no key gets zeros (and passes zero gradients).
    Differentiable in q, k, v (custom_vjp with dq and dk/dv kernels).

  Raises:
    ValueError: inputs the kernels do not take (`unsupported_reason`) or bad block sizes.
  """
  reason = unsupported_reason(q, k, v)
  if reason:
    raise ValueError(f'Pallas attention: {reason}')
  b, t, h, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  if interpret is None:
    interpret = backend.default_backend() != 'gpu'
  dp = max(16, backend.next_pow2(d))
  if block_sizes is None:
    kind = '' if interpret else jax.devices()[0].device_kind
    block_sizes = BlockSizes.get_default(dp, q.dtype, kind)
  bs = block_sizes
  if any(x < 16 or x & (x - 1) for x in bs.tiles()):
    raise ValueError(f'block sizes must be powers of two >= 16, got {bs}')
  tp = backend.cdiv(t, max(bs.block_q, bs.block_q_dq, bs.block_q_dkv))
  tp *= max(bs.block_q, bs.block_q_dq, bs.block_q_dkv)
  sp = backend.cdiv(s, max(bs.block_k, bs.block_k_dq, bs.block_k_dkv))
  sp *= max(bs.block_k, bs.block_k_dq, bs.block_k_dkv)
  scale = float(d ** -0.5 if scale is None else scale)
  o = _flash(_pad_to(q, (b, tp, h, dp)), _pad_to(k, (b, sp, hkv, dp)), _pad_to(v, (b, sp, hkv, dp)),
             _pad_meta(q_meta, tp, query=True), _pad_meta(k_meta, sp, query=False), scale, bs,
             interpret)
  return o[:, :t, :, :d]
