"""Model registry: builds any model of the package from ``config.model``."""

from __future__ import annotations

from typing import Any

import ml_collections
from flax import nnx

from pdcnno_jax.models import conv, lenet, resnet, vgg

MODEL_NAMES = ('lenet5', 'lenet5_caffe') + tuple(sorted(vgg.VGG_STAGES)) + (
    'resnet20', 'resnet32', 'resnet44', 'resnet56', 'resnet110')


def build_model(model_config: ml_collections.ConfigDict, *, num_classes: int,
                input_shape: tuple[int, int, int], rngs: nnx.Rngs,
                **overrides: Any) -> nnx.Module:
  """Builds the model named by ``model_config.name``.

  Args:
    model_config: the ``config.model`` section (name, width_multiplier, batch_norm,
      dropout_rate, conv_gradients: 'loop_friendly' swaps in ``models/conv.py``'s
      convolution, anything else keeps ``lax.conv_general_dilated``).
    num_classes: classifier outputs (from the data set).
    input_shape: ``(H, W, C)`` of the images (from the data set).
    rngs: NNX random streams for the initial parameters.
    **overrides: architecture arguments that take precedence, e.g. the kept widths from
      ``model.constructor_kwargs()`` when rebuilding a compacted model.

  Returns:
    An ``nnx.Module`` with ``layer_specs()`` and ``constructor_kwargs()``.

  Raises:
    ValueError: for an unknown model name.
  """
  model = _build(model_config, num_classes=num_classes, input_shape=input_shape, rngs=rngs,
                 **overrides)
  # 'auto' is resolved by the trainer (it depends on the optimizer); here it means 'lax'.
  if model_config.get('conv_gradients', 'lax') == 'loop_friendly':
    conv.set_conv_gradients(model, 'loop_friendly')
  return model


def _build(model_config: ml_collections.ConfigDict, *, num_classes: int,
           input_shape: tuple[int, int, int], rngs: nnx.Rngs, **overrides: Any) -> nnx.Module:
  name = model_config.name
  width = model_config.get('width_multiplier', 1.0)
  if name.startswith('lenet5'):
    kwargs = dict(variant=name, width_multiplier=width)
    kwargs.update(overrides)
    return lenet.LeNet5(num_classes, input_shape, rngs=rngs, **kwargs)
  if name in vgg.VGG_STAGES:
    kwargs = dict(depth_name=name, width_multiplier=width,
                  batch_norm=model_config.get('batch_norm', False),
                  dropout_rate=model_config.get('dropout_rate', 0.0))
    kwargs.update(overrides)
    return vgg.VGG(num_classes=num_classes, input_shape=input_shape, rngs=rngs, **kwargs)
  if name.startswith('resnet') and name[len('resnet'):].isdigit():
    kwargs = dict(depth=int(name[len('resnet'):]), width_multiplier=width)
    kwargs.update(overrides)
    return resnet.ResNet(num_classes=num_classes, input_shape=input_shape, rngs=rngs,
                         **kwargs)
  raise ValueError(f'Unknown model {name!r}; set config.model.name to one of {MODEL_NAMES}.')
