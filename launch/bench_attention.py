"""Latency and memory of the softmax attention paths: XLA reference, Pallas flash kernel, cuDNN.

python -m launch.bench_attention                      # both cases below, on a GPU
python -m launch.bench_attention --cases=two_stream --block_k=32 --impls=pallas

Cases (defaults are Qwen3.5's softmax layers: 16 query heads, 4 kv heads, D = 256, bf16):
  causal      clean-only causal row of --seq tokens: xla, pallas, and cuDNN through
              `jax.nn.dot_product_attention(..., implementation='cudnn', is_causal=True)`.
  two_stream  a FLARE training row, --seq clean tokens + --views noisy views with blocks of
              --block_size (1 + views) * seq tokens, metadata from flare_jax.objective.layout (one
              document, --prompt prompt tokens): xla and pallas. Also reports the visible fraction
              of the score matrix, its visible (query, key) pairs against the causal row's
              T (T + 1) / 2, and the fraction of (64 x 64) tiles the Pallas forward visits.
With both cases, each implementation's two-stream / causal time ratios are printed next to that
pairs ratio (the work ratio).

Every (case, implementation) runs in its own subprocess, so the peak is per case. Reported per case:
the time per call (`bench_util.median_ms`: median of --repeats timings of --back_to_back calls
issued back to back, after --warmup calls), for the forward alone and for forward + backward
(dq, dk, dv for a random cotangent);
`peak GiB` = `memory_stats()['peak_bytes_in_use']` of the device after all calls (includes the
inputs, the same for every implementation); `temp GiB` = the compiled forward + backward's scratch
(`jit(...).lower(...).compile().memory_analysis().temp_size_in_bytes`), i.e. what the implementation
itself needs beyond inputs and outputs.

Without a GPU the script stops with an error, unless --cpu_smoke: then it runs a tiny shape with the
Pallas kernels interpreted (the numbers only show that the script works).
"""
import dataclasses
import os
import subprocess
import sys

from absl import app
from absl import flags
from absl import logging

from launch import bench_util
from launch import runtime

_CASES = flags.DEFINE_list('cases', ['causal', 'two_stream'], 'causal and/or two_stream.')
_IMPLS = flags.DEFINE_list('impls', ['xla', 'pallas', 'cudnn'],
                           'xla, pallas, cudnn (causal case only); pallas+FIELD[=N][+...] '
                           'sets BlockSizes fields for that row (BlockSizes.with_fields): a flag '
                           '(dkdv_per_q_head: the per-query-head dk/dv kernel) or a tile '
                           '(block_k_dkv=32), over the flags\' tiles.')
_BATCH = flags.DEFINE_integer('batch', 4, 'Rows per call (the attention issue names no batch; '
                              'its B=4 is the diffusion block, --block_size).')
_SEQ = flags.DEFINE_integer('seq', 4096, 'Clean tokens per row (T).')
_VIEWS = flags.DEFINE_integer('views', 2, 'Noisy views of the two_stream case.')
_BLOCK_SIZE = flags.DEFINE_integer('block_size', 4, 'Diffusion block size of the two_stream case.')
_PROMPT = flags.DEFINE_integer('prompt', 128, 'Prompt tokens (no blocks) of the two_stream row.')
_HEADS = flags.DEFINE_integer('heads', 16, 'Query heads.')
_KV_HEADS = flags.DEFINE_integer('kv_heads', 4, 'Key/value heads.')
_HEAD_DIM = flags.DEFINE_integer('head_dim', 256, 'Head size D.')
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float16', 'float32'],
                           'q, k, v dtype.')
_Q_TILE = flags.DEFINE_integer('q_tile', 512, 'Query tile of the XLA path.')
_BLOCK_Q = flags.DEFINE_integer('block_q', 0, 'Pallas forward q tile (0: default).')
_BLOCK_K = flags.DEFINE_integer('block_k', 0, 'Pallas forward k tile (0: default).')
_NUM_WARPS = flags.DEFINE_integer('num_warps', 0, 'Pallas forward warps (0: default).')
_BWD_BLOCKS = flags.DEFINE_list('bwd_blocks', [],
                                'Pallas backward tiles q_dq,k_dq,q_dkv,k_dkv (empty: default).')
_NUM_STAGES = flags.DEFINE_integer('num_stages', 0, 'Pallas forward pipelining stages (0: '
                                   'default; the backward\'s: pallas+num_stages_dq=N+...).')
_REPEATS = flags.DEFINE_integer('repeats', 10, 'Timed calls per measurement (median reported).')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed calls first (compile).')
_BACK_TO_BACK = bench_util.define_back_to_back_flag()
_MODES = flags.DEFINE_list('modes', ['fwd', 'fwdbwd'], 'What to time: fwd and/or fwdbwd.')
_TIMEOUT = flags.DEFINE_integer('timeout', 600, 'Seconds per case subprocess.')
_PROFILE = flags.DEFINE_bool('profile', False,
                             'Also record the top GPU kernels of each timed mode (jax.profiler).')
_PROFILE_TOP = flags.DEFINE_integer('profile_top', 12, 'Kernels listed per --profile table.')
_OUT = flags.DEFINE_string('out', '', 'Optional JSON file for the results.')
_CPU_SMOKE = flags.DEFINE_bool('cpu_smoke', False,
                               'No GPU: run a tiny shape with interpreted kernels (script check).')
_CHILD = flags.DEFINE_string('child', '', 'Internal: run one case "case:impl" and print RESULT.')

_GIB = 1024 ** 3
_TILE = 64  # tile of the reported visited-tile fraction



def _shape():
  """(B, T, views, H, Hkv, D): the flags, or a tiny shape under --cpu_smoke."""
  if _CPU_SMOKE.value:
    return 1, 48, 2, 4, 2, 32
  return (_BATCH.value, _SEQ.value, _VIEWS.value, _HEADS.value, _KV_HEADS.value,
          _HEAD_DIM.value)


def _metadata(case, b, t, views):
  """TokenMeta [B, N] of the case: clean causal (N = T) or a two-stream row (N = (1 + V) T)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flare_jax.objective import layout  # pylint: disable=g-import-not-at-top
  from pallas_kernels.attention import mask  # pylint: disable=g-import-not-at-top
  seg = jnp.ones((b, t), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  if case == 'causal':
    return mask.clean_meta(seg, pos)
  tokens = jnp.zeros((b, t), jnp.int32)
  prompt = min(_PROMPT.value, t // 4)
  lay = layout.block_layout(tokens, seg, pos >= prompt, block_size=_BLOCK_SIZE.value)
  masked = jnp.zeros((b, views, t), bool)
  return layout.two_stream_input(tokens, seg, pos, lay, masked, mask_id=1).meta


def _impl_fields(impl: str) -> str:
  """'pallas+dkdv_per_q_head=0+block_k_dkv=32' -> its `BlockSizes.with_fields` spec."""
  return impl.partition('+')[2]


def _check_impls(impls: list[str]) -> None:
  """Rejects unknown implementations and BlockSizes fields before any case runs."""
  from pallas_kernels.attention import pallas  # pylint: disable=g-import-not-at-top
  for impl in impls:
    if impl.split('+')[0] not in ('xla', 'pallas', 'cudnn') or (
        '+' in impl and not impl.startswith('pallas+')):
      raise app.UsageError(f'unknown implementation {impl!r} (xla, pallas[+FIELD...], cudnn)')
    try:
      pallas.BlockSizes().with_fields(_impl_fields(impl))
    except ValueError as e:
      raise app.UsageError(f'{impl!r}: {e}') from e


def _block_sizes(d, dtype):
  """Default Pallas block sizes with the flag overrides applied (None: all defaults)."""
  import jax  # pylint: disable=g-import-not-at-top
  from pallas_kernels._common import backend  # pylint: disable=g-import-not-at-top
  from pallas_kernels.attention import pallas  # pylint: disable=g-import-not-at-top
  bs = pallas.BlockSizes.get_default(max(16, backend.next_pow2(d)), dtype,
                                     jax.devices()[0].device_kind)
  over = {k: v for k, v in (('block_q', _BLOCK_Q.value), ('block_k', _BLOCK_K.value),
                            ('num_warps', _NUM_WARPS.value), ('num_stages', _NUM_STAGES.value))
          if v}
  if _BWD_BLOCKS.value:
    names = ('block_q_dq', 'block_k_dq', 'block_q_dkv', 'block_k_dkv')
    over.update(zip(names, (int(x) for x in _BWD_BLOCKS.value)))
  return dataclasses.replace(bs, **over)


def _attention_fn(impl, meta, d, dtype):
  """(q, k, v) -> o for one implementation."""
  import jax  # pylint: disable=g-import-not-at-top
  from pallas_kernels.attention import pallas  # pylint: disable=g-import-not-at-top
  from pallas_kernels.attention import xla  # pylint: disable=g-import-not-at-top
  scale = d ** -0.5
  if impl == 'xla':
    return lambda q, k, v: xla.attention_xla(q, k, v, meta, meta, scale=scale,
                                             q_tile=_Q_TILE.value)
  if impl.split('+')[0] == 'pallas':
    bs = _block_sizes(d, dtype).with_fields(_impl_fields(impl))
    return lambda q, k, v: pallas.attention_pallas(q, k, v, meta, meta, scale=scale,
                                                   block_sizes=bs,
                                                   interpret=_CPU_SMOKE.value)
  if impl == 'cudnn':
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                                        implementation='cudnn')
  raise ValueError(f'unknown implementation {impl!r}')


def _visibility(meta):
  """(visible fraction of the score matrix, fraction of 64 x 64 tiles the Pallas forward visits)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from pallas_kernels.attention import mask  # pylint: disable=g-import-not-at-top
  from pallas_kernels.attention import pallas  # pylint: disable=g-import-not-at-top

  @jax.jit
  def fractions(meta):
    b, n = meta.positions.shape

    def count(i):  # keys visible to query i, summed over the batch
      return jnp.sum(mask.visible(mask.TokenMeta(*(x[:, i, None] for x in meta)), meta))

    visible = jnp.sum(jax.lax.map(count, jnp.arange(n), batch_size=256)) / (b * n * n)
    return visible, pallas.visited_tile_fraction(meta, meta, _TILE, _TILE)

  return tuple(float(x) for x in fractions(meta))


def _run_case(case, impl):
  """Times one (case, implementation) in this process; returns the result dict."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  b, t, views, h, hkv, d = _shape()
  dtype = jnp.dtype(_DTYPE.value)
  meta = _metadata(case, b, t, views)
  n = meta.positions.shape[1]
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (b, n, h, d), dtype)
  k = jax.random.normal(ks[1], (b, n, hkv, d), dtype)
  v = jax.random.normal(ks[2], (b, n, hkv, d), dtype)
  do = jax.random.normal(ks[3], (b, n, h, d), dtype)
  jax.block_until_ready((q, k, v, do, meta))
  fn = _attention_fn(impl, meta, d, dtype)
  fwd = jax.jit(fn)

  @jax.jit
  def fwdbwd(q, k, v, do):
    _, vjp = jax.vjp(fn, q, k, v)
    return vjp(do)

  dev = jax.devices()[0]
  res = {'case': case, 'impl': impl, 'B': b, 'N': n, 'device': dev.device_kind,
         'jax': jax.__version__}
  if case == 'two_stream':
    res['visible'], res['tiles_visited'] = _visibility(meta)
    res['pairs_vs_causal'] = res['visible'] * n * n / (t * (t + 1) / 2)
  analysis = fwdbwd.lower(q, k, v, do).compile().memory_analysis()
  temp = getattr(analysis, 'temp_size_in_bytes', None) if analysis is not None else None
  res['temp_gib'] = None if temp is None else temp / _GIB
  calls = {'fwd': lambda: fwd(q, k, v), 'fwdbwd': lambda: fwdbwd(q, k, v, do)}
  for mode in _MODES.value:
    res[f'{mode}_ms'] = bench_util.median_ms(calls[mode], jax.block_until_ready, _WARMUP.value,
                                             _REPEATS.value, _BACK_TO_BACK.value)
    if _PROFILE.value:
      res[f'{mode}_kernels'], res[f'{mode}_timeline'] = bench_util.jax_kernel_profile(
          calls[mode], top=_PROFILE_TOP.value)
  res['peak_gib'] = (dev.memory_stats() or {}).get('peak_bytes_in_use', 0) / _GIB
  return res


def _spawn(case, impl):
  argv = [sys.executable, '-m', 'launch.bench_attention', f'--child={case}:{impl}']
  for flag in (_BATCH, _SEQ, _VIEWS, _BLOCK_SIZE, _PROMPT, _HEADS, _KV_HEADS, _HEAD_DIM, _DTYPE,
               _Q_TILE, _BLOCK_Q, _BLOCK_K, _NUM_WARPS, _NUM_STAGES, _REPEATS, _WARMUP,
               _BACK_TO_BACK, _CPU_SMOKE, _PROFILE, _PROFILE_TOP):
    argv.append(f'--{flag.name}={flag.value}')
  argv.append(f'--modes={",".join(_MODES.value)}')
  if _BWD_BLOCKS.value:
    argv.append(f'--bwd_blocks={",".join(_BWD_BLOCKS.value)}')
  return bench_util.run_child(argv, _TIMEOUT.value, {'case': case, 'impl': impl})


def _table(results):
  """Markdown table; ratios are implementation / xla of the same case (lower is better)."""
  ref = {r['case']: r for r in results if r['impl'] == 'xla' and 'error' not in r}
  keys = ('fwd_ms', 'fwdbwd_ms', 'peak_gib', 'temp_gib')
  lines = ['| case | impl | fwd ms | fwd+bwd ms | peak GiB | temp GiB | fwd / xla | '
           'fwd+bwd / xla | peak / xla | temp / xla |', '|' + '---|' * 10]
  for r in results:
    if 'error' in r:
      lines.append(f"| {r['case']} | {r['impl']} | error: {r['error'][:400]} |")
      continue
    base = ref.get(r['case'], {})
    ratio = lambda key: (r[key] / base[key] if r.get(key) and base.get(key) else None)
    lines.append(f"| {r['case']} | {r['impl']} | "
                 + ' | '.join(bench_util.fmt(r.get(key)) for key in keys) + ' | '
                 + ' | '.join(bench_util.fmt(ratio(key)) for key in keys) + ' |')
  return '\n'.join(lines)


def _two_stream_vs_causal(results, modes):
  """Per implementation timed in both cases: its two-stream / causal time ratio per mode, next to
  the pairs ratio (visible pairs of the two-stream row / the causal row's)."""
  by_case = {(r['case'], r['impl']): r for r in results if 'error' not in r}
  lines = []
  for (case, impl), two in by_case.items():
    causal = by_case.get(('causal', impl))
    if case != 'two_stream' or causal is None:
      continue
    times = bench_util.time_ratios(two, causal, modes)
    lines.append(f"two_stream / causal, {impl}: {times} (visible pairs "
                 f"{two['pairs_vs_causal']:.2f}x)")
  return lines


def _causal_vs_cudnn(results, modes):
  """Per implementation timed on the causal case: its time / cuDNN's per mode (the kernel issue's
  target is fwd+bwd within 1.3x)."""
  by_impl = {r['impl']: r for r in results if r['case'] == 'causal' and 'error' not in r}
  cudnn = by_impl.pop('cudnn', None)
  if cudnn is None:
    return []
  return [f'causal {impl} / cudnn: {bench_util.time_ratios(r, cudnn, modes)}'
          for impl, r in by_impl.items()]


def _check_device():
  """Exits with an error (status 1) without a GPU, unless --cpu_smoke. Asks a subprocess, so that
  this process never initialises (and preallocates) the GPU the cases need."""
  if _CPU_SMOKE.value:
    return
  probe = subprocess.run([sys.executable, '-c', 'import jax; print(jax.default_backend())'],
                         capture_output=True, text=True, check=False, env=dict(os.environ))
  found = probe.stdout.strip().splitlines()[-1] if probe.stdout.strip() else probe.stderr[-300:]
  if found != 'gpu':
    sys.exit(f'error: launch.bench_attention times GPU kernels, but the JAX backend is {found!r}. '
             'Run it on a CUDA machine, or pass --cpu_smoke to check the script on a tiny '
             'interpreted shape.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  if _CHILD.value:
    case, impl = _CHILD.value.split(':')
    bench_util.print_result(_run_case(case, impl))
    return
  _check_impls(_IMPLS.value)
  if not _MODES.value or set(_MODES.value) - {'fwd', 'fwdbwd'}:
    raise app.UsageError(f'--modes={",".join(_MODES.value)}: choose from fwd, fwdbwd')
  _check_device()
  if _CPU_SMOKE.value:
    logging.warning('--cpu_smoke: tiny shape, interpreted Pallas kernels; the numbers mean '
                    'nothing.')
  results = []
  for case in _CASES.value:
    for impl in _IMPLS.value:
      if impl == 'cudnn' and (case != 'causal' or _CPU_SMOKE.value):
        continue  # cuDNN has no metadata masks (and no CPU build)
      res = _spawn(case, impl)
      bench_util.record(results, res, _OUT.value)
  b, t, views, h, hkv, d = _shape()
  print(f'\nB={b} T={t} Hq={h} Hkv={hkv} D={d} {_DTYPE.value}; '
        f'{bench_util.timing_note(_REPEATS.value, _WARMUP.value, _BACK_TO_BACK.value)}; '
        f'ratios are impl / xla of the same case (lower is better).')
  for r in results:
    if r.get('visible') is not None and r['impl'] == 'pallas':
      print(f"{r['case']}: N={r['N']} ((1 + {views}) x {t}), block {_BLOCK_SIZE.value}: visible "
            f"fraction of the score matrix {r['visible']:.4f} ({r['pairs_vs_causal']:.3f}x the "
            f"causal row's pairs); {_TILE}x{_TILE} tiles visited {r['tiles_visited']:.4f}")
  print(_table(results))
  modes = _MODES.value
  for line in _causal_vs_cudnn(results, modes) + _two_stream_vs_causal(results, modes):
    print(line)
  for r in results:
    for mode in modes:
      report = bench_util.profile_report(r, mode, f"{r['case']} {r['impl']} {mode}")
      if report:
        print(report)


if __name__ == '__main__':
  runtime.run(main)
