"""bench_schedules' sweep cases (T:block_size:views) and its per-case table; no flags, so tests
and other tools can import it beside other launch modules."""
from absl import app

from launch import bench_util

WHOLE_PASS = 'both:'  # schedule prefix: clean and noisy outputs in one timed call
CONV = 'conv'  # not a schedule: the model's short convs of both streams, timed beside them
CONV_AUTODIFF = 'conv_autodiff'  # the same with autodiff's backward (the manual one's oracle)
CLEAN = 'clean'  # not a schedule: the clean stream's own chunked pass, the target's unit


def check_schedules(names: list[str], schedules: tuple[str, ...]) -> None:
  """Raises UsageError unless every name is one of `schedules` (the model's), WHOLE_PASS + one of
  them, CLEAN, CONV or CONV_AUTODIFF."""
  extra = (CLEAN, CONV, CONV_AUTODIFF)
  known = lambda name: (name in schedules or name in extra
                        or (name.startswith(WHOLE_PASS) and name[len(WHOLE_PASS):] in schedules))
  bad = [name for name in names if not known(name)]
  if bad:
    raise app.UsageError(f'--schedules: unknown {bad}; known: {", ".join(schedules + extra)}, or '
                         f'{WHOLE_PASS}<schedule>')


def parse_cases(specs: list[str]) -> list[tuple[int, int, int]]:
  """['4096:4:2', ...] -> [(T, block_size, views), ...]."""
  cases = []
  for spec in specs:
    parts = spec.split(':')
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
      raise app.UsageError(f'--cases wants T:block_size:views with positive integers, got {spec!r}')
    cases.append(tuple(int(p) for p in parts))
  return cases


_LAUNCH_NAMES = {'--noisy_bwd_launch': 'V tile,warps,dV pass warps',
                 '--seed_bwd_launch': 'context V tile,context warps,rows warps',
                 '--clean_state_launch': 'V tile,warps,stages',
                 '--clean_dh_launch': 'V tile,warps,stages'}


def parse_launch(text: str, flag: str = '--noisy_bwd_launch') -> tuple[int, int, int] | None:
  """A launch override (`_LAUNCH_NAMES`): '' -> None; 'V tile,warps,warps' (or 'V tile,warps,
  stages') -> the three ints (a V tile that is a power of two >= 16, warps 1..16 in powers of
  two, stages 1..4)."""
  if not text:
    return None
  parts = text.split(',')
  pow2 = lambda n: n > 0 and n & (n - 1) == 0
  staged = _LAUNCH_NAMES[flag].endswith('stages')
  if len(parts) == 3 and all(p.strip().isdigit() for p in parts):
    launch = tuple(int(p) for p in parts)
    warps = launch[1:2] if staged else launch[1:]
    if (pow2(launch[0]) and launch[0] >= 16 and all(pow2(w) and w <= 16 for w in warps)
        and (not staged or 1 <= launch[2] <= 4)):
      return launch
  example, last = ('64,4,3', '; stages 1 to 4') if staged else ('128,8,4', '')
  raise app.UsageError(f"{flag} wants '{_LAUNCH_NAMES[flag]}', e.g. {example} (a V tile that is "
                       f'a power of two >= 16; warps 1, 2, 4, 8 or 16{last}), got {text!r}')


def table(results: list[dict], baseline: str) -> str:
  """One row per (case, schedule); ratios within each case (T, block, V, XLA flag set): time and
  XLA temp memory over the baseline schedule's (the paper's fused-vs-simple figures with baseline
  'simple')."""
  ms = lambda r, m: None if r is None else r.get(f'{m}_ms')
  gib = lambda r, m: None if r is None else r.get(f'{m}_temp_gib')
  lines = ['| T | block | V | schedule | fwd ms | fwd+bwd ms | fwd temp GiB | fwd+bwd temp GiB | '
           f'fwd / {baseline} | fwd+bwd / {baseline} | two-stream / (1+V) clean, fwd | fwd+bwd | '
           f'temp / {baseline}, fwd | fwd+bwd |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  case_of = lambda r: (r.get('T'), r.get('block'), r.get('V'), r.get('xla'))
  for r in results:
    name = r['schedule'] + (f" [{r['xla']}]" if r.get('xla') else '')
    lead = f"| {r.get('T', '?')} | {r.get('block', '?')} | {r.get('V', '?')} | {name} |"
    if 'error' in r:
      lines.append(f"{lead} failed: {r['error'][-200:]} |")
      continue
    same = [x for x in results if 'error' not in x and case_of(x) == case_of(r)]
    base = next((x for x in same if x['schedule'] == baseline), None)
    clean = next((x for x in same if x['schedule'] == CLEAN), None)

    def ratio(m, of=ms):
      x, b = of(r, m), of(base, m)
      return '-' if x is None or not b else f'{x / b:.3g}x'

    def vs_clean(m):  # a noisy-only schedule's time is added to the clean pass's
      x, c = ms(r, m), ms(clean, m)
      if x is None or not c or r['schedule'] in (CLEAN, CONV, CONV_AUTODIFF):
        return '-'
      whole = x if r['schedule'].startswith(WHOLE_PASS) else c + x
      return f"{whole / ((1 + r['V']) * c):.2f}"

    g = r.get
    lines.append(
        f"{lead} {bench_util.fmt(g('fwd_ms'), '.2f')} | {bench_util.fmt(g('fwdbwd_ms'), '.2f')} | "
        f"{bench_util.fmt(g('fwd_temp_gib'), '.3f')} | "
        f"{bench_util.fmt(g('fwdbwd_temp_gib'), '.3f')} | {ratio('fwd')} | {ratio('fwdbwd')} | "
        f"{vs_clean('fwd')} | {vs_clean('fwdbwd')} | "
        f"{ratio('fwd', gib)} | {ratio('fwdbwd', gib)} |")
  return '\n'.join(lines)
