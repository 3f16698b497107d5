"""Dispatch for the gated delta rule:
one API over the XLA, Pallas and jax-triton implementations."""
import functools

from absl import logging
import jax
import jax.numpy as jnp

from pallas_kernels._common import backend
from pallas_kernels.gated_delta_rule import configs
from pallas_kernels.gated_delta_rule import front
from pallas_kernels.gated_delta_rule import xla

IMPLEMENTATIONS = ('xla', 'pallas', 'triton')
# Best measured implementation per backend (launch/bench_kernels on an H200; see the issue notes).
DEFAULT_BY_BACKEND = {'gpu': 'triton'}
# The token recurrence (decoding), `recurrent_gated_delta_rule`.
DECODE_IMPLEMENTATIONS = ('xla', 'pallas')
DEFAULT_DECODE_BY_BACKEND = {'gpu': 'pallas'}


def _check(q, k, v, g, beta, initial_state, segment_ids):
  problems = []
  if q.ndim != 4 or k.shape != q.shape:
    problems.append(f'q {q.shape} and k {k.shape} must both be [B, T, H, K]')
  if v.ndim != 4 or v.shape[:2] != q.shape[:2]:
    problems.append(f'v {v.shape} must be [B, T, HV, V] with the B, T of q {q.shape}')
  elif q.ndim == 4 and v.shape[2] % q.shape[2]:
    problems.append(f'HV={v.shape[2]} is not a multiple of H={q.shape[2]}')
  for name, x in (('g', g), ('beta', beta)):
    if x.shape != v.shape[:3]:
      problems.append(f'{name} {x.shape} must be [B, T, HV] = {v.shape[:3]}')
  if initial_state is not None and initial_state.shape != (
      v.shape[0], v.shape[2], q.shape[-1], v.shape[-1]):
    problems.append(f'initial_state {initial_state.shape} must be [B, HV, K, V] = '
                    f'{(v.shape[0], v.shape[2], q.shape[-1], v.shape[-1])}')
  if segment_ids is not None and segment_ids.shape != q.shape[:2]:
    problems.append(f'segment_ids {segment_ids.shape} must be [B, T] = {q.shape[:2]}')
  if problems:
    raise ValueError('gated delta rule: ' + '; '.join(problems))


def _resolve(implementation: str | None) -> str:
  return backend.resolve_implementation(implementation, IMPLEMENTATIONS, DEFAULT_BY_BACKEND,
                                        'gated delta rule')


@functools.lru_cache(maxsize=None)
def _log_fallback_once(impl: str, reason: str) -> None:
  logging.warning('gated delta rule: %s kernels cannot take this call (%s); using xla', impl,
                  reason)


def _kernel_or_fallback(impl: str, q, k, v, chunk_size: int) -> str:
  """`impl`, or 'xla' (logged once per reason) when the kernels cannot take these inputs."""
  if impl == 'xla':
    return impl
  try:
    configs.check_inputs(q, k, v, chunk_size, impl)
    if backend.default_backend() != 'gpu':
      raise ValueError(f'the {impl} kernels need a GPU (backend is '
                       f'{backend.default_backend()!r})')
  except ValueError as e:
    _log_fallback_once(impl, str(e))
    return 'xla'
  return impl


def chunk_gated_delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array,
                           *, scale: float | None = None, initial_state: jax.Array | None = None,
                           segment_ids: jax.Array | None = None, output_final_state: bool = False,
                           chunk_size: int = 64, implementation: str | None = None):
  """Chunked gated delta rule (training / prefill).

  Args:
    q, k: [B, T, H, K], l2-normalised by the caller; v: [B, T, HV, V] with HV a multiple of H.
    g: [B, T, HV] log-decay (<= 0, in log space); beta: [B, T, HV].
    scale: multiplies q (default K ** -0.5).
    initial_state: [B, HV, K, V] seeding t = 0 (zeros if None).
    segment_ids: [B, T]; the state resets to zero where the id changes.
    output_final_state: also return the fp32 state after the last token.
    chunk_size: tokens per chunk.
    implementation: None (the backend's best: triton on GPU, xla elsewhere) | 'xla' | 'pallas' |
      'triton'. Inputs a kernel cannot take (chunk size, head size, dtype) run on xla instead, said
      once in the log.

  Returns:
    (o [B, T, HV, V] in v.dtype, final state [B, HV, K, V] fp32 or None).

  Raises:
    ValueError: unknown implementation or inconsistent shapes.
  """
  _check(q, k, v, g, beta, initial_state, segment_ids)
  impl = _kernel_or_fallback(_resolve(implementation), q, k, v, chunk_size)
  kw = dict(scale=scale, initial_state=initial_state, segment_ids=segment_ids,
            output_final_state=output_final_state, chunk_size=chunk_size)
  if impl == 'pallas':
    from pallas_kernels.gated_delta_rule import pallas  # pylint: disable=g-import-not-at-top
    return pallas.chunk_gated_delta_rule_pallas(q, k, v, g, beta, **kw)
  if impl == 'triton':
    from pallas_kernels.gated_delta_rule import triton  # pylint: disable=g-import-not-at-top
    return triton.chunk_gated_delta_rule_triton(q, k, v, g, beta, **kw)
  return xla.chunk_gated_delta_rule_xla(q, k, v, g, beta, **kw)


def kernels_take(family: str, k: jax.Array, v: jax.Array, chunk_size: int, interpret: bool) -> bool:
  """Whether a kernel family ('pallas' | 'triton') takes these inputs, compiled for the GPU or in
  its interpreter (Triton 3.6's interpreter multiplies 16-bit tensors wrongly: float32 only)."""
  try:
    configs.check_inputs(k, k, v, chunk_size, family)
  except ValueError:
    return False
  return not interpret or family == 'pallas' or k.dtype == jnp.float32


def chunk_checkpoints(k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array, *,
                      segment_ids: jax.Array | None = None, chunk_size: int = 64,
                      family: str | None = None, interpret: bool = False):
  """The clean pass's chunk checkpoints, fp32, as `xla.chunk_gated_delta_rule_fwd_h` gives them.

  Args:
    k, v, g, beta, segment_ids, chunk_size: as `chunk_gated_delta_rule` (zero initial state).
    family: None (XLA) or 'pallas' | 'triton': that family's intra and state-pass kernels when
      `kernels_take` these inputs, else XLA. Differentiable in k, v, g, beta: by autodiff (XLA),
      the backward kernels (triton), or XLA's recomputed checkpoints (pallas).
    interpret: run the kernels in their interpreter.

  Returns:
    (h [B, N, HV, K, V] state entering chunk n, before any reset inside it; v_new [B, T, HV, V]
    corrected values V' = U - W S0), N = ceil(T / chunk_size).
  """
  _check(k, k, v, g, beta, None, segment_ids)
  if family is None or not kernels_take(family, k, v, chunk_size, interpret):
    h, v_new, _ = xla.chunk_gated_delta_rule_fwd_h(k, k, v, g, beta, segment_ids=segment_ids,
                                                   chunk_size=chunk_size)
    return h, v_new
  if family == 'pallas':
    from pallas_kernels.gated_delta_rule import pallas as kernels  # pylint: disable=g-import-not-at-top
  else:
    from pallas_kernels.gated_delta_rule import triton as kernels  # pylint: disable=g-import-not-at-top
  _, pk, pv, pg, pb, segs = _padded(k, k, v, g, beta, segment_ids, chunk_size)
  h, v_new = kernels.chunk_checkpoints_padded(pk, pv, pg, pb, segs, chunk_size, interpret)
  return _unpadded_checkpoints(h, v_new, k, v)


def chunk_output_and_checkpoints(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array,
                                 beta: jax.Array, *, scale: float,
                                 segment_ids: jax.Array | None = None, chunk_size: int = 64,
                                 interpret: bool = False):
  """`chunk_gated_delta_rule`'s output (zero initial state) and `chunk_checkpoints` from one pass
  of the Triton kernels, forward and backward (the two-stream schedules' clean stream: its output
  and the noisy blocks' seeds).

  Returns:
    (o [B, T, HV, V] in v.dtype, h [B, N, HV, K, V] fp32, v_new [B, T, HV, V] fp32).

  Raises:
    ValueError: inconsistent shapes, or inputs the Triton kernels do not take (`kernels_take`).
  """
  _check(q, k, v, g, beta, None, segment_ids)
  if not kernels_take('triton', k, v, chunk_size, interpret):
    raise ValueError('chunk_output_and_checkpoints: the triton kernels do not take these inputs '
                     f'(dtype {k.dtype}, K={k.shape[-1]}, V={v.shape[-1]}, chunk {chunk_size}, '
                     f'interpret={interpret}); see kernels_take')
  from pallas_kernels.gated_delta_rule import triton as kernels  # pylint: disable=g-import-not-at-top
  pq, pk, pv, pg, pb, segs = _padded(q, k, v, g, beta, segment_ids, chunk_size)
  o, h, v_new = kernels.output_and_checkpoints_padded(pq, pk, pv, pg, pb, segs, float(scale),
                                                      chunk_size, interpret)
  t, vd = v.shape[1], v.shape[3]
  return (o[:, :t, :, :vd],) + _unpadded_checkpoints(h, v_new, k, v)


def _padded(q, k, v, g, beta, segment_ids, chunk_size):
  """The kernels' padded (q, k, v, g, beta) and segment masks (() without segment ids)."""
  b, hv, kd, vd = k.shape[0], v.shape[2], k.shape[3], v.shape[3]
  h0 = jnp.zeros((b, hv, kd, vd), jnp.float32)
  pq, pk, pv, pg, pb, _ = configs.pad_inputs(q, k, v, g, beta, h0, chunk_size)
  segs = (() if segment_ids is None
          else configs.segment_masks(segment_ids, pk.shape[1], chunk_size))
  return pq, pk, pv, pg, pb, segs


def _unpadded_checkpoints(h, v_new, k, v):
  """Padded h [B, N, HV, Kp, Vp], v_new [B, Tp, HV, Vp] -> h [B, N, HV, K, V], v_new
  [B, T, HV, V]."""
  t, kd, vd = k.shape[1], k.shape[3], v.shape[3]
  return h[..., :kd, :vd], v_new[:, :t, :, :vd]


def _use_decode_kernel(implementation: str | None, why_not: str | None) -> bool:
  """Whether `implementation` (None: `DEFAULT_DECODE_BY_BACKEND`, else xla) picks the decode
  kernels and they can run here: `why_not` (the kernel's shape check) is None and the backend is a
  GPU. A kernel choice that cannot run falls back to xla, logged once."""
  impl = backend.resolve_implementation(implementation, DECODE_IMPLEMENTATIONS,
                                        DEFAULT_DECODE_BY_BACKEND, 'recurrent gated delta rule')
  if impl == 'xla':
    return False
  why_not = backend.why_gpu_kernel_cannot_run(why_not)
  if why_not:
    _log_fallback_once('decode pallas', why_not)
    return False
  return True


def _recurrent_kernel(implementation: str | None, k: jax.Array, v: jax.Array):
  """The `recurrent_pallas` module when `_use_decode_kernel`, else None."""
  from pallas_kernels.gated_delta_rule import recurrent_pallas  # pylint: disable=g-import-not-at-top
  if _use_decode_kernel(implementation, recurrent_pallas.kernel_takes(k, v)):
    return recurrent_pallas
  return None


def recurrent_gated_delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array,
                               beta: jax.Array, *, scale: float | None = None,
                               initial_state: jax.Array | None = None,
                               segment_ids: jax.Array | None = None,
                               output_final_state: bool = False,
                               implementation: str | None = None):
  """Token-by-token gated delta rule, for a few tokens at a time (decoding). Same contract as
  above; `implementation`: None (the backend's best: `DEFAULT_DECODE_BY_BACKEND`, else xla) |
  'xla' | 'pallas' (`recurrent_pallas`, not differentiable). Inputs the kernel cannot take run on
  xla instead, said once in the log."""
  _check(q, k, v, g, beta, initial_state, segment_ids)
  kw = dict(scale=scale, initial_state=initial_state, segment_ids=segment_ids,
            output_final_state=output_final_state)
  kernel = _recurrent_kernel(implementation, k, v)
  if kernel:
    return kernel.recurrent_gated_delta_rule_pallas(q, k, v, g, beta, **kw)
  return xla.recurrent_gated_delta_rule_xla(q, k, v, g, beta, **kw)


def block_gated_delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array,
                           beta: jax.Array, *, initial_state: jax.Array,
                           scale: float | None = None,
                           segment_ids: jax.Array | None = None,
                           implementation: str | None = None) -> jax.Array:
  """Outputs [B, T, HV, V] of a short block continuing `initial_state`, with no per-token or
  leaving state (noisy blocks at decode). Same argument contract. XLA runs the block-parallel (WY)
  form; the decode kernel (`implementation` as `recurrent_gated_delta_rule`'s) its token loop,
  writing nothing but the outputs."""
  _check(q, k, v, g, beta, initial_state, segment_ids)
  kernel = _recurrent_kernel(implementation, k, v)
  if kernel:
    return kernel.recurrent_gated_delta_rule_pallas(
        q, k, v, g, beta, initial_state=initial_state, scale=scale, segment_ids=segment_ids)[0]
  return xla.block_gated_delta_rule_xla(q, k, v, g, beta, initial_state=initial_state,
                                        scale=scale, segment_ids=segment_ids)


def _check_fused(x, b_in, a_in, conv_weight, a_log, dt_bias, window, initial_state, num_key_heads,
                 segment_ids, valid, b_col, a_col, output_gate):
  problems = []
  if x.ndim != 3 or initial_state.ndim != 4:
    raise ValueError(f'fused decode: x {x.shape} must be [B, T, C] and initial_state '
                     f'{initial_state.shape} [B, HV, K, V]')
  bsz, t, width = x.shape
  _, hv, kd, vd = initial_state.shape
  c = 2 * num_key_heads * kd + hv * vd
  if initial_state.shape[0] != bsz:
    problems.append(f'initial_state {initial_state.shape} must have the B={bsz} of x')
  if hv % num_key_heads:
    problems.append(f'HV={hv} is not a multiple of num_key_heads={num_key_heads}')
  if width < c:
    problems.append(f'x has {width} columns, fewer than C = 2 NK K + HV V = {c}')
  for name, a, col in (('b_in', b_in, b_col), ('a_in', a_in, a_col)):
    if a.ndim != 3 or a.shape[:2] != (bsz, t) or not 0 <= col <= a.shape[2] - hv:
      problems.append(f'{name} {a.shape} must be [B={bsz}, T={t}, .] with columns '
                      f'[{col}, {col} + HV={hv}) inside')
  if output_gate is not None:
    z, col = output_gate.z_src, output_gate.z_col
    if z.ndim != 3 or z.shape[:2] != (bsz, t) or not 0 <= col <= z.shape[2] - hv * vd:
      problems.append(f'output_gate.z_src {z.shape} must be [B={bsz}, T={t}, .] with columns '
                      f'[{col}, {col} + HV V={hv * vd}) inside')
    if output_gate.weight.shape != (vd,):
      problems.append(f'output_gate.weight {output_gate.weight.shape} must be [V={vd}]')
  kc = conv_weight.shape[0]
  for name, a, want in (('conv_weight', conv_weight, (kc, c)), ('a_log', a_log, (hv,)),
                        ('dt_bias', dt_bias, (hv,)), ('window', window, (bsz, kc - 1, c)),
                        ('segment_ids', segment_ids, (bsz, t)), ('valid', valid, (bsz, t))):
    if a is not None and a.shape != want:
      problems.append(f'{name} {a.shape} must be {want}')
  if problems:
    raise ValueError('fused decode: ' + '; '.join(problems))


def fused_decode(x: jax.Array, b_in: jax.Array, a_in: jax.Array, conv_weight: jax.Array,
                 a_log: jax.Array, dt_bias: jax.Array, *, window: jax.Array,
                 initial_state: jax.Array, num_key_heads: int, scale: float | None = None,
                 segment_ids: jax.Array | None = None, valid: jax.Array | None = None,
                 output_final_state: bool = True, b_col: int = 0, a_col: int = 0,
                 output_gate: front.OutputGate | None = None, implementation: str | None = None):
  """A cached Gated DeltaNet pass of a few tokens, from the in-projections to the rule's outputs:
  conv (window in, window out), activations, l2 norms, gates and the rule
  (`front.fused_decode_xla` gives the contract). `implementation`: None (the backend's best:
  `DEFAULT_DECODE_BY_BACKEND`, else xla) | 'xla' | 'pallas' (`decode_pallas`, one kernel, not
  differentiable). Inputs the kernel cannot take run on xla instead, said once in the log.

  The inputs may be column ranges of wider buffers: q|k|v = x[..., :C], b = b_in[..., b_col:
  b_col + HV], a = a_in[..., a_col:a_col + HV] (C = 2 NK K + HV V). A merged in-projection passes
  its product three times; the kernel reads it in place (xla slices), where slicing it first would
  cost a launch per operand at decode sizes.

  output_gate: with it, the outputs come out of the output norm, `front.gate_outputs(o, gate)`
  (the kernel's programs apply it where they hold whole value heads; z may be a column range too).

  Returns:
    (o [B, T, HV, V] in x.dtype, (window [B, Kc-1, C], state [B, HV, K, V] fp32) or None without
    output_final_state).

  Raises:
    ValueError: unknown implementation or inconsistent shapes.
  """
  _check_fused(x, b_in, a_in, conv_weight, a_log, dt_bias, window, initial_state, num_key_heads,
               segment_ids, valid, b_col, a_col, output_gate)
  kw = dict(window=window, initial_state=initial_state, num_key_heads=num_key_heads, scale=scale,
            segment_ids=segment_ids, valid=valid, output_final_state=output_final_state,
            output_gate=output_gate)
  from pallas_kernels.gated_delta_rule import decode_pallas  # pylint: disable=g-import-not-at-top
  kd, vd = initial_state.shape[2:]
  if _use_decode_kernel(implementation, decode_pallas.kernel_takes(num_key_heads, kd, vd)):
    return decode_pallas.fused_decode_pallas(x, b_in, a_in, conv_weight, a_log, dt_bias,
                                             b_col=b_col, a_col=a_col, **kw)
  hv = initial_state.shape[1]
  return front.fused_decode_xla(x[..., :conv_weight.shape[1]], b_in[..., b_col:b_col + hv],
                                a_in[..., a_col:a_col + hv], conv_weight, a_log, dt_bias, **kw)
