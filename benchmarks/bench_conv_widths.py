"""XLA CPU convolution time against channel count: why compacted speed-ups do not track MACs.

Pruning aims at >= 2.5x faster CPU inference of LeNet-5 (Caffe) compacted to 4x fewer MACs.
This script times the two convolutions of that network alone, jitted, at one batch size, for a
range of widths, and the whole forward pass for several kept-width pairs (conv1, conv2) next to
the dense (20, 50), so that the measured speed-up of each pruning result can be read against
what XLA's CPU convolutions deliver for its shapes (``prune.selection='latency'`` measures whole
candidate networks itself: pdcnno_jax/pruning/latency.py). Widths alternate inside every repetition so
that load changes on a shared machine hit all of them alike. Times are medians in ms.

  python benchmarks/bench_conv_widths.py [--batch_size=256 --reps=9]
"""

from __future__ import annotations


from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pdcnno_jax import testing
from pdcnno_jax.models import counting, factory
from pdcnno_jax.pruning import latency

_BATCH = flags.DEFINE_integer('batch_size', 256, 'Examples per call (single layers).')
_FORWARD_BATCHES = flags.DEFINE_list('forward_batch_sizes', ['1', '64', '1024'],
                                     'Batch sizes of the whole forward pass.')
_REPS = flags.DEFINE_integer('reps', 9, 'Timed repetitions (after one warm-up call).')
_PAIRS = ((20, 50), (20, 7), (20, 8), (16, 8), (12, 12), (10, 14), (8, 8), (8, 16))
_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


def _conv(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), 'VALID', dimension_numbers=_DIMENSIONS)


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  batch, reps = _BATCH.value, _REPS.value
  conv = jax.jit(_conv)
  print(f'bench_conv_widths: {jax.devices()[0].platform}, batch {batch}, median ms per call')

  def layer_row(title, in_shape, widths, kernel_shape):
    x = jnp.asarray(rng.random((batch,) + in_shape, np.float32))
    calls = {w: (conv, (x, jnp.asarray(rng.random(kernel_shape(w), np.float32))))
             for w in widths}
    times = latency.median_ms(calls, reps)
    print(f'  {title}: ' + '  '.join(f'{w}: {times[w]:.2f}' for w in widths))

  layer_row('conv1 5x5, 28x28x1 -> C_out', (28, 28, 1), (4, 8, 12, 16, 20, 24, 32, 50),
            lambda w: (5, 5, 1, w))
  for c_in in (8, 16, 20, 24):
    layer_row(f'conv2 5x5, 12x12x{c_in} -> C_out', (12, 12, c_in), (4, 7, 8, 16, 32, 50),
              lambda w, c_in=c_in: (5, 5, c_in, w))

  config = testing.section('model', name='lenet5_caffe', width_multiplier=1.0,
                           batch_norm=False)
  models = {}
  for pair in _PAIRS:
    model = factory.build_model(config, num_classes=10, input_shape=(28, 28, 1),
                                rngs=nnx.Rngs(0), conv_widths=pair)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x, g=graphdef: nnx.merge(g, s)(x, train=False))
    models[pair] = (forward, state, sum(r.macs for r in counting.count_layers(model)))
  dense_macs = models[(20, 50)][2]
  print('\nLeNet-5 Caffe forward pass, speed-up over the dense (20, 50) [MAC reduction]:')
  for size in (int(s) for s in _FORWARD_BATCHES.value):
    x = jnp.asarray(rng.random((size, 28, 28, 1), np.float32))
    times = latency.median_ms({p: (m[0], (m[1], x)) for p, m in models.items()}, reps,
                              inner=max(1, 512 // size))
    base = times[(20, 50)]
    print(f'  batch {size:5d}: ' + '  '.join(
        f'{p}: {base / times[p]:.2f}x [{dense_macs / models[p][2]:.1f}x]' for p in _PAIRS))


if __name__ == '__main__':
  app.run(main)
