"""Parameter and FLOP counts per layer that respect feature-map masks.

FLOPs are counted as multiply-accumulates (MACs): a conv layer costs
``H_out * W_out * K_h * K_w * C_in * C_out`` MACs, a dense layer ``in * out``. Pooling,
activations, BatchNorm and bias additions are not counted (they are O(activations), not
O(weights x positions)). With masks, ``C_in`` / ``C_out`` are the kept channel counts: this
is exactly what the compacted model costs.

Parameters count kernel, bias and BatchNorm scale/offset entries of kept channels (BatchNorm
running statistics are state, not parameters).

References:
  DESIGN.md, "Masks and compaction" (count FLOPs as MACs and say so).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np
from flax import nnx



@dataclasses.dataclass(frozen=True)
class LayerCount:
  """Counts of one layer: kept input/output channels, parameters and MACs."""
  name: str
  kind: str
  in_channels: int
  out_channels: int
  params: int
  macs: int


def _get(module: nnx.Module, path) -> nnx.Module:
  for key in path:
    module = module[key] if isinstance(key, int) else getattr(module, key)
  return module


def kept_channels(model: nnx.Module) -> dict[str, int]:
  """Number of kept (mask == 1) output channels of every masked layer, by layer name."""
  counts = {}
  for spec in model.layer_specs():
    if spec.out_mask_path is not None:
      mask = np.asarray(_get(model, spec.out_mask_path)[...])
      counts[spec.name] = int((mask != 0).sum())
  return counts


def count_layers(model: nnx.Module,
                 kept: Mapping[str, int] | None = None) -> list[LayerCount]:
  """Per-layer parameter and MAC counts respecting the masks.

  Args:
    model: a model of this package (has ``layer_specs()``); may be abstract
      (``nnx.eval_shape``) when ``kept`` is given.
    kept: kept output channels per masked layer; defaults to the model's masks. Layers
      missing from it count at full width.

  Returns:
    One LayerCount per conv/dense layer, in forward order.
  """
  kept = kept_channels(model) if kept is None else kept
  rows = []
  for spec in model.layer_specs():
    module = _get(model, spec.param_path)
    out_ch = kept.get(spec.name, spec.out_channels) if spec.out_mask_path else spec.out_channels
    if spec.in_mask is None or spec.in_mask not in kept:
      in_ch = spec.in_channels
    elif spec.flatten_hw is not None:
      in_ch = spec.flatten_hw[0] * spec.flatten_hw[1] * kept[spec.in_mask]
    else:
      in_ch = kept[spec.in_mask]
    spatial = int(np.prod(spec.kernel_shape[:-2])) if spec.kind == 'conv' else 1
    params = spatial * in_ch * out_ch
    if getattr(module, 'bias', None) is not None:
      params += out_ch
    if spec.norm_path is not None:
      norm = _get(model, spec.norm_path)
      params += out_ch * (int(norm.scale is not None) + int(norm.bias is not None))
    macs = spec.output_hw[0] * spec.output_hw[1] * spatial * in_ch * out_ch
    rows.append(LayerCount(spec.name, spec.kind, in_ch, out_ch, params, macs))
  return rows


def totals(model: nnx.Module, kept: Mapping[str, int] | None = None) -> dict[str, int]:
  """Total parameters and MACs (per example) of ``model`` respecting its masks."""
  rows = count_layers(model, kept)
  return {'params': sum(r.params for r in rows), 'macs': sum(r.macs for r in rows)}
