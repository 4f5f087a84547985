"""Building blocks shared by every model: feature-map masks and layer descriptions.

Every convolution's activation is followed by a :class:`FeatureMask`, a non-trainable NNX
variable of ones (one entry per output channel). Pruning sets entries to zero; the masks live
in the model state, so they are saved with checkpoints and restored on resume, and optimizers
never see them (they are built on ``nnx.Param`` only).

Each model also describes its layers as a tuple of :class:`LayerSpec`. Counting (params and
MACs), pruning (which channels may go) and compaction (which parameter axes to slice) are
generic functions of these descriptions, in the spirit of Torch-Pruning's dependency groups.

References:
  DESIGN.md, "Masks and compaction".
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx


class FeatureMask(nnx.Variable):
  """Per-channel keep mask (1 = kept, 0 = pruned) applied after a conv activation.

  The value has shape ``(C,)``; a caller may temporarily substitute a broadcastable
  ``(N, 1, 1, C)`` value (one mask per sample), which is how the Taylor scorer obtains
  per-sample ``<dL/dF, F>`` from a single backward pass.
  """


he_normal = nnx.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal')
lecun_normal = nnx.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """Static description of one conv or dense layer, for counting, pruning and compaction.

  Attributes:
    name: dotted path of the layer's module inside the model (e.g. ``'features.0'``). The
      conv/dense module is ``<name>.conv`` / ``<name>.dense`` for masked blocks, or
      ``<name>`` itself for plain layers: see ``param_path``.
    kind: ``'conv'`` or ``'dense'``.
    param_path: path (tuple of keys) of the nnx.Conv / nnx.Linear module in the model.
    kernel_shape: HWIO for conv, ``(in, out)`` for dense, at construction width.
    output_hw: spatial size of the layer's output (``(1, 1)`` for dense).
    in_mask: name of the layer whose mask gates this layer's input channels, or None when
      the input is the image or an unmasked/unprunable tensor.
    out_mask_path: path of this layer's FeatureMask, or None (classifier, residual sums).
    prunable: whether the output channels may be pruned. False for the classifier and for
      channels coupled by residual additions (ResNet stream channels are excluded, not
      coupled: see resnet.py).
    flatten_hw: for a dense layer that reads a flattened NHWC map, that map's ``(H, W)``;
      its input index is ``(h * W + w) * C + c``.
    norm_path: path of a BatchNorm applied to this layer's output channels, or None.
  """

  name: str
  kind: str
  param_path: tuple[str | int, ...]
  kernel_shape: tuple[int, ...]
  output_hw: tuple[int, int]
  in_mask: Optional[str]
  out_mask_path: Optional[tuple[str | int, ...]]
  prunable: bool
  flatten_hw: Optional[tuple[int, int]] = None
  norm_path: Optional[tuple[str | int, ...]] = None

  @property
  def in_channels(self) -> int:
    return self.kernel_shape[-2]

  @property
  def out_channels(self) -> int:
    return self.kernel_shape[-1]


class ConvNorm(nnx.Module):
  """conv -> (BatchNorm), no activation and no mask (feeds a residual addition)."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *,
               rngs: nnx.Rngs, padding: str = 'SAME', strides: int = 1,
               batch_norm: bool = False):
    self.conv = nnx.Conv(in_channels, out_channels, (kernel_size, kernel_size),
                         strides=strides, padding=padding, use_bias=not batch_norm,
                         kernel_init=he_normal, rngs=rngs)
    self.norm = (nnx.BatchNorm(out_channels, momentum=0.9, rngs=rngs)
                 if batch_norm else None)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    y = self.conv(x)
    if self.norm is not None:
      y = self.norm(y, use_running_average=not train)
    return y


class MaskedConv(ConvNorm):
  """conv -> (BatchNorm) -> ReLU -> feature-map mask."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *,
               rngs: nnx.Rngs, padding: str = 'SAME', strides: int = 1,
               batch_norm: bool = False):
    super().__init__(in_channels, out_channels, kernel_size, rngs=rngs, padding=padding,
                     strides=strides, batch_norm=batch_norm)
    self.mask = FeatureMask(jnp.ones((out_channels,), jnp.float32))

  def activation(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """The feature maps F before masking: ReLU(norm(conv(x)))."""
    return nnx.relu(super().__call__(x, train=train))

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    return self.activation(x, train=train) * self.mask[...]


def conv_output_size(size: int, kernel: int, stride: int, padding: str) -> int:
  """Spatial output size of a conv or pool (``'SAME'`` or ``'VALID'`` padding)."""
  if padding == 'SAME':
    return -(-size // stride)
  return (size - kernel) // stride + 1


def conv_spec(name: str, block: ConvNorm, output_hw: tuple[int, int],
              in_mask: Optional[str], prunable: bool = True) -> LayerSpec:
  """LayerSpec of a :class:`ConvNorm` / :class:`MaskedConv` at attribute path ``name``."""
  path = tuple(int(p) if p.isdigit() else p for p in name.split('.'))
  kernel_shape = tuple(block.conv.kernel.shape)
  return LayerSpec(
      name=name, kind='conv', param_path=path + ('conv',), kernel_shape=kernel_shape,
      output_hw=output_hw, in_mask=in_mask,
      out_mask_path=path + ('mask',) if isinstance(block, MaskedConv) else None,
      prunable=prunable and isinstance(block, MaskedConv),
      norm_path=path + ('norm',) if block.norm is not None else None)


def dense_spec(name: str, layer: nnx.Linear, in_mask: Optional[str],
               flatten_hw: Optional[tuple[int, int]] = None,
               out_mask_path: Optional[tuple[str | int, ...]] = None,
               prunable: bool = False) -> LayerSpec:
  """LayerSpec of an ``nnx.Linear`` stored at attribute path ``name``."""
  path = tuple(int(p) if p.isdigit() else p for p in name.split('.'))
  return LayerSpec(
      name=name, kind='dense', param_path=path, kernel_shape=tuple(layer.kernel.shape),
      output_hw=(1, 1), in_mask=in_mask, out_mask_path=out_mask_path, prunable=prunable,
      flatten_hw=flatten_hw)
