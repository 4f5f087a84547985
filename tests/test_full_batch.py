"""Chunked full-batch loss (CGMSE's full-batch mode): same value and gradient, less memory."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pdcnno_jax import testing
from pdcnno_jax.models import factory
from pdcnno_jax.optim import cgmse
from pdcnno_jax.parallel import sync
from pdcnno_jax.train import sharding, state as state_lib, steps


def _preprocess(images):
  return images.astype(jnp.float32) / 255.0


def _setup(name, tx, devices=1, batch_norm=False):
  config = testing.section('model', name=name, width_multiplier=0.25,
                           batch_norm=batch_norm)
  shape = (32, 32, 3) if name.startswith('resnet') else (28, 28, 1)
  model = factory.build_model(config, num_classes=10, input_shape=shape, rngs=nnx.Rngs(0))
  graphdef, state = state_lib.create_train_state(model, tx)
  mesh = sharding.make_mesh(jax.devices()[:devices])
  return graphdef, sharding.replicate(state, mesh), mesh, shape


_batch = testing.random_batch


@pytest.mark.parametrize('devices', [1, 8])
def test_chunked_loss_and_gradient_equal_the_one_piece_loss(devices):
  graphdef, state, mesh, shape = _setup('lenet5', optax.sgd(0.1), devices=devices)
  batch = _batch(shape, 64, mesh)

  def value_and_grad(num_chunks):
    fn = lambda p: steps.chunked_loss(p, state.model_state, batch, graphdef=graphdef,
                                      preprocess=_preprocess, num_chunks=num_chunks)
    (loss, (accuracy, _)), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(state.params)
    return float(loss), float(accuracy), jax.device_get(grads)

  loss_1, acc_1, grads_1 = value_and_grad(1)
  reference, (logits, _) = steps.batch_loss(state.params, state.model_state, batch,
                                            graphdef=graphdef, preprocess=_preprocess)
  np.testing.assert_allclose(loss_1, float(reference), rtol=1e-6)
  assert acc_1 == float((np.asarray(logits).argmax(-1) == np.asarray(batch['label'])).mean())
  loss_4, acc_4, grads_4 = value_and_grad(4)
  np.testing.assert_allclose(loss_4, loss_1, rtol=1e-5)
  assert acc_4 == acc_1
  for a, b in zip(jax.tree.leaves(grads_1), jax.tree.leaves(grads_4)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_cgmse_full_batch_step_is_the_same_with_chunks():
  tx = cgmse.cgmse(mode='full_batch')
  graphdef, state, mesh, shape = _setup('lenet5', tx)
  batch = _batch(shape, 96, mesh)
  results = []
  for num_chunks in (1, 6):
    step = steps.make_train_step(graphdef, tx, _preprocess, mesh, donate=False,
                                 num_chunks=num_chunks)
    current = state
    for _ in range(3):
      current, metrics = step(current, batch)
    results.append((float(metrics['loss']), jax.device_get(current.params)))
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5)


def test_chunks_cut_the_compiled_step_memory():
  """XLA's own memory analysis of the compiled step: temporaries shrink with the chunks."""
  tx = optax.sgd(0.1)
  graphdef, state, mesh, shape = _setup('lenet5', tx)
  batch = jax.ShapeDtypeStruct((2048,) + shape, jnp.uint8)
  batch = {'image': batch, 'label': jax.ShapeDtypeStruct((2048,), jnp.int32)}
  temp = {}
  for num_chunks in (1, 16):
    step = steps.make_train_step(graphdef, tx, _preprocess, mesh, donate=False,
                                 num_chunks=num_chunks)
    analysis = step.lower(state, batch).compile().memory_analysis()
    if analysis is None:
      pytest.skip('This backend has no compiled memory analysis.')
    temp[num_chunks] = analysis.temp_size_in_bytes
  assert temp[16] < 0.25 * temp[1], temp


def test_batchnorm_statistics_update_once_per_chunk():
  tx = optax.sgd(0.1)
  graphdef, state, mesh, shape = _setup('resnet20', tx, batch_norm=True)
  step = steps.make_train_step(graphdef, tx, _preprocess, mesh, donate=False, num_chunks=2)
  new_state, metrics = step(state, _batch(shape, 8, mesh))
  assert np.isfinite(float(metrics['loss']))
  old = jax.tree.leaves(nnx.State.filter(state.model_state, nnx.BatchStat))
  new = jax.tree.leaves(nnx.State.filter(new_state.model_state, nnx.BatchStat))
  assert any(not np.allclose(a, b) for a, b in zip(old, new))


def test_chunked_loss_refuses_uneven_chunks():
  graphdef, state, mesh, shape = _setup('lenet5', optax.sgd(0.1))
  with pytest.raises(ValueError, match='cannot be split into 3 equal chunks'):
    steps.chunked_loss(state.params, state.model_state, _batch(shape, 8, mesh),
                       graphdef=graphdef, preprocess=_preprocess, num_chunks=3)


@pytest.mark.parametrize('examples, devices, chunk_size, expected', [
    (60000, 1, 4096, (60000, 15)),
    (60000, 8, 4096, (60000, 15)),
    (60000, 1, 0, (60000, 1)),
    (1000, 8, 300, (992, 4)),
    (10, 1, 4096, (10, 1)),
])
def test_full_batch_layout(examples, devices, chunk_size, expected):
  used, num_chunks = sync.full_batch_layout(examples, devices, chunk_size)
  assert (used, num_chunks) == expected
  assert used % (num_chunks * devices) == 0 and examples - used < num_chunks * devices
  assert used // num_chunks <= max(chunk_size, used) or chunk_size == 0


def test_full_batch_layout_errors_say_what_to_change():
  with pytest.raises(ValueError, match='full_batch_chunk_size must be >= 0'):
    sync.full_batch_layout(100, 1, -1)
  with pytest.raises(ValueError, match='raise config.optimizer.full_batch_chunk_size'):
    sync.full_batch_layout(10, 8, 1)
