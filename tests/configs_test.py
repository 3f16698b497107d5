"""Every config file builds: its get_config() runs with its default argument and gives a model
config the trainer resolves (the named variant with the file's overrides)."""
import importlib
import pathlib

import pytest

from flare_jax.train import state as state_lib

_CONFIG_FILES = sorted(p.stem for p in (pathlib.Path(__file__).parents[1] / 'configs').glob('*.py')
                       if p.stem not in ('__init__', 'common'))


def test_the_config_folder_is_listed():
  assert {'base', 'flare_tiny', 'flare_2b', 'flare_9b', 'demo_cpu'} <= set(_CONFIG_FILES)


@pytest.mark.parametrize('name', _CONFIG_FILES)
def test_config_file_builds_a_model_config(name):
  c = importlib.import_module(f'configs.{name}').get_config()
  model_cfg = state_lib.resolve_model_config(c)
  assert model_cfg.dtype == c.model.dtype and model_cfg.remat == c.model.remat

