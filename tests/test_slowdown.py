"""Tests of the simulated heterogeneous workers (fake clock and sleep: no wall-clock asserts)."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pdcnno_jax.parallel import slowdown


class FakeClock:
  """A clock that only moves when the code under test computes or sleeps."""

  def __init__(self):
    self.now = 0.0
    self.sleeps = []

  def __call__(self):
    return self.now

  def sleep(self, seconds):
    self.sleeps.append(seconds)
    self.now += seconds


class PendingResult:
  """A leaf whose device work takes `seconds` and finishes only when waited for."""

  def __init__(self, clock, seconds):
    self.clock, self.seconds, self.ready = clock, seconds, False

  def block_until_ready(self):
    self.clock.now += self.seconds
    self.ready = True
    return self


def make(clock, **kwargs):
  return slowdown.Slowdown(clock=clock, sleep=clock.sleep, **kwargs)


def test_parse_slowdown():
  assert slowdown.parse_slowdown('', 3) == (1.0, 1.0, 1.0)
  assert slowdown.parse_slowdown(' 1, 1 ,2,4 ', 4) == (1.0, 1.0, 2.0, 4.0)
  assert slowdown.parse_slowdown('2.5', 1) == (2.5,)


@pytest.mark.parametrize('spec, num_workers, match', [
    ('1,1,2', 4, '3 entries but there are 4 worker processes'),
    ('1,1,2,4,8', 4, '5 entries'),
    ('1,x', 2, "entry 1 \\('x'\\) is not a number"),
    ('1,,2', 3, 'is not a number'),
    ('1,0.5', 2, '>= 1'),
    ('1,nan', 2, '>= 1'),
    ('1,inf', 2, '>= 1'),
    ('1', 0, 'num_workers'),
])
def test_parse_slowdown_rejects_bad_specs(spec, num_workers, match):
  with pytest.raises(ValueError, match=match):
    slowdown.parse_slowdown(spec, num_workers)


def test_run_waits_for_the_device_then_stretches_by_the_factor():
  clock = FakeClock()
  slow = make(clock, factor=3.0)
  pending = PendingResult(clock, seconds=0.25)

  def step(x):
    clock.now += 0.05  # Host-side dispatch.
    return {'loss': pending, 'x': x}

  outputs, elapsed = slow.run(step, 1)
  assert pending.ready and outputs['x'] == 1
  # Compute = dispatch + device time (0.3 s), measured after blocking; the step takes 3x that.
  assert clock.sleeps == [pytest.approx(0.6)]
  assert elapsed == pytest.approx(0.9)
  assert slow.compute_s == pytest.approx(0.3) and slow.slept_s == pytest.approx(0.6)


def test_run_blocks_on_real_jax_arrays():
  clock = FakeClock()
  outputs, elapsed = make(clock, factor=2.0).run(lambda x: x * 2, jnp.arange(3.0))
  np.testing.assert_array_equal(outputs, [0.0, 2.0, 4.0])
  assert elapsed == 0.0 and clock.sleeps == []  # The fake clock did not move: nothing to add.


def test_factor_one_never_sleeps():
  clock = FakeClock()
  slow = make(clock)
  assert not slow.active
  for _ in range(10):
    slow.stretch(0.1)
  assert clock.sleeps == [] and slow.steps == 10


def test_transient_stragglers_follow_the_probability():
  clock = FakeClock()
  slow = make(clock, factor=2.0, straggler_probability=0.25, straggler_factor=5.0, seed=3)
  num_steps = 4000
  for _ in range(num_steps):
    clock.now += 1.0  # The step's compute.
    slow.stretch(1.0)
  # Each step sleeps (2 - 1) or (2 * 5 - 1) times its compute time, nothing else.
  assert set(np.round(clock.sleeps, 9)) == {1.0, 9.0}
  transient = sum(s == 9.0 for s in clock.sleeps)
  assert transient == slow.transient_steps
  # Binomial(4000, 0.25): mean 1000, sd 27; +-6 sd.
  assert abs(transient - 1000) < 165
  assert clock.now == pytest.approx(2 * (num_steps - transient) + 10 * transient)


def test_transient_draws_are_deterministic_per_worker():

  def sleeps(seed, worker_index):
    clock = FakeClock()
    slow = make(clock, straggler_probability=0.5, straggler_factor=2.0, seed=seed,
                worker_index=worker_index)
    for _ in range(64):
      slow.stretch(1.0)
    return clock.sleeps

  assert sleeps(0, 1) == sleeps(0, 1)
  assert sleeps(0, 1) != sleeps(0, 2)
  assert sleeps(0, 1) != sleeps(1, 1)


def test_from_config_picks_this_workers_factor():
  config = ml_collections.ConfigDict(dict(
      slowdown='1,1,2,4', straggler_probability=0.1, straggler_factor=3.0))
  clock = FakeClock()
  slow = slowdown.Slowdown.from_config(config, worker_index=3, num_workers=4, seed=7,
                                       clock=clock, sleep=clock.sleep)
  assert (slow.factor, slow.straggler_probability, slow.straggler_factor) == (4.0, 0.1, 3.0)
  assert slow.active
  with pytest.raises(ValueError, match='4 entries but there are 2 worker processes'):
    slowdown.Slowdown.from_config(config, worker_index=0, num_workers=2)
  with pytest.raises(ValueError, match='worker_index'):
    slowdown.Slowdown.from_config(config, worker_index=4, num_workers=4)


@pytest.mark.parametrize('kwargs, match', [
    (dict(factor=0.5), 'factor must be finite and >= 1'),
    (dict(straggler_factor=0.0), 'straggler_factor must be finite and >= 1'),
    (dict(straggler_probability=1.5), r'straggler_probability must be in \[0, 1\]'),
])
def test_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    slowdown.Slowdown(**kwargs)


def test_stretch_rejects_negative_time():
  with pytest.raises(ValueError, match='compute_s'):
    make(FakeClock()).stretch(-1.0)
