"""The entry points' shared flag handling (`launch.runtime`)."""
import subprocess
import sys

import pytest


@pytest.mark.parametrize('override, field, hint', [
    ('--config.optim.lrr=1', 'lrr', '"lr"'),  # a leaf: ml_collections raises AttributeError
    ('--config.optimm.lr=1', 'optimm', '"optim"'),  # a group: KeyError
])
def test_an_unknown_config_field_is_a_usage_error_not_a_traceback(tmp_path, override, field,
                                                                    hint):
  workdir = tmp_path / 'run'
  run = subprocess.run([sys.executable, '-m', 'launch.train', '--config=configs/flare_tiny.py',
                        f'--workdir={workdir}', '--config.optim.lr=1e-3', override],
                       capture_output=True, text=True, timeout=120)
  assert run.returncode == 1, run.stderr
  assert 'Traceback' not in run.stderr, run.stderr
  assert f'FATAL Flags parsing error: {override}: no config field {field!r}' in run.stderr
  assert f'Did you mean {hint}' in run.stderr
  assert not workdir.exists()  # stopped before anything was written


def test_a_config_file_that_does_not_load_is_a_usage_error(tmp_path):
  missing = tmp_path / 'no_such_config.py'
  run = subprocess.run([sys.executable, '-m', 'launch.train', f'--config={missing}',
                        f'--workdir={tmp_path / "run"}'], capture_output=True, text=True,
                       timeout=120)
  assert run.returncode == 1, run.stderr
  assert 'Traceback' not in run.stderr, run.stderr
  assert (f'FATAL Flags parsing error: --config={missing}: [Errno 2] No such file or directory'
          in run.stderr)
  assert not (tmp_path / 'run').exists()
