"""Loading config files (``configs/*.py`` with ``get_config()``) by path.

Experiment configs start from ``configs/default.py`` and override what differs::

  from pdcnno_jax import config_lib

  def get_config():
    config = config_lib.sibling_config(__file__, 'default')
    config.model.name = 'vgg16'
    return config

Loading by path (not ``import configs.default``) works from any working directory, the
same way ``--config=path/to/file.py`` does.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import ml_collections


def load_config_module(path: str) -> ModuleType:
  """Imports the config file at ``path`` as a module."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Config file {path} does not exist.')
  name = 'pdcnno_config_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise AttributeError(f'Config file {path} has no get_config() function.')
  return module


def load_config(path: str) -> ml_collections.ConfigDict:
  """``get_config()`` of the config file at ``path``."""
  return load_config_module(path).get_config()


def sibling_config(file: str, name: str = 'default') -> ml_collections.ConfigDict:
  """``get_config()`` of ``<dir of file>/<name>.py`` (for configs that extend another)."""
  return load_config(os.path.join(os.path.dirname(os.path.abspath(file)), f'{name}.py'))
