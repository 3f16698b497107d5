"""Tunes the gated delta rule kernels' launch parameters (`configs.BlockSizes`) on this GPU.

python -m launch.tune_gdn_kernels --impl=triton --shapes=8x4096,4x16384

Per shape, coordinate descent from the current default: each BlockSizes field in turn tries its
candidate values with the others fixed and keeps the fastest forward+backward (median of
--repeats calls). A candidate that does not compile or run (shared memory, registers) is skipped
and said. Prints one line per try, then a table of default vs tuned time and the tuned
BlockSizes, to put in `configs.BlockSizes.get_default` for this device.

Tuning swaps `configs.block_sizes_for` inside this process only (the kernels read their launch
parameters through it at trace time) and clears JAX's compile caches before each try.
"""
import dataclasses
import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from launch import bench_util
from launch import gdn_cases
from launch import runtime
from pallas_kernels.gated_delta_rule import configs

_IMPL = flags.DEFINE_enum('impl', 'triton', ['triton', 'pallas'], 'Kernel family to tune.')
_SHAPES = flags.DEFINE_list('shapes', ['8x4096', '4x16384'], 'BxT cases, each tuned on its own.')
_HEADS = flags.DEFINE_integer('heads', 16, 'Heads (H = HV).')
_DK = flags.DEFINE_integer('dk', 128, 'Key head size.')
_DV = flags.DEFINE_integer('dv', 128, 'Value head size.')
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float16'], 'q, k, v dtype.')
_ROUNDS = flags.DEFINE_integer('rounds', 1, 'Passes over the fields.')
_REPEATS = flags.DEFINE_integer('repeats', 10, 'Timed calls per try (median).')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed calls per try (compile included).')
_OUT = flags.DEFINE_string('out', '', 'Optional JSON file for the results.')

# Values tried per field (a field keeps its current value when no candidate beats it).
CANDIDATES = {
    'bv': (16, 32, 64),
    'num_warps': (2, 4, 8),
    'num_stages': (1, 2, 3),
    'bv_out': (32, 64, 128),
    'num_warps_out': (2, 4, 8),
    'num_warps_chunk': (2, 4, 8),
    'num_stages_chunk': (1, 2, 3),
    'num_warps_bwd': (4, 8),
    'bv_bwd': (16, 32, 64, 128),
    'split_bwd_v_pass': (False, True),
}
TRITON_ONLY = ('bv_bwd', 'split_bwd_v_pass')  # fields the Pallas kernels do not read


def _time_ms(bs: configs.BlockSizes, args, do) -> float | None:
  """fwd+bwd median ms with `bs`, or None when the kernels fail with it."""
  configs.block_sizes_for = lambda vp, family, dtype, checkpoints=False: bs
  jax.clear_caches()
  _, fwdbwd = gdn_cases.jitted_calls(_IMPL.value)
  try:
    return bench_util.median_ms(lambda: fwdbwd(*args, do), jax.block_until_ready, _WARMUP.value,
                                _REPEATS.value)
  except Exception as e:  # pylint: disable=broad-except
    print(f'    failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}', flush=True)
    return None


def coordinate_descent(default: configs.BlockSizes, time_ms, *, candidates=None, rounds: int = 1,
                       max_tile: int = 128, log=print):
  """(best BlockSizes, its ms, the default's ms): each field in turn takes the candidate value
  with the lowest `time_ms(BlockSizes)` (None = failed, skipped), the others fixed.

  Raises:
    RuntimeError: the default itself fails.
  """
  candidates = CANDIDATES if candidates is None else candidates
  best = default
  best_ms = default_ms = time_ms(default)
  if default_ms is None:
    raise RuntimeError(f'the default BlockSizes fail: {default}')
  log(f'default {default_ms:.3f} ms  {default}')
  for rnd in range(rounds):
    for field, values in candidates.items():
      for value in values:
        if value == getattr(best, field) or (field in ('bv', 'bv_out', 'bv_bwd') and
                                             value > max_tile):
          continue
        trial = dataclasses.replace(best, **{field: value})
        ms = time_ms(trial)
        log(f'  round {rnd} {field}={value}: {bench_util.fmt(ms, ".3f")} ms (best {best_ms:.3f})')
        if ms is not None and ms < best_ms:
          best, best_ms = trial, ms
  return best, best_ms, default_ms


def tune_shape(b: int, t: int, default: configs.BlockSizes) -> dict:
  """Coordinate descent over CANDIDATES for one (B, T); returns default/best times and sizes."""
  args, do = gdn_cases.random_inputs(b, t, _HEADS.value, _DK.value, _DV.value, _DTYPE.value)
  candidates = {field: values for field, values in CANDIDATES.items()
                if _IMPL.value == 'triton' or field not in TRITON_ONLY}
  best, best_ms, default_ms = coordinate_descent(
      default, lambda bs: _time_ms(bs, args, do), candidates=candidates, rounds=_ROUNDS.value,
      max_tile=_DV.value,
      log=lambda line: print(f'{b}x{t} {line}', flush=True))
  return dict(B=b, T=t, default_ms=default_ms, tuned_ms=best_ms,
              tuned=dataclasses.asdict(best), default=dataclasses.asdict(default))


def main(argv):
  del argv
  if jax.default_backend() != 'gpu':
    raise app.UsageError('tune_gdn_kernels needs a GPU')
  vp = max(16, 1 << (_DV.value - 1).bit_length())
  default = configs.block_sizes_for(vp, _IMPL.value, jnp.dtype(_DTYPE.value))
  results = []
  for shape in _SHAPES.value:
    b, t = (int(x) for x in shape.lower().split('x'))
    results.append(tune_shape(b, t, default))
  print(f'\n{_IMPL.value} on {jax.devices()[0].device_kind}; H={_HEADS.value} dk={_DK.value} '
        f'dv={_DV.value} {_DTYPE.value}; fwd+bwd median of {_REPEATS.value}')
  print('| B | T | default ms | tuned ms | speed-up | tuned BlockSizes |')
  print('|---|---|---|---|---|---|')
  for r in results:
    print(f"| {r['B']} | {r['T']} | {r['default_ms']:.3f} | {r['tuned_ms']:.3f} | "
          f"{r['default_ms'] / r['tuned_ms']:.2f}x | {json.dumps(r['tuned'])} |")
  bench_util.write_json(_OUT.value, results)


if __name__ == '__main__':
  runtime.run(main)
