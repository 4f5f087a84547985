"""Tests for pdcnno_jax.pruning.scorers: FMP, FMPTL, L1 and random channel scores."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from pdcnno_jax import testing
from pdcnno_jax.models import factory, layers
from pdcnno_jax.pruning import masking, scorers
from pdcnno_jax.testing import random_model as build_model
from pdcnno_jax.train import sharding
from pdcnno_jax.train import state as state_lib


def preprocess(images):
  return images.astype(jnp.float32) / 255.0


def preprocess64(images):
  return images.astype(jnp.float64) / 255.0


def _lenet(seed=0):
  config = ml_collections.ConfigDict({'name': 'lenet5_caffe', 'width_multiplier': 0.1})
  return state_lib.create_train_state(build_model(config, (28, 28, 1), seed), optax.sgd(0.1))


def _batches(num_batches, size, shape=(28, 28, 1), num_classes=10, seed=0, pad_last=0):
  rng = np.random.default_rng(seed)
  batches = []
  for i in range(num_batches):
    batch = {'image': rng.integers(0, 256, (size,) + shape, dtype=np.uint8),
             'label': rng.integers(0, num_classes, size).astype(np.int32)}
    if pad_last and i == num_batches - 1:
      batch['mask'] = (np.arange(size) < size - pad_last).astype(np.float32)
    batches.append(batch)
  return batches


# graphdef and preprocess are static.
taylor_inner_products = jax.jit(scorers.taylor_inner_products, static_argnums=(0, 4))


def _one_device_mesh():
  return sharding.make_mesh(jax.devices()[:1])


class TinyNet(nnx.Module):
  """conv 3x3 (VALID) -> ReLU -> mask -> global average pool -> linear."""

  def __init__(self, *, rngs, in_channels=2, channels=4, num_classes=3, size=6):
    self.conv = layers.MaskedConv(in_channels, channels, 3, padding='VALID', rngs=rngs)
    self.classifier = nnx.Linear(channels, num_classes, rngs=rngs)
    self.out_hw = (size - 2, size - 2)

  def __call__(self, x, *, train=False):
    return self.classifier(self.conv(x, train=train).mean(axis=(1, 2)))

  def layer_specs(self):
    return (layers.conv_spec('conv', self.conv, self.out_hw, in_mask=None),
            layers.dense_spec('classifier', self.classifier, in_mask='conv'))


# ----------------------------------------------------------------------------------------
# NumPy references.


def _conv_valid(x, kernel, bias):
  """NHWC x HWIO 'VALID' convolution in float64."""
  kh, kw = kernel.shape[:2]
  out_h, out_w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      out += np.einsum('nhwc,co->nhwo', x[:, i:i + out_h, j:j + out_w], kernel[i, j])
  return out + bias


def _max_pool(x):
  n, h, w, c = x.shape
  return x[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _np(x):
  return np.asarray(jax.device_get(x), np.float64)


def _lenet_feature_maps(model, images):
  """(F1 * m1, F2 * m2) of LeNet-5 (caffe) on 28x28 inputs, in NumPy."""
  x = images.astype(np.float64) / 255.0
  x = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))  # 'SAME' for a 5x5 kernel.
  f1 = np.maximum(_conv_valid(x, _np(model.conv1.conv.kernel[...]),
                              _np(model.conv1.conv.bias[...])), 0)
  y1 = f1 * _np(model.conv1.mask[...])
  f2 = np.maximum(_conv_valid(_max_pool(y1), _np(model.conv2.conv.kernel[...]),
                              _np(model.conv2.conv.bias[...])), 0)
  return y1, f2 * _np(model.conv2.mask[...])


def _reference_norms(maps, order):
  flat = np.abs(maps).reshape(maps.shape[0], -1, maps.shape[-1])
  if np.isinf(order):
    return flat.max(axis=1)
  return (flat ** order).sum(axis=1) ** (1.0 / order)


# ----------------------------------------------------------------------------------------
# FMP.


@pytest.mark.parametrize('order', [1.0, 2.0, np.inf])
def test_fmp_matches_numpy_reference(order):
  graphdef, state = _lenet()
  # One pruned map in each conv: its score is 0 and conv2 sees the masked input.
  state = masking.apply_masks(graphdef, state, {'conv1': np.array([1, 0.]),
                                                'conv2': np.array([1, 1, 0, 1, 1.])})
  batches = _batches(2, 8, pad_last=3)
  scores = scorers.fmp(graphdef, state, batches, preprocess, mesh=_one_device_mesh(),
                       norm_order=order)

  model = state_lib.merge_model(graphdef, state)
  images = np.concatenate([b['image'] for b in batches])
  weights = np.concatenate([b.get('mask', np.ones(8)) for b in batches])
  y1, y2 = _lenet_feature_maps(model, images)
  for name, maps in (('conv1', y1), ('conv2', y2)):
    expected = weights @ _reference_norms(maps, order) / weights.sum()
    np.testing.assert_allclose(scores[name], expected, rtol=2e-5, atol=1e-6)
  assert set(scores) == {'conv1', 'conv2'}
  assert scores['conv1'][1] == 0 and scores['conv2'][2] == 0
  assert np.all(scores['conv2'][[0, 1, 3, 4]] > 0)


def test_fmp_rejects_bad_norm_order_and_empty_or_unsplittable_data():
  graphdef, state = _lenet()
  with pytest.raises(ValueError, match='norm_order'):
    scorers.fmp(graphdef, state, _batches(1, 4), preprocess, norm_order=0.0)
  with pytest.raises(ValueError, match='No scoring examples'):
    scorers.fmp(graphdef, state, [], preprocess, mesh=_one_device_mesh())
  if jax.device_count() >= 2:
    with pytest.raises(ValueError, match='divisible'):
      scorers.fmp(graphdef, state, _batches(1, 3), preprocess,
                  mesh=sharding.make_mesh(jax.devices()[:2]))


# ----------------------------------------------------------------------------------------
# FMPTL.


def _tiny_state(seed=0, num_classes=3):
  model = TinyNet(rngs=nnx.Rngs(seed), num_classes=num_classes)
  return state_lib.create_train_state(model, optax.sgd(0.1))


def test_fmptl_matches_numpy_reference():
  graphdef, state = _tiny_state()
  state = masking.apply_masks(graphdef, state, {'conv': np.array([1, 1, 0, 1.])})
  batches = _batches(2, 6, shape=(6, 6, 2), num_classes=3, seed=1, pad_last=2)
  raw = scorers.fmptl(graphdef, state, batches, preprocess, mesh=_one_device_mesh(),
                      normalize=False)
  normalized = scorers.fmptl(graphdef, state, batches, preprocess, mesh=_one_device_mesh())

  model = state_lib.merge_model(graphdef, state)
  images = np.concatenate([b['image'] for b in batches]).astype(np.float64) / 255.0
  labels = np.concatenate([b['label'] for b in batches])
  weights = np.concatenate([b.get('mask', np.ones(6)) for b in batches])
  maps = np.maximum(_conv_valid(images, _np(model.conv.conv.kernel[...]),
                                _np(model.conv.conv.bias[...])), 0) * _np(model.conv.mask[...])
  pooled = maps.mean(axis=(1, 2))
  w, b = _np(model.classifier.kernel[...]), _np(model.classifier.bias[...])
  logits = pooled @ w + b
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  dlogits = (probs - np.eye(3)[labels]) * weights[:, None]  # d(sum_n w_n L_n)/d logits.
  # g = dL/dx = (dlogits @ W^T) / (H W) at every position, so <g, x> = (dlogits W^T) * mean x.
  inner = (dlogits @ w.T) * pooled
  delta = -inner + 0.5 * inner ** 2
  theta = np.abs(weights @ delta / weights.sum())
  np.testing.assert_allclose(raw['conv'], theta, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(normalized['conv'], theta / np.linalg.norm(theta), rtol=1e-4,
                             atol=1e-7)
  assert raw['conv'][2] == 0


def _cast(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                      else x, tree)


def _per_sample_loss_fn(graphdef, state, dtype):
  """Jitted per-sample cross-entropies with map ``channel`` of ``name`` scaled by ``scale``."""
  model = state_lib.merge_model(graphdef, state)
  paths = {s.out_mask_path: s.name for s in masking.prunable_specs(model)}

  @jax.jit
  def loss(scales, images, labels):
    model_state = masking.map_with_paths(
        lambda path, leaf: leaf * scales[paths[path]] if path in paths else leaf,
        state.model_state)
    logits = nnx.merge(graphdef, state.params, model_state)(
        images.astype(dtype) / 255.0)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)

  widths = {s.name: s.out_channels for s in masking.prunable_specs(model)}

  def scaled(batch, name, channel, scale):
    scales = {k: jnp.ones((w,), dtype) for k, w in widths.items()}
    scales[name] = scales[name].at[channel].set(scale)
    return np.asarray(loss(scales, jnp.asarray(batch['image']), jnp.asarray(batch['label'])))

  return scaled


def test_taylor_inner_products_are_directional_derivatives_of_the_loss():
  """<g, x> = d/dt L(map * t) at t = 1, checked by central differences in float64."""
  with jax.enable_x64(True):
    graphdef, state = _lenet(seed=3)
    state = state.replace(params=_cast(state.params, jnp.float64),
                          model_state=_cast(state.model_state, jnp.float64))
    state = masking.apply_masks(graphdef, state, {'conv2': np.array([1, 0, 1, 1, 1.])})
    batch = _batches(1, 3, seed=4)[0]
    products = taylor_inner_products(
        graphdef, state.params, state.model_state, batch, preprocess64)
    loss = _per_sample_loss_fn(graphdef, state, jnp.float64)
    h = 1e-5
    for name, width in (('conv1', 2), ('conv2', 5)):
      assert products[name].shape == (3, width)
      for channel in range(width):
        derivative = (loss(batch, name, channel, 1 + h) -
                      loss(batch, name, channel, 1 - h)) / (2 * h)
        np.testing.assert_allclose(products[name][:, channel], derivative, rtol=1e-6,
                                   atol=1e-9)
    np.testing.assert_array_equal(products['conv2'][:, 1], 0.0)


def test_second_order_taylor_estimate_tracks_the_measured_loss_change():
  """Zeroing one map: -<g,x> + 0.5 <g,x>^2 is within O(<g,x>^4) of the true change.

  Setting: two classes whose logits tie on the sample (classifier bias chosen so), where the
  g g^T Hessian approximation is exact at the expansion point; the true change is then
  -z + log cosh(z) = -z + z^2/2 - z^4/12 + ..., so the first-order estimate is off by ~z^2/2
  and the second-order one by ~z^4/12.
  """
  with jax.enable_x64(True):
    graphdef, state = _tiny_state(seed=5, num_classes=2)
    state = state.replace(params=_cast(state.params, jnp.float64),
                          model_state=_cast(state.model_state, jnp.float64))
    batch = _batches(1, 1, shape=(6, 6, 2), num_classes=2, seed=6)[0]
    batch['label'][:] = 0
    images = preprocess64(jnp.asarray(batch['image']))
    model = nnx.merge(graphdef, state.params, state.model_state, copy=True)

    def tie_and_score(kernel_scale):
      """Scales the classifier kernel, re-ties the two logits; returns z of every map."""
      model.classifier.kernel.set_value(model.classifier.kernel[...] * kernel_scale)
      logits = model(images)
      model.classifier.bias.set_value(model.classifier.bias[...] +
                                      jnp.array([0.0, logits[0, 0] - logits[0, 1]]))
      _, params, model_state = state_lib.split_model(model)
      tied = state.replace(params=params, model_state=model_state)
      z = taylor_inner_products(graphdef, tied.params, tied.model_state, batch,
                                        preprocess64)['conv'][0]
      return tied, np.asarray(z)

    # z is linear in the classifier kernel at a tie: scale it so that max |z| = 0.8, where
    # both error terms are far above rounding and the expansion converges quickly.
    _, z = tie_and_score(1.0)
    state, z = tie_and_score(0.8 / np.abs(z).max())
    theta = scorers.fmptl(graphdef, state, [batch], preprocess64, mesh=_one_device_mesh(),
                          normalize=False)['conv']
    loss = _per_sample_loss_fn(graphdef, state, jnp.float64)
    base = loss(batch, 'conv', 0, 1.0)[0]
    checked = 0
    for channel, zc in enumerate(z):
      measured = loss(batch, 'conv', channel, 0.0)[0] - base
      first, second = -zc, -zc + 0.5 * zc ** 2
      np.testing.assert_allclose(theta[channel], abs(second), rtol=1e-9, atol=1e-12)
      assert abs(measured - second) <= zc ** 4 / 12 * 1.05 + 1e-12
      if abs(zc) > 0.05:
        checked += 1
        assert abs(measured - second) < 0.2 * abs(measured - first)
    assert checked >= 2, f'too few informative maps: z = {z}'


# ----------------------------------------------------------------------------------------
# Baselines, layers, devices.


def test_l1_and_random_scores():
  graphdef, state = _lenet()
  state = masking.apply_masks(graphdef, state, {'conv2': np.array([0, 1, 1, 1, 1.])})
  model = state_lib.merge_model(graphdef, state)
  l1 = scorers.l1(graphdef, state)
  expected = np.abs(_np(model.conv1.conv.kernel[...])).sum(axis=(0, 1, 2))
  np.testing.assert_allclose(l1['conv1'], expected, rtol=1e-6)
  assert l1['conv2'][0] == 0 and np.all(l1['conv2'][1:] > 0)

  first, again = scorers.random(graphdef, state, seed=7), scorers.random(graphdef, state, seed=7)
  other = scorers.random(graphdef, state, seed=8)
  for name in first:
    np.testing.assert_array_equal(first[name], again[name])
    assert not np.array_equal(first[name], other[name])
  assert first['conv2'][0] == 0 and np.all(first['conv2'][1:] > 0)


def test_only_prunable_layers_are_scored():
  graphdef, state = _lenet()
  for scorer in (scorers.l1, scorers.random):  # fmp / fmptl: see the reference tests.
    assert set(scorer(graphdef, state)) == {'conv1', 'conv2'}  # Not the fc layers.
  config = testing.section('model', name='resnet20', width_multiplier=0.25)
  resnet = nnx.eval_shape(lambda: factory.build_model(
      config, num_classes=10, input_shape=(32, 32, 3), rngs=nnx.Rngs(0)))
  # Not the stem, the residual stream (conv2, shortcut) or the classifier.
  assert [s.name for s in masking.prunable_specs(resnet)] == [
      f'blocks.{i}.conv1' for i in range(9)]


def test_get_scorer():
  assert scorers.get_scorer('fmptl') is scorers.fmptl
  with pytest.raises(ValueError, match='prune.method'):
    scorers.get_scorer('taylor')


@pytest.mark.skipif(jax.device_count() < 8, reason='needs 8 (fake) devices')
def test_scores_are_the_same_on_one_and_eight_devices():
  graphdef, state = _lenet(seed=2)
  state = masking.apply_masks(graphdef, state, {'conv2': np.array([1, 1, 1, 0, 1.])})
  batches = _batches(2, 8, seed=3, pad_last=5)
  mesh8 = sharding.make_mesh()
  assert mesh8.devices.size == 8
  for scorer in (scorers.fmp, scorers.fmptl):
    one = scorer(graphdef, state, batches, preprocess, mesh=_one_device_mesh())
    eight = scorer(graphdef, state, batches, preprocess, mesh=mesh8)
    for name in one:
      np.testing.assert_allclose(eight[name], one[name], rtol=1e-5, atol=1e-7)
