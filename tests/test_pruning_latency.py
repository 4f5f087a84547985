"""Tests for latency-aware selection: the greedy search on measured networks, the measurement
cache, and the selection through run_pruning, on fake network latencies with known answers."""

import json
import math
import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from pdcnno_jax import config_lib
from pdcnno_jax.models import counting
from pdcnno_jax.pruning import latency, latency_search, stage
from pdcnno_jax.testing import random_model as build_model
from pdcnno_jax.train import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeMeasure:
  """A :class:`latency_search.Measure` from ``fn(widths) -> ms`` (dense = ``full``)."""

  def __init__(self, fn, full, budget=10**6):
    self.fn, self.full, self.budget, self.calls = fn, dict(full), budget, []

  def __call__(self, candidate, current=None):
    if len(self.calls) >= self.budget:
      return None
    self.calls.append(dict(candidate))
    dense = self.fn(self.full)
    return latency_search.Measurement(self.fn(candidate) / dense,
                                      None if current is None else self.fn(current) / dense)


def _search(fn, scores, full, target, *, min_channels=1, step=0.125, budget=10**6):
  costs = latency_search.ScoreCosts.from_scores(
      scores, {name: np.ones(w, np.float32) for name, w in full.items()})
  measure = FakeMeasure(fn, full, budget)
  result = latency_search.greedy_search(costs, measure, target_speedup=target,
                                        min_channels=min_channels, step_fraction=step,
                                        start=full, start_latency=1.0)
  return result, measure, costs


def _dominated(result):
  """Measured points at least as wide in every layer (not the result) and as fast."""
  return [w for w, t in result.points.values() if w != result.widths
          and all(w[n] >= result.widths[n] for n in w) and t <= result.latency]


def test_search_finds_the_optimum_of_a_linear_network():
  # Latency = total width: every channel saves the same, so the optimum removes the globally
  # lowest (layer-L2-normalised) scores. a: ten of 1/sqrt(10) = 0.316; b: 1..10 / sqrt(385),
  # six of them below 0.316. Speed-up 2 = remove ten channels: six of b, four of a.
  full = {'a': 10, 'b': 10}
  result, _, costs = _search(lambda w: w['a'] + w['b'], {'a': np.ones(10),
                                                         'b': np.arange(1.0, 11.0)}, full, 2.0)
  assert result.widths == {'a': 6, 'b': 4} and result.reached
  assert result.latency == pytest.approx(0.5) and result.stopped == 'target'
  masks = costs.masks({'a': np.ones(10), 'b': np.ones(10)}, result.widths)
  np.testing.assert_array_equal(masks['b'], [0] * 6 + [1] * 4)  # The lowest go.


def test_search_jumps_a_plateau_and_keeps_the_widest_width_of_the_step():
  # Latency in steps of 8 channels: 28 is no faster than 32 (the step doubles), and the cut
  # that reaches 2x (24 -> 12) is refined by bisection to 16, the widest width as fast.
  result, measure, _ = _search(lambda w: 8 * math.ceil(w['a'] / 8), {'a': np.linspace(1, 2, 32)},
                               {'a': 32}, 2.0)
  assert result.widths == {'a': 16}
  assert {'a': 28} in measure.calls and {'a': 21} in measure.calls  # Tried, not chosen.
  assert not _dominated(result)


def test_search_stops_at_the_target():
  # Linear latency, target 1.25: the first widths at 80% of the dense latency, not fewer.
  full = {'a': 12, 'b': 8}
  rng = np.random.default_rng(0)
  result, _, _ = _search(lambda w: w['a'] + w['b'], {'a': rng.random(12), 'b': rng.random(8)},
                         full, 1.25)
  assert sum(result.widths.values()) == 16 and result.reached


def test_the_last_step_takes_the_candidate_reaching_the_target_that_loses_least():
  # Latency 2a + b. Cutting a saves 2 for 0.5 of score (0.25 per unit), cutting b saves 1
  # for 0.3: the best ratio is a, but both reach 12/11 and b loses less.
  full = {'a': 4, 'b': 4}
  result, _, _ = _search(lambda w: 2 * w['a'] + w['b'],
                         {'a': np.ones(4), 'b': np.array([1.0, 1.0, 1.0, 2.85])}, full, 12 / 11)
  assert result.widths == {'a': 4, 'b': 3}


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_no_chosen_width_is_slower_than_a_measured_wider_one(seed):
  rng = np.random.default_rng(seed)
  full = {'a': 24, 'b': 40, 'c': 16}
  period = {'a': 8, 'b': 6, 'c': 4}
  wobble = {name: rng.random(w + 1) for name, w in full.items()}  # Random slow widths.

  def fn(widths):
    return sum(0.2 * period[n] * math.ceil(w / period[n]) + wobble[n][w] * (w % 5 == 0)
               for n, w in widths.items()) + 0.01 * widths['a'] * widths['b']

  result, _, _ = _search(fn, {n: rng.random(w) for n, w in full.items()}, full, 2.5,
                         min_channels=2)
  assert result.reached and result.latency <= 1 / 2.5
  assert result.latency == pytest.approx(fn(result.widths) / fn(full))
  assert all(w >= 2 for w in result.widths.values())
  assert not _dominated(result)


def test_budget_and_unreachable_targets_keep_the_fastest_measured_point():
  full = {'a': 8, 'b': 8}
  fn = lambda w: 4 + w['a'] + 2 * w['b']
  result, measure, _ = _search(fn, {'a': np.ones(8), 'b': np.ones(8)}, full, 10.0,
                               min_channels=2)
  assert result.stopped == 'no faster width' and not result.reached
  assert result.widths == {'a': 2, 'b': 2}  # Every layer down to min_channels.
  result, measure, _ = _search(fn, {'a': np.ones(8), 'b': np.ones(8)}, full, 10.0,
                               min_channels=2, budget=5)
  assert result.stopped == 'budget' and len(measure.calls) == 5
  fastest = min(t for _, t in result.points.values())
  assert result.latency == fastest and not _dominated(result)


def _drifting_timer(fn, log):
  """Fake EndToEndTimer on ``(widths, None)`` models: every call runs under another load."""
  loads = iter(np.random.default_rng(0).uniform(1, 3, 10**4))

  def timer(models):
    load = next(loads)
    log.append(sorted(models))
    return {name: load * fn(widths) for name, (widths, _) in models.items()}

  return timer


def _network(tmp_path, fn, log, budget=100, prefix='batch=8|inference|arch'):
  full = {'a': 10, 'b': 10}
  return latency.NetworkLatency(lambda widths: (dict(widths), None), _drifting_timer(fn, log),
                                (full, None), full,
                                latency.MeasurementCache(str(tmp_path / 'c' / 'cache.json')),
                                prefix, budget)


def test_network_latency_is_relative_to_the_dense_network_and_cached(tmp_path):
  fn = lambda w: 2.0 + w['a'] + w['b']
  log = []
  first = _network(tmp_path, fn, log)
  assert first({'a': 10, 'b': 10}).latency == 1.0 and not log  # The dense network itself.
  start = {'a': 10, 'b': 5}
  one = first(start)
  two = first({'a': 6, 'b': 5}, start)
  assert one.latency == pytest.approx(17 / 22) and one.current is None  # Load cancels.
  assert two.latency == pytest.approx(13 / 22) and two.current == pytest.approx(17 / 22)
  assert log == [['candidate', 'dense'], ['candidate', 'current', 'dense']]
  assert first.measured == 2 and [m['cached'] for m in first.log] == [False, False]
  log.clear()
  second = _network(tmp_path, fn, log)  # Same cache file, same key prefix: no timing.
  again = second({'a': 6, 'b': 5}, start)
  assert again == two and second.measured == 0 and not log and second.log[0]['cached']
  assert second({'a': 6, 'b': 5}, {'a': 7, 'b': 5}).current is None  # Other reference.
  other = _network(tmp_path, fn, log, prefix='batch=16|inference|arch')  # Another batch.
  other(start)
  assert other.measured == 1
  with open(tmp_path / 'c' / 'cache.json') as f:
    assert len(json.load(f)['entries']) == 3
  spent = _network(tmp_path, fn, log, budget=0)
  assert spent({'a': 1, 'b': 1}) is None and spent({'a': 6, 'b': 5}) is not None


def test_architecture_key_and_cache_file(tmp_path):
  lenet = lambda w: build_model(ml_collections.ConfigDict({'name': 'lenet5_caffe',
                                                           'width_multiplier': w}), (28, 28, 1))
  assert latency.architecture_key(lenet(0.5)) == latency.architecture_key(lenet(0.5))
  assert latency.architecture_key(lenet(0.5)) != latency.architecture_key(lenet(0.25))
  name = latency.cache_file(str(tmp_path))
  assert name.startswith(str(tmp_path)) and 'jax' in os.path.basename(name)


@pytest.mark.parametrize('target', latency.TARGETS)
def test_real_end_to_end_timer_runs(target):  # A smoke test: nothing about speed.
  model_config = ml_collections.ConfigDict({'name': 'lenet5_caffe', 'width_multiplier': 0.1})
  graphdef, state = state_lib.create_train_state(build_model(model_config, (28, 28, 1)),
                                                 optax.sgd(0.1))
  batch = {'image': np.zeros((8, 28, 28, 1), np.uint8), 'label': np.zeros(8, np.int32)}
  timer = latency.end_to_end_timer(batch, lambda x: x.astype(jnp.float32) / 255.0, None,
                                   target, tx=optax.sgd(0.1), reps=1)
  times = timer({'dense': (graphdef, state), 'again': (graphdef, state)})
  assert set(times) == {'dense', 'again'} and min(times.values()) > 0
  assert len(timer.compiled) == 1  # One graph definition, compiled once.


def _fake_ms(kept):
  """A network whose conv1 time moves in steps of 4 maps and conv2's in steps of 3."""
  return (1.0 + 0.4 * math.ceil(kept['conv1'] / 4) + 0.3 * math.ceil(kept['conv2'] / 3)
          + 0.004 * kept['conv1'] * kept['conv2'])


def _prune_config(cache_dir, **overrides):
  config = config_lib.load_config(os.path.join(REPO, 'configs', 'default.py')).prune
  config.update(method='l1', selection='latency', target_speedup=1.8, latency_repeats=1,
                latency_measurements=40, latency_step=0.125, min_channels=2,
                latency_cache_dir=str(cache_dir), **overrides)
  return config


def test_run_pruning_reaches_the_target_and_a_second_run_measures_nothing(tmp_path):
  model_config = ml_collections.ConfigDict({'name': 'lenet5_caffe', 'width_multiplier': 0.5})
  input_shape = (28, 28, 1)
  graphdef, state = state_lib.create_train_state(build_model(model_config, input_shape),
                                                 optax.sgd(0.1))
  loads = iter(np.random.default_rng(1).uniform(1, 2, 10**4))
  timed = []

  def end_to_end(models):  # Every call under another load; ratios are what count.
    load = next(loads)
    timed.append(sorted(models))
    return {name: load * _fake_ms(counting.kept_channels(state_lib.merge_model(g, s)))
            for name, (g, s) in models.items()}

  target = stage.PruningTarget(graphdef, state, model_config, 10, input_shape,
                               lambda x: x.astype(jnp.float32) / 255.0)
  dense = _fake_ms({'conv1': 10, 'conv2': 25})
  reports, calls = [], 0
  for _ in range(2):
    calls = len(timed)
    new_graphdef, new_state, report = stage.run_pruning(
        target, _prune_config(tmp_path), timers=stage.LatencyTimers(end_to_end=end_to_end))
    reports.append(report)
  first, second = (r['latency'] for r in reports)
  widths = first['widths']
  assert first['target_reached'] and first['measured_speedup'] >= 1.8
  assert first['measured_speedup'] == pytest.approx(dense / _fake_ms(widths))
  assert first['predicted_speedup'] == pytest.approx(first['measured_speedup'])
  assert all(w >= 2 for w in widths.values())
  assert 0 < first['table_measured'] <= 40 and first['table_entries'] >= first['table_measured']
  assert first['table_seconds'] > 0 and first['target_speedup'] == 1.8
  assert first['mac_reduction'] == reports[0]['mac_reduction'] > 1
  speedup = first['predicted_speedup']
  for m in first['measurements']:  # No measured network at least as wide is as fast.
    if m['widths'] != widths and all(m['widths'][n] >= w for n, w in widths.items()):
      assert m['speedup'] < speedup, m
  assert second['widths'] == widths and second['table_measured'] == 0
  assert all(m['cached'] for m in second['measurements'])
  assert timed[calls:] == [['compacted', 'dense']]  # The second run only checks its choice.
  compacted = state_lib.merge_model(new_graphdef, new_state)
  assert counting.kept_channels(compacted) == widths == reports[1]['channels_after']
  assert json.dumps(reports[1])
