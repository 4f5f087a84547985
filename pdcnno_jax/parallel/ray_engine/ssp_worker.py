"""One SSP worker as a Ray actor: its own JAX, its piece of every global batch, its clocks.

Worker k at clock c trains one step on the parameters the server returned for clock c (they hold
every update through c - s - 1, its own through c - 1) and pushes ``delta_k = (b_k / B) u_k``
(`ssp.steps.ssp_train_step`); `ps_client.ClockPipeline` pushes it and reads the parameters for
clock c + 1 through shared memory where every shard runs on this worker's node
(``parallel.ssp_shared_memory``), else in one call, or, under s >= 1 (and ASP), with the read
prefetched during the step (``parallel.ssp_prefetch``). Batches are its consecutive piece of
global batch c of the epoch's permutation, equal or proportional to the speeds measured over the
first ``ssp_warmup_steps`` clocks; `slowdown.Slowdown` injects stragglers. The driver has every
worker compile its step (`prepare`) before any clock starts, so the clocks of all workers start
together and no clock's time holds a compilation. Every ``checkpoint_every_steps`` clocks it
writes its optimizer and model state to ``<workdir>/ssp_worker_<k>/``; restarted by Ray after a
crash it loads the newest one and goes on after the last clock every shard applied, so none of
its clocks is applied twice.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from typing import Any, Sequence

import ml_collections
import numpy as np


class SSPWorkerActor:
  """Worker ``me`` of ``num_workers`` (`ray.remote` wraps it; all JAX work happens in here).

  Args:
    me: this worker's index.
    num_workers: workers in the job.
    config: the experiment config.
    workdir: the run's directory.
    dataset: the data set (its training split; arrays read zero-copy from the object store).
    graphdef: the model's graphdef.
    tx: the optimizer.
    host_state: the starting `TrainState` as host arrays.
    shards: the parameter-server shard handles.
    assignment: leaf indices of each shard.
    total_steps: clocks of the run.
    kill_at_clock: test hook: the first incarnation SIGKILLs itself after pushing this clock
      (-1: never).
    hold_at_clock: test hook: the worker stops after pushing this clock until it is killed
      (-1: never), so that a test can stop the whole job at a known point.
    resume: rejoin the server's clocks from the workdir (a rerun after the driver died), as
      an actor that Ray restarts always does.
  """

  def __init__(self, me: int, num_workers: int, config: ml_collections.ConfigDict,
               workdir: str, dataset: Any, graphdef: Any, tx: Any, host_state: Any,
               shards: Sequence[Any], assignment: Sequence[Sequence[int]], total_steps: int,
               kill_at_clock: int = -1, hold_at_clock: int = -1, resume: bool = False):
    import jax  # pylint: disable=g-import-not-at-top
    import ray  # pylint: disable=g-import-not-at-top
    from pdcnno_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    from pdcnno_jax.loop import batching  # pylint: disable=g-import-not-at-top
    from pdcnno_jax.parallel import slowdown  # pylint: disable=g-import-not-at-top
    from pdcnno_jax.parallel.ray_engine import ps_client  # pylint: disable=g-import-not-at-top
    from pdcnno_jax.parallel.ssp import protocol  # pylint: disable=g-import-not-at-top
    from pdcnno_jax.parallel.ssp import steps as ssp_steps  # pylint: disable=g-import-not-at-top
    from pdcnno_jax.train import sharding  # pylint: disable=g-import-not-at-top
    self.me, self.num_workers, self.config, self.workdir = me, num_workers, config, workdir
    self.restarted = ray.get_runtime_context().was_current_actor_reconstructed
    self.kill_at_clock = -1 if self.restarted else int(kill_at_clock)
    self.hold_at_clock = int(hold_at_clock)
    self.resume = self.restarted or resume
    self.split = dataset.host_splits['train']
    self.global_batch = int(config.data.batch_size)
    self.steps_per_epoch = input_pipeline.steps_per_epoch(dataset, 'train', self.global_batch)
    self.total_steps = int(total_steps)
    mesh = sharding.make_mesh(jax.local_devices())
    self.granularity = mesh.devices.size
    self.data_sharding = sharding.batch_sharded(mesh)
    self.replicated = sharding.replicated(mesh)
    preprocess = functools.partial(input_pipeline.normalize, dataset=dataset)
    self.step_fn = ssp_steps.make_ssp_train_step(graphdef, tx, preprocess, mesh)
    self.host_state = host_state
    self.treedef = jax.tree.structure(host_state.params)
    self.staleness = protocol.normalise_staleness(config.parallel.staleness)
    self.client = ps_client.PSClient(shards, assignment, me, self.staleness,
                                     float(config.parallel.ssp_timeout_s))
    shared = bool(config.parallel.ssp_shared_memory) and self.client.attach_shared()
    self.pipeline = ps_client.ClockPipeline(
        self.client, self.total_steps,
        prefetch=self.staleness != 0 and bool(config.parallel.ssp_prefetch), shared=shared)
    self.shard0 = shards[0]
    self.slow = slowdown.Slowdown.from_config(config.parallel, me, num_workers, seed=config.seed)
    self.sizes = batching.equal_batch_sizes(self.global_batch, num_workers, self.granularity)
    self.checkpoint_dir = os.path.join(workdir, f'ssp_worker_{me}')
    self.num_classes = dataset.num_classes
    self._order_epoch, self._order = -1, None
    self._compiled: dict[int, tuple[Any, Any]] = {}  # Batch size -> (step, weight).
    self.compile_s = 0.0

  def _batch(self, clock: int) -> dict[str, Any]:
    import jax  # pylint: disable=g-import-not-at-top
    from pdcnno_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    from pdcnno_jax.loop import batching  # pylint: disable=g-import-not-at-top
    epoch, index = divmod(clock, self.steps_per_epoch)
    if epoch != self._order_epoch:
      self._order = input_pipeline.epoch_permutation(len(self.split.labels),
                                                     int(self.config.seed), epoch)
      self._order_epoch = epoch
    rows = batching.worker_rows(self._order, index, self.sizes, self.me)
    return jax.device_put({'image': self.split.images[rows], 'label': self.split.labels[rows]},
                          self.data_sharding)

  def _step_for(self, size: int, state: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """The step compiled for a batch of ``size`` examples and its weight b_k / B (cached)."""
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    if size not in self._compiled:
      start = time.perf_counter()
      weight = jnp.asarray(size / self.global_batch, jnp.float32)
      self._compiled[size] = (self.step_fn.lower(state, batch, weight).compile(), weight)
      self.compile_s += time.perf_counter() - start
    return self._compiled[size]

  def _compile_ahead(self, state: Any, clock: int) -> None:
    """Compiles the step for this worker's batch size now, unless it is compiled already."""
    size = int(self.sizes[self.me])
    if size not in self._compiled:
      self._step_for(size, state, self._batch(clock))

  def _balance(self, warmup_step_s: list[float]) -> None:
    """Proportional batches from every worker's median warm-up speed (kept by shard 0)."""
    import ray  # pylint: disable=g-import-not-at-top
    from pdcnno_jax.loop import batching  # pylint: disable=g-import-not-at-top
    step_s = float(np.median(warmup_step_s or [1.0]))
    speed = float(self.sizes[self.me]) / max(step_s, 1e-9)
    speeds = ray.get(self.shard0.exchange_speed.remote(self.me, speed))
    self.sizes = batching.proportional_batch_sizes(self.global_batch, np.asarray(speeds),
                                                   self.granularity)

  def _start(self) -> tuple[Any, int]:
    """The state to train from and the first clock: a restart resumes after its last push."""
    from pdcnno_jax.loop import placement  # pylint: disable=g-import-not-at-top
    from pdcnno_jax.parallel.ssp import worker_checkpoints  # pylint: disable=g-import-not-at-top
    state = self.host_state
    if not self.resume:
      for path in worker_checkpoints.list_worker_checkpoints(self.checkpoint_dir):
        os.remove(path)  # A previous job's: no consistent cut with this one's server.
      return placement.to_local(state, self.replicated, copy=True), 0
    restored = worker_checkpoints.load_worker_checkpoint(self.checkpoint_dir, state)
    if restored is not None:
      state = restored[0]
    first = self.client.applied_clock() + 1
    state = state.replace(step=np.asarray(first, np.asarray(state.step).dtype))
    return placement.to_local(state, self.replicated, copy=True), first

  def prepare(self) -> None:
    """Compiles the step for this worker's batch, so that the job's clocks start together.

    The driver waits for every worker's `prepare` before it starts any `run`: a worker that
    compiled first would otherwise spend the others' compilation time waiting in its first
    clocks, and the job's times would count it.
    """
    from pdcnno_jax.loop import placement  # pylint: disable=g-import-not-at-top
    self._compile_ahead(placement.to_local(self.host_state, self.replicated, copy=True), 0)

  def run(self) -> dict[str, Any]:
    """Trains clocks until ``total_steps``; this worker's report (worker 0: its state too)."""
    import jax  # pylint: disable=g-import-not-at-top
    from pdcnno_jax.parallel.ssp import worker_checkpoints  # pylint: disable=g-import-not-at-top
    from pdcnno_jax.loop import checks  # pylint: disable=g-import-not-at-top
    from pdcnno_jax.train import checkpointing  # pylint: disable=g-import-not-at-top
    from pdcnno_jax.train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
    config, parallel = self.config, self.config.parallel
    state, first = self._start()
    warmup = int(parallel.ssp_warmup_steps)
    proportional = parallel.ssp_batch_balancer == 'proportional'
    if proportional and first > warmup:
      self._balance([])  # Shard 0 kept every speed: this only reads them back.
    eval_every = (int(parallel.ssp_eval_every_steps)
                  or max(1, int(config.eval_every_epochs) * self.steps_per_epoch))
    warmup_step_s, snapshots, losses, accuracies = [], [], [], []
    # Clocks count as examples of the global batch: a collapse is a whole epoch of clocks at
    # the class prior, whatever this worker's share of each batch.
    watch = checks.CollapseWatch(
        config.diagnostics, self.num_classes, self.checkpoint_dir,
        examples_per_epoch=self.steps_per_epoch * self.global_batch,
        warmup_steps=checks.warmup_steps(config, self.steps_per_epoch),
        phase=f'SSP worker {self.me}')
    busy_s, examples, steps, saved = 0.0, 0, 0, None
    # Clock 0 trains on the starting parameters: a read could already hold a faster worker's
    # clock 0, which BSP must not see.
    if first < self.total_steps:
      # Compiled before the clocks start (already, after `prepare`), so that the run's times
      # are its clocks' alone; a batch size the balancer picks later compiles when it comes.
      self._compile_ahead(state, first)
      fresh = first == 0 and not self.resume
      leaves = self.pipeline.begin(first, jax.tree.leaves(self.host_state.params)
                                   if fresh else None)
    loop_start, window_start = time.perf_counter(), first
    for clock in range(first, self.total_steps):
      if proportional and clock == warmup:
        self._balance(warmup_step_s)
      # One transfer of every leaf (not one per leaf, which cost ~5 ms a clock for LeNet-5).
      state = state.replace(params=jax.device_put(jax.tree.unflatten(self.treedef, leaves),
                                                  self.replicated))
      batch = self._batch(clock)
      size = int(self.sizes[self.me])
      step, weight = self._step_for(size, state, batch)
      (state, delta, metrics), seconds = self.slow.run(step, state, batch, weight)
      delta = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(delta))]
      leaves = self.pipeline.advance(clock, delta)
      if clock in (self.kill_at_clock, self.hold_at_clock):
        self.pipeline.drain()  # Its push is applied before the hook acts.
      if clock == self.kill_at_clock:
        os.kill(os.getpid(), signal.SIGKILL)
      while clock == self.hold_at_clock:
        time.sleep(1.0)
      busy_s, examples, steps = busy_s + seconds, examples + size, steps + 1
      loss, accuracy = jax.device_get((metrics['loss'], metrics['accuracy']))  # One transfer.
      losses.append(float(loss))
      accuracies.append(float(accuracy))
      if 0 < clock < warmup:
        warmup_step_s.append(seconds)
      done = clock + 1
      if self.me == 0 and done % eval_every == 0 and done < self.total_steps:
        snapshots.append((time.perf_counter() - loop_start, done,
                          jax.device_get((state.params, state.model_state))))
      if config.checkpoint_every_steps and done % config.checkpoint_every_steps == 0:
        if checkpointing.is_finite(state.params):
          saved = done
          worker_checkpoints.save_worker_checkpoint(
              self.checkpoint_dir, done, state,
              {'next_clock': np.asarray(done, np.int64),
               'applied': np.full(self.num_workers, -1, np.int64)})
      if done % int(config.log_every_steps) == 0 or done == self.total_steps:
        clocks, window_start = done - window_start, done
        window = float(np.mean(losses[-clocks:]))
        metrics_lib.log_line(f'[ssp/ray] worker {self.me} clock {done}/{self.total_steps} '
                             f'loss={window:.4f}')
        checks.check_finite_loss(window, where=f'clock {done} of SSP worker {self.me}',
                                 last_good=saved, workdir=self.checkpoint_dir)
        watch.observe(window, float(np.mean(accuracies[-clocks:])), first_step=done - clocks,
                      step=done, examples=clocks * self.global_batch,
                      epoch=clock // self.steps_per_epoch, last_good=saved)
    loop_s = time.perf_counter() - loop_start
    report = self._report(first, steps, examples, busy_s, loop_s)
    final = worker_checkpoints.to_host(state) if self.me == 0 else None
    return dict(report=report, transport=self.client.log, wait_seconds=self.client.wait_seconds,
                losses=losses, state=final, snapshots=snapshots)

  def _report(self, first: int, steps: int, examples: int, busy_s: float,
              loop_s: float) -> dict[str, Any]:
    """The per-worker row of report.json's ``ssp.per_worker`` (`ssp.report.job_report`)."""
    client = self.client
    log = client.log
    waited = float(sum(client.wait_seconds))
    return {
        'worker': self.me, 'devices': self.granularity, 'first_clock': first,
        'clock': self.total_steps, 'steps': steps,
        'restarted': bool(self.restarted), 'resumed': bool(self.resume), 'examples': examples,
        'batch_size': int(self.sizes[self.me]), 'loop_s': loop_s, 'busy_s': busy_s,
        'slept_s': self.slow.slept_s, 'transient_steps': self.slow.transient_steps,
        'compile_s': self.compile_s,
        'examples_per_s': examples / loop_s if loop_s > 0 else float('nan'),
        'steps_per_s': steps / loop_s if loop_s > 0 else float('nan'),
        'wait_s': waited, 'blocked_pulls': int(sum(w > 0 for w in client.wait_seconds)),
        'pull_s': log.transfer_seconds + waited, 'publish_s': 0.0,
        'bytes_published': log.bytes_sent, 'bytes_received': log.bytes_received,
        'payload_bytes': log.bytes_sent // max(steps, 1),
        'applied_staleness': {int(k): v for k, v in sorted(client.update_age.items())},
        'view_staleness': {int(k): v for k, v in sorted(client.view_staleness.items())},
        'resent_deltas': client.resends,
        'read_path': self.pipeline.read_path, 'shared_memory_reads': client.shared_reads,
        'dropped_rings': client.dropped_rings,
    }
