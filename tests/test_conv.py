"""models/conv.py: the loop-friendly convolution equals lax's, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pdcnno_jax.models import conv

_SPEC = ('NHWC', 'HWIO', 'NHWC')


@pytest.mark.parametrize('size, window, channels, strides, padding', [
    ((12, 12), (5, 5), (6, 16), (1, 1), 'VALID'),
    ((28, 28), (5, 5), (1, 6), (1, 1), 'VALID'),
    ((8, 8), (3, 3), (4, 8), (1, 1), 'SAME'),
    ((9, 8), (3, 3), (3, 5), (2, 2), 'SAME'),
    ((8, 8), (1, 1), (4, 8), (2, 2), 'VALID'),
    ((7, 9), (3, 2), (2, 3), (2, 3), ((1, 2), (0, 1))),
])
def test_values_and_gradients_match_lax(size, window, channels, strides, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3,) + size + (channels[0],)), jnp.float32)
  k = jnp.asarray(rng.normal(size=window + channels), jnp.float32)

  def loss(fn, x, k):
    y = fn(x, k, strides, padding, dimension_numbers=_SPEC)
    return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size)

  reference = lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=_SPEC)
  ours = conv.conv_general_dilated(x, k, strides, padding, dimension_numbers=_SPEC)
  np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)
  want = jax.grad(lambda x, k: loss(lax.conv_general_dilated, x, k), argnums=(0, 1))(x, k)
  got = jax.jit(jax.grad(lambda x, k: loss(conv.conv_general_dilated, x, k),
                         argnums=(0, 1)))(x, k)
  for a, b in zip(got, want):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_gradients_inside_a_loop_match():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(4, 10, 10, 3)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)

  def looped(fn):
    grad = jax.grad(lambda k: jnp.sum(fn(x, k, (1, 1), 'SAME', dimension_numbers=_SPEC) ** 2))
    def run(k):
      return lax.fori_loop(0, 2, lambda i, acc: acc + grad(k), jnp.zeros_like(k))
    return jax.jit(run)(k)

  np.testing.assert_allclose(looped(conv.conv_general_dilated),
                             looped(lax.conv_general_dilated), rtol=1e-4, atol=1e-4)


def test_other_cases_fall_back_to_lax():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)
  kwargs = dict(dimension_numbers=_SPEC, feature_group_count=2, rhs_dilation=(2, 2))
  np.testing.assert_allclose(conv.conv_general_dilated(x, k, (1, 1), 'SAME', **kwargs),
                             lax.conv_general_dilated(x, k, (1, 1), 'SAME', **kwargs),
                             rtol=1e-6)
  nchw = ('NCHW', 'OIHW', 'NCHW')
  x_nchw = jnp.transpose(x, (0, 3, 1, 2))
  k_oihw = jnp.transpose(jnp.asarray(rng.normal(size=(3, 3, 4, 5)), jnp.float32), (3, 2, 0, 1))
  np.testing.assert_allclose(
      conv.conv_general_dilated(x_nchw, k_oihw, (1, 1), 'VALID', dimension_numbers=nchw),
      lax.conv_general_dilated(x_nchw, k_oihw, (1, 1), 'VALID', dimension_numbers=nchw),
      rtol=1e-6)


def test_conv_gradients_choice_reaches_the_model():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from pdcnno_jax import testing  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.models import factory  # pylint: disable=g-import-not-at-top

  assert conv.resolve_conv_gradients('auto', 'cgmse') == 'loop_friendly'
  assert conv.resolve_conv_gradients('auto', 'lbfgs') == 'loop_friendly'
  assert conv.resolve_conv_gradients('auto', 'momentum') == 'lax'
  assert conv.resolve_conv_gradients('lax', 'cgmse') == 'lax'
  with pytest.raises(ValueError, match='conv_gradients'):
    conv.resolve_conv_gradients('fast', 'sgd')
  for choice, fn in (('lax', lax.conv_general_dilated),
                     ('loop_friendly', conv.conv_general_dilated)):
    config = testing.section('model', name='lenet5', width_multiplier=0.5,
                             conv_gradients=choice)
    model = factory.build_model(config, num_classes=10, input_shape=(28, 28, 1),
                                rngs=nnx.Rngs(0))
    convs = [m for _, m in model.iter_modules() if isinstance(m, nnx.Conv)]
    assert len(convs) == 2 and all(m.conv_general_dilated is fn for m in convs)
