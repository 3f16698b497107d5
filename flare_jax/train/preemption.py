"""SIGTERM as a request to checkpoint and stop: a cluster's notice before it evicts a job."""
import signal
import threading

import jax
from jax.experimental import multihost_utils


class StopOnSigterm:
  """Context manager; `requested(step)`, called by every process after every step, says when to
  save a checkpoint and stop.

  Several processes (`jax.distributed`): JAX's preemption service takes the SIGTERM of any process
  and has every process agree on the step to stop at (`reached_preemption_sync_point`). One
  process: a SIGTERM handler, installed for the context's duration (the previous one restored),
  marks the request; the step running when it arrives is the last.
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = None

  def __enter__(self) -> 'StopOnSigterm':
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def requested(self, step: int) -> bool:
    """Whether to checkpoint after `step` and stop (the same answer on every process)."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._event.is_set()
