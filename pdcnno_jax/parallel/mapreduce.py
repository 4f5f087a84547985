"""MapReduce training: ``config.parallel.mode = 'mapreduce'``, one worker per process.

Split: each epoch the training set, in the epoch's permutation (the order synchronous training
uses), is cut into ``parallel.num_blocks`` equal blocks; an epoch has ``rounds_per_epoch``
rounds, each training the next ``num_blocks / rounds_per_epoch`` blocks.
Map: the balancer gives worker k ``a_k`` consecutive blocks of the round; each worker trains
its own copy on them with the configured optimizer, in local batches of ``batch_size // K``
examples, data parallel over its own devices.
Reduce: parameters, model state and the floating optimizer state are averaged over the workers
weighted by the examples each trained (`collectives.TreeAverager`, one all-reduce); integer
counters become the mean, the synchronous-equivalent step.
Balance: each worker's monitor measures its busy time (device work plus simulated slowdown);
the rows are all-gathered and the balancer (equal, proportional, LBRLA, DLBPCE) assigns the next
round's blocks from the measured speeds. Round 0 is the equal split.
Checkpoints at round boundaries hold the next round and its assignment in ``exp.mode_resume``,
so a killed run resumes at the round after the last one saved, with the same assignment.
The report has per-round blocks, examples, busy/idle seconds, makespan, entropy, Reduce time
and the speed-up T_1 / T_p (`speedup_report`).

References:
  PDCNNO paper (papers/pdcnno_mapreduce_cgmse.txt): Split / Map / Reduce, LBRLA, speed-up.
  MR-FPDCNN paper (papers/mr_fpdcnn_taylor_glowworm_zh.txt): DLBPCE, computing entropy.
  DESIGN.md, "MapReduce training", "LBRLA", "DLBPCE".
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from pdcnno_jax.data import input_pipeline
from pdcnno_jax.loop import batching
from pdcnno_jax.loop import checks
from pdcnno_jax.loop import context
from pdcnno_jax.loop import evaluation
from pdcnno_jax.loop import periodic
from pdcnno_jax.loop import placement
from pdcnno_jax.loop import saving
from pdcnno_jax.parallel import balancers
from pdcnno_jax.parallel import collectives
from pdcnno_jax.parallel import monitor as monitor_lib
from pdcnno_jax.parallel import slowdown as slowdown_lib
from pdcnno_jax.train import checkpointing
from pdcnno_jax.train import metrics as metrics_lib
from pdcnno_jax.train import sharding as sharding_lib
from pdcnno_jax.train import state as state_lib
from pdcnno_jax.train import steps as steps_lib

MESH = 'global'  # Collectives span every process.
USES_CHECKPOINTER = True

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
# The training loop.
# ---------------------------------------------------------------------------------------


def validate(config: ml_collections.ConfigDict, dataset: input_pipeline.Dataset) -> None:
  """MapReduce needs blocks of an in-memory data set and mini-batch local training."""
  if not dataset.in_memory:
    raise ValueError(
        f'parallel.mode=mapreduce needs an in-memory data set to cut into blocks; '
        f'{dataset.name} is streamed. Set config.data.in_memory=True (or use '
        "parallel.mode='sync' for streamed data sets).")
  if config.optimizer.name == 'cgmse' and config.optimizer.mode == 'full_batch':
    raise ValueError(
        "parallel.mode=mapreduce trains in local mini-batches; CGMSE's full_batch mode is not "
        "supported there. Set config.optimizer.mode='minibatch' (or parallel.mode='sync' "
        'for full-batch CGMSE).')


@dataclasses.dataclass
class Worker:
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


def map_phase(worker: Worker, state: state_lib.TrainState,
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


def _warm_up(worker: Worker, state: state_lib.TrainState, batch: dict[str, jax.Array]) -> None:
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


def _make_worker(exp: context.Experiment, tx, local_mesh: jax.sharding.Mesh,
                 batch: int) -> Worker:
  parallel = exp.config.parallel
  split = exp.dataset.host_splits['train']
  proc_mesh = collectives.process_mesh(list(exp.mesh.devices.flat))
  return Worker(
      data_sharding=sharding_lib.batch_sharded(local_mesh),
      step_fn=_local_train_step(exp.graphdef, tx, exp.preprocess, local_mesh),
      slow=slowdown_lib.Slowdown.from_config(parallel, jax.process_index(),
                                             jax.process_count(), seed=exp.config.seed),
      monitor=monitor_lib.WorkerMonitor(devices=list(local_mesh.devices.flat)),
      averager=_averager(sharding_lib.replicated(local_mesh), proc_mesh),
      process_mesh=proc_mesh, images=split.images, labels=split.labels, batch=batch)


def _resume_point(exp: context.Experiment, num_workers: int, blocks_per_round: int,
                  total_rounds: int) -> tuple[int, np.ndarray | None, list[dict[str, Any]]]:
  """(next round, its assignment or None for an equal split, rounds reported so far)."""
  resume = exp.mode_resume
  if not resume:
    return 0, None, []
  next_round = min(int(resume['next_round']), total_rounds)
  blocks = np.asarray(resume['blocks'], np.int64)
  if (int(resume['num_workers']) != num_workers
      or int(resume['blocks_per_round']) != blocks_per_round):
    logging.warning('MapReduce resume: the checkpoint was written with %s workers and %s '
                    'blocks per round; now %d and %d. Continuing at round %d with an equal '
                    'split.', resume['num_workers'], resume['blocks_per_round'],
                    num_workers, blocks_per_round, next_round)
    blocks = None
  return next_round, blocks, list(resume['rounds'])


def _reduce(worker: Worker, state: state_lib.TrainState, figures: dict[str, Any],
            trained: np.ndarray, round_start: float) -> tuple[state_lib.TrainState, np.ndarray]:
  """Reduce: the sample-weighted average, then every worker's round figures all-gathered."""
  start = time.perf_counter()
  state = worker.averager(state, figures['samples'] / trained.sum())
  jax.block_until_ready(state)
  reduce_s = time.perf_counter() - start
  row = np.concatenate([figures['row'], [
      figures['loss_sum'], figures['correct_sum'], figures['samples'], figures['steps'],
      reduce_s, time.perf_counter() - round_start]])
  return state, collectives.allgather_rows(row, worker.process_mesh).astype(np.float64)


def _final_report(exp: context.Experiment, plan: BlockPlan, batch: int,
                  rounds: list[dict[str, Any]]) -> dict[str, Any]:
  parallel = exp.config.parallel
  num_workers = jax.process_count()
  return {
      'workers': num_workers, 'balancer': parallel.balancer,
      'slowdown': [float(f) for f in slowdown_lib.parse_slowdown(parallel.slowdown,
                                                                  num_workers)],
      'num_blocks': plan.num_blocks, 'block_size': plan.block_size,
      'rounds_per_epoch': plan.rounds_per_epoch, 'local_batch_size': batch,
      'rounds': rounds, 'speedup': speedup_report(rounds),
      'mean_makespan_s': float(np.mean([r['makespan_s'] for r in rounds])) if rounds else 0.0,
  }


def train(exp: context.Experiment, state: state_lib.TrainState, *, tx,
          checkpointer: checkpointing.Checkpointer | None = None
          ) -> tuple[state_lib.TrainState, dict[str, Any]]:
  """MapReduce training for ``config.num_epochs`` epochs (see the module docstring).

  Every process must call this at the same point (it runs collectives). ``config.max_steps``
  ends training after the first round that reaches it.

  Args:
    exp: the experiment (config, dataset, global mesh, preprocess, graphdef, timer, writer,
      mode_resume).
    state: the `TrainState`, replicated on ``exp.mesh``.
    tx: the optimizer whose state is ``state.opt_state``.
    checkpointer: saves at round boundaries (None: no checkpoints).

  Returns:
    ``(state, report)``: the averaged state replicated on ``exp.mesh`` and the JSON-able report
    (per-round figures, speed-up).

  Raises:
    ValueError: a streamed data set, full-batch CGMSE, or Split settings that do not fit.
    checks.NonFiniteLossError: the averaged loss of a round is NaN/inf.
  """
  config = exp.config
  validate(config, exp.dataset)
  parallel = config.parallel
  num_workers, me = jax.process_count(), jax.process_index()
  local_mesh = sharding_lib.make_mesh(placement.local_devices(exp.mesh))
  batch = batching.local_batch_size(config.data.batch_size, num_workers,
                                    local_mesh.devices.size)
  plan = make_block_plan(exp.dataset.num_examples['train'], int(parallel.num_blocks),
                         int(parallel.rounds_per_epoch), num_workers=num_workers,
                         local_batch_size=batch)
  total_rounds = int(round(config.num_epochs * plan.rounds_per_epoch))
  assign = balancers.balancer_from_config(parallel)
  worker = _make_worker(exp, tx, local_mesh, batch)
  next_round, blocks, rounds = _resume_point(exp, num_workers, plan.blocks_per_round,
                                             total_rounds)
  if blocks is None:
    blocks = balancers.equal(plan.blocks_per_round,
                             balancers.WorkerStats(np.ones(num_workers)))
  local_state = placement.to_local(state, sharding_lib.replicated(local_mesh))
  last_saved_step = int(jax.device_get(local_state.step))
  steps_per_epoch = exp.steps_per_epoch
  watch = checks.CollapseWatch(exp, examples_per_epoch=exp.dataset.num_examples['train'],
                               warmup_steps=checks.warmup_steps(config, steps_per_epoch),
                               phase='mapreduce')
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
    step_before = int(jax.device_get(local_state.step))
    with exp.timer.phase('train'):
      local_state, figures = map_phase(worker, local_state, indices)
    with exp.timer.phase('reduce'):
      local_state, gathered = _reduce(worker, local_state, figures,
                                      local_steps(blocks, plan.block_size, batch) * batch,
                                      round_start)
    figures_round = round_report(round_index, epoch, blocks, gathered)
    stats = balancers.WorkerStats.from_vectors(gathered[:, :len(balancers.VECTOR_FIELDS)])
    blocks = assign(plan.blocks_per_round, stats, blocks)
    figures_round['next_blocks'] = [int(b) for b in blocks]
    rounds.append(figures_round)
    first_step, step = step_before, int(jax.device_get(local_state.step))
    _log_round(exp, step, figures_round)
    last_good = checkpointer.last_good_step() if checkpointer else None
    checks.check_finite_loss(figures_round['loss'], where=f'MapReduce round {round_index}',
                             last_good=last_good, workdir=exp.workdir)
    watch.observe(figures_round['loss'], figures_round['accuracy'], first_step=first_step,
                  step=step, examples=int(sum(figures_round['samples'])), epoch=epoch,
                  last_good=last_good)

    stop = 0 < config.max_steps <= step
    last = round_index == total_rounds - 1 or stop
    epoch_end = round_in_epoch == plan.rounds_per_epoch - 1
    global_state = None
    if (epoch_end and periodic.every(epoch + 1, config.eval_every_epochs, last=False)) or last:
      global_state = placement.to_global(local_state, exp.mesh)
      figures_round[exp.eval_split] = evaluation.evaluate_and_log(
          exp, global_state, exp.eval_split, step=step, label=f'[mapreduce] epoch {epoch + 1}')
    due = periodic.crossed(last_saved_step, step, config.checkpoint_every_steps)
    if checkpointer is not None and (due or epoch_end or last):
      exp.mode_resume = {
          'next_round': round_index + 1, 'blocks': [int(b) for b in blocks],
          'num_workers': num_workers, 'blocks_per_round': plan.blocks_per_round,
          'rounds': rounds}
      global_state = global_state or placement.to_global(local_state, exp.mesh)
      saving.save(exp, checkpointer, global_state, phase='mapreduce',
                  loss=figures_round['loss'])
      last_saved_step = step
    if stop:
      break

  exp.mode_resume = {}
  return (placement.to_global(local_state, exp.mesh),
          _final_report(exp, plan, batch, rounds))


def _log_round(exp: context.Experiment, step: int, figures: dict[str, Any]) -> None:
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
