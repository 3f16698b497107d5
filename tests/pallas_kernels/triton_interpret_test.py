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


@triton.jit
def _widen_scale_and_sum_rows(x, y, s, N: tl.constexpr, FACTOR: tl.constexpr):
  row = tl.program_id(0)
  o = tl.arange(0, N)
  vals = tl.load(x + row * N + o).to(tl.float32)
  tl.store(y + row * N + o, (vals * FACTOR).to(tl.bfloat16))
  tl.store(s + row, tl.sum(vals, axis=0))


def test_bfloat16_buffers_in_and_out():
  """bf16 crosses as its bits both ways; the kernel widens it exactly."""
  x = (jnp.arange(24, dtype=jnp.float32).reshape(3, 8) / 7).astype(jnp.bfloat16)
  y, s = jax.jit(lambda x: triton_interpret.triton_call(
      x, kernel=_widen_scale_and_sum_rows, grid=(3,), N=8, FACTOR=2.0,
      out_shape=[jax.ShapeDtypeStruct((3, 8), jnp.bfloat16),
                 jax.ShapeDtypeStruct((3,), jnp.float32)]))(x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y, np.float32), 2 * np.asarray(x, np.float32))
  np.testing.assert_allclose(s, np.asarray(x, np.float32).sum(1), rtol=1e-6)


def test_bad_buffers_and_kernels_raise():
  shape = jax.ShapeDtypeStruct((3, 8), jnp.float32)
  with pytest.raises(ValueError, match='float32, int32, bfloat16 buffers, got float16'):
    triton_interpret.triton_call(jnp.zeros((3, 8), jnp.float16), kernel=_scale_and_sum_rows,
                                 grid=(3,), out_shape=[shape, shape], N=8, FACTOR=1.0)
  with pytest.raises(ValueError, match='TRITON_INTERPRET'):
    triton_interpret.triton_call(jnp.zeros((3, 8)), kernel=lambda *a: None, grid=(3,),
                                 out_shape=shape)


@triton.jit
def _sum_leading_positives(x, s, N: tl.constexpr):
  """s[row] = the sum of row's values up to its last positive one, by a loop whose bound the
  kernel computes."""
  row = tl.program_id(0)
  o = tl.arange(0, N)
  vals = tl.load(x + row * N + o)
  count = tl.max(tl.where(vals > 0, o + 1, 0), axis=0)
  total = 0.0
  for i in range(count):
    total += tl.load(x + row * N + i)
  tl.store(s + row, total)


def test_loop_over_a_tensor_bound():
  """The interpreter keeps scalars as (1,) arrays; NumPy 2 cannot int() them unpatched."""
  x = jnp.asarray([[1., 2., -1., 3., -5., -6., -7., -8.], [-1.] * 8, [4.] * 8], jnp.float32)
  s = jax.jit(lambda x: triton_interpret.triton_call(
      x, kernel=_sum_leading_positives, grid=(3,), N=8,
      out_shape=jax.ShapeDtypeStruct((3,), jnp.float32)))(x)
  np.testing.assert_array_equal(s, [5., 0., 32.])


def test_unwritten_outputs_read_unset_unless_zeroed():
  """jax_triton zeroes only the outputs zeroed_outputs lists; the others start unset (here NaN
  and -1), so a kernel that skips elements of one must list it."""
  x = jnp.arange(24, dtype=jnp.float32).reshape(3, 8)
  call = lambda zeroed: jax.jit(lambda x: triton_interpret.triton_call(
      x, kernel=_scale_and_sum_rows, grid=(2,), N=8, FACTOR=2.0, zeroed_outputs=zeroed,
      out_shape=[jax.ShapeDtypeStruct((3, 8), jnp.float32),
                 jax.ShapeDtypeStruct((3,), jnp.int32)]))(x)  # row 2 is never written
  y, s = call(())
  np.testing.assert_array_equal(y[:2], 2 * x[:2])
  assert np.isnan(y[2]).all() and s[2] == -1
  y, s = call((0, 1))
  np.testing.assert_array_equal(y[2], 0)
  np.testing.assert_array_equal(s, [28, 92, 0])


@triton.jit
def _write_own_and_next_row(y, N: tl.constexpr):
  """Program i writes i into rows i and i + 1: a race on row i + 1 with program i + 1."""
  row = tl.program_id(0)
  o = tl.arange(0, N)
  vals = tl.zeros([N], dtype=tl.float32) + row
  tl.store(y + row * N + o, vals)
  tl.store(y + (row + 1) * N + o, vals, mask=(row + 1 < tl.num_programs(0)) & (o >= 0))


def test_programs_run_last_to_first_so_writes_into_a_later_programs_rows_show():
  """Run first to last, every row would end as its own program's index; last to first, the
  earlier program's write into the next row lands last and the race shows."""
  y = jax.jit(lambda: triton_interpret.triton_call(
      kernel=_write_own_and_next_row, grid=(4,), N=8,
      out_shape=jax.ShapeDtypeStruct((4, 8), jnp.float32)))()
  np.testing.assert_array_equal(np.asarray(y)[:, 0], [0, 0, 1, 2])
