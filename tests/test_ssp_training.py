"""What the SSP mode's Ray engine shares with the rest of the package, tested in-process.

Batch splitting (`loop.batching`), per-worker checkpoints (`parallel.ssp.worker_checkpoints`),
report.json's ``ssp`` figures (`parallel.ssp.report`), the staleness bound
(`parallel.ssp.protocol`) and the mode's configuration errors. Training on Ray is tested in
tests/test_ray_ssp.py.
"""

import os

import numpy as np
import pytest


def _fixtures():
  from pdcnno_jax.testing import experiments as mode_fixtures  # pylint: disable=g-import-not-at-top
  return mode_fixtures


def _config(**parallel):
  config = _fixtures().mapreduce_config()
  config.parallel.mode = 'ssp'
  config.parallel.engine = 'ray'
  config.parallel.update(parallel)
  return config


def test_equal_and_proportional_batch_sizes():
  from pdcnno_jax.loop import batching  # pylint: disable=g-import-not-at-top
  np.testing.assert_array_equal(batching.equal_batch_sizes(128, 4, 2), [32] * 4)
  with pytest.raises(ValueError, match='divisible by the 3 workers'):
    batching.equal_batch_sizes(128, 3)
  sizes = batching.proportional_batch_sizes(128, np.array([4.0, 4.0, 4.0, 1.0]), 2)
  assert sizes.sum() == 128 and np.all(sizes % 2 == 0)
  np.testing.assert_array_equal(sizes, [40, 40, 38, 10])
  one_slow = batching.proportional_batch_sizes(8, np.array([1.0, 1000.0]))
  np.testing.assert_array_equal(one_slow, [1, 7])  # Never below one unit.


def test_worker_rows_partition_each_global_batch():
  from pdcnno_jax.loop import batching  # pylint: disable=g-import-not-at-top
  order = np.random.default_rng(0).permutation(100)
  sizes = np.array([3, 5, 2])
  for index in range(10):
    pieces = [batching.worker_rows(order, index, sizes, k) for k in range(3)]
    assert [len(p) for p in pieces] == [3, 5, 2]
    np.testing.assert_array_equal(np.concatenate(pieces), order[index * 10:(index + 1) * 10])


def test_worker_checkpoint_round_trip_and_mismatch(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.parallel.ssp import serialization  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.parallel.ssp import worker_checkpoints  # pylint: disable=g-import-not-at-top
  _, _, state = _fixtures().make_experiment(_config(), tmp_path)
  directory = str(tmp_path / 'w0')
  assert worker_checkpoints.load_worker_checkpoint(directory, state) is None
  ssp_state = {'next_clock': np.asarray(7, np.int64), 'applied': np.asarray([6, 4], np.int64)}
  for clock in (3, 5, 7):
    worker_checkpoints.save_worker_checkpoint(directory, clock, state, ssp_state)
  assert [os.path.basename(p) for p in worker_checkpoints.list_worker_checkpoints(directory)] == [
      'clock_0000000005.ssp', 'clock_0000000007.ssp']
  restored, restored_ssp = worker_checkpoints.load_worker_checkpoint(directory, state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(restored_ssp['applied'], [6, 4])
  with pytest.raises(serialization.PayloadError, match='does not match'):
    worker_checkpoints.load_worker_checkpoint(directory, state.replace(opt_state=()))

  # A corrupted newest snapshot is skipped: the worker rejoins from the older intact one.
  older = {'next_clock': np.asarray(5, np.int64), 'applied': np.asarray([4, 3], np.int64)}
  worker_checkpoints.save_worker_checkpoint(directory, 5, state, older)
  newest = worker_checkpoints.list_worker_checkpoints(directory)[-1]
  with open(newest, 'r+b') as f:
    f.seek(200)
    byte = f.read(1)
    f.seek(200)
    f.write(bytes([byte[0] ^ 0xFF]))
  _, fallback_ssp = worker_checkpoints.load_worker_checkpoint(directory, state)
  np.testing.assert_array_equal(fallback_ssp['applied'], [4, 3])


def test_report_figures():
  from pdcnno_jax.parallel.ssp import report as ssp_report  # pylint: disable=g-import-not-at-top
  assert ssp_report.merge_histograms([{'0': 2, '-1': 1}, {0: 1, 2: 4}]) == {-1: 1, 0: 3, 2: 4}
  rows = [dict(loop_s=2.0, examples=100, steps=10, publish_s=0.1, pull_s=0.5, wait_s=0.4,
               busy_s=1.0, applied_staleness={'0': 9}, view_staleness={'0': 10}),
          dict(loop_s=4.0, examples=100, steps=10, publish_s=0.1, pull_s=0.1, wait_s=0.0,
               busy_s=3.0, applied_staleness={'1': 9}, view_staleness={'1': 10})]
  report = ssp_report.job_report(rows, staleness=1, global_batch_size=20)
  assert report['wall_s'] == 4.0 and report['throughput_examples_per_s'] == 50.0
  assert report['coordination_s_per_step'] == pytest.approx(0.4 / 20)
  assert report['coordination_fraction'] == pytest.approx(0.4 / 4.4)
  assert report['max_view_staleness'] == 1
  curve = [{'wall_s': 1.0, 'accuracy': 0.5}, {'wall_s': 2.0, 'accuracy': 0.9}]
  assert ssp_report.time_to_accuracy(curve, 0.85) == 2.0
  assert ssp_report.time_to_accuracy(curve, 0.95) is None


def test_staleness_normalised_or_a_clear_error():
  from pdcnno_jax.parallel.ssp import protocol  # pylint: disable=g-import-not-at-top
  assert [protocol.normalise_staleness(s) for s in (0, 3, 2.0, -1, None, float('inf'))] == [
      0, 3, 2, None, None, None]
  for bad in (-2, 1.5):
    with pytest.raises(ValueError, match='staleness must be'):
      protocol.normalise_staleness(bad)


def test_bad_ssp_settings_are_one_line_config_errors():
  from pdcnno_jax import config_validation  # pylint: disable=g-import-not-at-top
  for parallel, match in ((dict(ssp_batch_balancer='dlbpce'), 'ssp_batch_balancer'),
                          (dict(staleness=-3), 'parallel.staleness'),
                          (dict(ssp_warmup_steps=1), 'ssp_warmup_steps'),
                          (dict(engine='jax'), 'drop --config.parallel.engine=jax')):
    with pytest.raises(config_validation.ConfigError, match=match) as e:
      config_validation.validate(_config(**parallel))
    assert len(e.value.problems) == 1, e.value.problems
  # MapReduce keeps its collective engine.
  config = _config(engine='jax')
  config.parallel.mode = 'mapreduce'
  config_validation.validate(config)


def test_a_streamed_data_set_is_a_clear_error():
  import types  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.parallel.ssp import training  # pylint: disable=g-import-not-at-top
  streamed = types.SimpleNamespace(name='imagenet2012', in_memory=False)
  with pytest.raises(ValueError, match='needs an in-memory data set'):
    training.validate(_config(), streamed)
