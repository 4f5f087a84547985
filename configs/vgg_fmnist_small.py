"""A VGG-style model small enough for CPU: VGG-11 at width 1/4 with BatchNorm on Fashion-MNIST.

Command:

  python -m pdcnno_jax.main --config=configs/vgg_fmnist_small.py --workdir=workdirs/vgg_small

Expected result: ~92% test accuracy after 5 epochs (about 15 min on 2 CPU cores).
"""

from pdcnno_jax import config_lib


def get_config():
  """VGG-11 (width 0.25) / Fashion-MNIST config."""
  config = config_lib.sibling_config(__file__, 'default')
  config.model.name = 'vgg11'
  config.model.width_multiplier = 0.25
  config.model.batch_norm = True
  config.optimizer.learning_rate = 0.05
  config.optimizer.weight_decay = 5e-4
  config.num_epochs = 5
  return config
