"""launch.tune_gdn_kernels' search: coordinate descent over BlockSizes with a synthetic cost (the
timing itself needs a GPU)."""
import pytest

from launch import tune_gdn_kernels as tune
from pallas_kernels.gated_delta_rule import configs

DEFAULT = configs.BlockSizes.get_default(128)


def _cost(bs: configs.BlockSizes):
  """Separable cost with its minimum at bv=32, num_warps_chunk=2; num_stages=3 fails."""
  if bs.num_stages == 3:
    return None
  return 10.0 + abs(bs.bv - 32) / 16 + abs(bs.num_warps_chunk - 2) + bs.num_stages_chunk / 10


def test_descent_finds_the_best_value_of_each_field_and_skips_failures():
  tried = []
  best, best_ms, default_ms = tune.coordinate_descent(
      DEFAULT, lambda bs: tried.append(bs) or _cost(bs), log=lambda _: None)
  assert (best.bv, best.num_warps_chunk, best.num_stages_chunk) == (32, 2, 1)
  assert best.num_stages == DEFAULT.num_stages  # the failing candidate was not kept
  assert best_ms == pytest.approx(_cost(best)) and default_ms == pytest.approx(_cost(DEFAULT))
  assert best_ms < default_ms
  assert all(bs.bv <= 128 and bs.bv_out <= 128 for bs in tried)


def test_tiles_above_the_head_size_are_not_tried():
  tried = []
  tune.coordinate_descent(DEFAULT, lambda bs: tried.append(bs) or 1.0, max_tile=32,
                          log=lambda _: None)
  assert {bs.bv_out for bs in tried} == {32, DEFAULT.bv_out}  # 64 (> 32) never tried
  assert {bs.bv for bs in tried} == {16, 32, DEFAULT.bv}


def test_a_failing_default_is_an_error():
  with pytest.raises(RuntimeError, match='default BlockSizes fail'):
    tune.coordinate_descent(DEFAULT, lambda bs: None, log=lambda _: None)
