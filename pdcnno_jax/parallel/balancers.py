"""Block balancers for MapReduce training: equal, proportional, LBRLA and DLBPCE.

Every balancer is a pure, deterministic numpy function of measured per-worker figures with one
signature,

  assign(num_blocks, stats, previous=None, *, min_blocks=1, **options) -> np.ndarray[int]

that returns how many of the `num_blocks` equal-size data blocks each of the K workers trains in
the next round. `stats` is a `WorkerStats` (speeds and utilisations gathered from every worker's
`monitor.WorkerMonitor`), `previous` the assignment of the round before (only DLBPCE starts from
it; the others re-plan from scratch). Every assignment conserves the blocks and gives each worker
at least `min_blocks` (default 1, so that every worker keeps producing a speed measurement).

Load is measured in time: worker k's load is u_k = blocks_k / speed_k (seconds when speed is in
blocks per second; any unit works as long as it is the same for every worker), and the round's
makespan is max_k u_k.

References:
  PDCNNO paper (`papers/pdcnno_mapreduce_cgmse.txt`), section "LBRLA": load rate P_i = L_i / C_i,
    combined load rate with disk I/O, GPU, memory, network and node usage weights, 97% ceiling.
  MR-FPDCNN paper (`papers/mr_fpdcnn_taylor_glowworm_zh.txt`), Definition 1 (parallel computing
    entropy, eq. 5), Definition 4 (dynamic load threshold function, DLTF) and the DLBPCE steps
    (1)-(5).
  DESIGN.md, "LBRLA" and "DLBPCE" (the authority where the papers' equations were lost).
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
from typing import Any, Callable, Iterator, Mapping, Protocol

import numpy as np

# Utilisation figures a worker reports, each a fraction in [0, 1] (NaN: not measured).
UTILISATION_KEYS = ('disk', 'accelerator', 'memory', 'network', 'node')

# LBRLA weights of the combined load rate: 'load' weighs P_i = L_i / C_i, the others the
# utilisations D, G, M, W, N of the PDCNNO paper. The paper gives no values; these put half the
# weight on the load itself. Weights of figures nobody measured are dropped and the rest
# renormalised (see `lbrla_rates`).
DEFAULT_LBRLA_WEIGHTS: Mapping[str, float] = dict(
    load=0.5, disk=0.1, accelerator=0.1, memory=0.1, network=0.1, node=0.1)


def _as_vector(values: Any, name: str, size: int | None = None) -> np.ndarray:
  array = np.asarray(values, dtype=np.float64)
  if array.ndim != 1:
    raise ValueError(f'{name} must be a 1-D per-worker array, got shape {array.shape}.')
  if size is not None and array.shape[0] != size:
    raise ValueError(f'{name} has {array.shape[0]} entries but there are {size} workers.')
  return array


@dataclasses.dataclass(frozen=True)
class WorkerStats:
  """Figures measured on every worker over one round (index k = worker k).

  Attributes:
    speed: [K] throughput, blocks (or samples) per second of busy time; finite and > 0. The
      unit only has to be the same for every worker.
    utilisation: name -> [K] fractions in [0, 1] for names in `UTILISATION_KEYS`; NaN marks a
      figure a worker could not measure (e.g. accelerator memory on CPU).
    busy_s: optional [K] seconds each worker spent computing in the round.
    wall_s: optional [K] seconds each worker's round took end to end.
  """
  speed: np.ndarray
  utilisation: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
  busy_s: np.ndarray | None = None
  wall_s: np.ndarray | None = None

  def __post_init__(self):
    speed = _as_vector(self.speed, 'WorkerStats.speed')
    if speed.shape[0] == 0:
      raise ValueError('WorkerStats needs at least one worker.')
    if not np.all(np.isfinite(speed) & (speed > 0)):
      raise ValueError(
          f'WorkerStats.speed must be finite and > 0 for every worker, got {speed}. A worker '
          'that measured nothing this round should report its last known speed.')
    object.__setattr__(self, 'speed', speed)
    num_workers = speed.shape[0]
    utilisation = {}
    for key, values in self.utilisation.items():
      if key not in UTILISATION_KEYS:
        raise ValueError(f'Unknown utilisation {key!r}; expected one of {UTILISATION_KEYS}.')
      values = _as_vector(values, f'WorkerStats.utilisation[{key!r}]', num_workers)
      measured = values[~np.isnan(values)]
      if np.any((measured < 0) | (measured > 1)):
        raise ValueError(
            f'WorkerStats.utilisation[{key!r}] must be fractions in [0, 1] (or NaN), got '
            f'{values}.')
      utilisation[key] = values
    object.__setattr__(self, 'utilisation', utilisation)
    for name in ('busy_s', 'wall_s'):
      values = getattr(self, name)
      if values is not None:
        object.__setattr__(self, name, _as_vector(values, f'WorkerStats.{name}', num_workers))

  @property
  def num_workers(self) -> int:
    return self.speed.shape[0]

  def to_vectors(self) -> np.ndarray:
    """Packs the stats into a [K, len(VECTOR_FIELDS)] float array (NaN = missing).

    One fixed-size row per worker, so that workers can exchange their stats with a single
    all-gather of floats and rebuild them with `from_vectors`.
    """
    columns = [self.speed]
    for key in UTILISATION_KEYS:
      columns.append(self.utilisation.get(key, np.full(self.num_workers, np.nan)))
    for values in (self.busy_s, self.wall_s):
      columns.append(np.full(self.num_workers, np.nan) if values is None else values)
    return np.stack(columns, axis=1)

  @classmethod
  def from_vectors(cls, vectors: np.ndarray) -> WorkerStats:
    """Inverse of `to_vectors`; rows may come from different workers' `to_vectors()`."""
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[1] != len(VECTOR_FIELDS):
      raise ValueError(
          f'Expected a [K, {len(VECTOR_FIELDS)}] array with columns {VECTOR_FIELDS}, got shape '
          f'{vectors.shape}.')
    columns = dict(zip(VECTOR_FIELDS, vectors.T))
    utilisation = {k: columns[k] for k in UTILISATION_KEYS if not np.all(np.isnan(columns[k]))}
    optional = {k: None if np.all(np.isnan(columns[k])) else columns[k]
                for k in ('busy_s', 'wall_s')}
    return cls(speed=columns['speed'], utilisation=utilisation, **optional)

  @classmethod
  def concatenate(cls, stats: list[WorkerStats]) -> WorkerStats:
    """Stacks the stats of several workers (e.g. each process's own) in order."""
    if not stats:
      raise ValueError('concatenate needs at least one WorkerStats.')
    return cls.from_vectors(np.concatenate([s.to_vectors() for s in stats], axis=0))


VECTOR_FIELDS = ('speed',) + UTILISATION_KEYS + ('busy_s', 'wall_s')


# ----------------------------------------------------------------------------------------------
# Figures of merit.


def node_loads(blocks: np.ndarray, speed: np.ndarray) -> np.ndarray:
  """Per-worker load u_k = blocks_k / speed_k (time to train the assigned blocks)."""
  return np.asarray(blocks, dtype=np.float64) / np.asarray(speed, dtype=np.float64)


def makespan(blocks: np.ndarray, speed: np.ndarray) -> float:
  """Time of a round: max_k blocks_k / speed_k (the Reduce waits for the slowest worker)."""
  return float(np.max(node_loads(blocks, speed)))


def parallel_computing_entropy(loads: np.ndarray) -> float:
  """Normalised parallel computing entropy H = -sum_k p_k log p_k / log K, p_k = l_k / sum l.

  H = 1 is perfect balance, H -> 0 when one node carries everything. One node, or no load at all,
  counts as balanced (H = 1).

  Args:
    loads: [K] non-negative per-node loads: u_k = blocks_k / speed_k, or measured busy seconds.

  Returns:
    H in [0, 1].

  References:
    MR-FPDCNN paper, Definition 1, eq. (5); DESIGN.md "DLBPCE".
  """
  loads = _as_vector(loads, 'loads')
  if np.any(loads < 0) or not np.all(np.isfinite(loads)):
    raise ValueError(f'loads must be finite and >= 0, got {loads}.')
  total = loads.sum()
  if loads.shape[0] <= 1 or total <= 0:
    return 1.0
  p = loads[loads > 0] / total
  return float(-np.sum(p * np.log(p)) / np.log(loads.shape[0]))


# ----------------------------------------------------------------------------------------------
# Balancers.


def _check_request(num_blocks: int, num_workers: int, min_blocks: int) -> None:
  if int(num_blocks) != num_blocks or num_blocks < 0:
    raise ValueError(f'num_blocks must be a non-negative integer, got {num_blocks}.')
  if int(min_blocks) != min_blocks or min_blocks < 0:
    raise ValueError(f'min_blocks must be a non-negative integer, got {min_blocks}.')
  if num_blocks < min_blocks * num_workers:
    raise ValueError(
        f'num_blocks={num_blocks} cannot give each of {num_workers} workers min_blocks='
        f'{min_blocks}; raise config.parallel.num_blocks to at least '
        f'{min_blocks * num_workers} or lower min_blocks.')


def _speed_first_order(speed: np.ndarray) -> np.ndarray:
  """Worker indices by decreasing speed, ties by index (deterministic)."""
  return np.lexsort((np.arange(speed.shape[0]), -speed))


def equal(num_blocks: int, stats: WorkerStats, previous: np.ndarray | None = None, *,
          min_blocks: int = 1) -> np.ndarray:
  """Equal split: num_blocks // K each; the num_blocks % K extra blocks go to the fastest.

  The baseline both papers compare against (Split into equal blocks, one share per node).

  Args:
    num_blocks: blocks to hand out.
    stats: measured figures; only the speed order (for the remainder) is used.
    previous: ignored.
    min_blocks: checked only (an equal split gives every worker the same share).

  Returns:
    [K] int64 blocks per worker, summing to num_blocks.
  """
  del previous
  _check_request(num_blocks, stats.num_workers, min_blocks)
  base, extra = divmod(int(num_blocks), stats.num_workers)
  blocks = np.full(stats.num_workers, base, dtype=np.int64)
  blocks[_speed_first_order(stats.speed)[:extra]] += 1
  return blocks


def _largest_remainder(quota: np.ndarray, total: int, speed: np.ndarray) -> np.ndarray:
  """Rounds real quotas summing to `total` to integers summing to `total` (Hamilton's method)."""
  blocks = np.floor(quota + 1e-9).astype(np.int64)
  leftover = total - int(blocks.sum())
  remainder = quota - blocks
  # Largest remainder first; ties to the faster worker, then the lower index.
  order = np.lexsort((np.arange(quota.shape[0]), -speed, -np.round(remainder, 9)))
  blocks[order[:leftover]] += 1
  return blocks


def proportional(num_blocks: int, stats: WorkerStats, previous: np.ndarray | None = None, *,
                 min_blocks: int = 1) -> np.ndarray:
  """Proportional rule: blocks_k ~ speed_k, rounded by largest remainder.

  Workers whose proportional quota falls below `min_blocks` are pinned to it and the rest of the
  blocks are shared proportionally among the others (water-filling); the real quotas are then
  rounded with the largest-remainder (Hamilton) method, which conserves the blocks and keeps
  every worker within one block of its quota.

  Args:
    num_blocks: blocks to hand out.
    stats: measured speeds.
    previous: ignored.
    min_blocks: least blocks per worker.

  Returns:
    [K] int64 blocks per worker, summing to num_blocks.

  References:
    DESIGN.md "DLBPCE" (last paragraph: the proportional reference rule).
  """
  del previous
  num_workers = stats.num_workers
  _check_request(num_blocks, num_workers, min_blocks)
  speed = stats.speed
  pinned = np.zeros(num_workers, dtype=bool)
  while True:
    free = ~pinned
    share = (num_blocks - min_blocks * pinned.sum()) * speed / speed[free].sum()
    quota = np.where(pinned, float(min_blocks), share)
    newly_pinned = free & (quota < min_blocks)
    if not newly_pinned.any():
      break
    pinned |= newly_pinned
  return _largest_remainder(quota, int(num_blocks), speed)


def lbrla_rates(blocks: np.ndarray, stats: WorkerStats, *, num_blocks: int | None = None,
                weights: Mapping[str, float] | None = None) -> np.ndarray:
  """Combined LBRLA load rate of every worker for a given assignment.

  R_i = (w_load P_i + sum_m w_m U_m,i) / (w_load + sum_m w_m), P_i = L_i / C_i,

  with load L_i = blocks_i and capacity C_i = num_blocks * speed_i / max_k speed_k: the blocks
  node i trains in the time the fastest node would train all of them. So P_i is node i's
  training time relative to that of the fastest node doing everything: P_i in [0, 1], and equal
  P_i means equal finishing times. U_m,i are the measured utilisations (disk I/O, accelerator,
  memory, network, node) of `stats.utilisation`, in [0, 1]; they describe the node's pressure
  during the last round and do not change with this round's blocks. A utilisation missing (NaN)
  on any worker is dropped for every worker, and the weights are renormalised over what is left,
  so R_i in [0, 1] and the rates of different workers stay comparable.

  Args:
    blocks: [K] blocks per worker.
    stats: measured figures.
    num_blocks: total defining the capacities; defaults to sum(blocks).
    weights: 'load' and utilisation names -> non-negative weights; default
      `DEFAULT_LBRLA_WEIGHTS`.

  Returns:
    [K] combined load rates.

  References:
    PDCNNO paper, section "LBRLA" (load rate P_i = L_i / C_i, average load rate, combined node
    load rate with weights on D[i], G[i], M[i], W[i], N[i]); DESIGN.md "LBRLA".
  """
  blocks = _as_vector(blocks, 'blocks', stats.num_workers)
  num_blocks = int(blocks.sum()) if num_blocks is None else num_blocks
  base, load_weight = _lbrla_base_rates(stats, weights)
  capacity = max(num_blocks, 1) * stats.speed / stats.speed.max()
  return base + load_weight * blocks / capacity


def _lbrla_base_rates(stats: WorkerStats,
                      weights: Mapping[str, float] | None) -> tuple[np.ndarray, float]:
  """Utilisation part of the combined rate and the normalised weight of the load part."""
  weights = dict(DEFAULT_LBRLA_WEIGHTS if weights is None else weights)
  unknown = set(weights) - {'load', *UTILISATION_KEYS}
  if unknown:
    raise ValueError(
        f'Unknown LBRLA weights {sorted(unknown)}; expected "load" and {UTILISATION_KEYS}.')
  if any(w < 0 or not np.isfinite(w) for w in weights.values()):
    raise ValueError(f'LBRLA weights must be finite and >= 0, got {weights}.')
  load_weight = float(weights.get('load', 0.0))
  if load_weight <= 0:
    raise ValueError('The LBRLA "load" weight must be > 0, or the blocks would not count.')
  used = {k: w for k, w in weights.items()
          if k != 'load' and w > 0 and k in stats.utilisation
          and not np.any(np.isnan(stats.utilisation[k]))}
  total = load_weight + sum(used.values())
  base = np.zeros(stats.num_workers)
  for key, weight in used.items():
    base += weight / total * stats.utilisation[key]
  return base, load_weight / total


def lbrla(num_blocks: int, stats: WorkerStats, previous: np.ndarray | None = None, *,
          min_blocks: int = 1, ceiling: float = 0.97,
          weights: Mapping[str, float] | None = None, strict: bool = False) -> np.ndarray:
  """LBRLA: hand out blocks one at a time by regulated load rate.

  Every worker first gets `min_blocks` (ceiling or not). Each further block goes to the worker whose combined
  load rate R_i (`lbrla_rates`) would be lowest after taking it, among the workers whose rate
  would stay at or below `ceiling`; the rates are updated after every block. The lowest such
  rate is never above the average rate, so this is the paper's rule "the node furthest below the
  average load rate has the highest priority", evaluated after the block is placed (which makes
  the greedy finish-time optimal when the utilisations are equal). Ties go to the lower index.

  When no worker can take a block without exceeding the ceiling (every node saturated), the
  block still has to be trained in this round: with `strict=False` (default) it goes to the
  worker whose rate would be lowest, ceiling or not; with `strict=True` a ValueError is raised.
  The ceiling is thus a hard limit whenever it is feasible and the least-bad choice otherwise.

  Args:
    num_blocks: blocks to hand out.
    stats: measured speeds and utilisations.
    previous: ignored (LBRLA re-plans every round from the measured rates).
    min_blocks: least blocks per worker.
    ceiling: highest combined load rate a worker may reach (the paper's 97%).
    weights: see `lbrla_rates`.
    strict: raise instead of overfilling when every worker is at the ceiling.

  Returns:
    [K] int64 blocks per worker, summing to num_blocks.

  Raises:
    ValueError: bad arguments, or (strict) no worker below the ceiling.

  References:
    PDCNNO paper, section "LBRLA" and Algorithm 3; DESIGN.md "LBRLA".
  """
  del previous
  num_workers = stats.num_workers
  _check_request(num_blocks, num_workers, min_blocks)
  if not 0 < ceiling <= 1:
    raise ValueError(f'ceiling must be in (0, 1], got {ceiling}.')
  base, load_weight = _lbrla_base_rates(stats, weights)
  rate_per_block = load_weight * stats.speed.max() / (max(num_blocks, 1) * stats.speed)
  blocks = np.full(num_workers, min_blocks, dtype=np.int64)
  # Heap of (rate after one more block, worker): its head is the lowest such rate; if even that
  # exceeds the ceiling, every worker does, and the head is also the least-bad choice.
  heap = [(base[k] + rate_per_block[k] * (min_blocks + 1), k) for k in range(num_workers)]
  heapq.heapify(heap)
  for _ in range(int(num_blocks) - min_blocks * num_workers):
    next_rate, k = heap[0]
    if strict and next_rate > ceiling:
      rates = base + rate_per_block * blocks
      raise ValueError(
          f'LBRLA: every worker would exceed the load-rate ceiling {ceiling} with '
          f'{blocks.sum()} of {num_blocks} blocks placed (rates {rates}); raise '
          'config.parallel.lbrla_ceiling, add workers, or use strict=False.')
    blocks[k] += 1
    heapq.heapreplace(heap, (base[k] + rate_per_block[k] * (blocks[k] + 1), k))
  return blocks


def _check_previous(previous: np.ndarray, num_blocks: int, num_workers: int) -> np.ndarray:
  previous = np.asarray(previous)
  if previous.shape != (num_workers,):
    raise ValueError(
        f'previous assignment has shape {previous.shape}, expected ({num_workers},).')
  if not np.issubdtype(previous.dtype, np.integer) and not np.all(previous == np.round(previous)):
    raise ValueError(f'previous assignment must be integer block counts, got {previous}.')
  previous = previous.astype(np.int64)
  if np.any(previous < 0) or previous.sum() != num_blocks:
    raise ValueError(
        f'previous assignment {previous} must be >= 0 and sum to num_blocks={num_blocks}; pass '
        'previous=None when the number of blocks changes.')
  return previous


def dlbpce(num_blocks: int, stats: WorkerStats, previous: np.ndarray | None = None, *,
           min_blocks: int = 1, entropy_target: float = 0.999, threshold_min: float = 0.05,
           threshold_max: float = 0.5) -> np.ndarray:
  """DLBPCE: move blocks from overloaded to light workers until the entropy reaches H_b.

  Starting from `previous` (or an equal split), with u_k = blocks_k / speed_k and
  H = `parallel_computing_entropy(u)`, one block moves at a time while H < entropy_target:

  1. Dynamic load threshold (DLTF): c = clip((u_max - u_min) / (2 mean u), threshold_min,
     threshold_max).
  2. Queues: Q_over = workers with u > mean (1 + c), most loaded first; Q_light = workers with
     u < mean (1 - c), least loaded first.
  3. The head of Q_over offers a block to the head of Q_light. The receiver rejects it (and the
     next one in the queue is asked, MR-FPDCNN step 4) when taking it would not lower
     max(u_donor, u_receiver) or would not raise H; a donor with `min_blocks` left, or whom
     every receiver rejected, gives way to the next donor.
  4. When no pair of the two queues can move a block, the same search runs over every pair
     (donors by decreasing load, receivers by increasing load). This covers what the band
     cannot: it is symmetric around the mean while the spread need not be (with two workers
     the unclipped c puts both exactly on its edges, so both queues are empty), and a light
     worker may be too slow to take a whole block.
  5. The strategy ends when H >= entropy_target (balanced, step 5) or when no pair can move a
     block (no single move improves the balance).

  Every accepted move strictly raises H and never raises the makespan max_k u_k, so the
  strategy terminates (the assignments are finite and H never revisits a value), the result is
  never worse than `previous` on either measure, and an assignment already at H >= H_b is
  returned unchanged. Because H_b < 1 stops early by design, workers of equal speed may end more
  than one block apart; with entropy_target=1 they end within one block of each other.

  Args:
    num_blocks: blocks in play (must equal sum(previous) when previous is given).
    stats: measured speeds (utilisations are not used by DLBPCE).
    previous: [K] assignment of the last round; None starts from `equal`.
    min_blocks: least blocks a donor keeps.
    entropy_target: H_b, the entropy at which the system counts as balanced.
    threshold_min: c_sub, the lower clip of the dynamic threshold.
    threshold_max: c_top, the upper clip of the dynamic threshold.

  Returns:
    [K] int64 blocks per worker, summing to num_blocks.

  References:
    MR-FPDCNN paper, section "DLBPCE": Definition 1 (eq. 5), Definition 4 (DLTF), steps
    (1)-(5); DESIGN.md "DLBPCE".
  """
  blocks = _dlbpce_start(num_blocks, stats, previous, min_blocks)
  for blocks in dlbpce_moves(num_blocks, stats, previous, min_blocks=min_blocks,
                             entropy_target=entropy_target, threshold_min=threshold_min,
                             threshold_max=threshold_max):
    pass
  return blocks


def dlbpce_moves(num_blocks: int, stats: WorkerStats, previous: np.ndarray | None = None, *,
                 min_blocks: int = 1, entropy_target: float = 0.999,
                 threshold_min: float = 0.05,
                 threshold_max: float = 0.5) -> Iterator[np.ndarray]:
  """Yields the assignment after each DLBPCE move (see `dlbpce`; same arguments).

  Yields nothing when no move is made. For reports (moves per round) and tests.
  """
  if not 0 < entropy_target <= 1:
    raise ValueError(f'entropy_target must be in (0, 1], got {entropy_target}.')
  if not 0 <= threshold_min <= threshold_max:
    raise ValueError(
        f'Need 0 <= threshold_min <= threshold_max, got {threshold_min}, {threshold_max}.')
  blocks = _dlbpce_start(num_blocks, stats, previous, min_blocks)
  index = np.arange(stats.num_workers)
  block_time = 1.0 / stats.speed
  u = blocks * block_time
  entropy = parallel_computing_entropy(u)
  while entropy < entropy_target:
    mean = u.mean()
    c = np.clip((u.max() - u.min()) / (2 * mean), threshold_min, threshold_max)
    descending = np.lexsort((index, -u))
    ascending = np.lexsort((index, u))
    over = [k for k in descending if u[k] > mean * (1 + c)]
    light = [k for k in ascending if u[k] < mean * (1 - c)]
    move = (_first_move(over, light, blocks, u, block_time, entropy, min_blocks)
            or _first_move(descending, ascending, blocks, u, block_time, entropy, min_blocks))
    if move is None:
      return
    donor, receiver, u, entropy = move
    blocks[donor] -= 1
    blocks[receiver] += 1
    yield blocks.copy()


def _dlbpce_start(num_blocks: int, stats: WorkerStats, previous: np.ndarray | None,
                  min_blocks: int) -> np.ndarray:
  """The assignment DLBPCE starts from: a copy of `previous`, or an equal split."""
  _check_request(num_blocks, stats.num_workers, min_blocks)
  if previous is None:
    return equal(num_blocks, stats, min_blocks=min_blocks)
  return _check_previous(previous, num_blocks, stats.num_workers)


def _first_move(donors, receivers, blocks, u, block_time, entropy, min_blocks):
  """First (donor, receiver) pair, donor-major, whose move lowers the pair max and raises H."""
  for donor in donors:
    if blocks[donor] <= min_blocks:
      continue
    for receiver in receivers:
      if u[receiver] + block_time[receiver] >= u[donor]:
        continue  # Would not lower max(u_donor, u_receiver); rejects.
      new_u = u.copy()  # Recomputed from the counts: no drift from repeated updates.
      new_u[donor] = (blocks[donor] - 1) * block_time[donor]
      new_u[receiver] = (blocks[receiver] + 1) * block_time[receiver]
      new_entropy = parallel_computing_entropy(new_u)
      if new_entropy > entropy:
        return donor, receiver, new_u, new_entropy
  return None


# ----------------------------------------------------------------------------------------------
# Registry.


class Balancer(Protocol):

  def __call__(self, num_blocks: int, stats: WorkerStats, previous: np.ndarray | None = None,
               **options: Any) -> np.ndarray:
    ...


BALANCERS: Mapping[str, Balancer] = {
    'equal': equal,
    'proportional': proportional,
    'lbrla': lbrla,
    'dlbpce': dlbpce,
}


def get_balancer(name: str) -> Balancer:
  """Returns the balancer registered under `name` (config.parallel.balancer)."""
  try:
    return BALANCERS[name]
  except KeyError:
    raise ValueError(
        f'Unknown balancer {name!r}; config.parallel.balancer must be one of '
        f'{sorted(BALANCERS)}.') from None


def parse_lbrla_weights(spec: str) -> dict[str, float]:
  """Parses config.parallel.lbrla_weights, e.g. 'load=0.5,memory=0.3,node=0.2'.

  Args:
    spec: comma-separated name=weight pairs, names 'load' and `UTILISATION_KEYS`; names left
      out weigh 0. An empty string means `DEFAULT_LBRLA_WEIGHTS`.

  Returns:
    The weights.

  Raises:
    ValueError: a malformed pair, an unknown name, or a negative weight.
  """
  if not spec.strip():
    return dict(DEFAULT_LBRLA_WEIGHTS)
  weights = {}
  for pair in spec.split(','):
    name, sep, value = pair.partition('=')
    name = name.strip()
    try:
      weight = float(value) if sep else None
    except ValueError:
      weight = None
    if weight is None or name not in ('load', *UTILISATION_KEYS) or name in weights:
      raise ValueError(
          f'config.parallel.lbrla_weights={spec!r}: bad entry {pair.strip()!r}; expected '
          f'distinct name=weight pairs with names from {("load", *UTILISATION_KEYS)}, e.g. '
          "'load=0.5,memory=0.3,node=0.2'.")
    if not np.isfinite(weight) or weight < 0:
      raise ValueError(f'config.parallel.lbrla_weights: weight of {name} must be >= 0.')
    weights[name] = weight
  return weights


def balancer_from_config(parallel_config: Any) -> Callable[..., np.ndarray]:
  """The configured balancer with its options bound: assign(num_blocks, stats, previous).

  Reads config.parallel.balancer, and lbrla_ceiling + lbrla_weights (LBRLA) or
  dlbpce_entropy_target (DLBPCE).
  """
  name = parallel_config.balancer
  options = {}
  if name == 'lbrla':
    options['ceiling'] = float(parallel_config.lbrla_ceiling)
    options['weights'] = parse_lbrla_weights(parallel_config.lbrla_weights)
  elif name == 'dlbpce':
    options['entropy_target'] = float(parallel_config.dlbpce_entropy_target)
  return functools.partial(get_balancer(name), **options)
