"""Tests of the per-worker monitor (fake clock for the speed; real counters for the ranges)."""

import numpy as np
import pytest

from pdcnno_jax.parallel import balancers
from pdcnno_jax.parallel import monitor


class FakeClock:

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


class FakeDevice:

  def __init__(self, stats):
    self._stats = stats

  def memory_stats(self):
    return self._stats


def test_speed_is_samples_per_busy_second():
  clock = FakeClock()
  worker = monitor.WorkerMonitor(clock=clock, devices=[])
  worker.start()
  for _ in range(4):
    worker.record(num_samples=128, busy_s=0.5)
    clock.now += 0.75  # Busy 0.5 s, then 0.25 s waiting (not busy).
  assert worker.steps == 4 and worker.mean_step_s == pytest.approx(0.5)
  stats = worker.stop()
  assert isinstance(stats, balancers.WorkerStats) and stats.num_workers == 1
  np.testing.assert_allclose(stats.speed, [256.0])
  np.testing.assert_allclose(stats.busy_s, [2.0])
  np.testing.assert_allclose(stats.wall_s, [3.0])


def test_utilisations_are_fractions_or_nan():
  worker = monitor.WorkerMonitor(devices=[])
  worker.start()
  sum(i * i for i in range(20000))  # Some CPU work inside the window.
  worker.record(10, 0.01)
  stats = worker.stop()
  assert set(stats.utilisation) == set(balancers.UTILISATION_KEYS)
  for key, value in stats.utilisation.items():
    assert value.shape == (1,)
    assert np.isnan(value[0]) or 0.0 <= value[0] <= 1.0, key
  assert 0.0 < stats.utilisation['memory'][0] <= 1.0  # Every host reports memory.
  assert np.isnan(stats.utilisation['accelerator'][0])  # No device given.


def test_explicit_network_bandwidth_gives_a_network_figure():
  worker = monitor.WorkerMonitor(devices=[], network_bandwidth_bytes_per_s=1e9)
  worker.start()
  worker.record(1, 0.1)
  value = worker.stop().utilisation['network'][0]
  assert 0.0 <= value <= 1.0


def test_accelerator_memory_utilisation():
  devices = [FakeDevice({'bytes_in_use': 25, 'bytes_limit': 100}),
             FakeDevice({'bytes_in_use': 60, 'bytes_limit': 100}),
             FakeDevice(None)]
  assert monitor.accelerator_memory_utilisation(devices) == pytest.approx(0.6)
  assert np.isnan(monitor.accelerator_memory_utilisation([FakeDevice(None)]))
  # The real local devices (CPU here) give a fraction or NaN.
  value = monitor.accelerator_memory_utilisation()
  assert np.isnan(value) or 0.0 <= value <= 1.0


def test_window_without_work_reuses_the_last_speed():
  clock = FakeClock()
  worker = monitor.WorkerMonitor(clock=clock, devices=[])
  worker.start()
  with pytest.raises(RuntimeError, match='no work'):
    worker.stop()
  worker.start()
  worker.record(30, 1.5)
  assert worker.stop().speed[0] == pytest.approx(20.0)
  worker.start()
  clock.now += 1.0
  stats = worker.stop()
  assert stats.speed[0] == pytest.approx(20.0) and stats.busy_s[0] == 0.0


def test_stop_without_start_and_bad_records():
  worker = monitor.WorkerMonitor(devices=[])
  with pytest.raises(RuntimeError, match='without start'):
    worker.stop()
  worker.start()
  with pytest.raises(ValueError, match='>= 0'):
    worker.record(-1, 0.1)


def test_stats_of_several_workers_gather_into_one():
  clock = FakeClock()
  rows = []
  for speed in (10.0, 40.0):
    worker = monitor.WorkerMonitor(clock=clock, devices=[])
    worker.start()
    worker.record(speed, 1.0)
    clock.now += 1.0
    rows.append(worker.stop().to_vectors())
  stats = balancers.WorkerStats.from_vectors(np.concatenate(rows))
  np.testing.assert_allclose(stats.speed, [10.0, 40.0])
  assert balancers.proportional(10, stats).tolist() == [2, 8]
