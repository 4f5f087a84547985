"""Per-worker batch sizes and rows: how a global batch is cut among worker processes.

MapReduce workers train local batches of B // K examples; SSP workers each read a disjoint
piece of every global batch, equal (B // K) or proportional to their measured speed.
"""

from __future__ import annotations

import numpy as np

from pdcnno_jax.parallel import balancers


def equal_batch_sizes(global_batch_size: int, num_workers: int,
                      granularity: int = 1) -> np.ndarray:
  """[K] equal per-worker batches: B // K each.

  Args:
    global_batch_size: B = config.data.batch_size.
    num_workers: K worker processes.
    granularity: every worker's batch must be a multiple of this (its local device count).

  Raises:
    ValueError: when B does not split evenly; the message says what to change.
  """
  if global_batch_size % num_workers:
    raise ValueError(
        f'config.data.batch_size={global_batch_size} must be divisible by the {num_workers} '
        'workers (each worker trains batch_size // workers examples per step).')
  local = global_batch_size // num_workers
  if local % granularity:
    raise ValueError(
        f'The per-worker batch {local} (config.data.batch_size // {num_workers} workers) must '
        f'be divisible by the {granularity} devices of each worker.')
  return np.full(num_workers, local, np.int64)


def local_batch_size(global_batch_size: int, num_workers: int, num_local_devices: int) -> int:
  """One worker's equal batch, B // K, split over its local devices (see `equal_batch_sizes`)."""
  return int(equal_batch_sizes(global_batch_size, num_workers, num_local_devices)[0])


def proportional_batch_sizes(global_batch_size: int, speed: np.ndarray,
                             granularity: int = 1) -> np.ndarray:
  """[K] per-worker batches ~ measured speed, summing to B, each >= one unit.

  The batch is cut into B // granularity units handed out by `balancers.proportional`.

  Args:
    global_batch_size: B.
    speed: [K] examples per busy second of each worker (> 0).
    granularity: unit of a worker's batch (its local device count).

  Raises:
    ValueError: when B is not a multiple of the granularity or too small for K workers.

  References:
    DESIGN.md "DLBPCE" (the proportional rule blocks_k ~ speed_k), applied to batches.
  """
  if global_batch_size % granularity:
    raise ValueError(f'config.data.batch_size={global_batch_size} must be a multiple of the '
                     f'{granularity} devices of each worker.')
  units = balancers.proportional(global_batch_size // granularity,
                                 balancers.WorkerStats(speed=np.asarray(speed, np.float64)))
  return units.astype(np.int64) * granularity


def worker_rows(order: np.ndarray, batch_in_epoch: int, sizes: np.ndarray,
                worker: int) -> np.ndarray:
  """Rows of ``order`` that ``worker`` trains at one step: its piece of the global batch.

  Args:
    order: the epoch's permutation of the training examples.
    batch_in_epoch: index i of the global batch in the epoch.
    sizes: [K] per-worker batches; the global batch is their sum.
    worker: worker index.
  """
  sizes = np.asarray(sizes, np.int64)
  start = batch_in_epoch * int(sizes.sum()) + int(sizes[:worker].sum())
  return order[start:start + int(sizes[worker])]
