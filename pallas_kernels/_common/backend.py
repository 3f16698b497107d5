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


# NVIDIA cards by `jax.Device.device_kind` name, in order (an A100 is no A10).
_GENERATIONS = (
    ('hopper', ('H100', 'H200', 'H800', 'H20', 'GH200')),
    ('sm80', ('A100', 'A800', 'A30')),
    ('sm86', ('A10', 'A40', 'RTX A', 'RTX 30', 'L4', 'L40', 'RTX 40', 'Ada Generation')),
)


# Per generation: the compute capability its kernels are reported for (launch.kernel_registers)
# and the shared memory a block may use, KiB.
ARCH = {'hopper': 90, 'sm80': 80, 'sm86': 86}
SHARED_KIB = {'hopper': 227, 'sm80': 163, 'sm86': 99}


def gpu_generation(device_kind: str) -> str:
  """'hopper', 'sm80' (A100 class), 'sm86' (sm_86 / sm_89 cards: A10, A40, L4, L40, RTX 30 / 40,
  RTX A / Ada workstation cards; mma.sync like sm_80 but 99 KiB of shared memory per block), or
  '' (the CPU, and cards whose defaults are not set apart: Blackwell, older ones)."""
  for generation, names in _GENERATIONS:
    if any(name in device_kind for name in names):
      return generation
  return ''


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
