"""pallas_kernels._common.backend: which launch defaults a card's `device_kind` selects."""
import pytest

from pallas_kernels._common import backend


@pytest.mark.parametrize('kind, generation', [
    ('NVIDIA H100 80GB HBM3', 'hopper'), ('NVIDIA H200', 'hopper'), ('NVIDIA H20', 'hopper'),
    ('NVIDIA GH200 480GB', 'hopper'),
    ('NVIDIA A100-SXM4-80GB', 'sm80'), ('NVIDIA A100 80GB PCIe', 'sm80'), ('NVIDIA A30', 'sm80'),
    ('NVIDIA A10G', 'sm86'), ('NVIDIA A10', 'sm86'), ('NVIDIA A40', 'sm86'),
    ('NVIDIA RTX A6000', 'sm86'), ('NVIDIA GeForce RTX 3090', 'sm86'), ('NVIDIA L4', 'sm86'),
    ('NVIDIA L40S', 'sm86'), ('NVIDIA GeForce RTX 4090', 'sm86'),
    ('NVIDIA RTX 6000 Ada Generation', 'sm86'),
    ('NVIDIA B200', ''), ('Tesla V100-SXM2-16GB', ''), ('', ''), ('cpu', '')])
def test_gpu_generation_by_device_kind(kind, generation):
  assert backend.gpu_generation(kind) == generation
