"""Helpers shared by the launch/bench_* scripts: timing, one case per subprocess, JSON results."""
import collections
import glob
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

_RESULT = 'RESULT '


def median_ms(fn: Callable[[], Any], sync: Callable[[Any], Any], warmup: int,
              repeats: int) -> float:
  """Median wall time in ms of `repeats` calls of fn (each synced with `sync`), after `warmup`."""
  for _ in range(warmup):
    sync(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    sync(fn())
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


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


def run_child(argv: list[str], timeout: int, labels: dict[str, Any]) -> dict[str, Any]:
  """Runs one benchmark case in a subprocess and returns its `print_result` dict (+ wall_s).

  On a timeout or a crash, returns `labels` with an 'error' (the last lines of the output), so one
  failing case never hides the others.
  """
  t0 = time.time()
  try:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env=child_env(), check=False)
  except subprocess.TimeoutExpired:
    return dict(labels, error=f'timeout after {timeout} s')
  for line in proc.stdout.splitlines():
    if line.startswith(_RESULT):
      res = json.loads(line[len(_RESULT):])
      res['wall_s'] = round(time.time() - t0, 1)
      return res
  tail = (proc.stdout + proc.stderr).strip().splitlines()[-12:]
  return dict(labels, error=' | '.join(tail))


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


def jax_kernel_profile(fn: Callable[[], Any], calls: int = 3, top: int = 15) -> list[list[Any]]:
  """`top_kernels` of the GPU kernels that `calls` calls of fn launch (fn already compiled).

  Traces with jax.profiler and reads the device planes' stream lines back with
  `jax.profiler.ProfileData`; an empty list when the trace holds no device kernels (CPU).
  """
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
            events.extend((ev.name, ev.duration_ns) for ev in line.events)
  return top_kernels(events, calls, top)


def kernel_table(kernels: list[list[Any]]) -> str:
  """Markdown rows of a `top_kernels` list."""
  lines = ['| kernel | ms / call | launches / call |', '|---|---|---|']
  lines += [f'| `{name}` | {ms:.3f} | {n:g} |' for name, ms, n in kernels]
  return '\n'.join(lines)
