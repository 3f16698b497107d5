"""flare_jax.train.metrics: the peak FLOP/s that MFU divides by."""
import pytest

from flare_jax.train import metrics


@pytest.mark.parametrize('kind, peak', [
    ('NVIDIA H100 80GB HBM3', 989e12), ('NVIDIA H100 PCIe', 756e12), ('NVIDIA H200', 989e12),
    ('NVIDIA H20', 148e12), ('NVIDIA GH200 480GB', 989e12), ('NVIDIA A100-SXM4-80GB', 312e12),
    ('NVIDIA L40S', 362e12), ('NVIDIA L40', 181e12), ('NVIDIA L4', 121e12),
    ('NVIDIA B200', 2250e12), ('TPU v5 lite', 197e12), ('TPU v5p', 459e12),
    ('NVIDIA GeForce GTX 1080', None), ('cpu', None)])
def test_peak_flops_take_the_most_specific_name(kind, peak):
  assert metrics.peak_flops_per_device(kind) == peak


def test_an_override_wins():
  assert metrics.peak_flops_per_device('NVIDIA L4', override=1e12) == 1e12
