"""_common.triton_interpret: a Triton kernel run by the interpreter as a jitted JAX op (CPU)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._common import triton_interpret

triton = pytest.importorskip('triton')
pytest.importorskip('torch')
tl = triton.language

if jax.default_backend() == 'gpu':
  pytest.skip('the interpreter path is for CPU runs (TRITON_INTERPRET unset on GPU)',
              allow_module_level=True)


@triton.jit
def _scale_and_sum_rows(x, y, s, N: tl.constexpr, FACTOR: tl.constexpr):
  row = tl.program_id(0)
  o = tl.arange(0, N)
  vals = tl.load(x + row * N + o)
  tl.store(y + row * N + o, vals * FACTOR)
  tl.store(s + row, tl.sum(vals, axis=0))


def test_outputs_in_out_shape_order_under_jit():
  x = jnp.arange(24, dtype=jnp.float32).reshape(3, 8)

  @jax.jit
  def f(x):
    return triton_interpret.triton_call(
        x, kernel=_scale_and_sum_rows, grid=(3,), num_warps=4, N=8, FACTOR=2.0,
        out_shape=[jax.ShapeDtypeStruct((3, 8), jnp.float32),
                   jax.ShapeDtypeStruct((3,), jnp.float32)])

  y, s = f(x)
  np.testing.assert_allclose(y, 2 * x)
  np.testing.assert_allclose(s, x.sum(1))


def test_bad_buffers_and_kernels_raise():
  shape = jax.ShapeDtypeStruct((3, 8), jnp.float32)
  with pytest.raises(ValueError, match='float32 and int32'):
    triton_interpret.triton_call(jnp.zeros((3, 8), jnp.bfloat16), kernel=_scale_and_sum_rows,
                                 grid=(3,), out_shape=[shape, shape], N=8, FACTOR=1.0)
  with pytest.raises(ValueError, match='TRITON_INTERPRET'):
    triton_interpret.triton_call(jnp.zeros((3, 8)), kernel=lambda *a: None, grid=(3,),
                                 out_shape=shape)
