"""The demo's markdown report and quality-vs-throughput plot, from launch.demo's results dict."""
import os

import numpy as np

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

_TASK_METRIC = {'nextline': 'next-line exact match', 'arithmetic': 'arithmetic accuracy'}
_LINE_PREFIX = 'line prefix match (share of the longer line)'


def rows(results: dict):
  """(task, model, mode, metrics) for every evaluated setting."""
  for task, by_model in results['tasks'].items():
    for model, by_mode in by_model.items():
      for mode, m in by_mode.items():
        yield task, model, mode, m


def cell(x, spec: str = '.3f') -> str:
  """A metric for a table: '-' when absent or NaN (not measured in this mode)."""
  return '-' if x is None or x != x else format(x, spec)


def table(results: dict) -> str:
  lines = ['| task | model | mode | accuracy | line prefix | passes / token | tokens / s | '
           'acceptance |', '|---|---|---|---|---|---|---|---|']
  for task, model, mode, m in rows(results):
    lines.append(f"| {task} | {model} | `{mode}` | {m['accuracy']:.3f} | "
                 f"{cell(m.get('line_prefix'))} | {m['passes_per_token']:.3f} | "
                 f"{m['tokens_per_s']:.1f} | {cell(m.get('acceptance_rate'))} |")
  return '\n'.join(lines)


def plot(results: dict, path: str) -> None:
  tasks = list(results['tasks'])
  fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    settings = [(model, mode, m) for model, by_mode in results['tasks'][task].items()
                for mode, m in by_mode.items()]
    # Exact next lines are rare for small models: plot the graded score where there is one.
    graded = all('line_prefix' in m for _, _, m in settings)
    metric = 'line_prefix' if graded else 'accuracy'
    for model, mode, m in settings:
      marker = 'o' if model == 'flare_model' else 's'
      ax.scatter(m['tokens_per_s'], m[metric], marker=marker)
      ax.annotate(f'{mode}' + (' (AR model)' if model != 'flare_model' else ''),
                  (m['tokens_per_s'], m[metric]), fontsize=7, xytext=(3, 3),
                  textcoords='offset points')
    ax.set_xlabel('throughput (tokens / s, batch decode)')
    ax.set_ylabel(_LINE_PREFIX if graded else _TASK_METRIC.get(task, 'accuracy'))
    ax.set_title(task)
    ax.grid(alpha=0.3)
  fig.suptitle('FLARE demo: quality vs throughput per decoding setting')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def agreement_lines(results: dict) -> str:
  """Greedy AR-Trust vs AR at the model's own compute dtype, with the logit gaps where they
  differ."""
  dtype = results['config']['model']['dtype']
  lines = []
  for task, by_mode in results.get('agreement', {}).items():
    for mode, a in by_mode.items():
      line = (f"- {task}, `{mode}` at {dtype} compute: {a['identical']}/{a['n']} outputs "
              'identical to AR')
      gaps = a.get('gap_at_difference')
      if gaps:
        line += (f"; top-2 logit gap at the first differing token: median {np.median(gaps):.3f}, "
                 f"max {max(gaps):.3f} (median at the first generated token: "
                 f"{a['median_gap_at_first_token']:.3f})")
      lines.append(line)
  return '\n'.join(lines)


def write(results: dict, workdir: str) -> str:
  """Writes report.md and quality_vs_speed.png into workdir; returns the markdown."""
  ppl = results['perplexity']
  checks = '\n'.join(f"- {name}: **{'yes' if ok else 'NO'}**"
                     for name, ok in results['checks'].items()) or '- (not run yet)'
  agreement = agreement_lines(results)
  if agreement:
    checks += '\n\n' + agreement
  cfg = results['config']
  md = f"""# FLARE demo report

Model: `{cfg['model']['variant']}` ({cfg['model']['dtype']}), byte-level; trained AR for
{cfg['train']['num_steps']} steps, then FLARE for {cfg['demo']['flare_steps']} steps.
Total time {results['seconds']:.0f} s. Tasks: next line of held-out standard-library files (exact
match); arithmetic with operands 0..{cfg['demo'].get('arithmetic_max_operand', 100) - 1} (+, -, *).

## Checks
{checks}

## Held-out perplexity (AR path, standard-library files never trained on)
| model | nats / token | perplexity | tokens |
|---|---|---|---|
""" + '\n'.join(f"| {k} | {v['nll']:.4f} | {v['perplexity']:.3f} | {v['tokens']} |"
                for k, v in ppl.items()) + f"""

## Quality and speed per decoding setting
`b`: block size; Diffusion-Trust's commit rule: `threshold` (confidence to commit), `k` (tokens
per pass), `factor` (Fast-dLLM's factor rule) or `entropy` (the EB-sampler's bound, nats).
Line prefix (next-line task): the common prefix of the generated and the true line over the longer
of the two, a graded version of exact match (the plot shows it for that task). Passes / token
counts decode forward passes (prefill excluded): plain AR is 1.0. The prefill also runs AR-Trust's
first draft pass and Diffusion-Trust's first denoising pass (as each block's commit pass runs the
next block's).

{table(results)}

![quality vs throughput](quality_vs_speed.png)
"""
  with open(os.path.join(workdir, 'report.md'), 'w', encoding='utf-8') as f:
    f.write(md)
  plot(results, os.path.join(workdir, 'quality_vs_speed.png'))
  return md
