"""A cached attention call (few queries over a KV cache): XLA against the decode kernel.

python -m launch.bench_attention_decode                      # Qwen3.5-2B's attention at batch 8
python -m launch.bench_attention_decode --cache=256,2176 --impls=xla,pallas,pallas:0:2,pallas:8:4

Times `api.cache_attention` with XLA against `decode_pallas.attention_decode_pallas`, for T clean
tokens per call (1: the AR step; 4: a verify block) written at the cache's last T slots, so that
every key tile up to the cache's end is walked. One jitted function runs --calls calls one after
the other, each call's output becoming the next call's queries, so the time per call is device
time, not host dispatch. Reported: microseconds per call, the ratio to XLA's, the cache bytes read
per second (K and V, once) and the largest output difference from XLA's relative to XLA's largest
output. Impl names: `xla`, `pallas` (the kernel's defaults), `pallas:SPLITS:WARPS` (SPLITS 0: the
default split of the key walk, `decode_pallas.splits_for`).

--cpu_smoke runs a tiny shape with the kernel interpreted (the numbers only show the script works).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from flare_jax.model import attention as model_attention
from launch import bench_util
from launch import runtime
from pallas_kernels.attention import api
from pallas_kernels.attention import decode_pallas
from pallas_kernels.attention import mask as mask_lib

_BATCH = flags.DEFINE_list('batch', ['8'], 'Rows (concurrency).')
_CACHE = flags.DEFINE_list('cache', ['256', '2176'], 'Cache slots S (multiples of 64).')
_TOKENS = flags.DEFINE_list('tokens', ['1', '4'], 'Queries per row and call.')
_HEADS = flags.DEFINE_integer('heads', 8, 'Query heads H.')
_KV_HEADS = flags.DEFINE_integer('kv_heads', 2, 'Key/value heads (a divisor of H).')
_HEAD_DIM = flags.DEFINE_integer('head_dim', 256, 'Head dim D.')
_IMPLS = flags.DEFINE_list('impls', ['xla', 'pallas'], 'xla, pallas or pallas:SPLITS:WARPS.')
_CALLS = flags.DEFINE_integer('calls', 32, 'Calls chained inside one jitted function.')
_REPEATS = flags.DEFINE_integer('repeats', 10, 'Timings per case (median reported).')
_OUT = flags.DEFINE_string('out', '', 'Optional JSON file for the results.')
_CPU_SMOKE = flags.DEFINE_bool('cpu_smoke', False, 'Tiny shape, interpreted kernel (no GPU).')


def _parse_impl(name: str):
  """fn(q, k, v, q_meta, k_meta) -> o for an --impls name."""
  if name == 'xla':
    return functools.partial(api.cache_attention, decode_implementation='xla')
  parts = name.split(':')
  if parts[0] != 'pallas' or len(parts) not in (1, 3):
    raise app.UsageError(f'--impls: {name!r} is not xla, pallas or pallas:SPLITS:WARPS')
  if len(parts) == 1:
    return decode_pallas.attention_decode_pallas
  try:
    splits, warps = int(parts[1]), int(parts[2])
  except ValueError:
    raise app.UsageError(f'--impls: {name!r}: SPLITS and WARPS must be integers') from None
  return functools.partial(decode_pallas.attention_decode_pallas, num_splits=splits or None,
                           num_warps=warps)


def _inputs(b, s, t, h, hkv, d):
  """q [B, T, H, D], k, v [B, S, Hkv, D] (bf16) and the metadata of T clean tokens written at the
  cache's last T slots."""
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  pos = jnp.broadcast_to(jnp.arange(s - t, s, dtype=jnp.int32), (b, t))
  zeros = jnp.zeros_like(pos)
  q_meta = mask_lib.TokenMeta(zeros, pos, zeros, pos)
  return (normal(b, t, h, d), normal(b, s, hkv, d), normal(b, s, hkv, d), q_meta,
          model_attention.cache_key_meta(q_meta, s))


def _chained(fn, calls: int):
  """jit of `calls` calls in a row (unrolled), each call's output the next's queries."""
  @jax.jit
  def run(q, k, v, q_meta, k_meta):
    for _ in range(calls):
      q = fn(q, k, v, q_meta, k_meta)
    return q
  return run


def _case(b: int, s: int, t: int, impls: list[str], heads: tuple[int, int, int]) -> list[dict]:
  """One row per implementation (xla first when asked for)."""
  h, hkv, d = heads
  args = _inputs(b, s, t, h, hkv, d)
  cache_bytes = 2 * b * s * hkv * d * 2
  outs, rows = {}, []
  for name in impls:
    fn = _parse_impl(name)
    outs[name] = np.asarray(jax.jit(fn)(*args), np.float32)
    run = _chained(fn, _CALLS.value)
    ms = bench_util.median_ms(lambda run=run: run(*args), jax.block_until_ready, warmup=2,
                              repeats=_REPEATS.value)
    us = 1e3 * ms / _CALLS.value
    rows.append(dict(batch=b, cache=s, tokens=t, impl=name, us_per_call=us,
                     cache_gb_per_s=cache_bytes / us / 1e3, heads=h, kv_heads=hkv, head_dim=d))
  bench_util.compare_to_xla(rows, outs)
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  for name in _IMPLS.value:
    _parse_impl(name)  # usage errors before any work
  if not _CPU_SMOKE.value and jax.default_backend() != 'gpu':
    raise app.UsageError('needs a GPU (or --cpu_smoke)')
  if _CPU_SMOKE.value:
    batches, caches, heads = [2], [64], (4, 2, 16)
  else:
    batches, caches = list(map(int, _BATCH.value)), list(map(int, _CACHE.value))
    heads = (_HEADS.value, _KV_HEADS.value, _HEAD_DIM.value)
  bad = [s for s in caches if s % decode_pallas.BLOCK_K]
  if bad:
    raise app.UsageError(f'--cache: {bad} not multiples of {decode_pallas.BLOCK_K}')
  impls = sorted(_IMPLS.value, key=lambda n: n != 'xla')  # xla first, the rest as given
  print(f'device: {jax.devices()[0].device_kind}; H={heads[0]} Hkv={heads[1]} D={heads[2]}, '
        f'bf16; {_CALLS.value} chained calls per timing, median of {_REPEATS.value}')
  results = []
  for b in batches:
    for s in caches:
      for t in map(int, _TOKENS.value):
        for row in _case(b, s, t, impls, heads):
          bench_util.record(results, row, _OUT.value)
  print('\n| B | S | T | impl | us / call | vs xla | cache GB/s | max diff vs xla |')
  print('|---|---|---|---|---|---|---|---|')
  for r in results:
    print(f"| {r['batch']} | {r['cache']} | {r['tokens']} | {r['impl']} | "
          f"{r['us_per_call']:.2f} | {bench_util.fmt(r['vs_xla'])} | "
          f"{r['cache_gb_per_s']:.0f} | {bench_util.fmt(r['max_diff_vs_xla'], '.1e')} |")


if __name__ == '__main__':
  runtime.run(main)
