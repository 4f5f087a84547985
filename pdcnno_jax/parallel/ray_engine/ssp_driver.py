"""SSP on Ray (``parallel.mode='ssp'``, ``parallel.engine='ray'``): the driver of one job.

One process (``python -m pdcnno_jax.main``) starts ``parallel.ps_shards`` parameter-server
shards (`ps.ParameterShard`, a byte-balanced split of the parameter leaves) and
``parallel.num_workers`` worker actors (`ssp_worker.SSPWorkerActor`, each with its own JAX on
``parallel.ray_worker_cpu_devices`` CPU devices or ``gpus_per_worker`` GPUs). The training split
goes into Ray's object store once (``ray.put``); the model travels as its graphdef and host
state. Workers and shards restart under Ray (``max_restarts``): a worker resumes from its
checkpoint after the last clock the shards applied, a shard from its snapshot with the deltas
the workers kept re-sent. The shards also publish to shared memory, and workers on their node
exchange every clock there (``parallel.ssp_shared_memory``; `ps_client`); the driver removes
those files at the end. The result is worker 0's optimizer and model state with the server's
final parameters; the report is the jax engine's ``ssp`` section plus ``transport`` (bytes and
transfer seconds in total and per worker, clocks, per-clock waits) and ``ps`` (per shard).

References:
  Ho et al., NIPS 2013 (SSP); DESIGN.md, "SSP"; papers/delay_sync_parallel.txt.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
from absl import logging

from pdcnno_jax.loop import batching
from pdcnno_jax.loop import context
from pdcnno_jax.loop import placement
from pdcnno_jax.parallel import slowdown as slowdown_lib
from pdcnno_jax.parallel.ray_engine import ps
from pdcnno_jax.parallel.ray_engine import runtime
from pdcnno_jax.parallel.ray_engine import ssp_worker
from pdcnno_jax.parallel.ray_engine import transport
from pdcnno_jax.parallel.ssp import protocol
from pdcnno_jax.parallel.ssp import report as report_lib
from pdcnno_jax.parallel.ssp import serialization
from pdcnno_jax.parallel.ssp import steps as ssp_steps
from pdcnno_jax.parallel.ssp import worker_checkpoints
from pdcnno_jax.train import metrics as metrics_lib
from pdcnno_jax.train import sharding as sharding_lib
from pdcnno_jax.train import state as state_lib

# Restarts Ray grants a crashed worker or shard (each restart resumes; see the module docstring).
MAX_RESTARTS = 3
# In the workdir while a job runs: its shape, so that a rerun after the driver died resumes.
JOB_FILE = 'ssp_ray_job.json'


@dataclasses.dataclass(frozen=True)
class FaultPlan:
  """Test hook: which actors SIGKILL themselves (first incarnation only) and when.

  Attributes:
    worker_clock: {worker: clock after whose push it dies}.
    shard_pushes: {shard: pushes applied after which it dies}.
    driver_clock: every worker stops after pushing this clock; then the driver kills every
      actor and raises `DriverCrash`, as if it had died there (-1: never).
  """
  worker_clock: dict[int, int] = dataclasses.field(default_factory=dict)
  shard_pushes: dict[int, int] = dataclasses.field(default_factory=dict)
  driver_clock: int = -1


class DriverCrash(RuntimeError):
  """`FaultPlan.driver_clock`: the driver stopped the job the way its death would.

  Attributes:
    shards: every shard's `ps.ParameterShard.final` figures when the job stopped.
  """

  def __init__(self, message: str, shards: list[dict[str, Any]]):
    super().__init__(message)
    self.shards = shards


def _job_marker(exp: context.Experiment, total_steps: int, num_leaves: int) -> dict[str, Any]:
  parallel = exp.config.parallel
  return dict(num_workers=int(parallel.num_workers), ps_shards=int(parallel.ps_shards),
              total_steps=total_steps, num_leaves=num_leaves)


def _should_resume(exp: context.Experiment, marker: dict[str, Any]) -> bool:
  """Whether the workdir holds an unfinished Ray SSP job of the same shape (and snapshots)."""
  path = os.path.join(exp.workdir, JOB_FILE)
  if not os.path.exists(path):
    return False
  with open(path) as f:
    found = json.load(f)
  snapshots = all(os.path.exists(os.path.join(ps.snapshot_dir(exp.workdir, i), ps.SNAPSHOT_NAME))
                  for i in range(marker['ps_shards']))
  if found != marker or not snapshots:
    logging.warning('%s describes %s (now %s; all shard snapshots present: %s): starting SSP '
                    'afresh.', path, found, marker, snapshots)
    return False
  return True


def validate(config) -> None:
  """The Ray engine's SSP keys; a clear error naming the key otherwise."""
  parallel = config.parallel
  for key, low in (('num_workers', 1), ('ps_shards', 1), ('ps_snapshot_every_clocks', 0),
                   ('ray_worker_cpu_devices', 1)):
    if int(parallel[key]) < low:
      raise ValueError(f'config.parallel.{key}={parallel[key]} must be >= {low}.')
  batching.equal_batch_sizes(int(config.data.batch_size), int(parallel.num_workers))


@dataclasses.dataclass
class _Job:
  """The running job's actors, the leaf assignment and the object refs restarts need."""
  shards: list[Any]
  workers: list[Any]
  assignment: list[list[int]]
  resume: bool
  refs: list[Any]  # Held until the end: a restarted actor is rebuilt from these arguments.


def _start_actors(ray, exp: context.Experiment, host_state, tx, total_steps: int,
                  faults: FaultPlan) -> _Job:
  """The shards (holding the initial parameters) and the workers."""
  config, parallel = exp.config, exp.config.parallel
  leaves = [np.asarray(x) for x in jax.tree.leaves(host_state.params)]
  assignment = ps.split_by_bytes([x.nbytes for x in leaves], int(parallel.ps_shards))
  marker = _job_marker(exp, total_steps, len(leaves))
  resume = _should_resume(exp, marker)
  os.makedirs(exp.workdir, exist_ok=True)
  with open(os.path.join(exp.workdir, JOB_FILE), 'w') as f:
    json.dump(marker, f)
  staleness = protocol.normalise_staleness(parallel.staleness)
  shard_cls = ray.remote(ps.ParameterShard)
  leaf_refs = [ray.put([leaves[j] for j in indices]) for indices in assignment]
  shards = [
      shard_cls.options(num_cpus=1, max_restarts=MAX_RESTARTS, max_concurrency=1000).remote(
          i, leaf_refs[i], int(parallel.num_workers), staleness, exp.workdir,
          int(parallel.ps_snapshot_every_clocks), float(parallel.ssp_timeout_s),
          faults.shard_pushes.get(i, 0), resume, bool(parallel.ssp_shared_memory))
      for i in range(len(assignment))]
  train_only = dataclasses.replace(exp.dataset,
                                   host_splits={'train': exp.dataset.host_splits['train']})
  data_ref, state_ref = ray.put(train_only), ray.put(host_state)
  worker_cls = ray.remote(ssp_worker.SSPWorkerActor)
  workers = [
      worker_cls.options(**runtime.worker_options(config), max_restarts=MAX_RESTARTS,
                         max_task_retries=MAX_RESTARTS,
                         runtime_env={'env_vars': runtime.actor_env(config)}).remote(
          k, int(parallel.num_workers), config, exp.workdir, data_ref, exp.graphdef, tx,
          state_ref, shards, assignment, total_steps, faults.worker_clock.get(k, -1),
          faults.driver_clock, resume)
      for k in range(int(parallel.num_workers))]
  return _Job(shards, workers, assignment, resume, leaf_refs + [data_ref, state_ref])


def _wait(ray, workers: list[Any], shards: list[Any], faults: FaultPlan) -> list[dict[str, Any]]:
  """Every worker's result; `FaultPlan.driver_clock` stops the job there instead.

  The first worker that fails (e.g. a non-finite loss) raises here at once, while the others
  may still wait for its clocks.
  """
  ray.get([w.prepare.remote() for w in workers])  # Every step compiled: the clocks start now.
  runs = [w.run.remote() for w in workers]
  pending = list(runs)
  while pending:
    done, pending = ray.wait(pending, num_returns=1,
                             timeout=0.2 if faults.driver_clock >= 0 else None)
    ray.get(done)  # A worker that failed raises here.
    if faults.driver_clock >= 0 and pending:
      finals = ray.get([s.final.remote() for s in shards])
      if all(int(np.min(f['applied'])) == faults.driver_clock for f in finals):
        raise DriverCrash(f'FaultPlan.driver_clock={faults.driver_clock}', finals)
  return ray.get(runs)


def _job_report(exp: context.Experiment, results: list[dict[str, Any]],
                finals: list[dict[str, Any]], total_steps: int) -> dict[str, Any]:
  parallel = exp.config.parallel
  num_workers = int(parallel.num_workers)
  rows = [r['report'] for r in results]
  report = report_lib.job_report(rows, staleness=protocol.normalise_staleness(parallel.staleness),
                                 global_batch_size=int(exp.config.data.batch_size))
  report.update({
      'engine': 'ray',
      'batch_balancer': parallel.ssp_batch_balancer,
      'warmup_steps': int(parallel.ssp_warmup_steps),
      'batch_sizes': [r['batch_size'] for r in rows],
      'slowdown': [float(f) for f in slowdown_lib.parse_slowdown(parallel.slowdown,
                                                                  num_workers)],
      'straggler_probability': float(parallel.straggler_probability),
      'straggler_factor': float(parallel.straggler_factor),
      'clocks': total_steps,
      'final_state_from': 'the parameter server (parameters) and worker 0 (optimizer and '
                          'model state)',
      'transport': dict(transport.job_transport([r['transport'] for r in results]),
                        clocks=total_steps, wait_seconds=[r['wait_seconds'] for r in results]),
      'ps': [{key: f[key] for key in ('pushes', 'rung_pushes', 'duplicates', 'snapshots',
                                      'rejoins', 'restarted')}
             | {'applied': f['applied'].tolist(),
                'nbytes': serialization.payload_nbytes(f['leaves'])}
             for f in finals],
  })
  return report


def train(exp: context.Experiment, state: state_lib.TrainState, *, tx,
          faults: FaultPlan | None = None) -> tuple[state_lib.TrainState, dict[str, Any]]:
  """SSP training on Ray for ``config.num_epochs`` epochs (``config.max_steps`` caps clocks).

  Args:
    exp: the experiment.
    state: the starting `TrainState` (on ``exp.mesh``).
    tx: the optimizer whose state is ``state.opt_state``.
    faults: test hook (`FaultPlan`).

  Returns:
    ``(state, report)``: the final state replicated on ``exp.mesh`` and report.json's ``ssp``.

  Raises:
    ValueError: bad ``config.parallel`` keys.
    runtime.RayUnavailableError: Ray is missing or its cluster cannot be reached.
  """
  config = exp.config
  validate(config)
  ray = runtime.start(config)
  host_state = worker_checkpoints.to_host(jax.device_get(state))
  total_steps = exp.step_limit(int(round(config.num_epochs * exp.steps_per_epoch)))
  metrics_lib.log_line(
      f'[ssp/ray] {config.parallel.num_workers} workers, {config.parallel.ps_shards} PS shards, '
      f'staleness {config.parallel.staleness}, global batch {config.data.batch_size}, '
      f'{total_steps} clocks.')
  faults = faults or FaultPlan()
  job = _start_actors(ray, exp, host_state, tx, total_steps, faults)
  try:
    with exp.timer.phase('train'):
      results = _wait(ray, job.workers, job.shards, faults)
    finals = ray.get([s.final.remote() for s in job.shards])
  finally:
    try:
      ray.get([s.remove_shared_view.remote() for s in job.shards], timeout=30)
    except (ray.exceptions.RayError, TimeoutError) as e:
      logging.warning('Could not remove the shards\' shared-memory files: %s', e)
    for actor in job.workers + job.shards:
      ray.kill(actor, no_restart=True)
  os.remove(os.path.join(exp.workdir, JOB_FILE))
  leaves: list[Any] = [None] * sum(len(a) for a in job.assignment)
  for indices, final in zip(job.assignment, finals):
    for i, leaf in zip(indices, final['leaves']):
      leaves[i] = np.array(leaf)
  worker0 = results[0]['state']
  final_host = worker0.replace(params=jax.tree.unflatten(jax.tree.structure(worker0.params),
                                                         leaves))
  final_host = worker_checkpoints.from_host(final_host, jax.device_get(state))
  report = _job_report(exp, results, finals, total_steps)
  report['resumed'] = job.resume
  local_mesh = sharding_lib.make_mesh(placement.local_devices(exp.mesh))
  final_local = sharding_lib.replicate(final_host, local_mesh)
  snapshots = results[0]['snapshots'] + [
      (report['wall_s'], total_steps,
       (final_local.params, final_local.model_state))]
  report['accuracy_vs_time'] = ssp_steps.evaluate_snapshots(exp, local_mesh, final_local,
                                                            snapshots)
  moved = report['transport']
  metrics_lib.log_line(
      f'[ssp/ray] done: wall {report["wall_s"]:.1f}s, '
      f'{report["throughput_examples_per_s"]:.0f} examples/s, transport '
      f'{(moved["bytes_sent"] + moved["bytes_received"]) / 2**20:.1f} MiB in '
      f'{moved["transfer_seconds"]:.2f} s, waits {[round(w, 2) for w in report["wait_s"]]} s.')
  return placement.to_global(final_local, exp.mesh), report
