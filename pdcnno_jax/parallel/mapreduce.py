"""MapReduce training: Split / Map / Reduce rounds with balanced block assignment.

``config.parallel.mode = 'mapreduce'``. Every process is one worker ("node" in the papers).

Split. Each epoch, the training set is put in the order of
``input_pipeline.epoch_permutation(N, seed, epoch)`` (the order synchronous training uses) and
cut into ``parallel.num_blocks`` equal blocks of ``N // num_blocks`` examples (the last
``N % num_blocks`` examples of the permutation sit out that epoch; the permutation changes every
epoch, so a different few each time). So block contents are re-shuffled every epoch, and fixed
within it. An epoch has ``parallel.rounds_per_epoch`` rounds; round r trains the r-th run of
``num_blocks / rounds_per_epoch`` consecutive blocks.

Map. The balancer's assignment gives worker k ``a_k`` of the round's blocks (worker 0 the first
``a_0``, worker 1 the next ``a_1``, ...). Each worker trains its own copy of the model on its
blocks, in block order, with the configured optimizer (any optax transform, or CGMSE in
mini-batch mode, through ``steps.make_train_step``), in local batches of
``config.data.batch_size // process_count`` examples, data parallel over the process's own
devices. The last ``< local batch`` examples of a worker's share in a round are dropped
(fixed shapes, one compiled step). Under an equal split every worker then makes about
``steps_per_epoch`` updates per epoch, as synchronous training does, so the learning-rate
schedule built for ``num_epochs * steps_per_epoch`` steps fits.

Reduce. Parameters, the non-parameter model state (BatchNorm statistics, masks) and the
floating optimizer state (momentum, Adam moments, CG directions) are averaged over the workers
weighted by the examples each trained in the round (`collectives.TreeAverager`: one all-reduce
across processes); integer counters (``step``, the optimizer's schedule counts) become the mean
over workers, i.e. they advance by (total local steps) / K per round, the synchronous-equivalent
step. Every worker starts the next round from the same averaged state. Under a very unequal
assignment a fast worker's local count runs ahead of this mean within a round, so near the end of
a decaying schedule it may take a few steps at the schedule's floor.

Balance. Each worker's `monitor.WorkerMonitor` measures its busy time (device work plus any
simulated slowdown, `slowdown.Slowdown`) during Map; the rows are all-gathered (one collective)
and the configured balancer (`balancers.balancer_from_config`) assigns the next round's blocks
from the measured speeds. Round 0 uses the equal split.

Checkpoints are written at round boundaries (every ``checkpoint_every_steps`` synchronous-
equivalent steps and at each epoch end) through the trainer's checkpointer; the next round and
its assignment go into the checkpoint metadata under ``stage_reports['mapreduce_resume']`` and
the per-round report so far under ``stage_reports['mapreduce']``, so a killed run resumes at the
round it stopped after, with the same assignment and data.

Report (returned and stored in ``report.json`` under ``'mapreduce'``): per round the blocks,
examples, local steps, busy and idle seconds and speed of every worker, the makespan (longest
busy time), the parallel computing entropy of the busy times and the Reduce time; at the end the
speed-up ratio T_1 / T_p (see `speedup_report`).

References:
  DESIGN.md, "MapReduce training", "LBRLA", "DLBPCE".
  PDCNNO paper (``papers/pdcnno_mapreduce_cgmse.txt``): Split / Map / Reduce phases, LBRLA,
    speed-up ratio.
  MR-FPDCNN paper (``papers/mr_fpdcnn_taylor_glowworm_zh.txt``): DLBPCE, parallel computing
    entropy, speed-up ratio.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from pdcnno_jax.data import input_pipeline
from pdcnno_jax.parallel import balancers
from pdcnno_jax.parallel import collectives
from pdcnno_jax.parallel import monitor as monitor_lib
from pdcnno_jax.parallel import slowdown as slowdown_lib
from pdcnno_jax.train import metrics as metrics_lib
from pdcnno_jax.train import sharding as sharding_lib
from pdcnno_jax.train import state as state_lib
from pdcnno_jax.train import steps as steps_lib

if TYPE_CHECKING:
  from pdcnno_jax.train import trainer  # pylint: disable=g-bad-import-order

RESUME_KEY = 'mapreduce_resume'
REPORT_KEY = 'mapreduce'

# Per-round figures each worker contributes to the all-gather after Map, after the monitor's
# `balancers.VECTOR_FIELDS`.
_EXTRA_FIELDS = ('loss_sum', 'correct_sum', 'samples', 'steps', 'reduce_s', 'round_s')


# ---------------------------------------------------------------------------------------
# Split: blocks and per-worker shares (pure numpy).
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockPlan:
  """How the training set is cut into blocks and rounds.

  Attributes:
    num_examples: training examples N.
    num_blocks: blocks per epoch.
    rounds_per_epoch: rounds per epoch.
    block_size: examples per block, N // num_blocks.
  """
  num_examples: int
  num_blocks: int
  rounds_per_epoch: int
  block_size: int

  @property
  def blocks_per_round(self) -> int:
    return self.num_blocks // self.rounds_per_epoch

  def round_blocks(self, seed: int, epoch: int, round_in_epoch: int) -> np.ndarray:
    """Example indices of the blocks of one round: [blocks_per_round, block_size].

    Block b of an epoch is ``order[b * block_size:(b + 1) * block_size]`` with ``order`` the
    epoch's permutation (a pure function of seed and epoch); round r holds blocks
    ``[r * blocks_per_round, (r + 1) * blocks_per_round)``.
    """
    if not 0 <= round_in_epoch < self.rounds_per_epoch:
      raise ValueError(f'round_in_epoch={round_in_epoch} is outside '
                       f'[0, {self.rounds_per_epoch}).')
    order = input_pipeline.epoch_permutation(self.num_examples, seed, epoch)
    first = round_in_epoch * self.blocks_per_round
    blocks = order[:self.num_blocks * self.block_size].reshape(self.num_blocks,
                                                                self.block_size)
    return blocks[first:first + self.blocks_per_round]


def make_block_plan(num_examples: int, num_blocks: int, rounds_per_epoch: int, *,
                    num_workers: int, local_batch_size: int) -> BlockPlan:
  """Checks the Split settings and returns the plan.

  Args:
    num_examples: training examples.
    num_blocks: config.parallel.num_blocks.
    rounds_per_epoch: config.parallel.rounds_per_epoch.
    num_workers: processes (workers).
    local_batch_size: examples per local step.

  Raises:
    ValueError: settings that leave a worker without a full local batch, or that do not
      divide; the message says which key to change.
  """
  if rounds_per_epoch < 1:
    raise ValueError(f'config.parallel.rounds_per_epoch={rounds_per_epoch} must be >= 1.')
  if num_blocks < 1 or num_blocks % rounds_per_epoch:
    raise ValueError(
        f'config.parallel.num_blocks={num_blocks} must be a positive multiple of '
        f'config.parallel.rounds_per_epoch={rounds_per_epoch} (each round trains '
        'num_blocks / rounds_per_epoch blocks).')
  if num_blocks // rounds_per_epoch < num_workers:
    raise ValueError(
        f'Each round has {num_blocks // rounds_per_epoch} blocks (config.parallel.num_blocks='
        f'{num_blocks} / rounds_per_epoch={rounds_per_epoch}) but there are {num_workers} '
        f'workers; every worker needs at least one block: raise num_blocks to at least '
        f'{num_workers * rounds_per_epoch}.')
  block_size = num_examples // num_blocks
  if block_size < local_batch_size:
    raise ValueError(
        f'Blocks hold {block_size} examples ({num_examples} // config.parallel.num_blocks='
        f'{num_blocks}), fewer than one local batch of {local_batch_size} '
        '(config.data.batch_size // processes); lower num_blocks or the batch size.')
  return BlockPlan(num_examples, num_blocks, rounds_per_epoch, block_size)


def worker_share(round_blocks: np.ndarray, assignment: np.ndarray, worker: int) -> np.ndarray:
  """Example indices worker ``worker`` trains: its run of consecutive blocks, flattened.

  Args:
    round_blocks: [blocks_per_round, block_size] from `BlockPlan.round_blocks`.
    assignment: [K] blocks per worker, summing to blocks_per_round.
    worker: worker index.
  """
  assignment = np.asarray(assignment, np.int64)
  if assignment.sum() != round_blocks.shape[0] or np.any(assignment < 0):
    raise ValueError(f'Assignment {assignment.tolist()} must be >= 0 and sum to the '
                     f'{round_blocks.shape[0]} blocks of the round.')
  bounds = np.concatenate([[0], np.cumsum(assignment)])
  return round_blocks[bounds[worker]:bounds[worker + 1]].reshape(-1)


def local_steps(assignment: np.ndarray, block_size: int, local_batch_size: int) -> np.ndarray:
  """[K] local steps per worker: full local batches in each worker's share."""
  return np.asarray(assignment, np.int64) * block_size // local_batch_size


def local_batch_size(global_batch_size: int, num_workers: int, num_local_devices: int) -> int:
  """Per-worker batch: ``global_batch_size // num_workers``, split over the local devices.

  Raises:
    ValueError: when it does not divide evenly.
  """
  if global_batch_size % num_workers:
    raise ValueError(
        f'config.data.batch_size={global_batch_size} must be divisible by the {num_workers} '
        'worker processes (each worker trains local batches of batch_size // processes).')
  local = global_batch_size // num_workers
  if local % num_local_devices:
    raise ValueError(
        f'The local batch {local} (config.data.batch_size // {num_workers} processes) must '
        f'be divisible by the {num_local_devices} devices of each process.')
  return local


# ---------------------------------------------------------------------------------------
# Report figures (pure numpy).
# ---------------------------------------------------------------------------------------


def round_report(round_index: int, epoch: int, assignment: np.ndarray,
                 gathered: np.ndarray) -> dict[str, Any]:
  """Per-round figures from the all-gathered worker rows.

  Args:
    round_index: global round index.
    epoch: epoch of the round.
    assignment: [K] blocks each worker trained.
    gathered: [K, len(VECTOR_FIELDS) + len(_EXTRA_FIELDS)] rows.

  Returns:
    JSON-able dict: blocks, samples, steps, busy_s, idle_s (= makespan - busy_k, the time
    worker k waits at the Reduce), speed (examples per busy second), makespan_s (the longest
    busy time), entropy (normalised parallel computing entropy of the busy times; 1 = perfect
    balance), reduce_s (the Reduce of the last worker to arrive, i.e. the collective without
    waiting), round_s (wall time of the round, Map + Reduce, on the slowest process), loss and
    accuracy (example-weighted means of the Map steps).
  """
  num_monitor = len(balancers.VECTOR_FIELDS)
  stats = balancers.WorkerStats.from_vectors(gathered[:, :num_monitor])
  extra = dict(zip(_EXTRA_FIELDS, gathered[:, num_monitor:].T))
  busy = stats.busy_s
  makespan = float(busy.max())
  samples = extra['samples']
  steps = np.maximum(extra['steps'], 1)
  return {
      'round': int(round_index),
      'epoch': int(epoch),
      'blocks': [int(b) for b in assignment],
      'samples': [int(s) for s in samples],
      'steps': [int(s) for s in extra['steps']],
      'busy_s': [float(b) for b in busy],
      'idle_s': [float(makespan - b) for b in busy],
      'speed': [float(s) for s in stats.speed],
      'makespan_s': makespan,
      'entropy': balancers.parallel_computing_entropy(busy),
      'reduce_s': float(extra['reduce_s'].min()),
      'round_s': float(extra['round_s'].max()),
      'loss': float(extra['loss_sum'].sum() / steps.sum()),
      'accuracy': float(extra['correct_sum'].sum() / max(samples.sum(), 1.0)),
  }


def speedup_report(rounds: list[dict[str, Any]]) -> dict[str, Any]:
  """Speed-up ratio S = T_1 / T_p over the given rounds.

  T_p is the measured parallel time: the sum over rounds of the round's wall time (Map, with
  the host-side batch preparation, and Reduce, on the slowest process). T_1, the time one node
  would need for the same work, is estimated from the same run as the examples trained by all
  workers divided by the throughput of the fastest worker (examples per busy second over all
  rounds), i.e. a single node as fast as the fastest one trains everything alone, with no
  Reduce. Also reported: the ideal speed-up of a perfectly balanced assignment,
  sum_k speed_k / max_k speed_k, and the efficiency S / K.

  Args:
    rounds: `round_report` dicts.

  Returns:
    JSON-able dict with t1_s, tp_s, speedup, ideal_speedup, efficiency, workers.

  References:
    PDCNNO and MR-FPDCNN papers, speed-up ratio S = T_1 / T_p.
  """
  if not rounds:
    return {}
  samples = np.sum([r['samples'] for r in rounds], axis=0).astype(np.float64)
  busy = np.sum([r['busy_s'] for r in rounds], axis=0)
  speed = samples / np.maximum(busy, 1e-12)
  t1 = float(samples.sum() / speed.max())
  tp = float(sum(r['round_s'] for r in rounds))
  speedup = t1 / tp if tp > 0 else float('nan')
  return {
      't1_s': t1, 'tp_s': tp, 'speedup': speedup,
      'ideal_speedup': float(speed.sum() / speed.max()),
      'efficiency': speedup / len(samples), 'workers': len(samples),
      'note': 'T_1 = examples trained / throughput of the fastest worker (measured in this '
              'run); T_p = sum over rounds of the round wall time (Map + Reduce).',
  }


# ---------------------------------------------------------------------------------------
# Moving state between the global mesh and a worker's local mesh.
# ---------------------------------------------------------------------------------------


def _local_devices(mesh: jax.sharding.Mesh) -> list[jax.Device]:
  devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  if not devices:
    raise ValueError('The mesh holds no device of this process.')
  return devices


def to_local(tree: Any, local_sharding: jax.sharding.Sharding) -> Any:
  """A replicated global pytree as this process's own copy, replicated on its local mesh."""

  def put(x):
    if isinstance(x, jax.Array):
      if x.sharding == local_sharding:
        return x
      x = x.addressable_data(0)
    return jax.device_put(x, local_sharding)

  return jax.tree.map(put, tree)


def to_global(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Inverse of `to_local`: identical per-process copies as one array replicated on ``mesh``.

  No host transfer: every local shard is reused as this process's shard of the global array.
  """
  sharding = sharding_lib.replicated(mesh)

  def put(x):
    shards = sorted(x.addressable_shards, key=lambda s: s.device.id)
    return jax.make_array_from_single_device_arrays(x.shape, sharding,
                                                    [s.data for s in shards])

  return jax.tree.map(put, tree)


# ---------------------------------------------------------------------------------------
# The training loop.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Worker:
  """One process's Map machinery."""
  data_sharding: jax.sharding.Sharding
  step_fn: Callable[..., Any]
  slow: slowdown_lib.Slowdown
  monitor: monitor_lib.WorkerMonitor
  averager: collectives.TreeAverager
  process_mesh: jax.sharding.Mesh
  images: np.ndarray
  labels: np.ndarray
  batch: int
  warm: bool = False

  def batches(self, indices: np.ndarray):
    for step in range(len(indices) // self.batch):
      rows = indices[step * self.batch:(step + 1) * self.batch]
      yield jax.device_put({'image': self.images[rows], 'label': self.labels[rows]},
                           self.data_sharding)


def _map_phase(worker: _Worker, state: state_lib.TrainState,
               indices: np.ndarray) -> tuple[state_lib.TrainState, dict[str, float]]:
  """Map: local training on ``indices``; returns the state and this worker's round figures."""
  loss_sum, correct_sum, steps = jnp.zeros(()), jnp.zeros(()), 0
  worker.monitor.start()
  for batch in worker.batches(indices):
    (state, metrics), seconds = worker.slow.run(worker.step_fn, state, batch)
    worker.monitor.record(worker.batch, seconds)
    loss_sum = loss_sum + metrics['loss']
    correct_sum = correct_sum + metrics['accuracy'] * worker.batch
    steps += 1
  stats = worker.monitor.stop()
  loss_sum, correct_sum = jax.device_get((loss_sum, correct_sum))
  return state, {'row': stats.to_vectors()[0], 'loss_sum': float(loss_sum),
                 'correct_sum': float(correct_sum), 'samples': steps * worker.batch,
                 'steps': steps}


def _warm_up(worker: _Worker, state: state_lib.TrainState, batch: dict[str, jax.Array]) -> None:
  """Compiles and runs once every jitted piece (on a copy), so no round times a compile.

  Every process calls it at the same point: it runs one Reduce and one all-gather.
  """
  scratch = jax.tree.map(jnp.copy, state)
  scratch, _ = jax.block_until_ready(worker.step_fn(scratch, batch))
  jax.block_until_ready(worker.averager(scratch, 1.0 / jax.process_count()))
  collectives.allgather_rows(np.zeros(len(balancers.VECTOR_FIELDS) + len(_EXTRA_FIELDS)),
                             worker.process_mesh)
  worker.warm = True


@functools.lru_cache(maxsize=8)
def _local_train_step(graphdef, tx, preprocess, mesh):
  """The jitted local step, shared by repeated `train` calls on the same model and mesh."""
  return steps_lib.make_train_step(graphdef, tx, preprocess, mesh)


@functools.lru_cache(maxsize=8)
def _averager(out_sharding, process_mesh) -> collectives.TreeAverager:
  return collectives.TreeAverager(out_sharding, process_mesh)


def _resume_point(exp: 'trainer.Experiment', num_workers: int, blocks_per_round: int,
                  total_rounds: int) -> tuple[int, np.ndarray | None, list[dict[str, Any]]]:
  """(next round, its assignment or None for an equal split, rounds reported so far)."""
  resume = exp.stage_reports.get(RESUME_KEY)
  if not resume:
    return 0, None, []
  rounds = list(exp.stage_reports.get(REPORT_KEY, {}).get('rounds', []))
  next_round = min(int(resume['next_round']), total_rounds)
  blocks = np.asarray(resume.get('blocks', []), np.int64)
  if (int(resume.get('num_workers', -1)) != num_workers
      or int(resume.get('blocks_per_round', -1)) != blocks_per_round
      or blocks.shape != (num_workers,) or blocks.sum() != blocks_per_round):
    logging.warning('MapReduce resume: the checkpoint was written with %s workers and %s '
                    'blocks per round; now %d and %d. Continuing at round %d with an equal '
                    'split.', resume.get('num_workers'), resume.get('blocks_per_round'),
                    num_workers, blocks_per_round, next_round)
    blocks = None
  return next_round, blocks, rounds


def train(exp: 'trainer.Experiment', state: state_lib.TrainState, *, tx,
          checkpointer=None) -> tuple[state_lib.TrainState, dict[str, Any]]:
  """MapReduce training for ``config.num_epochs`` epochs (see the module docstring).

  Every process must call this at the same point (it runs collectives).

  Args:
    exp: the `trainer.Experiment` (config, dataset, global mesh, preprocess, graphdef, timer,
      writer, stage_reports).
    state: the `TrainState`, replicated on ``exp.mesh``.
    tx: the optimizer whose state is ``state.opt_state``.
    checkpointer: the trainer's `Checkpointer` (None: no checkpoints).

  Returns:
    ``(state, report)``: the averaged state replicated on ``exp.mesh`` and the JSON-able report
    (per-round figures, speed-up).

  Raises:
    ValueError: a streaming data set, full-batch CGMSE, or Split settings that do not fit
      (see `make_block_plan`, `local_batch_size`).
    trainer.NonFiniteLossError: the averaged loss of a round is NaN/inf.
  """
  from pdcnno_jax.train import trainer  # pylint: disable=g-import-not-at-top  # Import cycle.

  config = exp.config
  parallel = config.parallel
  if not exp.dataset.in_memory:
    raise ValueError(
        f'parallel.mode=mapreduce needs an in-memory data set to cut into blocks; '
        f'{exp.dataset.name} is streamed. Set config.data.in_memory=True (or use '
        "parallel.mode='sync' for streamed data sets).")
  if config.optimizer.name == 'cgmse' and config.optimizer.mode == 'full_batch':
    raise ValueError(
        "parallel.mode=mapreduce trains in local mini-batches; CGMSE's full_batch mode is not "
        "supported there. Set config.optimizer.mode='minibatch' (or parallel.mode='sync' "
        'for full-batch CGMSE).')
  num_workers, me = jax.process_count(), jax.process_index()
  devices = _local_devices(exp.mesh)
  local_mesh = sharding_lib.make_mesh(devices)
  batch = local_batch_size(config.data.batch_size, num_workers, len(devices))
  split = exp.dataset.host_splits['train']
  plan = make_block_plan(len(split.labels), int(parallel.num_blocks),
                         int(parallel.rounds_per_epoch), num_workers=num_workers,
                         local_batch_size=batch)
  total_rounds = int(round(config.num_epochs * plan.rounds_per_epoch))
  assign = balancers.balancer_from_config(parallel)
  replicated = sharding_lib.replicated(local_mesh)
  proc_mesh = collectives.process_mesh(list(exp.mesh.devices.flat))
  worker = _Worker(
      data_sharding=sharding_lib.batch_sharded(local_mesh),
      step_fn=_local_train_step(exp.graphdef, tx, exp.preprocess, local_mesh),
      slow=slowdown_lib.Slowdown.from_config(parallel, me, num_workers, seed=config.seed),
      monitor=monitor_lib.WorkerMonitor(devices=devices),
      averager=_averager(replicated, proc_mesh),
      process_mesh=proc_mesh, images=split.images, labels=split.labels, batch=batch)

  next_round, blocks, rounds = _resume_point(exp, num_workers, plan.blocks_per_round,
                                             total_rounds)
  if blocks is None:
    blocks = balancers.equal(plan.blocks_per_round,
                             balancers.WorkerStats(np.ones(num_workers)))
  local_state = to_local(state, replicated)
  step = int(jax.device_get(local_state.step))
  last_saved_step = step
  eval_split = 'validation' if 'validation' in exp.dataset.splits else 'test'
  metrics_lib.log_line(
      f'[mapreduce] {num_workers} workers, {plan.num_blocks} blocks of {plan.block_size} '
      f'examples, {plan.rounds_per_epoch} rounds/epoch, local batch {batch}, balancer '
      f'{parallel.balancer}, slowdowns '
      f'{list(slowdown_lib.parse_slowdown(parallel.slowdown, num_workers))}; starting at '
      f'round {next_round}/{total_rounds}.')

  for round_index in range(next_round, total_rounds):
    epoch, round_in_epoch = divmod(round_index, plan.rounds_per_epoch)
    indices = worker_share(plan.round_blocks(config.seed, epoch, round_in_epoch), blocks, me)
    if not worker.warm:
      with exp.timer.phase('compile'):
        _warm_up(worker, local_state, next(worker.batches(indices)))
    round_start = time.perf_counter()
    with exp.timer.phase('train'):
      local_state, figures = _map_phase(worker, local_state, indices)
    trained = local_steps(blocks, plan.block_size, batch) * batch
    with exp.timer.phase('reduce'):
      start = time.perf_counter()
      local_state = worker.averager(local_state, figures['samples'] / trained.sum())
      jax.block_until_ready(local_state)
      reduce_s = time.perf_counter() - start
      row = np.concatenate([figures['row'], [
          figures['loss_sum'], figures['correct_sum'], figures['samples'], figures['steps'],
          reduce_s, time.perf_counter() - round_start]])
      gathered = collectives.allgather_rows(row, proc_mesh).astype(np.float64)
    figures_round = round_report(round_index, epoch, blocks, gathered)
    stats = balancers.WorkerStats.from_vectors(gathered[:, :len(balancers.VECTOR_FIELDS)])
    blocks = assign(plan.blocks_per_round, stats, blocks)
    figures_round['next_blocks'] = [int(b) for b in blocks]
    rounds.append(figures_round)
    step = int(jax.device_get(local_state.step))
    _log_round(exp, step, figures_round)
    if not math.isfinite(figures_round['loss']):
      raise trainer.NonFiniteLossError(
          f'Training loss is {figures_round["loss"]} in MapReduce round {round_index}; the '
          f'last good checkpoint is step {checkpointer and checkpointer.latest_step()} in '
          f'{exp.workdir}. Lower config.optimizer.learning_rate or set '
          'config.optimizer.grad_clip_norm.')

    epoch_end = round_in_epoch == plan.rounds_per_epoch - 1
    last = round_index == total_rounds - 1
    global_state = None
    if epoch_end and ((epoch + 1) % config.eval_every_epochs == 0 or last):
      global_state = to_global(local_state, exp.mesh)
      with exp.timer.phase('eval'):
        result = trainer.evaluate(exp, global_state, eval_split)
      metrics_lib.log_line(f'[mapreduce] epoch {epoch + 1} {eval_split}: '
                           f'loss={result["loss"]:.4f} accuracy={result["accuracy"]:.4f}')
      figures_round[eval_split] = result
      if exp.writer:
        exp.writer.write(step, result, prefix=eval_split)
    due = step // config.checkpoint_every_steps > last_saved_step // config.checkpoint_every_steps
    if checkpointer is not None and (due or epoch_end or last):
      exp.stage_reports[RESUME_KEY] = {
          'next_round': round_index + 1, 'blocks': [int(b) for b in blocks],
          'num_workers': num_workers, 'blocks_per_round': plan.blocks_per_round}
      exp.stage_reports[REPORT_KEY] = {'rounds': rounds}
      global_state = global_state or to_global(local_state, exp.mesh)
      # pylint: disable-next=protected-access
      trainer._save(exp, checkpointer, global_state, phase='mapreduce')
      last_saved_step = step

  report = {
      'workers': num_workers, 'balancer': parallel.balancer,
      'slowdown': [float(f) for f in slowdown_lib.parse_slowdown(parallel.slowdown,
                                                                  num_workers)],
      'num_blocks': plan.num_blocks, 'block_size': plan.block_size,
      'rounds_per_epoch': plan.rounds_per_epoch, 'local_batch_size': batch,
      'rounds': rounds, 'speedup': speedup_report(rounds),
      'mean_makespan_s': float(np.mean([r['makespan_s'] for r in rounds])) if rounds else 0.0,
  }
  exp.stage_reports.pop(RESUME_KEY, None)
  return to_global(local_state, exp.mesh), report


def _log_round(exp: 'trainer.Experiment', step: int, figures: dict[str, Any]) -> None:
  metrics_lib.log_line(
      f'[mapreduce] round {figures["round"]} (epoch {figures["epoch"]}) step {step} '
      f'blocks={figures["blocks"]} busy_s=[{", ".join(f"{b:.2f}" for b in figures["busy_s"])}] '
      f'makespan={figures["makespan_s"]:.2f}s H={figures["entropy"]:.4f} '
      f'reduce={figures["reduce_s"]:.3f}s loss={figures["loss"]:.4f} '
      f'accuracy={figures["accuracy"]:.4f} next={figures["next_blocks"]}')
  if exp.writer:
    exp.writer.write(step, {'loss': figures['loss'], 'accuracy': figures['accuracy'],
                            'makespan_s': figures['makespan_s'],
                            'entropy': figures['entropy'], 'reduce_s': figures['reduce_s']},
                     prefix='mapreduce')
