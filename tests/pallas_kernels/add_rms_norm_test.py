"""The fused residual add + RMSNorm kernel (`add_rms_norm.pallas`) against its XLA reference, and
the dispatch's fallback. CPU: interpret mode, small rows. GPU: Qwen3.5-2B's hidden size at a
decode step's and a prefill's row counts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import add_rms_norm
from pallas_kernels._common import testing
from pallas_kernels.add_rms_norm import pallas
from pallas_kernels.add_rms_norm import xla

_ON_GPU = jax.default_backend() == 'gpu'
_SHAPES = [(8, 1, 2048), (8, 128, 2048)] if _ON_GPU else [(2, 3, 64), (1, 5, 256)]


def _inputs(rng, shape, dtype, scale_dtype):
  normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  h = (4.0 * normal(*shape)).astype(dtype)  # a residual stream larger than its update
  return h, normal(*shape).astype(dtype), (0.1 * normal(shape[-1])).astype(scale_dtype)


@pytest.mark.parametrize('shape', _SHAPES)
@pytest.mark.parametrize('dtype, scale_dtype', [(jnp.bfloat16, jnp.float32),
                                                (jnp.bfloat16, jnp.bfloat16),
                                                (jnp.float32, jnp.float32)])
def test_kernel_matches_the_reference(rng, shape, dtype, scale_dtype):
  h, delta, scale = _inputs(rng, shape, dtype, scale_dtype)
  s, y = pallas.add_rms_norm(h, delta, scale, eps=1e-6, interpret=not _ON_GPU)
  want_s, want_y = xla.add_rms_norm(h, delta, scale, eps=1e-6)
  assert s.shape == y.shape == shape and s.dtype == y.dtype == dtype
  # The sum is one rounding of h + delta either way; the norm differs by its fp32 reduction order.
  np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(want_s, np.float32))
  tol = 4e-3 if dtype == jnp.bfloat16 else 1e-6
  testing.assert_close('y', np.asarray(y, np.float32), np.asarray(want_y, np.float32), tol)
  # and the norm really is the zero-centred RMSNorm of the sum (not of h alone, not 1-less)
  x = np.asarray(want_s, np.float64)
  ref = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * (1 + np.asarray(scale, np.float64))
  testing.assert_close('y vs float64', np.asarray(y, np.float32), ref, 2 * tol + 1e-6)


def test_dispatch_falls_back_to_xla_for_rows_the_kernel_cannot_take(rng):
  h, delta, scale = _inputs(rng, (2, 3, 48), jnp.float32, jnp.float32)
  assert pallas.kernel_takes(h) == 'D=48 is not a power of two >= 16'
  got = add_rms_norm.add_rms_norm(h, delta, scale, eps=1e-6, implementation='pallas')
  want = xla.add_rms_norm(h, delta, scale, eps=1e-6)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)


def test_dispatch_rejects_an_unknown_implementation(rng):
  h, delta, scale = _inputs(rng, (1, 1, 64), jnp.float32, jnp.float32)
  with pytest.raises(ValueError, match="unknown add_rms_norm implementation 'triton'"):
    add_rms_norm.add_rms_norm(h, delta, scale, eps=1e-6, implementation='triton')
