"""Registers, spills and shared memory of the jax-triton GDN kernels for a GPU, without a GPU.

python -m launch.kernel_registers --arch=90 --device_kind="NVIDIA H200" --b=1 --t=4096

Traces the triton family's forward and backward (`jax.eval_shape`, nothing runs) with a launcher
that records every `triton_call` it makes: kernel, buffer dtypes, constexprs, num_warps and
num_stages exactly as the real launches pass them (BlockSizes for `--device_kind`). Each recorded
launch is compiled by Triton for `--arch` and assembled by the ptxas Triton ships, whose report
gives registers per thread and spill bytes: a register-pressure check for kernel changes on a
machine without a GPU (CPU-only Triton works). Timing still needs the GPU (launch.bench_kernels).
"""
import re
import subprocess
import tempfile

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.gated_delta_rule import configs
from pallas_kernels.gated_delta_rule import triton as gdr_triton

_ARCH = flags.DEFINE_integer('arch', 90, 'CUDA compute capability x10 (80 A100, 90 H100/H200).')
_KIND = flags.DEFINE_string('device_kind', 'NVIDIA H200',
                            'Device kind whose BlockSizes defaults to compile with.')
_B = flags.DEFINE_integer('b', 1, 'Batch.')
_T = flags.DEFINE_integer('t', 4096, 'Sequence length.')
_HEADS = flags.DEFINE_integer('heads', 16, 'Key heads.')
_VALUE_HEADS = flags.DEFINE_integer('value_heads', 16, 'Value heads (a multiple of --heads).')
_DK = flags.DEFINE_integer('dk', 128, 'Key head size.')
_DV = flags.DEFINE_integer('dv', 128, 'Value head size.')
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float16', 'float32'], 'q, k, v.')
_RESETS = flags.DEFINE_bool('resets', False, 'With document resets (segment ids).')

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


def record_launches(b, t, h, hv, dk, dv, dtype, resets, device_kind):
  """Every launch the triton family makes for one forward + backward of this problem."""
  recorder = _Recorder()
  real_jt, real_sizes = gdr_triton._jt, configs.block_sizes_for  # pylint: disable=protected-access
  gdr_triton._jt = lambda interpret=False: recorder  # pylint: disable=protected-access
  configs.block_sizes_for = lambda vp, family: configs.BlockSizes.get_default(vp, device_kind,
                                                                              family)
  try:
    spec = lambda *s, dt=dtype: jax.ShapeDtypeStruct(s, dt)
    args = (spec(b, t, h, dk), spec(b, t, h, dk), spec(b, t, hv, dv),
            spec(b, t, hv, dt=jnp.float32), spec(b, t, hv, dt=jnp.float32))
    seg = jnp.zeros((b, t), jnp.int32).at[:, t // 3:].set(1) if resets else None

    def fwd_bwd(*a):
      fn = lambda *x: gdr_triton.chunk_gated_delta_rule_triton(*x, segment_ids=seg,
                                                               interpret=True)[0]
      o, vjp = jax.vjp(fn, *a)
      return vjp(o)

    jax.eval_shape(fwd_bwd, *args)
  finally:
    gdr_triton._jt, configs.block_sizes_for = real_jt, real_sizes  # pylint: disable=protected-access
  return recorder.launches


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


def main(argv):
  del argv
  if not hasattr(gdr_triton._kernels()['intra'], 'params'):  # pylint: disable=protected-access
    raise app.UsageError('the kernels were built for the Triton interpreter: unset '
                         'TRITON_INTERPRET')
  launches = record_launches(_B.value, _T.value, _HEADS.value, _VALUE_HEADS.value, _DK.value,
                             _DV.value, jnp.dtype(_DTYPE.value), _RESETS.value, _KIND.value)
  print(f'sm_{_ARCH.value}, BlockSizes for {_KIND.value!r}: B={_B.value} T={_T.value} '
        f'H={_HEADS.value} HV={_VALUE_HEADS.value} K={_DK.value} V={_DV.value} {_DTYPE.value}'
        f'{" with resets" if _RESETS.value else ""}')
  print('| kernel | grid | warps | stages | V tile | registers | spill stores B | spill loads B | '
        'shared KiB |')
  print('|---|---|---|---|---|---|---|---|---|')
  for launch in launches:
    rep = compile_report(launch, _ARCH.value)
    print(f"| {launch['kernel'].__name__} | {tuple(launch['grid'])} | {launch['num_warps']} | "
          f"{launch['num_stages']} | {launch['meta'].get('BV', '-')} | {rep['registers']} | "
          f"{rep['spill_stores']} | {rep['spill_loads']} | {rep['shared_kib']:.0f} |", flush=True)


if __name__ == '__main__':
  app.run(main)
