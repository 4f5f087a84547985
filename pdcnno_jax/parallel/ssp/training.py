"""SSP training: ``config.parallel.mode = 'ssp'``, one model replica per worker process.

Worker k at clock c (steps done) (1) pulls the other workers' updates (`protocol.SSPWorker.pull`):
it blocks until every live worker's updates through clock c - s - 1 are there and takes newer
ones already published (under BSP, s = 0, updates stamped c or later wait until step c + 1, so
step c sees exactly those through c - 1, as a synchronous step would); (2) takes one step of the
optimizer on its piece of global batch c and applies it to its own replica; (3) publishes
``delta_k = (b_k / B) u_k`` stamped (k, c), with u_k the optimizer's update and b_k its batch.
For optimizers linear in the gradients (SGD, momentum, Nesterov) the deltas of one clock sum to
one synchronous step on the global batch B, so s = 0 reproduces synchronous training step for
step (to float summation order) and ``learning_rate`` means the same in every mode.
Data: at clock c worker k reads its own consecutive piece of global batch c of the epoch's
permutation; pieces are equal, or proportional to speeds measured over the first
``ssp_warmup_steps`` clocks (``ssp_batch_balancer='proportional'``). `slowdown.Slowdown`
injects persistent and transient stragglers. After its last step every worker drains all
updates; worker 0 sends its final state so every process returns the same bits.
Checkpoints: each worker writes its own (`worker_checkpoints`) every ``checkpoint_every_steps``
clocks and acknowledges it; a restarted worker rejoins the running job from its newest one.

References:
  Ho et al., "More effective distributed ML via a stale synchronous parallel parameter
    server", NIPS 2013 (SSP, section 2).
  papers/delay_sync_parallel.txt: delay synchronization = SSP with threshold s.
  DESIGN.md, "SSP".
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from pdcnno_jax.data import input_pipeline
from pdcnno_jax.diagnostics import collapse
from pdcnno_jax.loop import batching
from pdcnno_jax.loop import checks
from pdcnno_jax.loop import context
from pdcnno_jax.loop import faults
from pdcnno_jax.loop import periodic
from pdcnno_jax.loop import placement
from pdcnno_jax.loop import windows
from pdcnno_jax.parallel import slowdown as slowdown_lib
from pdcnno_jax.parallel.ssp import protocol
from pdcnno_jax.parallel.ssp import report as report_lib
from pdcnno_jax.parallel.ssp import serialization
from pdcnno_jax.parallel.ssp import steps as ssp_steps
from pdcnno_jax.parallel.ssp import store as store_lib
from pdcnno_jax.parallel.ssp import worker_checkpoints as worker_ckpt
from pdcnno_jax.train import checkpointing
from pdcnno_jax.train import metrics as metrics_lib
from pdcnno_jax.train import sharding as sharding_lib
from pdcnno_jax.train import state as state_lib

MESH = 'local'  # Workers never meet in a collective: each trains on its own devices.
USES_CHECKPOINTER = False  # Per-worker checkpoints instead (a lone worker can rejoin).
RUN_ID = 'train'
BATCH_BALANCERS = ('equal', 'proportional')
_TRAIN_ROOT = 'pdcnno_ssp_train'


# ---------------------------------------------------------------------------------------
# The training loop.
# ---------------------------------------------------------------------------------------


def _key(run_id: str, *parts: Any) -> str:
  return '/'.join([_TRAIN_ROOT, run_id, *map(str, parts)])


def _default_store(num_workers: int) -> store_lib.Store:
  """JAX's coordination-service store in a multi-process job; in memory for one process."""
  if num_workers == 1:
    return store_lib.InMemoryStore()
  from pdcnno_jax.parallel.ssp import coordination  # pylint: disable=g-import-not-at-top
  return coordination.CoordinationStore()


def _max_abs_diff(a: Any, b: Any) -> float:
  return max((float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)) if np.size(x)),
             default=0.0)


@dataclasses.dataclass
class _Counters:
  """What one worker measures in its loop."""
  busy_s: float = 0.0
  examples: int = 0
  steps: int = 0
  applied_staleness: collections.Counter = dataclasses.field(
      default_factory=collections.Counter)
  warmup_step_s: list[float] = dataclasses.field(default_factory=list)


class Worker:
  """One process's SSP training machinery (data, compiled steps, slowdown, counters)."""

  def __init__(self, exp, tx, local_mesh: jax.sharding.Mesh, me: int, num_workers: int):
    config = exp.config
    self.exp = exp
    self.me = me
    self.num_workers = num_workers
    self.granularity = local_mesh.devices.size
    self.split = exp.dataset.host_splits['train']
    self.global_batch = int(config.data.batch_size)
    self.steps_per_epoch = input_pipeline.steps_per_epoch(exp.dataset, 'train',
                                                          self.global_batch)
    self.seed = int(config.seed)
    self.data_sharding = sharding_lib.batch_sharded(local_mesh)
    self.replicated = sharding_lib.replicated(local_mesh)
    self.step_fn = ssp_steps.make_ssp_train_step(exp.graphdef, tx, exp.preprocess, local_mesh)
    self.compiled: dict[int, Any] = {}
    self.slow = slowdown_lib.Slowdown.from_config(config.parallel, me, num_workers,
                                                  seed=config.seed)
    self.equal_sizes = batching.equal_batch_sizes(self.global_batch, num_workers,
                                                  self.granularity)
    self.balanced_sizes: np.ndarray | None = None
    self.counters = _Counters()
    self._order_epoch = -1
    self._order = None

  def sizes(self, clock: int, warmup_steps: int) -> np.ndarray:
    if self.balanced_sizes is not None and clock >= warmup_steps:
      return self.balanced_sizes
    return self.equal_sizes

  def batch(self, clock: int, sizes: np.ndarray) -> dict[str, jax.Array]:
    epoch, index = divmod(clock, self.steps_per_epoch)
    if epoch != self._order_epoch:
      self._order = input_pipeline.epoch_permutation(len(self.split.labels), self.seed, epoch)
      self._order_epoch = epoch
    rows = batching.worker_rows(self._order, index, sizes, self.me)
    return jax.device_put({'image': self.split.images[rows], 'label': self.split.labels[rows]},
                          self.data_sharding)

  def compile_for(self, state, batch, weight) -> Any:
    """The step compiled for this batch shape (compiled once, on first use of the shape)."""
    size = int(batch['label'].shape[0])
    if size not in self.compiled:
      with self.exp.timer.phase('compile'):
        self.compiled[size] = self.step_fn.lower(state, batch, weight).compile()
    return self.compiled[size]


def _rendezvous(store: store_lib.Store, run_id: str, me: int, num_workers: int,
                timeout_s: float) -> None:
  """Every worker waits until all have compiled, so the clocks start together.

  A worker that restarts into a running job finds the start key and goes straight on.
  """
  store.set(_key(run_id, 'ready', me), b'1', overwrite=True)
  if me == 0:
    deadline = time.monotonic() + timeout_s
    while len(store.dir_get(_key(run_id, 'ready'))) < num_workers:
      if time.monotonic() > deadline:
        raise protocol.SSPTimeoutError(
            f'SSP start: only {len(store.dir_get(_key(run_id, "ready")))} of {num_workers} '
            f'workers were ready after {timeout_s:.3g} s (config.parallel.ssp_timeout_s).')
      time.sleep(0.02)
    store.set(_key(run_id, 'start'), b'1', overwrite=True)
  else:
    store.get(_key(run_id, 'start'), timeout_s)


def _balance_batches(worker: Worker, store: store_lib.Store, run_id: str,
                     timeout_s: float) -> np.ndarray:
  """Publishes this worker's warm-up speed; returns the proportional sizes from all speeds."""
  key = _key(run_id, 'speed', worker.me)
  if store.try_get(key) is None:  # A restarted worker keeps the speed it published.
    # Median step time: robust to the odd step that a busy host descheduled.
    step_s = np.median(worker.counters.warmup_step_s or [1.0])
    speed = worker.equal_sizes[worker.me] / max(float(step_s), 1e-9)
    store.set(key, json.dumps(speed).encode())
  speeds = [float(json.loads(store.get(_key(run_id, 'speed', k), timeout_s)))
            for k in range(worker.num_workers)]
  return batching.proportional_batch_sizes(worker.global_batch, np.asarray(speeds),
                                           worker.granularity)


def validate(config: ml_collections.ConfigDict, dataset: input_pipeline.Dataset) -> None:
  """SSP needs an in-memory data set (each worker reads its own rows) and sane SSP keys."""
  parallel = config.parallel
  if not dataset.in_memory:
    raise ValueError(
        f'parallel.mode=ssp needs an in-memory data set (each worker reads its own rows); '
        f'{dataset.name} is streamed. Set config.data.in_memory=True or use parallel.mode='
        "'sync'.")
  if parallel.ssp_batch_balancer not in BATCH_BALANCERS:
    raise ValueError(f'config.parallel.ssp_batch_balancer={parallel.ssp_batch_balancer!r}; '
                     f'use one of {BATCH_BALANCERS}.')
  if int(parallel.ssp_warmup_steps) < 2:
    raise ValueError(f'config.parallel.ssp_warmup_steps={parallel.ssp_warmup_steps} must be '
                     '>= 2 (speeds are measured on clocks 1 .. warmup - 1; clock 0 may include '
                     'first-touch costs).')
  if int(parallel.ssp_eval_every_steps) < 0:
    raise ValueError(f'config.parallel.ssp_eval_every_steps={parallel.ssp_eval_every_steps} '
                     'must be >= 0 (0: at the end of every eval_every_epochs epochs).')
  if parallel.engine == 'ray':
    from pdcnno_jax.parallel.ray_engine import ssp_driver  # pylint: disable=g-import-not-at-top
    ssp_driver.validate(config)


@dataclasses.dataclass
class _Run:
  """What one worker's training loop carries from clock to clock."""
  exp: context.Experiment
  worker: Worker
  ssp: protocol.SSPWorker
  store: store_lib.Store
  run_id: str
  total_steps: int
  eval_every: int
  worker_checkpoints: bool
  local: state_lib.TrainState
  first_clock: int = 0
  pending: list[protocol.Update] = dataclasses.field(default_factory=list)
  snapshots: list[tuple[float, int, Any]] = dataclasses.field(default_factory=list)
  window: windows.MetricWindow = dataclasses.field(default_factory=windows.MetricWindow)
  watch: checks.CollapseWatch | None = None
  loop_start: float = 0.0

  @property
  def parallel(self) -> ml_collections.ConfigDict:
    return self.exp.config.parallel

  @property
  def timeout_s(self) -> float:
    return float(self.parallel.ssp_timeout_s)

  @property
  def proportional(self) -> bool:
    return self.parallel.ssp_batch_balancer == 'proportional'


def _checkpointed_start(run: _Run) -> dict[str, np.ndarray]:
  """Loads this worker's newest checkpoint into ``run.local`` on a rejoin; its SSP state."""
  worker, ssp = run.worker, run.ssp
  ckpt_dir = worker_ckpt.worker_checkpoint_dir(run.exp.workdir, worker.me)
  restored = (worker_ckpt.load_worker_checkpoint(ckpt_dir, run.local)
              if run.worker_checkpoints else None)
  if restored is not None and ssp.published_clock() < 0:
    logging.warning('SSP worker %d: the store holds no clock of this worker, so this is a new '
                    'job, not a rejoin; its checkpoints in %s have no consistent cut with the '
                    "other workers'. Starting SSP training from the experiment's starting state.",
                    worker.me, ckpt_dir)
    for path in worker_ckpt.list_worker_checkpoints(ckpt_dir):
      os.remove(path)
    restored = None
  if restored is None:  # A worker killed before its first checkpoint rejoins from the start.
    return {'next_clock': np.asarray(0, np.int64),
            'applied': np.full(worker.num_workers, -1, np.int64)}
  host_state, ssp_state = restored
  run.local = placement.to_local(host_state, worker.replicated, copy=True)
  return ssp_state


def _join(run: _Run) -> None:
  """Joins the job (fresh or rejoining), compiles the step and waits for every worker."""
  worker, ssp = run.worker, run.ssp
  joined = ssp.join(_checkpointed_start(run))
  run.first_clock = joined.next_clock
  if joined.updates:
    run.local = ssp_steps.add_to_params(run.local, protocol.sum_updates(joined.updates))
    run.local = run.local.replace(step=run.local.step + len(joined.updates))
  warmup_steps = int(run.parallel.ssp_warmup_steps)
  if run.first_clock > warmup_steps and run.proportional:
    worker.balanced_sizes = _balance_batches(worker, run.store, run.run_id, run.timeout_s)
  sizes = worker.sizes(run.first_clock, warmup_steps)
  weight = jnp.asarray(sizes[worker.me] / worker.global_batch, jnp.float32)
  scratch = jax.tree.map(jnp.copy, run.local)
  worker.compile_for(scratch, worker.batch(min(run.first_clock, run.total_steps - 1), sizes),
                     weight)
  del scratch
  _rendezvous(run.store, run.run_id, worker.me, worker.num_workers, run.timeout_s)
  staleness = ssp.staleness
  metrics_lib.log_line(
      f'[ssp] {worker.num_workers} workers, staleness '
      f'{"inf" if staleness is None else staleness}, global batch {worker.global_batch} '
      f'({run.parallel.ssp_batch_balancer} per-worker batches, {sizes.tolist()} now), '
      f'{run.total_steps} clocks, slowdown {worker.slow.factor:g} / transient p='
      f'{worker.slow.straggler_probability:g} x{worker.slow.straggler_factor:g}; worker '
      f'{worker.me} starts at clock {run.first_clock}.')


def _apply_visible_updates(run: _Run, clock: int) -> None:
  """Pulls under the SSP rule and applies what step ``clock`` may see."""
  run.pending.extend(run.ssp.pull(clock))
  # BSP: exactly the updates through clock - 1 (a faster worker's clock-c update waits).
  visible = clock - 1 if run.ssp.staleness == 0 else math.inf
  ready = [u for u in run.pending if u.clock <= visible]
  run.pending = [u for u in run.pending if u.clock > visible]
  if ready:
    run.local = ssp_steps.add_to_params(run.local, protocol.sum_updates(ready))
    for u in ready:
      run.worker.counters.applied_staleness[clock - 1 - u.clock] += 1


def _train_clock(run: _Run, clock: int) -> None:
  """One clock: pull and apply, one local step, publish the delta."""
  worker, exp = run.worker, run.exp
  _apply_visible_updates(run, clock)
  warmup_steps = int(run.parallel.ssp_warmup_steps)
  if clock == warmup_steps and run.proportional:
    worker.balanced_sizes = _balance_batches(worker, run.store, run.run_id, run.timeout_s)
  sizes = worker.sizes(clock, warmup_steps)
  weight = jnp.asarray(sizes[worker.me] / worker.global_batch, jnp.float32)
  batch = worker.batch(clock, sizes)
  compiled = worker.compile_for(run.local, batch, weight)
  with exp.timer.phase('train'):
    (run.local, delta, step_metrics), seconds = worker.slow.run(compiled, run.local, batch,
                                                                weight)
  run.ssp.publish(clock, jax.device_get(delta))
  faults.maybe_kill(faults.SSP_CLOCK_ENV, clock)
  c = worker.counters
  c.busy_s += seconds
  c.examples += int(sizes[worker.me])
  c.steps += 1
  if 0 < clock < warmup_steps:  # Clock 0 may include first-touch costs.
    c.warmup_step_s.append(seconds)
  run.window.add(step_metrics)


def _after_clock(run: _Run, done: int) -> None:
  """Snapshot for accuracy vs time, log line and loss check, worker checkpoint."""
  exp, worker, ssp = run.exp, run.worker, run.ssp
  config = exp.config
  if worker.me == 0 and periodic.every(done, run.eval_every) and done < run.total_steps:
    run.snapshots.append((time.perf_counter() - run.loop_start, done,
                          jax.device_get((run.local.params, run.local.model_state))))
  if periodic.every(done, config.log_every_steps, run.total_steps):
    window_steps = len(run.window)
    mean = run.window.mean()
    if not math.isfinite(mean['loss']):
      ssp.abandon()
    checks.check_finite_loss(mean['loss'], where=f'SSP worker {worker.me} clock {done}',
                             last_good=None, workdir=exp.workdir)
    try:
      run.watch.observe(mean['loss'], mean['accuracy'], first_step=done - window_steps,
                        step=done, examples=window_steps * worker.global_batch,
                        epoch=done // worker.steps_per_epoch, last_good=None)
    except collapse.TrainingCollapseError:
      ssp.abandon()
      raise
    stats = ssp.stats()
    elapsed = max(time.perf_counter() - run.loop_start, 1e-9)
    metrics_lib.log_line(
        f'[ssp] worker 0 clock {done}/{run.total_steps} loss={mean["loss"]:.4f} '
        f'accuracy={mean["accuracy"]:.4f} wait={stats.wait_s:.2f}s '
        f'steps/s={(done - run.first_clock) / elapsed:.2f}')
    if exp.writer:
      exp.writer.write(done, {**mean, 'wait_s': stats.wait_s}, prefix='ssp')
  if run.worker_checkpoints and periodic.every(done, config.checkpoint_every_steps, last=False):
    with exp.timer.phase('checkpoint'):
      if checkpointing.is_finite(run.local.params):
        worker_ckpt.save_worker_checkpoint(
            worker_ckpt.worker_checkpoint_dir(exp.workdir, worker.me), done, run.local,
            ssp.state())
        ssp.commit()


def _finish(run: _Run, loop_s: float) -> tuple[Any, list[dict[str, Any]], list[float], float]:
  """Drains every update, exchanges reports and worker 0's final state through the store.

  Returns:
    ``(final host state, per-worker report rows, per-worker max |difference| of the drained
    parameters from worker 0's, time the drain ended)``.
  """
  worker, store, run_id, timeout_s = run.worker, run.store, run.run_id, run.timeout_s
  me, num_workers = worker.me, worker.num_workers
  rest = run.ssp.drain(run.total_steps - 1) + run.pending
  if rest:
    run.local = ssp_steps.add_to_params(run.local, protocol.sum_updates(rest))
  drained = worker_ckpt.to_host(run.local)
  store.set(_key(run_id, 'report', me),
            json.dumps(worker_report(worker, run.ssp, loop_s, run.first_clock)).encode(),
            overwrite=True)
  if me == 0:
    store.set(_key(run_id, 'final'), serialization.encode(drained), overwrite=True)
    final = drained
  else:
    final = serialization.decode(store.get(_key(run_id, 'final'), timeout_s), like=drained)
  diff = _max_abs_diff(drained.params, final.params)
  store.set(_key(run_id, 'diff', me), json.dumps(diff).encode(), overwrite=True)
  rows = [json.loads(store.get(_key(run_id, 'report', k), timeout_s))
          for k in range(num_workers)]
  diffs = [float(json.loads(store.get(_key(run_id, 'diff', k), timeout_s)))
           for k in range(num_workers)]
  run.ssp.close()
  drain_end = time.perf_counter()
  if me == 0:
    store.delete(f'{_TRAIN_ROOT}/{run_id}')
  return final, rows, diffs, drain_end


def _job_report(run: _Run, rows: list[dict[str, Any]], diffs: list[float]) -> dict[str, Any]:
  parallel, worker = run.parallel, run.worker
  report = report_lib.job_report(rows, staleness=run.ssp.staleness,
                                 global_batch_size=worker.global_batch)
  report.update({
      'batch_balancer': parallel.ssp_batch_balancer,
      'warmup_steps': int(parallel.ssp_warmup_steps),
      'batch_sizes': [r['batch_size'] for r in rows],
      'slowdown': [float(f) for f in slowdown_lib.parse_slowdown(parallel.slowdown,
                                                                  worker.num_workers)],
      'straggler_probability': float(parallel.straggler_probability),
      'straggler_factor': float(parallel.straggler_factor),
      'clocks': run.total_steps,
      'final_params_max_abs_diff': diffs,
      'final_state_from': 'worker 0 (after drain every worker holds the initial parameters '
                          'plus every update; worker 0 sends its state so all are bitwise '
                          'equal)',
  })
  return report


def train(exp: context.Experiment, state: state_lib.TrainState, *, tx,
          checkpointer: checkpointing.Checkpointer | None = None,
          worker_checkpoints: bool = True, store: store_lib.Store | None = None,
          run_id: str = RUN_ID) -> tuple[state_lib.TrainState, dict[str, Any]]:
  """SSP training for ``config.num_epochs`` epochs (see the module docstring).

  Every process of the job calls this; the processes never meet in a collective, only
  through the store. ``config.max_steps`` caps the clocks. With ``parallel.engine = 'ray'``
  this one process drives the job on Ray instead (`ray_engine.ssp_driver.train`); the
  arguments after ``checkpointer`` are the jax engine's.

  Args:
    exp: the experiment (config, workdir, dataset, mesh, preprocess, graphdef, timer, writer).
    state: the starting `TrainState` (the same on every process).
    tx: the optimizer whose state is ``state.opt_state``.
    checkpointer: must be None: SSP keeps per-worker checkpoints (`USES_CHECKPOINTER`).
    worker_checkpoints: each worker checkpoints its replica every
      ``checkpoint_every_steps`` clocks under ``<workdir>/ssp_worker_<k>/`` and rejoins from
      there after a restart.
    store: the key-value store; default: JAX's coordination service (multi-process job) or
      an in-memory store (one process).
    run_id: namespace of this run's keys; consecutive runs in one job need distinct ids.

  Returns:
    ``(state, report)``: worker 0's final state (every worker holds the same), replicated on
    ``exp.mesh``, and the JSON-able report.

  Raises:
    ValueError: a streamed data set or bad ``config.parallel`` SSP settings.
    protocol.SSPTimeoutError: a live worker's required update, the start or the end of the
      job did not arrive within ``parallel.ssp_timeout_s``.
    checks.NonFiniteLossError: the training loss became NaN/inf.
  """
  if checkpointer is not None:
    raise ValueError('SSP training keeps per-worker checkpoints; pass checkpointer=None.')
  config = exp.config
  if config.parallel.engine == 'ray':
    validate(config, exp.dataset)
    if store is not None:
      raise ValueError('A store is for parallel.engine=jax; the Ray engine moves updates '
                       'through its parameter-server actors. Set config.parallel.engine=jax.')
    if jax.process_count() > 1:
      raise ValueError(
          'config.parallel.engine=ray runs SSP from one driver process that starts '
          f'parallel.num_workers actors, but this job has {jax.process_count()} processes: '
          'drop the launcher / --num_processes, or set --config.parallel.engine=jax.')
    from pdcnno_jax.parallel.ray_engine import ssp_driver  # pylint: disable=g-import-not-at-top
    return ssp_driver.train(exp, state, tx=tx)
  validate(config, exp.dataset)
  parallel = config.parallel
  num_workers, me = jax.process_count(), jax.process_index()
  store = _default_store(num_workers) if store is None else store
  local_mesh = sharding_lib.make_mesh(placement.local_devices(exp.mesh))
  worker = Worker(exp, tx, local_mesh, me, num_workers)
  local = placement.to_local(state, worker.replicated, copy=True)
  ssp = protocol.SSPWorker(
      store, me, num_workers, parallel.staleness, float(parallel.ssp_timeout_s),
      run_id=run_id, like=jax.device_get(local.params),
      heartbeat_timeout_s=float(parallel.heartbeat_timeout_s),
      commit_on_pull=not worker_checkpoints)
  eval_every = (int(parallel.ssp_eval_every_steps)
                or max(1, int(config.eval_every_epochs) * worker.steps_per_epoch))
  run = _Run(exp=exp, worker=worker, ssp=ssp, store=store, run_id=run_id,
             total_steps=exp.step_limit(int(round(config.num_epochs * worker.steps_per_epoch))),
             eval_every=eval_every, worker_checkpoints=worker_checkpoints, local=local)
  run.watch = checks.CollapseWatch(
      exp, examples_per_epoch=worker.steps_per_epoch * worker.global_batch,
      warmup_steps=checks.warmup_steps(config, worker.steps_per_epoch), phase='ssp')
  _join(run)
  run.loop_start = time.perf_counter()
  for clock in range(run.first_clock, run.total_steps):
    _train_clock(run, clock)
    _after_clock(run, clock + 1)
  loop_s = time.perf_counter() - run.loop_start
  with exp.timer.phase('ssp_drain'):
    final, rows, diffs, drain_end = _finish(run, loop_s)
  report = _job_report(run, rows, diffs)
  final_local = placement.to_local(worker_ckpt.from_host(final, run.local),
                                   worker.replicated, copy=True)
  if me == 0:  # The last point is the final state, after the drain.
    run.snapshots.append((drain_end - run.loop_start, run.total_steps,
                          (final_local.params, final_local.model_state)))
    report['accuracy_vs_time'] = ssp_steps.evaluate_snapshots(exp, local_mesh, final_local,
                                                     run.snapshots)
  metrics_lib.log_line(
      f'[ssp] done: wall {report["wall_s"]:.1f}s, {report["throughput_examples_per_s"]:.0f} '
      f'examples/s, waits {[round(w, 2) for w in report["wait_s"]]} s, applied staleness '
      f'{report["applied_staleness_histogram"]}, coordination '
      f'{100 * report["coordination_fraction"]:.1f}% of a step.')
  return placement.to_global(final_local, exp.mesh), report


def worker_report(worker: Worker, ssp: protocol.SSPWorker, loop_s: float,
                   first_clock: int) -> dict[str, Any]:
  stats = ssp.stats().as_dict()
  c = worker.counters
  return {
      'worker': worker.me,
      'first_clock': first_clock,
      'clock': stats['clock'],
      'steps': c.steps,
      'examples': c.examples,
      'batch_size': int(worker.sizes(stats['clock'], 0)[worker.me]),
      'loop_s': loop_s,
      'busy_s': c.busy_s,
      'slept_s': worker.slow.slept_s,
      'transient_steps': worker.slow.transient_steps,
      'examples_per_s': c.examples / loop_s if loop_s > 0 else float('nan'),
      'steps_per_s': c.steps / loop_s if loop_s > 0 else float('nan'),
      'wait_s': stats['wait_s'],
      'blocked_pulls': stats['blocked_pulls'],
      'pull_s': stats['pull_s'],
      'publish_s': stats['publish_s'],
      'encode_s': stats['encode_s'],
      'decode_s': stats['decode_s'],
      'bytes_published': stats['bytes_published'],
      'payload_bytes': stats['bytes_published'] // max(c.steps, 1),
      'bytes_received': stats['bytes_received'],
      'applied_staleness': {k: c.applied_staleness[k] for k in sorted(c.applied_staleness)},
      'view_staleness': stats['view_staleness'],
      'update_age_at_pull': stats['update_age'],
      'dropped': stats['dropped'],
      'gc_deleted': stats['gc_deleted'],
  }
