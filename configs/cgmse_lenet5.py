"""LeNet-5 on Fashion-MNIST trained with CGMSE (PDCNNO's conjugate gradient optimizer).

Mini-batch mode (line search and curvature on the current batch):

  python -m pdcnno_jax.main --config=configs/cgmse_lenet5.py --workdir=workdirs/cgmse

Full-batch mode (the paper's Map phase: many CG iterations over one data shard):

  python -m pdcnno_jax.main --config=configs/cgmse_lenet5.py --workdir=workdirs/cgmse_fb \
      --config.optimizer.mode=full_batch

Measured (benchmarks/bench_cgmse_lenet.py, batch 128, idle 2-core CPU): mini-batch mode
86.6% test accuracy after 5 epochs (3 value-and-gradient evaluations per step, 158 s);
full-batch mode 31.6%, 65.9% and 71.3% after 4, 8 and 12 CG iterations (34 evaluations of
the whole split, 803 s). SGD with default.py's recipe (Nesterov 0.9, lr 0.05, 1-epoch warm-up,
cosine over 5 epochs, batch 128; ``main --config=configs/default.py --config.num_epochs=5
--config.seed=S``) passes 88% at epoch 3 for seeds 0-2 (88.92 / 88.64 / 89.43%) and ends at
89.72 / 90.01 / 90.62% after 5 epochs (61-70 s per run, idle machine). CGMSE did not converge
faster than SGD here. Both modes differentiate the model inside control flow (line
search, re-evaluation, chunked loss), so ``model.conv_gradients='auto'`` uses models/conv.py's
convolution, 3.5x (mini-batch) and ~7x (full batch) faster than JAX's rules on XLA:CPU.
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
