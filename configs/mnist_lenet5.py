"""LeNet-5 on MNIST (the delay-synchronization paper's setting).

Import MNIST's IDX files first (train-images-idx3-ubyte.gz etc. in <dir>):

  python -m pdcnno_jax.data.idx_import --dataset=mnist --src=<dir> --data_dir=data/tfds
  python -m pdcnno_jax.main --config=configs/mnist_lenet5.py --workdir=workdirs/mnist

Expected result: ~99.0% test accuracy after 10 epochs (a few minutes on 2 CPU cores).
"""

from pdcnno_jax import config_lib


def get_config():
  """LeNet-5 / MNIST config."""
  config = config_lib.sibling_config(__file__, 'default')
  config.data.name = 'mnist'
  return config
