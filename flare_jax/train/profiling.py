"""A jax.profiler trace of a window of training steps (`train.profile_steps`)."""
import os

import jax


def parse_profile_steps(spec: str, num_steps: int) -> tuple[int, int] | None:
  """'FIRST:LAST' (1-based step numbers as the log prints them, inclusive) -> (first, last);
  '' -> None.

  Raises:
    ValueError: the spec is malformed or names no step of the run.
  """
  if not spec:
    return None
  parts = spec.split(':')
  try:
    first, last = (int(p) for p in parts)
  except ValueError:
    raise ValueError(f"train.profile_steps must be 'FIRST:LAST' (e.g. '20:25'), got {spec!r}"
                     ) from None
  if not 1 <= first <= last:
    raise ValueError(f'train.profile_steps needs 1 <= FIRST <= LAST, got {spec!r}')
  if first > num_steps:
    raise ValueError(f'train.profile_steps starts at step {first}, after the run ends '
                     f'(train.num_steps={num_steps})')
  return first, last


class StepProfiler:
  """Traces steps first..last into `trace_dir` (TensorBoard's profile plugin or Perfetto read it).

  `before_step(done)` and `after_step(done, outputs)` bracket the step that makes the run reach step
  `done`; leaving the `with` block (an early stop, an error) ends a trace still open. Every process
  traces itself.
  """

  def __init__(self, window: tuple[int, int] | None, trace_dir: str, log):
    self._window, self._dir, self._log = window, trace_dir, log
    self._active = False
    self._last_traced = 0

  def skip_before(self, start_step: int) -> None:
    """A run resumed at `start_step` will not profile steps it has already made."""
    if self._window and self._window[0] <= start_step:
      self._log(f'train.profile_steps={self._window[0]}:{self._window[1]} starts at or before the '
                f'resumed step {start_step}: not profiling')
      self._window = None

  def before_step(self, done: int) -> None:
    if self._window and done == self._window[0]:
      os.makedirs(self._dir, exist_ok=True)
      jax.profiler.start_trace(self._dir)
      self._active = True

  def after_step(self, done: int, outputs) -> None:
    if self._active:
      self._last_traced = done
      if done == self._window[1]:
        jax.block_until_ready(outputs)
        self.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    if self._active:
      jax.profiler.stop_trace()
      self._active = False
      self._log(f'profile of steps {self._window[0]}:{self._last_traced} written to {self._dir} '
                f'(tensorboard --logdir={self._dir}, or its *.trace.json.gz in Perfetto)')
