"""Records the GDN kernels' launches and reports ptxas registers, spills and shared memory of each.

The flag-free half of launch.kernel_registers (importable beside other launch modules' flags):
`record_launches` / `record_two_stream_launches` trace forward + backward without a GPU. The
jax-triton family runs under `jax.eval_shape` with a stand-in for jax_triton that records every
launch as the real code makes it; the Pallas family is lowered for CUDA on this machine and its
kernels' Triton IR read out of the lowered module (`pallas_launches`). `compile_report` compiles
one launch for a CUDA architecture with the installed Triton and assembles it with the ptxas
Triton ships.
"""
import contextlib
import functools
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._common import backend
from pallas_kernels.attention import mask as attention_mask
from pallas_kernels.attention import pallas as attention_pallas
from pallas_kernels.gated_delta_rule import api as gdr_api
from pallas_kernels.gated_delta_rule import configs
from pallas_kernels.gated_delta_rule import pallas as gdr_pallas
from pallas_kernels.gated_delta_rule import triton as gdr_triton
from pallas_kernels.gated_delta_rule import two_stream_pallas
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


@contextlib.contextmanager
def _block_sizes_of(device_kind):
  """BlockSizes defaults for `device_kind` (not this machine's backend) while tracing."""
  real = configs.block_sizes_for
  configs.block_sizes_for = lambda vp, family, dt, checkpoints=False: (
      configs.BlockSizes.get_default(vp, device_kind, family, dt, checkpoints))
  try:
    yield
  finally:
    configs.block_sizes_for = real


def _recorded_triton(fwd_bwd, args, device_kind):
  """The launches `fwd_bwd(*args, interpret=True)` makes through gdr_triton._jt, under
  jax.eval_shape (nothing runs)."""
  recorder = _Recorder()
  # Jitted helpers traced before (or here) would skip (or keep) the recorder: trace afresh.
  jax.clear_caches()
  real_jt, real_takes = gdr_triton._jt, gdr_api.kernels_take  # pylint: disable=protected-access
  gdr_triton._jt = lambda interpret=False: recorder  # pylint: disable=protected-access
  # The launches the GPU makes: which inputs the kernels take as compiled, not as interpreted.
  gdr_api.kernels_take = lambda family, k, v, chunk, interpret: real_takes(family, k, v, chunk,
                                                                           False)
  try:
    with _block_sizes_of(device_kind):
      jax.eval_shape(functools.partial(fwd_bwd, interpret=True), *args)
  finally:
    gdr_triton._jt = real_jt  # pylint: disable=protected-access
    gdr_api.kernels_take = real_takes
    jax.clear_caches()
  return [dict(launch, name=launch['kernel'].__name__, v_tile=launch['meta'].get('BV'))
          for launch in recorder.launches]


def _recorded_pallas(fwd_bwd, args, device_kind):
  with _block_sizes_of(device_kind):
    return [dict(launch, v_tile=None)
            for launch in pallas_launches(functools.partial(fwd_bwd, interpret=False), *args)]


def _vjp_of(fn):
  """fn(*xs) -> its cotangent-of-itself gradients: one forward + backward."""
  def fwd_bwd(*xs):
    o, vjp = jax.vjp(fn, *xs)
    return vjp(o)
  return fwd_bwd


def record_launches(family, b, t, h, hv, dk, dv, dtype, resets, device_kind):
  """Every kernel launch of `family` ('triton' | 'pallas') for one forward + backward of the
  chunked gated delta rule on this problem: dicts with name, grid, num_warps, num_stages, v_tile
  and what `compile_report` compiles."""
  spec = lambda *s, dt=dtype: jax.ShapeDtypeStruct(s, dt)
  args = (spec(b, t, h, dk), spec(b, t, h, dk), spec(b, t, hv, dv),
          spec(b, t, hv, dt=jnp.float32), spec(b, t, hv, dt=jnp.float32))
  seg = jnp.zeros((b, t), jnp.int32).at[:, t // 3:].set(1) if resets else None
  impl = dict(triton=gdr_triton.chunk_gated_delta_rule_triton,
              pallas=gdr_pallas.chunk_gated_delta_rule_pallas)[family]

  def fwd_bwd(*xs, interpret):
    return _vjp_of(lambda *x: impl(*x, segment_ids=seg, interpret=interpret)[0])(*xs)

  record = dict(triton=_recorded_triton, pallas=_recorded_pallas)[family]
  return record(fwd_bwd, args, device_kind)


def record_two_stream_launches(family, b, t, views, h, hv, dk, dv, dtype, max_block,
                               chunk_size=64, device_kind='', remat=False):
  """The fused two-stream kernels' launches (two_stream_triton or two_stream_pallas) for one
  forward + backward of this problem: the kernel backward where it takes max_block, else
  (autodiff) none. The clean passes' BlockSizes are those for `device_kind`; remat: the op under
  `jax.checkpoint`, as a block remat runs it."""
  spec = lambda *s, dt=dtype: jax.ShapeDtypeStruct(s, dt)
  f32 = jnp.float32
  clean = (spec(b, t, h, dk), spec(b, t, h, dk), spec(b, t, hv, dv), spec(b, t, hv, dt=f32),
           spec(b, t, hv, dt=f32))
  noisy = (spec(b, views, t, h, dk), spec(b, views, t, h, dk), spec(b, views, t, hv, dv),
           spec(b, views, t, hv, dt=f32), spec(b, views, t, hv, dt=f32))
  ids = spec(b, t, dt=jnp.int32)
  if family == 'triton':
    impl, record = two_stream_triton.noisy_delta_rule_triton, _recorded_triton
  else:
    impl, record = two_stream_pallas.noisy_delta_rule_pallas, _recorded_pallas

  def fwd_bwd(c, n, seg, starts, interpret):
    op = lambda c_, n_: impl(c_, n_, seg, starts, scale=dk ** -0.5, chunk_size=chunk_size,
                             max_block=max_block, interpret=interpret, backward='kernel')
    return _vjp_of(jax.checkpoint(op) if remat else op)(c, n)

  return record(fwd_bwd, (clean, noisy, ids, ids), device_kind)


def record_attention_launches(b, t, h, hkv, d, dtype, device_kind, options=()):
  """The Pallas attention kernels' launches (forward, dq, dk/dv; `options`: BlockSizes fields,
  'FIELD[=N]' each, see `BlockSizes.with_fields`) for one forward + backward of causal attention
  over [B, T, H, D] queries and Hkv key/value heads (BlockSizes for `device_kind`). The mask is
  read from metadata inside the kernels, so the causal case compiles the same kernels as the
  two-stream one."""
  spec = lambda *s: jax.ShapeDtypeStruct(s, dtype)

  def fwd_bwd(q, k, v):
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    meta = attention_mask.clean_meta(jnp.zeros((b, t), jnp.int32), pos)
    dp = max(16, backend.next_pow2(d))
    bs = attention_pallas.BlockSizes.get_default(dp, dtype, device_kind).with_fields(
        '+'.join(options))
    return _vjp_of(lambda *x: attention_pallas.attention_pallas(
        *x, meta, meta, block_sizes=bs, interpret=False))(q, k, v)

  return [dict(launch, v_tile=None) for launch in
          pallas_launches(fwd_bwd, spec(b, t, h, d), spec(b, t, hkv, d), spec(b, t, hkv, d))]


def compile_report(launch, arch):
  """{'registers', 'spill_stores', 'spill_loads', 'shared_kib'} of one recorded launch."""
  if 'ttir' in launch:
    return _pallas_compile_report(launch, arch)
  from triton.compiler import ASTSource  # pylint: disable=g-import-not-at-top

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
  return _compile_and_assemble(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                               arch, launch['num_warps'], launch['num_stages'])


def pallas_launches(fn, *args):
  """The Pallas (Triton-lowered) kernels of `jax.jit(fn)(*args)` lowered for CUDA on this machine:
  [{'name', 'grid', 'num_warps', 'num_stages', 'ttir'}], ttir as text. Needs a jaxlib that leaves
  Triton compilation to XLA (<= 0.10.2, as on Python 3.11); `args` may be ShapeDtypeStructs."""
  # pylint: disable=g-import-not-at-top
  from jax._src.interpreters import mlir as jax_mlir
  from jax._src.lib import triton as jax_triton_lib
  from jax._src.lib.mlir import ir
  # pylint: enable=g-import-not-at-top
  try:
    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=('cuda',))
  except RuntimeError as e:
    raise RuntimeError('this jaxlib compiles Pallas kernels itself while lowering, which needs a '
                       'CUDA plugin: report Pallas kernels with jaxlib <= 0.10.2') from e
  calls = []

  def walk(op):
    for region in op.regions:
      for block in region.blocks:
        for inner in block.operations:
          if (inner.name == 'stablehlo.custom_call' and
              ir.StringAttr(inner.attributes['call_target_name']).value == '__gpu$xla.gpu.triton'):
            calls.append(inner)
          walk(inner)

  walk(lowered.compiler_ir('stablehlo').operation)
  context = jax_mlir.make_ir_context()
  jax_triton_lib.dialect.register_dialect(context)
  launches = []
  for call in calls:
    config = call.attributes['mhlo.backend_config']
    value = lambda key, cfg=config: ir.IntegerAttr(cfg[key]).value
    with context:
      module = ir.Module.parse(ir.StringAttr(config['ir']).value_bytes)
      ttir = module.operation.get_asm(enable_debug_info=False)
    launches.append(dict(name=ir.StringAttr(config['name']).value,
                         grid=(value('grid_x'), value('grid_y'), value('grid_z')),
                         num_warps=value('num_warps'), num_stages=value('num_stages'), ttir=ttir))
  return launches


def _pallas_compile_report(launch, arch):
  """compile_report's dict for one of `pallas_launches`: its TTIR compiled by the installed Triton
  (an estimate: on the GPU, jaxlib's own Triton build compiles it)."""
  with tempfile.NamedTemporaryFile('w', suffix='.ttir') as f:
    f.write(launch['ttir'])
    f.flush()
    return _compile_and_assemble(f.name, arch, launch['num_warps'], launch['num_stages'])


def _compile_and_assemble(source, arch, num_warps, num_stages):
  """Triton-compiles `source` (an ASTSource or a .ttir path) for sm_`arch`; ptxas's report."""
  # pylint: disable=g-import-not-at-top
  import triton
  from triton.backends.compiler import GPUTarget
  import triton.backends.nvidia as nvidia
  # pylint: enable=g-import-not-at-top
  compiled = triton.compile(source, target=GPUTarget('cuda', arch, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
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
