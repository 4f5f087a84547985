"""SSP job figures: per-worker rows combined, staleness histograms, time to accuracy."""

from __future__ import annotations

import collections
from typing import Any


def merge_histograms(histograms: list[dict[Any, int]]) -> dict[int, int]:
  """Sums {value: count} histograms (keys may be strings after JSON)."""
  total = collections.Counter()
  for histogram in histograms:
    for key, count in histogram.items():
      total[int(key)] += int(count)
  return {k: total[k] for k in sorted(total)}


def job_report(worker_reports: list[dict[str, Any]], *, staleness: int | None,
               global_batch_size: int) -> dict[str, Any]:
  """Combines the per-worker reports into the job's figures.

  Args:
    worker_reports: one dict per worker (`training.worker_report`), index = worker.
    staleness: s (None = infinite).
    global_batch_size: B.

  Returns:
    JSON-able dict: per-worker rows, wall_s (the slowest worker's loop time), throughput
    (examples per second over the job), the merged staleness histograms, and the coordination
    overhead: per step, (publish + pull - blocked wait) seconds, and that as a fraction of the
    step time (busy + coordination).
  """
  wall = max(r['loop_s'] for r in worker_reports)
  examples = sum(r['examples'] for r in worker_reports)
  steps = sum(r['steps'] for r in worker_reports)
  coordination = sum(r['publish_s'] + r['pull_s'] - r['wait_s'] for r in worker_reports)
  busy = sum(r['busy_s'] for r in worker_reports)
  per_step = coordination / max(steps, 1)
  step_s = (busy + coordination) / max(steps, 1)
  return {
      'workers': len(worker_reports),
      'staleness': 'inf' if staleness is None else staleness,
      'global_batch_size': global_batch_size,
      'wall_s': wall,
      'examples': examples,
      'throughput_examples_per_s': examples / wall if wall > 0 else float('nan'),
      'applied_staleness_histogram': merge_histograms(
          [r['applied_staleness'] for r in worker_reports]),
      'view_staleness_histogram': merge_histograms(
          [r['view_staleness'] for r in worker_reports]),
      'max_view_staleness': max((int(k) for r in worker_reports for k in r['view_staleness']),
                                default=0),
      'wait_s': [r['wait_s'] for r in worker_reports],
      'coordination_s_per_step': per_step,
      'step_s': step_s,
      'coordination_fraction': per_step / step_s if step_s > 0 else float('nan'),
      'per_worker': worker_reports,
  }


def time_to_accuracy(curve: list[dict[str, float]], threshold: float) -> float | None:
  """First wall time at which ``curve``'s accuracy reaches ``threshold`` (None: never)."""
  for point in curve:
    if point['accuracy'] >= threshold:
      return point['wall_s']
  return None
