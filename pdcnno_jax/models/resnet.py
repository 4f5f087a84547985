"""ResNet for 32x32 inputs (He et al. 2016, CIFAR variant) with feature-map masks.

Depth 6n+2 (resnet20: n=3, resnet32: n=5, resnet56: n=9): a 3x3 stem conv of 16 channels,
three stages of n basic blocks (16, 32, 64 channels; stride 2 at the start of stages 2 and
3, with a 1x1 projection shortcut), global average pooling and a linear classifier.
BatchNorm everywhere.

Pruning policy for residual additions: channels joined by an addition (the "stream": stem,
every block's second conv and its shortcut) must be pruned together across a whole stage or
not at all. We **exclude** them: their masks exist (ones; they gate the stream after each
block's addition) but are marked ``prunable=False``. Each block's inner channels (the output
of its first conv) are free and prunable; compaction slices conv1's outputs, its BatchNorm and
conv2's inputs.

References:
  He et al. 2016, "Deep residual learning for image recognition", section 4.2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pdcnno_jax.models import layers

STAGE_WIDTHS = (16, 32, 64)


class BasicBlock(nnx.Module):
  """conv3x3-BN-ReLU-mask -> conv3x3-BN, + shortcut, ReLU, stream mask."""

  def __init__(self, in_channels: int, inner_channels: int, out_channels: int, stride: int,
               *, rngs: nnx.Rngs):
    self.conv1 = layers.MaskedConv(in_channels, inner_channels, 3, strides=stride,
                                   batch_norm=True, rngs=rngs)
    self.conv2 = layers.ConvNorm(inner_channels, out_channels, 3, batch_norm=True,
                                 rngs=rngs)
    if stride != 1 or in_channels != out_channels:
      self.shortcut = layers.ConvNorm(in_channels, out_channels, 1, strides=stride,
                                      batch_norm=True, rngs=rngs)
    else:
      self.shortcut = None
    self.mask = layers.FeatureMask(jnp.ones((out_channels,), jnp.float32))

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    y = self.conv1(x, train=train)
    y = self.conv2(y, train=train)
    residual = x if self.shortcut is None else self.shortcut(x, train=train)
    return nnx.relu(y + residual) * self.mask[...]


class ResNet(nnx.Module):
  """CIFAR-style ResNet (see module docstring).

  Args:
    depth: 6n+2 (20, 32, 44, 56, 110).
    num_classes: classifier outputs.
    input_shape: ``(H, W, C)``.
    width_multiplier: scales the stage widths (rounded, at least 1).
    inner_widths: explicit per-block inner widths (used by compaction).
    rngs: NNX random streams.
  """

  def __init__(self, depth: int, num_classes: int, input_shape: tuple[int, int, int], *,
               rngs: nnx.Rngs, width_multiplier: float = 1.0,
               inner_widths: tuple[int, ...] | None = None):
    if (depth - 2) % 6 or depth < 8:
      raise ValueError(f'CIFAR ResNet depth must be 6n+2 (20, 32, 56, ...), got {depth}.')
    n = (depth - 2) // 6
    widths = [max(1, int(round(w * width_multiplier))) for w in STAGE_WIDTHS]
    if inner_widths is None:
      inner_widths = tuple(w for w in widths for _ in range(n))
    if len(inner_widths) != 3 * n:
      raise ValueError(f'resnet{depth} has {3 * n} blocks, got {len(inner_widths)} widths.')
    self.depth = depth
    self.width_multiplier = width_multiplier
    height, width, channels = input_shape
    self.stem = layers.MaskedConv(channels, widths[0], 3, batch_norm=True, rngs=rngs)
    blocks, hws, in_ch, b = [], [], widths[0], 0
    for stage, out_ch in enumerate(widths):
      for i in range(n):
        stride = 2 if (stage > 0 and i == 0) else 1
        height = layers.conv_output_size(height, 3, stride, 'SAME')
        width = layers.conv_output_size(width, 3, stride, 'SAME')
        blocks.append(BasicBlock(in_ch, inner_widths[b], out_ch, stride, rngs=rngs))
        hws.append((height, width))
        in_ch, b = out_ch, b + 1
    self.blocks = nnx.List(blocks)
    self._input_hw = tuple(input_shape[:2])
    self._hw = tuple(hws)
    self.classifier = nnx.Linear(in_ch, num_classes, kernel_init=layers.lecun_normal,
                                 rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = self.stem(x, train=train)
    for block in self.blocks:
      x = block(x, train=train)
    return self.classifier(x.mean(axis=(1, 2)))

  def layer_specs(self) -> tuple[layers.LayerSpec, ...]:
    """Conv and dense layers in forward order; stream channels are not prunable."""
    specs = [layers.conv_spec('stem', self.stem, self._input_hw, in_mask=None,
                                     prunable=False)]
    for i, (block, hw) in enumerate(zip(self.blocks, self._hw)):
      name = f'blocks.{i}'
      specs.append(layers.conv_spec(f'{name}.conv1', block.conv1, hw, in_mask=None))
      # conv2 and the shortcut feed the addition; the block's stream mask is not prunable.
      specs.append(layers.conv_spec(f'{name}.conv2', block.conv2, hw,
                                           in_mask=f'{name}.conv1', prunable=False))
      if block.shortcut is not None:
        specs.append(layers.conv_spec(f'{name}.shortcut', block.shortcut, hw,
                                             in_mask=None, prunable=False))
    specs.append(layers.dense_spec('classifier', self.classifier, in_mask=None))
    return tuple(specs)

  def constructor_kwargs(self) -> dict:
    """Keyword arguments that rebuild this architecture (used by compaction)."""
    return dict(depth=self.depth, width_multiplier=self.width_multiplier,
                inner_widths=tuple(b.conv1.conv.out_features for b in self.blocks))
