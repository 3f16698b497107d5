"""Train-step throughput of the objectives side by side: step time, tokens/s, MFU and step memory.

python -m launch.bench_train --config=configs/flare_0p8b.py --objectives=ar,flare --steps=10

Each objective builds the same model (same config, seed and mesh) and times `--steps` jitted
train steps on one real batch from the config's data pipeline, after `--warmup` untimed steps;
compile time is reported apart. tokens/s counts row tokens (batch x seq_len), so the objectives
compare on the data they consume; MFU counts the FLOPs of every stream (a `flare` row is processed
as 1 + V streams). Step memory is XLA's compiled estimate for the step (arguments + outputs +
temporaries, minus aliased donated state); peak is the device allocator's peak so far in this
process (so it never goes down).
`--xla_variants='default;--xla_gpu_enable_triton_gemm=false'` times every objective once per XLA
flag set, each in its own process, side by side in one table (ratios against the first row).
`--steps=0` only compiles: compile time and XLA's memory estimate (step and temporaries) per
objective and flag set, e.g. why a setting needs more memory:

F=--xla_gpu_enable_latency_hiding_scheduler
python -m launch.bench_train --config=configs/flare_0p8b.py --objectives=flare --steps=0 \
  --config.model.scan_layers=True --xla_variants="$F=true;$F=false"

The step compiles with the config's `train.latency_hiding` option, as in training
(`flare_jax.train.step.compiler_options`): its default, 'auto', follows XLA_FLAGS where they name
the scheduler (as above), and otherwise turns it off for a scanned step on one GPU.
"""
import copy
import time

import jax
from absl import app
from absl import flags
from flax import nnx
from ml_collections import config_flags

from flare_jax import sharding as shd
from flare_jax.data import pipeline
from flare_jax.data import tokenizer as tokenizer_lib
from flare_jax.train import metrics as metrics_lib
from flare_jax.train import objectives
from flare_jax.train import optim
from flare_jax.train import state as state_lib
from flare_jax.train import step as step_lib
from launch import bench_util
from launch import runtime

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_OBJECTIVES = flags.DEFINE_list('objectives', ['ar', 'flare'], 'Objectives to compare.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per objective (0: compile only: compile '
                             "time and XLA's memory estimate, no step runs).")
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compiling.')
_OUT = flags.DEFINE_string('out', '', 'Optional JSON file for the results.')
_PROFILE = flags.DEFINE_integer('profile', 0, 'Also list this many top GPU kernels of a step and '
                                'its GPU timeline (jax.profiler; 0: no profile).')
_XLA_VARIANTS = flags.DEFINE_string(
    'xla_variants', '', "';'-separated XLA flag sets ('default': none), each added to XLA_FLAGS "
    'in its own process, whose rows come side by side in one table.')
_VARIANT_TIMEOUT = flags.DEFINE_integer('variant_timeout', 3600, 'Seconds per --xla_variants set.')
_CHILD = flags.DEFINE_bool('child', False, 'Internal: measure and print the rows as one result.')

_GIB = 1024 ** 3


def _one_batch(c, mesh, rules):
  tokenizer = tokenizer_lib.load_tokenizer(c.data.tokenizer or c.init_from,
                                           c.data.chat_template_kwargs)
  host = next(pipeline.make_iterator(c.data, tokenizer))
  pspec = shd.logical_to_pspec((shd.ACT_BATCH, shd.ACT_SEQ), rules)
  sharding = jax.sharding.NamedSharding(mesh, pspec)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in host.items()}


def _peak_bytes() -> float:
  stats = jax.devices()[0].memory_stats() or {}
  return float(stats.get('peak_bytes_in_use', float('nan')))


def bench_objective(c, objective: str, steps: int, warmup: int) -> dict[str, float]:
  """Times `steps` train steps of `objective` on config `c`; returns the measurements."""
  c = copy.deepcopy(c)
  c.objective.name = objective
  model_cfg = state_lib.resolve_model_config(c)
  mesh = shd.make_mesh(dict(data=c.mesh.data, fsdp=c.mesh.fsdp, tensor=c.mesh.tensor))
  rules = tuple(tuple(r) for r in c.sharding_rules)
  tx = optim.make_optimizer(c.optim, c.train.num_steps)
  train = state_lib.create_train_state(model_cfg, tx, mesh, rules, c.train.seed)
  batch = _one_batch(c, mesh, rules)
  rng = jax.random.key(0)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    options = step_lib.compiler_options(c.train.latency_hiding, model_cfg.scan_layers, mesh)
    step_fn = step_lib.make_train_step(train.graphdef, train.shardings,
                                       objectives.make_loss_fn(c, model_cfg), c.optim.grad_accum,
                                       options)
    print(f'{objective}: lowering and compiling the train step ...', flush=True)
    t0 = time.perf_counter()
    lowered = step_fn.lower(train.state, batch, rng)
    lower_s = time.perf_counter() - t0
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    print(f'{objective}: lowered in {lower_s:.1f} s, compiled in {compile_s - lower_s:.1f} s',
          flush=True)
    mem = compiled.memory_analysis()
    if steps == 0:
      return dict(objective=objective, compile_s=compile_s, **_memory(mem))
    state = train.state
    for i in range(warmup):
      t1 = time.perf_counter()
      state, m = compiled(state, batch, rng)
      jax.block_until_ready(state)
      print(f'{objective}: warm-up step {i + 1}/{warmup}: {time.perf_counter() - t1:.2f} s',
            flush=True)
    t0 = time.perf_counter()
    for _ in range(steps):
      state, m = compiled(state, batch, rng)
    jax.block_until_ready(state)
    step_s = (time.perf_counter() - t0) / steps
    profile = {}
    if _PROFILE.value:
      carried = [state]  # the step donates its state: each profiled call takes the last one's

      def one_step(step=compiled):
        carried[0], _ = step(carried[0], batch, rng)
        return carried[0]

      profile['kernels'], profile['timeline'] = bench_util.jax_kernel_profile(
          one_step, calls=2, top=_PROFILE.value)
      state = carried[0]
  streams = objectives.num_streams(c)
  rows, seq = c.data.batch_size, c.data.seq_len
  flops = metrics_lib.train_flops_per_row(model_cfg, seq, streams) * rows
  peak = metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind, c.train.peak_flops)
  out = dict(objective=objective, streams=streams, compile_s=compile_s, step_ms=step_s * 1e3,
             tokens_per_s=rows * seq / step_s, stream_tokens_per_s=streams * rows * seq / step_s,
             tflops_per_s=flops / step_s / 1e12, loss=float(m['loss']),
             peak_gib=_peak_bytes() / _GIB)
  if peak:
    out['mfu'] = flops / step_s / (peak * jax.device_count())
  out.update(_memory(mem))
  out.update(profile)
  del state, train, compiled
  return out


def _memory(mem) -> dict[str, float]:
  """XLA's compiled estimate: the step's memory (arguments + outputs + temporaries - aliased)
  and its temporaries alone, in GiB ({} when the backend gives none)."""
  if mem is None:
    return {}
  step_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                - mem.alias_size_in_bytes)
  return dict(step_mem_gib=step_bytes / _GIB, temp_gib=mem.temp_size_in_bytes / _GIB)


def _table(results: list[dict[str, float]]) -> str:
  """One row per result; step time against the first measured row's."""
  base = next((r for r in results if 'error' not in r), None)
  cols = ('objective', 'streams', 'step_ms', 'tokens_per_s', 'tflops_per_s', 'mfu', 'step_mem_gib',
          'temp_gib', 'peak_gib', 'compile_s', 'loss')
  if any('xla' in r for r in results):
    cols = ('xla',) + cols
  against = '-' if base is None else base['objective'] + (
      f" ({base['xla']})" if 'xla' in base else '')
  lines = ['| ' + ' | '.join(cols) + ' | step time vs ' + against + ' |',
           '|' + '---|' * (len(cols) + 1)]
  for r in results:
    if 'error' in r:
      lines.append(f"| {r.get('xla', '')} | failed: {r['error'][-300:]} |")
      continue
    cells = []
    for k in cols:
      v = r.get(k, float('nan'))
      cells.append(v if isinstance(v, str) else f'{v:.4g}')
    timed = 'step_ms' in r and 'step_ms' in base
    lines.append('| ' + ' | '.join(cells)
                 + (f' | {r["step_ms"] / base["step_ms"]:.2f}x |' if timed else ' | - |'))
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Too many command-line arguments: {argv[1:]}')
  c = _CONFIG.value
  if not all(o in objectives.OBJECTIVES for o in _OBJECTIVES.value):
    raise app.UsageError(f'--objectives must be among {objectives.OBJECTIVES}')
  if _STEPS.value < 0 or (_STEPS.value == 0 and _PROFILE.value):
    raise app.UsageError('--steps must be >= 0, and > 0 with --profile')
  variants = bench_util.xla_variants(_XLA_VARIANTS.value)
  if variants:
    results = bench_util.run_xla_variants('launch.bench_train', variants, _VARIANT_TIMEOUT.value,
                                          _OUT.value)
  else:
    results = _measure(c)
    if _CHILD.value:
      bench_util.print_result({'rows': results})
      return
  print(_table(results))
  for r in results:
    if r.get('kernels'):
      where = f" (XLA flags {r['xla']!r})" if 'xla' in r else ''
      print(f"\n{r['objective']}{where}: "
            f"{bench_util.timeline_line(r['timeline'], r['step_ms'], 'step')}")
      print(bench_util.kernel_table(r['kernels']).replace('/ call', '/ step'))


def _measure(c) -> list[dict]:
  """Every objective's measurements, in this process."""
  print(f'device: {jax.device_count()} x {jax.devices()[0].device_kind}; model {c.model.variant}, '
        f'batch {c.data.batch_size} x seq {c.data.seq_len}, dtype {c.model.dtype}, '
        f'remat {c.model.remat}, V={c.objective.num_views}, block {c.objective.block_size}',
        flush=True)
  results = []
  for objective in _OBJECTIVES.value:
    bench_util.record(results, bench_objective(c, objective, _STEPS.value, _WARMUP.value),
                      '' if _CHILD.value else _OUT.value)
  return results


if __name__ == '__main__':
  runtime.run(main)
