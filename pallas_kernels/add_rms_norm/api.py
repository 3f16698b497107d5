"""Dispatch for the fused residual add + RMSNorm: the XLA reference or the Pallas kernel."""
import functools

from absl import logging
import jax

from pallas_kernels._common import backend
from pallas_kernels.add_rms_norm import xla

IMPLEMENTATIONS = ('xla', 'pallas')
# None means xla on every backend: in a decode step the residual adds XLA replaces are also where it
# reduces the split-K partials of the GEMM before them, so the kernel's row needs that reduction
# as a launch of its own (`pallas.py`'s docstring has the measurement).
DEFAULT_BY_BACKEND = {}


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
  logging.warning('add_rms_norm: %s', message)


def add_rms_norm(h: jax.Array, delta: jax.Array, scale: jax.Array, *, eps: float,
                 implementation: str | None = None) -> tuple[jax.Array, jax.Array]:
  """(s, y): the residual sum s = h + delta in h.dtype and its zero-centred RMSNorm y.

  Args:
    h, delta: [..., D] (delta is cast to h.dtype first).
    scale: [D], the norm's weight (applied as 1 + scale).
    implementation: None or 'xla' (XLA's ops), or 'pallas' (the kernel; interpret mode off GPU).
      Forward only: no gradient rule, so meant for cached (inference) passes.
  """
  impl = backend.resolve_implementation(implementation, IMPLEMENTATIONS, DEFAULT_BY_BACKEND,
                                        'add_rms_norm')
  if impl == 'xla':
    return xla.add_rms_norm(h, delta, scale, eps=eps)
  from pallas_kernels.add_rms_norm import pallas  # pylint: disable=g-import-not-at-top
  reason = pallas.kernel_takes(h)
  if reason:
    _log_once(f'the kernel cannot take this call ({reason}); using xla')
    return xla.add_rms_norm(h, delta, scale, eps=eps)
  return pallas.add_rms_norm(h, delta, scale, eps=eps,
                             interpret=backend.default_backend() != 'gpu')
