"""Cluster model: wall time of synchronous, MapReduce and SSP training on N (simulated) nodes.

Inputs: the cost of one training step (`StepCost`: single-core seconds, measured by
`calibration`), the parameter bytes, each node's relative speed, the slowdown process of
`parallel/slowdown.py` (persistent factors and transient stragglers, same random draws), the
network (latency, bandwidth, ring all-reduce or one parameter server), the batch and the mode:

  sync       every step: compute, then an all-reduce of the gradients (or a push and pull
             through one parameter server); a step ends when the slowest node's does.
  mapreduce  rounds: Map = local steps on the blocks the project's own balancer
             (`parallel/balancers.py`) assigned from the speeds measured in the round before;
             Reduce = one transfer of the parameters per worker per round.
  ssp        clock by clock: a worker about to compute clock c waits until every worker has
             finished clock c - s - 1 (Ho et al. 2013; s = 0 is BSP, s = None is ASP), then
             computes and pushes its update to the parameter store.

Where waits matter the model is discrete-event (`engine`); a homogeneous run without stragglers
also has a closed form (`sync_closed_form`), which the tests compare with the simulation.
`overhead_s` arguments are the measured per-step (sync, SSP) or per-round (MapReduce) framework
cost of each mode (`calibration`), added on top of the network's transfer time.

References:
  DESIGN.md, "Cluster model", "MapReduce training", "SSP"; Ho et al., "More effective
  distributed ML via a stale synchronous parallel parameter server", NeurIPS 2013.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import numpy as np

from pdcnno_jax.parallel import balancers
from pdcnno_jax.perfmodel import engine

TOPOLOGIES = ('ring', 'ps')
MODES = ('sync', 'mapreduce', 'ssp')


@dataclasses.dataclass(frozen=True)
class StepCost:
  """Single-core seconds of one training step of `batch` examples on the reference device.

  device_s(batch) = fixed_s + per_example_s * batch is the jitted step (what a slowdown
  stretches); host_s is the host work around it (batch gathering, dispatch), not stretched.
  """
  per_example_s: float
  fixed_s: float = 0.0
  host_s: float = 0.0

  def device_s(self, batch: int) -> float:
    return self.fixed_s + self.per_example_s * batch

  def scaled(self, factor: float) -> StepCost:
    """The cost on a device `factor` times faster (factor > 1) than the reference."""
    return StepCost(self.per_example_s / factor, self.fixed_s / factor, self.host_s / factor)


@dataclasses.dataclass(frozen=True)
class Network:
  """Links between nodes: latency per message, bandwidth per link (full duplex)."""
  latency_s: float = 50e-6
  bandwidth_bytes_per_s: float = 1e9 / 8  # 1 Gb/s Ethernet, as in the papers.
  topology: str = 'ring'

  def __post_init__(self):
    if self.topology not in TOPOLOGIES:
      raise ValueError(f'Network topology {self.topology!r} must be one of {TOPOLOGIES}.')
    if self.bandwidth_bytes_per_s <= 0 or self.latency_s < 0:
      raise ValueError('Network needs bandwidth > 0 and latency >= 0.')

  def allreduce_s(self, nbytes: float, n: int) -> float:
    """Time for n nodes to end with the sum (or mean) of their n arrays of nbytes each.

    ring: 2 (n - 1) messages of nbytes / n per node (reduce-scatter + all-gather);
    ps: one server receives n arrays and sends n back through its one link.
    """
    if n <= 1:
      return 0.0
    if self.topology == 'ring':
      return 2 * (n - 1) * (self.latency_s + nbytes / n / self.bandwidth_bytes_per_s)
    return 2 * (self.latency_s + n * nbytes / self.bandwidth_bytes_per_s)

  def server_s(self, nbytes: float) -> float:
    """Link time one push plus one pull of nbytes takes at a parameter server."""
    return 2 * nbytes / self.bandwidth_bytes_per_s


@dataclasses.dataclass(frozen=True)
class Stragglers:
  """The slowdown process of `parallel/slowdown.py`: sleeps after each step's device work.

  Step i of worker k takes factor_k (x straggler_factor with probability
  straggler_probability) times its device time; the draws come from
  `numpy.random.default_rng(SeedSequence([seed, k]))`, one per step, as in
  `slowdown.Slowdown.next_factor`, so a simulated worker sees the same stragglers as the real one.
  """
  factors: tuple[float, ...] = ()
  straggler_probability: float = 0.0
  straggler_factor: float = 1.0
  seed: int = 0

  def factor(self, worker: int) -> float:
    return self.factors[worker] if self.factors else 1.0

  def draws(self, worker: int) -> Iterator[float]:
    """Total factor of every step of `worker`, in order (infinite)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(self.seed), int(worker)]))
    base = self.factor(worker)
    while True:
      transient = rng.random() < self.straggler_probability
      yield base * (self.straggler_factor if transient else 1.0)


@dataclasses.dataclass(frozen=True)
class Cluster:
  """N nodes: relative speeds (work on node k takes 1 / speeds[k] of the reference time),
  where they run (core sets; default one dedicated node each), the network and stragglers.
  ``sleeper_credit_s``: how workers sharing a core set are scheduled (`engine.run`): None for
  processor sharing (the local time-shared runs: `calibration.LOCAL_SLEEPER_CREDIT_S`), else
  fair sharing with that wake-up credit (a scheduler with a sleeper bonus, e.g. CFS);
  ``sharing_efficiency``: share of a core set's cores it delivers while time-shared
  (`engine.run`)."""
  speeds: tuple[float, ...]
  network: Network = Network()
  stragglers: Stragglers = Stragglers()
  groups: tuple[int, ...] | None = None
  cores: tuple[float, ...] | None = None
  sleeper_credit_s: float | None = None
  sharing_efficiency: float = 1.0

  def __post_init__(self):
    if not self.speeds or min(self.speeds) <= 0:
      raise ValueError(f'Cluster.speeds must be a non-empty tuple of values > 0, '
                       f'got {self.speeds}.')
    if self.stragglers.factors and len(self.stragglers.factors) != len(self.speeds):
      raise ValueError(f'{len(self.stragglers.factors)} slowdown factors for '
                       f'{len(self.speeds)} nodes; give one per node.')

  @property
  def size(self) -> int:
    return len(self.speeds)

  def placement(self) -> tuple[list[int], list[float]]:
    if self.groups is None:
      return engine.dedicated(self.size)
    return list(self.groups), list(self.cores)

  def run(self, workers: Sequence[engine.Worker]) -> list[engine.WorkerTrace]:
    """`engine.run` of one generator per node, placed and scheduled as this cluster says."""
    return engine.run(workers, *self.placement(), sleeper_credit_s=self.sleeper_credit_s,
                      sharing_efficiency=self.sharing_efficiency)


@dataclasses.dataclass
class Result:
  """Simulated wall time and per-worker figures (seconds).

  ``clock_s[k][c]``: when worker k finished clock (SSP) or step (sync) c + 1, its update sent.
  """
  wall_s: float
  busy_s: list[float]
  wait_s: list[float]
  rounds: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  clock_s: list[list[float]] = dataclasses.field(default_factory=list)


def _step(cost: StepCost, speed: float, batch: int, draws: Iterator[float]):
  """One stretched step of a worker: host work, device work, the slowdown's sleep."""
  elapsed = 0.0
  if cost.host_s:
    elapsed += yield ('cpu', cost.host_s / speed)
  device = yield ('cpu', cost.device_s(batch) / speed)
  extra = (next(draws) - 1.0) * device
  if extra > 0:
    device += yield ('sleep', extra)
  return elapsed + device


def simulate_sync(cost: StepCost, cluster: Cluster, *, local_batch: int, steps: int,
                  param_bytes: float, overhead_s: float = 0.0) -> Result:
  """Synchronous data parallel: every step ends with a gradient all-reduce (a barrier).

  Args:
    cost: step cost on the reference device.
    cluster: nodes, network, stragglers.
    local_batch: examples per node per step.
    steps: training steps.
    param_bytes: bytes of the gradients (= parameters) all-reduced per step.
    overhead_s: measured framework cost per step (added after the all-reduce).
  """
  n = cluster.size
  arrived = [0] * n
  comm = cluster.network.allreduce_s(param_bytes, n) + overhead_s
  busy = [0.0] * n

  def worker(k):
    draws = cluster.stragglers.draws(k)
    for i in range(steps):
      busy[k] += yield from _step(cost, cluster.speeds[k], local_batch, draws)
      arrived[k] = i + 1
      yield ('until', lambda i=i: min(arrived) > i)
      if comm:
        yield ('sleep', comm)

  traces = cluster.run([worker(k) for k in range(n)])
  return Result(max(t.finish_s for t in traces), busy, [t.blocked_s for t in traces])


def sync_closed_form(cost: StepCost, cluster: Cluster, *, local_batch: int, steps: int,
                     param_bytes: float, overhead_s: float = 0.0) -> float:
  """simulate_sync without stragglers on dedicated nodes: steps x (slowest compute + comm)."""
  compute = (cost.host_s + cost.device_s(local_batch)) / min(cluster.speeds)
  return steps * (compute + cluster.network.allreduce_s(param_bytes, cluster.size) + overhead_s)


def simulate_mapreduce(cost: StepCost, cluster: Cluster, *, num_examples: int, num_blocks: int,
                       rounds_per_epoch: int, epochs: float, local_batch: int,
                       param_bytes: float, balancer: str = 'equal',
                       balancer_options: dict[str, Any] | None = None,
                       overhead_s: float = 0.0) -> Result:
  """MapReduce rounds with the project's balancer (see `parallel/mapreduce.py`).

  Round 0 splits the round's blocks equally; every later round's assignment is
  `balancers.get_balancer(balancer)` applied to the speeds measured in the round before
  (examples per busy second, busy = device work + slowdown, as `monitor.WorkerMonitor` sees
  it). A worker trains blocks_k * block_size // local_batch steps per round. The Reduce is one
  all-reduce of the parameters; `overhead_s` is the measured framework cost per round.

  Returns:
    `Result` with per-round blocks, busy seconds, makespan (longest busy) and round wall time.
  """
  n = cluster.size
  block_size = num_examples // num_blocks
  per_round = num_blocks // rounds_per_epoch
  total_rounds = int(round(epochs * rounds_per_epoch))
  assign = balancers.get_balancer(balancer)
  options = dict(balancer_options or {})
  draws = [cluster.stragglers.draws(k) for k in range(n)]
  reduce_s = cluster.network.allreduce_s(param_bytes, n) + overhead_s
  blocks = balancers.equal(per_round, balancers.WorkerStats(np.ones(n)))
  wall, busy_total, wait_total, rounds = 0.0, [0.0] * n, [0.0] * n, []
  for r in range(total_rounds):
    steps = np.asarray(blocks) * block_size // local_batch
    busy = [0.0] * n

    def worker(k, steps=steps, busy=busy):
      for _ in range(int(steps[k])):
        busy[k] += yield from _step(cost, cluster.speeds[k], local_batch, draws[k])

    traces = cluster.run([worker(k) for k in range(n)])
    map_s = max(t.finish_s for t in traces)
    rounds.append({'round': r, 'blocks': [int(b) for b in blocks], 'busy_s': list(busy),
                   'makespan_s': max(busy), 'map_s': map_s, 'round_s': map_s + reduce_s})
    wall += map_s + reduce_s
    for k in range(n):
      busy_total[k] += busy[k]
      wait_total[k] += map_s - traces[k].finish_s
    samples = steps * local_batch
    speed = np.where(samples > 0, samples / np.maximum(busy, 1e-12), 0.0)
    speed = np.where(speed > 0, speed, max(speed.max(), 1e-12))
    stats = balancers.WorkerStats(speed=speed, busy_s=np.asarray(busy))
    blocks = assign(per_round, stats, blocks, **options)
  return Result(wall, busy_total, wait_total, rounds)


def simulate_ssp(cost: StepCost, cluster: Cluster, *, local_batch: int | Sequence[int],
                 clocks: int, staleness: int | None, param_bytes: float,
                 overhead_s: float = 0.0) -> Result:
  """SSP clock by clock with the exact staleness rule (s = 0: BSP; None: ASP).

  Before computing clock c (0-based) worker k waits until every worker has finished clock
  c - s - 1 (published c - s updates). After computing it pushes its update and pulls the
  others' through the parameter store: with the 'ring' topology the store is sharded over the
  nodes (each node's link carries 2 (n - 1) / n of the parameters per clock, as in a ring
  all-reduce); with 'ps' one server's link is a FIFO queue that every push and pull crosses.
  `overhead_s` is the measured per-clock cost of the real engine (Ray's calls to the
  parameter server and the host work around them) on top of the network.
  """
  n = cluster.size
  batches = ([int(local_batch)] * n if np.ndim(local_batch) == 0
             else [int(b) for b in local_batch])
  published = [0] * n
  busy = [0.0] * n
  done_at: list[list[float]] = [[] for _ in range(n)]
  net = cluster.network
  server = {'free': 0.0}

  def worker(k):
    draws = cluster.stragglers.draws(k)
    now = 0.0
    for c in range(clocks):
      if staleness is not None and c - staleness > 0:
        now += yield ('until', lambda c=c: min(published) >= c - staleness)
      seconds = yield from _step(cost, cluster.speeds[k], batches[k], draws)
      busy[k] += seconds
      now += seconds
      if n > 1 and net.topology == 'ps':
        start = max(now, server['free'])
        server['free'] = start + net.server_s(param_bytes)
        comm = server['free'] - now + 2 * net.latency_s
      else:
        comm = net.allreduce_s(param_bytes, n)
      comm += overhead_s
      if comm > 0:
        now += yield ('sleep', comm)
      published[k] = c + 1
      done_at[k].append(now)

  traces = cluster.run([worker(k) for k in range(n)])
  return Result(max(t.finish_s for t in traces), busy, [t.blocked_s for t in traces],
                clock_s=done_at)


def serial_time(cost: StepCost, *, num_examples: int, epochs: float, batch: int,
                speed: float = 1.0) -> float:
  """One node training everything alone: no communication, no waits."""
  steps = int(round(epochs * num_examples / batch))
  return steps * (cost.host_s + cost.device_s(batch)) / speed
