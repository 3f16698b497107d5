"""Dispatch for metadata-masked softmax attention: the XLA path or the Pallas flash kernels."""
import functools

from absl import logging
import jax

from pallas_kernels._common import backend
from pallas_kernels.attention import mask as mask_lib
from pallas_kernels.attention import xla

IMPLEMENTATIONS = ('xla', 'pallas')
# implementation=None: the measured best per backend (launch/bench_attention on an H200, see the
# issue notes: two-stream T=4096 V=2 fwd+bwd 4.5x faster than xla, causal 1.6x), xla elsewhere.
DEFAULT_BY_BACKEND = {'gpu': 'pallas'}
# Below this many queries (decode steps, draft/verify blocks over a cache) None means xla: the
# kernels pad queries to their tile and read K/V once per query head, which few queries cannot
# amortise.
MIN_KERNEL_QUERIES = 64
# Few queries over a cache (`cache_attention`): the decode kernel or xla. None picks the kernel on
# GPU, where it measured faster in every sampler mode (`decode_pallas`'s docstring has the figures).
DECODE_IMPLEMENTATIONS = ('xla', 'pallas')
DEFAULT_DECODE_BY_BACKEND = {'gpu': 'pallas'}


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
  logging.warning('attention: %s', message)


def _pallas_or_fallback(q, k, v) -> str:
  """'pallas', or 'xla' (logged once per reason) for inputs the kernels cannot take."""
  from pallas_kernels.attention import pallas  # pylint: disable=g-import-not-at-top
  reason = pallas.unsupported_reason(q, k, v)
  if reason:
    _log_once(f'pallas kernels cannot take this call ({reason}); using xla')
    return 'xla'
  if backend.default_backend() != 'gpu':
    _log_once(f'pallas kernels run in interpret mode on backend {backend.default_backend()!r} '
              '(slow; meant for tests)')
  return 'pallas'


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_meta: mask_lib.TokenMeta,
              k_meta: mask_lib.TokenMeta, *, scale: float | None = None,
              implementation: str | None = None, q_tile: int = 512) -> jax.Array:
  """Attention of q [B, T, H, D] over k, v [B, S, Hkv, D] under `mask.visible(q_meta, k_meta)`.

  Args:
    q: [B, T, H, D]; k, v: [B, S, Hkv, D], H a multiple of Hkv.
    q_meta: fields [B, T]; k_meta: fields [B, S].
    scale: score scale (default D ** -0.5).
    implementation: None (pallas on GPU for >= MIN_KERNEL_QUERIES queries, else xla) | 'xla' |
      'pallas'. 'pallas' falls back to xla, said once in the log, for inputs the kernels cannot
      take (D > 256, mixed or unsupported dtypes), and runs the kernels in interpret mode off GPU
      (also logged once).
    q_tile: queries per tile of the XLA path.

  Returns:
    [B, T, H, D] in q.dtype; a query that sees no key gets zeros.

  Raises:
    ValueError: unknown implementation or inconsistent shapes.
  """
  if implementation not in (None, *IMPLEMENTATIONS):
    raise ValueError(f'unknown attention implementation {implementation!r}; '
                     f'known: {IMPLEMENTATIONS} or None')
  if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
    raise ValueError(
        f'expected q [B,T,H,D], k = v [B,S,Hkv,D]; got {q.shape}, {k.shape}, {v.shape}')
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
    raise ValueError(f'incompatible q {q.shape} and k {k.shape}')
  if scale is None:
    scale = q.shape[-1] ** -0.5
  impl = implementation
  if impl is None:
    impl = DEFAULT_BY_BACKEND.get(backend.default_backend(), 'xla')
    if q.shape[1] < MIN_KERNEL_QUERIES:
      impl = 'xla'
  if impl == 'pallas' and _pallas_or_fallback(q, k, v) == 'pallas':
    from pallas_kernels.attention import pallas  # pylint: disable=g-import-not-at-top
    return pallas.attention_pallas(q, k, v, q_meta, k_meta, scale=scale)
  return xla.attention_xla(q, k, v, q_meta, k_meta, scale=scale, q_tile=q_tile)


def cache_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_meta: mask_lib.TokenMeta,
                    k_meta: mask_lib.TokenMeta, *, scale: float | None = None,
                    implementation: str | None = None, decode_implementation: str | None = None,
                    q_tile: int = 512) -> jax.Array:
  """`attention` of a cached call (k, v the cache, this call's keys written; slot j holds
  position j). Few queries (T x H / Hkv <= `decode_pallas.MAX_ROWS`) run the decode kernel when
  `decode_implementation` picks it ('pallas'; None: `DEFAULT_DECODE_BY_BACKEND`, else xla), the
  backend is a GPU and the kernel takes the shapes (`decode_pallas.kernel_takes`; else xla,
  logged once); everything else runs `attention` with `implementation` and `q_tile`.

  Raises:
    ValueError: unknown implementation.
  """
  from pallas_kernels.attention import decode_pallas  # pylint: disable=g-import-not-at-top
  impl = backend.resolve_implementation(decode_implementation, DECODE_IMPLEMENTATIONS,
                                        DEFAULT_DECODE_BY_BACKEND, 'decode attention')
  few = q.ndim == 4 and k.ndim == 4 and (
      decode_pallas.query_rows(q.shape, k.shape) <= decode_pallas.MAX_ROWS)
  if impl == 'pallas' and few:
    why = backend.why_gpu_kernel_cannot_run(decode_pallas.kernel_takes(q, k, v))
    if why is None:
      return decode_pallas.attention_decode_pallas(q, k, v, q_meta, k_meta, scale=scale)
    _log_once(f'decode kernel cannot take this call ({why}); using xla')
    implementation = 'xla'
  return attention(q, k, v, q_meta, k_meta, scale=scale, implementation=implementation,
                   q_tile=q_tile)


def front_kernels_take(tokens: int, num_heads: int, k_cache: jax.Array, v_cache: jax.Array,
                       rotary_dim: int, dtype, decode_implementation: str | None = None) -> bool:
  """Whether a cached call of `tokens` tokens runs from its merged q|gate|k|v product through
  the decode front kernel and the decode kernel (`decode_front`, `decode_pallas`): the decode
  implementation picks 'pallas' (None: `DEFAULT_DECODE_BY_BACKEND`), the backend is a GPU and both
  kernels take the shapes. Otherwise the caller runs XLA's front and `cache_attention`.

  Raises:
    ValueError: unknown implementation.
  """
  from pallas_kernels.attention import decode_front  # pylint: disable=g-import-not-at-top
  from pallas_kernels.attention import decode_pallas  # pylint: disable=g-import-not-at-top
  impl = backend.resolve_implementation(decode_implementation, DECODE_IMPLEMENTATIONS,
                                        DEFAULT_DECODE_BY_BACKEND, 'decode attention')
  if impl != 'pallas':
    return False
  b, _, hkv, d = k_cache.shape
  q = jax.ShapeDtypeStruct((b, tokens, num_heads, d), dtype)
  why = (decode_front.front_takes(tokens, num_heads, hkv, d, rotary_dim)
         or decode_pallas.kernel_takes(q, k_cache, v_cache))
  return backend.why_gpu_kernel_cannot_run(why) is None
