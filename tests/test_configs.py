"""Every config file loads, passes validation and builds its model for its data set."""

import glob
import os

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from pdcnno_jax import config_lib, config_validation
from pdcnno_jax.data import datasets
from pdcnno_jax.models import factory

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
  spec = datasets.get_spec(config.data.name)
  if spec.image_shape is None:
    input_shape = (config.data.image_size, config.data.image_size, 3)
  else:
    input_shape = spec.image_shape
  num_classes = (config.data.imagenet_num_classes if config.data.name == 'imagenet2012'
                 else spec.num_classes)
  # Shapes only: building every full-size model for real would take minutes on CPU.
  model = nnx.eval_shape(lambda: factory.build_model(
      config.model, num_classes=num_classes, input_shape=input_shape, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  out = jax.eval_shape(lambda s: nnx.merge(graphdef, s)(
      jnp.zeros((2,) + tuple(input_shape)), train=False), state)
  assert out.shape == (2, num_classes)


def test_unknown_values_are_clear_errors():
  config = config_lib.load_config(os.path.join(REPO, 'configs', 'default.py'))
  config.parallel.mode = 'allreduce'
  with pytest.raises(config_validation.ConfigError, match='parallel.mode'):
    config_validation.validate(config)
