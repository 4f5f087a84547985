"""VGG-16 (13 conv + 3 fc, BatchNorm) on SVHN, 6,000 training images held out (PDCNNO).

Command (needs svhn_cropped prepared in data/tfds: `tfds build svhn_cropped
--data_dir=data/tfds` on a machine with network access, then copy the directory):

  python -m pdcnno_jax.main --config=configs/vgg16_svhn.py --workdir=workdirs/vgg16_svhn

Expected result: ~95-96% test accuracy after 30 epochs (GPU: about 20 min; too slow for a
2-core CPU, where configs/vgg_fmnist_small.py is the stand-in).
"""

from pdcnno_jax import config_lib


def get_config():
  """VGG-16 / SVHN config."""
  config = config_lib.sibling_config(__file__, 'default')
  config.data.name = 'svhn_cropped'
  config.data.validation_holdout = 6000
  config.data.batch_size = 128
  config.model.name = 'vgg16'
  config.model.batch_norm = True
  config.model.dropout_rate = 0.5
  config.optimizer.learning_rate = 0.05
  config.optimizer.weight_decay = 5e-4
  config.optimizer.warmup_epochs = 1.0
  config.num_epochs = 30
  config.checkpoint_every_steps = 2000
  return config
