"""Helpers shared by the launch/bench_* scripts: timing, one case per subprocess, JSON results."""
import json
import os
import statistics
import subprocess
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


def run_child(argv: list[str], timeout: int, labels: dict[str, Any]) -> dict[str, Any]:
  """Runs one benchmark case in a subprocess and returns its `print_result` dict (+ wall_s).

  On a timeout or a crash, returns `labels` with an 'error' (the last lines of the output), so one
  failing case never hides the others.
  """
  t0 = time.time()
  try:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ), check=False)
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
  """Writes results to `path` (no-op for an empty path)."""
  if path:
    with open(path, 'w') as f:
      json.dump(results, f, indent=1)
