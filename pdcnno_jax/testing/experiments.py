"""Fixtures of the training-mode tests: a tiny learnable in-memory data set and its experiment.

Used by the MapReduce and SSP tests, also from the worker processes those tests start.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from pdcnno_jax.data import input_pipeline
from pdcnno_jax.loop import context
from pdcnno_jax.testing import config as config_testing
from pdcnno_jax.train import sharding as sharding_lib
from pdcnno_jax.train import state as state_lib

def quadrants_dataset(num_train=256, seed=0) -> input_pipeline.Dataset:
  """Tiny learnable 28x28 data set: the label is the brightest of 4 image quadrants."""
  rng = np.random.default_rng(seed)

  def split(n):
    images = rng.integers(0, 100, (n, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 4, n).astype(np.int32)
    for q in range(4):
      rows, cols = divmod(q, 2)
      sel = labels == q
      images[sel, rows * 14:(rows + 1) * 14, cols * 14:(cols + 1) * 14] += 120
    return input_pipeline.HostSplit(images, labels)

  return input_pipeline.Dataset(
      name='quadrants', num_classes=4, image_shape=(28, 28, 1),
      num_examples={'train': num_train, 'test': 64}, mean=(0.3,), std=(0.3,),
      host_splits={'train': split(num_train), 'test': split(64)})


def mapreduce_config(**parallel):
  """A 2-epoch MapReduce config on batch 32 with a checkpoint every step."""
  config = config_testing.default_config()
  config.num_epochs = 2
  config.data.batch_size = 32
  config.data.eval_batch_size = 64
  config.optimizer.learning_rate = 0.02
  config.log_every_steps = 1000
  config.checkpoint_every_steps = 1
  config.parallel.mode = 'mapreduce'
  config.parallel.engine = 'jax'  # The collective engine (tests of the Ray one set 'ray').
  config.parallel.update(parallel)
  return config


def make_experiment(config, workdir, num_devices=None, num_train=256):
  """(experiment, optimizer, host state) of LeNet-5 on `quadrants_dataset`."""
  dataset = quadrants_dataset(num_train)
  exp = context.Experiment(
      config=config, workdir=str(workdir), dataset=dataset,
      mesh=sharding_lib.make_mesh(jax.devices()[:num_devices]),
      preprocess=functools.partial(input_pipeline.normalize, dataset=dataset))
  tx = exp.build_optimizer()
  exp.graphdef, state = state_lib.create_train_state(exp.build_model(), tx)
  return exp, tx, jax.device_get(state)


def assert_states_close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                               rtol=rtol, atol=atol)
