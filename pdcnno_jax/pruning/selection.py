"""Which channels to prune, given importance scores: threshold, ratio, MAC or latency budget.

All rules take ``scores`` and the current ``masks`` (both ``{layer name: (C,)}`` over the
prunable layers) and return new 0/1 masks with these guarantees:

* channels already pruned stay pruned (iterative schedules only ever remove more);
* a layer never drops below ``min_channels`` kept channels (>= 1: never an empty layer), and a
  layer already at or below it is left alone;
* only the layers given are touched; callers pass the prunable ones, so the classifier and
  residual-stream channels are never pruned.

Statistics (layer means, L2 normalisation) are over the layer's currently kept channels.
:data:`SELECTIONS` is the registry of rules (``prune.selection``); the ``latency`` rule is
:class:`latency.LatencySelector` (measured per-layer tables, NetAdapt-style search).

References:
  PDCNNO paper (papers/pdcnno_mapreduce_cgmse.txt), FMP (prune maps whose score is below a
  threshold); DESIGN.md, "FMP" (threshold * layer mean, per-layer or global ratio,
  ``min_channels``), "Masks and compaction" (MACs), "Latency-aware selection".
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np
from flax import nnx

from pdcnno_jax.models import counting
from pdcnno_jax.pruning import latency

Masks = dict[str, np.ndarray]


def _check(scores: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray],
           min_channels: int) -> tuple[dict[str, np.ndarray], Masks]:
  """Validates the inputs; returns float64 scores and float32 mask copies."""
  if int(min_channels) != min_channels or min_channels < 1:
    raise ValueError(f'prune.min_channels must be an integer >= 1 (a layer can never lose '
                     f'all its channels), got {min_channels}.')
  if set(scores) != set(masks):
    raise ValueError(f'Scores cover layers {sorted(scores)} but masks cover {sorted(masks)}; '
                     'score exactly the prunable layers.')
  checked_scores, checked_masks = {}, {}
  for name in masks:
    score = np.asarray(scores[name], np.float64)
    mask = np.asarray(masks[name], np.float32)
    if score.shape != mask.shape or mask.ndim != 1:
      raise ValueError(f'Layer {name!r}: scores of shape {score.shape} do not match its mask '
                       f'of shape {mask.shape}.')
    if not np.all(np.isfinite(score[mask != 0])):
      raise ValueError(f'Layer {name!r} has non-finite scores; check the model and the '
                       'scoring data (NaN losses?).')
    if not mask.any():
      raise ValueError(f'Layer {name!r} has no kept channel.')
    checked_scores[name], checked_masks[name] = score, mask.copy()
  return checked_scores, checked_masks


def _lowest_kept(score: np.ndarray, mask: np.ndarray, count: int) -> np.ndarray:
  """Indices of the ``count`` lowest-scoring kept channels (ties: lower index first)."""
  kept = np.flatnonzero(mask)
  order = kept[np.argsort(score[kept], kind='stable')]
  return order[:max(0, count)]


def select_by_threshold(scores: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray], *,
                        threshold: float, min_channels: int = 1) -> Masks:
  """Prunes channel r of a layer when S_r < threshold * mean(S over the layer's kept channels).

  When the rule would leave fewer than ``min_channels``, the best-scoring ``min_channels``
  are kept.

  References:
    PDCNNO paper, FMP (prune kernels whose mean L_a-norm is below a preset threshold);
    DESIGN.md, "FMP".
  """
  if not threshold >= 0:
    raise ValueError(f'prune.threshold must be >= 0 (a fraction of the layer mean), '
                     f'got {threshold}.')
  scores, masks = _check(scores, masks, min_channels)
  for name, mask in masks.items():
    kept = np.flatnonzero(mask)
    cut = threshold * scores[name][kept].mean()
    below = kept[scores[name][kept] < cut]
    removable = len(kept) - min_channels
    mask[_lowest_kept(scores[name], mask, min(len(below), removable))] = 0.0
  return masks


def select_by_layer_ratio(scores: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray], *,
                          ratio: float, min_channels: int = 1) -> Masks:
  """Prunes the lowest-scoring channels until a fraction ``ratio`` of each layer is gone.

  The fraction is of the layer's full width: layer of C channels keeps
  ``max(min_channels, C - floor(ratio * C))``; channels already pruned count towards it.
  """
  if not 0 <= ratio < 1:
    raise ValueError(f'prune.ratio must be in [0, 1) (the fraction of channels removed per '
                     f'layer), got {ratio}.')
  scores, masks = _check(scores, masks, min_channels)
  for name, mask in masks.items():
    width = mask.shape[0]
    target = max(min_channels, width - int(np.floor(ratio * width + 1e-9)))
    kept = int(mask.sum())
    mask[_lowest_kept(scores[name], mask, kept - target)] = 0.0
  return masks


def _all_kept(model: nnx.Module, masks: Mapping[str, np.ndarray]) -> dict[str, int]:
  """Kept channel counts of every masked layer, taking ``masks`` for the layers named."""
  kept = counting.kept_channels(model)
  kept.update({name: int(np.count_nonzero(mask)) for name, mask in masks.items()})
  return kept


def dense_macs(model: nnx.Module) -> int:
  """MACs per example of ``model`` with every mask set to ones."""
  full = {spec.name: spec.out_channels for spec in model.layer_specs()
          if spec.out_mask_path is not None}
  return counting.totals(model, full)['macs']


def select_by_macs(scores: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray],
                   model: nnx.Module, *, target_reduction: float, min_channels: int = 1,
                   reference_macs: int | None = None) -> Masks:
  """Prunes the globally lowest channels (after per-layer L2 normalisation) to a MAC budget.

  Channels are removed in ascending order of normalised score, skipping a layer once it is at
  ``min_channels``, until the model's MACs (counting.py, which charges each layer for its kept
  input *and* output channels, so removing a map also saves MACs in the next layer) are at most
  ``reference_macs / target_reduction``. The shortest such prefix of the removal order is found
  by bisection (MACs only decrease along it).

  Args:
    scores: prunable layer name -> scores.
    masks: prunable layer name -> current 0/1 masks.
    model: the model (for its layer specs and the masks of unprunable layers).
    target_reduction: reference MACs / MACs after pruning, >= 1.
    min_channels: fewest channels a layer keeps.
    reference_macs: MACs the reduction is relative to; default the dense (unpruned) model.

  Returns:
    New masks.

  Raises:
    ValueError: if the budget cannot be met without going below ``min_channels``.

  References:
    DESIGN.md, "FMP" (global ratio after per-layer normalisation), "Masks and compaction".
  """
  if not target_reduction >= 1:
    raise ValueError(f'prune.target_mac_reduction must be >= 1 (dense MACs / pruned MACs), '
                     f'got {target_reduction}.')
  scores, masks = _check(scores, masks, min_channels)
  reference = dense_macs(model) if reference_macs is None else reference_macs
  budget = reference / float(target_reduction)
  kept = _all_kept(model, masks)
  macs = lambda counts: counting.totals(model, counts)['macs']
  if macs(kept) <= budget:
    return masks

  normalized = {}
  for name, score in scores.items():
    live = masks[name] != 0
    norm = np.linalg.norm(score[live])
    normalized[name] = score / norm if norm > 0 else score
  candidates = sorted(
      ((normalized[name][r], index, r, name) for index, name in enumerate(masks)
       for r in np.flatnonzero(masks[name])),
      key=lambda c: c[:3])
  counts = dict(kept)
  removal = []
  for _, _, channel, name in candidates:
    if counts[name] > min_channels:
      counts[name] -= 1
      removal.append((name, channel))

  def counts_after(prefix: int) -> dict[str, int]:
    after = dict(kept)
    for name, _ in removal[:prefix]:
      after[name] -= 1
    return after

  if macs(counts_after(len(removal))) > budget:
    best = reference / macs(counts_after(len(removal)))
    raise ValueError(
        f'prune.target_mac_reduction={target_reduction} is out of reach with '
        f'prune.min_channels={min_channels}: the most this model can be reduced is '
        f'{best:.3g}x. Lower the target or min_channels.')
  low, high = 0, len(removal)  # macs(low) > budget >= macs(high)
  while high - low > 1:
    middle = (low + high) // 2
    if macs(counts_after(middle)) <= budget:
      high = middle
    else:
      low = middle
  for name, channel in removal[:high]:
    masks[name][channel] = 0.0
  return masks


@dataclasses.dataclass(frozen=True)
class SelectionOptions:
  """The ``prune`` settings a rule reads (each rule reads its own), for one round."""

  min_channels: int
  threshold: float = 0.5
  ratio: float = 0.5
  target_reduction: float = 1.0
  target_speedup: float = 1.0
  reference_macs: int | None = None
  latency: latency.LatencySelector | None = None


def _by_latency(scores, masks, model, options: SelectionOptions) -> Masks:
  del model
  if options.latency is None:
    raise ValueError("prune.selection='latency' needs a latency selector (built by "
                     'stage.run_pruning from the latency tables).')
  _check(scores, masks, options.min_channels)
  return options.latency.select(scores, masks, target_speedup=options.target_speedup,
                                min_channels=options.min_channels)


Rule = Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray], nnx.Module,
                 SelectionOptions], Masks]
SELECTIONS: dict[str, Rule] = {
    'threshold': lambda scores, masks, model, o: select_by_threshold(
        scores, masks, threshold=o.threshold, min_channels=o.min_channels),
    'layer_ratio': lambda scores, masks, model, o: select_by_layer_ratio(
        scores, masks, ratio=o.ratio, min_channels=o.min_channels),
    'global_macs': lambda scores, masks, model, o: select_by_macs(
        scores, masks, model, target_reduction=o.target_reduction,
        min_channels=o.min_channels, reference_macs=o.reference_macs),
    'latency': _by_latency,
}


def select(selection: str, scores: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray],
           model: nnx.Module, options: SelectionOptions | None = None,
           **settings) -> Masks:
  """Applies the rule ``SELECTIONS[selection]`` (``prune.selection``).

  ``options`` or keyword ``settings`` (the fields of :class:`SelectionOptions`).
  """
  if selection not in SELECTIONS:
    raise ValueError(f'Unknown prune.selection {selection!r}; choose from '
                     f'{tuple(SELECTIONS)}.')
  options = options or SelectionOptions(**settings)
  return SELECTIONS[selection](scores, masks, model, options)


def round_schedule(round_index: int, rounds: int, ratio: float,
                   target_reduction: float) -> tuple[float, float]:
  """Per-round targets of an iterative schedule that ends at the final targets.

  Round i of k (1-based) removes a fraction ``1 - (1 - ratio)^(i/k)`` of each layer and
  reduces MACs (or latency: pass the target speed-up) by ``target_reduction^(i/k)``: a
  geometric schedule, every round removing the
  same fraction of what is left. The threshold rule needs no schedule (it is re-applied to
  the fine-tuned model's new scores every round).

  Returns:
    ``(ratio_i, target_reduction_i)``.
  """
  if not 1 <= round_index <= rounds:
    raise ValueError(f'round {round_index} outside 1..{rounds}.')
  fraction = round_index / rounds
  return 1.0 - (1.0 - ratio) ** fraction, float(target_reduction) ** fraction

