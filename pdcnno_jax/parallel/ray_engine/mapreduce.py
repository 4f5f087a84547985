"""MapReduce training on Ray: ``parallel.mode='mapreduce'``, ``parallel.engine='ray'``.

One driver process (``python -m pdcnno_jax.main``, no launcher) starts
``parallel.num_workers`` `map_worker.MapWorker` actors and runs the rounds of
`mapreduce_core` (the jax engine's Split, balancers, checks and checkpoints):

  Map     the round's averaged host state goes into the object store once (one ray.put);
          every actor's ``map`` gets a reference to it and the example indices of its blocks.
  Reduce  the sample-weighted average of the returned states (floats weighted in float32,
          integer counters the mean rounded half up, as the jax engine's all-reduce), by the
          driver in ``parallel.ps_shards`` leaf groups of about equal bytes, in parallel threads.
  Faults  a Map whose actor dies (SIGKILL, a lost node) runs again with the same state and
          indices, on its actor once Ray restarts it, else on another live worker; only the
          attempt that returns is reduced, so every block is applied exactly once and the
          result equals a run without the failure. A killed driver resumes from the workdir.

report['mapreduce'] is the jax engine's plus ``engine``, ``transport`` (`transport.
job_transport`: bytes each worker received and sent, and the seconds it took), and per round
``wait_seconds`` (how long the driver waited for the slowest Map after the fastest),
``broadcast_s``, ``slept_s`` (each worker's simulated slowdown) and ``reexecuted`` (the Maps
that ran again, with their blocks and errors).

References:
  DESIGN.md, "MapReduce training" (failed Maps re-run, as in Hadoop); PDCNNO paper, the
  Map and Reduce phases.
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from pdcnno_jax.data import input_pipeline
from pdcnno_jax.loop import batching
from pdcnno_jax.loop import context
from pdcnno_jax.parallel import mapreduce_core as core
from pdcnno_jax.parallel.ray_engine import map_worker
from pdcnno_jax.parallel.ray_engine import runtime
from pdcnno_jax.parallel.ray_engine import transport
from pdcnno_jax.parallel.ssp import serialization
from pdcnno_jax.train import checkpointing
from pdcnno_jax.train import sharding as sharding_lib
from pdcnno_jax.train import state as state_lib

# Restarts Ray grants each worker actor over a run.
_MAX_RESTARTS = 3
# A call to an actor that Ray is restarting fails fast; it is resubmitted after this pause, at
# most this many times per Map (about a minute: an actor restart imports JAX and compiles).
_UNAVAILABLE_WAIT_S = 0.25
_MAX_UNAVAILABLE = 240
# Environment variables the actors inherit from the driver as they are.
_PASSED_ENV = (map_worker.KILL_MAP_ENV,)


def validate(config: ml_collections.ConfigDict, dataset: input_pipeline.Dataset) -> None:
  """The Ray engine's own settings (the mode's are `mapreduce_core.validate`'s)."""
  del dataset
  if int(config.parallel.num_workers) < 1:
    raise ValueError(f'config.parallel.num_workers={config.parallel.num_workers}: the Ray '
                     'engine needs at least 1 worker actor.')
  if int(config.parallel.ps_shards) < 1:
    raise ValueError(f'config.parallel.ps_shards={config.parallel.ps_shards}: the Reduce '
                     'needs at least 1 shard.')


def shard_leaves(nbytes: Sequence[int], num_shards: int) -> list[list[int]]:
  """Leaf indices in ``num_shards`` groups of about equal bytes (largest leaf first, greedy).

  Every leaf is in exactly one group; groups are never empty when there are enough leaves.
  """
  return transport.balance_by_bytes(nbytes, max(1, min(int(num_shards), len(nbytes))))


def average_leaf(values: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
  """The Reduce of one leaf over the workers, as the jax engine's `collectives.TreeAverager`.

  Floating leaves: sum_k w_k x_k in float32 (accumulated in worker order), cast back;
  integer and boolean leaves: the mean rounded half up, in exact integer arithmetic.
  """
  first = np.asarray(values[0])
  if np.issubdtype(first.dtype, np.floating):
    total = np.zeros(first.shape, np.float32)
    for value, weight in zip(values, weights):
      total += np.asarray(value, np.float32) * np.float32(weight)
    return total.astype(first.dtype)
  if np.issubdtype(first.dtype, np.integer) or first.dtype == np.bool_:
    total = sum(np.asarray(v, np.int64) for v in values)
    return ((total + len(values) // 2) // len(values)).astype(first.dtype)
  raise TypeError(f'Cannot average a state leaf of dtype {first.dtype} over MapReduce workers.')


def weighted_average(states: Sequence[Any], weights: np.ndarray, num_shards: int,
                     pool: concurrent.futures.Executor | None = None) -> Any:
  """Sample-weighted average of the workers' host states, leaf groups in parallel."""
  flat = [jax.tree.flatten(s) for s in states]
  treedef, columns = flat[0][1], list(zip(*[leaves for leaves, _ in flat]))
  groups = shard_leaves([np.asarray(c[0]).nbytes for c in columns], num_shards)

  def reduce_group(group):
    return {i: average_leaf(columns[i], weights) for i in group}

  results = (pool.map(reduce_group, groups) if pool is not None and len(groups) > 1
             else map(reduce_group, groups))
  averaged = {}
  for part in results:
    averaged.update(part)
  return jax.tree.unflatten(treedef, [averaged[i] for i in range(len(columns))])


class _Maps:
  """The worker actors of one run and the Map calls of a round, failed ones re-executed."""

  def __init__(self, ray, exp: context.Experiment, tx, batch: int):
    config, split = exp.config, exp.dataset.host_splits['train']
    self._ray = ray
    self._errors = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError,
                    ray.exceptions.OwnerDiedError)
    num_workers = int(config.parallel.num_workers)
    preprocess = map_worker.portable_preprocess(exp.preprocess)
    # Held for the whole run: a restarted actor is rebuilt from these same objects.
    data = [ray.put(split.images), ray.put(split.labels)]
    self._boxes = [[ray.put(map_worker.WorkerSpec(k, num_workers, config.parallel,
                                                  int(config.seed), exp.graphdef, tx,
                                                  preprocess, batch)), *data]
                   for k in range(num_workers)]
    remote = ray.remote(map_worker.MapWorker)
    options = dict(runtime.worker_options(config), max_restarts=_MAX_RESTARTS,
                   max_task_retries=0,
                   runtime_env={'env_vars': runtime.actor_env(config, _PASSED_ENV)})
    self.actors = [remote.options(**options).remote(box) for box in self._boxes]
    self.logs = [transport.TransferLog() for _ in range(num_workers)]
    self.info = ray.get([a.info.remote() for a in self.actors])
    for k, info in enumerate(self.info):
      if batch % info['devices']:
        raise ValueError(
            f'Worker {k} has {info["devices"]} devices ({info["backend"]}), which do not '
            f'divide its local batch of {batch} (config.data.batch_size // '
            'config.parallel.num_workers); change the batch size or '
            'config.parallel.gpus_per_worker.')

  def warm_up(self, host_state: Any, shares: list[np.ndarray]) -> None:
    """Every actor compiles its step before the first round is timed."""
    box = [self._ray.put(host_state)]
    self._ray.get([a.warm_up.remote(box, share) for a, share in zip(self.actors, shares)])

  def run(self, host_state: Any, shares: list[np.ndarray], round_index: int,
          block_ids: list[list[int]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Runs the round's Maps; returns every worker's result and the round's Ray figures."""
    ray, num_workers = self._ray, len(self.actors)
    start = time.perf_counter()
    box = [ray.put(host_state)]
    broadcast_s = time.perf_counter() - start
    pending = {self._submit(k, k, box, shares, round_index, 0): (k, k, 0)
               for k in range(num_workers)}
    results, ready_at, reexecuted = [None] * num_workers, [0.0] * num_workers, {}
    while pending:
      (ref,), _ = ray.wait(list(pending), num_returns=1)
      k, ran_on, attempt = pending.pop(ref)
      ready = time.perf_counter()
      try:
        result = ray.get(ref)
      except self._errors as e:
        entry = reexecuted.setdefault(k, {'worker': k, 'blocks': block_ids[k], 'errors': {}})
        target = self._next_target(k, ran_on, e, entry, round_index)
        pending[self._submit(target, k, box, shares, round_index, attempt + 1)] = (
            k, target, attempt + 1)
        continue
      if k in reexecuted:
        reexecuted[k].update(ran_on=ran_on, attempts=attempt + 1)
      received, received_s = result['received']
      self.logs[k].record(received=received, seconds=received_s)
      self.logs[k].record(sent=serialization.payload_nbytes(jax.tree.leaves(result['state'])),
                          seconds=time.perf_counter() - ready)
      results[k], ready_at[k] = result, ready
    return results, {'wait_seconds': float(max(ready_at) - min(ready_at)),
                     'broadcast_s': broadcast_s, 'reexecuted': list(reexecuted.values()),
                     'slept_s': [float(r['slept_s']) for r in results]}

  def _submit(self, target: int, worker: int, box, shares, round_index: int, attempt: int):
    return self.actors[target].map.remote(box, shares[worker], round_index, attempt)

  def _next_target(self, worker: int, ran_on: int, error: Exception, entry: dict[str, Any],
                   round_index: int) -> int:
    """Where a failed Map runs next: on its actor once Ray restarts it, else on another.

    While Ray restarts an actor (after its process died) calls to it fail at once with
    ActorUnavailableError; the Map is resubmitted there after a pause. An actor that is dead
    for good (ActorDiedError: restarts used up) hands the Map to the next worker.
    """
    name = type(error).__name__
    entry['errors'][name] = entry['errors'].get(name, 0) + 1
    unavailable = isinstance(error, self._ray.exceptions.ActorUnavailableError)
    failures = sum(entry['errors'].values())
    if (not unavailable and failures - entry['errors'].get('ActorUnavailableError', 0)
        >= len(self.actors)) or failures > _MAX_UNAVAILABLE:
      raise RuntimeError(f'MapReduce round {round_index}: the Map of worker {worker} failed '
                         f'{failures} times ({entry["errors"]}); last error: {error}') from error
    if unavailable:
      time.sleep(_UNAVAILABLE_WAIT_S)
      return ran_on
    return (ran_on + 1) % len(self.actors)

  def close(self) -> None:
    for actor in self.actors:
      self._ray.kill(actor)


def _check_exactly_once(results: list[dict[str, Any]], shares: list[np.ndarray],
                        batch: int, round_index: int) -> None:
  """Every example a share's full local batches hold was trained once, by its worker."""
  for k, (result, share) in enumerate(zip(results, shares)):
    expected = share[:len(share) // batch * batch]
    if not np.array_equal(result['trained'], expected):
      raise RuntimeError(f'MapReduce round {round_index}: worker {k} trained '
                         f'{len(result["trained"])} examples, not the {len(expected)} of its '
                         'blocks.')


def train(exp: context.Experiment, state: state_lib.TrainState, *, tx,
          checkpointer: checkpointing.Checkpointer | None = None
          ) -> tuple[state_lib.TrainState, dict[str, Any]]:
  """MapReduce training with Ray worker actors (see the module docstring).

  Args:
    exp: the experiment (its mesh is the driver's devices, used to evaluate and save).
    state: the `TrainState` (replicated on ``exp.mesh`` or host arrays).
    tx: the optimizer whose state is ``state.opt_state``.
    checkpointer: saves at round boundaries (None: no checkpoints).

  Returns:
    ``(state, report)`` as the jax engine's `parallel.mapreduce.train`.
  """
  config = exp.config
  core.validate(config, exp.dataset)
  validate(config, exp.dataset)
  if jax.process_count() > 1:
    raise ValueError('parallel.engine=ray runs in one driver process, which starts the '
                     f'workers itself; this job has {jax.process_count()} JAX processes. Run '
                     '`python -m pdcnno_jax.main` once, without launch_local.')
  num_workers = int(config.parallel.num_workers)
  per_worker = max(1, int(config.parallel.gpus_per_worker))
  batch = batching.local_batch_size(config.data.batch_size, num_workers, per_worker)
  plan = core.make_block_plan(exp.dataset.num_examples['train'],
                              int(config.parallel.num_blocks),
                              int(config.parallel.rounds_per_epoch), num_workers=num_workers,
                              local_batch_size=batch)
  host_state = jax.device_get(state)
  rounds = core.Rounds.start(exp, plan, num_workers, checkpointer=checkpointer,
                             step=int(host_state.step))
  ray = runtime.start(config)
  with exp.timer.phase('compile'):
    maps = _Maps(ray, exp, tx, batch)
    if rounds.first_round < rounds.total_rounds:
      _, _, round_blocks = rounds.round_indices(rounds.first_round)
      maps.warm_up(host_state, [core.worker_share(round_blocks, rounds.blocks, k)
                                for k in range(num_workers)])
  rounds.log_start('ray', batch)
  pool = concurrent.futures.ThreadPoolExecutor(int(config.parallel.ps_shards))
  try:
    for round_index in range(rounds.first_round, rounds.total_rounds):
      host_state, stop = _round(exp, rounds, maps, pool, host_state, round_index, batch)
      if stop:
        break
  finally:
    pool.shutdown()
    maps.close()
  report = rounds.final_report(batch)
  report.update(engine='ray', workers_info=maps.info,
                transport=transport.job_transport(maps.logs))
  return sharding_lib.replicate(host_state, exp.mesh), report


def _round(exp: context.Experiment, rounds: core.Rounds, maps: _Maps,
           pool: concurrent.futures.Executor, host_state: Any, round_index: int,
           batch: int) -> tuple[Any, bool]:
  """One round: Map on the actors, Reduce on the driver, then the shared bookkeeping."""
  plan, blocks = rounds.plan, rounds.blocks
  _, round_in_epoch, round_blocks = rounds.round_indices(round_index)
  shares = [core.worker_share(round_blocks, blocks, k) for k in range(len(blocks))]
  bounds = round_in_epoch * plan.blocks_per_round + np.concatenate([[0], np.cumsum(blocks)])
  block_ids = [list(range(int(a), int(b))) for a, b in zip(bounds[:-1], bounds[1:])]
  round_start = time.perf_counter()
  with exp.timer.phase('train'):
    results, ray_figures = maps.run(host_state, shares, round_index, block_ids)
  _check_exactly_once(results, shares, batch, round_index)
  with exp.timer.phase('reduce'):
    start = time.perf_counter()
    trained = core.local_steps(blocks, plan.block_size, batch) * batch
    weights = np.array([r['figures']['samples'] for r in results], np.float64) / trained.sum()
    merged = weighted_average([r['state'] for r in results], weights,
                              int(exp.config.parallel.ps_shards), pool)
    reduce_s = time.perf_counter() - start
  round_s = time.perf_counter() - round_start
  gathered = np.stack([core.figures_row(r['figures'], reduce_s, round_s) for r in results])
  stop = rounds.close(round_index, gathered, first_step=int(host_state.step),
                      step=int(merged.step),
                      global_state=lambda: sharding_lib.replicate(merged, exp.mesh),
                      extra=ray_figures)
  return merged, stop
