"""IFAS vs He vs LSUV starting points on Fashion-MNIST, with IFAS's search cost charged.

For each model (LeNet-5; VGG-11 at width 0.25, which takes 28x28 inputs) and seed, the same
He draw (the model's own initialisers, seeded) is the starting point of

  * he:    the draw itself;
  * lsuv:  the draw after LSUV-style per-layer variance scaling (1 batch, forward only);
  * ifas:  the draw after the glowworm swarm search of pdcnno_jax.init.ifas
           (per-layer log-scales, fitness = held-out loss after k SGD steps);

then every start trains with the same optimizer (SGD + Nesterov momentum 0.9, constant
learning rate), the same batch order and batch size. One "epoch" is a pass over the training
subset (--train_examples, for a run of minutes on shared CPU cores).

Charging: IFAS spends G * S * k gradient steps in its search (report['gradient_steps']), so
at a budget of B gradient steps the charged IFAS row has trained B - G*S*k steps, while he and
lsuv have trained B. The uncharged row (B training steps after the search) is printed for
context only. Budgets: one epoch (test loss) and --epochs epochs (test accuracy). Mean and
standard deviation over --seeds seeds; the load average is printed since the machine is
shared.

  python benchmarks/bench_ifas.py [--models=lenet5,vgg11 --seeds=3 --epochs=2
                                   --train_examples=6400 --test_examples=2000
                                   --batch_size=64 --swarm_size=8 --generations=3
                                   --sgd_steps=2]

Falls back to a synthetic, learnable data set (with a printed warning) when Fashion-MNIST
or the input pipeline is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from configs import default as default_config
from pdcnno_jax import testing
from pdcnno_jax.init import ifas, lsuv
from pdcnno_jax.models import factory
from pdcnno_jax.train import sharding as sharding_lib
from pdcnno_jax.train import state as state_lib
from pdcnno_jax.train import steps as steps_lib

IFAS_BATCH_EPOCH = 1_000_000  # Data-order epoch index of the IFAS search batches.


# --------------------------------------------------------------------------------------
# Data.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
  """Training subset and test set in host memory, plus how to normalise them."""
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  mean: float
  std: float
  source: str


def load_data(train_examples: int, test_examples: int, seed: int = 0) -> Data:
  """Fashion-MNIST subsets through the package's input pipeline, else a synthetic set."""
  try:
    from pdcnno_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    config = default_config.get_config()
    config.data.name = 'fashion_mnist'
    dataset = input_pipeline.load_dataset(config.data, seed=seed)
    train, test = dataset.host_splits['train'], dataset.host_splits['test']
    rows = np.random.default_rng(seed).permutation(len(train.labels))[:train_examples]
    test_rows = np.random.default_rng(seed + 1).permutation(len(test.labels))[:test_examples]
    return Data(train.images[rows], train.labels[rows], test.images[test_rows],
                test.labels[test_rows],
                float(dataset.mean[0]), float(dataset.std[0]), 'fashion_mnist')
  except Exception as error:  # pylint: disable=broad-except
    print(f'WARNING: Fashion-MNIST unavailable ({type(error).__name__}: {error}); using a '
          'synthetic 10-class data set (class templates + noise). Figures are not '
          'Fashion-MNIST figures.')
    rng = np.random.default_rng(seed)
    templates = rng.uniform(0, 255, (10, 28, 28, 1))

    def make(n):
      labels = rng.integers(0, 10, n).astype(np.int32)
      images = 0.5 * templates[labels] + rng.uniform(0, 127, (n, 28, 28, 1))
      return images.astype(np.uint8), labels

    train_images, train_labels = make(train_examples)
    test_images, test_labels = make(test_examples)
    return Data(train_images, train_labels, test_images, test_labels, 127.0 / 255, 0.25,
                'synthetic')


def epoch_batches(data: Data, batch_size: int, seed: int, epoch: int):
  """The training batches of one epoch (drops the last partial batch)."""
  order = np.random.default_rng([seed, epoch]).permutation(len(data.train_labels))
  for step in range(len(order) // batch_size):
    rows = order[step * batch_size:(step + 1) * batch_size]
    yield {'image': data.train_images[rows], 'label': data.train_labels[rows]}


# --------------------------------------------------------------------------------------
# One run.
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _builder(model_name: str, width: float):
  """A jitted model constructor (one compilation for every seed)."""
  model_config = testing.section('model', name=model_name, width_multiplier=width,
                                 batch_norm=False, dropout_rate=0.0)
  return nnx.jit(lambda key: factory.build_model(
      model_config, num_classes=10, input_shape=(28, 28, 1), rngs=nnx.Rngs(key)))


def build(model_name: str, width: float, seed: int):
  """``(graphdef, params, model_state)`` of the model's own (He) draw for ``seed``."""
  return state_lib.split_model(_builder(model_name, width)(jax.random.key(seed)))


class Trainer:
  """Jitted train / eval steps of one model, shared by every method and seed."""

  def __init__(self, graphdef, preprocess, mesh, learning_rate):
    self.tx = optax.sgd(learning_rate, momentum=0.9, nesterov=True)
    self.mesh = mesh
    self.train_step = steps_lib.make_train_step(graphdef, self.tx, preprocess, mesh)
    self.eval_step = steps_lib.make_eval_step(graphdef, preprocess, mesh)
    self.data_sharding = sharding_lib.batch_sharded(mesh)

  def evaluate(self, state, data: Data, batch_size: int = 500) -> tuple[float, float]:
    """Test loss and accuracy (over whole batches of the test subset)."""
    loss = correct = count = 0.0
    for start in range(0, len(data.test_labels), batch_size):
      batch = {'image': data.test_images[start:start + batch_size],
               'label': data.test_labels[start:start + batch_size]}
      if len(batch['label']) < batch_size:
        break
      out = self.eval_step(state, jax.device_put(batch, self.data_sharding))
      loss += float(out['loss_sum'])
      correct += float(out['correct'])
      count += float(out['count'])
    return loss / count, correct / count

  def train(self, params, model_state, data: Data, *, batch_size: int, seed: int,
            total_steps: int, eval_at: set[int]) -> dict[int, tuple[float, float]]:
    """Trains ``total_steps`` steps; evaluates after each step count in ``eval_at``."""
    state = state_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
        opt_state=self.tx.init(params))
    state = sharding_lib.replicate(state, self.mesh)
    results, step, epoch = {}, 0, 0
    if 0 in eval_at:
      results[0] = self.evaluate(state, data)
    while step < total_steps:
      for batch in epoch_batches(data, batch_size, seed, epoch):
        state, _ = self.train_step(state, jax.device_put(batch, self.data_sharding))
        step += 1
        if step in eval_at:
          results[step] = self.evaluate(state, data)
        if step >= total_steps:
          break
      epoch += 1
    return results


def run_seed(model_name, width, seed, data, args, mesh, preprocess, trainers):
  """Every method from the seed's He draw; returns per-method figures."""
  graphdef, params, model_state = build(model_name, width, seed)
  if model_name not in trainers:
    trainers[model_name] = Trainer(graphdef, preprocess, mesh, args.learning_rate)
  trainer = trainers[model_name]
  steps_per_epoch = len(data.train_labels) // args.batch_size
  budget_1, budget_n = steps_per_epoch, args.epochs * steps_per_epoch
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               model_state=model_state, opt_state=None)

  init_config = default_config.get_config().init
  init_config.update(dict(method='ifas', swarm_size=args.swarm_size,
                          generations=args.generations, sgd_steps=args.sgd_steps,
                          sgd_learning_rate=args.sgd_learning_rate,
                          log_scale_range=args.log_scale_range,
                          swarm_chunk_size=args.swarm_chunk_size))
  search_batches = list(epoch_batches(data, args.batch_size, seed, IFAS_BATCH_EPOCH))
  search_batches = search_batches[:ifas.num_batches_needed(init_config)]

  figures = {}
  starts = {'he': (params, {'gradient_steps': 0, 'wall_time_s': 0.0})}
  starts['lsuv'] = lsuv.initialize(None, graphdef, state, search_batches[:1], preprocess,
                                   mesh)
  starts['ifas'] = ifas.initialize(init_config, graphdef, state, search_batches, preprocess,
                                   mesh, jax.random.key(seed))
  for method, (start_params, report) in starts.items():
    cost = report['gradient_steps']
    if cost >= budget_1:
      print(f'  note: {method} search costs {cost} gradient steps >= the 1-epoch budget '
            f'({budget_1}); its charged 1-epoch figure is the untrained start.')
    charged = {max(budget_1 - cost, 0), max(budget_n - cost, 0)}
    eval_at = charged | ({budget_1, budget_n} if cost else set())
    t0 = time.perf_counter()
    results = trainer.train(start_params, model_state, data, batch_size=args.batch_size,
                            seed=seed, total_steps=budget_n, eval_at=eval_at)
    train_time = time.perf_counter() - t0
    row = dict(init_steps=cost, init_time=report['wall_time_s'], train_time=train_time,
               loss_1=results[max(budget_1 - cost, 0)][0],
               acc_n=results[max(budget_n - cost, 0)][1])
    if method == 'ifas':
      row.update(he_fitness=report['he_fitness'], best_fitness=report['best_fitness'],
                 compile_time=report['compile_time_s'])
      figures['ifas (uncharged)'] = dict(row, loss_1=results[budget_1][0],
                                         acc_n=results[budget_n][1])
    figures[method] = row
  return figures


def summarise(rows: list[float]) -> str:
  mean = statistics.fmean(rows)
  spread = statistics.stdev(rows) if len(rows) > 1 else 0.0
  return f'{mean:.4f} ± {spread:.4f}'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='lenet5,vgg11')
  parser.add_argument('--vgg_width', type=float, default=0.25)
  parser.add_argument('--seeds', type=int, default=3)
  parser.add_argument('--epochs', type=int, default=2)
  parser.add_argument('--train_examples', type=int, default=6400)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--learning_rate', type=float, default=0.02)
  parser.add_argument('--swarm_size', type=int, default=8)
  parser.add_argument('--generations', type=int, default=3)
  parser.add_argument('--sgd_steps', type=int, default=2)
  parser.add_argument('--sgd_learning_rate', type=float, default=0.05)
  parser.add_argument('--log_scale_range', type=float, default=1.0)
  parser.add_argument('--swarm_chunk_size', type=int, default=1,
                      help='Candidates vmapped at once; 1 (sequential) is faster on CPU.')
  parser.add_argument('--test_examples', type=int, default=2000)
  args = parser.parse_args()

  print(f'load average at start: {os.getloadavg()}  ({os.cpu_count()} CPUs, '
        f'{jax.device_count()} {jax.default_backend()} device(s))')
  data = load_data(args.train_examples, args.test_examples)
  mesh = sharding_lib.make_mesh()
  steps_per_epoch = len(data.train_labels) // args.batch_size
  print(f'data: {data.source}, {len(data.train_labels)} training examples '
        f'({steps_per_epoch} steps of {args.batch_size} per epoch), '
        f'{len(data.test_labels)} test examples; budgets: 1 epoch = {steps_per_epoch} '
        f'steps, {args.epochs} epochs = {args.epochs * steps_per_epoch} steps')
  print(f'IFAS: swarm {args.swarm_size} x {args.generations} generations x k='
        f'{args.sgd_steps} SGD steps = '
        f'{args.swarm_size * args.generations * args.sgd_steps} gradient steps charged')
  preprocess = lambda x: (x.astype(jnp.float32) / 255.0 - data.mean) / data.std
  trainers = {}
  for model_name in args.models.split(','):
    width = args.vgg_width if model_name.startswith('vgg') else 1.0
    per_seed = []
    t0 = time.perf_counter()
    for seed in range(args.seeds):
      per_seed.append(run_seed(model_name, width, seed, data, args, mesh, preprocess,
                               trainers))
      print(f'  {model_name} seed {seed} done ({time.perf_counter() - t0:.0f} s, '
            f'load {os.getloadavg()[0]:.1f})', flush=True)
    print(f'\n{model_name} (width {width}), {args.seeds} seeds, mean ± std:')
    header = (f'{"method":<18} {"init grad steps":>15} {"init s":>8} '
              f'{"test loss @1 epoch":>20} {"test acc @" + str(args.epochs) + " epochs":>20}')
    print(header)
    print('-' * len(header))
    for method in ('he', 'lsuv', 'ifas', 'ifas (uncharged)'):
      rows = [s[method] for s in per_seed]
      print(f'{method:<18} {rows[0]["init_steps"]:>15d} '
            f'{statistics.fmean(r["init_time"] for r in rows):>8.1f} '
            f'{summarise([r["loss_1"] for r in rows]):>20} '
            f'{summarise([r["acc_n"] for r in rows]):>20}')
    ifas_rows = [s['ifas'] for s in per_seed]
    print(f'IFAS search fitness (held-out loss after k SGD steps): He draw '
          f'{summarise([r["he_fitness"] for r in ifas_rows])} -> best '
          f'{summarise([r["best_fitness"] for r in ifas_rows])}; compile '
          f'{statistics.fmean(r["compile_time"] for r in ifas_rows):.1f} s mean')
    wins_loss = sum(s['ifas']['loss_1'] < s['he']['loss_1'] for s in per_seed)
    wins_acc = sum(s['ifas']['acc_n'] > s['he']['acc_n'] for s in per_seed)
    print(f'charged IFAS vs He per seed: lower 1-epoch loss {wins_loss}/{args.seeds}, '
          f'higher {args.epochs}-epoch accuracy {wins_acc}/{args.seeds}\n')
  print(f'load average at end: {os.getloadavg()}')


if __name__ == '__main__':
  main()
