"""The demo report's table and plot: the graded next-line score where a task has it."""
import os

from flare_jax.eval import report


def _results():
  speed = dict(passes_per_token=0.5, tokens_per_s=100.0)
  return {'tasks': {
      'nextline': {'flare_model': {'ar': dict(accuracy=0.0, line_prefix=0.25, **speed),
                                   'ar_trust:b=4': dict(accuracy=0.0, line_prefix=0.25,
                                                        acceptance_rate=0.75, **speed)}},
      'arithmetic': {'flare_model': {'ar': dict(accuracy=0.5, acceptance_rate=float('nan'),
                                                **speed)}}}}


def test_table_shows_line_prefix_and_acceptance_only_where_measured():
  lines = report.table(_results()).split('\n')
  assert lines[0].count('|') == lines[1].count('|') == 9
  assert lines[2] == '| nextline | flare_model | `ar` | 0.000 | 0.250 | 0.500 | 100.0 | - |'
  assert lines[3].endswith('| 0.250 | 0.500 | 100.0 | 0.750 |')
  assert lines[4] == '| arithmetic | flare_model | `ar` | 0.500 | - | 0.500 | 100.0 | - |'


def test_plot_writes_a_png(tmp_path):
  path = os.path.join(tmp_path, 'plot.png')
  report.plot(_results(), path)
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
