"""A GDN decode call: XLA against the Pallas kernels, the recurrence alone or the whole cached pass.

python -m launch.bench_decode                                   # Qwen3.5-2B's GDN at batch 8
python -m launch.bench_decode --impls=xla,pallas,pallas:64:4 --tokens=1,4,16   # tiles x warps
python -m launch.bench_decode --op=fused       # conv, gates and rule: gdr.fused_decode's kernel

--op=rule (default) times the recurrence alone (`recurrent_pallas` against XLA's token loop);
--op=fused a cached pass from the in-projections (`decode_pallas` against `front.fused_decode_xla`,
XLA's conv / activation / gate fusions around its token loop), each call's outputs becoming the
next call's v inputs (one small concatenation per call, in both rows) and its leaving window and
state the next call's.

Cases: T tokens per call (1: the AR step; the block size: AR-Trust's verify pass) in two modes,
`state` (the leaving state written: decode, verify, replay) and `outputs` (outputs only: a noisy
block at decode; XLA runs its block-parallel form there). One jitted function runs --calls calls one
after the other, each feeding its outputs (and state) to the next, so the time per call is device
time, not host dispatch (a call is a few microseconds). Reported: microseconds per call, the ratio
to XLA's, the state's bytes moved per second, and the largest output difference from XLA's relative
to XLA's largest output (a correctness check beside the timing). Impl names: `xla`, `pallas`
(the default tiles), `pallas:BLOCK_V:WARPS`.

--cpu_smoke runs a tiny shape with the kernel interpreted (the numbers only show the script works).
"""
import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from launch import bench_util
from launch import runtime
from pallas_kernels.gated_delta_rule import decode_pallas
from pallas_kernels.gated_delta_rule import front
from pallas_kernels.gated_delta_rule import recurrent_pallas
from pallas_kernels.gated_delta_rule import xla

_BATCH = flags.DEFINE_integer('batch', 8, 'Rows (concurrency).')
_HEADS = flags.DEFINE_integer('heads', 16, 'Key heads H.')
_VALUE_HEADS = flags.DEFINE_integer('value_heads', 16, 'Value heads HV (a multiple of H).')
_DK = flags.DEFINE_integer('dk', 128, 'Key head size K.')
_DV = flags.DEFINE_integer('dv', 128, 'Value head size V.')
_TOKENS = flags.DEFINE_list('tokens', ['1', '4'], 'Tokens per call.')
_MODES = flags.DEFINE_list('modes', ['state', 'outputs'], 'state and/or outputs.')
_IMPLS = flags.DEFINE_list('impls', ['xla', 'pallas'], 'xla, pallas or pallas:BLOCK_V:WARPS.')
_CALLS = flags.DEFINE_integer('calls', 32, 'Calls chained inside one jitted function.')
_REPEATS = flags.DEFINE_integer('repeats', 10, 'Timings per case (median reported).')
_OUT = flags.DEFINE_string('out', '', 'Optional JSON file for the results.')
_CPU_SMOKE = flags.DEFINE_bool('cpu_smoke', False, 'Tiny shape, interpreted kernel (no GPU).')
_OP = flags.DEFINE_enum('op', 'rule', ['rule', 'fused'],
                        'rule: the recurrence alone; fused: the whole cached pass (conv to rule).')
_KC = 4  # conv taps (Qwen3.5's)


def _parse_tiles(name: str):
  """(block_v, warps) of 'pallas' (None, None: the kernel's defaults) or 'pallas:BLOCK_V:WARPS'."""
  parts = name.split(':')
  if parts[0] != 'pallas' or len(parts) not in (1, 3):
    raise app.UsageError(f'--impls: {name!r} is not xla, pallas or pallas:BLOCK_V:WARPS')
  if len(parts) == 1:
    return None, None
  try:
    return int(parts[1]), int(parts[2])
  except ValueError as e:
    raise app.UsageError(f'--impls: {name!r}: {e}') from e


def _parse_fused(name: str):
  """fn(args, with_state) -> (o, (window, state) or None) of a fused-pass implementation."""
  def run(args, with_state):
    x, b_in, a_in, w, a_log, dt_bias, window, s0 = args
    _, hv, kd, vd = s0.shape
    kw = dict(window=window, initial_state=s0, num_key_heads=(x.shape[-1] - hv * vd) // (2 * kd),
              output_final_state=with_state)
    if name == 'xla':
      return front.fused_decode_xla(x, b_in, a_in, w, a_log, dt_bias, **kw)
    block_v, warps = _parse_tiles(name)
    tiles = {} if block_v is None else dict(block_v=block_v, num_warps=warps)
    return decode_pallas.fused_decode_pallas(x, b_in, a_in, w, a_log, dt_bias, **tiles,
                                             interpret=_CPU_SMOKE.value, **kw)
  if name != 'xla':
    _parse_tiles(name)
  return run


def _parse_impl(name: str):
  """(label, fn(q, k, v, g, beta, s0, with_state) -> (o, state or None))."""
  if name == 'xla':
    def run(q, k, v, g, beta, s0, with_state):
      if with_state:
        return xla.recurrent_gated_delta_rule_xla(q, k, v, g, beta, initial_state=s0,
                                                  output_final_state=True)
      return xla.block_gated_delta_rule_xla(q, k, v, g, beta, initial_state=s0), None
    return run
  block_v, warps = _parse_tiles(name)
  if block_v is None:
    block_v, warps = recurrent_pallas.BLOCK_V, recurrent_pallas.NUM_WARPS

  def run(q, k, v, g, beta, s0, with_state):
    return recurrent_pallas.recurrent_gated_delta_rule_pallas(
        q, k, v, g, beta, initial_state=s0, output_final_state=with_state, block_v=block_v,
        num_warps=warps, interpret=_CPU_SMOKE.value)
  return run


def _inputs(b, t, h, hv, kd, vd):
  rng = np.random.default_rng(0)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
  return (bf16(unit(rng.standard_normal((b, t, h, kd)))),
          bf16(unit(rng.standard_normal((b, t, h, kd)))),
          bf16(rng.standard_normal((b, t, hv, vd))),
          jnp.asarray(-rng.uniform(0.05, 0.7, (b, t, hv)), jnp.float32),
          jnp.asarray(rng.uniform(0.0, 1.0, (b, t, hv)), jnp.float32),
          jnp.asarray(rng.standard_normal((b, hv, kd, vd)), jnp.float32))


def _fused_inputs(b, t, h, hv, kd, vd):
  """(x, b_in, a_in, conv_weight, a_log, dt_bias, window, state) of a cached pass, bf16."""
  rng = np.random.default_rng(0)
  c = 2 * h * kd + hv * vd
  bf16 = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  return (bf16(b, t, c), bf16(b, t, hv), bf16(b, t, hv), bf16(_KC, c),
          jnp.asarray(np.log(rng.uniform(1.0, 16.0, hv)), jnp.float32), bf16(hv),
          bf16(b, _KC - 1, c), jnp.asarray(rng.standard_normal((b, hv, kd, vd)), jnp.float32))


def _fused_chained(fn, with_state: bool, calls: int):
  """jit of `calls` fused passes in a row, each call's outputs the next's v inputs and its leaving
  (window, state) the next's: (last outputs, last state)."""
  @jax.jit
  def run(*args):
    x, b_in, a_in, w, a_log, dt_bias, window, s = args
    bsz, t, c = x.shape
    qk = c - s.shape[1] * s.shape[3]
    for _ in range(calls):
      o, leaving = fn((x, b_in, a_in, w, a_log, dt_bias, window, s), with_state)
      x = jnp.concatenate([x[..., :qk], o.reshape(bsz, t, -1).astype(x.dtype)], axis=-1)
      if leaving is not None:
        window, s = leaving
    return o, s
  return run


def _chained(fn, with_state: bool, calls: int):
  """jit of `calls` calls in a row (unrolled: no loop overhead), each call's outputs the next's
  values and its state the next's state: (last outputs, last state)."""
  @jax.jit
  def run(q, k, v, g, beta, s):
    for _ in range(calls):
      o, s_next = fn(q, k, v, g, beta, s, with_state)
      v, s = o.astype(v.dtype), (s if s_next is None else s_next)
    return v, s
  return run


def _case(t: int, mode: str, impls: list[str], shape: dict) -> list[dict]:
  """One row per implementation for T = t tokens in `mode`."""
  b, h, hv, kd, vd = shape['b'], shape['h'], shape['hv'], shape['kd'], shape['vd']
  fused = _OP.value == 'fused'
  args = (_fused_inputs if fused else _inputs)(b, t, h, hv, kd, vd)
  with_state = mode == 'state'
  state_bytes = b * hv * kd * vd * 4 * (2 if with_state else 1)
  one_call = {}
  rows = []
  for name in impls:
    if fused:
      fn = _parse_fused(name)
      one = jax.jit(lambda *a, fn=fn: fn(a, with_state)[0])
      run = _fused_chained(fn, with_state, _CALLS.value)
    else:
      fn = _parse_impl(name)
      one = jax.jit(lambda *a, fn=fn: fn(*a, with_state)[0])
      run = _chained(fn, with_state, _CALLS.value)
    one_call[name] = np.asarray(one(*args), np.float32)
    ms = bench_util.median_ms(lambda run=run: run(*args), jax.block_until_ready, warmup=2,
                              repeats=_REPEATS.value)
    us = 1e3 * ms / _CALLS.value
    rows.append(dict(op=_OP.value, tokens=t, mode=mode, impl=name, us_per_call=us,
                     state_gb_per_s=state_bytes / us / 1e3, **shape))
  bench_util.compare_to_xla(rows, one_call)  # xla runs first when asked for (main)
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  bad = [m for m in _MODES.value if m not in ('state', 'outputs')]
  if bad:
    raise app.UsageError(f'--modes: {bad} (known: state, outputs)')
  for name in _IMPLS.value:
    (_parse_fused if _OP.value == 'fused' else _parse_impl)(name)  # usage errors before any work
  if not _CPU_SMOKE.value and jax.default_backend() != 'gpu':
    raise app.UsageError('needs a GPU (or --cpu_smoke)')
  shape = (dict(b=2, h=1, hv=2, kd=16, vd=32) if _CPU_SMOKE.value else
           dict(b=_BATCH.value, h=_HEADS.value, hv=_VALUE_HEADS.value, kd=_DK.value,
                vd=_DV.value))
  impls = sorted(_IMPLS.value, key=lambda n: n != 'xla')  # xla first, the rest as given
  print(f"device: {jax.devices()[0].device_kind}; B={shape['b']} H={shape['h']} "
        f"HV={shape['hv']} K={shape['kd']} V={shape['vd']}, bf16 inputs, fp32 state, "
        f"op {_OP.value}; "
        f'{_CALLS.value} chained calls per timing, median of {_REPEATS.value}')
  results = []
  for t in map(int, _TOKENS.value):
    for mode in _MODES.value:
      for row in _case(t, mode, impls, shape):
        bench_util.record(results, row, _OUT.value)
  print('\n| T | mode | impl | us / call | vs xla | state GB/s | max diff vs xla |')
  print('|---|---|---|---|---|---|---|')
  for r in results:
    print(f"| {r['tokens']} | {r['mode']} | {r['impl']} | {r['us_per_call']:.2f} | "
          f"{bench_util.fmt(r['vs_xla'])} | {r['state_gb_per_s']:.0f} | "
          f"{bench_util.fmt(r.get('max_diff_vs_xla'), '.1e')} |")


if __name__ == '__main__':
  runtime.run(main)
