"""Decode-shaped GEMMs (a few rows against a weight streamed from HBM): XLA's GEMM on the weight
stored [K, N] (row-major `x @ W`, how `layers.Dense` keeps it) against [N, K] (each output
column's K inputs contiguous, how the tied LM head's embedding table is laid out).

python -m launch.bench_decode_gemm               # Qwen3.5-2B's decode GEMMs at batch 8
python -m launch.bench_decode_gemm --rows=32 --shapes=2048:12288 --profile

Each case chains --layers distinct weights (so that they stream from HBM, not L2, as in a decode
step) --passes times inside one jitted call; each product is folded back to the next one's input
[rows, K] by a small fusion (as a residual add follows a projection). Reported: microseconds per
GEMM (the fold included), the weight's bytes over that time, and that rate over the measured copy
and read-only bandwidths, and (a check beside the timing) how far each layout's chained result is
from the first layout's: the 'nk' weights are the 'kn' ones transposed. --profile adds each
case's kernels (XLA's split-K reductions among them).

--cpu_smoke runs tiny shapes on CPU (the numbers only show the script works).
"""
import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from launch import bench_util
from launch import runtime

_ROWS = flags.DEFINE_integer('rows', 8, 'Rows of x (batch x tokens per pass).')
_SHAPES = flags.DEFINE_list(
    'shapes', ['2048:12288', '6144:2048', '2048:8224', '2048:5120', '2048:2048'],
    'K:N of each weight (defaults: 2B MLP gate|up, down, GDN in-projection, attention q|k|v, '
    'out-projection).')
_LAYOUTS = flags.DEFINE_list('layouts', ['kn', 'nk'], 'kn: weight [K, N]; nk: weight [N, K].')
_LAYERS = flags.DEFINE_integer('layers', 24, 'Distinct weights per pass.')
_PASSES = flags.DEFINE_integer('passes', 4, 'Passes over the weights per jitted call.')
_REPEATS = flags.DEFINE_integer('repeats', 10, 'Timings per case (median reported).')
_PROFILE = flags.DEFINE_bool('profile', False, "Also list each case's kernels.")
_BANDWIDTH_MIB = flags.DEFINE_integer('bandwidth_buffer_mib', 1024,
                                      'Buffer size for the bandwidth measurement.')
_OUT = flags.DEFINE_string('out', '', 'Optional JSON file for the results.')
_CPU_SMOKE = flags.DEFINE_bool('cpu_smoke', False, 'Tiny shapes on CPU.')


def product(x: jax.Array, w: jax.Array, layout: str) -> jax.Array:
  """x [M, K] times the weight w ([K, N] for 'kn', [N, K] for 'nk') -> [M, N], fp32 sums."""
  contract = 0 if layout == 'kn' else 1
  return jax.lax.dot_general(x, w, (((1,), (contract,)), ((), ())),
                             preferred_element_type=jnp.float32).astype(x.dtype)


def fold(y: jax.Array, k: int) -> jax.Array:
  """y [M, N] -> [M, k] reading every column (so no GEMM column can be dropped): columns summed
  in groups of k (zero-padded) when N >= k, else tiled."""
  m, n = y.shape
  if n >= k:
    y = jnp.pad(y, ((0, 0), (0, -n % k)))
    return y.reshape(m, -1, k).sum(axis=1, dtype=jnp.float32).astype(y.dtype)
  return jnp.tile(y, (1, -(-k // n)))[:, :k]


def chained(layout: str, passes: int):
  """jitted fn(x [M, K], weights) running `passes` passes of x <- x + fold(x @ w) over weights."""
  def run(x, weights):
    def one_pass(_, x):
      for w in weights:
        x = x + fold(product(x, w, layout), x.shape[1])
      return x
    return jax.lax.fori_loop(0, passes, one_pass, x)
  return jax.jit(run)


def _weights(key, layers: int, k: int, n: int):
  """`layers` weights [K, N] in bf16 (std 0.02)."""
  return [(0.02 * jax.random.normal(kk, (k, n), jnp.float32)).astype(jnp.bfloat16)
          for kk in jax.random.split(key, layers)]


def _shape_rows(k: int, n: int, copy_bw: float, read_bw: float) -> list[dict]:
  """One row per --layouts entry for weights [K, N], the same weights in every layout (each 'nk'
  weight the transposed copy of its 'kn' one), so the chained products must agree: each row's
  max_diff is its output's largest difference from the first layout's, relative to the latter's
  largest entry."""
  rows, passes, layers = [], _PASSES.value, _LAYERS.value
  weights = _weights(jax.random.key(1), layers, k, n)
  x = jax.random.normal(jax.random.key(0), (_ROWS.value, k), jnp.float32).astype(jnp.bfloat16)
  first = None
  for layout in _LAYOUTS.value:
    ws = weights if layout == 'kn' else [jax.jit(jnp.transpose)(w) for w in weights]
    fn = chained(layout, passes)
    call = lambda: fn(x, ws)  # pylint: disable=cell-var-from-loop
    ms = bench_util.median_ms(call, jax.block_until_ready, warmup=2, repeats=_REPEATS.value)
    out = np.asarray(call(), np.float32)
    first = out if first is None else first
    us = 1e3 * ms / (passes * layers)
    rate = k * n * 2 / (us * 1e-6)
    row = dict(k=k, n=n, rows=_ROWS.value, layout=layout, us_per_gemm=us,
               weight_gb_per_s=rate / 1e9, of_copy_bw=rate / copy_bw, of_read_bw=rate / read_bw,
               max_diff=float(np.max(np.abs(out - first)) / (np.max(np.abs(first)) + 1e-30)))
    if _PROFILE.value:
      kernels, timeline = bench_util.jax_kernel_profile(call, calls=3, top=6)
      row.update(kernels=kernels, timeline=timeline)
    rows.append(row)
  return rows


def _parse_shape(text: str) -> tuple[int, int]:
  try:
    k, n = (int(v) for v in text.split(':'))
  except ValueError as e:
    raise app.UsageError(f'--shapes: {text!r} is not K:N') from e
  return k, n


def main(argv):
  del argv
  if _CPU_SMOKE.value:
    jax.config.update('jax_platforms', 'cpu')
    flags.FLAGS.shapes, flags.FLAGS.layers, flags.FLAGS.passes = ['64:96', '96:64'], 3, 2
    flags.FLAGS.repeats, flags.FLAGS.bandwidth_buffer_mib = 2, 16
  for layout in _LAYOUTS.value:
    if layout not in ('kn', 'nk'):
      raise app.UsageError(f'--layouts: {layout!r} is not kn or nk')
  shapes = [_parse_shape(s) for s in _SHAPES.value]
  copy_bw, read_bw = bench_util.hbm_bandwidths(_BANDWIDTH_MIB.value)
  print(f'{jax.devices()[0].device_kind}; copy {copy_bw / 1e9:.0f} GB/s, read-only '
        f'{read_bw / 1e9:.0f} GB/s; {_ROWS.value} rows, {_LAYERS.value} distinct weights x '
        f'{_PASSES.value} passes per call, bf16', flush=True)
  print('| K x N | layout | us / GEMM | GB/s | of copy bw | of read bw | max diff |')
  print('|---|---|---|---|---|---|---|')
  results = []
  for k, n in shapes:
    for row in _shape_rows(k, n, copy_bw, read_bw):
      results.append(row)
      print(f"| {k} x {n} | {row['layout']} | {row['us_per_gemm']:.2f} | "
            f"{row['weight_gb_per_s']:.0f} | {row['of_copy_bw']:.2f} | {row['of_read_bw']:.2f} | "
            f"{row['max_diff']:.1e} |", flush=True)
  if _PROFILE.value:
    for row in results:
      print(f"\n{row['k']} x {row['n']}, {row['layout']}: "
            + bench_util.timeline_line(row['timeline'], per='call'))
      print(bench_util.kernel_table(row['kernels']))
  if _OUT.value:
    bench_util.write_json(_OUT.value, results)


if __name__ == '__main__':
  runtime.run(main)
