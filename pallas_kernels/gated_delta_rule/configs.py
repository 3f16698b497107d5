"""What the two kernel families (pallas.py, triton.py) share: tile sizes, padding and segment masks.

Both families run the same padded problem: T padded to a multiple of the chunk size, K and V to
powers of two >= 16 (Triton's block shapes and `tl.dot` minimum). Padding is exact: padded tokens
have zero q/k/v and g = beta = 0 (identity steps in the last segment); padded feature columns
are zero.
"""
import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels._common import backend

MAX_HEAD_DIM = 256
CHUNK_SIZES = (16, 32, 64)
MAX_FP32_KEY_DIM = 64  # padded K; larger fp32 tiles overflow shared memory


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Launch parameters shared by both kernel families.

  Attributes:
    bv: V tile of the two sequential state passes (forward state pass and backward dS pass, unless
      bv_dh); each program keeps a [K, bv] fp32 state in registers and walks every chunk of one
      (batch, head).
    num_warps, num_stages: for the sequential state passes (the backward's unless *_dh).
    bv_out: V tile of the output kernel and the intra-chunk dv kernel.
    num_warps_out: for those two kernels.
    num_warps_chunk: for the UT-transform kernel (parallel over chunks).
    num_stages_chunk: for every kernel parallel over chunks.
    num_warps_bwd: for the fused per-chunk backward kernel (dq, dk, dv, dbeta, dg), which holds the
      most live [C, K] / [C, V] / [K, V] tiles.
    bv_bwd: V tile the Triton per-chunk backward kernel walks its [K, V] states and [C, V] values
      in (the Pallas kernel takes whole tiles).
    bv_dh, num_warps_dh, num_stages_dh: the backward state pass's own launch where it differs
      from the forward's (0: bv, num_warps, num_stages); see `dh_launch`.
    split_bwd_v_pass: the Triton per-chunk backward kernel walks its V tiles twice, the state
      terms then the value terms, so that fewer accumulators take products at a time.
  """

  bv: int = 64
  num_warps: int = 4
  num_stages: int = 2
  bv_out: int = 128
  num_warps_out: int = 4
  num_warps_chunk: int = 4
  num_stages_chunk: int = 2
  num_warps_bwd: int = 8
  bv_bwd: int = 64
  bv_dh: int = 0
  num_warps_dh: int = 0
  num_stages_dh: int = 0
  split_bwd_v_pass: bool = False

  def dh_launch(self) -> tuple[int, int, int]:
    """(V tile, warps, pipeline stages) of the backward state pass."""
    return (self.bv_dh or self.bv, self.num_warps_dh or self.num_warps,
            self.num_stages_dh or self.num_stages)

  @classmethod
  def get_default(cls, head_dim: int = 128, device_kind: str = '', family: str = 'triton',
                  dtype=jnp.bfloat16, checkpoints: bool = False) -> 'BlockSizes':
    """Defaults by value head size (padded to a power of two), device kind, kernel family and
    q/k/v dtype.

    Args:
      head_dim: the padded value head size V (power of two, >= 16).
      device_kind: `jax.devices()[0].device_kind`, e.g. 'NVIDIA H100 80GB HBM3'.
      family: 'triton' | 'pallas'.
      dtype: the q, k, v dtype.
      checkpoints: for the two-stream pass's clean passes (`triton.chunk_checkpoints_padded`,
        `output_and_checkpoints_padded`): fp32 checkpoints and their bf16 copies from the state
        pass, the checkpoints' cotangents into the backward state pass.
    """
    bv = min(head_dim, 64)
    bv_out = min(head_dim, 128)
    base = cls(bv=bv, bv_out=bv_out, num_warps=4, num_stages=2, num_warps_out=4, num_warps_chunk=4,
               num_stages_chunk=2, num_warps_bwd=8 if head_dim >= 128 else 4,
               bv_bwd=min(head_dim, 32))
    if family != 'triton' or head_dim != 128 or jnp.dtype(dtype) == jnp.float32:
      return base
    generation = backend.gpu_generation(device_kind)
    if generation == 'hopper':
      # launch.tune_gdn_kernels on an H200 (B x T = 8x4096 and 4x16384, H=16, bf16): two warps
      # for the UT transform and three stages for the state passes, 5-10% faster. (That tuning
      # also gave the output kernel two warps, when it shared the UT transform's field: ptxas then
      # spills 22 KB per thread there, against 272 B with four.)
      # Not for fp32 tiles (twice the bytes): with two warps ptxas gives the UT transform 32
      # registers and spills 90 KB per thread (launch.kernel_registers).
      if checkpoints:
        # H100, B = 1, T = 4096, two views, block 4, bf16, the two-stream fwd+bwd (bench_schedules
        # both:triton_kernel_bwd, back to back, 2026-12-07): 3.18 / 3.21 ms at V tile 32, two
        # stages, eight warps against 3.31 / 3.31 (the clean pass alone took 0.77 against 0.70
        # with that setting, so it keeps the tuned one); later, this setting for these passes
        # only: 3.21 against 3.33 ms, and 2.80 against 2.92 with the noisy rows stored by the
        # forward (one run each). ptxas (sm_90a): the backward state pass with the checkpoints'
        # cotangents spills 496 B per thread against 5,692 at the tuned setting.
        # Then each state pass apart (bench_schedules --clean_state_launch / --clean_dh_launch,
        # H100, same shape, one run each, 2026-12-08): the forward state pass at V tile 16,
        # 4 warps, 2 stages 0.123 ms against 0.172 at (32, 8, 2) (fwd+bwd 2.50 against 2.58 ms;
        # at (64, 8, 2) 0.235 and 2.62), and the backward one at (16, 8, 2) as well 0.211
        # against 0.232 (fwd+bwd 2.49). ptxas: 0 B spilled (forward), 288 B against 496. Again
        # later that day, each tree in its own process: 2.50 ms against main's 2.59 (1.18x
        # against 1.23x of (1 + V) x the clean pass's 0.70-0.71 ms).
        return dataclasses.replace(base, num_warps_chunk=2, bv=16, num_warps=4, num_stages=2,
                                   bv_dh=16, num_warps_dh=8, num_stages_dh=2)
      return dataclasses.replace(base, num_warps_chunk=2, num_stages=3)
    if generation in ('sm80', 'sm86'):
      # Ampere / Ada cards. Not timed (no such GPU lent): chosen by ptxas for the mma.sync code
      # Triton emits before Hopper (launch.kernel_registers --arch=80, K = V = 128, bf16; ptxas
      # of CUDA 12.8 and 13.0 alike). At the generic defaults (`base`) ptxas gives the output
      # kernel and the per-chunk backward 32 registers and spills 11 and 20 KB per thread
      # (every V tile and warp count of that backward: 12-42 KB), as it does the two-stream
      # pass's checkpointing state passes (9 and 15 KB). Here the backward walks its V tiles
      # twice (1.7 KB spilled; 1.9-2.2 KB at V tiles 32 / 64), and the output kernels at V tile
      # 64, the state passes at V tile 32 with 8 warps and the UT transform at 8 warps spill
      # nothing (but the checkpointing backward state pass, 308 B). `launch.tune_gdn_kernels`
      # times them.
      return dataclasses.replace(base, bv=32, num_warps=8, bv_out=64, num_warps_chunk=8,
                                 bv_bwd=16, split_bwd_v_pass=True)
    return base


def block_sizes_for(vp: int, family: str, dtype, checkpoints: bool = False) -> BlockSizes:
  kind = '' if backend.default_backend() == 'cpu' else jax.devices()[0].device_kind
  return BlockSizes.get_default(vp, kind, family, dtype, checkpoints)


def check_inputs(q, k, v, chunk_size: int, family: str) -> None:
  """Raises ValueError, naming the values, for inputs the kernels do not take
  (the api falls back)."""
  if chunk_size not in CHUNK_SIZES:
    raise ValueError(f'{chunk_size=} must be one of {CHUNK_SIZES} for the {family} '
                     'gated delta rule')
  kd, vd = q.shape[-1], v.shape[-1]
  if kd > MAX_HEAD_DIM or vd > MAX_HEAD_DIM:
    raise ValueError(f'K={kd} and V={vd} must be <= {MAX_HEAD_DIM} for the {family} '
                     'gated delta rule')
  if q.dtype != k.dtype or k.dtype != v.dtype:
    raise ValueError(f'q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}')
  if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise ValueError(f'dtype {q.dtype} is not supported by the {family} gated delta rule '
                     '(float32, bfloat16, float16)')
  if q.dtype == jnp.float32 and max(16, backend.next_pow2(kd)) > MAX_FP32_KEY_DIM:
    # Measured on an H200: fp32 tiles at K=128 ask for ~288 KiB of shared memory (limit 227 KiB).
    raise ValueError(f'float32 inputs with K={kd} exceed GPU shared memory in the {family} gated '
                     f'delta rule (float32 takes K <= {MAX_FP32_KEY_DIM}; use bfloat16)')


def grad_dtypes(q_dtype, v_dtype, groups: int):
  """(dq/dk dtype, dv dtype) of the per-chunk backward kernel's outputs.

  The gradients leave the kernel in their final dtype (no separate convert pass over them); dq and
  dk stay fp32 only when `groups` > 1 value heads share a key head and are summed afterwards.
  """
  return (q_dtype if groups == 1 else jnp.float32), v_dtype


def padded_dims(t: int, kd: int, vd: int, chunk_size: int) -> tuple[int, int, int]:
  """(Tp, Kp, Vp): T to a chunk multiple, K and V to powers of two >= 16."""
  return (backend.cdiv(t, chunk_size) * chunk_size, max(16, backend.next_pow2(kd)),
          max(16, backend.next_pow2(vd)))


def pad_to(x: jax.Array, shape) -> jax.Array:
  """Zero-pads the trailing end of every axis up to `shape` (a no-op when already there)."""
  pads = [(0, s - d) for s, d in zip(shape, x.shape)]
  return x if all(p == (0, 0) for p in pads) else jnp.pad(x, pads)


def pad_inputs(q, k, v, g, beta, h0, chunk_size):
  """Pads (q, k, v [B,T,*,X]; g, beta [B,T,HV] -> fp32; h0 [B,HV,K,V] -> fp32)
  to the kernel shapes."""
  b, t, hq, kd = q.shape
  hv, vd = v.shape[2:]
  tp, kp, vp = padded_dims(t, kd, vd, chunk_size)
  f32 = jnp.float32
  return (pad_to(q, (b, tp, hq, kp)), pad_to(k, (b, tp, hq, kp)), pad_to(v, (b, tp, hv, vp)),
          pad_to(g.astype(f32), (b, tp, hv)), pad_to(beta.astype(f32), (b, tp, hv)),
          pad_to(h0.astype(f32), (b, hv, kp, vp)))


def pad_cotangents(do: jax.Array, dht: jax.Array, pq: jax.Array, pv: jax.Array):
  """The output cotangents do [B, T, HV, V] and dht [B, HV, K, V] padded like the padded inputs
  pq [B, Tp, H, Kp], pv [B, Tp, HV, Vp]: do in pv's dtype, dht in fp32."""
  b, tp, hv, vp = pv.shape
  return (pad_to(do.astype(pv.dtype), (b, tp, hv, vp)),
          pad_to(dht.astype(jnp.float32), (b, hv, pq.shape[3], vp)))


def crop_grads(grads, q, k, v, g, beta, h0, segs):
  """The padded gradients (dq, dk, dv, dg, db, dh0) cut back to the inputs' shapes and dtypes
  (the inverse of `pad_inputs`), plus zero cotangents for the segment masks `segs`."""
  dq, dk, dv, dg, db, dh0 = grads
  t, kd, vd = q.shape[1], q.shape[3], v.shape[3]
  return (dq[:, :t, :, :kd].astype(q.dtype), dk[:, :t, :, :kd].astype(k.dtype),
          dv[:, :t, :, :vd].astype(v.dtype), dg[:, :t].astype(g.dtype),
          db[:, :t].astype(beta.dtype), dh0[:, :, :kd, :vd].astype(h0.dtype),
          jax.tree.map(jnp.zeros_like, segs))


def call_arguments(q, v, initial_state, segment_ids, scale, chunk_size):
  """What both kernel families' entry points derive from their arguments: (scale as a float,
  default K ** -0.5; the fp32 initial state [B, HV, K, V], zeros if None; the segment masks, ()
  without segment ids)."""
  b, t, _, kd = q.shape
  hv, vd = v.shape[2:]
  scale = float(kd ** -0.5 if scale is None else scale)
  h0 = (jnp.zeros((b, hv, kd, vd), jnp.float32) if initial_state is None
        else initial_state.astype(jnp.float32))
  segs = ()
  if segment_ids is not None:
    segs = segment_masks(segment_ids, padded_dims(t, kd, vd, chunk_size)[0], chunk_size)
  return scale, h0, segs


def segment_masks(segment_ids: jax.Array, tp: int, chunk_size: int):
  """fp32 [B, Tp] (segment number, carry, writes) for documents starting anywhere.

  segment number: nondecreasing count of segment starts (padding continues the last segment);
  carry: the token belongs to the segment active when its chunk starts (it reads the entering
    state);
  writes: the token belongs to its chunk's last segment (it writes the leaving state).
  """
  b, t = segment_ids.shape
  n = tp // chunk_size
  starts = jnp.concatenate([jnp.zeros((b, 1), jnp.int32),
                            (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)], 1)
  num = jnp.pad(jnp.cumsum(starts, axis=1), ((0, 0), (0, tp - t)), mode='edge')
  chunks = num.reshape(b, n, chunk_size)
  before = jnp.concatenate([chunks[:, :1, 0], chunks[:, :-1, -1]], axis=1)  # token before the chunk
  carry = chunks == before[..., None]
  writes = chunks == chunks[..., -1:]
  f = lambda x: x.reshape(b, tp).astype(jnp.float32)
  return f(num), f(carry), f(writes)
