"""Tests for pdcnno_jax.pruning.selection: threshold, per-layer ratio and MAC-budget rules."""

import ml_collections
import numpy as np
import optax
import pytest

from pdcnno_jax.models import counting
from pdcnno_jax.pruning import masking, scorers, selection
from pdcnno_jax.testing import random_model as build_model
from pdcnno_jax.train import state as state_lib


def _ones(*widths):
  return {f'l{i}': np.ones(w, np.float32) for i, w in enumerate(widths)}


def test_threshold_prunes_below_a_fraction_of_the_layer_mean():
  masks = selection.select_by_threshold({'l0': np.array([1., 2., 3., 10.])}, _ones(4),
                                        threshold=0.5)  # Cut: 0.5 * 4 = 2.
  np.testing.assert_array_equal(masks['l0'], [0, 1, 1, 1])
  masks = selection.select_by_threshold({'l0': np.array([1., 2., 3., 10.])}, _ones(4),
                                        threshold=0.0)
  np.testing.assert_array_equal(masks['l0'], [1, 1, 1, 1])


def test_threshold_statistics_use_kept_channels_and_pruned_ones_stay_pruned():
  current = {'l0': np.array([0, 1, 1, 1], np.float32)}
  # A stale high score on the pruned channel neither revives it nor raises the mean (2).
  masks = selection.select_by_threshold({'l0': np.array([100., 1., 2., 3.])}, current,
                                        threshold=0.6)
  np.testing.assert_array_equal(masks['l0'], [0, 0, 1, 1])
  np.testing.assert_array_equal(current['l0'], [0, 1, 1, 1])  # Inputs are not modified.


def test_threshold_respects_min_channels_and_never_empties_a_layer():
  scores = {'l0': np.array([0.1, 0.1, 0.1, 10.]), 'l1': np.array([5., 1.])}
  masks = selection.select_by_threshold(scores, _ones(4, 2), threshold=1.0, min_channels=2)
  np.testing.assert_array_equal(masks['l0'], [0, 0, 1, 1])  # Ties: lower index goes first.
  np.testing.assert_array_equal(masks['l1'], [1, 1])  # Already at min_channels.
  masks = selection.select_by_threshold(scores, _ones(4, 2), threshold=1e9, min_channels=1)
  assert all(m.sum() == 1 for m in masks.values())
  np.testing.assert_array_equal(masks['l0'], [0, 0, 0, 1])
  with pytest.raises(ValueError, match='min_channels'):
    selection.select_by_threshold(scores, _ones(4, 2), threshold=1.0, min_channels=0)


def test_layer_ratio_removes_the_lowest_fraction_of_each_layer():
  rng = np.random.default_rng(0)
  scores = {'l0': rng.random(10), 'l1': rng.random(3)}
  masks = selection.select_by_layer_ratio(scores, _ones(10, 3), ratio=0.3, min_channels=2)
  assert masks['l0'].sum() == 7 and masks['l1'].sum() == 3  # 3 - floor(0.9).
  removed = scores['l0'][masks['l0'] == 0]
  assert removed.max() < scores['l0'][masks['l0'] == 1].min()
  # A second pass at the same ratio removes nothing more; a higher ratio only adds zeros.
  again = selection.select_by_layer_ratio(scores, masks, ratio=0.3, min_channels=2)
  np.testing.assert_array_equal(again['l0'], masks['l0'])
  more = selection.select_by_layer_ratio(scores, masks, ratio=0.9, min_channels=2)
  assert more['l0'].sum() == 2 and np.all(more['l0'] <= masks['l0'])
  assert more['l1'].sum() == 2  # 3 - floor(2.7) = 1 < min_channels.
  with pytest.raises(ValueError, match='ratio'):
    selection.select_by_layer_ratio(scores, _ones(10, 3), ratio=1.0)


def test_inputs_are_validated():
  with pytest.raises(ValueError, match='cover layers'):
    selection.select_by_threshold({'l0': np.ones(2)}, _ones(2, 3), threshold=0.5)
  with pytest.raises(ValueError, match='non-finite'):
    selection.select_by_threshold({'l0': np.array([1., np.nan])}, _ones(2), threshold=0.5)
  with pytest.raises(ValueError, match='shape'):
    selection.select_by_threshold({'l0': np.ones(3)}, _ones(2), threshold=0.5)
  with pytest.raises(ValueError, match='prune.selection'):
    selection.select('magic', {}, {}, None, threshold=0.5, ratio=0.5, target_reduction=2.0,
                     min_channels=1)


def _vgg_model():
  config = ml_collections.ConfigDict({'name': 'vgg11', 'width_multiplier': 0.0625})
  return state_lib.create_train_state(build_model(config, (32, 32, 3)), optax.sgd(0.1))


def _macs_with(model, masks):
  kept = counting.kept_channels(model)
  kept.update({name: int(mask.sum()) for name, mask in masks.items()})
  return counting.totals(model, kept)['macs']


@pytest.mark.parametrize('target', [1.5, 3.0])
def test_global_macs_reaches_the_budget_with_the_fewest_removals(target):
  graphdef, state = _vgg_model()
  model = state_lib.merge_model(graphdef, state)
  scores = scorers.random(graphdef, state, seed=1)
  dense = selection.dense_macs(model)
  masks = selection.select_by_macs(scores, masking.read_masks(model), model,
                                   target_reduction=target, min_channels=2)
  assert _macs_with(model, masks) <= dense / target
  assert all(mask.sum() >= 2 for mask in masks.values())

  # Channels go in ascending order of layer-normalised score among layers above the floor:
  # restoring the best removed channel breaks the budget (the removal prefix is minimal).
  normalized = scorers.normalize_per_layer(scores)
  removed = [(normalized[n][r], n, r) for n, m in masks.items() for r in np.flatnonzero(m == 0)]
  _, name, channel = max(removed)
  restored = {n: m.copy() for n, m in masks.items()}
  restored[name][channel] = 1
  assert _macs_with(model, restored) > dense / target
  kept_scores = [normalized[n][r] for n, m in masks.items() if m.sum() > 2
                 for r in np.flatnonzero(m)]
  assert max(removed)[0] <= min(kept_scores)


def test_global_macs_applies_the_pruned_model_and_iterates():
  graphdef, state = _vgg_model()
  model = state_lib.merge_model(graphdef, state)
  scores = scorers.l1(graphdef, state)
  dense = selection.dense_macs(model)
  first = selection.select_by_macs(scores, masking.read_masks(model), model,
                                   target_reduction=1.5)
  state = masking.apply_masks(graphdef, state, first)
  model = state_lib.merge_model(graphdef, state)
  assert counting.totals(model)['macs'] <= dense / 1.5
  second = selection.select_by_macs(scorers.l1(graphdef, state), masking.read_masks(model),
                                    model, target_reduction=3.0, reference_macs=dense)
  for name in first:
    assert np.all(second[name] <= first[name])  # Pruned channels stay pruned.
  assert _macs_with(model, second) <= dense / 3.0
  # Already within budget: nothing changes.
  same = selection.select_by_macs(scores, masking.read_masks(model), model,
                                  target_reduction=1.2)
  for name in same:
    np.testing.assert_array_equal(same[name], masking.read_masks(model)[name])


def test_global_macs_unreachable_target_is_a_clear_error():
  graphdef, state = _vgg_model()
  model = state_lib.merge_model(graphdef, state)
  with pytest.raises(ValueError, match='out of reach'):
    selection.select_by_macs(scorers.l1(graphdef, state), masking.read_masks(model), model,
                             target_reduction=1e6, min_channels=1)
  with pytest.raises(ValueError, match='target_mac_reduction'):
    selection.select_by_macs(scorers.l1(graphdef, state), masking.read_masks(model), model,
                             target_reduction=0.5)


def test_round_schedule_is_geometric_and_ends_at_the_targets():
  rounds = [selection.round_schedule(i, 3, 0.5, 8.0) for i in (1, 2, 3)]
  np.testing.assert_allclose([r[1] for r in rounds], [2.0, 4.0, 8.0])
  np.testing.assert_allclose([1 - r[0] for r in rounds], [0.5 ** (1 / 3), 0.5 ** (2 / 3), 0.5])
  assert selection.round_schedule(1, 1, 0.3, 4.0) == pytest.approx((0.3, 4.0))
  with pytest.raises(ValueError):
    selection.round_schedule(0, 3, 0.5, 2.0)
