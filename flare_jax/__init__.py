"""flare-jax: FLARE (hybrid AR -> diffusion LM conversion) in JAX/Flax."""
import jax


def _avoid_cpu_async_dispatch_deadlock() -> None:
  """On the CPU backend (jaxlib 0.10.2, 2 cores), asynchronously dispatched train steps with donated
  buffers hang idle at random steps (seen with both XLA:CPU runtimes; on 1 and on 8 fake devices).
  Synchronous CPU dispatch runs them; GPU dispatch is not affected. A user's explicit setting wins."""
  import os  # pylint: disable=g-import-not-at-top
  if 'JAX_CPU_ENABLE_ASYNC_DISPATCH' in os.environ:
    return
  try:
    jax.config.update('jax_cpu_enable_async_dispatch', False)
  except AttributeError:  # an option this jax does not have
    pass


_avoid_cpu_async_dispatch_deadlock()
