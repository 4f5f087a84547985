"""VGG family with feature-map masks (VGG-16 is the PDCNNO paper's network).

VGG-16 has 13 convs (3x3, 'SAME') in five stages separated by 2x2 max-pools, then three fully
connected layers. For 32x32 inputs (CIFAR/SVHN style) the classifier is fc 512 - fc 512 -
fc classes on the 1x1x512 map; for 224x224 inputs it is the original fc 4096 - fc 4096 -
fc classes on the 7x7x512 map. A stage's pool is skipped once the map is 1x1, so 28x28
inputs (Fashion-MNIST) work too. Optional BatchNorm after every conv.

References:
  Simonyan & Zisserman 2015, "Very deep convolutional networks for large-scale image
  recognition" (configurations A, B, D, E).
  PDCNNO paper (papers/pdcnno_mapreduce_cgmse.txt), experimental setup (VGG-16).
"""

from __future__ import annotations

import jax
from flax import nnx

from pdcnno_jax.models import layers

# Conv widths per stage; a pool follows every stage.
VGG_STAGES = {
    'vgg11': ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    'vgg13': ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    'vgg16': ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    'vgg19': ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


class VGG(nnx.Module):
  """VGG network (see module docstring).

  Args:
    depth_name: one of ``VGG_STAGES`` (vgg11, vgg13, vgg16, vgg19).
    num_classes: classifier outputs.
    input_shape: ``(H, W, C)``.
    width_multiplier: scales every hidden width (rounded, at least 1).
    batch_norm: BatchNorm after every conv.
    dropout_rate: dropout before each hidden fc layer.
    conv_widths: explicit conv widths (used by compaction), overriding the configuration.
    fc_width: explicit hidden fc width, overriding the scaled default.
    rngs: NNX random streams.
  """

  def __init__(self, depth_name: str, num_classes: int, input_shape: tuple[int, int, int],
               *, rngs: nnx.Rngs, width_multiplier: float = 1.0, batch_norm: bool = False,
               dropout_rate: float = 0.0, conv_widths: tuple[int, ...] | None = None,
               fc_width: int | None = None):
    if depth_name not in VGG_STAGES:
      raise ValueError(f'Unknown VGG {depth_name!r}; choose from {sorted(VGG_STAGES)}.')
    stages = VGG_STAGES[depth_name]
    scale = lambda w: max(1, int(round(w * width_multiplier)))
    n_convs = sum(len(s) for s in stages)
    if conv_widths is None:
      conv_widths = tuple(scale(w) for s in stages for w in s)
    if len(conv_widths) != n_convs:
      raise ValueError(f'{depth_name} has {n_convs} convs, got {len(conv_widths)} widths.')
    self.depth_name = depth_name
    self.batch_norm = batch_norm
    self.dropout_rate = dropout_rate
    height, width, channels = input_shape
    convs, pools, hws = [], [], []
    index, in_ch = 0, channels
    for stage in stages:
      for _ in stage:
        convs.append(layers.MaskedConv(in_ch, conv_widths[index], 3, batch_norm=batch_norm,
                                       rngs=rngs))
        hws.append((height, width))
        pools.append(False)
        in_ch = conv_widths[index]
        index += 1
      if height > 1 and width > 1:
        pools[-1] = True
        height, width = height // 2, width // 2
    self.features = nnx.List(convs)
    self.pool_after = tuple(pools)
    self._hw = tuple(hws)
    self._flatten_hw = (height, width)
    fc_width = fc_width or scale(512 if input_shape[0] <= 64 else 4096)
    flat = height * width * in_ch
    self.hidden = nnx.List([
        nnx.Linear(flat, fc_width, kernel_init=layers.he_normal, rngs=rngs),
        nnx.Linear(fc_width, fc_width, kernel_init=layers.he_normal, rngs=rngs)])
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs) if dropout_rate > 0 else None
    self.classifier = nnx.Linear(fc_width, num_classes, kernel_init=layers.lecun_normal,
                                 rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    for conv, pool in zip(self.features, self.pool_after):
      x = conv(x, train=train)
      if pool:
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    for dense in self.hidden:
      if self.dropout is not None:
        x = self.dropout(x, deterministic=not train)
      x = nnx.relu(dense(x))
    return self.classifier(x)

  def layer_specs(self) -> tuple[layers.LayerSpec, ...]:
    """Conv and dense layers in forward order (see layers.LayerSpec)."""
    specs, in_mask = [], None
    for i, (conv, hw) in enumerate(zip(self.features, self._hw)):
      specs.append(layers.conv_spec(f'features.{i}', conv, hw, in_mask=in_mask))
      in_mask = f'features.{i}'
    flatten_hw = self._flatten_hw
    for i, dense in enumerate(self.hidden):
      specs.append(layers.dense_spec(f'hidden.{i}', dense, in_mask=in_mask,
                                     flatten_hw=flatten_hw))
      in_mask, flatten_hw = None, None
    specs.append(layers.dense_spec('classifier', self.classifier, in_mask=None))
    return tuple(specs)

  def constructor_kwargs(self) -> dict:
    """Keyword arguments that rebuild this architecture (used by compaction)."""
    return dict(depth_name=self.depth_name, batch_norm=self.batch_norm,
                dropout_rate=self.dropout_rate,
                conv_widths=tuple(c.conv.out_features for c in self.features),
                fc_width=self.hidden[0].out_features)
