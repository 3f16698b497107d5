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
