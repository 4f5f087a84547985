"""Tests for the confirmation of latency selection's choice: the best of many noisy
measurements is optimistic, so the chosen network is measured again and chosen again."""

import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from pdcnno_jax import config_lib
from pdcnno_jax.models import counting
from pdcnno_jax.pruning import latency_search, stage
from pdcnno_jax.testing import random_model as build_model
from pdcnno_jax.train import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class LuckyMeasure:
  """Latency ``a / 8``, except that the first measurement of ``lucky`` reports ``reported``."""

  def __init__(self, lucky, reported):
    self.lucky, self.reported, self.calls, self.confirmed = lucky, reported, [], []

  def __call__(self, candidate, current=None):
    first = candidate == self.lucky and candidate not in self.calls
    self.calls.append(dict(candidate))
    latency = self.reported if first else candidate['a'] / 8
    return latency_search.Measurement(latency, None if current is None else current['a'] / 8)

  def confirm(self, widths):
    self.confirmed.append(dict(widths))
    return widths['a'] / 8


def _search(measure, confirm, rounds=4):
  costs = latency_search.ScoreCosts.from_scores({'a': np.arange(1.0, 9.0)},
                                                {'a': np.ones(8, np.float32)})
  return latency_search.greedy_search(costs, measure, target_speedup=2.0, min_channels=1,
                                      step_fraction=0.125, start={'a': 8}, start_latency=1.0,
                                      confirm=confirm, confirm_rounds=rounds)


def test_a_lucky_measurement_is_confirmed_away_and_the_search_resumes():
  # a=6 measures 0.4 once (it is 0.75): without confirmation the search stops there.
  unconfirmed = _search(LuckyMeasure({'a': 6}, 0.4), None)
  assert unconfirmed.widths == {'a': 6} and unconfirmed.latency == 0.4 and unconfirmed.reached
  measure = LuckyMeasure({'a': 6}, 0.4)
  result = _search(measure, measure.confirm)
  assert measure.confirmed == [{'a': 6}, {'a': 4}]  # Refuted, resumed from it, confirmed.
  assert result.widths == {'a': 4} and result.latency == pytest.approx(0.5) and result.reached
  assert result.stopped == 'target' and result.confirmed == ('a=6', 'a=4')
  assert result.points['a=6'][1] == pytest.approx(0.75)


def test_refuted_choices_stop_after_the_rounds():
  measure = LuckyMeasure({'a': 6}, 0.4)
  result = _search(measure, lambda widths: 1.0, rounds=1)  # Every confirmation: as slow.
  assert not result.reached and result.stopped == 'confirmation'
  assert len(result.confirmed) == 2  # One per choice: the first and the resumed one.


def test_an_honest_choice_is_confirmed_once_and_kept():
  measure = LuckyMeasure(None, 0.0)
  result = _search(measure, measure.confirm)
  assert result.widths == {'a': 4} and result.reached and result.stopped == 'target'
  assert measure.confirmed == [{'a': 4}]


def _noisy_timer():
  """A network's first measurement as a search candidate is off by a factor in [0.8, 1.05]
  (noise: the search keeps the lucky ones); later measurements are exact."""
  seen, timed = set(), []
  noise = iter(np.random.default_rng(0).uniform(0.8, 1.05, 10**4))

  def fake_ms(graphdef, model_state):
    kept = counting.kept_channels(state_lib.merge_model(graphdef, model_state))
    return kept, 1.0 + 0.3 * kept['conv1'] + 0.2 * kept['conv2']

  def timer(models):
    timed.append(sorted(models))
    times = {}
    for name, (graphdef, model_state) in models.items():
      kept, ms = fake_ms(graphdef, model_state)
      key = tuple(sorted(kept.items()))
      if name == 'candidate' and key not in seen:
        seen.add(key)
        ms *= next(noise)
      times[name] = ms
    return times

  return timer, timed


@pytest.mark.parametrize('confirmations', [0, 2])
def test_confirmed_prediction_matches_the_check_and_a_second_run_is_free(tmp_path,
                                                                         confirmations):
  model_config = ml_collections.ConfigDict({'name': 'lenet5_caffe', 'width_multiplier': 0.5})
  graphdef, state = state_lib.create_train_state(build_model(model_config, (28, 28, 1)),
                                                 optax.sgd(0.1))
  target = stage.PruningTarget(graphdef, state, model_config, 10, (28, 28, 1),
                               lambda x: x.astype(jnp.float32) / 255.0)
  config = config_lib.load_config(os.path.join(REPO, 'configs', 'default.py')).prune
  config.update(method='l1', selection='latency', target_speedup=1.6, latency_repeats=1,
                latency_measurements=60, latency_step=0.125, min_channels=2,
                latency_cache_dir=str(tmp_path), latency_confirmations=confirmations)
  timer, timed = _noisy_timer()
  reports = []
  for _ in range(2):
    calls = len(timed)
    _, _, report = stage.run_pruning(target, config,
                                     timers=stage.LatencyTimers(end_to_end=timer))
    reports.append(report['latency'])
  first, second = reports
  error = first['predicted_speedup'] / first['measured_speedup'] - 1
  if confirmations:
    assert error == pytest.approx(0.0) and first['target_reached']
    assert first['checks'][-1]['confirmed']
    assert second['widths'] == first['widths'] and second['table_measured'] == 0
    assert first['confirmation_measurements'] >= 2 and second['confirmation_measurements'] == 0
    assert first['table_entries'] >= first['table_measured']  # Each network measured once.
    assert timed[calls:] == [['compacted', 'dense']]  # Confirmations come from the cache.
  else:
    assert error > 0.05  # The winner's curse.
