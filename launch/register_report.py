"""Records the jax-triton GDN family's launches and reports ptxas registers and spills for each.

The flag-free half of launch.kernel_registers (importable beside other launch modules' flags):
`record_launches` traces forward + backward under `jax.eval_shape` with a stand-in for jax_triton
that records every launch as the real code makes it; `compile_report` compiles one recorded launch
for a CUDA architecture with Triton and assembles it with the ptxas Triton ships.
"""
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.gated_delta_rule import configs
from pallas_kernels.gated_delta_rule import triton as gdr_triton
from pallas_kernels.gated_delta_rule import two_stream_triton

_POINTER = {'float32': '*fp32', 'bfloat16': '*bf16', 'float16': '*fp16', 'int32': '*i32'}


class _Recorder:
  """Stands in for jax_triton: records each launch, returns zeros of its out_shape."""

  def __init__(self):
    self.launches = []

  def triton_call(self, *args, kernel, out_shape, grid, num_warps, num_stages, **meta):
    outs = list(out_shape) if isinstance(out_shape, (list, tuple)) else [out_shape]
    dtypes = [np.dtype(x.dtype).name for x in args + tuple(outs)]
    self.launches.append(dict(kernel=kernel, dtypes=dtypes, grid=grid, num_warps=num_warps,
                              num_stages=num_stages, meta=meta))
    zeros = [jnp.zeros(s.shape, s.dtype) for s in outs]
    return zeros if isinstance(out_shape, (list, tuple)) else zeros[0]


def _recorded(trace, device_kind):
  """The launches `trace()` (which calls jax.eval_shape) makes through gdr_triton._jt."""
  recorder = _Recorder()
  real_jt, real_sizes = gdr_triton._jt, configs.block_sizes_for  # pylint: disable=protected-access
  gdr_triton._jt = lambda interpret=False: recorder  # pylint: disable=protected-access
  configs.block_sizes_for = lambda vp, family, dt: configs.BlockSizes.get_default(
      vp, device_kind, family, dt)
  try:
    trace()
  finally:
    gdr_triton._jt = real_jt  # pylint: disable=protected-access
    configs.block_sizes_for = real_sizes
  return recorder.launches


def record_launches(b, t, h, hv, dk, dv, dtype, resets, device_kind):
  """Every launch the triton family makes for one forward + backward of this problem."""
  spec = lambda *s, dt=dtype: jax.ShapeDtypeStruct(s, dt)
  args = (spec(b, t, h, dk), spec(b, t, h, dk), spec(b, t, hv, dv),
          spec(b, t, hv, dt=jnp.float32), spec(b, t, hv, dt=jnp.float32))
  seg = jnp.zeros((b, t), jnp.int32).at[:, t // 3:].set(1) if resets else None

  def fwd_bwd(*a):
    fn = lambda *x: gdr_triton.chunk_gated_delta_rule_triton(*x, segment_ids=seg,
                                                             interpret=True)[0]
    o, vjp = jax.vjp(fn, *a)
    return vjp(o)

  return _recorded(lambda: jax.eval_shape(fwd_bwd, *args), device_kind)


def record_two_stream_launches(b, t, views, h, hv, dk, dv, dtype, max_block, chunk_size=64):
  """The fused two-stream kernels' launches (two_stream_triton) for one forward + backward of this
  problem: the kernel backward where it takes max_block, else (autodiff) none."""
  backward = ('kernel' if max_block <= two_stream_triton.MAX_KERNEL_BACKWARD_BLOCK
              else 'autodiff')
  spec = lambda *s, dt=dtype: jax.ShapeDtypeStruct(s, dt)
  f32 = jnp.float32
  clean = (spec(b, t, h, dk), spec(b, t, h, dk), spec(b, t, hv, dv), spec(b, t, hv, dt=f32),
           spec(b, t, hv, dt=f32))
  noisy = (spec(b, views, t, h, dk), spec(b, views, t, h, dk), spec(b, views, t, hv, dv),
           spec(b, views, t, hv, dt=f32), spec(b, views, t, hv, dt=f32))
  ids = spec(b, t, dt=jnp.int32)
  def fwd_bwd(c, n, seg, starts):
    fn = lambda c_, n_: two_stream_triton.noisy_delta_rule_triton(
        c_, n_, seg, starts, scale=dk ** -0.5, chunk_size=chunk_size, max_block=max_block,
        interpret=True, backward=backward)
    o, vjp = jax.vjp(fn, c, n)
    return vjp(o)

  return _recorded(lambda: jax.eval_shape(fwd_bwd, clean, noisy, ids, ids), '')


def compile_report(launch, arch):
  """{'registers', 'spill_stores', 'spill_loads', 'shared_kib'} of one recorded launch."""
  import triton  # pylint: disable=g-import-not-at-top
  from triton.backends.compiler import GPUTarget  # pylint: disable=g-import-not-at-top
  from triton.compiler import ASTSource  # pylint: disable=g-import-not-at-top
  import triton.backends.nvidia as nvidia  # pylint: disable=g-import-not-at-top

  fn = launch['kernel']
  names = fn.arg_names
  pointers = iter(launch['dtypes'])
  signature, constexprs = {}, {}
  for i, param in enumerate(fn.params):
    if param.is_constexpr:
      signature[names[i]] = 'constexpr'
      constexprs[(i,)] = launch['meta'][names[i]]
    else:
      signature[names[i]] = _POINTER[next(pointers)]
  compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget('cuda', arch, 32),
                            options=dict(num_warps=launch['num_warps'],
                                         num_stages=launch['num_stages']))
  ptxas = f'{nvidia.__path__[0]}/bin/ptxas'
  with tempfile.NamedTemporaryFile('w', suffix='.ptx') as f:
    f.write(compiled.asm['ptx'])
    f.flush()
    sm = f'sm_{arch}a' if arch >= 90 else f'sm_{arch}'
    out = subprocess.run([ptxas, f'-arch={sm}', '-v', f.name, '-o', '/dev/null'],
                         capture_output=True, text=True, check=True).stderr
  grab = lambda pattern: int(re.search(pattern, out).group(1)) if re.search(pattern, out) else 0
  return dict(registers=grab(r'Used (\d+) registers'),
              spill_stores=grab(r'(\d+) bytes spill stores'),
              spill_loads=grab(r'(\d+) bytes spill loads'),
              shared_kib=compiled.metadata.shared / 1024)
