"""ResNet-20 (CIFAR-style, 0.27M params) on SVHN with 6,000 validation images held out.

Command (svhn_cropped must be prepared in data/tfds, see configs/vgg16_svhn.py):

  python -m pdcnno_jax.main --config=configs/resnet20_svhn.py --workdir=workdirs/resnet20_svhn

Expected result: ~96% test accuracy after 30 epochs on one GPU.
"""

from pdcnno_jax import config_lib


def get_config():
  """ResNet-20 / SVHN config."""
  config = config_lib.sibling_config(__file__, 'default')
  config.data.name = 'svhn_cropped'
  config.data.validation_holdout = 6000
  config.model.name = 'resnet20'
  config.optimizer.learning_rate = 0.1
  config.optimizer.weight_decay = 1e-4
  config.optimizer.warmup_epochs = 1.0
  config.num_epochs = 30
  return config
