"""configs/default.py for tests: the complete default config, or one section with overrides.

Library code reads `config.x.y` directly and never falls back to a default, so a test that
builds a model, an optimizer or a data set passes a whole section, e.g.
`section('model', name='vgg11', width_multiplier=0.25)`.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from pdcnno_jax import config_lib

DEFAULT_CONFIG_PATH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    'configs', 'default.py')


def default_config() -> ml_collections.ConfigDict:
  """A fresh copy of `configs/default.py`'s `get_config()`."""
  return config_lib.load_config(DEFAULT_CONFIG_PATH)


def section(name: str, /, **overrides: Any) -> ml_collections.ConfigDict:
  """`default_config()[name]` with `overrides` applied (each key must exist there).

  Raises:
    KeyError: an override names a key that `configs/default.py` does not set.
  """
  config = default_config()[name]
  unknown = sorted(set(overrides) - set(config.keys()))
  if unknown:
    raise KeyError(f'config.{name} has no keys {unknown}; configs/default.py sets '
                   f'{sorted(config.keys())}.')
  config.update(overrides)
  return config
