"""Model gradients at the top level vs inside control flow: lax's convolution vs models/conv.py.

XLA:CPU runs convolution gradients much slower inside ``while`` / ``cond`` than at the top
level of a program (jax-ml/jax#12868), which is where CGMSE's line search, its mini-batch
re-evaluation and the chunked full-batch loss compute them. This script times, in one run,
``value_and_grad`` of the LeNet-5 loss (jitted, median ms per evaluation) for the model's
convolutions as ``lax.conv_general_dilated`` (JAX's own gradient rules) and as
``pdcnno_jax.models.conv.conv_general_dilated`` (the project's default), in three places:
the top level, inside a one-trip ``lax.while_loop`` and inside a ``lax.cond``; then one
CGMSE full-batch step (value, gradient and zoom line search) with each.

  python benchmarks/bench_conv_in_loops.py [--batch_sizes=128,2048 --model=lenet5 --reps=5]
"""

from __future__ import annotations

import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from pdcnno_jax import testing
from pdcnno_jax.models import factory
from pdcnno_jax.optim import cgmse
from pdcnno_jax.train import sharding, state as state_lib, steps

_BATCHES = flags.DEFINE_list('batch_sizes', ['128', '2048'], 'Examples per evaluation.')
_MODEL = flags.DEFINE_string('model', 'lenet5', 'Model name (models/factory.py).')
_REPS = flags.DEFINE_integer('reps', 5, 'Timed repetitions after one warm-up call.')


def _model(use_lax: bool) -> nnx.Module:
  config = testing.section('model', name=_MODEL.value, width_multiplier=1.0,
                           batch_norm=False)
  shape = (32, 32, 3) if _MODEL.value.startswith(('resnet', 'vgg')) else (28, 28, 1)
  model = factory.build_model(config, num_classes=10, input_shape=shape, rngs=nnx.Rngs(0))
  if use_lax:
    for _, module in model.iter_modules():
      if isinstance(module, nnx.Conv):
        module.conv_general_dilated = lax.conv_general_dilated
  return model


def _median_ms(fn, *args) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(_REPS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def _preprocess(images):
  return images.astype(jnp.float32) / 255.0


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  mesh = sharding.make_mesh(jax.devices()[:1])
  print(f'bench_conv_in_loops: {_MODEL.value}, {jax.devices()[0].platform}, median ms')
  for size in (int(b) for b in _BATCHES.value):
    shape = (32, 32, 3) if _MODEL.value.startswith(('resnet', 'vgg')) else (28, 28, 1)
    batch = {'image': jnp.asarray(rng.integers(0, 256, (size,) + shape, dtype=np.uint8)),
             'label': jnp.asarray(rng.integers(0, 10, (size,)), jnp.int32)}
    rows = {}
    for name, use_lax in (('lax', True), ('models/conv.py', False)):
      graphdef, params, model_state = nnx.split(_model(use_lax), nnx.Param, ...)
      value_and_grad = jax.value_and_grad(lambda p: steps.batch_loss(
          p, model_state, batch, graphdef=graphdef, preprocess=_preprocess)[0])

      def total(p):
        value, grads = value_and_grad(p)
        return value + sum(jnp.sum(g) for g in jax.tree.leaves(grads))

      top = jax.jit(total)
      in_while = jax.jit(lambda p: lax.while_loop(
          lambda c: c[0] < 1, lambda c: (c[0] + 1, c[1] + total(p)), (0, 0.0))[1])
      in_cond = jax.jit(lambda p, flag: lax.cond(flag, total, lambda p: 0.0, p))
      tx = cgmse.cgmse(mode='full_batch')
      graphdef_tx, state = state_lib.create_train_state(_model(use_lax), tx)
      step = steps.make_train_step(graphdef_tx, tx, _preprocess, mesh, donate=False)
      state = sharding.replicate(state, mesh)
      state, _ = step(state, batch)  # Past the first (line-search-free) iteration.
      rows[name] = (_median_ms(top, params), _median_ms(in_while, params),
                    _median_ms(in_cond, params, True), _median_ms(step, state, batch))
    print(f'  batch {size}:')
    for name, (top, in_while, in_cond, step) in rows.items():
      print(f'    {name:>15}: top level {top:8.1f}   in while_loop {in_while:8.1f}   in cond '
            f'{in_cond:8.1f}   CGMSE full-batch step {step:8.1f}')
    (a, b) = rows.values()
    print(f'    lax / models/conv.py: top level {a[0] / b[0]:.2f}x, in while_loop '
          f'{a[1] / b[1]:.2f}x, in cond {a[2] / b[2]:.2f}x, CGMSE step {a[3] / b[3]:.2f}x')


if __name__ == '__main__':
  app.run(main)
