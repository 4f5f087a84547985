"""Discrete-event engine: workers as generators, CPU work shared among the workers of a core set.

A worker is a generator that yields actions and receives, after each, the wall seconds it took:

  ('cpu', work_s)     work_s seconds of one core's time. The workers pinned to one core set
                      share it. Processor sharing (the default): with n of them computing on c
                      cores each progresses at min(1, c / n) core-seconds per second. Fair
                      sharing (`sleeper_credit_s` given): the cores serve the computing workers
                      that have received the least CPU so far (ties share), as Linux's CFS and
                      EEVDF schedulers do; a worker that wakes from a sleep or a wait is placed
                      at most `sleeper_credit_s` behind the least-served computing worker of its
                      core set, so a worker that sleeps most of the time computes at nearly full
                      speed. A node of a cluster is a core set of its own: full speed either way.
  ('sleep', s)        s wall seconds without CPU (a slowdown's sleep, a transfer, a latency):
                      wall time, but no core time, so it leaves the core to the others.
  ('until', fn)       blocks until fn() is true (fn reads state the generators share, e.g.
                      the clocks published so far); evaluated after every event.

`run` advances time from event to event (a CPU phase ending, a sleep ending) and returns when
every generator has finished. This is how one machine of 2 cores stands for 4 nodes (4 pinned
processes, two per core) and how a cluster of dedicated nodes is simulated: the same workers,
different core sets.

References:
  DESIGN.md, "Cluster model".
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Generator, Sequence

Action = tuple[str, Any]
Worker = Generator[Action, float, None]


@dataclasses.dataclass
class WorkerTrace:
  """What one worker did: finish time and seconds per kind of action."""
  finish_s: float = 0.0
  cpu_s: float = 0.0
  sleep_s: float = 0.0
  blocked_s: float = 0.0


@dataclasses.dataclass
class _Slot:
  gen: Worker
  group: int
  kind: str = 'start'
  remaining: float = 0.0  # cpu: core-seconds left; sleep: wall deadline.
  until: Callable[[], bool] | None = None
  started: float = 0.0
  done: bool = False
  served: float = 0.0  # CPU seconds received (fair sharing).


def _levels(slots: list[_Slot]) -> list[list[_Slot]]:
  """Computing workers of one core set grouped by CPU received, least first (ties within 1 ns)."""
  ordered = sorted(slots, key=lambda s: s.served)
  levels: list[list[_Slot]] = []
  for slot in ordered:
    if levels and slot.served - levels[-1][0].served <= 1e-9:
      levels[-1].append(slot)
    else:
      levels.append([slot])
  return levels


def _rates(live: list[_Slot], cores: Sequence[float], fair: bool, efficiency: float = 1.0
           ) -> tuple[dict[int, float], float]:
  """Core-seconds per second of each computing worker (by id), and the time until a fair
  share changes (a less-served level catching up with the next; inf for processor sharing).
  A core set with more computing workers than cores delivers `efficiency` of its cores."""
  by_group: dict[int, list[_Slot]] = {}
  for s in live:
    if s.kind == 'cpu':
      by_group.setdefault(s.group, []).append(s)
  rates, catch_up = {}, math.inf
  for g, members in by_group.items():
    shared = len(members) > math.ceil(cores[g] - 1e-9)  # cores[g] may be a share of cores.
    capacity = cores[g] * (efficiency if shared else 1.0)
    if not fair:
      rates.update({id(s): min(1.0, capacity / len(members)) for s in members})
      continue
    remaining, previous = float(capacity), None
    for level in _levels(members):
      rate = min(1.0, max(remaining, 0.0) / len(level))
      remaining -= rate * len(level)
      rates.update({id(s): rate for s in level})
      if previous is not None and previous[1] > rate:
        catch_up = min(catch_up, (level[0].served - previous[0]) / (previous[1] - rate))
      previous = (level[0].served, rate)
  return rates, catch_up


def run(workers: Sequence[Worker], groups: Sequence[int], cores: Sequence[float],
        *, sleeper_credit_s: float | None = None, sharing_efficiency: float = 1.0,
        max_events: int = 10_000_000) -> list[WorkerTrace]:
  """Runs the workers to completion.

  Args:
    workers: one generator per worker (see the module docstring).
    groups: core set of each worker (index into `cores`).
    cores: cores in each core set.
    sleeper_credit_s: None for processor sharing; else fair sharing with this wake-up credit.
    sharing_efficiency: share of its cores a core set delivers while more workers compute on
      it than it has cores (context switches, caches refilled; 1: none lost).
    max_events: guard against a deadlock (raises RuntimeError).

  Returns:
    One `WorkerTrace` per worker.

  Raises:
    RuntimeError: every live worker is blocked (deadlock) or too many events.
  """
  if len(workers) != len(groups):
    raise ValueError(f'{len(workers)} workers but {len(groups)} group indices.')
  slots = [_Slot(w, g) for w, g in zip(workers, groups)]
  traces = [WorkerTrace() for _ in slots]
  floor = [0.0] * len(cores)  # Least CPU received by a computing worker, per core set.
  fair = sleeper_credit_s is not None
  now = 0.0

  def advance(i: int, elapsed: float) -> None:
    slot = slots[i]
    try:
      action = slot.gen.send(elapsed) if slot.kind != 'start' else next(slot.gen)
    except StopIteration:
      slot.done, slot.kind = True, 'done'
      traces[i].finish_s = now
      return
    kind, value = action
    if kind == 'cpu' and fair and slot.kind != 'cpu':  # Woken: placed near the others.
      slot.served = max(slot.served, floor[slot.group] - sleeper_credit_s)
    slot.kind, slot.started = kind, now
    if kind == 'cpu':
      slot.remaining = max(float(value), 0.0)
    elif kind == 'sleep':
      slot.remaining = now + max(float(value), 0.0)
    elif kind == 'until':
      slot.until = value
    else:
      raise ValueError(f'Unknown action {kind!r}; expected cpu, sleep or until.')

  for i in range(len(slots)):
    advance(i, 0.0)
  for _ in range(max_events):
    progressed = True
    while progressed:  # Release every worker whose condition holds, and what that enables.
      progressed = False
      for i, slot in enumerate(slots):
        if slot.kind == 'until' and slot.until():
          traces[i].blocked_s += now - slot.started
          advance(i, now - slot.started)
          progressed = True
        elif slot.kind in ('cpu', 'sleep') and (
            (slot.kind == 'cpu' and slot.remaining <= 1e-12)
            or (slot.kind == 'sleep' and slot.remaining <= now + 1e-12)):
          kind_s = now - slot.started
          if slot.kind == 'cpu':
            traces[i].cpu_s += kind_s
          else:
            traces[i].sleep_s += kind_s
          advance(i, kind_s)
          progressed = True
    live = [s for s in slots if not s.done]
    if not live:
      return traces
    rate, step = _rates(live, cores, fair, sharing_efficiency)
    for s in live:
      if s.kind == 'cpu' and rate[id(s)] > 0:
        step = min(step, s.remaining / rate[id(s)])
      elif s.kind == 'sleep':
        step = min(step, max(s.remaining - now, 0.0))
    if math.isinf(step):
      raise RuntimeError('Deadlock: every live worker waits on a condition that cannot change.')
    now += step
    for s in live:
      if s.kind == 'cpu':
        s.remaining -= step * rate[id(s)]
        s.served += step * rate[id(s)]
    for g in range(len(cores)):
      computing = [s.served for s in live if s.kind == 'cpu' and s.group == g]
      if computing:
        floor[g] = max(floor[g], min(computing))
  raise RuntimeError(f'More than {max_events} events.')


def dedicated(num_workers: int) -> tuple[list[int], list[float]]:
  """Core sets of a cluster: every worker on a node of its own (no sharing)."""
  return list(range(num_workers)), [1.0] * num_workers


def pinned(num_workers: int, num_cores: int) -> tuple[list[int], list[float]]:
  """Core sets of launch_local --cores_per_process=1: worker i on core i mod num_cores."""
  return [i % num_cores for i in range(num_workers)], [1.0] * num_cores
