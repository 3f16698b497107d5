"""Helpers shared by the launch/bench_* scripts: timing, one case per subprocess, JSON results."""
import collections
import glob
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

_RESULT = 'RESULT '


def define_back_to_back_flag():
  """The --back_to_back flag of the kernel benchmarks (see `median_ms`)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  return flags.DEFINE_integer(
      'back_to_back', 10, 'Calls issued back to back per timing and synced once; the time per '
      'call is reported (1: every call synced, i.e. latency including host dispatch).')


def timing_note(repeats: int, warmup: int, back_to_back: int) -> str:
  """How the table's times were taken, for its header."""
  per = ('each call synced' if back_to_back == 1
         else f'per call of {back_to_back} issued back to back')
  return f'median of {repeats} timings ({per}) after {warmup} warm-up calls'


def median_ms(fn: Callable[[], Any], sync: Callable[[Any], Any], warmup: int,
              repeats: int, back_to_back: int = 1) -> float:
  """Median over `repeats` timings of the wall time per call in ms, after `warmup` calls.

  back_to_back=1 times single calls, each synced (`sync`): latency, host dispatch included.
  back_to_back=n times n calls issued back to back and synced once (each result is dropped
  before the next call, so memory stays that of one call), divided by n: with asynchronous
  dispatch the host's work overlaps the device's, as inside a training loop, so short kernels are
  no longer timed with their dispatch (on an H200 the clean GDN forward measured 0.5-0.8 ms
  synced per call against a 0.25 ms GPU span).
  """
  for _ in range(warmup):
    sync(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(back_to_back):
      out = None  # drop the previous result before the next call: memory of one call at a time
      out = fn()
    sync(out)
    times.append((time.perf_counter() - t0) * 1e3 / back_to_back)
  return statistics.median(times)


def hbm_bandwidths(buffer_mib: int) -> tuple[float, float]:
  """Best measured device streaming bandwidths in bytes/s over a buffer of `buffer_mib` MiB:
  (copy: read + write of it, read: a sum over it)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jnp.ones((buffer_mib, 256, 1024), jnp.float32)
  return (_best_rate(jax.jit(lambda a: a * 1.0001), x, 2 * x.nbytes),
          _best_rate(jax.jit(jnp.sum), x, x.nbytes))


def _best_rate(f, x, bytes_per_call: int) -> float:
  """bytes_per_call x calls / seconds at f(x)'s best of three runs of 20 calls."""
  for _ in range(3):  # warm-up: compile and let clocks settle
    f(x).block_until_ready()
  best = 0.0
  for _ in range(3):
    t0 = time.perf_counter()
    for _ in range(20):
      y = f(x)
    y.block_until_ready()
    best = max(best, bytes_per_call * 20 / (time.perf_counter() - t0))
  return best


def marginal_step(seconds: float, passes: float, base_seconds: float,
                  base_passes: float) -> dict:
  """{'step_ms', 'fixed_ms'}: the slope and intercept of wall time over passes through two calls
  (`seconds` for `passes`, `base_seconds` for fewer `base_passes`). Both NaN when the longer call
  was not the slower one: its timings cannot resolve a step."""
  step = (seconds - base_seconds) / max(passes - base_passes, 1)
  if not step > 0:
    return dict(step_ms=math.nan, fixed_ms=math.nan)
  return dict(step_ms=1e3 * step, fixed_ms=1e3 * (base_seconds - base_passes * step))


def print_result(result: dict[str, Any]) -> None:
  """A child process's answer to `run_child` (one line on stdout)."""
  print(_RESULT + json.dumps(result), flush=True)


def child_env() -> dict[str, str]:
  """This process's environment for a child process, less an empty TRITON_CACHE_DIR.

  Importing jax_triton sets TRITON_CACHE_DIR="" in its own process (to turn Triton's cache off
  there); a child inheriting it cannot compile any Triton kernel ("Could not create or locate
  cache dir"), which broke transformers' generate (fla kernels) beside our sampler.
  """
  env = dict(os.environ)
  if not env.get('TRITON_CACHE_DIR', '').strip():
    env.pop('TRITON_CACHE_DIR', None)
  return env


def run_child(argv: list[str], timeout: int, labels: dict[str, Any],
              env: dict[str, str] | None = None) -> dict[str, Any]:
  """Runs one benchmark case in a subprocess (environment `env`, default `child_env()`) and
  returns its `print_result` dict (+ wall_s).

  On a timeout or a crash, returns `labels` with an 'error' (the last lines of the output), so one
  failing case never hides the others.
  """
  t0 = time.time()
  try:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env=child_env() if env is None else env, check=False)
  except subprocess.TimeoutExpired:
    return dict(labels, error=f'timeout after {timeout} s')
  for line in proc.stdout.splitlines():
    if line.startswith(_RESULT):
      res = json.loads(line[len(_RESULT):])
      res['wall_s'] = round(time.time() - t0, 1)
      return res
  tail = (proc.stdout + proc.stderr).strip().splitlines()[-12:]
  return dict(labels, error=' | '.join(tail))


def with_xla_flags(env: dict[str, str], flags_text: str) -> dict[str, str]:
  """`env` with `flags_text` (space-separated XLA flags; '' or 'default': none) added after its
  XLA_FLAGS, so they win over the same flags set there."""
  extra = '' if flags_text.strip() == 'default' else flags_text.strip()
  merged = ' '.join(x for x in (env.get('XLA_FLAGS', '').strip(), extra) if x)
  env = dict(env)
  if merged:
    env['XLA_FLAGS'] = merged
  return env


def run_xla_variants(module: str, variants: list[str], timeout: int, out_path: str,
                     drop: tuple[str, ...] = ()) -> list[dict[str, Any]]:
  """Reruns `python -m module` once per XLA flag set (`with_xla_flags`), each in a child process
  given this process's flags plus --child, less --xla_variants, --variant_timeout, --out and
  `drop`. The child answers `print_result({'rows': [...]})`; returns every child's rows labelled
  xla=<flag set>, or one row with an 'error' for a child that failed, recording each (`record`)."""
  own = ('--xla_variants', '--variant_timeout', '--out', '--child', *drop)
  argv = [sys.executable, '-m', module, '--child',
          *(a for a in sys.argv[1:] if not a.startswith(own))]
  rows = []
  for flags_text in variants:
    print(f'XLA flags {flags_text!r}: measuring in a child process ...', flush=True)
    res = run_child(argv, timeout, {}, env=with_xla_flags(child_env(), flags_text))
    if 'error' in res:
      record(rows, dict(xla=flags_text, error=res['error']), out_path)
    for row in res.get('rows', []):
      record(rows, dict(row, xla=flags_text), out_path)
  return rows


def xla_variants(text: str) -> list[str]:
  """The ';'-separated flag sets of an --xla_variants flag (empty: none)."""
  return [v.strip() for v in text.split(';') if v.strip()]


def time_ratios(row: dict[str, Any], base: dict[str, Any], modes: list[str]) -> str:
  """'fwd 1.25x, fwdbwd 1.30x': row's `{mode}_ms` / base's, for the modes both rows timed."""
  keys = [f'{mode}_ms' for mode in modes]
  return ', '.join(f'{key[:-3]} {row[key] / base[key]:.2f}x' for key in keys
                   if row.get(key) and base.get(key))


def fmt(x: float | None, spec: str = '.2f') -> str:
  return '-' if x is None else format(x, spec)


def write_json(path: str, results: Any) -> None:
  """Writes results to `path` (no-op for an empty path), whole or not at all (temp + rename)."""
  if path:
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
      json.dump(results, f, indent=1)
    os.replace(tmp, path)


def record(results: list[Any], res: Any, path: str) -> None:
  """Appends one finished case, prints it as a JSON line and rewrites `path` with every case so
  far: a run killed part-way (a device time limit) keeps what it measured."""
  results.append(res)
  print(json.dumps(res), flush=True)
  write_json(path, results)


def compare_to_xla(rows: list[dict[str, Any]], outputs: dict[str, np.ndarray]) -> None:
  """Adds to each row (keyed by 'impl', with 'us_per_call') 'vs_xla', its time over the xla row's
  (rows[0]: xla runs first when asked for), and 'max_diff_vs_xla', the largest difference of its
  `outputs` from xla's relative to xla's largest; None without an xla row."""
  ref = outputs.get('xla')
  for row in rows:
    row['vs_xla'] = row['max_diff_vs_xla'] = None
    if ref is not None:
      row['vs_xla'] = row['us_per_call'] / rows[0]['us_per_call']
      row['max_diff_vs_xla'] = float(np.max(np.abs(outputs[row['impl']] - ref))
                                     / (np.max(np.abs(ref)) + 1e-30))


def top_kernels(events: list[tuple[str, float]], calls: int, top: int) -> list[list[Any]]:
  """[[kernel, ms per call, launches per call], ...] for the `top` kernels by total time.

  Args:
    events: (kernel name, duration in ns) of every kernel launch recorded over `calls` calls.
  """
  total = collections.defaultdict(float)
  count = collections.Counter()
  for name, ns in events:
    total[name] += ns
    count[name] += 1
  ranked = sorted(total, key=total.get, reverse=True)[:top]
  return [[name[:120], total[name] / calls / 1e6, count[name] / calls] for name in ranked]


def device_timeline(intervals: list[tuple[int, int]], calls: int) -> dict[str, float]:
  """How busy the GPU was within each of `calls` calls, from its kernels' (start, end) in ns.

  Calls are told apart by the `calls - 1` widest idle gaps (the host waits for each call to finish
  before the next starts). Per call: span (first kernel start to last kernel end), busy (the union
  of kernel intervals over all streams), their difference idle, the widest idle gap, and launches;
  the median of each over the calls, in ms.
  """
  if not intervals:
    return {}
  segments = []  # merged busy segments [start, end, launches]
  for start, end in sorted(intervals):
    if segments and start <= segments[-1][1]:
      segments[-1][1] = max(segments[-1][1], end)
      segments[-1][2] += 1
    else:
      segments.append([start, end, 1])
  gaps = [segments[i + 1][0] - segments[i][1] for i in range(len(segments) - 1)]
  cuts = sorted(sorted(range(len(gaps)), key=gaps.__getitem__)[len(gaps) - calls + 1:])
  per_call = []
  for lo, hi in zip([0] + [c + 1 for c in cuts], [c + 1 for c in cuts] + [len(segments)]):
    group = segments[lo:hi]
    span = group[-1][1] - group[0][0]
    busy = sum(end - start for start, end, _ in group)
    per_call.append(dict(span_ms=span / 1e6, busy_ms=busy / 1e6, idle_ms=(span - busy) / 1e6,
                         widest_gap_ms=max(gaps[lo:hi - 1], default=0) / 1e6,
                         launches=sum(n for _, _, n in group)))
  return {k: statistics.median(c[k] for c in per_call) for k in per_call[0]}


def _jax_device_kernels(fn: Callable[[], Any], calls: int) -> list[tuple[str, int, int]]:
  """(name, start ns, end ns) of every GPU kernel and copy that `calls` calls of fn launch (fn
  already compiled), each call waited for; traced with jax.profiler and read back with
  `jax.profiler.ProfileData` from the device planes' stream lines (none on CPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      for _ in range(calls):
        jax.block_until_ready(fn())
    files = glob.glob(os.path.join(tmp, '**', '*.xplane.pb'), recursive=True)
    events = []
    for path in files:
      for plane in jax.profiler.ProfileData.from_file(path).planes:
        if not plane.name.startswith('/device:'):
          continue
        for line in plane.lines:
          if line.name.startswith('Stream'):  # kernels and copies, one line per CUDA stream
            events.extend((ev.name, ev.start_ns, ev.end_ns) for ev in line.events)
  return events


def jax_kernel_profile(fn: Callable[[], Any], calls: int = 3, top: int = 15
                       ) -> tuple[list[list[Any]], dict[str, float]]:
  """(`top_kernels`, `device_timeline`) of `calls` calls of fn (already compiled); ([], {}) when
  the trace holds no device kernels (CPU)."""
  events = _jax_device_kernels(fn, calls)
  return (top_kernels([(name, end - start) for name, start, end in events], calls, top),
          device_timeline([(start, end) for _, start, end in events], calls))


def timeline_line(timeline: dict[str, float], wall_ms: float | None = None, per: str = 'call'
                  ) -> str:
  """One line of a `device_timeline`, with the measured wall time per call beside it."""
  if not timeline:
    return 'no device kernels recorded'
  wall = '' if wall_ms is None else f'; wall {wall_ms:.3f} ms'
  return (f"GPU per {per}: span {timeline['span_ms']:.3f} ms, busy {timeline['busy_ms']:.3f}, "
          f"idle {timeline['idle_ms']:.3f} (widest gap {timeline['widest_gap_ms']:.3f}), "
          f"{timeline['launches']:g} launches{wall}")


def profile_report(result: dict[str, Any], mode: str, title: str) -> str:
  """The `--profile` section of one result's timed mode (its `{mode}_timeline` and
  `{mode}_kernels`, beside `{mode}_ms`) under `title`; '' when it was not profiled."""
  if not result.get(f'{mode}_kernels'):
    return ''
  return '\n'.join([f'\n{title}:', timeline_line(result[f'{mode}_timeline'],
                                                  result.get(f'{mode}_ms')),
                    kernel_table(result[f'{mode}_kernels'])])


def kernel_table(kernels: list[list[Any]]) -> str:
  """Markdown rows of a `top_kernels` list."""
  lines = ['| kernel | ms / call | launches / call |', '|---|---|---|']
  lines += [f'| `{name}` | {ms:.3f} | {n:g} |' for name, ms, n in kernels]
  return '\n'.join(lines)
