"""Comparison helpers for kernel tests (fla's relative-RMS criterion)."""
import numpy as np


def rms_ratio(actual, expected) -> float:
  """Returns ||actual - expected||_rms / ||expected||_rms, computed in float64."""
  a = np.asarray(actual, dtype=np.float64)
  e = np.asarray(expected, dtype=np.float64)
  denom = np.sqrt(np.mean(e**2)) + 1e-30
  return float(np.sqrt(np.mean((a - e) ** 2)) / denom)


def assert_close(name: str, actual, expected, ratio: float) -> None:
  """Asserts the relative RMS error of `actual` against `expected` is at most `ratio` (fla style).

  Raises:
    AssertionError: naming the tensor, the measured ratio and the limit.
  """
  got = rms_ratio(actual, expected)
  if not np.isfinite(got) or got > ratio:
    raise AssertionError(f'{name}: relative RMS error {got:.3e} > {ratio:.1e}')
