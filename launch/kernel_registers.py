"""Registers, spills and shared memory of the GDN and attention kernels for a GPU, without a GPU.

python -m launch.kernel_registers --device_kind="NVIDIA H200" --b=1 --t=4096
python -m launch.kernel_registers --device_kind="NVIDIA A100-SXM4-80GB"   # sm_80, its defaults
python -m launch.kernel_registers --family=pallas
python -m launch.kernel_registers --two_stream_block=4 --views=2   # the fused two-stream kernel
python -m launch.kernel_registers --family=attention --b=4 --t=12288   # flash attention (Pallas)

jax-triton family: traces forward and backward (`jax.eval_shape`, nothing runs) with a launcher
that records every `triton_call` it makes: kernel, buffer dtypes, constexprs, num_warps and
num_stages exactly as the real launches pass them (BlockSizes for `--device_kind`). Pallas kernels
(the Pallas GDN family; the attention kernels with --family=attention, causal): lowers forward
and backward for CUDA on this machine and reads each kernel's Triton IR, warps and stages out of
the lowered module (needs jaxlib <= 0.10.2, which leaves Triton compilation to XLA;
on the GPU jaxlib's own Triton build compiles it, so its figures are estimates: the two-stream
backward's shared memory came out 252 KiB here against 280 KiB on an H200).

Each launch is compiled by the installed Triton for `--arch` (by default the device kind's) and
assembled by the ptxas Triton ships, whose report gives registers per thread and spill bytes: a
register- and shared-memory check for kernel changes on a machine without a GPU (CPU-only Triton
works); shared memory past what the device kind's blocks may use is marked. Timing still needs
the GPU (launch.bench_kernels).
"""
from absl import app
from absl import flags
import jax.numpy as jnp

from launch import register_report
from launch import runtime
from pallas_kernels._common import backend
from pallas_kernels.gated_delta_rule import triton as gdr_triton

_ARCH = flags.DEFINE_integer('arch', None, 'CUDA compute capability x10 (80 A100, 86 A10 / L40, '
                             '90 H100 / H200; default: that of --device_kind, else 90).')
_KIND = flags.DEFINE_string('device_kind', 'NVIDIA H200',
                            'Device kind whose BlockSizes defaults to compile with.')
_B = flags.DEFINE_integer('b', 1, 'Batch.')
_T = flags.DEFINE_integer('t', 4096, 'Sequence length.')
_HEADS = flags.DEFINE_integer('heads', 16, 'Key heads.')
_VALUE_HEADS = flags.DEFINE_integer('value_heads', 16, 'Value heads (a multiple of --heads).')
_DK = flags.DEFINE_integer('dk', 128, 'Key head size.')
_DV = flags.DEFINE_integer('dv', 128, 'Value head size.')
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float16', 'float32'], 'q, k, v.')
_FAMILY = flags.DEFINE_enum('family', 'triton', ['triton', 'pallas', 'attention'],
                            'GDN kernel family, or the (Pallas) flash attention kernels.')
_KV_HEADS = flags.DEFINE_integer('kv_heads', 4, 'Key/value heads (--family=attention; query heads '
                                 'are --heads).')
_HEAD_DIM = flags.DEFINE_integer('head_dim', 256, 'Head size (--family=attention).')
_ATTENTION_OPTIONS = flags.DEFINE_list(
    'attention_options', [], '--family=attention: BlockSizes fields, FIELD[=N] each '
    '(dkdv_per_q_head: the per-query-head dk/dv kernel).')
_RESETS = flags.DEFINE_bool('resets', False, 'With document resets (segment ids).')
_TWO_STREAM = flags.DEFINE_integer(
    'two_stream_block', 0, 'Report the fused two-stream kernel (two_stream_triton) for this '
    'max block size instead of the chunked family.')
_VIEWS = flags.DEFINE_integer('views', 2, 'Noisy views (with --two_stream_block).')


def main(argv):
  del argv
  if not hasattr(gdr_triton._kernels()['intra'], 'params'):  # pylint: disable=protected-access
    raise app.UsageError('the kernels were built for the Triton interpreter: unset '
                         'TRITON_INTERPRET')
  if _FAMILY.value == 'attention':
    launches = register_report.record_attention_launches(
        _B.value, _T.value, _HEADS.value, _KV_HEADS.value, _HEAD_DIM.value,
        jnp.dtype(_DTYPE.value), _KIND.value, _ATTENTION_OPTIONS.value)
  elif _TWO_STREAM.value:
    launches = register_report.record_two_stream_launches(
        _FAMILY.value, _B.value, _T.value, _VIEWS.value, _HEADS.value, _VALUE_HEADS.value,
        _DK.value, _DV.value, jnp.dtype(_DTYPE.value), _TWO_STREAM.value,
        device_kind=_KIND.value)
  else:
    launches = register_report.record_launches(
        _FAMILY.value, _B.value, _T.value, _HEADS.value, _VALUE_HEADS.value, _DK.value,
        _DV.value, jnp.dtype(_DTYPE.value), _RESETS.value, _KIND.value)
  if _FAMILY.value == 'attention':
    problem = f'Hkv={_KV_HEADS.value} D={_HEAD_DIM.value}, causal'
  else:
    problem = (f'HV={_VALUE_HEADS.value} K={_DK.value} V={_DV.value}'
               f'{" with resets" if _RESETS.value else ""}')
  generation = backend.gpu_generation(_KIND.value)
  arch = _ARCH.value or backend.ARCH.get(generation, 90)
  shared_kib = backend.SHARED_KIB.get(generation)
  print(f'{_FAMILY.value} family, sm_{arch}, BlockSizes for {_KIND.value!r}: '
        f'B={_B.value} T={_T.value} H={_HEADS.value} {problem} {_DTYPE.value}')
  print('| kernel | grid | warps | stages | V tile | registers | spill stores B | spill loads B | '
        'shared KiB |')
  print('|---|---|---|---|---|---|---|---|---|')
  for launch in launches:
    rep = register_report.compile_report(launch, arch)
    over = shared_kib is not None and rep['shared_kib'] > shared_kib
    print(f"| {launch['name']} | {tuple(launch['grid'])} | {launch['num_warps']} | "
          f"{launch['num_stages']} | {launch['v_tile'] or '-'} | {rep['registers']} | "
          f"{rep['spill_stores']} | {rep['spill_loads']} | {rep['shared_kib']:.0f}"
          f"{f' (over its {shared_kib} KiB)' if over else ''} |", flush=True)


if __name__ == '__main__':
  runtime.run(main)
