"""An SSP training loop on indicator updates, shared by the SSP tests.

Update (i, c) of worker i at step c is the one-hot vector e[i * steps + c]
(int64, mirrored as float32 in a nested leaf). A worker's view is the sum of
the updates it applied, so view[j * steps + t] counts how often it applied
update (j, t): every check of the SSP contract is a check on the view.

Checked before every step c of worker i:
  * exactly-once so far: view in {0, 1};
  * read-my-writes: own entries t < c are 1, t >= c are 0;
  * the staleness bound: entries (j, t <= c - s - 1) are 1 for every live j.
At the end (after drain) every entry is 1: the exact sum of all updates.
"""

from __future__ import annotations

from collections.abc import Callable
import time
from typing import Any

import numpy as np

from pdcnno_jax.parallel import ssp


def indicator_update(worker: int, clock: int, num_workers: int,
                     steps: int) -> dict[str, Any]:
  count = np.zeros(num_workers * steps, np.int64)
  count[worker * steps + clock] = 1
  return {'count': count, 'nested': {'mirror': count.astype(np.float32)}}


def empty_view(num_workers: int, steps: int) -> dict[str, Any]:
  zeros = np.zeros(num_workers * steps, np.int64)
  return {'count': zeros, 'nested': {'mirror': zeros.astype(np.float32)}}


def _add(view: dict[str, Any], tree: dict[str, Any]) -> None:
  view['count'] += tree['count']
  view['nested']['mirror'] += tree['nested']['mirror']


def check_view(view: dict[str, Any], worker: ssp.SSPWorker, clock: int,
               steps: int) -> list[str]:
  """Returns the SSP contract violations of `view` before step `clock`."""
  n, me, s = worker.num_workers, worker.worker_id, worker.staleness
  grid = view['count'].reshape(n, steps)
  errors = []
  if not np.array_equal(view['nested']['mirror'].reshape(n, steps), grid):
    errors.append(f'clock {clock}: nested leaf differs from count leaf')
  if grid.min() < 0 or grid.max() > 1:
    errors.append(f'clock {clock}: an update was applied twice: '
                  f'{np.argwhere(grid > 1).tolist()}')
  own = grid[me]
  if not (own[:clock] == 1).all() or own[clock:].any():
    errors.append(f'clock {clock}: read-my-writes broken: own row {own}')
  if s is not None:
    for j in range(n):
      if j == me or j in worker.dead_workers:
        continue
      if not (grid[j, :max(0, clock - s)] == 1).all():
        errors.append(f'clock {clock}: staleness bound broken for worker {j}: '
                      f'row {grid[j]}')
  return errors


def run(worker: ssp.SSPWorker,
        steps: int,
        *,
        delay_s: Callable[[int], float] = lambda c: 0.0,
        state: dict[str, Any] | None = None,
        view: dict[str, Any] | None = None,
        after_publish: Callable[[int, dict[str, Any]], None] | None = None,
        close: bool = True) -> tuple[dict[str, Any], list[str]]:
  """Runs the loop of DESIGN.md "SSP" on indicator updates.

  Args:
    worker: an SSPWorker that has not joined yet.
    steps: number of steps of every worker.
    delay_s: seconds of simulated compute at each clock.
    state: checkpointed SSP state (restart) or None.
    view: checkpointed view (restart) or None.
    after_publish: hook(clock, view) after each publish (checkpoint, kill).
    close: call worker.close() at the end.

  Returns:
    The final view and the list of contract violations (empty if none).
  """
  n, me = worker.num_workers, worker.worker_id
  view = empty_view(n, steps) if view is None else view
  joined = worker.join(state)
  for update in joined.updates:
    _add(view, update.tree)
  errors = []
  for clock in range(joined.next_clock, steps):
    for update in worker.pull(clock):
      _add(view, update.tree)
    errors += check_view(view, worker, clock, steps)
    time.sleep(delay_s(clock))
    update = indicator_update(me, clock, n, steps)
    _add(view, update)
    worker.publish(clock, update)
    if after_publish is not None:
      after_publish(clock, view)
  for update in worker.drain(steps - 1):
    _add(view, update.tree)
  if not (view['count'] == 1).all():
    errors.append(f'final view is not the exact sum: {view["count"]}')
  if close:
    worker.close()
  return view, errors
