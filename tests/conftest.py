"""Shared pytest setup: 8 fake CPU devices for sharding tests, GPU-marker skipping,
common fixtures."""
import os

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

if jax.default_backend() != 'gpu':
  # Off GPU the jax-triton kernels run in Triton's interpreter (`interpret=True`); Triton picks the
  # interpreter when a kernel is decorated, so this must precede importing the kernel modules.
  os.environ.setdefault('TRITON_INTERPRET', '1')


def pytest_collection_modifyitems(config, items):
  del config
  if jax.default_backend() != 'gpu':
    for item in items:
      if 'gpu' in item.keywords:
        item.add_marker(pytest.mark.skip(reason='needs a CUDA GPU'))


@pytest.fixture
def rng() -> np.random.Generator:
  return np.random.default_rng(0)


@pytest.fixture
def cpu_mesh():
  devices = jax.devices('cpu')[:8]
  return jax.make_mesh(
      (2, 2, 2), ('data', 'fsdp', 'tensor'),
      axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)
