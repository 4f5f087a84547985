"""Where LeNet-5 Caffe's jitted inference pass spends its time on this backend, by layer.

Latency-targeted pruning (pdcnno_jax/pruning/latency.py) can only remove the time that the
pruned widths carry. This script times, at one batch size, for the dense (20, 50) network and
compacted ones (``--widths``: conv1, conv2[, fc1]):

1. each stage alone on its (precomputed) input: preprocess, conv1, pool1, conv2, pool2, fc1
   (flatten, dense, ReLU), fc2 (the classifier), and the eval step's loss/accuracy sums;
2. the cumulative prefixes of the network (preprocess ... fc2), and the whole eval step that
   the latency search times;
3. conv1 alone at output widths ``--conv1_widths``;
4. the fixed floor: a trivial jitted function of the same uint8 batch (its sum), i.e. the
   dispatch and synchronisation cost that no pruning removes;
5. the whole eval step for every ``--networks`` width triple, as a speed-up over the dense one;
6. the same forward pass written out in jax.lax ops, with conv1 either as XLA's convolution or
   as image patches times a matrix (im2col), for ``--im2col_networks``: how much of conv1's
   cost is the convolution kernel XLA picks for a one-channel input, not its width.

Every group's calls are interleaved inside each repetition (pdcnno_jax.pruning.latency.median_ms),
so load changes hit them alike; times are medians in ms.

  python benchmarks/bench_lenet_latency_breakdown.py [--batch_size=128 --reps=41]
"""

from __future__ import annotations

import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pdcnno_jax.models import factory
from pdcnno_jax.pruning import latency
from pdcnno_jax.train import sharding as sharding_lib
from pdcnno_jax.train import state as state_lib
from pdcnno_jax.train import steps

_BATCH = flags.DEFINE_integer('batch_size', 128, 'Examples per call.')
_REPS = flags.DEFINE_integer('reps', 41, 'Timed repetitions (after two warm-up calls).')
_INNER = flags.DEFINE_integer('inner', 5, 'Calls timed together in each repetition.')
_WIDTHS = flags.DEFINE_list('widths', ['20-50', '20-4'], 'conv1-conv2[-fc1] of the breakdowns.')
_CONV1 = flags.DEFINE_list('conv1_widths', ['4', '6', '8', '10', '12', '14', '16', '18', '20'],
                           'conv1 output widths timed alone.')
_NETWORKS = flags.DEFINE_list(
    'networks', ['20-50-500', '20-4-500', '20-4-250', '20-4-100', '20-4-50', '20-4-20',
                 '20-4-10', '8-4-50', '4-4-20', '20-2-10'],
    'conv1-conv2-fc1 widths of whole eval steps.')
_IM2COL = flags.DEFINE_list('im2col_networks', ['20-50-500', '20-4-500', '8-4-500', '20-2-10'],
                            'conv1-conv2-fc1 widths of the jax.lax forward passes.')
_JSON = flags.DEFINE_string('save_json', '', 'Also write the figures to this JSON file.')
_STAGES = ('preprocess', 'conv1', 'pool1', 'conv2', 'pool2', 'fc1', 'fc2')


def _pool(x):
  return nnx.max_pool(x, (2, 2), strides=(2, 2))


def _stage(model, name, x):
  """One stage of LeNet5.__call__ (the same modules and ops, in the same order)."""
  if name == 'preprocess':
    return x.astype(jnp.float32) / 255.0
  if name in ('conv1', 'conv2'):
    return getattr(model, name)(x)
  if name in ('pool1', 'pool2'):
    return _pool(x)
  if name == 'fc1':
    return nnx.relu(model.hidden[0](x.reshape((x.shape[0], -1))))
  return model.classifier(x)


def _model(widths):
  conv, fc = tuple(widths[:2]), tuple(widths[2:]) or None
  return factory.build_architecture('lenet5_caffe', num_classes=10, input_shape=(28, 28, 1),
                                    rngs=nnx.Rngs(0), conv_widths=conv, fc_widths=fc)


def _images(batch):
  rng = np.random.default_rng(0)
  return jnp.asarray(rng.integers(0, 256, (batch, 28, 28, 1), dtype=np.uint8))


def _eval_call(widths, batch):
  mesh = sharding_lib.make_mesh()
  graphdef, state = state_lib.create_train_state(_model(widths), optax.sgd(0.1))
  labels = jnp.asarray(np.random.default_rng(1).integers(0, 10, batch).astype(np.int32))
  data = {'image': _images(batch), 'label': labels}
  return steps.make_eval_step(graphdef, lambda x: x.astype(jnp.float32) / 255.0, mesh), (
      state, data)


def breakdown(widths, batch, reps, inner):
  """``{'alone': {stage: ms}, 'prefix': {stage: ms}}`` of the network at ``widths``."""
  graphdef, params = nnx.split(_model(widths))
  images = _images(batch)

  def prefix_fn(k):
    def run(params, x):
      model = nnx.merge(graphdef, params)
      for name in _STAGES[:k + 1]:
        x = _stage(model, name, x)
      return x
    return jax.jit(run)

  def alone_fn(k):
    return jax.jit(lambda params, x: _stage(nnx.merge(graphdef, params), _STAGES[k], x))

  inputs = [images] + [prefix_fn(k)(params, images) for k in range(len(_STAGES) - 1)]
  labels = jnp.zeros((batch,), jnp.int32)
  loss = jax.jit(lambda logits, y: (optax.softmax_cross_entropy_with_integer_labels(
      logits, y).sum(), (logits.argmax(-1) == y).sum()))
  logits = prefix_fn(len(_STAGES) - 1)(params, images)
  alone = {name: (alone_fn(k), (params, inputs[k])) for k, name in enumerate(_STAGES)}
  alone['loss'] = (loss, (logits, labels))
  alone['floor'] = (jax.jit(lambda x: x.sum()), (images,))
  prefix = {name: (prefix_fn(k), (params, images)) for k, name in enumerate(_STAGES)}
  prefix['eval_step'] = _eval_call(widths, batch)
  return {'alone': latency.median_ms(alone, reps, warmup=2, inner=inner),
          'prefix': latency.median_ms(prefix, reps, warmup=2, inner=inner)}


def conv1_widths(widths, batch, reps, inner):
  x = _images(batch).astype(jnp.float32) / 255.0
  calls = {}
  for width in widths:
    graphdef, params = nnx.split(_model((width, 50)).conv1)
    calls[width] = (jax.jit(lambda p, x, g=graphdef: nnx.merge(g, p)(x)), (params, x))
  return latency.median_ms(calls, reps, warmup=2, inner=inner)


def _lax_forward(widths, im2col):
  """LeNet-5 Caffe's forward pass in jax.lax ops (random weights); conv1 by im2col or not."""
  rng = np.random.default_rng(0)
  c1, c2, f1 = widths
  shapes = {'k1': (5, 5, 1, c1), 'k2': (5, 5, c1, c2), 'w1': (5 * 5 * c2, f1), 'w2': (f1, 10)}
  params = {k: jnp.asarray(0.1 * rng.standard_normal(v), jnp.float32) for k, v in shapes.items()}
  dims = ('NHWC', 'HWIO', 'NHWC')

  def pool(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID')

  def forward(params, images):
    x = images.astype(jnp.float32) / 255.0
    if im2col:
      patches = jax.lax.conv_general_dilated_patches(x, (5, 5), (1, 1), 'SAME',
                                                     dimension_numbers=dims)
      x = patches @ params['k1'].reshape(25, c1)
    else:
      x = jax.lax.conv_general_dilated(x, params['k1'], (1, 1), 'SAME', dimension_numbers=dims)
    x = pool(jax.nn.relu(x))
    x = jax.lax.conv_general_dilated(x, params['k2'], (1, 1), 'VALID', dimension_numbers=dims)
    x = pool(jax.nn.relu(x)).reshape((x.shape[0], -1))
    return jax.nn.relu(x @ params['w1']) @ params['w2']

  return jax.jit(forward), params


def _parse(spec):
  return tuple(int(w) for w in spec.split('-'))


def main(argv):
  del argv
  batch, reps, inner = _BATCH.value, _REPS.value, _INNER.value
  print(f'bench_lenet_latency_breakdown: {jax.devices()[0].platform} x{jax.device_count()}, '
        f'jax {jax.__version__}, batch {batch}, median ms per call ({reps} reps x {inner})')
  result = {'batch_size': batch}
  for spec in _WIDTHS.value:
    times = breakdown(_parse(spec), batch, reps, inner)
    result[spec] = times
    print(f'\nwidths {spec}:  {"stage":<10} {"alone":>7} {"prefix":>7}')
    for name in _STAGES + ('loss', 'floor', 'eval_step'):
      alone, prefix = times['alone'].get(name), times['prefix'].get(name)
      print(f'  {name:<20} {"" if alone is None else f"{alone:7.3f}":>7} '
            f'{"" if prefix is None else f"{prefix:7.3f}":>7}')
  if _CONV1.value:
    conv1 = conv1_widths([int(w) for w in _CONV1.value], batch, reps, inner)
    result['conv1_alone'] = conv1
    print('\nconv1 alone (28x28x1 -> C, 5x5 SAME, ReLU, mask): '
          + '  '.join(f'{w}: {t:.3f}' for w, t in conv1.items()))
  if _NETWORKS.value:
    result['networks'] = networks(batch, reps, inner)
  if _IM2COL.value:
    result['lax_forward'] = lax_forwards(batch, reps, inner)
  if _JSON.value:
    with open(_JSON.value, 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=2, default=str)


def networks(batch, reps, inner):
  """Whole eval steps of ``--networks``, printed as speed-ups over the first."""
  calls = {spec: _eval_call(_parse(spec), batch) for spec in _NETWORKS.value}
  times = latency.median_ms(calls, reps, warmup=2, inner=inner)
  dense = times[_NETWORKS.value[0]]
  print(f'\nwhole eval step (conv1-conv2-fc1), speed-up over {_NETWORKS.value[0]}:')
  for spec, ms in times.items():
    print(f'  {spec:<12} {ms:7.3f} ms  {dense / ms:5.2f}x')
  return times


def lax_forwards(batch, reps, inner):
  """The jax.lax forward passes of ``--im2col_networks``, conv1 by convolution or im2col."""
  calls = {}
  for spec in _IM2COL.value:
    for im2col in (False, True):
      fn, params = _lax_forward(_parse(spec), im2col)
      calls[(spec, im2col)] = (fn, (params, _images(batch)))
  lax = latency.median_ms(calls, reps, warmup=2, inner=inner)
  first = _IM2COL.value[0]
  print(f'\njax.lax forward pass, conv1 by XLA convolution | by im2col (speed-up over {first}):')
  for spec in _IM2COL.value:
    conv, cols = lax[(spec, False)], lax[(spec, True)]
    print(f'  {spec:<12} {conv:7.3f} ms {lax[(first, False)] / conv:5.2f}x | {cols:7.3f} ms '
          f'{lax[(first, True)] / cols:5.2f}x')
  return {f'{spec}|{"im2col" if i else "conv"}': ms for (spec, i), ms in lax.items()}


if __name__ == '__main__':
  app.run(main)
