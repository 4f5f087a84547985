"""Model shapes, feature masks, layer specs and hand-checked parameter / MAC counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pdcnno_jax import testing
from pdcnno_jax.models import counting, factory, layers


def _build(name, input_shape=(32, 32, 3), width=1.0, batch_norm=False, seed=0,
           abstract=False):
  config = testing.section('model', name=name, width_multiplier=width,
                           batch_norm=batch_norm, dropout_rate=0.0)
  build = lambda: factory.build_model(config, num_classes=10, input_shape=input_shape,
                                      rngs=nnx.Rngs(seed))
  # Abstract models (shapes only) keep the counting tests free of compilation; real ones
  # initialise in one compiled program instead of one eager dispatch per random draw.
  return nnx.eval_shape(build) if abstract else nnx.jit(build)()


def _forward(model, x, train):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, train=train))(state, x)


def _module(model, path):
  for key in path:
    model = model[key] if isinstance(key, int) else getattr(model, key)
  return model


@pytest.mark.parametrize('name,input_shape,width,batch_norm', [
    ('lenet5', (28, 28, 1), 1.0, False),
    ('lenet5', (32, 32, 1), 1.0, False),
    ('lenet5_caffe', (28, 28, 1), 0.5, False),
    ('vgg11', (28, 28, 1), 0.125, True),
    ('vgg16', (32, 32, 3), 0.0625, True),
    ('vgg16', (224, 224, 3), 0.0625, False),
    ('resnet20', (32, 32, 3), 0.5, True),
])
def test_output_shapes_and_specs_match_params(name, input_shape, width, batch_norm):
  model = _build(name, input_shape, width, batch_norm)
  logits = _forward(model, jnp.ones((2,) + input_shape), train=True)
  assert logits.shape == (2, 10)
  assert np.isfinite(np.asarray(logits)).all()
  for spec in model.layer_specs():
    kernel = _module(model, spec.param_path).kernel
    assert tuple(kernel.shape) == spec.kernel_shape, spec.name
    if spec.out_mask_path is not None:
      mask = _module(model, spec.out_mask_path)
      assert isinstance(mask, layers.FeatureMask)
      np.testing.assert_array_equal(mask[...], np.ones(spec.out_channels))
  # The classifier is never prunable and every conv activation has a mask.
  specs = model.layer_specs()
  assert not specs[-1].prunable
  counted = sum(r.params for r in counting.count_layers(model))
  assert counted == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_masks_are_state_not_params():
  model = _build('lenet5', (28, 28, 1))
  params = nnx.state(model, nnx.Param)
  masks = nnx.state(model, layers.FeatureMask)
  assert len(jax.tree.leaves(masks)) == 2
  assert all(x.shape in {(6,), (16,)} for x in jax.tree.leaves(masks))
  assert sum(x.size for x in jax.tree.leaves(params)) == 61706  # LeNet-5, 10 classes.


def test_zero_mask_zeroes_the_feature_map():
  model = _build('lenet5', (28, 28, 1))
  x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
  mask = np.ones(6, np.float32)
  mask[[1, 4]] = 0
  model.conv1.mask[...] = jnp.asarray(mask)
  maps = model.conv1(x)
  assert np.abs(np.asarray(maps[..., [1, 4]])).max() == 0
  assert np.abs(np.asarray(maps[..., [0, 2, 3, 5]])).max() > 0


def test_lenet5_counts_by_hand():
  model = _build('lenet5', (28, 28, 1))
  rows = {r.name: r for r in counting.count_layers(model)}
  # conv1: 28x28 outputs ('SAME'), 5x5x1 kernels, 6 maps.
  assert rows['conv1'].macs == 28 * 28 * 25 * 1 * 6
  assert rows['conv1'].params == 25 * 6 + 6
  # conv2: 10x10 outputs ('VALID' on 14x14), 5x5x6 kernels, 16 maps.
  assert rows['conv2'].macs == 10 * 10 * 25 * 6 * 16
  assert rows['hidden.0'].macs == 400 * 120
  assert rows['hidden.1'].macs == 120 * 84
  assert rows['classifier'].macs == 84 * 10
  assert counting.totals(model)['macs'] == 416520


def test_lenet5_counts_respect_masks():
  model = _build('lenet5', (28, 28, 1))
  conv1 = np.ones(6, np.float32)
  conv1[:2] = 0  # keep 4
  conv2 = np.ones(16, np.float32)
  conv2[:6] = 0  # keep 10
  model.conv1.mask[...] = jnp.asarray(conv1)
  model.conv2.mask[...] = jnp.asarray(conv2)
  rows = {r.name: r for r in counting.count_layers(model)}
  assert rows['conv1'].macs == 28 * 28 * 25 * 4
  assert rows['conv1'].params == 25 * 4 + 4
  assert rows['conv2'].macs == 10 * 10 * 25 * 4 * 10
  assert rows['conv2'].params == 25 * 4 * 10 + 10
  # Flatten: 5x5 positions x 10 kept channels feed fc 120.
  assert rows['hidden.0'].in_channels == 5 * 5 * 10
  assert rows['hidden.0'].macs == 250 * 120
  assert rows['hidden.0'].params == 250 * 120 + 120


def test_vgg16_32x32_counts_by_hand():
  model = _build('vgg16', (32, 32, 3), batch_norm=False, abstract=True)
  widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
  sizes = [32, 32, 16, 16, 8, 8, 8, 4, 4, 4, 2, 2, 2]
  in_ch = [3] + widths[:-1]
  conv_macs = sum(s * s * 9 * i * o for s, i, o in zip(sizes, in_ch, widths))
  fc_macs = 512 * 512 + 512 * 512 + 512 * 10
  assert counting.totals(model, kept={})['macs'] == conv_macs + fc_macs
  assert len([s for s in model.layer_specs() if s.kind == 'conv']) == 13
  assert len([s for s in model.layer_specs() if s.kind == 'dense']) == 3


def test_resnet20_size_and_excluded_stream_channels():
  model = _build('resnet20', (32, 32, 3), batch_norm=True, abstract=True)
  # He et al. (2016), Table 6: 0.27M parameters.
  assert counting.totals(model, kept={})['params'] == 272474
  prunable = [s.name for s in model.layer_specs() if s.prunable]
  assert prunable == [f'blocks.{i}.conv1' for i in range(9)]


def test_unknown_model_is_a_clear_error():
  with pytest.raises(ValueError, match='Unknown model'):
    _build('alexnet')
