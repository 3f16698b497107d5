"""Batched, jitted evaluation of a checkpoint on JSONL task files, per decoding mode.

python -m launch.eval --ckpt=runs/demo/flare/model --task=tasks/arith.jsonl \
    --modes='ar;ar_trust:b=4;diffusion_trust:b=4,threshold=0.9' --out=results.json
(a mode without b= takes the block size the checkpoint's FLARE training used, else 4)

Modes may sample (t=0.8 and more, see --modes); --samples=N decodes every example N times and
reports pass@k beside the accuracy (pass@1), e.g. for code tasks:
python -m launch.eval --ckpt=DIR --task=humaneval.jsonl --samples=10 \
    --modes='ar:t=0.8;diffusion_trust:k=2,t=0.8'

Task kinds (from the file's keys): numeric, exact, code (generation, one result per mode), choice
(log-likelihood) and text (AR perplexity over rows of --seq_len tokens, and FLARE's training loss
at the checkpoint's trained objective); modes do not apply to the last two. See
flare_jax/eval/tasks.py. Prints a table and writes JSON per task; --task=a,b,c evaluates several
with one model load (every file is checked before the first is evaluated). --save_outputs also
writes every generated output and its score to RESULTS.outputs.jsonl.
"""
import dataclasses
import json
import os
import sys

import jax
from absl import app
from absl import flags

from flare_jax.checkpoint import model_io
from flare_jax.data import tokenizer as tokenizer_lib
from flare_jax.eval import harness
from flare_jax.eval import report
from flare_jax.eval import tasks
from flare_jax.sampling import training_record
from launch import runtime

_CKPT = flags.DEFINE_string('ckpt', None,
                            'Model dir (launch.train workdir/model or convert_hf out).',
                            required=True)
_TASK = flags.DEFINE_string('task', None, 'Task JSONL file, or several joined by "," (the model '
                            'loads once; each result file is written as its task finishes).',
                            required=True)
_MODES = flags.DEFINE_string('modes', 'ar;ar_trust;diffusion_trust:threshold=0.9',
                             'Modes joined by ";": mode[:b=B,threshold=X | k=K | factor=F | '
                             'entropy=H] (bare names may be '
                             'comma-separated), greedy unless sampling: t=T (temperature), '
                             'top_p=P, top_k=K, e.g. "ar:t=0.8,top_p=0.95".')
_SAMPLES = flags.DEFINE_integer('samples', 1, 'Decodes per example (generated kinds): accuracy is '
                                'their mean (pass@1), and pass@k is reported for k = 1, 5, 10, '
                                '100 up to it and for it. Use with sampling modes (t=...).')
_SEED = flags.DEFINE_integer('seed', 0, "Sampling modes' seed.")
_LIMIT = flags.DEFINE_integer('limit', 0, 'Evaluate only the first N examples (0 = all).')
_BATCH = flags.DEFINE_integer('batch_size', 16, 'Sequences per jitted batch.')
_NEW = flags.DEFINE_integer('max_new_tokens', 64, 'Generation budget per example.')
_MAX_PROMPT = flags.DEFINE_integer('max_prompt_len', 512, 'Prompts keep their last N tokens.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 1024, 'text tasks: the texts are cut into rows of this '
                                'many tokens, each scored alone.')
_FLARE_LOSS = flags.DEFINE_bool('flare_loss', True, "text tasks: also FLARE's training loss (AR "
                                 "and diffusion terms) at the objective the checkpoint was trained "
                                 'with, else the default objective.')
_DATA_PARALLEL = flags.DEFINE_bool('data_parallel', True, "Split each batch over this process's "
                                   'devices (params replicated on each).')
_CODE_TIMEOUT = flags.DEFINE_float('code_timeout_s', 10.0, 'Time limit per code-task program.')
_TEMPLATE_KWARGS = flags.DEFINE_string(
    'chat_template_kwargs', '', 'Variables for the chat template (a JSON object), e.g. '
    '\'{"enable_thinking": false}\' (as transformers\' apply_chat_template kwargs).')
_TOKENIZER = flags.DEFINE_string('tokenizer', '', "'byte' or a dir with tokenizer.json "
                                 "('' = the checkpoint's tokenizer, else byte).")
_CHAT = flags.DEFINE_bool('chat', False, "Send each example's prompt as a user turn through the "
                          "checkpoint's chat template (instruct checkpoints).")
_SAVE_OUTPUTS = flags.DEFINE_bool(
    'save_outputs', False, 'Generated kinds: also write every output with its score, one JSON '
    'line each ({"mode", "example", "sample", "prompt", "output", "score"}), to '
    'RESULTS.outputs.jsonl beside the results file.')
_OUT = flags.DEFINE_string('out', '', 'JSON results file (default: next to the task, '
                           'TASK.results.json, or TASK.results.N.json if taken: none is '
                           'overwritten).')


# How the kinds that decode nothing (not tasks.GENERATED) are scored: --modes do not apply to
# them (not checked, not recorded).
_SCORED_BY = {'choice': 'loglik', 'text': 'perplexity'}


def _default_out(task: str) -> str:
  """TASK.results.json beside the task file, or the first free TASK.results.N.json (N = 2, 3,
  ...), so that evaluating another checkpoint on the same task keeps the earlier results."""
  stem = os.path.splitext(task)[0] + '.results'
  n = 1
  while os.path.exists(path := stem + ('' if n == 1 else f'.{n}') + '.json'):
    n += 1
  return path


def print_table(results: dict) -> None:
  if 'perplexity' in results:  # a text task
    r = results['perplexity']
    print(f"| nats / token | perplexity | tokens | texts |\n|---|---|---|---|\n"
          f"| {r['nll']:.4f} | {r['perplexity']:.3f} | {r['tokens']} | {r['n']} |")
    if 'flare_loss' in results:
      r = results['flare_loss']
      o = r['objective']
      print(f"\nFLARE loss (block {o['block_size']}, {o['num_views']} views, noise {o['noise']}), "
            f"nats per target:\n| loss | AR term | diffusion term | targets |\n|---|---|---|---|\n"
            f"| {r['loss']:.4f} | {r['loss_ar']:.4f} | {r['loss_diff']:.4f} | "
            f"{int(r['n_targets'])} |")
    return
  if 'loglik' in results:  # a choice task
    r = results['loglik']
    print(f"| accuracy | accuracy (per-byte log-likelihood) | examples |\n|---|---|---|\n"
          f"| {r['accuracy']:.3f} | {r['accuracy_norm']:.3f} | {r['n']} |")
    return
  graded = any('line_prefix' in r for r in results.values())  # 'exact' tasks
  passes = [k for k in next(iter(results.values()), {}) if k.startswith('pass@')]
  print('| mode | accuracy |' + ''.join(f' {k} |' for k in passes) +
        (' line prefix |' if graded else '') + ' tokens/s | passes/token | acceptance |\n|---|---|'
        + '---|' * (len(passes) + graded) + '---|---|---|')
  for name, r in results.items():
    extra = ''.join(f' {r[k]:.3f} |' for k in passes)
    extra += f" {report.cell(r.get('line_prefix'))} |" if graded else ''
    print(f"| {name} | {r['accuracy']:.3f} |{extra} {report.cell(r.get('tokens_per_s'), '.1f')} | "
          f"{report.cell(r.get('passes_per_token'))} | {report.cell(r.get('acceptance_rate'))} |")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Too many command-line arguments: {argv[1:]}')
  paths = [p for p in _TASK.value.split(',') if p]
  if not paths:
    raise app.UsageError('--task names no file')
  for path in paths:
    if not os.path.isfile(path):
      raise app.UsageError(f'--task={path}: no such file')
  if _OUT.value and len(paths) > 1:
    raise app.UsageError('--out names one results file: with several tasks leave it out (each '
                         "task's results are written beside it)")
  if _SAMPLES.value < 1:
    raise app.UsageError(f'--samples must be >= 1, got {_SAMPLES.value}')
  if _SEQ_LEN.value < 2:
    raise app.UsageError(f'--seq_len must be >= 2 (one token predicted), got {_SEQ_LEN.value}')
  record = model_io.load_training(_CKPT.value)
  try:
    # Block sizes not given in a spec: the checkpoint's FLARE training's.
    modes = {spec: harness.mode_config(spec, _NEW.value,
                                       training_record.default_block_size(record))
             for spec in harness.parse_modes(_MODES.value)}
    template_kwargs = tokenizer_lib.parse_template_kwargs(_TEMPLATE_KWARGS.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if _SAMPLES.value > 1 and (greedy := [n for n, cfg in modes.items() if cfg.temperature == 0]):
    print(f'warning: --samples={_SAMPLES.value} with greedy modes {greedy}: their samples are all '
          'the same decode (add t=... to sample)', file=sys.stderr)
  try:  # every task file is read and checked before any is evaluated
    loaded = [(path, *tasks.load_task(path, _LIMIT.value)) for path in paths]
  except ValueError as e:  # a task file's content: the reasons, no flag help
    sys.exit(f'error: {e}')
  kinds = {kind for _, kind, _ in loaded}
  if _CHAT.value and 'text' in kinds:
    sys.exit('error: --chat does not apply to text tasks (they have no prompts)')
  try:
    warnings = {training_record.check_mode(cfg.mode, record) for cfg in modes.values()
                if kinds & set(tasks.GENERATED)}
  except ValueError as e:
    sys.exit(f'error: {e}')
  for warning in sorted(filter(None, warnings)):
    print(f'warning: {warning}', file=sys.stderr)
  try:
    model = model_io.load_model(_CKPT.value)
    tok = tokenizer_lib.checkpoint_tokenizer(_CKPT.value, _TOKENIZER.value,
                                             _TEMPLATE_KWARGS.value)
    if _CHAT.value:
      loaded = [(path, kind, [dict(ex, prompt=tokenizer_lib.render_user_prompt(tok, ex['prompt']))
                              for ex in examples]) for path, kind, examples in loaded]
  except (ValueError, OSError) as e:
    sys.exit(f'error: {e}')
  devices = jax.local_devices() if _DATA_PARALLEL.value else None
  objective = training_record.trained_objective(record) if _FLARE_LOSS.value else None
  used = devices or jax.local_devices()[:1]
  run_on = f'{len(used)} x {used[0].device_kind}'  # what the speed figures were measured on
  for path, kind, examples in loaded:
    task_modes = modes if kind in tasks.GENERATED else {}
    templated = ' through the chat template' if _CHAT.value else ''
    print(f'{path}: {len(examples)} {kind} examples{templated}; '
          f'modes: {_SCORED_BY.get(kind, list(task_modes))}')
    results = harness.evaluate(model, tok, kind, examples, task_modes, batch_size=_BATCH.value,
                               max_prompt_len=_MAX_PROMPT.value,
                               code_timeout_s=_CODE_TIMEOUT.value, seq_len=_SEQ_LEN.value,
                               objective=objective, devices=devices, samples=_SAMPLES.value,
                               seed=_SEED.value, keep_outputs=_SAVE_OUTPUTS.value)
    print_table(results)
    out = _OUT.value or _default_out(path)
    if _SAVE_OUTPUTS.value and task_modes:
      outputs_path = os.path.splitext(out)[0] + '.outputs.jsonl'
      _write_outputs(outputs_path, examples, results)
      print(f'wrote {outputs_path}')
    _write_json(out, {
        'ckpt': _CKPT.value, 'task': path, 'kind': kind, 'chat': _CHAT.value,
        'chat_template_kwargs': template_kwargs, 'training': record, 'devices': run_on,
        'batch_size': _BATCH.value, 'samples': _SAMPLES.value, 'seed': _SEED.value,
        'sampler_configs': {name: dataclasses.asdict(cfg) for name, cfg in task_modes.items()},
        'results': results})
    print(f'wrote {out}')


def _write_outputs(path: str, examples: list[dict], results: dict) -> None:
  """Moves every mode's kept outputs and scores out of `results` into JSONL at `path`, one line per
  output (whole or not at all, through path.partial)."""
  partial = path + '.partial'
  with open(partial, 'w') as f:
    for mode, r in results.items():
      outputs, scores = r.pop('outputs'), r.pop('scores')
      samples = len(outputs) // len(examples)
      for i, (output, score) in enumerate(zip(outputs, scores)):
        f.write(json.dumps({'mode': mode, 'example': i // samples, 'sample': i % samples,
                            'prompt': examples[i // samples]['prompt'], 'output': output,
                            'score': score}) + '\n')
  os.replace(partial, path)


def _write_json(path: str, obj) -> None:
  """Writes obj to path whole or not at all (through path.partial)."""
  partial = path + '.partial'
  with open(partial, 'w') as f:
    json.dump(obj, f, indent=1)
  os.replace(partial, path)


if __name__ == '__main__':
  runtime.run(main)
