"""Tests of pdcnno_jax.diagnostics: dead-map counts and the collapse detector."""

import glob
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pdcnno_jax import config_lib, testing
from pdcnno_jax.diagnostics import collapse, dead_maps
from pdcnno_jax.optim import factory as optim_factory
from pdcnno_jax.pruning import masking
from pdcnno_jax.train import sharding, state as state_lib, steps

CONFIG = config_lib.load_config('configs/default.py')
IDENTITY = lambda images: images.astype(jnp.float32) / 255.0


def _set(variable, value):
  variable[...] = jnp.asarray(value, variable[...].dtype)


def _hand_built_lenet(conv1_bias, conv2_bias, conv2_mask=None):
  """LeNet-5 whose conv kernels are zero, so each map is the constant ReLU(bias)."""
  model = testing.random_model(CONFIG.model, (28, 28, 1))
  for block, bias in ((model.conv1, conv1_bias), (model.conv2, conv2_bias)):
    _set(block.conv.kernel, np.zeros(block.conv.kernel[...].shape))
    _set(block.conv.bias, bias)
  if conv2_mask is not None:
    _set(model.conv2.mask, conv2_mask)
  return state_lib.create_train_state(model, optax.sgd(0.1))


def _batches(num, batch_size, padding=0):
  images, labels = testing.synthetic_images(num, seed=3)
  out = []
  for start in range(0, num, batch_size):
    image = images[start:start + batch_size, ..., None]
    mask = np.ones(len(image), np.float32)
    if padding:
      image = np.concatenate([image, np.zeros((padding,) + image.shape[1:], image.dtype)])
      mask = np.concatenate([mask, np.zeros(padding, np.float32)])
    out.append({'image': image, 'label': np.zeros(len(image), np.int32), 'mask': mask})
  return out


def test_counts_known_dead_near_dead_and_pruned_maps():
  conv1 = np.ones(6)
  conv1[[1, 4]] = -1.0  # Dead.
  conv1[2] = 1e-9  # Alive on every example, but near-dead (1e-9 < 1e-6 x layer mean).
  conv2 = np.full(16, 0.5)
  conv2[[0, 7, 9]] = -0.5  # Dead; 9 is also pruned (mask 0), so not counted.
  conv2_mask = np.ones(16)
  conv2_mask[[9, 10]] = 0.0
  graphdef, state = _hand_built_lenet(conv1, conv2, conv2_mask)
  result = dead_maps.count_dead_maps(graphdef, state, _batches(48, 16, padding=8), IDENTITY)
  assert result['examples'] == 48
  c1, c2 = result['layers']['conv1'], result['layers']['conv2']
  assert (c1['channels'], c1['kept'], c1['dead'], c1['near_dead']) == (6, 6, 2, 3)
  assert c1['dead_indices'] == [1, 4]
  assert c1['dead_fraction'] == pytest.approx(2 / 6)
  assert c1['near_dead_fraction'] == pytest.approx(3 / 6)
  assert (c2['channels'], c2['kept'], c2['dead'], c2['near_dead']) == (16, 14, 2, 2)
  assert c2['dead_indices'] == [0, 7]
  assert result['max_dead_fraction'] == pytest.approx(2 / 6)
  line = dead_maps.summary_line(result)
  assert 'conv1 2/6 (33.3%, near-dead 50.0%)' in line and 'conv2 2/14' in line
  assert dead_maps.scalars(result)['conv2/dead_fraction'] == pytest.approx(2 / 14)

  after = masking.read_masks(state_lib.merge_model(graphdef, state))
  after = {k: np.asarray(v).copy() for k, v in after.items()}
  after['conv1'][[1, 2, 4]] = 0.0  # Remove both dead maps and one live one.
  after['conv2'][[3]] = 0.0  # One live map (9 and 10 were pruned already).
  assert dead_maps.removed_dead(result, after) == {
      'conv1': {'removed': 3, 'removed_dead': 2}, 'conv2': {'removed': 1, 'removed_dead': 0}}


def test_healthy_random_model_has_no_dead_maps_and_padding_is_ignored():
  model = testing.random_model(CONFIG.model, (28, 28, 1), seed=1)
  graphdef, state = state_lib.create_train_state(model, optax.sgd(0.1))
  padded = dead_maps.count_dead_maps(graphdef, state, _batches(32, 32, padding=32), IDENTITY)
  plain = dead_maps.count_dead_maps(graphdef, state, _batches(32, 32), IDENTITY)
  assert padded == plain
  assert all(v['dead'] == 0 for v in plain['layers'].values())


def test_dead_maps_rejects_no_examples():
  graphdef, state = _hand_built_lenet(np.ones(6), np.ones(16))
  with pytest.raises(ValueError, match='no examples'):
    dead_maps.count_dead_maps(graphdef, state, [], IDENTITY)


def _windows(detector, values, examples, *, in_warmup=False):
  return [detector.update(loss, acc, examples, epoch=0, in_warmup=in_warmup)
          for loss, acc in values]


def test_detector_fires_after_exactly_one_epoch_at_the_prior():
  detector = collapse.CollapseDetector(10, examples_per_epoch=1000)
  prior = math.log(10)
  assert detector.at_prior(prior * 1.019, 0.1) and not detector.at_prior(prior * 1.021, 0.1)
  assert not detector.at_prior(prior, 0.16)
  # Warm-up windows and a healthy window reset the streak.
  assert not any(_windows(detector, [(prior, 0.1)] * 20, 100, in_warmup=True))
  assert not any(_windows(detector, [(prior, 0.1)] * 9 + [(1.0, 0.6)], 100))
  fired = _windows(detector, [(prior, 0.1)] * 10, 100)
  assert fired == [False] * 9 + [True]
  error = detector.error(step=123, phase='train', workdir='/tmp/run', last_checkpoint=100)
  assert isinstance(error, collapse.TrainingCollapseError)
  text = str(error)
  for needle in ('ln(10)', 'step 100', '/tmp/run', 'config.optimizer.learning_rate',
                 'config.optimizer.warmup_epochs', 'config.diagnostics.collapse_check=False'):
    assert needle in text


def test_make_detector_reads_the_config():
  config = CONFIG.diagnostics.copy_and_resolve_references()
  assert isinstance(collapse.make_detector(config, 10, 100), collapse.CollapseDetector)
  config.collapse_check = False
  assert collapse.make_detector(config, 10, 100) is None


def _train_watched(tx, *, epochs, model_config=CONFIG.model, num=512, batch_size=64, window=4,
                   losses=None):
  """Trains a model on learnable synthetic data; True when the detector fired.

  Every window counts as post-warm-up (stricter than training, which skips the warm-up).
  """
  images, labels = testing.synthetic_images(num, seed=0)
  images, labels = jnp.asarray(images[..., None]), jnp.asarray(labels.astype(np.int32))
  mesh = sharding.make_mesh(jax.devices()[:1])
  graphdef, state = state_lib.create_train_state(
      testing.random_model(model_config, (28, 28, 1), seed=0), tx)
  step = steps.make_train_step(graphdef, tx, IDENTITY, mesh)
  detector = collapse.CollapseDetector(10, examples_per_epoch=num)
  pending = []
  for epoch in range(epochs):
    order = np.random.default_rng(epoch).permutation(num)
    for i in range(num // batch_size):
      index = order[i * batch_size:(i + 1) * batch_size]
      state, metrics = step(state, {'image': images[index], 'label': labels[index]})
      pending.append(metrics)
      if len(pending) == window:
        mean = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]}
        pending = []
        if losses is not None:
          losses.append(mean['loss'])
        if detector.update(mean['loss'], mean['accuracy'], window * batch_size, epoch=epoch,
                           in_warmup=False):
          return True
  return False


def test_detector_fires_on_a_forced_collapse_and_not_on_a_healthy_run():
  # A huge step size blows the activations up, after which every ReLU stays dead and the
  # classifier bias settles on the label prior (loss ln 10, chance accuracy).
  assert _train_watched(optax.sgd(optax.cosine_decay_schedule(10.0, 64)), epochs=8)
  assert not _train_watched(optax.sgd(0.05, momentum=0.9), epochs=3)


def _lenet_recipes():
  """One config path per distinct (model, optimizer) section among the LeNet configs.

  CGMSE configs are left out: their step comes from a line search, not a learning-rate
  recipe (tests/test_cgmse.py covers them).
  """
  recipes = {}
  for path in sorted(glob.glob('configs/*.py')):
    config = config_lib.load_config(path)
    if config.model.name in ('lenet5', 'lenet5_caffe') and config.optimizer.name != 'cgmse':
      key = repr((sorted(config.model.items()), sorted(config.optimizer.items())))
      recipes.setdefault(key, path)
  return sorted(recipes.values())


LENET_CONFIGS = _lenet_recipes()


@pytest.mark.parametrize('path', LENET_CONFIGS)
def test_config_recipe_trains_without_collapse(path):
  """Each LeNet config's optimizer recipe (schedule and warm-up included) on tiny data."""
  config = config_lib.load_config(path)
  steps_per_epoch, epochs = 8, 3
  tx = optim_factory.build_optimizer(config.optimizer, total_steps=epochs * steps_per_epoch,
                                     steps_per_epoch=steps_per_epoch)
  losses = []
  assert not _train_watched(tx, epochs=epochs, model_config=config.model, losses=losses)
  assert losses[-1] < 0.98 * math.log(10), losses
