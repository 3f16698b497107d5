"""Runs a `@triton.jit` kernel in Triton's interpreter on the host, as a JAX op.

`triton_call` takes jax_triton.triton_call's arguments (inputs, then outputs allocated here in
`out_shape` order, the launch grid, constexpr metaparameters) and runs the kernel on numpy-backed
torch tensors inside `jax.pure_callback`, so a jitted, differentiated jax-triton pipeline runs
unchanged on a CPU-only machine: the CPU tests' check of the Triton kernels' algebra (layouts,
masks, pointer arithmetic), as Pallas's `interpret=True` is for the Pallas kernels.

Needs torch, and TRITON_INTERPRET=1 in the environment before the kernels' module is imported
(Triton decides at `@triton.jit` time; tests/conftest.py sets it off GPU). Float32 and int32
buffers only (the interpreter's numpy has no bfloat16).
"""
import threading

import jax
import numpy as np

_NUMPY_DTYPES = (np.float32, np.int32)
# Triton's interpreter keeps the launch grid in module state: XLA may run two independent
# callbacks at once (the clean pass's kernels beside the noisy kernel), so launches take turns.
_LAUNCH_LOCK = threading.Lock()


def _host_array(x):
  import torch  # pylint: disable=g-import-not-at-top
  return torch.from_numpy(np.array(x))  # a writable copy


def triton_call(*args, kernel, out_shape, grid, num_warps=None, num_stages=None, **meta):
  """jax_triton.triton_call's contract, run by Triton's interpreter (launch options ignored).

  Raises:
    ValueError: a buffer dtype the interpreter path does not take, or a kernel not decorated in
      interpreter mode.
  """
  del num_warps, num_stages  # the interpreter runs programs one at a time
  if type(kernel).__name__ != 'InterpretedFunction':
    raise ValueError('the kernel was not built for the Triton interpreter: set TRITON_INTERPRET=1 '
                     'before importing its module')
  single = not isinstance(out_shape, (list, tuple))
  shapes = [out_shape] if single else list(out_shape)
  for x in list(args) + shapes:
    if np.dtype(x.dtype) not in _NUMPY_DTYPES:
      raise ValueError(f'the Triton interpreter path takes float32 and int32 buffers, got '
                       f'{x.dtype}')

  def host(*arrays):
    import torch  # pylint: disable=g-import-not-at-top
    outs = [torch.zeros(s.shape, dtype=getattr(torch, np.dtype(s.dtype).name)) for s in shapes]
    with _LAUNCH_LOCK:
      kernel[tuple(grid)](*map(_host_array, arrays), *outs, **meta)
    return [o.numpy() for o in outs]

  res = jax.pure_callback(host, [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in shapes], *args)
  return res[0] if single else res
