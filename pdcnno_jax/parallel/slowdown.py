"""Simulated heterogeneous workers: stretch each step's compute time by a slowdown factor.

One mechanism for both MapReduce and SSP training, so that a single machine can stand for a
cluster of nodes of different speeds. Worker k's steps take `factor_k` times their measured
compute time (a persistent slowdown, config.parallel.slowdown = '1,1,2,4' per process index),
and, with probability config.parallel.straggler_probability per step, a further
config.parallel.straggler_factor times (a transient straggler: the "unrelated load" of the
delay-synchronisation paper). The stretch is a sleep after the step's device work has finished,
so the worker's measured speed, its place in the SSP clock order and the makespan of a
MapReduce round all see the slower node, while the numerics are untouched.

References:
  DESIGN.md "MapReduce training" and "SSP"; delay synchronisation paper
  (`papers/delay_sync_parallel.txt`), its heterogeneous workers and unrelated load.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, TypeVar

import jax
import numpy as np

T = TypeVar('T')


def parse_slowdown(spec: str, num_workers: int) -> tuple[float, ...]:
  """Parses config.parallel.slowdown into one factor per worker.

  Args:
    spec: comma-separated factors >= 1, one per process index (e.g. '1,1,2,4'); '' means no
      slowdown (every factor 1).
    num_workers: number of worker processes (jax.process_count()).

  Returns:
    A tuple of `num_workers` factors.

  Raises:
    ValueError: malformed factors, factors < 1, or a count other than `num_workers`.
  """
  if num_workers < 1:
    raise ValueError(f'num_workers must be >= 1, got {num_workers}.')
  spec = spec.strip()
  if not spec:
    return (1.0,) * num_workers
  entries = [entry.strip() for entry in spec.split(',')]
  factors = []
  for position, entry in enumerate(entries):
    try:
      factor = float(entry)
    except ValueError:
      raise ValueError(
          f'config.parallel.slowdown={spec!r}: entry {position} ({entry!r}) is not a number; '
          "expected comma-separated factors such as '1,1,2,4'.") from None
    if not math.isfinite(factor) or factor < 1:
      raise ValueError(
          f'config.parallel.slowdown={spec!r}: entry {position} is {entry}, but factors must be '
          'finite and >= 1 (a sleep can only slow a worker down; to make one worker relatively '
          'faster, slow the others).')
    factors.append(factor)
  if len(factors) != num_workers:
    raise ValueError(
        f'config.parallel.slowdown={spec!r} has {len(factors)} entries but there are '
        f'{num_workers} worker processes; give exactly one factor per process index, or an '
        'empty string for none.')
  return tuple(factors)


class Slowdown:
  """Stretches one worker's steps: persistent factor times an occasional transient factor.

  Use `run` around a step function (it blocks on the device result, measures the compute time
  and sleeps the extra), or `stretch` with a compute time measured elsewhere. Per step the
  total factor is `factor * straggler_factor` with probability `straggler_probability` and
  `factor` otherwise; the draws come from a generator seeded by (seed, worker_index), so a
  worker's sequence of transient slowdowns is reproducible and differs between workers. One
  draw is taken per step whatever the probability.

  Attributes:
    factor: persistent slowdown (>= 1).
    straggler_probability: per-step chance of a transient slowdown, in [0, 1].
    straggler_factor: transient slowdown (>= 1), on top of `factor`.
    compute_s: total measured compute seconds so far.
    slept_s: total seconds slept so far.
    steps: steps stretched so far.
    transient_steps: steps that drew a transient slowdown.
  """

  def __init__(self, factor: float = 1.0, straggler_probability: float = 0.0,
               straggler_factor: float = 1.0, *, seed: int = 0, worker_index: int = 0,
               clock: Callable[[], float] = time.perf_counter,
               sleep: Callable[[float], Any] = time.sleep):
    """Initialises the slowdown.

    Args:
      factor: persistent slowdown factor (>= 1).
      straggler_probability: per-step probability of a transient slowdown.
      straggler_factor: transient slowdown factor (>= 1).
      seed: experiment seed.
      worker_index: this worker's index (process index); mixed into the seed.
      clock: monotonic clock in seconds (injectable for tests).
      sleep: sleep function in seconds (injectable for tests).

    Raises:
      ValueError: a factor < 1 or a probability outside [0, 1].
    """
    for name, value in (('factor', factor), ('straggler_factor', straggler_factor)):
      if not math.isfinite(value) or value < 1:
        raise ValueError(f'Slowdown {name} must be finite and >= 1, got {value}.')
    if not 0 <= straggler_probability <= 1:
      raise ValueError(
          f'straggler_probability must be in [0, 1], got {straggler_probability} '
          '(config.parallel.straggler_probability).')
    self.factor = float(factor)
    self.straggler_probability = float(straggler_probability)
    self.straggler_factor = float(straggler_factor)
    self._rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(worker_index)]))
    self._clock = clock
    self._sleep = sleep
    self.compute_s = 0.0
    self.slept_s = 0.0
    self.steps = 0
    self.transient_steps = 0

  @classmethod
  def from_config(cls, parallel_config: Any, worker_index: int, num_workers: int, *,
                  seed: int = 0, **kwargs: Any) -> Slowdown:
    """Builds worker `worker_index`'s slowdown from config.parallel.

    Reads slowdown, straggler_probability and straggler_factor.

    Args:
      parallel_config: config.parallel.
      worker_index: this worker's index (jax.process_index()).
      num_workers: number of workers (jax.process_count()).
      seed: experiment seed (config.seed).
      **kwargs: forwarded to the constructor (clock, sleep).

    Returns:
      The worker's `Slowdown`.
    """
    if not 0 <= worker_index < num_workers:
      raise ValueError(f'worker_index {worker_index} is outside [0, {num_workers}).')
    factors = parse_slowdown(parallel_config.slowdown, num_workers)
    return cls(factors[worker_index], parallel_config.straggler_probability,
               parallel_config.straggler_factor, seed=seed, worker_index=worker_index,
               **kwargs)

  @property
  def active(self) -> bool:
    """Whether any step can be stretched."""
    return self.factor > 1 or (self.straggler_probability > 0 and self.straggler_factor > 1)

  def next_factor(self) -> float:
    """Draws the total factor for the next step (advances the generator)."""
    transient = self._rng.random() < self.straggler_probability
    self.transient_steps += int(transient)
    return self.factor * (self.straggler_factor if transient else 1.0)

  def stretch(self, compute_s: float) -> float:
    """Sleeps so that a step whose device work took `compute_s` takes factor x as long.

    Args:
      compute_s: measured compute seconds of the step, device work finished.

    Returns:
      The seconds slept.
    """
    if compute_s < 0:
      raise ValueError(f'compute_s must be >= 0, got {compute_s}.')
    extra = (self.next_factor() - 1.0) * compute_s
    self.steps += 1
    self.compute_s += compute_s
    if extra > 0:
      self._sleep(extra)
      self.slept_s += extra
    return extra

  def run(self, step_fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
    """Runs one step, waits for its device result, and stretches it.

    Args:
      step_fn: the (jitted) step; its outputs may be any pytree of arrays.
      *args: positional arguments of step_fn.
      **kwargs: keyword arguments of step_fn.

    Returns:
      (step_fn's outputs, ready on the device; seconds the stretched step took end to end).
    """
    start = self._clock()
    outputs = jax.block_until_ready(step_fn(*args, **kwargs))
    self.stretch(self._clock() - start)
    return outputs, self._clock() - start
