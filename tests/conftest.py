"""Shared pytest setup: 8 fake CPU devices for sharding tests, GPU-marker skipping,
common fixtures."""
import gc
import os

_FAKE_DEVICES = '--xla_force_host_platform_device_count=8'
_TEST_XLA_FLAGS = ' ' + _FAKE_DEVICES
if os.environ.get('JAX_PLATFORMS') == 'cpu':
  # CPU tests are dominated by compiling many small programs, not by running them: LLVM at -O0
  # cuts the suite's time by about a fifth. XLA:CPU's older loop emitters and no XNNPACK graph
  # fusion compile a sampler's program in ~2.3 s against ~4.3, and the whole suite in 12 min
  # against 19 (2 cores, jaxlib 0.10.2, 2026-12-07). Semantics are unchanged (no fast-math
  # either way), but two programs holding the same ops may sum in different orders: compare
  # separately compiled fp32 results within a tolerance.
  _TEST_XLA_FLAGS += (
      ' --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
      ' --xla_cpu_use_fusion_emitters=false'
      ' --xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_DISABLED')
os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + _TEST_XLA_FLAGS

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


# XLA:CPU maps three memory regions (code, constants, data) per JIT-compiled object and keeps them
# while its executable stays in a jit cache. Over the whole suite one xdist worker passed 43,000
# maps by 69% of the run (2026-12-05), against Linux's limit of 65,530 per process
# (vm.max_map_count), and XLA's compiles segfaulted in `backend_compile_and_load` in 3 of 9 full
# runs. Dropped after each module, the caches still reached 32,000 maps within one module.
_MAPS_BEFORE_CLEARING = 20_000


def _memory_maps() -> int:
  """Memory maps of this process (0 where /proc is not there)."""
  try:
    with open('/proc/self/maps', 'rb') as f:
      return sum(1 for _ in f)
  except OSError:
    return 0


@pytest.fixture(autouse=True)
def _keep_memory_maps_below_the_kernel_limit():
  """After each test, drops the jit caches once the process holds _MAPS_BEFORE_CLEARING maps."""
  yield
  if _memory_maps() > _MAPS_BEFORE_CLEARING:
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def one_cpu_device_env() -> dict[str, str]:
  """Environment of a CLI subprocess on one CPU device: this process's XLA flags less the 8 fake
  devices."""
  flags = os.environ.get('XLA_FLAGS', '').replace(_FAKE_DEVICES, '').strip()
  return dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=flags)


@pytest.fixture
def rng() -> np.random.Generator:
  return np.random.default_rng(0)


@pytest.fixture
def cpu_mesh():
  devices = jax.devices('cpu')[:8]
  return jax.make_mesh(
      (2, 2, 2), ('data', 'fsdp', 'tensor'),
      axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)
