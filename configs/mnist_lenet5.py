"""LeNet-5 on MNIST (the delay-synchronization paper's setting).

Import MNIST's IDX files first (train-images-idx3-ubyte.gz etc. in <dir>):

  python -m pdcnno_jax.data.idx_import --dataset=mnist --src=<dir> --data_dir=data/tfds
  python -m pdcnno_jax.main --config=configs/mnist_lenet5.py --workdir=workdirs/mnist

Expected result: ~99.0% test accuracy after 10 epochs (a few minutes on 2 CPU cores).

The recipe is default.py's (lr 0.05 after a 1-epoch warm-up): without the warm-up, seed 0
collapses to chance on MNIST (loss ln 10 from the first epoch). With
``--config.data.name=fashion_mnist`` this config is exactly default.py
(``benchmarks/sweep_recipes.py`` checks it), so default.py's seed sweep stands for it:
no seed of 0-9 collapses there.
"""

from pdcnno_jax import config_lib


def get_config():
  """LeNet-5 / MNIST config."""
  config = config_lib.sibling_config(__file__, 'default')
  config.data.name = 'mnist'
  return config
