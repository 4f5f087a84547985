"""Every config file loads, passes validation and builds its model for its data set."""

import glob
import os

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from pdcnno_jax import config_lib, config_validation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')))


def test_there_are_configs():
  assert any(path.endswith('default.py') for path in CONFIGS)


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_config_loads_validates_and_builds(path):
  module = config_lib.load_config_module(path)
  assert module.__doc__ and 'python -m pdcnno_jax' in module.__doc__, (
      'a config docstring gives the command to run it')
  config = module.get_config()
  config_validation.validate(config)
  input_shape, num_classes = config_validation.model_input(config)
  # Shapes only: building every full-size model for real would take minutes on CPU.
  model = config_validation.abstract_model(config)
  graphdef, state = nnx.split(model)
  out = jax.eval_shape(lambda s: nnx.merge(graphdef, s)(
      jnp.zeros((2,) + tuple(input_shape)), train=False), state)
  assert out.shape == (2, num_classes)


def test_unknown_values_are_clear_errors():
  config = config_lib.load_config(os.path.join(REPO, 'configs', 'default.py'))
  config.parallel.balancer = 'fair'
  with pytest.raises(config_validation.ConfigError, match='parallel.balancer'):
    config_validation.validate(config)


def test_unknown_mode_is_a_clear_error():
  if 'parallel.mode' not in config_validation.choices():
    pytest.skip('no mode registry (pdcnno_jax/modes.py) in this checkout')
  config = config_lib.load_config(os.path.join(REPO, 'configs', 'default.py'))
  config.parallel.mode = 'allreduce'
  with pytest.raises(config_validation.ConfigError, match='parallel.mode'):
    config_validation.validate(config)
