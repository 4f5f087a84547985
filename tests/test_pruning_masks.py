"""Tests for pdcnno_jax.pruning.masking: masks in the TrainState through training and resume."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from pdcnno_jax.pruning import masking, scorers
from pdcnno_jax.testing import random_model as build_model
from pdcnno_jax.train import sharding, steps
from pdcnno_jax.train import state as state_lib


def preprocess(images):
  return images.astype(jnp.float32) / 255.0


def _mesh():
  return sharding.make_mesh(jax.devices()[:1])


def _tx():
  # Coupled weight decay + momentum: the case where stale momentum or decay could revive
  # pruned weights.
  return optax.chain(optax.add_decayed_weights(5e-3), optax.sgd(0.05, momentum=0.9))


def _build(name, input_shape, **model_kwargs):
  config = ml_collections.ConfigDict({'name': name, **model_kwargs})
  return state_lib.create_train_state(build_model(config, input_shape), _tx())


def _batch(shape, seed, size=8):
  rng = np.random.default_rng(seed)
  return {'image': rng.integers(0, 256, (size,) + shape, dtype=np.uint8),
          'label': rng.integers(0, 10, size).astype(np.int32)}


def _np(x):
  return np.asarray(jax.device_get(x))


def _pruned_entries(graphdef, state):
  """(path, array, pruned-entry boolean) of every variable touched by a pruned channel."""
  model = state_lib.merge_model(graphdef, state)
  masks = masking.read_masks(model)
  plan = masking.slicing_plan(model.layer_specs(), masking.kept_indices(masks))
  flat = dict(nnx.to_flat_state(state.params))
  rows = []
  for path, entries in plan.items():
    if path not in flat:
      continue
    value = _np(flat[path].get_value())
    kept = np.ones(value.shape, bool)
    for axis, indices in entries:
      keep = np.zeros(value.shape[axis], bool)
      keep[indices] = True
      shape = [1] * value.ndim
      shape[axis] = -1
      kept &= keep.reshape(shape)
    rows.append((path, value, ~kept))
  return rows


MODELS = {
    'lenet': (('lenet5_caffe', (28, 28, 1)), {'width_multiplier': 0.1},
              {'conv1': [1, 0], 'conv2': [0, 1, 1, 0, 1]}),
    'vgg_bn': (('vgg11', (32, 32, 3)), {'width_multiplier': 0.0625, 'batch_norm': True},
               {'features.0': [1, 0, 1, 1], 'features.3': [1] * 8 + [0] * 8,
                'features.7': [0, 1] * 16}),
}


def test_apply_masks_writes_masks_and_zeros_weights_and_momentum():
  graphdef, state = _build('lenet5_caffe', (28, 28, 1), width_multiplier=0.1)
  train_step = steps.make_train_step(graphdef, _tx(), preprocess, _mesh(),
                                     donate=False)
  state, _ = train_step(state, _batch((28, 28, 1), 0))  # Nonzero momentum.
  masked = masking.apply_masks(graphdef, state, {'conv2': np.array([0, 1, 1, 0, 1.])})
  np.testing.assert_array_equal(masking.read_state_masks(graphdef, masked)['conv2'],
                                [0, 1, 1, 0, 1])
  np.testing.assert_array_equal(masking.read_state_masks(graphdef, masked)['conv1'], [1, 1])
  model, before = (state_lib.merge_model(graphdef, masked),
                   state_lib.merge_model(graphdef, state))
  kernel = _np(model.conv2.conv.kernel[...])
  assert np.all(kernel[..., [0, 3]] == 0) and np.all(kernel[..., [1, 2, 4]] != 0)
  assert np.all(_np(model.conv2.conv.bias[...])[[0, 3]] == 0)
  # conv2 -> flatten (5x5x5) -> dense: rows (h * 5 + w) * 5 + c of pruned c are zero.
  rows = _np(model.hidden[0].kernel[...]).reshape(5, 5, 5, -1)
  assert np.all(rows[:, :, [0, 3]] == 0)
  np.testing.assert_array_equal(rows[:, :, [1, 2, 4]],
                                _np(before.hidden[0].kernel[...]).reshape(5, 5, 5, -1)[
                                    :, :, [1, 2, 4]])
  trace = masked.opt_state[1][0].trace
  assert np.all(_np(trace['conv2']['conv']['kernel'][...])[..., [0, 3]] == 0)
  assert np.any(_np(state.opt_state[1][0].trace['conv2']['conv']['kernel'][...])[..., 0] != 0)


@pytest.mark.parametrize('which', sorted(MODELS))
def test_pruned_maps_stay_zero_through_training(which):
  (name, shape), kwargs, masks = MODELS[which]
  graphdef, state = _build(name, shape, **kwargs)
  train_step = steps.make_train_step(graphdef, _tx(), preprocess, _mesh())
  state, _ = train_step(state, _batch(shape, 0))
  state, _ = train_step(state, _batch(shape, 1))  # Momentum, BatchNorm stats are nonzero.
  state = masking.apply_masks(graphdef, state, {k: np.array(v, np.float32)
                                                for k, v in masks.items()})
  for i in range(4):
    state, metrics = train_step(state, _batch(shape, 10 + i))
  assert np.isfinite(float(metrics['loss']))

  model = state_lib.merge_model(graphdef, state)
  for layer, mask in masking.read_masks(model).items():
    np.testing.assert_array_equal(mask, masks.get(layer, mask))
  rows = _pruned_entries(graphdef, state)
  assert rows
  for path, value, pruned in rows:
    assert np.all(value[pruned] == 0), f'{path} revived'
    assert np.any(value[~pruned] != 0), path

  # Feature maps (pre- and post-mask) of pruned channels are exactly zero.
  images = preprocess(jnp.asarray(_batch(shape, 99)['image']))
  logits, maps = scorers.feature_maps(model, images)
  for layer, mask in masks.items():
    pruned = np.array(mask) == 0
    assert np.all(_np(maps[layer])[..., pruned] == 0)

  # Logits do not depend on the pruned weights: overwrite them with noise.
  rng = np.random.default_rng(0)
  noisy = {path: np.where(pruned, rng.normal(size=value.shape), value).astype(value.dtype)
           for path, value, pruned in rows}
  params = masking.map_with_paths(
      lambda path, leaf: jnp.asarray(noisy[path]) if path in noisy else leaf, state.params)
  noisy_logits = nnx.merge(graphdef, params, state.model_state)(images)
  np.testing.assert_allclose(_np(noisy_logits), _np(logits), rtol=0, atol=1e-6)
  assert not np.allclose(_np(jax.tree.leaves(params)[0]), 0)


def test_masks_survive_an_orbax_checkpoint_of_the_train_state(tmp_path):
  graphdef, state = _build('lenet5_caffe', (28, 28, 1), width_multiplier=0.1)
  state = masking.apply_masks(graphdef, state, {'conv2': np.array([1, 0, 1, 1, 0.])})
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / 'ckpt', state)
  checkpointer.wait_until_finished()

  _, fresh = _build('lenet5_caffe', (28, 28, 1), width_multiplier=0.1)  # Masks all ones.
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh)
  restored = checkpointer.restore(tmp_path / 'ckpt', abstract)
  np.testing.assert_array_equal(masking.read_state_masks(graphdef, restored)['conv2'],
                                [1, 0, 1, 1, 0])
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(_np(a), _np(b))


def test_apply_masks_rejects_bad_masks():
  graphdef, state = _build('lenet5_caffe', (28, 28, 1), width_multiplier=0.1)
  with pytest.raises(ValueError, match='prunable layers'):
    masking.apply_masks(graphdef, state, {'classifier': np.ones(10)})
  with pytest.raises(ValueError, match='removes all'):
    masking.apply_masks(graphdef, state, {'conv1': np.zeros(2)})
  with pytest.raises(ValueError, match='shape'):
    masking.apply_masks(graphdef, state, {'conv1': np.ones(3)})
  with pytest.raises(ValueError, match='only 0 and 1'):
    masking.apply_masks(graphdef, state, {'conv1': np.array([1, 0.5])})


def test_apply_masks_to_model_in_place():
  graphdef, state = _build('lenet5_caffe', (28, 28, 1), width_multiplier=0.1)
  model = nnx.merge(graphdef, state.params, state.model_state, copy=True)
  masking.apply_masks_to_model(model, {'conv1': np.array([0, 1.])})
  np.testing.assert_array_equal(_np(model.conv1.mask[...]), [0, 1])
  assert np.all(_np(model.conv1.conv.kernel[...])[..., 0] == 0)
  assert np.all(_np(model.conv2.conv.kernel[...])[:, :, 0] == 0)
  # The TrainState it was copied from is untouched.
  np.testing.assert_array_equal(masking.read_state_masks(graphdef, state)['conv1'], [1, 1])
