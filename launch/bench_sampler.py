"""Decoding throughput of AR, AR-Trust and Diffusion-Trust on a random model, with reference points.

python -m launch.bench_sampler --variant=2b --batch=1,8 --prompt_len=128 --new_tokens=256

Prints, per (mode, concurrency): generated tokens/s, model passes per generated token, ms per pass
(the whole call over its passes: prefill, host transfers and the decode loop), and for AR the
decode step against the HBM-bandwidth floor ((weights + cache bytes) / measured copy bandwidth)
and against the stricter floor of the measured read-only bandwidth (a decode step mostly reads).
The decode step is the marginal cost of a pass, (t_N - t_M) / (passes_N - passes_M) between calls
generating N = --new_tokens and M = --step_base_tokens tokens: what each further token costs once
the prompt is in the caches, over the later (longer-context) steps; the call's fixed cost
(prefill, transfers) is printed beside it. Both are NaN, with a message, when the longer call did
not time slower (a noisy machine, too few tokens between the calls).
`--hf` also times transformers' `generate` on a random model of the same config in a separate
process. `--xla_variants='default;--xla_gpu_enable_triton_gemm=false'` times every case once per
XLA flag set, each in its own process, side by side in one table (an A/B of compiler settings).
`--gdn_decode_impl=xla,pallas` times the GDN cached passes side by side, XLA's chain against the
fused kernel (`gdr.fused_decode`; one model each); `--attn_decode_impl=xla,pallas` the same for the
attention layers' cached calls (`attn_ops.cache_attention`) and `--norm_impl=xla,pallas` for the
residual adds with their norms (`add_rms_norm`). Rows are labelled 'GDN / attention / norm'.
`--check_every=16,4` also times each case decoded in segments with a row test between them (as
with stop strings; `generate(should_stop=...)`, the test never stopping a row), labelled
'MODE, checked every N': the cost of the host round trips beside the one-pass decode.
Fixed output length (EOS ignored), greedy decoding, random weights.
"""
import itertools
import json
import math
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from flax import nnx

from flare_jax.model import config as config_lib
from flare_jax.model import transformer
from flare_jax.sampling import sampler as sampler_lib
from launch import bench_util
from launch import runtime

_VARIANT = flags.DEFINE_string('variant', '2b', 'flare_jax.model.config.VARIANTS key.')
_BATCH = flags.DEFINE_list('batch', ['1', '8'], 'Concurrency levels.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 128, 'Prompt tokens per row.')
_NEW = flags.DEFINE_integer('new_tokens', 256, 'Generated tokens per row.')
_BLOCK = flags.DEFINE_integer('block_size', 4, 'AR-Trust / Diffusion-Trust block.')
_KS = flags.DEFINE_list('k', ['1', '2', '4'], 'Diffusion-Trust tokens committed per pass.')
_MODES = flags.DEFINE_list('modes', ['ar', 'ar_trust', 'diffusion_trust'], 'Modes to time.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs per case (median reported).')
_STEP_BASE = flags.DEFINE_integer(
    'step_base_tokens', 16, 'AR: also time a call generating this many tokens, for the decode '
    'step as the marginal cost of a pass between it and --new_tokens (0: the whole call over its '
    'passes instead).')
_BANDWIDTH_MIB = flags.DEFINE_integer(
    'bandwidth_buffer_mib', 1024, 'Size of the buffer copied to measure the HBM bandwidth (large '
    'enough to stream past the caches).')
_CHECK_EVERY = flags.DEFINE_list(
    'check_every', [], 'Also time every case decoded in segments of this many iterations with a '
    'host-side row test between them (one that never stops a row).')
_HF = flags.DEFINE_bool('hf', False, 'Also time transformers generate (separate process).')
_PROFILE = flags.DEFINE_bool('profile', False,
                             'Also list the top GPU kernels per model pass of each case.')
_PROFILE_TOP = flags.DEFINE_integer('profile_top', 20, 'Kernels listed per --profile table.')
_OUT = flags.DEFINE_string('out', '', 'Optional JSON file for the results.')
_DECODE_IMPLS = flags.DEFINE_list(
    'gdn_decode_impl', ['default'],
    "ModelConfig.gdn_decode_impl values to time side by side ('default': the backend's).")
_ATTN_DECODE_IMPLS = flags.DEFINE_list(
    'attn_decode_impl', ['default'],
    "ModelConfig.attn_decode_impl values to time side by side ('default': the backend's).")
_NORM_IMPLS = flags.DEFINE_list(
    'norm_impl', ['default'],
    "ModelConfig.norm_impl values to time side by side ('default': the backend's).")
_XLA_VARIANTS = flags.DEFINE_string(
    'xla_variants', '', "';'-separated XLA flag sets ('default': none), each added to XLA_FLAGS "
    'in its own process, whose rows come side by side in one table.')
_VARIANT_TIMEOUT = flags.DEFINE_integer('variant_timeout', 1800, 'Seconds per --xla_variants set.')
_CHILD = flags.DEFINE_bool('child', False, 'Internal: measure and print the rows as one result.')


def _tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _time(fn, repeats):
  out = fn()
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), out


def _prompt_id_limit(cfg: config_lib.ModelConfig) -> int:
  """Random prompts draw ids below this (the same for our sampler and transformers')."""
  return min(1000, cfg.vocab_size)


def _hf_generate(cfg: config_lib.ModelConfig, batch: int, prompt_len: int, new: int) -> float:
  """tokens/s of transformers' generate (random init, bf16, greedy), in its own process."""
  code = f'''
import json, time, torch, transformers
hf = json.loads({json.dumps(json.dumps(config_lib.to_hf_text_config(cfg)))})
hf.pop("flare"); hf.pop("architectures"); hf.pop("model_type")
conf = transformers.Qwen3_5TextConfig(**hf)
with torch.device("cuda"):
  model = transformers.Qwen3_5ForCausalLM(conf).to(torch.bfloat16).eval()
ids = torch.randint(0, {_prompt_id_limit(cfg)}, ({batch}, {prompt_len}), device="cuda")
kw = dict(max_new_tokens={new}, min_new_tokens={new}, do_sample=False, pad_token_id=0)
model.generate(ids, **kw); torch.cuda.synchronize()
t0 = time.perf_counter(); model.generate(ids, **kw); torch.cuda.synchronize()
print("HF_TOKS", {batch} * {new} / (time.perf_counter() - t0))
'''
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=900,
                       env=bench_util.child_env(), check=False)
  for line in out.stdout.splitlines():
    if line.startswith('HF_TOKS'):
      return float(line.split()[1])
  print(out.stderr[-2000:])
  return float('nan')


def _config(impls: dict[str, str] | None = None) -> config_lib.ModelConfig:
  """The --variant in bf16 with the ModelConfig fields in `impls` ('default': None)."""
  pick = lambda impl: None if impl == 'default' else impl
  return config_lib.VARIANTS[_VARIANT.value].replace(
      dtype='bfloat16', param_dtype='bfloat16',
      **{name: pick(impl) for name, impl in (impls or {}).items()})


def _measure() -> list[dict]:
  """Times every (decode implementations, concurrency, mode) case in this process: one row
  each."""
  rows = []
  for gdn, attn, norm in itertools.product(_DECODE_IMPLS.value, _ATTN_DECODE_IMPLS.value,
                                           _NORM_IMPLS.value):
    _measure_model(dict(gdn_decode_impl=gdn, attn_decode_impl=attn, norm_impl=norm), rows)
  return rows


def _measure_model(impls: dict[str, str], rows: list[dict]) -> None:
  """Appends the rows of one model (its cached passes' implementations) to `rows`."""
  cfg = _config(impls)
  decode_impl = ' / '.join(impls.values())
  model = transformer.FlareLM(cfg, rngs=nnx.Rngs(0))
  sampler = sampler_lib.Sampler(model)
  weight_bytes = _tree_bytes(nnx.state(model, nnx.Param))
  bw, read_bw = bench_util.hbm_bandwidths(_BANDWIDTH_MIB.value)
  print(f'device: {jax.devices()[0].device_kind}; model {_VARIANT.value}: '
        f'{weight_bytes / 2**30:.2f} GiB bf16 weights; '
        f'measured HBM copy bandwidth {bw / 1e9:.0f} GB/s, read-only {read_bw / 1e9:.0f} GB/s')
  rng = np.random.default_rng(0)
  modes = [('ar', dict(mode='ar')), ('ar_trust', dict(mode='ar_trust', block_size=_BLOCK.value))]
  modes = [m for m in modes if m[0] in _MODES.value]
  if 'diffusion_trust' in _MODES.value:
    modes += [(f'diffusion_trust k={k}', dict(mode='diffusion_trust', block_size=_BLOCK.value,
                                              commit='fixed', tokens_per_pass=int(k)))
              for k in _KS.value]
  for batch in map(int, _BATCH.value):
    prompts = rng.integers(0, _prompt_id_limit(cfg), (batch, _PROMPT_LEN.value)).astype(np.int32)
    lengths = np.full((batch,), _PROMPT_LEN.value, np.int32)
    cache_bytes = None
    for name, kw in modes:
      scfg = sampler_lib.SamplerConfig(max_new_tokens=_NEW.value, **kw)
      seconds, res = _time(lambda: sampler.generate(prompts, lengths, scfg), _REPEATS.value)
      passes = float(np.mean(np.asarray(res.n_forward) - 1))  # minus the prefill
      toks = batch * _NEW.value
      row = dict(mode=name, batch=batch, decode_impl=decode_impl, tokens_per_s=toks / seconds,
                 passes_per_token=passes / _NEW.value, ms_per_pass=1e3 * seconds / max(passes, 1),
                 acceptance=float(np.sum(res.n_accepted) / max(np.sum(res.n_drafted), 1)))
      if name == 'ar':
        if cache_bytes is None:
          from flare_jax.model import cache as cache_lib  # pylint: disable=g-import-not-at-top
          s = sampler_lib.buffer_len(_PROMPT_LEN.value, scfg)
          cache_bytes = _tree_bytes(jax.eval_shape(lambda: cache_lib.init_cache(cfg, batch, s)))
        moved = weight_bytes + cache_bytes  # what one AR step must read at least
        floor_ms = 1e3 * moved / bw
        row['bandwidth_floor_ms'] = floor_ms
        row['pass_vs_floor'] = row['ms_per_pass'] / floor_ms
        row.update(_decode_step(sampler, prompts, lengths, kw, seconds, passes))
        row['step_vs_floor'] = row['step_ms'] / floor_ms
        row['read_floor_ms'] = 1e3 * moved / read_bw
        row['step_vs_read_floor'] = row['step_ms'] / row['read_floor_ms']
      if _PROFILE.value:  # one generate call, kernel times shared out over its passes
        kernels, timeline = bench_util.jax_kernel_profile(
            lambda: sampler.generate(prompts, lengths, scfg), calls=1, top=_PROFILE_TOP.value)
        row['kernels_per_pass'] = [[n, ms / max(passes, 1), c / max(passes, 1)]
                                   for n, ms, c in kernels]
        row['timeline_per_pass'] = {k: v if k == 'widest_gap_ms' else v / max(passes, 1)
                                    for k, v in timeline.items()}
      bench_util.record(rows, row, '' if _CHILD.value else _OUT.value)
      for every in map(int, _CHECK_EVERY.value):
        never = lambda r, ids: False
        seconds, _ = _time(lambda: sampler.generate(prompts, lengths, scfg, should_stop=never,
                                                    check_every=every), _REPEATS.value)
        bench_util.record(rows, dict(
            mode=f'{name}, checked every {every}', batch=batch, decode_impl=decode_impl,
            tokens_per_s=toks / seconds, passes_per_token=passes / _NEW.value,
            ms_per_pass=1e3 * seconds / max(passes, 1), acceptance=row['acceptance']),
            '' if _CHILD.value else _OUT.value)


def _decode_step(sampler, prompts, lengths, mode_kw, seconds, passes) -> dict:
  """{'step_ms', 'fixed_ms'}: a pass's marginal cost and the call's fixed cost, from this call
  (`seconds`, `passes`) and one generating --step_base_tokens tokens; without that, the whole
  call over its passes and no fixed cost."""
  base = _STEP_BASE.value
  if not 0 < base < _NEW.value:
    return dict(step_ms=1e3 * seconds / max(passes, 1), fixed_ms=float('nan'))
  scfg = sampler_lib.SamplerConfig(max_new_tokens=base, **mode_kw)
  base_seconds, res = _time(lambda: sampler.generate(prompts, lengths, scfg), _REPEATS.value)
  base_passes = float(np.mean(np.asarray(res.n_forward) - 1))
  out = bench_util.marginal_step(seconds, passes, base_seconds, base_passes)
  if math.isnan(out['step_ms']):
    print(f'AR step: the {_NEW.value}-token call ({1e3 * seconds:.1f} ms) took no longer than the '
          f'{base}-token one ({1e3 * base_seconds:.1f} ms), too noisy to give a step: raise '
          '--repeats or --new_tokens', flush=True)
  return out


def _step_cell(row: dict) -> str:
  if 'step_ms' not in row:
    return '-'
  return f"{row['step_ms']:.2f} ({row['fixed_ms']:.1f})"


def _floor_cell(row: dict) -> str:
  """'1.50 (1.58)': the AR step over the copy-bandwidth floor (over the read-only floor)."""
  if 'step_vs_floor' not in row:
    return '-'
  return f"{row['step_vs_floor']:.2f} ({row['step_vs_read_floor']:.2f})"


def _print_tables(rows: list[dict]) -> None:
  variants = any('xla' in r for r in rows)
  impls = len({r.get('decode_impl') for r in rows}) > 1
  lead = ('| XLA flags ' if variants else '') + ('| GDN / attention / norm ' if impls else '')
  print(f'\n{lead}| mode | batch | tok/s | passes/token | ms/pass | AR step ms (fixed ms) | '
        'AR step / BW floor (read-only floor) | acceptance |')
  print('|---' * (8 + variants + impls) + '|')
  for r in rows:
    cell = f"| {r.get('xla') or 'default'} " if variants else ''
    cell += f"| {r.get('decode_impl', '-')} " if impls else ''
    if 'error' in r:
      print(f"{cell}| - | - | failed: {r['error'][-300:]} |")
      continue
    print(f"{cell}| {r['mode']} | {r['batch']} | {r['tokens_per_s']:.1f} | "
          f"{r.get('passes_per_token', 0):.2f} "
          f"| {r.get('ms_per_pass', 0):.2f} | {_step_cell(r)} "
          f"| {_floor_cell(r)} "
          f"| {r.get('acceptance', 0):.2f} |")
  for r in rows:
    if r.get('kernels_per_pass'):
      where = f" (XLA flags {r['xla']!r})" if variants else ''
      where += f" (GDN / attention / norm {r['decode_impl']})" if impls else ''
      print(f"\nTop GPU kernels per pass, {r['mode']} batch {r['batch']}{where} "
            '(prefill included):')
      print(bench_util.timeline_line(r['timeline_per_pass'], r['ms_per_pass'], per='pass'))
      print(bench_util.kernel_table(r['kernels_per_pass']).replace('/ call', '/ pass'))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _CHILD.value:
    bench_util.print_result({'rows': _measure()})
    return
  variants = bench_util.xla_variants(_XLA_VARIANTS.value)
  rows = (bench_util.run_xla_variants('launch.bench_sampler', variants, _VARIANT_TIMEOUT.value,
                                      _OUT.value, drop=('--hf', '--nohf'))
          if variants else _measure())
  if _HF.value:
    cfg = _config()
    for batch in map(int, _BATCH.value):
      hf = _hf_generate(cfg, batch, _PROMPT_LEN.value, _NEW.value)
      row = dict(mode='hf_generate', batch=batch, tokens_per_s=hf)
      if variants:
        row['xla'] = 'n/a (torch)'
      bench_util.record(rows, row, _OUT.value)
  _print_tables(rows)


if __name__ == '__main__':
  runtime.run(main)
