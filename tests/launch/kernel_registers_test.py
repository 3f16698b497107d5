"""launch.kernel_registers: the chunked GDN kernels and every fused two-stream Triton kernel
compile, with ptxas's report (CPU).

Triton's interpreter, which runs the kernels in the CPU tests, checks their algebra but not their
types: a loop-carried value whose dtype changes in the loop, say, runs there and fails only
Triton's compiler. This builds each kernel for the GPU as the device would (Triton to PTX, then
ptxas), at a small shape, in a process without TRITON_INTERPRET: besides, Triton 3.6's interpreter
leaves triton.language patched once a kernel has called a jitted helper, after which compiling
in that process fails (cold Triton cache only).
"""
import subprocess
import sys

import pytest

from pallas_kernels._common import backend

pytest.importorskip('triton')

_TWO_STREAM = ['noisy_kernel', 'noisy_dvn_kernel', 'noisy_seed_rows_kernel',
               'noisy_seed_ctx_kernel', 'noisy_bwd_kernel']


def _report(env, *flags):
  """kernel_registers' table for `flags`, a row per launch in launch order: (kernel, [grid,
  warps, stages, V tile, registers, spill stores, spill loads, shared KiB])."""
  env = {k: v for k, v in env.items() if k != 'TRITON_INTERPRET'}
  run = subprocess.run([sys.executable, '-m', 'launch.kernel_registers', *flags],
                       capture_output=True, text=True, timeout=600, env=env)
  assert run.returncode == 0, run.stderr[-3000:]
  rows = [[c.strip() for c in line.split('|')[1:-1]] for line in run.stdout.splitlines()
          if line.startswith('| ') and not line.startswith('| kernel')]
  return [(row[0], row[1:]) for row in rows]


def test_chunked_kernels_compile_with_a_ptxas_report(one_cpu_device_env):
  rows = dict(_report(one_cpu_device_env, '--arch=80', '--t=64', '--heads=1', '--value_heads=1',
                      '--dk=16', '--dv=16'))
  assert set(rows) == {'intra_kernel', 'state_pass_kernel', 'output_kernel', 'dv_local_kernel',
                       'dhu_kernel', 'bwd_chunk_kernel'}
  registers, spill_stores, shared_kib = (rows['dv_local_kernel'][i] for i in (4, 5, 7))
  # A 64x16 tile kernel: well under the 255-register cap, nothing spilled.
  assert 16 < int(registers) < 255 and int(spill_stores) == 0 and float(shared_kib) > 0


def test_ampere_defaults_keep_ptxas_out_of_its_32_register_mode(one_cpu_device_env):
  """At the Hopper launch, sm_80 code (mma.sync) of the output kernel and the per-chunk backward
  makes ptxas fall back to 32 registers and spill 11-20 KB per thread; the Ampere / Ada
  defaults (`configs.BlockSizes.get_default`) must not (K = V = 128, bf16, as Qwen3.5's GDN)."""
  rows = _report(one_cpu_device_env, '--arch=80', '--t=128', '--heads=1', '--value_heads=1',
                 '--device_kind=NVIDIA A100-SXM4-80GB')
  assert {name for name, _ in rows} == {'intra_kernel', 'state_pass_kernel', 'output_kernel',
                                        'dv_local_kernel', 'dhu_kernel', 'bwd_chunk_kernel'}
  for name, cols in rows:
    registers, spill_stores = int(cols[4]), int(cols[5])
    assert registers > 32 and spill_stores <= 2048, (name, cols)


@pytest.mark.parametrize('kind', ['NVIDIA A100-SXM4-80GB', 'NVIDIA L40S'])
def test_attention_defaults_before_hopper_fit_and_do_not_spill_much(one_cpu_device_env, kind):
  """Qwen3.5's softmax layers (bf16, D = 256), compiled for the card's generation (sm_80, sm_86):
  every attention kernel at the card's defaults fits its shared memory per block, and ptxas does
  not fall back to a register cap below 255 with kilobytes of spills (the forward at the Hopper
  tiles on sm_80: 128 registers, 6 KB)."""
  rows = _report(one_cpu_device_env, '--family=attention', f'--device_kind={kind}', '--b=1',
                 '--t=256')
  assert [name for name, _ in rows] == ['flash_attention_fwd', 'flash_attention_dq',
                                        'flash_attention_dkdv']
  shared_kib = backend.SHARED_KIB[backend.gpu_generation(kind)]
  for name, cols in rows:
    spill_stores, kib = int(cols[5]), cols[7]
    assert spill_stores <= 512 and 'over' not in kib and float(kib) <= shared_kib, (name, cols)


def test_the_report_marks_shared_memory_past_the_cards(one_cpu_device_env):
  rows = dict(_report(one_cpu_device_env, '--family=attention', '--device_kind=NVIDIA L40S',
                      '--attention_options=block_q=128', '--b=1', '--t=256'))
  assert rows['flash_attention_fwd'][7].endswith('(over its 99 KiB)')


# bf16 at 16-row tiles takes the lean walks beside the banded ones; fp32 at block 20, 32-row tiles
# (banded walks only) and the fp32 products.
@pytest.mark.parametrize('dtype, block', [('bfloat16', 4), ('float32', 20)])
def test_two_stream_kernels_compile_for_hopper(one_cpu_device_env, dtype, block):
  rows = _report(one_cpu_device_env, f'--two_stream_block={block}', '--views=2', '--t=100',
                 '--heads=2', '--value_heads=2', '--dk=32', '--dv=32', f'--dtype={dtype}')
  noisy = [(name, cols) for name, cols in rows if name.startswith('noisy')]
  assert [name for name, _ in noisy] == _TWO_STREAM
  for name, cols in noisy:
    assert 0 < int(cols[4]) <= 255, (name, cols)
