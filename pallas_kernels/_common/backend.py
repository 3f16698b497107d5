"""Backend detection and small integer helpers."""
import jax


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def next_pow2(x: int) -> int:
  return 1 if x <= 1 else 1 << (x - 1).bit_length()


def is_pow2(x: int) -> bool:
  return x >= 1 and x == next_pow2(x)


def default_backend() -> str:
  return jax.default_backend()


def resolve_implementation(implementation: str | None, known: tuple[str, ...],
                           default_by_backend: dict[str, str], what: str) -> str:
  """`implementation`, or for None the backend's entry in `default_by_backend` (else 'xla').

  Raises:
    ValueError: a choice outside `known`, naming `what` (e.g. 'gated delta rule').
  """
  impl = implementation
  if impl is None:
    impl = default_by_backend.get(default_backend(), 'xla')
  if impl not in known:
    raise ValueError(f'unknown {what} implementation {impl!r}; known: {known} or None')
  return impl


def why_gpu_kernel_cannot_run(why_not: str | None) -> str | None:
  """`why_not` (a kernel's own shape check), or that the backend is not a GPU, or None."""
  if default_backend() != 'gpu':
    return f'it needs a GPU (backend is {default_backend()!r})'
  return why_not
