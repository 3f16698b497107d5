"""Backend detection and small integer helpers."""
import jax


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def next_pow2(x: int) -> int:
  return 1 if x <= 1 else 1 << (x - 1).bit_length()


def default_backend() -> str:
  return jax.default_backend()
