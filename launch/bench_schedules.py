"""Latency and compiled memory of the GDN two-stream noisy schedules: simple, lean, chunked,
pallas, triton.

python -m launch.bench_schedules                    # GPU: T=4096, HV=16, K=V=128, 2 views, block 4
python -m launch.bench_schedules --seq=512 --heads=4 --head_dim=32   # any shape, CPU too
python -m launch.bench_schedules --cases=4096:1:1,4096:4:2,16384:16:2  # sweep T:block:views

One GDN layer's noisy pass (`two_stream_gdn.noisy_delta_rule` / `noisy_delta_rule_chunked`): the
clean stream's q, k, v, g, beta plus --views noisy views of one row per batch element (one document:
--prompt prompt tokens, then response cut into blocks of --block_size with logit shift, the layout
of flare_jax.objective.layout). Every schedule runs in its own subprocess (an OOM in one leaves the
others). Reported per schedule and mode (fwd: outputs; fwdbwd: gradients of all ten inputs for a
random cotangent): the time per call (`bench_util.median_ms`: median of --repeats timings of
--back_to_back calls issued back to back, after --warmup calls), and `temp` = the compiled
executable's scratch (`jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes`).
Ratios are schedule / --baseline, per case; with a 'clean' row, `two-stream / (1+V) clean` is
(clean + schedule) over (1 + V) x clean, the fused-kernel target's measure (<= 1.2).
Defaults: on a GPU the shape above; without one a small CPU smoke shape (B=1, T=256, HV=2, K=V=32).
"""
import dataclasses
import sys

from absl import app
from absl import flags

from launch import bench_util
from launch import runtime
from launch import schedule_cases

_SCHEDULES = flags.DEFINE_list(
    'schedules', ['simple', 'lean', 'chunked', 'pallas', 'triton', 'clean'],
    'flare_jax.model.two_stream_gdn.ALL_SCHEDULES: simple, lean (token scans), chunked '
    '(chunk-parallel XLA), pallas / triton (the fused kernel; backward: the chunked schedule\'s '
    'autodiff), pallas_kernel_bwd / triton_kernel_bwd (with the family\'s backward kernel); '
    'or clean: the clean stream\'s own chunked pass alone (the backend\'s default kernel), the '
    'unit of the (1 + V) x clean-pass target; or both:<schedule>: the whole two-stream pass, '
    'clean and noisy outputs as the model computes them (two_stream_delta_rule: one clean pass '
    'for both under the triton schedules); or conv: the model\'s short causal convs of both '
    'streams with their SiLU (gated_deltanet.two_stream_conv_silu; XLA, with the hand-written '
    'backward, the model\'s default), on q|k|v as the conv channels; conv_autodiff: the same '
    'with autodiff\'s backward.')
_BATCH = flags.DEFINE_integer('batch', 1, 'Rows.')
_SEQ = flags.DEFINE_integer('seq', None, 'Slots per stream T (default: 4096 on GPU, 256 on CPU).')
_VIEWS = flags.DEFINE_integer('views', 2, 'Noisy views.')
_BLOCK_SIZE = flags.DEFINE_integer('block_size', 4, 'Diffusion block size.')
_MAX_BLOCK = flags.DEFINE_integer('max_block', 0, 'max_block of lean / chunked (0: block_size).')
_PROMPT = flags.DEFINE_integer('prompt', 128, 'Prompt tokens (no blocks), at most T / 4.')
_HEADS = flags.DEFINE_integer('heads', None, 'Value heads HV (default: 16 on GPU, 2 on CPU).')
_KEY_HEADS = flags.DEFINE_integer('key_heads', None, 'q/k heads H (default: HV).')
_HEAD_DIM = flags.DEFINE_integer('head_dim', None, 'K = V head size (default: 128 GPU, 32 CPU).')
_CHUNK = flags.DEFINE_integer('chunk', 64, 'Chunk size of the lean and chunked schedules.')
_CHUNKS_PER_STEP = flags.DEFINE_integer('chunks_per_step', 0,
                                        'chunked: windows per lax.map step (0: all at once).')
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32'],
                           'q, k, v dtype (g, beta fp32), as the model passes them.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per measurement (median reported).')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed calls first.')
_BACK_TO_BACK = bench_util.define_back_to_back_flag()
_MODES = flags.DEFINE_list('modes', ['fwd', 'fwdbwd'], 'What to time: fwd and/or fwdbwd.')
_NOISY_BLOCK_V = flags.DEFINE_integer(
    'noisy_block_v', 0, 'Sweep override: the fused forwards\' V tile (0: forward_launch).')
_NOISY_WARPS = flags.DEFINE_integer(
    'noisy_warps', 0, 'Sweep override: the fused forwards\' warps (0: forward_launch).')
_NOISY_BWD_LAUNCH = flags.DEFINE_string(
    'noisy_bwd_launch', '', "Sweep override: the jax-triton backward kernels' "
    "'V tile,warps,dV pass warps' (empty: two_stream_triton.backward_launch; its pipeline "
    "stages stay: --noisy_bwd_stages).")
_NOISY_BWD_STAGES = flags.DEFINE_integer(
    'noisy_bwd_stages', 0, "Sweep override: `noisy_bwd_kernel`'s pipeline stages, 1 to 4 (0: "
    'two_stream_triton.backward_launch).', lower_bound=0, upper_bound=4)
_SEED_BWD_LAUNCH = flags.DEFINE_string(
    'seed_bwd_launch', '', "Sweep override: the jax-triton seed-backward kernels' 'context V "
    "tile,context warps,rows warps' (empty: two_stream_triton.seed_backward_launch).")
_CLEAN_STATE_LAUNCH = flags.DEFINE_string(
    'clean_state_launch', '', "Sweep override: the two-stream pass's clean forward state pass "
    "(the checkpoints' launch, `BlockSizes.get_default(checkpoints=True)`), 'V tile,warps,stages'.")
_CLEAN_DH_LAUNCH = flags.DEFINE_string(
    'clean_dh_launch', '', "Sweep override: the same for its backward state pass (which adds the "
    "checkpoints' cotangents).")
_PROFILE = flags.DEFINE_bool('profile', False,
                             'Also record the top GPU kernels of each timed mode (jax.profiler).')
_PROFILE_TOP = flags.DEFINE_integer('profile_top', 15, 'Kernels listed per --profile table.')
_TIMEOUT = flags.DEFINE_integer('timeout', 900, 'Seconds per schedule subprocess.')
_OUT = flags.DEFINE_string('out', '', 'Optional JSON file for the results.')
_CHILD = flags.DEFINE_string('child', '', 'Internal: run one schedule and print RESULT.')
_CASES = flags.DEFINE_list('cases', [], 'T:block_size:views cases to sweep, each overriding --seq, '
                           '--block_size and --views (empty: the one case those flags give).')
_BASELINE = flags.DEFINE_string('baseline', 'chunked', 'The schedule the ratios divide by.')
_XLA_VARIANTS = flags.DEFINE_string(
    'xla_variants', '', "';'-separated XLA flag sets ('default': none): every schedule is timed "
    'once per set (added to XLA_FLAGS of its process); ratios stay within each set.')

_GIB = 1024 ** 3


def _shape(gpu: bool):
  """(B, T, V, H, HV, K) from the flags and the backend's defaults."""
  hv = _HEADS.value or (16 if gpu else 2)
  return (_BATCH.value, _SEQ.value or (4096 if gpu else 256), _VIEWS.value,
          _KEY_HEADS.value or hv, hv, _HEAD_DIM.value or (128 if gpu else 32))


def _inputs(b, t, views, h, hv, d, dtype):
  """Random clean and noisy (q, k, v, g, beta), l2-normed q, k; segment ids and block starts."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flare_jax.objective import layout  # pylint: disable=g-import-not-at-top
  keys = iter(jax.random.split(jax.random.key(0), 10))

  def stream(*lead):
    qk = lambda: jax.nn.standardize(jax.random.normal(next(keys), (*lead, t, h, d)), axis=-1)
    return (qk().astype(dtype) * d ** -0.5, qk().astype(dtype) * d ** -0.5,
            jax.random.normal(next(keys), (*lead, t, hv, d)).astype(dtype),
            jax.nn.log_sigmoid(jax.random.uniform(next(keys), (*lead, t, hv))) / 8,
            jax.nn.sigmoid(jax.random.uniform(next(keys), (*lead, t, hv))))

  seg = jnp.ones((b, t), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  prompt = min(_PROMPT.value, t // 4)
  starts = layout.block_layout(seg, seg, pos >= prompt, block_size=_BLOCK_SIZE.value).block_start
  return stream(b), stream(b, views), seg, starts


def _convs(clean, noisy, seg, starts, backward: str, kernel_size=4):
  """The model's short convs + SiLU of both streams (`gated_deltanet.two_stream_conv_silu` with
  that backward), with q|k|v of each stream as the conv channels: [B, (1+V)T, C] fp32."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flare_jax.model import gated_deltanet  # pylint: disable=g-import-not-at-top
  channels = lambda xs: jnp.concatenate([x.reshape(*x.shape[:-2], -1) for x in xs[:3]], axis=-1)
  b, views, t, _ = channels(noisy).shape
  x = jnp.concatenate([channels(clean), channels(noisy).reshape(b, views * t, -1)], axis=1)
  w = jax.random.normal(jax.random.key(2), (kernel_size, x.shape[-1]), jnp.float32) / 4
  return gated_deltanet.two_stream_conv_silu(x, w, seg, starts, views, backward=backward)


def _apply_kernel_overrides() -> None:
  """--noisy_block_v / --noisy_warps / --noisy_bwd_launch / --noisy_bwd_stages /
  --seed_bwd_launch / --clean_state_launch / --clean_dh_launch: replace the fused kernels' launch
  defaults in this child process before anything is traced (a sweep, not a setting)."""
  from pallas_kernels.gated_delta_rule import configs  # pylint: disable=g-import-not-at-top
  from pallas_kernels.gated_delta_rule import two_stream_pallas  # pylint: disable=g-import-not-at-top
  from pallas_kernels.gated_delta_rule import two_stream_triton  # pylint: disable=g-import-not-at-top
  launch = schedule_cases.parse_launch(_NOISY_BWD_LAUNCH.value)
  if launch or _NOISY_BWD_STAGES.value:
    default_bwd = two_stream_triton.backward_launch

    def backward_launch(dtype, max_block):
      block_v, warps, stages, dvn_warps = default_bwd(dtype, max_block)
      if launch:
        block_v, warps, dvn_warps = launch
      return block_v, warps, _NOISY_BWD_STAGES.value or stages, dvn_warps

    two_stream_triton.backward_launch = backward_launch
  seed_launch = schedule_cases.parse_launch(_SEED_BWD_LAUNCH.value, '--seed_bwd_launch')
  if seed_launch:
    two_stream_triton.seed_backward_launch = lambda: seed_launch
  state = schedule_cases.parse_launch(_CLEAN_STATE_LAUNCH.value, '--clean_state_launch')
  dh = schedule_cases.parse_launch(_CLEAN_DH_LAUNCH.value, '--clean_dh_launch')
  if state or dh:
    default_sizes = configs.block_sizes_for

    def block_sizes_for(vp, family, dtype, checkpoints=False):
      bs = default_sizes(vp, family, dtype, checkpoints)
      if not checkpoints:
        return bs
      bv_dh, warps_dh, stages_dh = dh or bs.dh_launch()
      bv, warps, stages = state or (bs.bv, bs.num_warps, bs.num_stages)
      return dataclasses.replace(bs, bv=bv, num_warps=warps, num_stages=stages, bv_dh=bv_dh,
                                 num_warps_dh=warps_dh, num_stages_dh=stages_dh)

    configs.block_sizes_for = block_sizes_for
  for module in (two_stream_pallas, two_stream_triton):
    default = module.forward_launch
    module.forward_launch = lambda dtype, max_block, default=default: (
        _NOISY_BLOCK_V.value or default(dtype, max_block)[0],
        _NOISY_WARPS.value or default(dtype, max_block)[1])


def _run_child(schedule: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flare_jax.model import two_stream_gdn  # pylint: disable=g-import-not-at-top
  from pallas_kernels.gated_delta_rule import api as gdr_api  # pylint: disable=g-import-not-at-top
  from pallas_kernels.gated_delta_rule import two_stream_xla  # pylint: disable=g-import-not-at-top
  gpu = jax.default_backend() == 'gpu'
  _apply_kernel_overrides()
  b, t, views, h, hv, d = _shape(gpu)
  clean, noisy, seg, starts = _inputs(b, t, views, h, hv, d, jnp.dtype(_DTYPE.value))
  kw = dict(scale=d ** -0.5, chunk_size=_CHUNK.value,
            max_block=_MAX_BLOCK.value or _BLOCK_SIZE.value)
  if schedule == 'chunked':
    f = lambda c, n: two_stream_xla.noisy_delta_rule_chunked(
        c, n, seg, starts, chunks_per_step=_CHUNKS_PER_STEP.value or None, **kw)
  elif schedule == schedule_cases.CLEAN:
    f = lambda c, n: gdr_api.chunk_gated_delta_rule(*c, scale=kw['scale'], segment_ids=seg,
                                                    chunk_size=_CHUNK.value)[0]
  elif schedule in (schedule_cases.CONV, schedule_cases.CONV_AUTODIFF):
    backward = 'autodiff' if schedule == schedule_cases.CONV_AUTODIFF else 'manual'
    f = lambda c, n: _convs(c, n, seg, starts, backward)
  elif schedule.startswith(schedule_cases.WHOLE_PASS):  # both outputs, as the model has them
    f = lambda c, n: two_stream_gdn.two_stream_delta_rule(
        c, n, seg, starts, schedule=schedule[len(schedule_cases.WHOLE_PASS):], **kw)
  else:
    f = lambda c, n: two_stream_gdn.noisy_delta_rule(c, n, seg, starts, schedule=schedule, **kw)
  cot = jax.tree.map(lambda o: jax.random.normal(jax.random.key(1), o.shape, jnp.float32),
                     jax.eval_shape(f, clean, noisy))
  loss = lambda c, n: sum(jnp.sum(w * o) for w, o in zip(jax.tree.leaves(cot),
                                                         jax.tree.leaves(f(c, n))))
  # value_and_grad, not grad: the loss keeps the forward's output live, as in training. With grad
  # alone a custom_vjp whose residuals are its inputs (the clean kernels before they saved their
  # intermediates) had its whole forward dropped by XLA.
  fns = dict(fwd=f, fwdbwd=jax.value_and_grad(loss, argnums=(0, 1)))
  res = dict(schedule=schedule, device=str(jax.devices()[0].device_kind), B=b, T=t, V=views, H=h,
             HV=hv, K=d, block=_BLOCK_SIZE.value, max_block=kw['max_block'], chunk=_CHUNK.value,
             noisy_block_v=_NOISY_BLOCK_V.value or None, noisy_warps=_NOISY_WARPS.value or None,
             noisy_bwd_launch=_NOISY_BWD_LAUNCH.value or None,
             noisy_bwd_stages=_NOISY_BWD_STAGES.value or None,
             seed_bwd_launch=_SEED_BWD_LAUNCH.value or None,
             clean_state_launch=_CLEAN_STATE_LAUNCH.value or None,
             clean_dh_launch=_CLEAN_DH_LAUNCH.value or None)
  for mode in _MODES.value:
    compiled = jax.jit(fns[mode]).lower(clean, noisy).compile()
    mem = compiled.memory_analysis()
    res[f'{mode}_temp_gib'] = None if mem is None else mem.temp_size_in_bytes / _GIB
    res[f'{mode}_ms'] = bench_util.median_ms(lambda compiled=compiled: compiled(clean, noisy),
                                             jax.block_until_ready, _WARMUP.value,
                                             _REPEATS.value, _BACK_TO_BACK.value)
    if _PROFILE.value:
      res[f'{mode}_kernels'], res[f'{mode}_timeline'] = bench_util.jax_kernel_profile(
          lambda compiled=compiled: compiled(clean, noisy), top=_PROFILE_TOP.value)
  bench_util.print_result(res)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  if _CHILD.value:
    _run_child(_CHILD.value)
    return
  from flare_jax.model import two_stream_gdn  # pylint: disable=g-import-not-at-top
  schedule_cases.check_schedules(_SCHEDULES.value, two_stream_gdn.ALL_SCHEDULES)
  cases = schedule_cases.parse_cases(_CASES.value) or [None]
  # Bad values fail here, not per child.
  schedule_cases.parse_launch(_NOISY_BWD_LAUNCH.value)
  schedule_cases.parse_launch(_SEED_BWD_LAUNCH.value, '--seed_bwd_launch')
  schedule_cases.parse_launch(_CLEAN_STATE_LAUNCH.value, '--clean_state_launch')
  schedule_cases.parse_launch(_CLEAN_DH_LAUNCH.value, '--clean_dh_launch')
  base_args = [a for a in sys.argv[1:] if not a.startswith(('--out', '--cases', '--xla_variants'))]
  results = []
  for flags_text in bench_util.xla_variants(_XLA_VARIANTS.value) or [None]:
    env = None if flags_text is None else bench_util.with_xla_flags(bench_util.child_env(),
                                                                    flags_text)
    for case in cases:
      case_args = [] if case is None else [f'--seq={case[0]}', f'--block_size={case[1]}',
                                           f'--views={case[2]}']
      for schedule in _SCHEDULES.value:
        child = [sys.executable, '-m', 'launch.bench_schedules', f'--child={schedule}',
                 *base_args, *case_args]
        labels = dict(schedule=schedule)
        if case is not None:
          labels.update(T=case[0], block=case[1], V=case[2])
        res = bench_util.run_child(child, _TIMEOUT.value, labels, env=env)
        if flags_text is not None:
          res['xla'] = flags_text
        bench_util.record(results, res, _OUT.value)
  first = next((r for r in results if 'error' not in r), {})
  print(f"\n{first.get('device', '?')}: B={first.get('B')} H={first.get('H')} HV={first.get('HV')} "
        f"K=V={first.get('K')} chunk={first.get('chunk')} {_DTYPE.value}; "
        f'{bench_util.timing_note(_REPEATS.value, _WARMUP.value, _BACK_TO_BACK.value)}; ratios '
        f'within each (T, block, V) case (lower is better).')
  print(schedule_cases.table(results, _BASELINE.value))
  for r in results:
    for mode in _MODES.value:
      where = f" (XLA flags {r['xla']!r})" if 'xla' in r else ''
      report = bench_util.profile_report(
          r, mode, f"{r.get('schedule')} T={r.get('T')} block={r.get('block')} V={r.get('V')} "
          f'{mode}{where}')
      if report:
        print(report)


if __name__ == '__main__':
  runtime.run(main)
