"""Masked vs compacted model: jitted training-step time (VGG) and inference latency (LeNet-5).

Pruning with masks keeps the dense shapes, so it saves no compute; compaction rebuilds the
network with the kept widths. This script measures both side by side in one run:

1. A VGG-style network on 32x32x3 inputs (default vgg16 at width 0.5), pruned to
   >= 50% fewer MACs (weight-L1 scores, the same fraction of every layer): median time of the jitted
   training step (SGD + momentum + weight decay) for the masked and the compacted model.
   Bar: compacted >= 1.5x faster.
2. LeNet-5 (Caffe variant, conv widths 20-50) on 28x28x1, pruned to 4x fewer MACs, once with
   the global MAC budget and once with the same fraction of every layer: median inference
   latency (jitted forward pass) at several batch sizes. Bar (with the
   accuracy part measured by the trainer on Fashion-MNIST): >= 2.5x faster.

The weights are random (the timings do not depend on them); the steps alternate between the
two models so that load changes on a shared machine hit both equally. MACs are
multiply-accumulates per example (models/counting.py).

  python benchmarks/bench_compaction.py [--vgg=vgg16 --vgg_width=0.5 --batch_size=64
      --vgg_ratio=0.4 --lenet_reduction=4 --reps=10]
"""

import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pdcnno_jax import testing
from pdcnno_jax.models import counting, factory
from pdcnno_jax.pruning import compaction, latency, masking, scorers, selection
from pdcnno_jax.train import sharding, steps
from pdcnno_jax.train import state as state_lib

_VGG = flags.DEFINE_string('vgg', 'vgg16', 'VGG configuration (vgg11, vgg13, vgg16, vgg19).')
_VGG_WIDTH = flags.DEFINE_float('vgg_width', 0.5, 'VGG width multiplier.')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Training batch size for the VGG step.')
_VGG_RATIO = flags.DEFINE_float('vgg_ratio', 0.4,
                                'Fraction of every VGG conv layer pruned (0.4 -> ~64% fewer '
                                'MACs).')
_LENET_REDUCTION = flags.DEFINE_float('lenet_reduction', 4.0, 'LeNet dense / pruned MACs.')
_LENET_BATCHES = flags.DEFINE_list('lenet_batch_sizes', ['1', '64', '1024'],
                                   'Inference batch sizes for LeNet-5.')
_REPS = flags.DEFINE_integer('reps', 10, 'Timed repetitions per model (after warm-up).')
_MIN_CHANNELS = flags.DEFINE_integer('min_channels', 2, 'Fewest channels a layer keeps.')


def preprocess(images):
  return images.astype(jnp.float32) / 255.0


def uniform_ratio_for(model, scores, masks, reduction):
  """Smallest per-layer ratio (step 0.01) that reaches ``reduction`` x fewer MACs."""
  dense = selection.dense_macs(model)
  for ratio in np.arange(0.01, 1.0, 0.01):
    pruned = selection.select_by_layer_ratio(scores, masks, ratio=ratio,
                                             min_channels=_MIN_CHANNELS.value)
    kept = counting.kept_channels(model)
    kept.update({k: int(v.sum()) for k, v in pruned.items()})
    if dense / counting.totals(model, kept)['macs'] >= reduction:
      return float(ratio)
  raise ValueError(f'No per-layer ratio reaches {reduction}x fewer MACs.')


def prune_and_compact(model_config, input_shape, tx, *, ratio=None, reduction=None):
  """(masked graphdef, state), (compacted graphdef, state), weight-L1 scores.

  ``ratio``: that fraction of every layer goes (uniform widths, like a hand-designed slimmer
  net; ``'auto'``: the smallest that reaches ``reduction``); else a global MAC budget of
  ``reduction`` x fewer MACs (layer-L2-normalised scores).
  """
  model = factory.build_model(model_config, num_classes=10, input_shape=input_shape,
                              rngs=nnx.Rngs(0))
  graphdef, state = state_lib.create_train_state(model, tx)
  scores, current = scorers.l1(graphdef, state), masking.read_masks(model)
  if ratio == 'auto':
    ratio = uniform_ratio_for(model, scores, current, reduction)
  if ratio is not None:
    masks = selection.select_by_layer_ratio(scores, current, ratio=ratio,
                                            min_channels=_MIN_CHANNELS.value)
  else:
    masks = selection.select_by_macs(scores, current, model, target_reduction=reduction,
                                     min_channels=_MIN_CHANNELS.value)
  state = masking.apply_masks(graphdef, state, masks)
  compact_graphdef, compact_state = compaction.compact(graphdef, state, model_config, 10,
                                                       input_shape)
  return (graphdef, state), (compact_graphdef, compact_state)


def describe(name, graphdef, state):
  model = state_lib.merge_model(graphdef, state)
  totals = counting.totals(model)
  print(f'  {name:<10} MACs/example {totals["macs"] / 1e6:9.3f} M   params '
        f'{totals["params"] / 1e3:9.1f} k   widths {counting.kept_channels(model)}')
  return totals


def alternate(fns, reps, warmup=0):
  """Median seconds of each zero-argument function, calling them in turn ``reps`` times."""
  times = latency.median_ms({i: (fn, ()) for i, fn in enumerate(fns)}, reps, warmup=warmup)
  return [times[i] / 1e3 for i in range(len(fns))]


def bench_vgg_training(mesh):
  config = testing.section('model', name=_VGG.value, width_multiplier=_VGG_WIDTH.value)
  input_shape = (32, 32, 3)
  tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.01, momentum=0.9))
  (graphdef, state), (c_graphdef, c_state) = prune_and_compact(
      config, input_shape, tx, ratio=_VGG_RATIO.value)
  print(f'\n[1] {_VGG.value} width {_VGG_WIDTH.value} on 32x32x3, batch {_BATCH.value}, '
        'training step (jit, SGD momentum + weight decay)')
  dense = selection.dense_macs(state_lib.merge_model(graphdef, state))
  masked_totals = describe('masked', graphdef, state)
  describe('compacted', c_graphdef, c_state)
  print(f'  MAC reduction {dense / masked_totals["macs"]:.2f}x '
        f'({100 * (1 - masked_totals["macs"] / dense):.1f}% fewer MACs)')

  rng = np.random.default_rng(0)
  batch = sharding.replicate(
      {'image': rng.integers(0, 256, (_BATCH.value,) + input_shape, dtype=np.uint8),
       'label': rng.integers(0, 10, _BATCH.value).astype(np.int32)}, mesh)
  holders = {'masked': state, 'compacted': c_state}
  step_fns = {'masked': steps.make_train_step(graphdef, tx, preprocess, mesh),
              'compacted': steps.make_train_step(c_graphdef, tx, preprocess, mesh)}

  def run(name):
    def fn():
      holders[name], metrics = step_fns[name](holders[name], batch)
      metrics['loss'].block_until_ready()
    return fn

  fns = [run('masked'), run('compacted')]
  masked_s, compact_s = alternate(fns, _REPS.value, warmup=2)  # Warm-up compiles.
  print(f'  median step: masked {1e3 * masked_s:8.1f} ms   compacted {1e3 * compact_s:8.1f} ms'
        f'   speed-up {masked_s / compact_s:.2f}x  (bar >= 1.5x)')
  return masked_s / compact_s


def bench_lenet_inference(mesh, how):
  config = testing.section('model', name='lenet5_caffe', width_multiplier=1.0)
  input_shape = (28, 28, 1)
  ratio = 'auto' if how == 'uniform' else None
  (graphdef, state), (c_graphdef, c_state) = prune_and_compact(
      config, input_shape, optax.sgd(0.1), ratio=ratio, reduction=_LENET_REDUCTION.value)
  what = ('the same fraction of every layer' if how == 'uniform'
          else 'global MAC budget, layer-normalised scores')
  print(f'\n[2] lenet5_caffe on 28x28x1, inference (jit, eval mode); weight-L1, {what}')
  dense = selection.dense_macs(state_lib.merge_model(graphdef, state))
  masked_totals = describe('masked', graphdef, state)
  describe('compacted', c_graphdef, c_state)
  print(f'  MAC reduction {dense / masked_totals["macs"]:.2f}x')

  def forward_fn(graphdef, state):
    params = sharding.replicate(state.params, mesh)
    model_state = sharding.replicate(state.model_state, mesh)
    forward = jax.jit(lambda p, s, x: nnx.merge(graphdef, p, s)(preprocess(x)))
    return lambda images: forward(params, model_state, images).block_until_ready()

  masked_fwd, compact_fwd = forward_fn(graphdef, state), forward_fn(c_graphdef, c_state)
  rng = np.random.default_rng(1)
  ratios = {}
  for size in map(int, _LENET_BATCHES.value):
    images = jax.device_put(rng.integers(0, 256, (size,) + input_shape, dtype=np.uint8))
    fns = [lambda: masked_fwd(images), lambda: compact_fwd(images)]
    reps = max(_REPS.value, 50 if size <= 64 else _REPS.value)
    masked_s, compact_s = alternate(fns, reps, warmup=3)
    ratios[size] = masked_s / compact_s
    print(f'  batch {size:5d}: masked {1e3 * masked_s:8.3f} ms   compacted '
          f'{1e3 * compact_s:8.3f} ms   speed-up {ratios[size]:.2f}x  (bar >= 2.5x)')
  return ratios


def main(argv):
  del argv
  print(f'JAX {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}, '
        f'cpus {os.cpu_count()}, loadavg {os.getloadavg()}')
  mesh = sharding.make_mesh(jax.devices()[:1])
  vgg = bench_vgg_training(mesh)
  lenet = {how: bench_lenet_inference(mesh, how) for how in ('global', 'uniform')}
  print(f'\nSummary: VGG training step {vgg:.2f}x faster compacted; LeNet-5 inference at '
        f'>= {_LENET_REDUCTION.value}x fewer MACs: ' + '; '.join(
            f'{how}: ' + ', '.join(f'{r:.2f}x (batch {b})' for b, r in ratios.items())
            for how, ratios in lenet.items()) + f'; loadavg {os.getloadavg()}')


if __name__ == '__main__':
  app.run(main)
