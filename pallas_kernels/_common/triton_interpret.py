"""Runs a `@triton.jit` kernel in Triton's interpreter on the host, as a JAX op.

`triton_call` takes jax_triton.triton_call's arguments (inputs, then outputs allocated here in
`out_shape` order, the launch grid, constexpr metaparameters) and runs the kernel on numpy-backed
torch tensors inside `jax.pure_callback`, so a jitted, differentiated jax-triton pipeline runs
unchanged on a CPU-only machine: the CPU tests' check of the Triton kernels' algebra (layouts,
masks, pointer arithmetic), as Pallas's `interpret=True` is for the Pallas kernels.

Needs torch, and TRITON_INTERPRET=1 in the environment before the kernels' module is imported
(Triton decides at `@triton.jit` time; tests/conftest.py sets it off GPU). Float32, int32 and
bfloat16 buffers (the interpreter keeps bfloat16 as uint16 bits and widens it exactly; its products
of bfloat16 tensors are wrong in Triton 3.6, so kernels widen before multiplying). Loops may take
a bound the kernel computes (`_patch_scalar_index`).
"""
import contextlib
import inspect
import threading

import jax
import numpy as np

_DTYPES = ('float32', 'int32', 'bfloat16')
# Triton's interpreter keeps the launch grid in module state: XLA may run two independent
# callbacks at once (the clean pass's kernels beside the noisy kernel), so launches take turns.
_LAUNCH_LOCK = threading.Lock()


def _host_array(x):
  """A writable torch copy of x (bfloat16 through its bits: numpy has no bfloat16 torch reads)."""
  import torch  # pylint: disable=g-import-not-at-top
  x = np.array(x)
  if x.dtype.name == 'bfloat16':
    return torch.from_numpy(x.view(np.uint16)).view(torch.bfloat16)
  return torch.from_numpy(x)


def _numpy_array(t, dtype):
  """The torch tensor t back as a numpy array of `dtype`."""
  import torch  # pylint: disable=g-import-not-at-top
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(dtype)  # the same 16 bits
  return t.numpy()


def _patch_scalar_index():
  """Lets a loop take a tensor bound (`range(n)`, n computed in the kernel) in the interpreter.

  The interpreter keeps scalars as one-element arrays of shape (1,) and indexes with
  `int(data)`, which NumPy 2 refuses for arrays of rank 1; `data.item()` is the same number."""
  from triton.runtime import interpreter  # pylint: disable=g-import-not-at-top
  original = interpreter._patch_lang_tensor  # pylint: disable=protected-access
  if getattr(original, 'scalar_index_patched', False):
    return

  def patched(tensor, scope):
    original(tensor, scope)
    scope.set_attr(tensor, '__index__', lambda self: int(self.handle.data.item()))

  patched.scalar_index_patched = True
  interpreter._patch_lang_tensor = patched  # pylint: disable=protected-access


@contextlib.contextmanager
def _programs_last_to_first():
  """Within it, the interpreter runs a launch's programs from the last grid index to the first.

  On a GPU programs run in no set order, so a program that writes elements another owns races
  with it; run first to last, a window that writes into the next window's rows is overwritten
  by that later owner and the bug stays hidden on the host. Run last to first, its write comes
  after the owner's and fails the tests."""
  from triton.runtime import interpreter  # pylint: disable=g-import-not-at-top
  builder = interpreter.interpreter_builder
  forward = builder.set_grid_idx

  def backward(x, y, z):
    gx, gy, gz = builder.grid_dim
    forward(gx - 1 - x, gy - 1 - y, gz - 1 - z)

  builder.set_grid_idx = backward
  try:
    yield
  finally:
    builder.set_grid_idx = forward


@contextlib.contextmanager
def _language_patched_once():
  """Within it, the interpreter patches triton.language once per launch, not again at every
  device-function call.

  The interpreter swaps the language's builtins for host versions as a launch starts (and restores
  them as it ends), then again at each call of a `@triton.jit` helper, through inspect.getmembers
  over the language's modules: about a third of a CPU test's time in the two-stream kernels. The
  swaps are the same each time (one global builder), so a helper whose modules the launch has
  patched needs none."""
  import triton.language as tl  # pylint: disable=g-import-not-at-top
  from triton.runtime import interpreter  # pylint: disable=g-import-not-at-top
  original = interpreter._patch_lang  # pylint: disable=protected-access
  patched, langs_of = set(), {}  # ids of the modules patched; a module's language modules

  def once(fn):
    key = id(fn.__globals__)
    if key not in langs_of:
      langs_of[key] = {id(v) for v in fn.__globals__.values()
                       if inspect.ismodule(v) and v in (tl, tl.core)}
    langs = langs_of[key]
    if langs and langs <= patched:
      return interpreter._LangPatchScope()  # pylint: disable=protected-access
    scope = original(fn)
    patched.update(langs)
    return scope

  interpreter._patch_lang = once  # pylint: disable=protected-access
  try:
    yield
  finally:
    interpreter._patch_lang = original  # pylint: disable=protected-access


def triton_call(*args, kernel, out_shape, grid, num_warps=None, num_stages=None,
                zeroed_outputs=(), **meta):
  """jax_triton.triton_call's contract, run by Triton's interpreter (launch options ignored).
  Outputs start as jax_triton leaves them: zeros where listed in zeroed_outputs (indices into
  out_shape), else unset, which here reads NaN (floats) or -1 (integers), so a kernel that leaves
  an unlisted output's element unwritten fails its tests on the host too.

  Raises:
    ValueError: a buffer dtype the interpreter path does not take, or a kernel not decorated in
      interpreter mode.
  """
  del num_warps, num_stages  # the interpreter runs programs one at a time
  zeroed = set(zeroed_outputs(meta) if callable(zeroed_outputs) else zeroed_outputs)
  if type(kernel).__name__ != 'InterpretedFunction':
    raise ValueError('the kernel was not built for the Triton interpreter: set TRITON_INTERPRET=1 '
                     'before importing its module')
  single = not isinstance(out_shape, (list, tuple))
  shapes = [out_shape] if single else list(out_shape)
  for x in list(args) + shapes:
    if np.dtype(x.dtype).name not in _DTYPES:
      raise ValueError(f'the Triton interpreter path takes {", ".join(_DTYPES)} buffers, got '
                       f'{x.dtype}')

  _patch_scalar_index()

  def host(*arrays):
    import torch  # pylint: disable=g-import-not-at-top
    outs = []
    for i, s in enumerate(shapes):
      dtype = getattr(torch, np.dtype(s.dtype).name)
      unset = float('nan') if dtype.is_floating_point else -1
      outs.append(torch.full(s.shape, 0 if i in zeroed else unset, dtype=dtype))
    with _LAUNCH_LOCK, _programs_last_to_first(), _language_patched_once():
      kernel[tuple(grid)](*map(_host_array, arrays), *outs, **meta)
    return [_numpy_array(o, s.dtype) for o, s in zip(outs, shapes)]

  res = jax.pure_callback(host, [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in shapes], *args)
  return res[0] if single else res
