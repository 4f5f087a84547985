"""LeNet-5 on Fashion-MNIST trained with CGMSE (PDCNNO's conjugate gradient optimizer).

Mini-batch mode (line search and curvature on the current batch):

  python -m pdcnno_jax.main --config=configs/cgmse_lenet5.py --workdir=workdirs/cgmse

Full-batch mode (the paper's Map phase: many CG iterations over one data shard):

  python -m pdcnno_jax.main --config=configs/cgmse_lenet5.py --workdir=workdirs/cgmse_fb \
      --config.optimizer.mode=full_batch

Expected result: about 88-90% test accuracy after 5 epochs in mini-batch mode (each step
costs about 3 gradient evaluations); full batch is slower to reach the same accuracy.
"""

from pdcnno_jax import config_lib


def get_config():
  """CGMSE / LeNet-5 / Fashion-MNIST config."""
  config = config_lib.sibling_config(__file__, 'default')
  config.optimizer.name = 'cgmse'
  config.optimizer.mode = 'minibatch'
  config.data.batch_size = 256
  config.num_epochs = 5
  config.optimizer.full_batch_iterations = 50
  return config
