"""launch.kernel_registers: every fused two-stream Triton kernel compiles for sm_90a (CPU).

Triton's interpreter, which runs the kernels in the CPU tests, checks their algebra but not their
types: a loop-carried value whose dtype changes in the loop, say, runs there and fails only
Triton's compiler. This builds each kernel for the GPU as the device would (Triton to PTX, then
ptxas), at a small shape, in a process without TRITON_INTERPRET.
"""
import subprocess
import sys

import pytest

pytest.importorskip('triton')

_TWO_STREAM = ['noisy_kernel', 'noisy_dvn_kernel', 'noisy_seed_rows_kernel',
               'noisy_seed_ctx_kernel', 'noisy_bwd_kernel']


# bf16 at 16-row tiles takes the lean walks beside the banded ones; fp32 at block 20, 32-row tiles
# (banded walks only) and the fp32 products.
@pytest.mark.parametrize('dtype, block', [('bfloat16', 4), ('float32', 20)])
def test_two_stream_kernels_compile_for_hopper(one_cpu_device_env, dtype, block):
  env = {k: v for k, v in one_cpu_device_env.items() if k != 'TRITON_INTERPRET'}
  run = subprocess.run(
      [sys.executable, '-m', 'launch.kernel_registers', f'--two_stream_block={block}',
       '--views=2', '--t=100', '--heads=2', '--value_heads=2', '--dk=32', '--dv=32',
       f'--dtype={dtype}'],
      capture_output=True, text=True, timeout=600, env=env)
  assert run.returncode == 0, run.stderr[-3000:]
  rows = [line.split('|')[1].strip() for line in run.stdout.splitlines()
          if line.startswith('| ') and not line.startswith('| kernel')]
  assert [r for r in rows if r.startswith('noisy')] == _TWO_STREAM
  for line in run.stdout.splitlines():
    if line.startswith('| noisy'):
      registers = int(line.split('|')[6])
      assert 0 < registers <= 255, line
