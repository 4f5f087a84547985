"""LeNet-5 training throughput: pdcnno_jax's step vs a minimal Flax NNX + optax loop.

Both train the same LeNet-5 (pdcnno_jax.models.lenet.LeNet5, 28x28x1, 10 classes) with the
same optimizer (SGD + Nesterov momentum) and global batch, on batches already on the device,
in one process. Measurements alternate between the contestants in several rounds and report
medians, so background load drifts affect both alike. Also printed:

  * input pipeline images/s vs the trainer step's images/s (bar: >= 5x);
  * where PyTorch is installed, the same network and batch in PyTorch (CPU, eager), as a
    reference point.

  python benchmarks/bench_train_step.py [--batch_size=128] [--steps=200] [--rounds=5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pdcnno_jax import testing
from pdcnno_jax.models import factory
from pdcnno_jax.train import sharding as sharding_lib
from pdcnno_jax.train import state as state_lib
from pdcnno_jax.train import steps as steps_lib

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST.


def _preprocess(images):
  return (images.astype(jnp.float32) / 255.0 - MEAN) / STD


def _model(seed=0):
  config = testing.section('model', name='lenet5', width_multiplier=1.0)
  return factory.build_model(config, num_classes=10, input_shape=(28, 28, 1),
                             rngs=nnx.Rngs(seed))


def _batches(batch_size, count=8, seed=0):
  rng = np.random.default_rng(seed)
  return [{'image': rng.integers(0, 256, (batch_size, 28, 28, 1), dtype=np.uint8),
           'label': rng.integers(0, 10, (batch_size,), dtype=np.int32)}
          for _ in range(count)]


def pdcnno_runner(batch_size):
  """pdcnno_jax's jitted train step (the one the trainer uses)."""
  mesh = sharding_lib.make_mesh(jax.local_devices()[:1])
  tx = optax.sgd(0.05, momentum=0.9, nesterov=True)
  graphdef, state = state_lib.create_train_state(_model(), tx)
  state = sharding_lib.replicate(state, mesh)
  batches = [jax.device_put(b, sharding_lib.batch_sharded(mesh)) for b in _batches(batch_size)]
  step = steps_lib.make_train_step(graphdef, tx, _preprocess, mesh)
  holder = {'state': state}

  def run(n):
    s = holder['state']
    for i in range(n):
      s, metrics = step(s, batches[i % len(batches)])
    jax.block_until_ready(metrics['loss'])
    holder['state'] = s
  return run


def nnx_runner(batch_size):
  """The minimal loop of flax's NNX MNIST tutorial: nnx.Optimizer + nnx.jit."""
  model = _model()
  optimizer = nnx.Optimizer(model, optax.sgd(0.05, momentum=0.9, nesterov=True),
                            wrt=nnx.Param)
  batches = [jax.device_put(b) for b in _batches(batch_size)]

  @nnx.jit
  def train_step(model, optimizer, batch):
    def loss_fn(model):
      logits = model(_preprocess(batch['image']), train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  def run(n):
    for i in range(n):
      loss = train_step(model, optimizer, batches[i % len(batches)])
    jax.block_until_ready(loss)
  return run


def torch_runner(batch_size):
  """The same LeNet-5 in PyTorch (eager, CPU), or None where torch is missing."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  torch.manual_seed(0)
  net = torch.nn.Sequential(
      torch.nn.Conv2d(1, 6, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
      torch.nn.Conv2d(6, 16, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
      torch.nn.Linear(400, 120), torch.nn.ReLU(), torch.nn.Linear(120, 84), torch.nn.ReLU(),
      torch.nn.Linear(84, 10))
  opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True)
  batches = [(torch.from_numpy(b['image']).permute(0, 3, 1, 2).contiguous(),
              torch.from_numpy(b['label']).long()) for b in _batches(batch_size)]

  def run(n):
    for i in range(n):
      images, labels = batches[i % len(batches)]
      x = (images.float() / 255.0 - MEAN) / STD
      loss = torch.nn.functional.cross_entropy(net(x), labels)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
  return run


def pipeline_images_per_s(batch_size, steps):
  """Images/s of pdcnno_jax.data.input_pipeline.train_batches on Fashion-MNIST, or None."""
  from pdcnno_jax import config_lib  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  import bench_input_pipeline  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(os.path.join(os.path.dirname(__file__), '..', 'configs',
                                               'default.py'))
  try:
    dataset = input_pipeline.load_dataset(config.data, seed=0)
  except FileNotFoundError as e:
    print(f'(pipeline ratio skipped: {str(e).splitlines()[0]})')
    return None
  return bench_input_pipeline.measure_pipeline_throughput(dataset, batch_size, steps)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--rounds', type=int, default=5)
  args = parser.parse_args()
  runners = {'pdcnno_jax': pdcnno_runner(args.batch_size), 'nnx_minimal': nnx_runner(
      args.batch_size)}
  torch_run = torch_runner(args.batch_size)
  if torch_run is not None:
    runners['pytorch'] = torch_run
  for run in runners.values():  # Compile / warm up.
    run(10)
  # Wall-clock images/s, and images per CPU-second of this process (all threads), which a
  # busy machine disturbs much less than wall time.
  rates = {name: [] for name in runners}
  cpu_rates = {name: [] for name in runners}
  for round_index in range(args.rounds):
    order = list(runners.items())
    order = order if round_index % 2 == 0 else order[::-1]
    for name, run in order:
      start, cpu_start = time.perf_counter(), time.process_time()
      run(args.steps)
      images = args.steps * args.batch_size
      rates[name].append(images / (time.perf_counter() - start))
      cpu_rates[name].append(images / (time.process_time() - cpu_start))
  median = {name: statistics.median(r) for name, r in rates.items()}
  cpu_median = {name: statistics.median(r) for name, r in cpu_rates.items()}
  print(f'load average {os.getloadavg()}, devices {jax.devices()}, jax {jax.__version__}, '
        f'batch {args.batch_size}, {args.rounds} rounds x {args.steps} steps')
  for name, value in median.items():
    spread = (min(rates[name]), max(rates[name]))
    print(f'{name:12s} {value:10.0f} images/s (min {spread[0]:.0f}, max {spread[1]:.0f}); '
          f'{cpu_median[name]:.0f} images per CPU-second')
  for other, bar in (('nnx_minimal', ' (bar >= 0.95)'), ('pytorch', '')):
    if other in median:
      print(f'ratio pdcnno_jax / {other}: wall {median["pdcnno_jax"] / median[other]:.3f}, '
            f'CPU {cpu_median["pdcnno_jax"] / cpu_median[other]:.3f}{bar}')
  pipeline = pipeline_images_per_s(args.batch_size, args.steps)
  if pipeline is not None:
    print(f'input pipeline {pipeline:.0f} images/s; ratio pipeline / pdcnno_jax step = '
          f'{pipeline / median["pdcnno_jax"]:.1f} (bar >= 5)')


if __name__ == '__main__':
  main()
