"""Tests for the IFAS initialiser (pdcnno_jax/init/ifas.py) and the LSUV baseline (lsuv.py).

A small LeNet-5 on random 28x28 images, searched on the 8-device CPU mesh of conftest.py
(batches sharded over 'data', parameters replicated), with a tiny swarm so the search
compiles and runs in seconds.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pdcnno_jax import testing
from pdcnno_jax.init import ifas, lsuv
from pdcnno_jax.models import factory
from pdcnno_jax.train import sharding
from pdcnno_jax.train import state as state_lib

BATCH = 16  # Divisible by the 8 fake devices.


def preprocess(images):
  return images.astype(jnp.float32) / 255.0


@pytest.fixture(scope='module')
def lenet():
  model_config = testing.section('model', name='lenet5', width_multiplier=0.5)
  abstract = nnx.eval_shape(lambda: factory.build_model(
      model_config, num_classes=10, input_shape=(28, 28, 1), rngs=nnx.Rngs(0)))
  graphdef, params, model_state = state_lib.split_model(abstract)
  # A He-normal draw in numpy (compiling the model's own initialisers costs more than the
  # tests): kernels N(0, 2 / fan_in), biases 0, masks 1.
  rng = np.random.default_rng(0)
  he = lambda a: (rng.normal(size=a.shape) * np.sqrt(2.0 / np.prod(a.shape[:-1]))
                  if len(a.shape) >= 2 else np.zeros(a.shape)).astype(np.float32)
  params = jax.tree.map(he, params)
  model_state = jax.tree.map(lambda a: np.ones(a.shape, a.dtype), model_state)
  graphdef, state = state_lib.create_train_state(
      nnx.merge(graphdef, params, model_state), optax.sgd(0.1))
  batches = [{'image': rng.integers(0, 256, (BATCH, 28, 28, 1), dtype=np.uint8),
              'label': rng.integers(0, 10, (BATCH,), dtype=np.int32)} for _ in range(3)]
  return graphdef, state, batches, sharding.make_mesh()


def init_config(**overrides):
  return testing.section('init', **{
      'method': 'ifas', 'swarm_size': 4, 'generations': 2, 'sgd_steps': 2,
      'sgd_learning_rate': 0.05, 'search_space': 'layer_scales', 'subspace_dim': 4,
      'log_scale_range': 1.0, 'swarm_chunk_size': 0, **overrides})


def test_he_returns_the_initial_draw_at_no_cost(lenet):
  graphdef, state, _, mesh = lenet
  params, report = ifas.initialize(init_config(method='he'), graphdef, state, [],
                                   preprocess, mesh, jax.random.key(0))
  assert params is state.params
  assert report['gradient_steps'] == 0 and report['forward_passes'] == 0
  assert ifas.num_batches_needed(init_config(method='he')) == 0


def test_ifas_is_not_worse_than_he_and_reports_its_cost(lenet):
  graphdef, state, batches, mesh = lenet
  config = init_config()
  assert ifas.num_batches_needed(config) == 3
  params, report = ifas.initialize(config, graphdef, state, batches, preprocess, mesh,
                                   jax.random.key(0))

  assert jax.tree.structure(params) == jax.tree.structure(state.params)
  assert report['gradient_steps'] == 2 * 4 * 2  # generations * swarm * k.
  assert report['forward_passes'] == 2 * 4  # One held-out pass per evaluation.
  assert report['num_dims'] == len(nnx.merge(graphdef, state.params,
                                             state.model_state).layer_specs())
  assert len(report['best_fitness_per_generation']) == 2
  assert report['wall_time_s'] >= report['compile_time_s'] >= 0.0

  # Recompute the fitness independently: the returned start is no worse than the He draw
  # (glowworm 0 of generation 0 sits at x = 0, the unchanged draw).
  fitness = jax.jit(ifas.make_fitness_fn(graphdef, preprocess, config.sgd_learning_rate))
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *batches[:2])
  he = float(fitness(state.params, state.model_state, stacked, batches[2]))
  best = float(fitness(params, state.model_state, stacked, batches[2]))
  assert best <= he + 1e-5
  np.testing.assert_allclose(report['he_fitness'], he, rtol=1e-4)
  np.testing.assert_allclose(report['best_fitness'], best, rtol=1e-4)

  # The result is the He draw with kernel l scaled by exp(x_l); everything else unchanged.
  index = ifas.kernel_layer_index(graphdef, state.params, state.model_state)
  scales = np.exp(np.asarray(report['best_position']))
  for i, new, old in zip(index, jax.tree.leaves(params), jax.tree.leaves(state.params)):
    expected = np.asarray(old) * (scales[i] if i >= 0 else 1.0)
    np.testing.assert_allclose(np.asarray(new), expected, rtol=1e-5, atol=1e-7)

  # Same key, same result (the compilation is reused); another key searches elsewhere.
  again, report_again = ifas.initialize(config, graphdef, state, batches, preprocess, mesh,
                                        jax.random.key(0))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  assert report_again['best_position'] == report['best_position']
  other, report_other = ifas.initialize(config, graphdef, state, batches, preprocess, mesh,
                                        jax.random.key(1))
  assert report_other['best_position'] != report['best_position']


def test_subspace_is_affine_in_the_coordinates_and_moves_kernels_only(lenet):
  graphdef, state, _, _ = lenet
  index = ifas.kernel_layer_index(graphdef, state.params, state.model_state)
  dim = 4
  decode = jax.jit(ifas.make_decoder('subspace', index, jax.random.key(3)))
  leaves = lambda tree: [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
  base = leaves(state.params)
  for a, b in zip(leaves(decode(state.params, jnp.zeros(dim))), base):
    np.testing.assert_array_equal(a, b)
  delta = lambda x: [a - b for a, b in zip(leaves(decode(state.params, x)), base)]
  unit = [delta(jnp.eye(dim)[j]) for j in range(dim)]
  x = np.asarray([0.3, -0.7, 0.5, 0.1], np.float32)
  moved = delta(jnp.asarray(x))
  for k, i in enumerate(index):
    combined = sum(x[j] * unit[j][k] for j in range(dim))
    np.testing.assert_allclose(moved[k], combined, rtol=1e-4, atol=1e-6)
    if i < 0:  # Biases never move.
      np.testing.assert_array_equal(moved[k], 0.0)
    else:  # Each direction has the kernel's own RMS scale over sqrt(d), and they differ.
      rms = np.sqrt(np.mean(base[k] ** 2))
      for j in range(dim):
        assert np.sqrt(np.mean(unit[j][k] ** 2)) == pytest.approx(rms / np.sqrt(dim),
                                                                 rel=0.25)
      assert not np.allclose(unit[0][k], unit[1][k])


def test_lsuv_gives_unit_output_variance_per_layer(lenet):
  graphdef, state, batches, mesh = lenet
  params, report = lsuv.initialize(None, graphdef, state, batches[:1], preprocess, mesh)
  index = tuple(ifas.kernel_layer_index(graphdef, state.params, state.model_state))
  after = np.asarray(lsuv.layer_output_variances(
      params, state.model_state, batches[0]['image'], jnp.zeros(len(report['log_scales'])),
      graphdef=graphdef, preprocess=preprocess, layer_index=index))
  np.testing.assert_allclose(after, 1.0, atol=lsuv.TOLERANCE)
  np.testing.assert_allclose(after, report['variances_after'], rtol=1e-4)
  assert np.abs(np.asarray(report['variances_before']) - 1.0).max() > lsuv.TOLERANCE
  assert report['gradient_steps'] == 0 and report['forward_passes'] >= 2
  for i, new, old in zip(index, jax.tree.leaves(params), jax.tree.leaves(state.params)):
    if i < 0:
      np.testing.assert_array_equal(new, old)


@pytest.mark.parametrize('overrides, batches_given, message', [
    (dict(method='lsuv'), 3, 'Unknown init.method'),
    (dict(search_space='pca'), 3, 'Unknown init.search_space'),
    (dict(swarm_size=1), 3, 'swarm_size'),
    (dict(generations=0), 3, 'generations'),
    (dict(), 2, 'needs 3 batches'),
])
def test_bad_configs_raise_clear_errors(lenet, overrides, batches_given, message):
  graphdef, state, batches, mesh = lenet
  with pytest.raises(ValueError, match=message):
    ifas.initialize(init_config(**overrides), graphdef, state, batches[:batches_given],
                    preprocess, mesh, jax.random.key(0))
