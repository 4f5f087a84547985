"""Tests for pdcnno_jax.pruning.latency: tables, cache, greedy search, end-to-end logic."""

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from pdcnno_jax import config_lib
from pdcnno_jax.models import counting
from pdcnno_jax.pruning import latency, masking, stage
from pdcnno_jax.testing import random_model as build_model
from pdcnno_jax.train import state as state_lib


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shape(tag):
  """A distinct table key per fake layer (the tag rides in in_hw)."""
  return latency.LayerShape('conv', True, (tag, tag))


class CountingTimer:
  """Fake LayerTimer: ``fn(tag, c_in, c_out)`` ms, counting the calls."""

  def __init__(self, fn):
    self.fn, self.calls = fn, 0

  def __call__(self, shape, c_in, c_out):
    self.calls += 1
    return float(self.fn(shape.in_hw[0], c_in, c_out))


def _model(entries, fn, dense, cache=None):
  table = latency.LatencyTable(CountingTimer(fn), cache, 'test')
  model = latency.LatencyModel(entries, table)
  model.calibrate(dense, model.layer_sum(dense))  # No time outside the tables.
  return model


def _chain(widths):
  """Fake entries: layer i reads layer i-1 (the first reads 1 channel)."""
  names = list(widths)
  return tuple(latency.LayerEntry(name, _shape(i + 1), names[i - 1] if i else None, name, 1,
                                  widths[name]) for i, name in enumerate(names))


def _select(model, scores, widths, target, min_channels, measure=None, measurements=1):
  masks = {name: np.ones(w, np.float32) for name, w in widths.items()}
  measure = measure or (lambda m: (model.dense_ms,
                                   model.predict_ms({k: int(v.sum()) for k, v in m.items()})))
  selector = latency.LatencySelector(model, measure, measurements)
  chosen = selector.select(scores, masks, target_speedup=target, min_channels=min_channels)
  return {name: int(mask.sum()) for name, mask in chosen.items()}, chosen, selector


def test_search_finds_the_optimum_of_a_linear_table():
  # Time = output width: removing any channel saves 1 ms, so the optimum removes the
  # globally lowest (layer-L2-normalised) scores. a: ten channels of 1/sqrt(10) = 0.316
  # each; b: 1..10 / sqrt(385), of which six are below 0.316. Speed-up 2 = remove ten.
  widths = {'a': 10, 'b': 10}
  model = _model(_chain(widths), lambda tag, c_in, c_out: c_out, widths)
  scores = {'a': np.ones(10), 'b': np.arange(1.0, 11.0)}
  kept, masks, selector = _select(model, scores, widths, 2.0, 2)
  assert kept == {'a': 6, 'b': 4}
  np.testing.assert_array_equal(masks['b'], [0] * 6 + [1] * 4)  # The lowest go.
  assert selector.report()['predicted_speedup'] == pytest.approx(2.0)


def test_search_stops_at_the_widest_width_of_a_step():
  # Time in steps of 8 channels: 9..16 cost as much as 16, so 16 is the answer to 2x.
  widths = {'a': 32}
  model = _model(_chain(widths), lambda tag, c_in, c_out: 8 * math.ceil(c_out / 8), widths)
  kept, _, _ = _select(model, {'a': np.linspace(1, 2, 32)}, widths, 2.0, 1)
  assert kept == {'a': 16}


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_no_chosen_width_is_slower_than_a_wider_one(seed):
  rng = np.random.default_rng(seed)
  widths = {'a': 24, 'b': 40, 'c': 16}
  period = {1: 8, 2: 6, 3: 4}
  wobble = rng.random((4, 64))  # A width that is slower than its neighbours, at random.

  def fn(tag, c_in, c_out):
    step = period[tag] * math.ceil(c_out / period[tag])
    return 0.2 * step + 0.05 * c_in + wobble[tag, c_out] * (c_out % 5 == 0)

  model = _model(_chain(widths), fn, widths)
  scores = {name: rng.random(w) for name, w in widths.items()}
  kept, _, _ = _select(model, scores, widths, 2.5, 2)
  assert model.predicted_speedup(kept) >= 2.5
  here = model.predict_ms(kept)
  for name, width in kept.items():  # Against every wider width (measured here if need be).
    assert width >= 2
    for wider in range(width + 1, widths[name] + 1):
      assert model.predict_ms({**kept, name: wider}) > here, (name, width, wider)


def test_an_out_of_reach_target_stops_at_the_fastest_point_and_says_so():
  widths = {'a': 8}
  model = _model(_chain(widths), lambda tag, c_in, c_out: 1 + c_out, widths)
  kept, _, selector = _select(model, {'a': np.ones(8)}, widths, 5.0, 2, measurements=3)
  assert kept == {'a': 2}
  report = selector.report()
  assert not report['target_reached'] and report['measured_speedup'] == pytest.approx(3.0)
  assert len(report['measurements']) == 1  # Stuck: measuring again cannot help.


def test_short_of_the_target_the_fastest_measured_point_is_kept():
  # Measurements that disagree with the table (narrower measures slower) and never reach
  # the target: the selection is the fastest measured point, not the last one.
  widths = {'a': 16}
  model = _model(_chain(widths), lambda tag, c_in, c_out: c_out, widths)
  measure = lambda m: (16.0, {1: 9.0}.get(int(m['a'].sum()), 10.0 + 1 / m['a'].sum()))
  kept, masks, selector = _select(model, {'a': np.arange(16.0)}, widths, 2.0, 1,
                                  measure=measure, measurements=3)
  report = selector.report()
  assert len(report['measurements']) == 3 and not report['target_reached']
  best = max(report['measurements'], key=lambda h: h['measured_speedup'])
  assert kept == best['widths'] == report['widths']
  assert report['measured_speedup'] == best['measured_speedup']


def test_tables_slower_than_the_network_calibrate_proportionally():
  widths = {'a': 10, 'b': 10}
  table = latency.LatencyTable(CountingTimer(lambda tag, c_in, c_out: c_out), None, 'test')
  model = latency.LatencyModel(_chain(widths), table)
  model.calibrate(widths, 5.0)  # The tables sum to 20 ms.
  assert model.predict_ms(widths) == pytest.approx(5.0)
  assert model.predict_ms({'a': 5, 'b': 5}) == pytest.approx(2.5)  # Never <= 0.
  model.calibrate({'a': 5, 'b': 5}, 3.0)  # A second point: fitted line, rest >= 0.
  assert model.rest >= 0 and model.predict_ms({'a': 5, 'b': 5}) > 0


def test_table_cache_hits_on_a_second_call(tmp_path):
  path = str(tmp_path / 'cache' / 'table.json')
  fn = lambda tag, c_in, c_out: tag + c_in * c_out
  first = latency.LatencyTable(CountingTimer(fn), path, 'batch=8')
  values = [first.ms(_shape(t), i, o) for t, i, o in [(1, 2, 3), (2, 4, 5), (1, 2, 3)]]
  assert first.timer.calls == 2 and first.measured == 2 and len(first.entries) == 2

  def fail(shape, c_in, c_out):
    raise AssertionError('measured although cached')

  second = latency.LatencyTable(fail, path, 'batch=8')
  assert [second.ms(_shape(t), i, o) for t, i, o in [(1, 2, 3), (2, 4, 5), (1, 2, 3)]] == values
  assert second.measured == 0 and second.seconds == 0.0
  other = latency.LatencyTable(CountingTimer(fn), path, 'batch=16')  # Another batch size.
  other.ms(_shape(1), 2, 3)
  assert other.measured == 1
  with open(path) as f:
    assert len(json.load(f)['entries']) == 3
  name = latency.cache_file(str(tmp_path))
  assert jax.__version__ in name and jax.default_backend() in name


def test_layer_entries_of_lenet_and_vgg():
  lenet = build_model(ml_collections.ConfigDict({'name': 'lenet5_caffe',
                                                 'width_multiplier': 0.5}), (28, 28, 1))
  entries = {e.name: e for e in latency.layer_entries(lenet)}
  assert sorted(entries) == ['conv1', 'conv2', 'hidden.0']
  assert entries['conv1'].shape.in_hw == (28, 28) and entries['conv1'].shape.pool
  assert not entries['conv1'].shape.input_grad
  assert entries['conv2'].shape.in_hw == (14, 14) and entries['conv2'].shape.pool
  assert entries['conv2'].widths({'conv1': 3, 'conv2': 7}) == (3, 7)
  dense = entries['hidden.0']
  assert dense.shape.kind == 'dense' and dense.shape.in_hw == (5, 5)
  assert dense.widths({'conv1': 3, 'conv2': 7}) == (7, dense.out_width)
  vgg = build_model(ml_collections.ConfigDict({'name': 'vgg11', 'width_multiplier': 0.0625}),
                    (32, 32, 3))
  pools = [e.shape.pool for e in latency.layer_entries(vgg) if e.shape.kind == 'conv']
  assert pools == list(vgg.pool_after)


@pytest.mark.parametrize('target', latency.TARGETS)
def test_real_layer_timer_runs(target):  # A smoke test: nothing about speed.
  timer = latency.JaxLayerTimer(batch_size=2, target=target, repeats=1)
  conv = latency.LayerShape('conv', True, (6, 6), kernel_size=3, pool=True)
  assert timer(conv, 2, 3) > 0
  assert timer(conv, 1, 3) > 0  # Timed next to the (2, 3) reference.
  assert timer.references[conv][:2] == (2, 3)
  assert timer(latency.LayerShape('dense', False, (2, 2)), 3, 4) > 0


def _fake_layer(shape, c_in, c_out):
  if shape.kind == 'dense':
    return 0.01 * c_in * shape.in_hw[0] * shape.in_hw[1]
  return 0.1 * c_out + 0.05 * c_in


def _prune_config(**overrides):
  config = config_lib.load_config(os.path.join(REPO, 'configs', 'default.py')).prune
  config.update(method='l1', selection='latency', target_speedup=1.5, latency_repeats=1,
                latency_measurements=4, **overrides)
  return config


def test_run_pruning_measures_and_continues_from_the_measured_point(tmp_path):
  # The fake network keeps half of the saving the tables predict: the first search misses
  # the target when measured, the recalibrated second one reaches it.
  model_config = ml_collections.ConfigDict({'name': 'lenet5_caffe', 'width_multiplier': 0.5})
  input_shape = (28, 28, 1)
  graphdef, state = state_lib.create_train_state(build_model(model_config, input_shape),
                                                 optax.sgd(0.1))
  dense_sum = sum(_fake_layer(e.shape, *e.widths(counting.kept_channels(
      state_lib.merge_model(graphdef, state)))) for e in latency.layer_entries(
          state_lib.merge_model(graphdef, state)))
  timed = []

  def end_to_end(models):
    times = {}
    for name, (g, s) in models.items():
      model = state_lib.merge_model(g, s)
      kept = counting.kept_channels(model)
      layer_sum = sum(_fake_layer(e.shape, *e.widths(kept))
                      for e in latency.layer_entries(model))
      times[name] = 0.5 * layer_sum + 0.5 * dense_sum
      timed.append((name, kept))
    return times

  target = stage.PruningTarget(graphdef, state, model_config, 10, input_shape,
                               lambda x: x.astype(jnp.float32) / 255.0)
  new_graphdef, new_state, report = stage.run_pruning(
      target, _prune_config(latency_cache_dir=str(tmp_path)),
      timers=stage.LatencyTimers(layer=_fake_layer, end_to_end=end_to_end))
  result = report['latency']
  assert len(result['measurements']) == 2
  first, second = result['measurements']
  assert first['measured_speedup'] < 1.5 <= second['measured_speedup']
  assert first['measured_speedup'] == pytest.approx(first['dense_ms'] / first['compacted_ms'])
  assert second['predicted_speedup'] == pytest.approx(second['measured_speedup'])
  assert result['measured_speedup'] == second['measured_speedup']
  compacted = state_lib.merge_model(new_graphdef, new_state)
  assert counting.kept_channels(compacted) == result['widths'] == report['channels_after']
  assert all(w >= 2 for w in result['widths'].values())
  assert result['mac_reduction'] == report['mac_reduction'] > 1
  assert result['table_measured'] == result['table_entries'] > 0
  assert result['target_speedup'] == 1.5 and result['latency_target'] == 'inference'
  assert result['target_reached']
  # Every measurement timed the dense model next to a compacted one (narrower widths).
  assert [name for name, _ in timed] == ['dense'] + ['dense', 'compacted'] * 2
  assert masking.read_masks(compacted) and json.dumps(report)
