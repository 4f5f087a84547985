"""Jitted train/eval steps: BatchNorm statistics update in training, eval sums are exact."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pdcnno_jax import testing
from pdcnno_jax.models import factory
from pdcnno_jax.train import sharding, state as state_lib, steps


def _preprocess(images):
  return images.astype(jnp.float32) / 255.0


def _setup(name, shape, devices):
  config = testing.section('model', name=name, width_multiplier=0.25, batch_norm=True)
  model = factory.build_model(config, num_classes=10, input_shape=shape, rngs=nnx.Rngs(0))
  tx = optax.sgd(0.1, momentum=0.9)
  graphdef, state = state_lib.create_train_state(model, tx)
  mesh = sharding.make_mesh(jax.devices()[:devices])
  return graphdef, sharding.replicate(state, mesh), tx, mesh


_batch = testing.random_batch


def test_batchnorm_model_trains_and_updates_running_statistics():
  shape = (32, 32, 3)
  graphdef, state, tx, mesh = _setup('resnet20', shape, devices=1)
  step = steps.make_train_step(graphdef, tx, _preprocess, mesh, donate=False)
  new_state, metrics = step(state, _batch(shape, 8, mesh))
  assert np.isfinite(float(metrics['loss']))
  old_stats = jax.tree.leaves(nnx.State.filter(state.model_state, nnx.BatchStat))
  new_stats = jax.tree.leaves(nnx.State.filter(new_state.model_state, nnx.BatchStat))
  assert old_stats and any(not np.allclose(a, b) for a, b in zip(old_stats, new_stats))
  assert int(new_state.step) == 1


def test_step_on_8_devices_matches_1_device():
  shape = (28, 28, 1)
  results = []
  for devices in (1, min(8, jax.device_count())):
    graphdef, state, tx, mesh = _setup('vgg11', shape, devices)
    step = steps.make_train_step(graphdef, tx, _preprocess, mesh)
    for i in range(2):
      state, _ = step(state, _batch(shape, 16, mesh, seed=i))
    results.append(jax.device_get(state.params))
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_eval_sums_ignore_padding():
  shape = (28, 28, 1)
  graphdef, state, _, mesh = _setup('lenet5', shape, devices=1)
  evaluate = steps.make_eval_step(graphdef, _preprocess, mesh)
  batch = jax.device_get(_batch(shape, 8, mesh))
  full = evaluate(state, jax.device_put({**batch, 'mask': np.ones(8, np.float32)}))
  half_mask = np.array([1, 1, 1, 1, 0, 0, 0, 0], np.float32)
  half = evaluate(state, jax.device_put({**batch, 'mask': half_mask}))
  first = evaluate(state, jax.device_put({k: v[:4] for k, v in batch.items()}))
  assert float(full['count']) == 8 and float(half['count']) == 4
  np.testing.assert_allclose(float(half['loss_sum']), float(first['loss_sum']), rtol=1e-5)
  np.testing.assert_allclose(float(half['correct']), float(first['correct']))
