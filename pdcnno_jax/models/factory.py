"""Model registry: builds any model of the package by name, or from ``config.model``.

``MODEL_NAMES`` is the only list of model names (config validation reads it).
``build_architecture`` takes a name and explicit architecture arguments (how compaction
rebuilds a narrower model from ``constructor_kwargs()``); ``build_model`` reads every
``config.model`` key that ``configs/default.py`` sets.
"""

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
      convolution; 'lax' and 'auto', which the trainer resolves from the optimizer, keep
      ``lax.conv_general_dilated``).
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
  name = model_config.name
  kwargs = dict(width_multiplier=model_config.width_multiplier)
  if name in vgg.VGG_STAGES:
    kwargs.update(batch_norm=model_config.batch_norm,
                  dropout_rate=model_config.dropout_rate)
  kwargs.update(overrides)
  model = build_architecture(name, num_classes=num_classes, input_shape=input_shape,
                             rngs=rngs, **kwargs)
  if model_config.conv_gradients == 'loop_friendly':
    conv.set_conv_gradients(model, 'loop_friendly')
  return model


def build_architecture(name: str, *, num_classes: int, input_shape: tuple[int, int, int],
                       rngs: nnx.Rngs, **kwargs: Any) -> nnx.Module:
  """Builds model ``name`` with explicit constructor arguments.

  Args:
    name: one of ``MODEL_NAMES``.
    num_classes: classifier outputs.
    input_shape: ``(H, W, C)`` of the images.
    rngs: NNX random streams for the initial parameters.
    **kwargs: constructor arguments of the model's class (``lenet.LeNet5``, ``vgg.VGG``,
      ``resnet.ResNet``) other than the variant / depth, which ``name`` gives.

  Returns:
    An ``nnx.Module`` with ``layer_specs()`` and ``constructor_kwargs()``.

  Raises:
    ValueError: for an unknown model name.
  """
  if name.startswith('lenet5'):
    return lenet.LeNet5(num_classes, input_shape, rngs=rngs, **{'variant': name, **kwargs})
  if name in vgg.VGG_STAGES:
    return vgg.VGG(num_classes=num_classes, input_shape=input_shape, rngs=rngs,
                   **{'depth_name': name, **kwargs})
  if name.startswith('resnet') and name[len('resnet'):].isdigit():
    return resnet.ResNet(num_classes=num_classes, input_shape=input_shape, rngs=rngs,
                         **{'depth': int(name[len('resnet'):]), **kwargs})
  raise ValueError(f'Unknown model {name!r}; set config.model.name to one of {MODEL_NAMES}.')
