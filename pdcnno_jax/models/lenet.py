"""LeNet-5 with feature-map masks.

Two variants:
  * ``lenet5``: the delay-synchronization paper's LeNet-5: conv 6 (5x5) - max-pool -
    conv 16 (5x5) - max-pool - fc 120 - fc 84 - fc classes. On 28x28 inputs the first conv
    pads ('SAME') as LeCun's network saw 32x32 digits, so both give 5x5x16 = 400 features.
  * ``lenet5_caffe``: Caffe's LeNet used in pruning papers: conv 20 - pool - conv 50 - pool -
    fc 500 - fc classes.

A width multiplier scales every hidden width (rounded, at least 1).

References:
  LeCun et al. 1998, "Gradient-based learning applied to document recognition".
  Delay synchronization paper (papers/delay_sync_parallel.txt), experimental setup.
"""

from __future__ import annotations

import jax
from flax import nnx

from pdcnno_jax.models import layers

_VARIANTS = {
    # name: (conv widths, hidden fc widths)
    'lenet5': ((6, 16), (120, 84)),
    'lenet5_caffe': ((20, 50), (500,)),
}


def _scaled(width: int, multiplier: float) -> int:
  return max(1, int(round(width * multiplier)))


class LeNet5(nnx.Module):
  """LeNet-5 (see module docstring) with a mask after each conv activation.

  Args:
    num_classes: classifier outputs.
    input_shape: ``(H, W, C)`` of the images.
    variant: ``'lenet5'`` or ``'lenet5_caffe'``.
    width_multiplier: scales every hidden width.
    conv_widths: explicit conv widths (used by compaction), overriding the variant's.
    fc_widths: explicit hidden fc widths, overriding the variant's (latency benchmarks).
    rngs: NNX random streams.
  """

  def __init__(self, num_classes: int, input_shape: tuple[int, int, int], *,
               rngs: nnx.Rngs, variant: str = 'lenet5', width_multiplier: float = 1.0,
               conv_widths: tuple[int, int] | None = None,
               fc_widths: tuple[int, ...] | None = None):
    if variant not in _VARIANTS:
      raise ValueError(f'Unknown LeNet variant {variant!r}; choose from {sorted(_VARIANTS)}.')
    base_conv, base_fc = _VARIANTS[variant]
    conv_widths = tuple(conv_widths or (_scaled(w, width_multiplier) for w in base_conv))
    fc_widths = tuple(fc_widths or (_scaled(w, width_multiplier) for w in base_fc))
    if len(fc_widths) != len(base_fc):
      raise ValueError(f'LeNet variant {variant!r} has {len(base_fc)} hidden fc layers, got '
                       f'fc_widths={fc_widths}.')
    height, width, channels = input_shape
    self.variant = variant
    self.width_multiplier = width_multiplier
    self.input_shape = tuple(input_shape)
    # 28x28 inputs pad the first conv so the map sizes match LeNet's 32x32 digits.
    self.first_padding = 'SAME' if height < 32 else 'VALID'
    self.conv1 = layers.MaskedConv(channels, conv_widths[0], 5, padding=self.first_padding,
                                   rngs=rngs)
    self.conv2 = layers.MaskedConv(conv_widths[0], conv_widths[1], 5, padding='VALID',
                                   rngs=rngs)
    h1 = layers.conv_output_size(height, 5, 1, self.first_padding)
    w1 = layers.conv_output_size(width, 5, 1, self.first_padding)
    h2, w2 = (h1 // 2 - 4), (w1 // 2 - 4)
    if h2 < 2 or w2 < 2:
      raise ValueError(f'LeNet-5 needs inputs of at least 28x28, got {input_shape}.')
    self._hw = ((h1, w1), (h2, w2), (h2 // 2, w2 // 2))
    flat = self._hw[2][0] * self._hw[2][1] * conv_widths[1]
    widths = (flat,) + fc_widths
    self.hidden = nnx.List([
        nnx.Linear(a, b, kernel_init=layers.he_normal, rngs=rngs)
        for a, b in zip(widths[:-1], widths[1:])])
    self.classifier = nnx.Linear(widths[-1], num_classes, kernel_init=layers.lecun_normal,
                                 rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = self.conv1(x, train=train)
    x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    x = self.conv2(x, train=train)
    x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    for dense in self.hidden:
      x = nnx.relu(dense(x))
    return self.classifier(x)

  def layer_specs(self) -> tuple[layers.LayerSpec, ...]:
    """Conv and dense layers in forward order (see layers.LayerSpec)."""
    specs = [
        layers.conv_spec('conv1', self.conv1, self._hw[0], in_mask=None),
        layers.conv_spec('conv2', self.conv2, self._hw[1], in_mask='conv1'),
    ]
    in_mask, flatten_hw = 'conv2', self._hw[2]
    for i, dense in enumerate(self.hidden):
      specs.append(layers.dense_spec(f'hidden.{i}', dense, in_mask=in_mask,
                                     flatten_hw=flatten_hw))
      in_mask, flatten_hw = None, None
    specs.append(layers.dense_spec('classifier', self.classifier, in_mask=in_mask,
                                   flatten_hw=flatten_hw))
    return tuple(specs)

  def constructor_kwargs(self) -> dict:
    """Keyword arguments that rebuild this architecture (used by compaction)."""
    return dict(variant=self.variant, width_multiplier=self.width_multiplier,
                conv_widths=(self.conv1.conv.out_features, self.conv2.conv.out_features))
