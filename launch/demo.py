"""The whole method end to end on an embedded default, no downloads: the Python standard library's
own source (a real corpus on every machine) plus generated arithmetic.

python -m launch.demo --config=configs/demo_cpu.py --workdir=runs/demo     (CPU, ~10 minutes)
python -m launch.demo --config=configs/demo_gpu.py --workdir=runs/demo_gpu (one GPU, bigger model)

(a) trains a small hybrid (GDN + attention) AR model from scratch (objective 'ar'),
(b) converts it with the FLARE objective (two-stream training initialised from (a)),
(c) evaluates AR, AR-Trust and Diffusion-Trust settings on held-out standard-library files
    (next-line completion exact match; AR perplexity before and after conversion) and on a generated
    arithmetic task, checking greedy AR-Trust == greedy AR token for token (re-decoded in fp32 when
    the model computes in 16 bits),
(d) writes workdir/report.md, workdir/results.json and workdir/quality_vs_speed.png.
A workdir holding finished stages reuses them (delete it to start over).
"""
import json
import os
import random
import subprocess
import sys
import time

import jax
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from flare_jax.checkpoint import model_io
from flare_jax.data import sources
from flare_jax.data import tokenizer as tokenizer_lib
from flare_jax.eval import harness
from flare_jax.eval import report
from flare_jax.eval import tasks
from launch import runtime

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/demo_cpu.py', 'Demo config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', 'runs/demo', 'Output directory.')



def _say(msg: str) -> None:
  print(f'[demo {time.strftime("%H:%M:%S")}] {msg}', flush=True)


def write_corpus(path: str, num_files: int, num_arith: int, max_operand: int) -> str:
  """Training JSONL: standard-library train-split files as {"text"} and arithmetic {"prompt",
  "response"} examples, interleaved by a seeded shuffle. Returns a one-line description."""
  src = sources.StdlibSource('train')
  files = range(len(src)) if not num_files else random.Random(0).sample(range(len(src)),
                                                                      min(num_files, len(src)))
  lines = [json.dumps(src[i]) for i in files]
  arith = sources.SyntheticArithmeticSource(num_arith, seed=0, max_operand=max_operand)
  lines += [json.dumps(arith[i]) for i in range(len(arith))]
  random.Random(1).shuffle(lines)
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines) + '\n')
  os.replace(tmp, path)
  return f'{len(files)} standard-library files + {len(arith)} arithmetic examples'


def heldout_tasks(workdir: str, n: int, max_operand: int, seed: int = 0) -> dict[str, str]:
  """Writes the held-out tasks; returns {name: path}. Next-line: a context of up to 12 lines from a
  held-out file, the target its next non-blank line (at least 8 characters). Arithmetic: generated
  with another seed than the training set (the operand space is small, so some overlap)."""
  rng = random.Random(seed)
  src = sources.StdlibSource('heldout')
  nextline = []
  for _ in range(50 * n):
    if len(nextline) == n:
      break
    lines = src[rng.randrange(len(src))]['text'].split('\n')
    i = rng.randrange(1, max(2, len(lines)))
    target = lines[i].rstrip() if i < len(lines) else ''
    if len(target.strip()) >= 8:
      nextline.append({'prompt': '\n'.join(lines[max(0, i - 12):i]) + '\n', 'target': target})
  arith = sources.SyntheticArithmeticSource(n, seed=12345, max_operand=max_operand)
  paths = {'nextline': os.path.join(workdir, 'task_nextline.jsonl'),
           'arithmetic': os.path.join(workdir, 'task_arithmetic.jsonl')}
  tasks.write_task(paths['nextline'], nextline)
  problems = [arith[i] for i in range(n)]
  tasks.write_task(paths['arithmetic'],
                   [{'prompt': a['prompt'], 'answer': a['response']} for a in problems])
  return paths


def _config_overrides(argv: list[str]) -> list[str]:
  """The --config.* overrides this demo was given (forwarded to each training stage)."""
  return [a for a in argv if a.startswith('--config.')]


def train_stage(workdir: str, name: str, overrides: list[str]) -> str:
  """Runs `python -m launch.train` (its own process: a clean JAX runtime per stage) unless workdir
  already holds the stage's final model. Returns the model dir."""
  model_dir = os.path.join(workdir, 'model')
  if os.path.exists(os.path.join(model_dir, 'model_config.json')):
    _say(f'{name}: reusing {model_dir}')
    return model_dir
  t0 = time.time()
  config_file = config_flags.get_config_filename(flags.FLAGS['config'])
  cmd = [sys.executable, '-m', 'launch.train', f'--config={config_file}',
         f'--workdir={workdir}', *overrides]
  proc = subprocess.run(cmd, check=False)
  if proc.returncode:
    raise SystemExit(f'{name} training failed (exit {proc.returncode}): {" ".join(cmd)}')
  _say(f'{name}: trained in {time.time() - t0:.0f} s')
  return model_dir


def ar_trust_agreement(model, tok, rows, ar_outputs, trust_outputs, batch_size) -> dict:
  """Greedy AR-Trust vs greedy AR outputs: how many are identical and, where they differ, the AR
  path's top-2 logit gap at the first differing token (next to the median gap at each example's
  first generated token, for scale). Texts are re-encoded: exact for the byte tokenizer."""
  differ = [i for i, (a, b) in enumerate(zip(ar_outputs, trust_outputs)) if a != b]
  out = dict(identical=len(rows) - len(differ), n=len(rows))
  if differ:
    at = [rows[i]['prompt'] + os.path.commonprefix([ar_outputs[i], trust_outputs[i]])
          for i in differ]
    out['gap_at_difference'] = harness.top2_gaps(model, tok, at, batch_size=batch_size).tolist()
    first = harness.top2_gaps(model, tok, [r['prompt'] for r in rows], batch_size=batch_size)
    out['median_gap_at_first_token'] = float(np.median(first))
  return out


def ar_trust_agreements(model, tok, examples, modes, task_results, batch_size) -> dict:
  """{task: {AR-Trust mode: `ar_trust_agreement`}} for the FLARE model's outputs."""
  trust = [m for m in modes if m.startswith('ar_trust')]
  outputs = lambda task, mode: task_results[task]['flare_model'][mode]['outputs']
  return {task: {m: ar_trust_agreement(model, tok, rows, outputs(task, 'ar'), outputs(task, m),
                                       batch_size) for m in trust}
          for task, (_, rows) in examples.items()}


def ar_trust_checks(model_dir, tok, examples, modes, task_results, batch_size) -> dict:
  """{check name: passed}: greedy AR-Trust must reproduce greedy AR token for token.

  In fp32 compute that holds for every output. In 16-bit compute the verify pass (a block of tokens
  at once) and the one-token step round differently, so near-ties can flip: the rows whose outputs
  differ are decoded again (AR and every AR-Trust mode) in fp32 at highest matmul precision, where
  they must agree. Rows that agree in 16-bit are not re-decoded.
  """
  trust = [m for m in modes if m.startswith('ar_trust')]
  dtype = model_io.load_config(model_dir).dtype
  model32, checks = None, {}
  for task, (kind, rows) in examples.items():
    out = task_results[task]['flare_model']
    differ = [i for i in range(len(rows))
              if any(out[m]['outputs'][i] != out['ar']['outputs'][i] for m in trust)]
    if not differ or dtype == 'float32':
      checks[f'{task}: greedy AR-Trust == AR'] = not differ
      continue
    _say(f'exactness check ({task}): {len(differ)} rows differ in {dtype}; decoding them again '
         'in float32 compute')
    model32 = model32 or model_io.load_model(model_dir, dtype='float32')
    with jax.default_matmul_precision('highest'):  # no TF32: ties at 1e-3 would flip again
      res = harness.evaluate(model32, tok, kind, [rows[i] for i in differ],
                             {m: modes[m] for m in ['ar'] + trust}, keep_outputs=True,
                             batch_size=batch_size)
    checks[f'{task}: greedy AR-Trust == AR ({dtype}; {len(differ)} differing row(s) decoded '
           'again in float32 compute)'] = all(
               res[m]['outputs'] == res['ar']['outputs'] for m in trust)
  return checks


def write_report(results: dict, workdir: str, t_start: float) -> None:
  """results.json, report.md and the plot (written again when the checks are in)."""
  results['seconds'] = time.time() - t_start
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1, default=str)
  report.write(results, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Too many command-line arguments: {argv[1:]}')
  c = _CONFIG.value
  workdir = os.path.abspath(_WORKDIR.value)
  os.makedirs(workdir, exist_ok=True)
  t_start = time.time()

  corpus = os.path.join(workdir, 'train.jsonl')
  if not os.path.exists(corpus):
    _say('corpus: ' + write_corpus(corpus, c.demo.stdlib_files, c.demo.arithmetic_examples,
                                     c.demo.arithmetic_max_operand))

  user = _config_overrides(sys.argv[1:])
  data = ['--config.data.source=jsonl', f'--config.data.paths={corpus}']
  _say('(a) AR pre-training from scratch')
  ar_model_dir = train_stage(os.path.join(workdir, 'ar'), 'AR',
                             user + data + ['--config.objective.name=ar'])

  _say('(b) FLARE conversion (two-stream objective, initialised from the AR model)')
  flare_model_dir = train_stage(
      os.path.join(workdir, 'flare'), 'FLARE',
      user + data + ['--config.objective.name=flare', f'--config.init_from={ar_model_dir}',
                     f'--config.train.num_steps={c.demo.flare_steps}',
                     f'--config.optim.lr={c.demo.flare_lr}'])

  _say('(c) evaluation')
  runtime.enable_compilation_cache(c.train.compilation_cache, workdir)  # a rerun skips compiles
  tok = tokenizer_lib.load_tokenizer(c.data.tokenizer)
  paths = heldout_tasks(workdir, c.demo.eval_examples, c.demo.arithmetic_max_operand)
  modes = {s: harness.mode_config(s, c.demo.max_new_tokens)
           for s in harness.parse_modes(c.demo.modes)}
  examples = {task: tasks.load_task(path) for task, path in paths.items()}  # task -> (kind, rows)
  heldout_text = [sources.StdlibSource('heldout')[i]['text'] for i in range(20)]
  results = {'config': c.to_dict(), 'perplexity': {}, 'tasks': {}}
  kw = dict(batch_size=c.demo.eval_batch_size)
  for label, model_dir in (('ar_model', ar_model_dir), ('flare_model', flare_model_dir)):
    model = model_io.load_model(model_dir)
    results['perplexity'][label] = harness.perplexity(
        model, tok, heldout_text, seq_len=c.data.seq_len, max_rows=c.demo.ppl_rows, **kw)
    _say(f'held-out perplexity ({label}): {results["perplexity"][label]["perplexity"]:.3f}')
    task_modes = modes if label == 'flare_model' else {'ar': modes['ar']}
    for task, (kind, rows) in examples.items():
      res = harness.evaluate(model, tok, kind, rows, task_modes, keep_outputs=True, **kw)
      results['tasks'].setdefault(task, {})[label] = res
  results['agreement'] = ar_trust_agreements(model, tok, examples, modes, results['tasks'],
                                             c.demo.eval_batch_size)  # model: the FLARE model
  results['checks'] = {}
  write_report(results, workdir, t_start)  # nothing measured is lost if the checks are cut short
  _say(f'evaluation written to {workdir}/results.json; exactness checks next')
  results['checks'] = ar_trust_checks(flare_model_dir, tok, examples, modes, results['tasks'],
                                      c.demo.eval_batch_size)

  _say('(d) report')
  write_report(results, workdir, t_start)
  _say(f'wrote {workdir}/report.md and {workdir}/quality_vs_speed.png '
       f'({results["seconds"]:.0f} s in all)')
  print(open(os.path.join(workdir, 'report.md'), encoding='utf-8').read())
  if not all(results['checks'].values()):
    raise SystemExit('greedy AR-Trust diverged from greedy AR: see the report')


if __name__ == '__main__':
  runtime.run(main)
