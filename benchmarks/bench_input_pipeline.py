r"""Benchmark: images/s the input pipeline delivers as global device arrays.

Measures `train_batches` (Fashion-MNIST, global batch 128, sharded over every
local device) with and without the background prefetch thread, side by side,
and prints both rates and their ratio. Uses the imported Fashion-MNIST in
--data_dir if present, else generated data of the same shape (60,000 x
28 x 28 x 1 uint8), so the figure never depends on a download.

  python benchmarks/bench_input_pipeline.py [--data_dir=data/tfds] \
      [--batch_size=128] [--num_steps=400]

`measure_pipeline_throughput` is importable so that a training benchmark can
put the pipeline's rate next to a training step's (the pipeline should deliver
>= 5x the images/s of a LeNet-5 step).
"""

from __future__ import annotations

import os
import time

from absl import app
from absl import flags
import jax
import numpy as np

from pdcnno_jax import testing
from pdcnno_jax.data import datasets
from pdcnno_jax.data import input_pipeline

_DATA_DIR = flags.DEFINE_string('data_dir', 'data/tfds', 'TFDS data_dir.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 128, 'Global batch size.')
_NUM_STEPS = flags.DEFINE_integer('num_steps', 400, 'Batches per measurement.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Measurements; the best is kept.')


def _data_sharding() -> jax.sharding.NamedSharding:
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))


def measure_pipeline_throughput(
    dataset: input_pipeline.Dataset,
    batch_size: int,
    num_steps: int,
    *,
    prefetch: int = 2,
    sharding: jax.sharding.Sharding | None = None,
) -> float:
  """Images/s that `train_batches` delivers as ready global device arrays.

  The first batch (thread start, first transfer) is excluded; epochs are
  chained when `num_steps` exceeds one epoch.

  Args:
    dataset: from `input_pipeline.load_dataset` (or built directly).
    batch_size: global batch size.
    num_steps: batches to time.
    prefetch: batches prepared ahead by the background thread.
    sharding: batch sharding; default shards over every device.

  Returns:
    Images per second.
  """
  sharding = sharding or _data_sharding()

  def batches():
    epoch = 0
    while True:
      yield from input_pipeline.train_batches(
          dataset, global_batch_size=batch_size, epoch=epoch, seed=0,
          sharding=sharding, prefetch=prefetch)
      epoch += 1

  stream = batches()
  jax.block_until_ready(next(stream))
  start = time.perf_counter()
  for _ in range(num_steps):
    jax.block_until_ready(next(stream))
  elapsed = time.perf_counter() - start
  return num_steps * batch_size / elapsed


def _generated_fashion_mnist() -> input_pipeline.Dataset:
  """Random data with Fashion-MNIST's shapes (used when it is not imported)."""
  rng = np.random.default_rng(0)
  spec = datasets.get_spec('fashion_mnist')

  def split(n):
    return input_pipeline.HostSplit(
        rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
        rng.integers(0, 10, (n,), dtype=np.int32))

  return input_pipeline.Dataset(
      name='fashion_mnist (generated)', num_classes=10, image_shape=(28, 28, 1),
      num_examples={'train': 60000, 'test': 10000}, mean=spec.mean,
      std=spec.std, host_splits={'train': split(60000), 'test': split(10000)})


def main(argv: list[str]) -> None:
  del argv
  config = testing.section('data', name='fashion_mnist', data_dir=_DATA_DIR.value)
  start = time.perf_counter()
  try:
    dataset = input_pipeline.load_dataset(config, seed=0)
    source = f'{_DATA_DIR.value} ({time.perf_counter() - start:.1f} s to load)'
  except datasets.DatasetNotFoundError:
    dataset = _generated_fashion_mnist()
    source = 'generated (Fashion-MNIST not imported)'
  print(f'data: {dataset.name} from {source}')
  print(f'devices: {jax.device_count()} x {jax.devices()[0].platform}, '
        f'global batch {_BATCH_SIZE.value}, {_NUM_STEPS.value} steps, '
        f'best of {_REPEATS.value}')
  print(f'loadavg before: {os.getloadavg()}')
  rates = {0: 0.0, 2: 0.0}  # Prefetch depth -> best images/s.
  for _ in range(_REPEATS.value):  # Interleaved: same machine conditions.
    for prefetch in rates:
      rates[prefetch] = max(rates[prefetch], measure_pipeline_throughput(
          dataset, _BATCH_SIZE.value, _NUM_STEPS.value, prefetch=prefetch))
  print(f'train_batches, no prefetch thread: {rates[0]:12,.0f} images/s')
  print(f'train_batches, prefetch=2:         {rates[2]:12,.0f} images/s')
  print(f'ratio prefetch/no prefetch:        {rates[2] / rates[0]:12.2f}')
  print(f'loadavg after: {os.getloadavg()}')


if __name__ == '__main__':
  app.run(main)
