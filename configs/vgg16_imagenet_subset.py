"""VGG-16 on a 10-class subset of ImageNet-2012 at 224x224 (PDCNNO's large-input setting).

ImageNet cannot be downloaded automatically: put ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar in a manual dir and run `tfds build imagenet2012
--manual_dir=<dir> --data_dir=data/tfds` once. Then, on a GPU/TPU host:

  python -m pdcnno_jax.main --config=configs/vgg16_imagenet_subset.py \
      --workdir=workdirs/vgg16_in10

Expected result: roughly 80% top-1 on the 10-class validation subset after 30 epochs
(streaming tf.data input; 13k training images).
"""

from pdcnno_jax import config_lib


def get_config():
  """VGG-16 / ImageNet-10 config."""
  config = config_lib.sibling_config(__file__, 'default')
  config.data.name = 'imagenet2012'
  config.data.image_size = 224
  config.data.imagenet_num_classes = 10
  config.data.in_memory = False
  config.data.batch_size = 64
  config.data.eval_batch_size = 250
  config.model.name = 'vgg16'
  config.model.batch_norm = True
  config.model.dropout_rate = 0.5
  config.optimizer.learning_rate = 0.02
  config.optimizer.weight_decay = 5e-4
  config.optimizer.warmup_epochs = 2.0
  config.num_epochs = 30
  return config
