"""Latency and peak device memory of the chunked gated delta rule: xla, pallas, triton and fla.

python -m launch.bench_kernels --shapes=1x4096,8x4096,4x16384 --impls=xla,pallas,triton,fla

Every (implementation, shape) case runs in its own subprocess, so peak memory is per case and JAX
never shares a process with PyTorch (JAX preallocates GPU memory; fla's platform check fails beside
it).
A case reports the time per call (`bench_util.median_ms`: median of `--repeats` timings of
`--back_to_back` calls issued back to back, synced by `block_until_ready` /
`torch.cuda.synchronize`, after `--warmup` calls) for the forward alone and for forward + backward
(gradients of q, k, v, g, beta for a random output cotangent), and the peak bytes in use after each.
Inputs: `launch.gdn_cases.random_inputs` (the same distributions for fla).

fla (PyTorch) refuses its gated backward on Hopper with Triton < 3.7.1 (fla issue #640, a Triton
miscompile of chunk_bwd_dqkwg); for timing only, this script bypasses that guard
(`fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True`) and says so in its output.
"""
import sys

from absl import flags

from launch import bench_util
from launch import runtime

_SHAPES = flags.DEFINE_list('shapes', ['1x4096', '8x4096', '4x16384'], 'BxT cases.')
_IMPLS = flags.DEFINE_list('impls', ['xla', 'pallas', 'triton', 'fla'],
                           'Implementations: xla, pallas, triton (JAX api) and fla (PyTorch).')
_HEADS = flags.DEFINE_integer('heads', 16, 'Heads (H = HV).')
_DK = flags.DEFINE_integer('dk', 128, 'Key head size.')
_DV = flags.DEFINE_integer('dv', 128, 'Value head size.')
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32'], 'q, k, v dtype.')
_REPEATS = flags.DEFINE_integer('repeats', 10, 'Timed calls per measurement (median reported).')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed calls first (compile, autotune).')
_BACK_TO_BACK = bench_util.define_back_to_back_flag()
_MODES = flags.DEFINE_list('modes', ['fwd', 'fwdbwd'], 'What to time: fwd and/or fwdbwd.')
_TIMEOUT = flags.DEFINE_integer('timeout', 600, 'Seconds per case subprocess.')
_OUT = flags.DEFINE_string('out', '', 'Optional JSON file for the results.')
_PROFILE = flags.DEFINE_bool('profile', False,
                             'Also list each case\'s top GPU kernels in its fwd+bwd call.')
_CHILD = flags.DEFINE_string('child', '', 'Internal: run one case "impl:B:T" and print RESULT.')

_GIB = 1024 ** 3


def _jax_case(impl, b, t):
  """One JAX implementation through the api; returns the result dict."""
  import jax  # pylint: disable=g-import-not-at-top
  from launch import gdn_cases  # pylint: disable=g-import-not-at-top

  args, do = gdn_cases.random_inputs(b, t, _HEADS.value, _DK.value, _DV.value, _DTYPE.value)
  fwd, fwdbwd = gdn_cases.jitted_calls(impl)
  dev = jax.devices()[0]
  peak = lambda: (dev.memory_stats() or {}).get('peak_bytes_in_use', 0) / _GIB
  res = {'impl': impl, 'B': b, 'T': t, 'device': dev.device_kind, 'jax': jax.__version__}
  if 'fwd' in _MODES.value:
    res['fwd_ms'] = bench_util.median_ms(lambda: fwd(*args), jax.block_until_ready,
                                         _WARMUP.value, _REPEATS.value, _BACK_TO_BACK.value)
    res['fwd_peak_gib'] = peak()
  if 'fwdbwd' in _MODES.value:
    res['fwdbwd_ms'] = bench_util.median_ms(lambda: fwdbwd(*args, do), jax.block_until_ready,
                                            _WARMUP.value, _REPEATS.value, _BACK_TO_BACK.value)
    res['peak_gib'] = peak()
    if _PROFILE.value:
      res['kernels'], res['timeline'] = bench_util.jax_kernel_profile(lambda: fwdbwd(*args, do))
  return res


def _torch_kernel_profile(fn, calls=3, top=15):
  """bench_util.top_kernels of the CUDA kernels `calls` calls of fn launch (torch.profiler)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch.profiler import profile, ProfilerActivity  # pylint: disable=g-import-not-at-top
  with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(calls):
      fn()
    torch.cuda.synchronize()
  events = [(e.name, e.time_range.elapsed_us() * 1e3) for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA]
  return bench_util.top_kernels(events, calls, top)


def _fla_case(b, t):
  """fla's chunk_gated_delta_rule (PyTorch) with the Hopper guard bypassed for timing."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  import fla  # pylint: disable=g-import-not-at-top
  import fla.ops.common.chunk_o as chunk_o  # pylint: disable=g-import-not-at-top
  from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # pylint: disable=g-import-not-at-top

  bypassed = not chunk_o.TRITON_ABOVE_3_7_1
  chunk_o.TRITON_ABOVE_3_7_1 = True  # fla #640 guard (speed only; see the module docstring)
  h, dk, dv = _HEADS.value, _DK.value, _DV.value
  dtype = getattr(torch, _DTYPE.value)
  dev = 'cuda'
  torch.manual_seed(0)
  q = F.normalize(torch.randn(b, t, h, dk, device=dev), dim=-1).to(dtype).requires_grad_()
  k = F.normalize(torch.randn(b, t, h, dk, device=dev), dim=-1).to(dtype).requires_grad_()
  v = torch.randn(b, t, h, dv, device=dev).to(dtype).requires_grad_()
  g = F.logsigmoid(torch.rand(b, t, h, device=dev)).requires_grad_()
  beta = torch.rand(b, t, h, device=dev).sigmoid().requires_grad_()
  do = torch.randn(b, t, h, dv, device=dev).to(dtype)
  sync = lambda _: torch.cuda.synchronize()

  def fwd():
    with torch.no_grad():
      return chunk_gated_delta_rule(q, k, v, g, beta)[0]

  def fwdbwd():
    for x in (q, k, v, g, beta):
      x.grad = None
    o = chunk_gated_delta_rule(q, k, v, g, beta)[0]
    o.backward(do)

  res = {'impl': 'fla', 'B': b, 'T': t, 'device': torch.cuda.get_device_name(),
         'fla': getattr(fla, '__version__', '?'), 'guard_bypassed': bypassed}
  if 'fwd' in _MODES.value:
    torch.cuda.reset_peak_memory_stats()
    res['fwd_ms'] = bench_util.median_ms(fwd, sync, _WARMUP.value, _REPEATS.value,
                                         _BACK_TO_BACK.value)
    res['fwd_peak_gib'] = torch.cuda.max_memory_allocated() / _GIB
  if 'fwdbwd' in _MODES.value:
    torch.cuda.reset_peak_memory_stats()
    res['fwdbwd_ms'] = bench_util.median_ms(fwdbwd, sync, _WARMUP.value, _REPEATS.value,
                                            _BACK_TO_BACK.value)
    res['peak_gib'] = torch.cuda.max_memory_allocated() / _GIB
    if _PROFILE.value:
      res['kernels'] = _torch_kernel_profile(fwdbwd)
  return res


def _run_child(spec):
  impl, b, t = spec.split(':')
  b, t = int(b), int(t)
  res = _fla_case(b, t) if impl == 'fla' else _jax_case(impl, b, t)
  bench_util.print_result(res)


def _spawn(impl, b, t):
  argv = [sys.executable, '-m', 'launch.bench_kernels', f'--child={impl}:{b}:{t}']
  for flag in (_HEADS, _DK, _DV, _DTYPE, _REPEATS, _WARMUP, _BACK_TO_BACK, _PROFILE):
    argv.append(f'--{flag.name}={flag.value}')
  argv.append(f'--modes={",".join(_MODES.value)}')
  return bench_util.run_child(argv, _TIMEOUT.value, {'impl': impl, 'B': b, 'T': t})


def _table(results):
  fla = {(r['B'], r['T']): r for r in results if r['impl'] == 'fla' and 'error' not in r}
  head = ('| impl | B | T | fwd ms | fwd+bwd ms | peak GiB | fwd / fla | fwd+bwd / fla | '
          'peak / fla |')
  lines = [head, '|' + '---|' * 9]
  ratio = lambda r, ref, key: (r.get(key) / ref[key] if ref and r.get(key) and ref.get(key)
                               else None)
  for r in results:
    if 'error' in r:
      lines.append(f"| {r['impl']} | {r['B']} | {r['T']} | error: {r['error'][:300]} |")
      continue
    ref = fla.get((r['B'], r['T']))
    lines.append(
        f"| {r['impl']} | {r['B']} | {r['T']} | {bench_util.fmt(r.get('fwd_ms'))} | "
        f"{bench_util.fmt(r.get('fwdbwd_ms'))} | {bench_util.fmt(r.get('peak_gib'))} | "
        f"{bench_util.fmt(ratio(r, ref, 'fwd_ms'))} | "
        f"{bench_util.fmt(ratio(r, ref, 'fwdbwd_ms'))} | "
        f"{bench_util.fmt(ratio(r, ref, 'peak_gib'))} |")
  return '\n'.join(lines)


def main(argv):
  del argv
  if _CHILD.value:
    _run_child(_CHILD.value)
    return
  results = []
  for shape in _SHAPES.value:
    b, t = (int(x) for x in shape.lower().split('x'))
    for impl in _IMPLS.value:
      res = _spawn(impl, b, t)
      bench_util.record(results, res, _OUT.value)
  print(f'\nH={_HEADS.value} dk={_DK.value} dv={_DV.value} {_DTYPE.value}; '
        f'{bench_util.timing_note(_REPEATS.value, _WARMUP.value, _BACK_TO_BACK.value)}; '
        f'ratios are impl / fla (lower is better).')
  if any(r.get('guard_bypassed') for r in results):
    print('fla: Hopper guard for Triton < 3.7.1 (fla #640) bypassed for timing.')
  print(_table(results))
  for r in results:
    if r.get('kernels'):
      print(f"\nTop GPU kernels, {r['impl']} {r['B']}x{r['T']} fwd+bwd:")
      if r.get('timeline'):
        print(bench_util.timeline_line(r['timeline'], r.get('fwdbwd_ms')))
      print(bench_util.kernel_table(r['kernels']))


if __name__ == '__main__':
  runtime.run(main)
